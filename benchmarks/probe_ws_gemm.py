"""The frozen base GEMM in Triton with Hopper warp specialization, against cuBLAS (sm_90, Triton >= 3.6).

    python benchmarks/probe_ws_gemm.py [--t 8192]

base_gemm.py's persistent kernel carries the experts' product as extra K but is slower than cuBLAS on the bare
base (run 23), so the forward keeps cuBLAS's two GEMMs. cuBLAS's own kernels are warp-specialized (a producer
warp group feeding two consumer groups); Triton 3.6 specializes a loop marked `tl.range(...,
warp_specialize=True)` on Hopper too. This times that form (one output tile per program, device-side TMA
descriptors, optionally reading a C tile into the accumulator: the expand-first forward's beta = 1) against
cuBLAS for the layer's base shapes. Triton 3.6 specializes only a kernel whose one loop is that loop: a second
K loop (the extra K) before or after it, or a tl.dot outside it, fails its Hopper warp-specialization pass, so the
extra K cannot ride in this form (RESULTS run 29).
"""
import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

DEV, DT = "cuda", torch.bfloat16


@triton.jit
def _ws_gemm(a_ptr, b_ptr, c_in_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             GROUP_M: tl.constexpr, B_T: tl.constexpr, HAS_C: tl.constexpr):
    """c = a @ op(b) (+ c_in); op(b) = b^T for b (N, K) when B_T, else b (K, N)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    if B_T:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    in_group = GROUP_M * tl.cdiv(N, BN)
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    om = (first_m + pid % size_m) * BM
    on = ((pid % in_group) // size_m) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in tl.range(tl.cdiv(K, BK), warp_specialize=True):
        x = a_desc.load([om, i * BK])
        if B_T:
            y = b_desc.load([on, i * BK]).T
        else:
            y = b_desc.load([i * BK, on])
        acc = tl.dot(x, y, acc)
    if HAS_C:
        ci_desc = tl.make_tensor_descriptor(c_in_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        acc += ci_desc.load([om, on]).to(tl.float32)
    c_desc.store([om, on], acc.to(c_desc.dtype))


def ws_gemm(a, b, b_t, c_in, cfg):
    bm, bn, bk, group_m, warps, stages = cfg
    M, K = a.shape
    N = b.shape[0] if b_t else b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    _ws_gemm[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
        a, b, c if c_in is None else c_in, c, M, N, K, BM=bm, BN=bn, BK=bk, GROUP_M=group_m, B_T=b_t,
        HAS_C=c_in is not None, num_warps=warps, num_stages=stages)
    return c


CONFIGS = [(128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 4, 5), (128, 128, 64, 16, 4, 4), (128, 256, 64, 8, 4, 3),
           (128, 128, 128, 8, 4, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=8192)
    args = ap.parse_args()
    T = args.t
    # device-side descriptors need scratch memory: a torch allocation, here only (a process-wide Triton setting)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device=DEV, dtype=torch.int8))
    g = torch.Generator(device=DEV).manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; best of 3 "
          "do_bench medians, µs")
    print("| shape | variant | µs | TFLOP/s | × cuBLAS mm |")
    print("| --- | --- | --- | --- | --- |")
    for name, n_out, b_t in (("fwd x W^T 4096->4096", 4096, True), ("bwd dy W 4096->4096", 4096, False),
                             ("fwd x W^T 4096->14336", 14336, True), ("bwd dy W 14336->4096", 14336, False)):
        n_in = 4096
        W = (torch.randn(n_out, n_in, device=DEV, generator=g) / 64).to(DT)
        a = torch.randn(T, n_in if b_t else n_out, device=DEV, generator=g).to(DT)
        N = n_out if b_t else n_in
        c_in = torch.randn(T, N, device=DEV, generator=g).to(DT)
        b_op = W.t() if b_t else W
        ref = a.float() @ b_op.float()
        fns = {"cuBLAS mm": lambda: torch.mm(a, b_op), "cuBLAS addmm (C in)": lambda: torch.addmm(c_in, a, b_op)}
        for cfg in CONFIGS:
            for with_c in (False, True):
                tag = f"Triton warp-specialized {cfg}" + (" + C in" if with_c else "")
                try:
                    out = ws_gemm(a, W, b_t, c_in if with_c else None, cfg)
                except Exception as e:  # noqa: BLE001  (a config the compiler rejects is a finding)
                    print(f"| {name} | {tag} | failed: {type(e).__name__} | | |")
                    continue
                want = ref + c_in.float() if with_c else ref
                err = ((out.float() - want).norm() / want.norm()).item()
                if err > 1e-2:
                    print(f"| {name} | {tag} | wrong: relative error {err:.1e} | | |")
                    continue
                fns[tag] = lambda cfg=cfg, wc=with_c: ws_gemm(a, W, b_t, c_in if wc else None, cfg)
        times = {k: [] for k in fns}
        for _ in range(3):  # interleaved rounds: clocks drift under the power cap
            for k, fn in fns.items():
                times[k].append(do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e3)
        base = min(times["cuBLAS mm"])
        for k, ts in sorted(times.items(), key=lambda kv: min(kv[1])):
            t = min(ts)
            print(f"| {name}, T={T} | {k} | {t:.1f} | {2 * T * n_out * n_in / t / 1e6:.0f} | {t / base:.3f}× |",
                  flush=True)
        del W, a, c_in, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
