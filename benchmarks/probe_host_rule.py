"""The eager base GEMM's rule compared, interleaved, on bench_model's MoL step (one model, one process).

    python benchmarks/probe_host_rule.py [--rounds 5] [--steps 8] [--settings NAME ...] [--variants NAME ...]

Settings (base_gemm.EAGER_CUBLAS, read at each call): "cublas" (every uncaptured base GEMM on cuBLAS, the default)
and "tuned" (uncaptured calls run the tuned choice, as captured ones do). Run 45's call 2 ran this script at
03b4964, whose settings were the rules EAGER_CUBLAS replaced. One model alternates between the settings round by
round: the host's drift hits all alike, which separate processes (RESULTS run 37, calls 2-3) could not promise.
Prints each setting's per-round medians (ms per step, CUDA events) for each of bench_model's MoL variants named
(default: the backward on autograd's worker thread and on the calling thread; "..., torch.compile" compiles the
model once, its custom ops read the switch).
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import build, step_fn, variant  # noqa: E402

import mol.kernels.base_gemm as bg  # noqa: E402  (bench_model put the repository on the path)


SETTINGS = {"cublas": True, "tuned": False}


def apply(setting: str) -> None:
    bg.EAGER_CUBLAS = SETTINGS[setting]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--settings", nargs="+", default=["tuned", "cublas"], choices=sorted(SETTINGS))
    ap.add_argument("--variants", nargs="+", default=["MoL E=8 top-2 r=16 (triton)",
                                                      "MoL E=8 top-2 r=16 (triton), autograd threads off"])
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for name in args.variants:
        model, params = variant(name, build(False, "cuda", torch.bfloat16))
        ids = torch.randint(0, model.config.vocab_size, (8, 1024), device="cuda")
        step = step_fn(model, params, ids, name)
        rounds = {setting: [] for setting in args.settings}
        for setting in args.settings:  # warm-up (and the base GEMM's tuning) under every setting
            apply(setting)
            for _ in range(3):
                step()
        for _ in range(args.rounds):
            for setting in args.settings:
                apply(setting)
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
        for setting in args.settings:
            r = rounds[setting]
            print(f"{name} | {setting} | median of rounds {statistics.median(r):.1f} ms | "
                  f"rounds {' '.join(f'{t:.1f}' for t in r)}", flush=True)
        model = params = step = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
