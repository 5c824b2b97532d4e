"""Eager MoLLinear fwd+bwd with small base GEMMs on cuBLAS (base_gemm.EAGER_CUBLAS_ROWS) against the tuned choice.

    python benchmarks/probe_eager_cublas.py [--t 1024 2048 4096] [--rounds 9] [--calls 40]

The host is noisy from process to process (the bare base's host time moved 59-142 µs between two processes in
RESULTS run 34), so the two settings are compared in one process, alternating round by round: each round measures
the host µs per call (the GPU held busy by a sleep kernel, profile_host.host_us) and the wall µs per call (one
synchronisation per `calls`), backward on the calling thread and on autograd's worker thread. 4096→4096, E=8
top-2 r=16, bf16. Prints medians over rounds.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
from mol.kernels import base_gemm as bg  # noqa: E402
from profile_host import host_us  # noqa: E402


def wall_us(fn, calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    dev, dt, n = "cuda", torch.bfloat16, 4096
    torch.manual_seed(0)
    base = torch.nn.Linear(n, n, bias=False, device=dev, dtype=dt).requires_grad_(False)
    m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend="triton").to(dev)
    params = [m.lora_A, m.lora_B, m.router.weight]
    one = torch.ones((), device=dev)
    bg.HOST_BOUND_CUBLAS = False  # the row-count rule alone (probe_host_rule.py measures the idle-stream one)
    settings = {"tuned (EAGER_CUBLAS_ROWS=0)": 0, f"cuBLAS at T <= {bg.EAGER_CUBLAS_ROWS}": bg.EAGER_CUBLAS_ROWS}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs per fwd+bwd, medians of {args.rounds} "
          "alternating rounds")
    print("| T | backward thread | setting | host µs | wall µs |")
    print("| --- | --- | --- | --- | --- |")
    for t in args.t:
        x = torch.randn(t, n, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(t, n, device=dev, dtype=dt)

        def step():
            y = m(x)
            torch.autograd.grad([y, m.aux_loss()], [x] + params, [dy, one])
        for threads in (False, True):
            torch.autograd.set_multithreading_enabled(threads)
            res = {k: ([], []) for k in settings}
            for _ in range(args.rounds):
                for k, rows in settings.items():
                    bg.EAGER_CUBLAS_ROWS = rows
                    res[k][0].append(host_us(step, args.calls, rounds=1))
                    res[k][1].append(wall_us(step, args.calls))
            for k, (h, w) in res.items():
                print(f"| {t} | {'worker' if threads else 'calling'} | {k} | {statistics.median(h):.0f} | "
                      f"{statistics.median(w):.0f} |", flush=True)
    torch.autograd.set_multithreading_enabled(True)


if __name__ == "__main__":
    main()
