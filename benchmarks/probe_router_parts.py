"""The shrink + router scores as one cuBLAS GEMM: float32 Wr cut into three 16-bit parts that ride with A_cat.

    python benchmarks/probe_router_parts.py [--quick]

Today the fused Triton kernel (route_shrink_impl) computes hl = [x A_cat^T | x Wr^T] in float32, the router at
tf32x3. The alternative measured here is one cuBLAS GEMM, x @ [A_cat; P1; P2; P3]^T with float32 output, where
Wr = P1 + P2 / c + P3 / c^2 with each P in x's dtype (c = 1 for bf16, whose exponent range is float32's; c = 2^11
for fp16, so the small parts are not flushed), and the logits are the three column blocks summed. x is exact in
either dtype and the parts hold Wr's 24 bits, so the only error left is the tensor-core accumulation. Printed: µs
(do_bench medians), the worst logit error against float64 (max |err| / max |ref|, as probe_pieces), and, for
comparison, a plain float32 cuBLAS GEMM's error on the same logits (TF32 off).
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.routed_lora as rl  # noqa: E402

DEV = "cuda"


def us(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def parts(wr: torch.Tensor, dtype: torch.dtype, n: int, c: float) -> list[torch.Tensor]:
    out, rest = [], wr.double()
    for i in range(n):
        p = (rest * c ** i).to(dtype)
        out.append(p)
        rest = rest - p.double() / c ** i
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=DEV).manual_seed(0)
    n = 4096
    cases = [(8192, 8, 16), (8192, 32, 8), (2048, 8, 16), (512, 8, 16)]
    if args.quick:
        cases = cases[:1]
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; µs (do_bench medians), 4096 in features")
    print("| T E r | x dtype | variant | µs | router logits max err vs float64 |")
    print("| --- | --- | --- | --- | --- |")
    for T, E, r in cases:
        R = E * r
        for dt in (torch.bfloat16, torch.float16):
            c = 1.0 if dt == torch.bfloat16 else 2.0 ** 11
            x = torch.randn(T, n, device=DEV, generator=g).to(dt)
            a_cat = (torch.randn(R, n, device=DEV, generator=g) / n ** 0.5).to(dt)
            wr = torch.randn(E, n, device=DEV, generator=g) / n ** 0.5
            ref = x.double() @ wr.double().t()

            def err(lg):
                return ((lg.double() - ref).abs().max() / ref.abs().max()).item()

            def line(variant, t, e):
                print(f"| {T} E={E} r={r} | {str(dt)[6:]} | {variant} | {t:.1f} | {e:.1e} |", flush=True)

            hl, _, _ = rl.route_shrink_impl(x, None, a_cat, wr)
            line("fused Triton shrink + router (tf32x3, today)", us(lambda: rl.route_shrink_impl(x, None, a_cat, wr)),
                 err(hl[:, R:]))
            line("cuBLAS x @ A_cat^T alone (float32 out, no router)",
                 us(lambda: torch.mm(x, a_cat.t(), out_dtype=torch.float32)), float("nan"))
            for k in (2, 3):
                ps = parts(wr, dt, k, c)
                w_ext = torch.cat([a_cat] + ps)  # (R + kE, in)

                def one_gemm(w_ext=w_ext, k=k):
                    out = torch.mm(x, w_ext.t(), out_dtype=torch.float32)
                    lg = out[:, R:R + E]
                    for i in range(1, k):
                        lg = lg + out[:, R + i * E:R + (i + 1) * E] / c ** i
                    return out, lg
                _, lg = one_gemm()
                line(f"cuBLAS one GEMM, router as {k} parts (+ torch sum of parts)", us(one_gemm), err(lg))
                line(f"  the GEMM alone (N = R + {k}E)", us(lambda w_ext=w_ext: torch.mm(x, w_ext.t(),
                                                                                       out_dtype=torch.float32)),
                     float("nan"))
            xf = x.float()
            line("plain float32 cuBLAS x @ Wr^T (TF32 off), for comparison", us(lambda: torch.mm(xf, wr.t())),
                 err(torch.mm(xf, wr.t())))
            del x, a_cat, wr, ref, xf
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
