"""Sweep the NF4 small-T (decode) kernel's configs on a CUDA GPU, under CUDA-graph replay, against the bf16 GEMV.

    python benchmarks/probe_nf4_decode.py [--top 8] [--quick] [--lut 2 0] [--only-t 1]

For T = 1 (FMA path) and T = 16 (tl.dot path) and weights 4096x4096 and 14336x4096 (out x in): every config of a
grid over BLOCK_N, BLOCK_KB, num_warps, SPLIT_K (and a few num_stages), each checked against float64 (x @ W^T with
W dequantized by the PyTorch reference) before it is timed; then the best configs again on 4096x14336. Prints, per
case, the bf16 base, the autotuned default and the `--top` fastest configs with their time, ratio to the bf16
base and NF4 bytes / time. `--lut` sweeps the level lookups too (2: gather from the 16 levels in registers; 0: load
from the global table; 4: byte permutes of register tables; 5: one lookup per code byte in a shared table of
level pairs, a copy per lane). `--dot-from-t 1` runs T = 1 and 2
on the dot path as well. A third, one gather per code byte from a 256-entry table of float32 level pairs, was
1.6x slower than LUT=2 at T=1 (RESULTS NF4 run 7) and was removed. Compiles run in a thread pool first (the sweep is ~200 kernels).
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
from mol.quant import quantize_nf4  # noqa: E402
from mol.quant.nf4 import dequantize_nf4_reference  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def grid_configs(T, quick, luts, max_words=16, stages=None, min_words=1):
    out = []
    if T <= nf4k.SMALL_FMA_MAX_T:
        bns, kbs, ws, sks = ([4, 8, 16], [512, 1024], [4, 8], [1, 2, 4]) if quick else \
            ([2, 4, 8, 16, 32], [256, 512, 1024, 2048], [2, 4, 8], [1, 2, 4, 8])
    else:
        bns, kbs, ws, sks = ([32, 64], [128, 256], [4], [1, 4, 8]) if quick else \
            ([16, 32, 64, 128], [64, 128, 256], [4, 8], [1, 2, 4, 8, 16])
    for bn, kb, w, sk in itertools.product(bns, kbs, ws, sks):
        words_per_thread = bn * kb // 4 / (32 * w)
        if words_per_thread > max_words or words_per_thread < min_words or (T > 2 and bn < 16):
            continue
        if nf4k._splits(4096, kb, sk) != sk:  # the same kernel as a smaller SPLIT_K at K = 4096
            continue
        out += [dict(BLOCK_N=bn, BLOCK_KB=kb, LUT=lut, num_warps=w, SPLIT_K=sk, num_stages=1) for lut in luts]
    # software pipelining by the compiler instead of (on top of) the hand-written one-step prefetch
    if stages:  # every config at each of these
        return [{**c, "num_stages": st} for c in out for st in stages]
    for c in list(out[:: max(1, len(out) // 12)]):
        out.append({**c, "num_stages": 3})
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lut", type=int, nargs="+", default=[2], choices=[0, 2, 4, 5])
    ap.add_argument("--library-configs", action="store_true",
                    help="time the library's autotune lists (FMA_CONFIGS / DOT_CONFIGS) with each --lut, not the grid")
    ap.add_argument("--dot-from-t", type=int, default=None,
                    help="run the tl.dot path from this T on (default: the library's, T >= 3)")
    ap.add_argument("--only-t", type=int, nargs="+", default=[1, 16], help="token counts to sweep (default 1 16)")
    ap.add_argument("--max-words", type=int, default=16,
                    help="largest code words per thread per step in the grid (default 16; 64 admits one-step rows)")
    ap.add_argument("--min-words", type=int, default=1, help="smallest code words per thread per step (default 1)")
    ap.add_argument("--stages", type=int, nargs="+", default=None,
                    help="run every grid config at each of these num_stages (default: 1, and 3 for a sample)")
    args = ap.parse_args()
    if args.dot_from_t is not None:
        nf4k.SMALL_FMA_MAX_T = args.dot_from_t - 1
    gen = torch.Generator(device=DEV).manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    best = {}
    for (n_out, n_in), T in itertools.product([(4096, 4096), (14336, 4096), (4096, 14336)],
                                             args.only_t):
        W = torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02
        p = quantize_nf4(W)
        x = torch.randn(T, n_in, device=DEV, dtype=DT, generator=gen)
        ref = x.double() @ dequantize_nf4_reference(p, torch.float64).T
        nbytes = p.storage_bits() // 8
        if args.library_configs:
            configs = [dict(c, LUT=lut) for lut in args.lut
                       for c in (nf4k.FMA_CONFIGS if T <= nf4k.SMALL_FMA_MAX_T else nf4k.DOT_CONFIGS)]
        else:
            configs = (grid_configs(T, args.quick, args.lut, args.max_words, args.stages, args.min_words) if n_in == 4096
                       else best[T])
        with ThreadPoolExecutor(16) as pool:  # compile everything first; a failing config is reported below
            list(pool.map(lambda c: _try(lambda: nf4k.nf4_matmul_small(x, p, config=c)), configs))
        torch.cuda.synchronize()
        rows = []
        with torch.no_grad():
            t_base = do_bench_cudagraph(lambda: F.linear(x, W), rep=100, return_mode="median")
            t_auto = do_bench_cudagraph(lambda: nf4k.nf4_matmul_small(x, p), rep=100, return_mode="median")
            tuner = nf4k._small_fma if T <= nf4k.SMALL_FMA_MAX_T else nf4k._small_dot
            for c in configs:
                try:
                    err = rel(nf4k.nf4_matmul_small(x, p, config=c), ref)
                    t = do_bench_cudagraph(lambda c=c: nf4k.nf4_matmul_small(x, p, config=c), rep=50,
                                           return_mode="median")
                except Exception as e:  # noqa: BLE001
                    print(f"  {c}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append((t, err, c))
        rows.sort(key=lambda r: r[0])
        if n_in == 4096 and n_out == 4096:
            best[T] = [c for _, _, c in rows[: args.top]]
            best[T] += [c for c in _best_per_lut(rows).values() if c not in best[T]]
        worst_err = max((e for _, e, _ in rows), default=float("nan"))
        print(f"\n## T={T} {n_in}->{n_out}: {nbytes / 1e6:.2f} MB NF4; bf16 base {t_base * 1e3:.2f} us; autotuned "
              f"default {t_auto * 1e3:.2f} us ({t_auto / t_base:.2f}x, {getattr(tuner, 'best_config', None)}); "
              f"{len(rows)} configs, worst rel err vs float64 {worst_err:.2e}")
        print("| us | x bf16 | TB/s | rel err | config |\n| --- | --- | --- | --- | --- |")
        for t, err, c in rows[: args.top]:
            print(f"| {t * 1e3:.2f} | {t / t_base:.2f} | {nbytes / (t * 1e-3) / 1e12:.2f} | {err:.1e} | {c} |")
        if len(args.lut) > 1:
            for lut, c in _best_per_lut(rows).items():
                t, err, _ = next(r for r in rows if r[2] is c)
                print(f"best LUT={lut}: {t * 1e3:.2f} us ({t / t_base:.2f}x), rel err {err:.1e}, {c}")
        sys.stdout.flush()


def _best_per_lut(rows):
    """{LUT: the fastest config with that lookup} of rows sorted by time."""
    out = {}
    for _, _, c in rows:
        out.setdefault(c["LUT"], c)
    return out


def _try(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
