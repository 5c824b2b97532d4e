"""What the experts would cost inside the base GEMMs: the routed layer's GEMM sequence today against one GEMM per
pass over a weight that carries the experts' rows / columns (a probe for issue 3's 1.15x target; not a layer).

    python benchmarks/probe_concat_gemm.py [--quick]

Today (mol/kernels/routed_lora.py), per fwd+bwd at T tokens, R = E*r expert columns:
  forward   hl = [x A_cat^T | x Wr^T] (Triton, fp32)      y = u B_cat, then y += x W^T (cuBLAS, beta=1)
  backward  du = dy B_cat^T (fp32)    dx = dhl [A_cat; Wr], then dx += dy W (beta=1)    + weight gradients
The restructure this measures keeps the experts next to W in memory, so the big GEMMs produce the small ones'
outputs as extra columns and read x / dy once:
  forward   [y | h] = x [W; A_cat]^T        one GEMM, N = out + R (h in bf16), then y += u B_cat in place
  backward  [dx | du] = dy [W | B_cat^T]    one GEMM, N = in + R (du in bf16), then dx += dhl [A_cat; Wr] in place
(the router's logits stay a float32-accurate product of their own either way). Both columns are timed as GEMM
work only, do_bench medians in µs, bf16, with the error of the bf16 h / du against float64 next to today's float32
ones: the restructure trades those for the saved passes. It needs the frozen W and the trainable A_cat / B_cat in
one buffer (views), which is the real cost of doing it; this probe only says whether the time is there.
"""
import argparse

import torch
from triton.testing import do_bench

DEV, DT = "cuda", torch.bfloat16


def us(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T=8192 4096->4096 E=8 r=16 only")
    args = ap.parse_args()
    g = torch.Generator(device=DEV).manual_seed(0)
    cases = [(8192, 4096, 4096, 8, 16), (8192, 4096, 14336, 8, 16), (8192, 4096, 4096, 32, 8), (2048, 4096, 4096, 8, 16)]
    if args.quick:
        cases = cases[:1]
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; µs, do_bench medians")
    print("| T in→out E r | pass | today: small GEMM(s) + big GEMM (beta=1) | concatenated: one big GEMM + in-place add "
          "| big GEMM alone | error of the small output vs float64: today / concatenated |")
    print("| --- | --- | --- | --- | --- | --- |")
    for T, n_in, n_out, E, r in cases:
        R = E * r
        case = f"{T} {n_in}→{n_out} E={E} r={r}"
        x = torch.randn(T, n_in, device=DEV, generator=g).to(DT)
        dy = torch.randn(T, n_out, device=DEV, generator=g).to(DT)
        W = (torch.randn(n_out, n_in, device=DEV, generator=g) / n_in ** 0.5).to(DT)
        a_cat = (torch.randn(R, n_in, device=DEV, generator=g) / n_in ** 0.5).to(DT)
        b_cat = (torch.randn(R, n_out, device=DEV, generator=g) * 0.1).to(DT)
        wr = (torch.randn(E, n_in, device=DEV, generator=g) / n_in ** 0.5).to(DT)
        u = torch.randn(T, R, device=DEV, generator=g).to(DT)
        dhl = torch.randn(T, R + E, device=DEV, generator=g).to(DT)

        # forward: today y = u B_cat (+)= x W^T, and h = x A_cat^T in float32 (here cuBLAS, the Triton kernel's work)
        def fwd_today():
            h = torch.mm(x, a_cat.t(), out_dtype=torch.float32)
            y = torch.mm(u, b_cat)
            y.addmm_(x, W.t())
            return y, h
        w_fwd = torch.cat([W, a_cat])  # (out + R, in): the buffer the layer would own

        def fwd_concat():
            out = torch.mm(x, w_fwd.t())
            y, h = out[:, :n_out], out[:, n_out:]
            y.addmm_(u, b_cat)
            return y, h
        h_ref = x.double() @ a_cat.double().t()
        err_f = f"{rel(fwd_today()[1], h_ref):.1e} / {rel(fwd_concat()[1], h_ref):.1e}"
        print(f"| {case} | forward | {us(fwd_today):.1f} | {us(fwd_concat):.1f} | {us(lambda: torch.mm(x, W.t())):.1f} "
              f"| h: {err_f} |", flush=True)

        # backward: today du = dy B_cat^T (fp32), dx = dhl [A_cat; Wr] (+)= dy W
        a_ext = torch.cat([a_cat, wr])

        def bwd_today():
            du = torch.mm(dy, b_cat.t(), out_dtype=torch.float32)
            dx = torch.mm(dhl, a_ext)
            dx.addmm_(dy, W)
            return dx, du
        w_bwd = torch.cat([W, b_cat.t()], dim=1)  # (out, in + R)

        def bwd_concat():
            out = torch.mm(dy, w_bwd)
            dx, du = out[:, :n_in], out[:, n_in:]
            dx.addmm_(dhl, a_ext)
            return dx, du
        du_ref = dy.double() @ b_cat.double().t()
        err_b = f"{rel(bwd_today()[1], du_ref):.1e} / {rel(bwd_concat()[1], du_ref):.1e}"
        # the two must agree on dx (same sums, different order)
        dx_err = rel(bwd_concat()[0], bwd_today()[0].double())
        print(f"| {case} | backward | {us(bwd_today):.1f} | {us(bwd_concat):.1f} | {us(lambda: torch.mm(dy, W)):.1f} "
              f"| du: {err_b} (dx today vs concatenated {dx_err:.1e}) |", flush=True)
        del x, dy, W, a_cat, b_cat, wr, u, dhl, w_fwd, w_bwd, a_ext
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
