"""The Gluon register-operand NF4 decode kernel (mol/kernels/nf4_mma.py) on a CUDA GPU: correctness against float64,
then every config timed under CUDA-graph replay against the bf16 GEMV and the Triton small-T kernel.

    python benchmarks/probe_nf4_mma.py [--quick] [--full] [--top 4] [--pairs] [--wide] [--ts 16]

Correctness: y = x @ W^T (+ bias) against float64 (W dequantized by the PyTorch reference) for odd shapes (N not a
multiple of any block, T = 1..16, bias, fp16, blocksize 128 / 256, not double-quantized), every config at 4096^2
T=16 and two elsewhere: relative error (norm) < 1e-2, y finite, and two calls bitwise equal (the split-K tickets
were left at zero). The kernel allocates y itself, so an element it never writes is caught only if the allocator's
leftovers differ between the two calls or are not finite. `--full` times a grid of configs at K = 4096.
Timing: median of `do_bench_cudagraph`, the bf16 GEMV (F.linear) and the Triton kernel (autotuned) in the
same process, NF4 bytes over time as bandwidth. `--pairs` checks every config with the levels from the shared table
of level pairs (`pairs=True`, LUT=5 of the Triton kernel) instead of without, and times each both ways; `--ts` picks
the token counts timed.
Compiles run in a thread pool first.
"""
import argparse
import itertools
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.kernels import nf4_mma  # noqa: E402
from mol.quant import quantize_nf4  # noqa: E402
from mol.quant.nf4 import dequantize_nf4_reference  # noqa: E402

DEV = "cuda"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def variants(cfgs, pairs):
    return [dict(c, pairs=True) for c in cfgs] if pairs else cfgs


def check(failures, pairs=False, wide=False):
    torch.manual_seed(0)
    cases = [(4096, 4096, t, torch.bfloat16, 64, True, False) for t in (1, 2, 5, 8, 9, 16)]
    cases += [(4001, 4096, 3, torch.bfloat16, 64, True, True), (4096, 14336, 16, torch.float16, 64, True, False),
              (1000, 1088, 7, torch.bfloat16, 128, True, True),
              (1000, 1152, 7, torch.bfloat16, 128, True, True), (333, 2048, 16, torch.bfloat16, 64, False, True),
              (14336, 4096, 12, torch.bfloat16, 256, True, False)]
    worst, most = 0.0, 0
    for n, k, t, dt, bs, nested, has_bias in cases:
        w = torch.randn(n, k, device=DEV) * 0.02
        p = quantize_nf4(w.to(dt), blocksize=bs, double_quant=nested)
        x = torch.randn(t, k, device=DEV, dtype=dt)
        bias = torch.randn(n, device=DEV, dtype=dt) if has_bias else None
        ref = x.double() @ dequantize_nf4_reference(p, torch.float64).t()
        if bias is not None:
            ref += bias.double()
        cfgs = nf4_mma.CONFIGS if (n, k, t) == (4096, 4096, 16) else nf4_mma.CONFIGS[:1] + nf4_mma.CONFIGS[3:4]
        if wide and (n, k, t) in ((4096, 4096, 16), (333, 2048, 16), (14336, 4096, 12)):
            cfgs = cfgs + wide_grid()
        cfgs = variants(cfgs, pairs)
        most = max(most, len(cfgs))
        with ThreadPoolExecutor(8) as ex:  # compile in parallel
            list(ex.map(lambda c: nf4_mma.nf4_matmul_mma(x, p, bias, c), cfgs))
        for cfg in cfgs:
            y = nf4_mma.nf4_matmul_mma(x, p, bias, cfg)
            y2 = nf4_mma.nf4_matmul_mma(x, p, bias, cfg)  # the tickets were left at zero by the first call
            e = max(rel(y, ref), rel(y2, ref))
            ok = e < 1e-2 and torch.isfinite(y).all().item() and torch.equal(y, y2)
            worst = max(worst, e)
            if not ok:
                failures.append(f"{n}x{k} T={t} {dt} bs={bs} nested={nested} bias={has_bias} {cfg}: rel {e:.2e}")
    print(f"correctness: {len(cases)} cases x 2-{most} configs, worst rel err vs float64 {worst:.2e}, "
          f"{len(failures)} failures")
    for f in failures:
        print("  FAIL", f)


def wide_grid():
    """Programs of 64-256 rows (4-8 M warps, m_rep 1-2) that split K 4-16 ways: each program reads its K range of x
    once for many rows (x, T x K bf16, is 4x the codes' bytes at T=16 and is re-read by every row block), and the
    split keeps the grid wide enough to fill the SMs."""
    return [dict(warps_k=wk, warps_m=wm, m_rep=m, cpl=c, split_k=s, prefetch=True)
            for wk, wm, m, c, s in itertools.product((1, 2), (4, 8), (1, 2), (1, 2), (4, 8, 16))]


def grid(full, pairs=False, wide=False):
    out = list(nf4_mma.CONFIGS)
    if wide:
        out += [c for c in wide_grid() if c not in out]
    if full:
        for wk, wm, c, sk, pf in itertools.product((4, 8), (1, 2), (1, 2, 4), (1, 2), (False, True)):
            cfg = dict(warps_k=wk, warps_m=wm, m_rep=1, cpl=c, split_k=sk, prefetch=pf)
            if wk * wm <= 8 and cfg not in out:
                out.append(cfg)
    if pairs:  # every config with and without (CONFIGS holds some with pairs already)
        out += [c for c in variants(out, True) if c not in out]
    return out


def name(c):
    reg = f"/r{c['maxnreg']}" if c.get("maxnreg") else ""
    pairs = "/pairs" if c.get("pairs") else ""
    return (f"{c['warps_k']}/{c['warps_m']}/{c['m_rep']}/{c['cpl']}/{c['split_k']}/{'p' if c['prefetch'] else '-'}"
            f"{reg}{pairs}")


def bench(quick, top, full, pairs=False, ts=None, wide=False):
    print("\n| out x in | T | bf16 GEMV us | Triton small-T us (x GEMV) | Gluon MMA best us (x GEMV) | "
          "best config (warps K/M, m_rep, cpl, split, prefetch) | "
          "GB/s | next configs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336)]
    for n, k in shapes:
        torch.manual_seed(1)
        w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16)
        p = quantize_nf4(w)
        for t in ts or ((1, 16) if quick else (1, 2, 8, 16)):
            x = torch.randn(t, k, device=DEV, dtype=torch.bfloat16)
            with ThreadPoolExecutor(8) as ex:  # compile in parallel
                list(ex.map(lambda c: nf4_mma.nf4_matmul_mma(x, p, None, c), grid(full and k == 4096, pairs, wide)))
            base = do_bench_cudagraph(lambda: F.linear(x, w), rep=50)
            tri = do_bench_cudagraph(lambda: nf4k.nf4_matmul_small(x, p), rep=50)
            times = []
            for cfg in grid(full and k == 4096, pairs, wide):
                n_splits = nf4_mma.splits(k, 1, cfg["split_k"])
                ws = torch.empty((n_splits, 16, n), dtype=torch.float32, device=DEV)
                nf4_mma.nf4_matmul_mma(x, p, None, cfg, ws=ws)
                times.append((do_bench_cudagraph(lambda: nf4_mma.nf4_matmul_mma(x, p, None, cfg, ws=ws), rep=50),
                              cfg))
            times.sort(key=lambda tc: tc[0])
            best, cfg = times[0]
            nxt = "; ".join(f"{name(c)} {tm * 1e3:.1f}" for tm, c in times[1:1 + top])
            print(f"| {n}x{k} | {t} | {base * 1e3:.2f} | {tri * 1e3:.2f} ({tri / base:.2f}x) | "
                  f"**{best * 1e3:.2f} ({best / base:.2f}x)** | {name(cfg)} | "
                  f"{(p.storage_bits() // 8) / best / 1e6:.0f} | {nxt} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--full", action="store_true", help="time a grid of configs (num_warps/m_rep/cpl/split_k/prefetch)")
    ap.add_argument("--pairs", action="store_true", help="check and time every config with pairs=True as well")
    ap.add_argument("--wide", action="store_true", help="check and time wide row blocks with split-K as well")
    ap.add_argument("--ts", type=int, nargs="+", default=None, help="token counts to time (default 1 16 / 1 2 8 16)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    failures = []
    if not args.skip_check:
        check(failures, args.pairs, args.wide)
    bench(args.quick, args.top, args.full, args.pairs, args.ts, args.wide)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
