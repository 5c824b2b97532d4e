"""A/B of X_ASM, x's pairs read by inline PTX in the NF4 decode kernel's FMA path (T <= 2), on a CUDA GPU.

    python benchmarks/probe_nf4_x_asm.py [--rounds 5]

X_ASM (mol/kernels/nf4.py, _x_pairs and _load_step) loads each code word's 16 bytes of x with one ld.global.v4,
and the absmax codes with ld.global.u8, in inline PTX that Triton's layout passes treat as elementwise, so both
arrive in the layout of their use: five of the six shared-memory layout changes per K step of the tl.load form go,
and with them 10 of the loop's 12 CTA barriers (sm_90 SASS, triton 3.6, T = 1, (16, 512) tile: 3.29 -> 3.16
instructions per weight). The interpreter cannot run the PTX, and no GPU was lent when it was written: this is the
timing that decided whether it became the default. It did not: on an H100 X_ASM was 1-12% slower autotuned and
0-2% with the config fixed (RESULTS run 41).

Per weight shape (out x in) and T in {1, 2}: first each form against float64 (relative error of the largest
output, and X_ASM's output against the tl.load form's: the same products in the same order, so expected equal);
then, in `--rounds` interleaved rounds under CUDA-graph replay (do_bench_cudagraph medians): the bf16 GEMV
(F.linear), NF4Linear as autotuned with X_ASM off and on (each tuned for itself on its first call), and the fixed
config (16, 512, LUT=5, 4 warps, 3 stages) both ways. Prints one table: medians of the rounds, µs, and × the GEMV.
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.quant import NF4Linear, quantize_nf4  # noqa: E402
from mol.quant.nf4 import dequantize_nf4_reference  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
FIXED = dict(BLOCK_N=16, BLOCK_KB=512, LUT=5, num_warps=4, SPLIT_K=1, num_stages=3)
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (out, in)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for n_out, n_in in SHAPES:
        w = torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02
        lin = NF4Linear(quantize_nf4(w))
        ref_w = dequantize_nf4_reference(lin.packed, torch.float64)
        for t in (1, 2):
            x = torch.randn(t, n_in, device=DEV, dtype=DT, generator=gen)
            ref = x.double() @ ref_w.T

            def tuned(on, x=x, lin=lin):
                nf4k.X_ASM = on
                return lin(x)

            cases = {"bf16 GEMV": lambda x=x, w=w: F.linear(x, w),
                     "NF4Linear, tl.load x": lambda: tuned(False), "NF4Linear, X_ASM": lambda: tuned(True),
                     "fixed, tl.load x": lambda x=x, lin=lin: nf4k.nf4_matmul_small(x, lin.packed, config=FIXED),
                     "fixed, X_ASM": lambda x=x, lin=lin: nf4k.nf4_matmul_small(
                         x, lin.packed, config=dict(FIXED, X_ASM=True))}
            with torch.no_grad():
                outs = {name: fn() for name, fn in cases.items()}  # tunes both NF4Linear forms
                for name in list(cases)[1:]:
                    err = ((outs[name].double() - ref).abs().max() / ref.abs().max()).item()
                    print(f"{n_in} -> {n_out} T={t} {name}: relative error {err:.2e}")
                print(f"{n_in} -> {n_out} T={t}: X_ASM == tl.load form, tuned: "
                      f"{torch.equal(outs['NF4Linear, X_ASM'], outs['NF4Linear, tl.load x'])}, fixed: "
                      f"{torch.equal(outs['fixed, X_ASM'], outs['fixed, tl.load x'])}", flush=True)
                times = {name: [] for name in cases}
                for _ in range(args.rounds):
                    for name, fn in cases.items():
                        times[name].append(do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3)
            nf4k.X_ASM = False
            med = {name: statistics.median(v) for name, v in times.items()}
            rows.append((f"{n_in} → {n_out}", t, med))
    names = list(rows[0][2])
    print("\n| in → out | T | " + " | ".join(names) + " |")
    print("| --- | --- |" + " --- |" * len(names))
    for shape, t, med in rows:
        base = med["bf16 GEMV"]
        cells = [f"{med[n]:.2f}" if n == "bf16 GEMV" else f"{med[n]:.2f} ({med[n] / base:.3f}×)" for n in names]
        print(f"| {shape} | {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
