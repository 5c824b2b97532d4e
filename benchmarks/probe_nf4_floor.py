"""How fast can the NF4 bytes be read at all? The decode target's floor, under CUDA-graph replay.

    python benchmarks/probe_nf4_floor.py [--sweep]

Issue 4 asks the NF4 decode forward (T = 1 and 16) for <= 0.5x the bf16 GEMV. The NF4 kernel must at least read
the packed codes and absmax bytes (4.13 bits per weight). This times, per weight shape, a read-only Triton kernel
over exactly those bytes (128-bit loads, an xor per program so nothing is optimised away; the fastest of a few
launch shapes), the same kernel over the bf16 weight, the bf16 GEMV itself and the NF4 kernel at T = 1 and 16.
The read-only NF4 time over the GEMV's is the best ratio any kernel could reach on this GPU.

`--sweep` also splits the T = 1 decode time into a fixed part and a part per byte, to tell machines apart (RESULTS
run 40: the same code ran 4096^2 at 5.1-5.4 us on one H100 and at 6.1-6.4 on four others). An empty kernel's
replay time (1 and 256 programs), then the bf16 GEMV and the NF4 kernel (one fixed config, (16, 512) LUT=5)
over K = 1024..16384 at N = 4096 and N = 1024..16384 at K = 4096, and a
least-squares line through each: time = intercept + bytes / slope. Replays leave weights under ~50 MB in L2 (every
NF4 shape here, and the smaller bf16 ones), so the slope is not a DRAM rate: compare it between machines.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.quant import quantize_nf4  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
FIXED = dict(BLOCK_N=16, BLOCK_KB=512, LUT=5, num_warps=4, SPLIT_K=1, num_stages=3)  # the T = 1 config --sweep times


@triton.jit
def _read_kernel(a_ptr, n_a, b_ptr, n_b, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """xor of int32 words [pid * ITERS * BLOCK, ...) of a, then of b: every word read once."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(a_ptr + offs, mask=offs < n_a, other=0)
        acc ^= tl.load(b_ptr + offs, mask=offs < n_b, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, 0))


def read_time(a: torch.Tensor, b: torch.Tensor) -> tuple[float, str]:
    """Fastest read of int32 views a and b (b may be empty) over a few launch shapes, µs."""
    n = max(a.numel(), b.numel())
    best = (float("inf"), "")
    for block, iters, warps in [(1024, 1, 4), (2048, 1, 8), (1024, 4, 4), (2048, 4, 8), (4096, 2, 8), (512, 8, 4)]:
        grid = triton.cdiv(n, block * iters)
        out = torch.empty(grid, device=DEV, dtype=torch.int32)
        t = do_bench_cudagraph(lambda: _read_kernel[(grid,)](a, a.numel(), b, b.numel(), out, BLOCK=block,
                                                             ITERS=iters, num_warps=warps),
                               rep=100, return_mode="median") * 1e3
        best = min(best, (t, f"BLOCK {block} x{iters}, {warps} warps, {grid} programs"))
    return best


@triton.jit
def _empty_kernel(p):
    pass


def _fit(points):
    """(intercept µs, slope TB/s) of the least-squares line time = a + MB / slope through (MB, µs) points."""
    n = len(points)
    mx = sum(m for m, _ in points) / n
    my = sum(t for _, t in points) / n
    b = sum((m - mx) * (t - my) for m, t in points) / sum((m - mx) ** 2 for m, _ in points)
    return my - b * mx, 1 / b


def sweep():
    """The T = 1 decode time against the bytes it reads: a fixed part and a rate (see the module doc)."""
    bench = lambda fn: do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3  # noqa: E731
    buf = torch.zeros(16, device=DEV, dtype=torch.int32)
    print(f"\nempty Triton kernel, CUDA-graph replay: 1 program {bench(lambda: _empty_kernel[(1,)](buf)):.2f} µs, "
          f"256 programs {bench(lambda: _empty_kernel[(256,)](buf)):.2f} µs")
    cfg = FIXED
    g = torch.Generator(device=DEV).manual_seed(0)
    print("| out x in | bf16 GEMV µs | NF4 T=1 µs | NF4 MB |")
    print("| --- | --- | --- | --- |")
    pts = {"gemv": [], "nf4": []}
    for n_out, n_in in [(4096, 1024), (4096, 2048), (4096, 4096), (4096, 8192), (4096, 16384), (1024, 4096),
                        (2048, 4096), (8192, 4096), (16384, 4096)]:
        W = (torch.randn(n_out, n_in, device=DEV, generator=g) * 0.02).to(DT)
        p = quantize_nf4(W)
        x = torch.randn(1, n_in, device=DEV, generator=g).to(DT)
        t = {"gemv": bench(lambda: F.linear(x, W)), "nf4": bench(lambda: nf4k.nf4_matmul_small(x, p, config=cfg))}
        mb = (p.codes.numel() + p.absmax.numel() + (p.nested_absmax.numel() * 4 if p.nested else 0)) / 1e6
        pts["gemv"].append((W.numel() * 2 / 1e6, t["gemv"]))
        pts["nf4"].append((mb, t["nf4"]))
        print(f"| {n_out}x{n_in} | {t['gemv']:.2f} | {t['nf4']:.2f} | {mb:.2f} |", flush=True)
    for name, what in [("gemv", "bf16 GEMV"), ("nf4", "NF4 T=1")]:
        a, slope = _fit(pts[name])
        print(f"{what}: time = {a:.2f} µs + MB / {slope:.2f} TB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also the T = 1 fixed-part / per-byte split (module doc)")
    args = ap.parse_args()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; µs, CUDA-graph replay medians")
    print("| out x in | bf16 GEMV T=1 | read bf16 W only | NF4 kernel T=1 | NF4 kernel T=16 | read NF4 bytes only "
          "(MB, TB/s) | floor ratio: NF4 read / GEMV | read launch shape |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    g = torch.Generator(device=DEV).manual_seed(0)
    for n_out, n_in in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        W = (torch.randn(n_out, n_in, device=DEV, generator=g) * 0.02).to(DT)
        p = quantize_nf4(W)
        x1 = torch.randn(1, n_in, device=DEV, generator=g).to(DT)
        x16 = torch.randn(16, n_in, device=DEV, generator=g).to(DT)
        t_gemv = do_bench_cudagraph(lambda: F.linear(x1, W), rep=100, return_mode="median") * 1e3
        t1 = do_bench_cudagraph(lambda: nf4k.nf4_matmul_small(x1, p), rep=100, return_mode="median") * 1e3
        t16 = do_bench_cudagraph(lambda: nf4k.nf4_matmul_small(x16, p), rep=100, return_mode="median") * 1e3
        empty = torch.zeros(1, device=DEV, dtype=torch.int32)[:0]
        t_w, _ = read_time(W.view(torch.int32).reshape(-1), empty)
        codes = p.codes.reshape(-1).view(torch.int32)
        absmax = p.absmax.reshape(-1)
        absmax = torch.nn.functional.pad(absmax, (0, (-absmax.numel()) % 4)).view(torch.int32)
        t_nf4, shape = read_time(codes, absmax)
        mb = (codes.numel() + absmax.numel()) * 4 / 1e6
        print(f"| {n_out}x{n_in} | {t_gemv:.2f} | {t_w:.2f} | {t1:.2f} ({t1 / t_gemv:.2f}×) | {t16:.2f} "
              f"({t16 / t_gemv:.2f}×) | {t_nf4:.2f} ({mb:.1f} MB, {mb / t_nf4:.2f} TB/s) | {t_nf4 / t_gemv:.2f}× "
              f"| {shape} |", flush=True)
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()
