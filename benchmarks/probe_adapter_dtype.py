"""Where float32 adapters cost a MoL model step its time: bench_model's step, float32 against bf16 adapters.

    python benchmarks/probe_adapter_dtype.py [--steps 2] [--top 25] [--rows NAME ...]

For each row (bench_model's names; default: MoL with float32 adapters, mol's default on a bf16 model, and with
bf16 ones), profiles `--steps` eager steps after warm-up with torch.profiler and prints: the host's wall time per
step (no synchronisation inside), the count of each CUDA runtime call (launches, copies), the aten / custom ops
with the most own CPU time (and their counts), and the GPU kernels with the most GPU time. The two rows' op
counts and kernel times side by side say whether the difference is host work (more or slower ops) or GPU work.
"""
import argparse
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import build, step_fn, variant  # noqa: E402

ROWS = ["MoL E=8 top-2 r=16 (triton)", "MoL E=8 top-2 r=16 (triton), bf16 adapters"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rows", nargs="+", default=ROWS)
    args = ap.parse_args()
    for name in args.rows:
        model, params = variant(name, build(False, "cuda", torch.bfloat16))
        ids = torch.randint(0, model.config.vocab_size, (8, 1024), device="cuda")
        step = step_fn(model, params, ids, name)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        # host time alone: the GPU queue never makes the host wait for the first steps (each ~0.1 s of GPU work)
        walls = []
        for _ in range(5):
            torch.cuda._sleep(2_000_000_000 // 10)  # ~0.1 s of GPU sleep ahead of the step
            t0 = time.perf_counter()
            step()
            walls.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        runtime = collections.Counter()
        for e in ev:
            if e.key.startswith("cuda") and e.device_type.name == "CPU":
                runtime[e.key] += e.count
        print(f"\n=== {name}: host ms per step (GPU kept ahead) {sorted(walls)}; per step below ===")
        print("CUDA runtime calls:", {k: v // args.steps for k, v in runtime.most_common(8)})
        cpu = sorted((e for e in ev if e.device_type.name == "CPU" and not e.key.startswith("cuda")),
                     key=lambda e: -e.self_cpu_time_total)[:args.top]
        print("| op | calls | self CPU µs | total CPU µs |")
        for e in cpu:
            print(f"| {e.key[:70]} | {e.count // args.steps} | {e.self_cpu_time_total / args.steps:.0f} | "
                  f"{e.cpu_time_total / args.steps:.0f} |")
        gpu = sorted((e for e in ev if getattr(e, "self_device_time_total", 0) > 0 and e.device_type.name != "CPU"),
                     key=lambda e: -e.self_device_time_total)[:args.top]
        total = sum(e.self_device_time_total for e in ev if e.device_type.name != "CPU") / args.steps
        print(f"GPU kernels, total {total / 1e3:.2f} ms per step")
        print("| kernel | calls | GPU µs |")
        for e in gpu:
            print(f"| {e.key[:90]} | {e.count // args.steps} | {e.self_device_time_total / args.steps:.0f} |")
        model = params = step = prof = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
