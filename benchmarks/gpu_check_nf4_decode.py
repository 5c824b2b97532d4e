"""Check the NF4 small-T (decode) kernel's FMA path on a CUDA GPU against float64, on shapes no block divides.

    python benchmarks/gpu_check_nf4_decode.py

Every FMA_CONFIGS entry (the shared pair table, LUT=5, and the byte permutes, LUT=4), each also split over K in
3 runs, at T = 1 and 2, in bf16 and fp16, with and without a bias, on weights of 40-14336 rows, 64-14336 inputs,
absmax blocks of 32-128, double-quantized or not. The CPU tests run the kernel under TRITON_INTERPRET=1, where the
pair table's inline PTX is replaced by the code table it is built from; this runs the PTX. Exits 1 on a failure
(relative error of the largest output >= 1e-2, or a non-finite output).
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.quant import quantize_nf4  # noqa: E402
from mol.quant.nf4 import dequantize_nf4_reference  # noqa: E402

CASES = [(40, 64, 64, True), (72, 192, 64, False), (4095, 320, 64, True), (11008, 4096, 64, True),
         (24, 96, 32, True), (40, 384, 128, False), (4096, 14336, 64, True)]  # (out, in, blocksize, nested)


def main() -> int:
    gen = torch.Generator(device="cuda").manual_seed(1)
    fails, worst, runs = 0, 0.0, 0
    for (n, k, bs, nested), t, dt in itertools.product(CASES, [1, 2], [torch.bfloat16, torch.float16]):
        p = quantize_nf4(torch.randn(n, k, device="cuda", generator=gen) * 0.02, blocksize=bs, double_quant=nested)
        x = torch.randn(t, k, device="cuda", dtype=dt, generator=gen)
        bias = torch.randn(n, device="cuda", dtype=dt, generator=gen) if t == 1 else None
        ref = x.double() @ dequantize_nf4_reference(p, torch.float64).T
        if bias is not None:
            ref += bias.double()
        for cfg in nf4k.FMA_CONFIGS:
            for split_k in sorted({cfg["SPLIT_K"], 3}):
                y = nf4k.nf4_matmul_small(x, p, bias=bias, config=dict(cfg, SPLIT_K=split_k))
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                runs += 1
                worst = max(worst, err)
                if not (err < 1e-2 and torch.isfinite(y).all()):
                    fails += 1
                    print(f"FAIL {n}x{k} blocksize {bs} nested {nested} T={t} {dt} {cfg} SPLIT_K={split_k}: {err:.2e}")
    print(f"{torch.cuda.get_device_name()}: {runs} runs, {fails} failures, worst relative error {worst:.2e}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
