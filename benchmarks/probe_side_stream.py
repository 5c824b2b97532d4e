"""Do the backward's weight-gradient GEMMs hide beside the Triton dx GEMM when it leaves SMs free?

    python benchmarks/probe_side_stream.py [--rounds 5] [--cases 8192x4096x4096x8x16 ...]

The routed layer's backward after the gates (bf16): dx = dy W + dhl [A_cat; Wr] (base_gemm's persistent kernel,
compute-bound), d_ext = dhl^T x (dA | dWr) and dB = dy^T u (cuBLAS, memory-bound, ~30-37 us each at T=8192).
probe_overlap.py (RESULTS run 21) found nothing to gain beside cuBLAS's base GEMM, which holds every SM. The
persistent kernel's makespan is set by its rounds, ceil(tiles / programs): 1024 tiles of 128x256 (T=8192, 4096
columns) take 8 rounds on 132 programs or on 128, so 4 SMs can be left to a side stream for free, and fewer
programs trade GEMM time for more room beside it. Timed, under CUDA-graph replay, interleaved over rounds:
the GEMM alone at each program count, the tail in sequence, and the tail with d_ext + dB on a side stream
(forked after the inputs, joined at the end) launched after the GEMM (and, once, before it). Each variant's
outputs are checked against the sequential ones.
"""
import argparse
import math
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.base_gemm as bg  # noqa: E402
import mol.kernels.grouped_lora as gl  # noqa: E402
from bench_layer import interleaved_graph_times  # noqa: E402
from probe_overlap import forked  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=["8192x4096x4096x8x16", "8192x4096x14336x8x16",
                                                   "8192x4096x4096x32x8", "2048x4096x4096x8x16"],
                    help="T x in x out x E x r")
    args = ap.parse_args()
    g = torch.Generator(device=DEV).manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}; µs per call, median (min-max) "
          f"of {args.rounds} interleaved rounds of CUDA-graph replays")
    for case in args.cases:
        t, n_in, n_out, e, r = map(int, case.split("x"))
        x = torch.randn(t, n_in, device=DEV, generator=g).to(DT)
        dy = torch.randn(t, n_out, device=DEV, generator=g).to(DT)
        w = (torch.randn(n_out, n_in, device=DEV, generator=g) / n_in ** 0.5).to(DT)
        w_dx = (torch.randn(e * r + e, n_in, device=DEV, generator=g) / n_in ** 0.5).to(DT)
        lora_b = (torch.randn(n_out, e, r, device=DEV, generator=g) * 0.1).to(DT).permute(1, 0, 2)
        u = torch.randn(t, e * r, device=DEV, generator=g).to(DT)
        dhl = torch.randn(t, e * r + e, device=DEV, generator=g).to(DT)
        # the dx GEMM's config: the fastest of base_gemm.CONFIGS here
        cfg = min(bg.CONFIGS, key=lambda c: do_bench(lambda: bg.triton_base_mm(dy, w, False, dhl, w_dx, False,
                                                                                 None, c), rep=50))
        bm, bn = cfg[0], cfg[1]
        tiles = math.ceil(t / bm) * math.ceil(n_in / bn)
        rounds = math.ceil(tiles / sms)
        balanced = math.ceil(tiles / rounds)
        progs_list = sorted({sms, balanced, balanced - 4, balanced - 8, balanced - 16} - {0}, reverse=True)
        out = {}

        def dx_fn(p):
            def f():
                out["dx"] = bg.triton_base_mm(dy, w, False, dhl, w_dx, False, None, cfg, num_progs=p)
            return f

        def grads():
            out["d_ext"] = torch.mm(dhl.t(), x)
            out["dB"] = gl._grad_b(dy, u, lora_b)

        fns = {}
        for p in progs_list:
            fns[f"dx GEMM alone, {p} programs ({math.ceil(tiles / p)} rounds)"] = dx_fn(p)
        fns["d_ext + dB alone (cuBLAS)"] = grads
        fns[f"tail in sequence, {sms} programs"] = lambda: (dx_fn(sms)(), grads())
        for p in progs_list:
            fns[f"tail, side stream after the GEMM, {p} programs"] = forked(dx_fn(p), grads, False)
        fns[f"tail, side stream before the GEMM, {balanced} programs"] = forked(dx_fn(balanced), grads, True)
        # every variant computes the same: check against the sequential one
        dx_fn(sms)()
        grads()
        torch.cuda.synchronize()
        ref = {k: v.float().clone() for k, v in out.items()}
        for name, fn in fns.items():
            if "alone" in name:
                continue
            out.clear()
            fn()
            torch.cuda.synchronize()
            bad = [k for k in ref if not torch.equal(out[k].float(), ref[k])]
            if bad:
                print(f"  {name}: outputs differ from the sequential tail: {bad}")
        times = interleaved_graph_times(fns, rounds=args.rounds)
        print(f"\n## T={t} {n_in}->{n_out} E={e} r={r}: dx config {cfg}, {tiles} tiles\n| variant | µs |\n| --- | --- |")
        for name, (med, lo, hi) in times.items():
            print(f"| {name} | {med * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) |")
        out.clear()
        ref.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
