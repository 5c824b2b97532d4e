"""Check on a CUDA GPU that the NF4 kernel's bf16 pair product (nf4._mul2: fma.rn.bf16x2 adding -0, which sm_80
runs) gives the bits mul.rn.bf16x2 (sm_90+) gave, then the dot path (T = 16, every DOT_CONFIGS entry) against
dequantize + float64 matmul.

    python benchmarks/gpu_check_bf16_scale.py

Exits 1 on a mismatch.
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.quant import quantize_nf4  # noqa: E402
from mol.quant.nf4 import dequantize_nf4_reference  # noqa: E402


@triton.jit
def _both(p_ptr, s_ptr, new_ptr, old_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    p = tl.load(p_ptr + offs, mask=m)
    s = tl.load(s_ptr + offs, mask=m)
    tl.store(new_ptr + offs, nf4k._mul2(p, s, tl.bfloat16), mask=m)
    old = tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [p, s], dtype=tl.int32, is_pure=True,
                                    pack=1)
    tl.store(old_ptr + offs, old, mask=m)


def main() -> int:
    if not torch.cuda.is_available():
        sys.exit("gpu_check_bf16_scale.py needs a CUDA GPU and none is visible here")
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 1 << 24
    p = torch.randint(-2**31, 2**31 - 1, (n,), device="cuda", dtype=torch.int32, generator=g)
    s = torch.randint(-2**31, 2**31 - 1, (n,), device="cuda", dtype=torch.int32, generator=g)
    # zeros of both signs, subnormals, infinities and NaNs in either half
    special = torch.tensor([0x0000, 0x8000, 0x0001, 0x8001, 0x7F80, 0xFF80, 0x7FC0, 0x007F, 0x3F80, 0xBF80],
                           device="cuda", dtype=torch.int32)
    grid = torch.cartesian_prod(special, special)
    p[:grid.shape[0]] = grid[:, 0] | (grid[:, 1] << 16)
    s[:grid.shape[0]] = grid[:, 1] | (grid[:, 0] << 16)
    new, old = torch.empty_like(p), torch.empty_like(p)
    _both[(triton.cdiv(n, 1024),)](p, s, new, old, n, BLOCK=1024)
    # NaN payloads may differ between the instructions: compare those as NaN-ness only
    nan = lambda v: ((v & 0x7F80) == 0x7F80) & ((v & 0x7F) != 0)  # noqa: E731
    halves = [(new & 0xFFFF, old & 0xFFFF), ((new >> 16) & 0xFFFF, (old >> 16) & 0xFFFF)]
    bad = sum(int(((a != b) & ~(nan(a) & nan(b))).sum()) for a, b in halves)
    print(f"_mul2 against mul.rn.bf16x2 on {torch.cuda.get_device_name()}: {bad} of {2 * n} halves differ")
    worst = 0.0
    for cfg in nf4k.DOT_CONFIGS:
        for shape in ((4096, 4096), (320, 1152)):
            w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            packed = quantize_nf4(w)
            x = torch.randn(16, shape[1], device="cuda", dtype=torch.bfloat16)
            y = nf4k.nf4_matmul_small(x, packed, config=cfg).double()
            ref = x.double() @ dequantize_nf4_reference(packed, torch.float64).T
            worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
    print(f"dot path against float64: worst error {worst:.2e} of the largest output")
    return 1 if bad or worst > 2e-2 else 0


if __name__ == "__main__":
    sys.exit(main())
