"""Can a Triton kernel that adds a skinny product into a finished base output in place (y += a @ b, K = E*r)
beat the cuBLAS order the fused layer uses now (small product first, then the base GEMM with beta=1)?

    python benchmarks/probe_inplace_add.py

Forward: F.linear(x, W) followed by the in-place kernel (a = u, b = B_cat), against mm(u, B_cat).addmm_(x, W^T).
Backward: mm(dy, W) followed by the kernel (a = dhl, b = [A_cat; Wr]), against mm(dhl, A_ext).addmm_(dy, W).
The kernel's ideal is one read and one write of y (bytes / copy bandwidth, printed). Each variant's result is
checked against float64 on the same inputs.
"""
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_layer import copy_bandwidth  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def _configs():
    return [triton.Config({"BT": bt, "BN": bn, "BKR": bk}, num_warps=w, num_stages=s)
            for bt, bn, bk, w, s in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
                                     (64, 256, 64, 8, 3), (128, 256, 32, 8, 3), (64, 128, 32, 4, 4),
                                     (32, 128, 64, 4, 3), (128, 128, 32, 4, 4))]


@triton.autotune(configs=_configs(), key=["T", "N", "KR"], restore_value=["out_ptr"])
@triton.jit
def _add_mm_kernel(out_ptr, a_ptr, b_ptr, T, N, KR, BT: tl.constexpr, BN: tl.constexpr, BKR: tl.constexpr):
    """out (T, N) += a (T, KR) @ b (KR, N), all row-major; float32 accumulation, one rounding to out's dtype."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(N, BN)
    pid_t = pid // n_n  # the column blocks of one row block run together: a's rows stay in L2
    pid_n = pid % n_n
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_t = offs_t < T
    mask_n = offs_n < N
    io = offs_t.to(tl.int64)[:, None] * N + offs_n[None, :]
    m2 = mask_t[:, None] & mask_n[None, :]
    y = tl.load(out_ptr + io, mask=m2, other=0.0)
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for c0 in range(0, KR, BKR):
        offs_c = c0 + tl.arange(0, BKR)
        mask_c = offs_c < KR
        a = tl.load(a_ptr + offs_t.to(tl.int64)[:, None] * KR + offs_c[None, :],
                    mask=mask_t[:, None] & mask_c[None, :], other=0.0)
        b = tl.load(b_ptr + offs_c.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + io, (y.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=m2)


def add_mm_(out, a, b):
    T, N = out.shape
    KR = a.shape[1]
    _add_mm_kernel[lambda m: (triton.cdiv(T, m["BT"]) * triton.cdiv(N, m["BN"]),)](out, a, b, T, N, KR)
    return out


def us(fn):
    return do_bench(fn, warmup=30, rep=200, return_mode="median") * 1e3


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def main():
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; µs, do_bench medians")
    print("| T in→out R | pass | base GEMM alone | now: cuBLAS small + big beta=1 | base GEMM + Triton in-place add "
          "| in-place add alone (ideal) | err now / new vs fp64 | best tile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for T, n_in, n_out, R, E in ((8192, 4096, 4096, 128, 8), (8192, 4096, 14336, 128, 8), (8192, 4096, 4096, 256, 32),
                                 (2048, 4096, 4096, 128, 8), (512, 4096, 4096, 128, 8)):
        x = torch.randn(T, n_in, device=DEV, dtype=DT)
        W = (torch.randn(n_out, n_in, device=DEV) / n_in ** 0.5).to(DT)
        u = torch.randn(T, R, device=DEV, dtype=DT)
        bc = (torch.randn(R, n_out, device=DEV) * 0.1).to(DT)
        dy = torch.randn(T, n_out, device=DEV, dtype=DT)
        dhl = torch.randn(T, R + E, device=DEV, dtype=DT)
        ae = (torch.randn(R + E, n_in, device=DEV) / n_in ** 0.5).to(DT)
        case = f"{T} {n_in}→{n_out} R={R}"
        passes = (("fwd y", x, W.t(), u, bc, n_out), ("bwd dx", dy, W, dhl, ae, n_in))
        for name, big_a, big_b_t, small_a, small_b, n in passes:  # big_b_t: the (K, n) operand of the base GEMM
            ref = big_a.double() @ big_b_t.double() + small_a.double() @ small_b.double()
            now = torch.mm(small_a, small_b).addmm_(big_a, big_b_t)
            new = add_mm_(torch.mm(big_a, big_b_t), small_a, small_b)
            t_base = us(lambda: torch.mm(big_a, big_b_t))
            t_now = us(lambda: torch.mm(small_a, small_b).addmm_(big_a, big_b_t))
            t_new = us(lambda: add_mm_(torch.mm(big_a, big_b_t), small_a, small_b))
            scratch = torch.mm(big_a, big_b_t)
            t_add = us(lambda: add_mm_(scratch, small_a, small_b))
            ideal = 2 * T * n * 2 / bw * 1e6
            cfg = _add_mm_kernel.best_config
            print(f"| {case} | {name} | {t_base:.1f} | {t_now:.1f} | {t_new:.1f} | {t_add:.1f} ({ideal:.1f}) "
                  f"| {rel(now, ref):.1e} / {rel(new, ref):.1e} | {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages} |",
                  flush=True)
        del x, W, u, bc, dy, dhl, ae
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
