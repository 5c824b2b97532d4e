"""Check the NF4 small-T (decode) kernel's FMA path on a CUDA GPU against float64, on shapes no block divides.

    python benchmarks/gpu_check_nf4_decode.py

Every FMA_CONFIGS entry (the shared pair table, LUT=5, and the byte permutes, LUT=4), each also split over K in
3 runs, at T = 1 and 2, in bf16 and fp16, with and without a bias, on weights of 40-14336 rows, 64-14336 inputs,
absmax blocks of 32-128, double-quantized or not; each once more from an x 2 bytes off 4 (copied to an aligned
buffer before the kernel reads its int32 pairs), which must give the same bits. The CPU tests run the kernel
under TRITON_INTERPRET=1, where the pair table's inline PTX is replaced by the code table; this runs the PTX.
Exits 1 on a failure (error >= 2e-2 of the largest output in bf16, 4e-3 in fp16, or a non-finite output: the
FMA path rounds each four-product partial to x's dtype, which on a short row of a bf16 run reaches ~1.3e-2). K is
a compile-time constant of the kernel, so this builds ~450 variants: they are compiled in a thread pool first
(one at a time, the check took most of a 500 s device call in RESULTS run 39).
"""
import itertools
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.quant import quantize_nf4  # noqa: E402
from mol.quant.nf4 import dequantize_nf4_reference  # noqa: E402

CASES = [(40, 64, 64, True), (72, 192, 64, False), (4095, 320, 64, True), (11008, 4096, 64, True),
         (24, 96, 32, True), (40, 384, 128, False), (4096, 14336, 64, True)]  # (out, in, blocksize, nested)


def main() -> int:
    if not torch.cuda.is_available():
        sys.exit("gpu_check_nf4_decode.py checks the NF4 kernels on a CUDA GPU and none is visible here")
    gen = torch.Generator(device="cuda").manual_seed(1)
    cases = []
    for (n, k, bs, nested), t, dt in itertools.product(CASES, [1, 2], [torch.bfloat16, torch.float16]):
        p = quantize_nf4(torch.randn(n, k, device="cuda", generator=gen) * 0.02, blocksize=bs, double_quant=nested)
        x = torch.randn(t, k, device="cuda", dtype=dt, generator=gen)
        bias = torch.randn(n, device="cuda", dtype=dt, generator=gen) if t == 1 else None
        configs = [dict(c, SPLIT_K=s) for c in nf4k.FMA_CONFIGS for s in sorted({c["SPLIT_K"], 3})]
        cases.append(((n, k, bs, nested), p, x, bias, configs))
    with ThreadPoolExecutor(16) as pool:  # compile every variant first; the checks below report any failure
        list(pool.map(lambda job: _try(lambda: nf4k.nf4_matmul_small(job[0], job[1], bias=job[2], config=job[3])),
                      [(x, p, bias, c) for _, p, x, bias, configs in cases for c in configs]))
    torch.cuda.synchronize()
    fails, runs, worst = 0, 0, {torch.bfloat16: 0.0, torch.float16: 0.0}
    for (n, k, bs, nested), p, x, bias, configs in cases:
        t, dt = x.shape[0], x.dtype
        ref = x.double() @ dequantize_nf4_reference(p, torch.float64).T
        if bias is not None:
            ref += bias.double()
        # x 2 bytes off 4: copied to an aligned buffer before the kernel reads it, so every config gives the same bits
        x_off = torch.empty(x.numel() + 1, device="cuda", dtype=dt)[1:].view_as(x).copy_(x)
        for cfg in configs:
            y = nf4k.nf4_matmul_small(x, p, bias=bias, config=cfg)
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            runs += 1
            worst[dt] = max(worst[dt], err)
            ok = err < (2e-2 if dt == torch.bfloat16 else 4e-3) and bool(torch.isfinite(y).all())
            ok = ok and torch.equal(nf4k.nf4_matmul_small(x_off, p, bias=bias, config=cfg), y)
            if not ok:
                fails += 1
                print(f"FAIL {n}x{k} blocksize {bs} nested {nested} T={t} {dt} {cfg}: {err:.2e}")
    print(f"{torch.cuda.get_device_name()}: {runs} runs, {fails} failures, worst relative error "
          f"{worst[torch.bfloat16]:.2e} (bf16), {worst[torch.float16]:.2e} (fp16)")
    return 1 if fails else 0


def _try(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001  (reported by the check that runs it again)
        pass


if __name__ == "__main__":
    sys.exit(main())
