"""bench_model's Llama under torch.compile: how many graphs and breaks, and where a step's time goes.

    python benchmarks/probe_compile_graphs.py [--explain-only] [VARIANT ...]

For each variant (bench_model.py's names; default: MoL E=8 top-2 r=16 under torch.compile, then eager) prints
torch._dynamo.explain's graph and break counts with each distinct break's reason and user frames, the step's wall
time (5 steps, synchronized), and its GPU kernel time with the top kernels (torch.profiler, 2 steps). A compiled
step whose wall time far exceeds its kernel time is bound by the host; a break in every MoL layer splits the
model into one graph per layer and shows here first (RESULTS run 44: the routers' call context and the float32
adapters' cast cache did, 27-31 breaks, 156 ms a step against 85 without them).
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_model as bm  # noqa: E402

BATCH, SEQ = 8, 1024


def explain(name: str) -> None:
    model, _ = bm.variant(name.replace(", torch.compile", ""), bm.build(False, "cuda", torch.bfloat16), BATCH * SEQ)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device="cuda")
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    print(f"\n== {name}: torch._dynamo.explain: {ex.graph_count} graphs, {ex.graph_break_count} breaks")
    seen = set()
    for b in ex.break_reasons:
        if b.reason[:200] in seen:
            continue
        seen.add(b.reason[:200])
        print("  -", b.reason[:500].replace("\n", " "))
        for f in b.user_stack[-4:]:
            print(f"      {os.path.basename(f.filename)}:{f.lineno} {f.name}")


def timed(name: str) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, params = bm.variant(name, bm.build(False, "cuda", torch.bfloat16), BATCH * SEQ)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    step = bm.step_fn(model, params, ids, name)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    stats = dict(torch._dynamo.utils.counters["stats"])
    print(f"\n== {name}: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms a step (wall); dynamo: {stats}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    kernels = [k for k in prof.key_averages() if k.device_type.name == "CUDA"]
    print(f"  GPU kernel time {sum(k.device_time_total for k in kernels) / 2e3:.1f} ms a step; top kernels:")
    for k in sorted(kernels, key=lambda k: -k.device_time_total)[:12]:
        print(f"  {k.device_time_total / 2e3:8.2f} ms  x{k.count // 2:4d}  {k.key[:100]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--explain-only", action="store_true")
    ap.add_argument("variants", nargs="*", default=["MoL E=8 top-2 r=16 (triton), torch.compile",
                                                     "MoL E=8 top-2 r=16 (triton)"])
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; bench_model's Llama, {BATCH} x {SEQ} tokens")
    for name in args.variants:
        if "torch.compile" in name:
            explain(name)
        if not args.explain_only:
            timed(name)


if __name__ == "__main__":
    main()
