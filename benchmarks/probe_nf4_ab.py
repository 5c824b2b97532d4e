"""Interleaved A/B of two versions of the NF4 small-T (decode) kernel, every autotune config, on a CUDA GPU.

    git show <commit>:mol/kernels/nf4.py > /tmp/nf4_old.py
    python benchmarks/probe_nf4_ab.py --old /tmp/nf4_old.py

Loads the other version of mol/kernels/nf4.py beside this checkout's, checks both against float64 (x @ W^T with W
dequantized by the PyTorch reference; bf16 x, fresh random weights), then times each config of the autotune
lists of both, and the bf16 GEMV, under CUDA-graph replay, interleaved over three rounds (medians), for T = 1, 2,
16 and weights 4096x4096, 14336x4096, 4096x14336 (out x in). Prints per case the best of each version and every
config's old / new time in µs.
"""
import argparse
import importlib.util
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mol.kernels import nf4 as new  # noqa: E402
from mol.quant import quantize_nf4  # noqa: E402
from mol.quant.nf4 import dequantize_nf4_reference  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="path of the other version's mol/kernels/nf4.py")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("mol.kernels.nf4_old", args.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; old = {args.old}, new = this checkout")
    rows = []
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda", generator=g).bfloat16()
        packed = quantize_nf4(w)
        w64 = dequantize_nf4_reference(packed, torch.float64)
        for t in (1, 2, 16):
            x = torch.randn(t, k, device="cuda", generator=g).bfloat16()
            ref = x.double() @ w64.t()
            configs = new.FMA_CONFIGS if t <= new.SMALL_FMA_MAX_T else new.DOT_CONFIGS
            fns = {"bf16": lambda: F.linear(x, w)}
            worst = 0.0
            for i, cfg in enumerate(configs):
                for name, mod in (("old", old), ("new", new)):
                    y = mod.nf4_matmul_small(x, packed, config=cfg)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        raise SystemExit(f"{name} {cfg} {n}x{k} T={t}: relative error {err:.2e} against float64")
                    worst = max(worst, err)
                    fns[(name, i)] = lambda mod=mod, cfg=cfg: mod.nf4_matmul_small(x, packed, config=cfg)
            times = {key: [] for key in fns}
            for _ in range(args.rounds):
                for key, fn in fns.items():
                    times[key].append(do_bench_cudagraph(fn, rep=50) * 1e3)
            med = {key: statistics.median(v) for key, v in times.items()}
            base = med["bf16"]
            best = {v: min(med[key] for key in med if key != "bf16" and key[0] == v) for v in ("old", "new")}
            per = " ".join(f"{i}: {med[('old', i)]:.1f} / {med[('new', i)]:.1f}" for i in range(len(configs)))
            rows.append(f"| {n}x{k} T={t} | {base:.1f} | {best['old']:.1f} ({best['old'] / base:.2f}x) | "
                        f"{best['new']:.1f} ({best['new'] / base:.2f}x) | {worst:.1e} | {per} |")
            print(rows[-1], flush=True)
    print("\n| out x in, T | bf16 µs | old best µs (× bf16) | new best µs (× bf16) | worst rel err | per config "
          "old / new µs |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
