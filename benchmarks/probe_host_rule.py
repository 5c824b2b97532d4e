"""base_gemm.HOST_BOUND_CUBLAS off against on, interleaved, on bench_model's MoL step (one model, one process).

    python benchmarks/probe_host_rule.py [--rounds 5] [--steps 8]

The rule (eager base GEMMs above EAGER_CUBLAS_ROWS run cuBLAS while the stream is idle) is read at each call, so
one model alternates between the settings round by round: the host's drift hits both alike, which separate
processes (RESULTS run 37, calls 2-3) could not promise. Prints each setting's per-round medians (ms per step,
CUDA events) for the backward on autograd's worker thread and on the calling thread.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import build, step_fn, variant  # noqa: E402

import mol.kernels.base_gemm as bg  # noqa: E402  (bench_model put the repository on the path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for name in ("MoL E=8 top-2 r=16 (triton)", "MoL E=8 top-2 r=16 (triton), autograd threads off"):
        model, params = variant(name, build(False, "cuda", torch.bfloat16))
        ids = torch.randint(0, model.config.vocab_size, (8, 1024), device="cuda")
        step = step_fn(model, params, ids, name)
        rounds = {False: [], True: []}
        for setting in (False, True):  # warm-up (and the base GEMM's tuning) under both settings
            bg.HOST_BOUND_CUBLAS = setting
            for _ in range(3):
                step()
        for _ in range(args.rounds):
            for setting in (False, True):
                bg.HOST_BOUND_CUBLAS = setting
                times = []
                for _ in range(args.steps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    s.record()
                    step()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                rounds[setting].append(statistics.median(times))
        for setting in (False, True):
            r = rounds[setting]
            print(f"{name} | HOST_BOUND_CUBLAS={setting} | median of rounds {statistics.median(r):.1f} ms | "
                  f"rounds {' '.join(f'{t:.1f}' for t in r)}", flush=True)
        model = params = step = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
