"""Can a TMA Triton kernel beat cuBLAS on the routed layer's four skinny GEMMs? (CUDA, sm_90; a probe, no library code)

    python benchmarks/probe_skinny.py [--t 8192] [--n 4096] [--r-tot 128] [--experts 8] [--rounds 3] [--quick]

After base_gemm (RESULTS run 23) four passes over a T x 4096 tensor remain outside the base GEMMs, run by cuBLAS at
55-59% of copy bandwidth (~29-37 us each at T=8192, E=8 r=16):

    shrink   hl (T, R+3E) fp32 = x  @ w_ext^T      reduce over in     ("narrow": C = A B^T, N small)
    du       du (T, R)    fp32 = dy @ B_cat^T      reduce over out    ("narrow")
    dA|dWr   (R+E, in)    bf16 = dhl^T @ x          reduce over T      ("wgrad": C = G^T X)
    dB       (out, R)     bf16 = dy^T  @ u          reduce over T      ("wgrad")

Each is timed as cuBLAS (torch.mm, as the layer calls it) against two TMA kernels over a grid of tile configs, split
over the reduction with float32 atomics into a zeroed output (the zero-fill and, for bf16 outputs, the cast timed
with it). do_bench medians of `--rounds` interleaved rounds; each kernel's result checked against cuBLAS's first
(compiles run in a thread pool before; --quick, a quarter of each grid, is ~130 kernels). Prints per GEMM: cuBLAS,
the best configs, and the bytes each must move over its time as a fraction of the measured copy bandwidth.
Run in RESULTS run 24 (H200): every Triton config was slower than cuBLAS, 1.19-1.69x.
"""
import argparse
import itertools
import statistics
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _narrow_kernel(a_desc, b_desc, c_ptr, M, N, K, ldc, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   SPLIT: tl.constexpr, B_KN: tl.constexpr):
    """c (M, N) float32 (+)= a (M, K) @ op(b) over this program's share of K (atomics when SPLIT > 1); op(b) = b
    for b stored (K, N) (B_KN), else b^T for b stored (N, K)."""
    n_tiles_n = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    om = (pid // n_tiles_n) * BM  # the N tiles of one row tile are neighbours: the second reads a from L2
    on = (pid % n_tiles_n) * BN
    chunk = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
    k_lo = tl.program_id(1) * chunk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(k_lo, tl.minimum(k_lo + chunk, K), BK):
        if B_KN:
            acc = tl.dot(a_desc.load([om, k]), b_desc.load([k, on]), acc)
        else:
            acc = tl.dot(a_desc.load([om, k]), b_desc.load([on, k]).T, acc)
    offs_m = om + tl.arange(0, BM)
    offs_n = on + tl.arange(0, BN)
    ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * ldc + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _wgrad_kernel(g_desc, x_desc, c_ptr, T, P, Q, ldc, BP: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr,
                  SPLIT: tl.constexpr):
    """c (P, Q) (+)= g (T, P)^T @ x (T, Q) over this program's share of T; float32 atomics when SPLIT > 1, else
    stored in c's dtype."""
    n_tiles_q = tl.cdiv(Q, BQ)
    pid = tl.program_id(0)
    op = (pid // n_tiles_q) * BP
    oq = (pid % n_tiles_q) * BQ
    chunk = tl.cdiv(tl.cdiv(T, SPLIT), BT) * BT
    t_lo = tl.program_id(1) * chunk
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for t in range(t_lo, tl.minimum(t_lo + chunk, T), BT):
        acc = tl.dot(g_desc.load([t, op]).T, x_desc.load([t, oq]), acc)
    offs_p = op + tl.arange(0, BP)
    offs_q = oq + tl.arange(0, BQ)
    ptrs = c_ptr + offs_p.to(tl.int64)[:, None] * ldc + offs_q[None, :]
    mask = (offs_p < P)[:, None] & (offs_q < Q)[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


def narrow(a, b, cfg, b_kn=False):
    """a @ b^T (b (N, K)) or, b_kn, a @ b (b (K, N)), in float32."""
    bm, bn, bk, split, warps, stages = cfg
    M, K = a.shape
    N = b.shape[1] if b_kn else b.shape[0]
    c = (torch.zeros if split > 1 else torch.empty)((M, N), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    b_d = TensorDescriptor.from_tensor(b, [bk, bn] if b_kn else [bn, bk])
    _narrow_kernel[grid](TensorDescriptor.from_tensor(a, [bm, bk]), b_d, c, M, N, K, c.stride(0), BM=bm, BN=bn,
                         BK=bk, SPLIT=split, B_KN=b_kn, num_warps=warps, num_stages=stages)
    return c


def wgrad(g, x, cfg, out_dtype):
    """g^T @ x in out_dtype (float32 atomics and a cast when split)."""
    bp, bq, bt, split, warps, stages = cfg
    T, P = g.shape
    Q = x.shape[1]
    c = (torch.zeros((P, Q), device=g.device, dtype=torch.float32) if split > 1
         else torch.empty((P, Q), device=g.device, dtype=out_dtype))
    grid = (triton.cdiv(P, bp) * triton.cdiv(Q, bq), split)
    _wgrad_kernel[grid](TensorDescriptor.from_tensor(g, [bt, bp]), TensorDescriptor.from_tensor(x, [bt, bq]), c,
                        T, P, Q, c.stride(0), BP=bp, BQ=bq, BT=bt, SPLIT=split, num_warps=warps, num_stages=stages)
    return c.to(out_dtype) if split > 1 else c


def narrow_configs(quick):
    grid = itertools.product([64, 128], [64, 128, 256], [64, 128], [1, 2, 4], [4, 8], [3, 4])
    out = [c for c in grid if c[0] * c[2] * 2 + c[1] * c[2] * 2 <= 56 * 1024 and not (c[4] == 8 and c[0] == 64)]
    return out[::4] if quick else out


def wgrad_configs(quick):
    grid = itertools.product([64, 128, 256], [64, 128, 256], [64, 128], [1, 2, 4, 8], [4, 8], [3, 4])
    out = [c for c in grid if (c[0] + c[1]) * c[2] * 2 <= 56 * 1024 and c[0] * c[1] <= 128 * 256]
    return out[::4] if quick else out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--n", type=int, default=4096, help="in = out features")
    ap.add_argument("--r-tot", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a quarter of each config grid")
    args = ap.parse_args()
    T, n, R, E = args.t, args.n, args.r_tot, args.experts
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, device="cuda", generator=g).to(dt)
    x, dy, w_ext, b_t, dhl, u = rnd(T, n), rnd(T, n), rnd(R + 3 * E, n), rnd(n, R), rnd(T, R + E), rnd(T, R)
    a = torch.randn(2 ** 28, device="cuda", dtype=dt)
    bw = 4 * a.numel() / (do_bench(lambda: a.clone()) * 1e-3)
    del a
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; T={T} "
          f"features {n} R={R} E={E} bf16; copy bandwidth {bw / 1e12:.2f} TB/s")
    cases = [  # name, cuBLAS as the layer calls it, Triton form, its configs, bytes it must move
        ("shrink hl = x @ w_ext^T", lambda: torch.mm(x, w_ext.t(), out_dtype=torch.float32),
         lambda c: narrow(x, w_ext, c), narrow_configs(args.quick), 2 * (T * n + (R + 3 * E) * n) + 4 * T * (R + 3 * E)),
        ("du = dy @ B_cat^T", lambda: torch.mm(dy, b_t, out_dtype=torch.float32),
         lambda c: narrow(dy, b_t, c, b_kn=True),  # b_t (out, R): how MoLLinear's lora_B lies in memory
         narrow_configs(args.quick), 2 * (T * n + R * n) + 4 * T * R),
        ("dA|dWr = dhl^T @ x", lambda: torch.mm(dhl.t(), x), lambda c: wgrad(dhl, x, c, dt), wgrad_configs(args.quick),
         2 * (T * (R + E) + T * n + (R + E) * n)),
        ("dB = dy^T @ u", lambda: torch.mm(dy.t(), u), lambda c: wgrad(dy, u, c, dt), wgrad_configs(args.quick),
         2 * (T * n + T * R + n * R)),
    ]
    for name, cublas, tri, configs, nbytes in cases:
        ref = cublas().float()
        with ThreadPoolExecutor(16) as pool:  # compile every config first, in parallel; failures are reported below
            list(pool.map(lambda c: _quiet(tri, c), configs))
        torch.cuda.synchronize()
        fns = {"cuBLAS": cublas}
        for cfg in configs:
            try:
                got = tri(cfg).float()
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  {name} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            err = ((got - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                print(f"  {name} {cfg}: WRONG, rel err {err:.1e} against cuBLAS")
                continue
            fns[cfg] = lambda cfg=cfg: tri(cfg)
        torch.cuda.synchronize()
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3)
        med = sorted(((statistics.median(v), k) for k, v in times.items()), key=lambda r: r[0])
        t_cublas = statistics.median(times["cuBLAS"])
        print(f"\n## {name}: {nbytes / 1e6:.1f} MB; {len(fns) - 1} Triton configs (BM|BP, BN|BQ, BK|BT, split, "
              f"warps, stages)\n| what | µs | × cuBLAS | fraction of copy bandwidth |\n| --- | --- | --- | --- |")
        rows = [r for r in med if r[1] == "cuBLAS"] + [r for r in med if r[1] != "cuBLAS"][: args.top]
        for t, k in rows:
            print(f"| {k} | {t:.1f} | {t / t_cublas:.3f} | {nbytes / (t * 1e-6) / bw:.0%} |")


def _quiet(fn, cfg):
    try:
        fn(cfg)
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
