"""Grouped (mixture-of-)LoRA kernels in Triton, wrapped as torch.library custom ops.

    out[t] = base_out[t] + scale * sum_k gates[t,k] * B[e] @ (A[e] @ x[t]),   e = expert_ids[t,k]

Layout idea: with E*r small (8 experts x rank 16 = 128 columns against 4096 features) every
expert's shrink fits in one skinny GEMM over x, so we compute h = x @ A_cat^T for all experts
(A_cat = A.view(E*r, in)) and fold the routing into a per-column gate g[t, c] = sum_k
gates[t,k] * [c // r == ids[t,k]]. Tokens are never gathered, sorted or counted, so there is no
host sync and no data-dependent shape; the GEMMs run on tensor cores at full tile size, and the
work that must touch the big tensors is one read of x (shrink), one read+write of the output
(expand, accumulated into base_out), one read of dy (dh/dgates epilogue), plus cuBLAS for dB,
dA and dx. The price is E/top_k times more (tiny) LoRA FLOPs, which is free while E*r <= ~256.

Kernels:
  _shrink_kernel      h = x @ A_cat^T                                  (T, E*r), x.dtype
  _expand_kernel      out = base + (scale * g * h) @ B_cat             (T, out), may run in place
  _du_kernel          du = dy @ B_cat^T  (float32; split over out with atomics when T is small)
  _gated_kernel       u = scale*g*h                                    (T, E*r), x.dtype
  _bwd_epilogue_kernel dh = scale*g*du; u = scale*g*h; dgates = scale*<du,h> per chosen expert

With DENSE_GEMMS (the default where torch.mm takes out_dtype) the three big products run as the routed layer
(mol.kernels.routed_lora) runs them: h by cuBLAS, u by _gated_kernel, and y = x W^T + u B_cat (dx = dy W + dh A_cat)
as one base GEMM carrying the adapters as extra K (base_gemm), or u B_cat added to a given base output by cuBLAS;
the Triton shrink and expand run where it is off or unavailable.
"""
import os
import time
from typing import Callable

import torch
import triton
import triton.language as tl

from mol.kernels import autocast_enabled, autocast_off, env_flag

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Testing aid: fill every kernel output buffer with NaN before launch, so that an element the
# kernels fail to write shows up in the result instead of hiding behind whatever memory held.
POISON = False


def _interpret_bench(fn: Callable[[], object], quantiles: tuple[float, ...] | None = None) -> list[float] | float:
    """The interpreter's tuner timer: one run, wall milliseconds (the choice does not matter there, the run does)."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def autotune(configs: list[triton.Config], key: list[str], do_bench: Callable | None = None, **kwargs) -> Callable:
    """``triton.autotune``, with a timer that needs no GPU driver under the interpreter: Triton <= 3.3 asks the
    driver for one when the tuner is built, and a CPU-only machine has none (the interpreted suite on 3.3.1)."""
    if do_bench is None and _INTERPRET:
        do_bench = _interpret_bench
    return triton.autotune(configs=configs, key=key, do_bench=do_bench, **kwargs)


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON:
        fill = float("nan") if dtype.is_floating_point else -(2 ** 31)
        return torch.full(shape, fill, device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


_ZEROED: dict[tuple, torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def zeroed_workspace(device: torch.device, tag: object, numel: int) -> torch.Tensor:
    """A cached int32 buffer of at least `numel` zeros, for kernels that leave it zero when they finish (tickets
    the last program resets, flags, accumulators a program clears after reading): one zero-fill, not one per
    launch. Keyed by device, current stream (launches on two streams may overlap) and `tag`; grown, never shrunk.
    Inside a CUDA-graph capture a buffer not cached yet (or too small) is a fresh zero-fill, captured and not
    cached: the capture records the memset without running it, so a cached one would hold garbage for the eager
    calls that come before the first replay."""
    # the raw handle, as triton's own launcher reads it: torch.cuda.current_stream() builds a Stream object, several
    # µs of host time on the GPU machines in every decode call
    stream = 0
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        stream = torch._C._cuda_getCurrentRawStream(index)
    key = (device, stream, tag)
    buf = _ZEROED.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(numel, dtype=torch.int32, device=device)
        if not _capturing(device):
            _ZEROED[key] = buf
    return buf


def _cfg(kind, bt, br, bk, split, w, st):
    return triton.Config({"BT": bt, "BR": br, "BK": bk, **({"SPLIT": split} if kind != "expand" else {})},
                         num_warps=w, num_stages=st)


def _configs(kind: str) -> list[triton.Config]:
    """A few block shapes per kernel; the interpreter gets one (autotuning there is pointless).

    BT: token tile; BR: tile over the E*r columns; BK: reduction step (in for the shrink, out
    for du) or, for the expand, the out tile; SPLIT: reduction split over programs (atomics),
    which keeps the SMs busy when T/BT is small (decode) without shrinking BT, since every
    token tile re-reads the whole A_cat / B_cat from L2.
    """
    if _INTERPRET:  # SPLIT=2 so the CPU tests exercise the atomic path too
        return [_cfg(kind, 16, 16, 16, 2, 4, 1)]
    if not env_flag("MOL_TRITON_AUTOTUNE", True):  # one safe config: fast start, no tuning
        return [_cfg(kind, 64, 64, 128 if kind == "expand" else 64, 2, 4, 3)]
    if kind == "expand":  # (BT, BR, BO, -, warps, stages)
        shapes = [(64, 64, 128, 1, 4, 3), (128, 64, 128, 1, 8, 3), (128, 128, 128, 1, 8, 3),
                  (64, 128, 128, 1, 4, 3), (64, 64, 256, 1, 8, 3), (16, 64, 128, 1, 4, 2),
                  (16, 128, 64, 1, 4, 2), (128, 64, 256, 1, 8, 3)]
    else:  # shrink and du: reductions over a long dimension into a (T, R) tile
        shapes = [(128, 128, 64, 1, 8, 3), (128, 128, 64, 2, 8, 3), (128, 128, 64, 4, 8, 3),
                  (64, 128, 64, 2, 4, 4), (64, 128, 64, 4, 4, 4), (128, 64, 64, 2, 4, 4),
                  (64, 256, 64, 2, 8, 3), (16, 64, 128, 8, 4, 3), (16, 32, 128, 8, 4, 3),
                  (16, 64, 64, 16, 4, 3), (16, 128, 64, 16, 4, 3)]
    return [_cfg(kind, *sh) for sh in shapes]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1). Plain Python: triton.next_power_of_2 and triton.cdiv are
    constexpr_function objects whose host-side call costs microseconds each, and a call made ~10 of them."""
    return 1 << (n - 1).bit_length()


def _prune(configs, named_args, **kwargs):
    """Drop tiles much wider than R, and token tiles far taller than T; keep at least one."""
    r_cap = max(16, _pow2(named_args["R"]))
    t_cap = max(16, _pow2(max(1, named_args["T"])))
    kept = [c for c in configs if c.kwargs["BR"] <= r_cap and c.kwargs["BT"] <= t_cap]
    return kept or configs[:1]


@triton.jit
def _col_gate(gates_ptr, ids_ptr, offs_t, mask_t, offs_c, RANK: tl.constexpr, K: tl.constexpr):
    """g[t, c] = sum_k gates[t, k] * (ids[t, k] == c // RANK), as float32 (BT, BC)."""
    e_col = offs_c // RANK
    g = tl.zeros((offs_t.shape[0], offs_c.shape[0]), dtype=tl.float32)
    for k in tl.static_range(K):
        idk = tl.load(ids_ptr + offs_t.to(tl.int64) * K + k, mask=mask_t, other=-1).to(tl.int32)
        gk = tl.load(gates_ptr + offs_t.to(tl.int64) * K + k, mask=mask_t, other=0.0).to(tl.float32)
        g += tl.where(idk[:, None] == e_col[None, :], gk[:, None], 0.0)
    return g


@autotune(configs=_configs("shrink"), key=["T_BUCKET", "N_IN", "R"],
         prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["h_ptr"])
@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, T, N_IN, R, T_BUCKET,
                   BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                   F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    """h (float32, zero-initialised) += x[:, chunk] @ A_cat[:, chunk]^T."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    mask_t = offs_t < T
    mask_r = offs_r < R
    chunk = tl.cdiv(tl.cdiv(N_IN, SPLIT), BK) * BK
    k_lo = pid_s * chunk
    k_hi = tl.minimum(k_lo + chunk, N_IN)
    x_row = x_ptr + offs_t.to(tl.int64)[:, None] * N_IN
    a_row = a_ptr + offs_r.to(tl.int64)[None, :] * N_IN
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + offs_k
        mk = kk < k_hi
        xt = tl.load(x_row + kk[None, :], mask=mask_t[:, None] & mk[None, :], other=0.0)
        at = tl.load(a_row + kk[:, None], mask=mk[:, None] & mask_r[None, :], other=0.0)
        if F32_DOT:  # the CPU interpreter mis-computes low-precision tl.dot
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        if IEEE:
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)
    h_ptrs = h_ptr + offs_t.to(tl.int64)[:, None] * R + offs_r[None, :]
    m2 = mask_t[:, None] & mask_r[None, :]
    if SPLIT == 1:
        tl.store(h_ptrs, acc, mask=m2)
    else:
        tl.atomic_add(h_ptrs, acc, mask=m2)


@autotune(configs=_configs("expand"), key=["T_BUCKET", "N_OUT", "R", "K"],
         prune_configs_by={"early_config_prune": _prune},
         restore_value=["out_ptr"])  # may run in place: tuning runs must not accumulate
@triton.jit
def _expand_kernel(base_ptr, h_ptr, b_ptr, gates_ptr, ids_ptr, out_ptr, scale,
                   T, N_OUT, R, T_BUCKET,
                   RANK: tl.constexpr, K: tl.constexpr,
                   BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                   F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    """out = base + (scale * g * h) @ B_cat, B_cat (R, out) contiguous; BK is the out tile."""
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_o = pid_o * BK + tl.arange(0, BK)
    mask_t = offs_t < T
    mask_o = offs_o < N_OUT
    io = offs_t.to(tl.int64)[:, None] * N_OUT + offs_o[None, :]
    m2 = mask_t[:, None] & mask_o[None, :]
    base = tl.load(base_ptr + io, mask=m2, other=0.0)  # issued early: overlaps the small GEMM
    acc = tl.zeros((BT, BK), dtype=tl.float32)
    for c0 in range(0, R, BR):
        offs_c = c0 + tl.arange(0, BR)
        mask_c = offs_c < R
        g = _col_gate(gates_ptr, ids_ptr, offs_t, mask_t, offs_c, RANK, K)
        ht = tl.load(h_ptr + offs_t.to(tl.int64)[:, None] * R + offs_c[None, :],
                     mask=mask_t[:, None] & mask_c[None, :], other=0.0)
        u = (ht * g * scale).to(out_ptr.dtype.element_ty)
        bt = tl.load(b_ptr + offs_c.to(tl.int64)[:, None] * N_OUT + offs_o[None, :],
                     mask=mask_c[:, None] & mask_o[None, :], other=0.0)
        if F32_DOT:
            u = u.to(tl.float32)
            bt = bt.to(tl.float32)
        if IEEE:
            acc = tl.dot(u, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(u, bt, acc)
    tl.store(out_ptr + io, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=m2)


@autotune(configs=_configs("du"), key=["T_BUCKET", "N_OUT", "R"],
         prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["du_ptr"])
@triton.jit
def _du_kernel(dy_ptr, b_ptr, du_ptr, T, N_OUT, R, T_BUCKET, stride_be, stride_bn,
               RANK: tl.constexpr,
               BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
               F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    """du (float32, zero-initialised) += dy[:, chunk] @ B_cat^T[chunk, :], B (E, out, r) with unit rank stride."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = pid_r * BR + tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    mask_t = offs_t < T
    mask_c = offs_c < R
    chunk = tl.cdiv(tl.cdiv(N_OUT, SPLIT), BK) * BK
    o_lo = pid_s * chunk
    o_hi = tl.minimum(o_lo + chunk, N_OUT)
    e_c = (offs_c // RANK).to(tl.int64)
    j_c = offs_c % RANK
    dy_row = dy_ptr + offs_t.to(tl.int64)[:, None] * N_OUT
    b_col = b_ptr + (e_c * stride_be + j_c)[None, :]
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    for o0 in range(o_lo, o_hi, BK):
        oo = o0 + offs_k
        mo = oo < o_hi
        dyt = tl.load(dy_row + oo[None, :], mask=mask_t[:, None] & mo[None, :], other=0.0)
        bt = tl.load(b_col + oo.to(tl.int64)[:, None] * stride_bn, mask=mo[:, None] & mask_c[None, :],
                     other=0.0)
        if F32_DOT:
            dyt = dyt.to(tl.float32)
            bt = bt.to(tl.float32)
        if IEEE:
            acc = tl.dot(dyt, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(dyt, bt, acc)
    du_ptrs = du_ptr + offs_t.to(tl.int64)[:, None] * R + offs_c[None, :]
    m2 = mask_t[:, None] & mask_c[None, :]
    if SPLIT == 1:
        tl.store(du_ptrs, acc, mask=m2)
    else:
        tl.atomic_add(du_ptrs, acc, mask=m2)


@triton.jit
def _bwd_epilogue_kernel(du_ptr, h_ptr, gates_ptr, ids_ptr, dh_ptr, u_ptr, dgates_ptr, scale,
                         T, R, SDT, SDC, RANK: tl.constexpr, K: tl.constexpr,
                         BT: tl.constexpr, BRP: tl.constexpr):
    """dh = scale*g*du (strides SDT a token, SDC a column), u = scale*g*h, dgates[t,k] = scale * <du, h> over
    expert ids[t,k]."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_c = tl.arange(0, BRP)
    mask_t = offs_t < T
    m2 = mask_t[:, None] & (offs_c < R)[None, :]
    io = offs_t.to(tl.int64)[:, None] * R + offs_c[None, :]
    du = tl.load(du_ptr + io, mask=m2, other=0.0)
    ht = tl.load(h_ptr + io, mask=m2, other=0.0)
    g = _col_gate(gates_ptr, ids_ptr, offs_t, mask_t, offs_c, RANK, K) * scale
    dh_io = offs_t.to(tl.int64)[:, None] * SDT + offs_c.to(tl.int64)[None, :] * SDC
    tl.store(dh_ptr + dh_io, (du * g).to(dh_ptr.dtype.element_ty), mask=m2)
    tl.store(u_ptr + io, (ht * g).to(u_ptr.dtype.element_ty), mask=m2)
    prod = du * ht * scale
    e_col = offs_c // RANK
    for k in tl.static_range(K):
        idk = tl.load(ids_ptr + offs_t.to(tl.int64) * K + k, mask=mask_t, other=-1).to(tl.int32)
        part = tl.sum(tl.where(idk[:, None] == e_col[None, :], prod, 0.0), axis=1)
        tl.store(dgates_ptr + offs_t.to(tl.int64) * K + k, part, mask=mask_t)


@triton.jit
def _gated_kernel(h_ptr, gates_ptr, ids_ptr, u_ptr, scale, T, R, RANK: tl.constexpr, K: tl.constexpr,
                  BT: tl.constexpr, BRP: tl.constexpr):
    """u = scale*g*h in u's dtype: the experts' gated shrink output, the extra K of the forward's base GEMM."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_c = tl.arange(0, BRP)
    mask_t = offs_t < T
    m2 = mask_t[:, None] & (offs_c < R)[None, :]
    io = offs_t.to(tl.int64)[:, None] * R + offs_c[None, :]
    ht = tl.load(h_ptr + io, mask=m2, other=0.0)
    g = _col_gate(gates_ptr, ids_ptr, offs_t, mask_t, offs_c, RANK, K) * scale
    tl.store(u_ptr + io, (ht * g).to(u_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- launchers
#
# Host cost matters: at small T a MoL layer's GPU work is a few µs, so every Python-level step of a call
# shows up in the step time. The launchers therefore
#   * autotune through triton.autotune once per key, then remember the chosen Config and launch the
#     underlying JITFunction with it (the Autotuner's per-launch dict building and dtype-string key
#     cost more than the launch itself);
#   * zero-fill the split-K accumulators only when the chosen config really splits (SPLIT > 1);
#   * compute grids and buckets with plain integer arithmetic.

_CHOSEN: dict = {}  # (kernel, autotune key..., dtype) -> triton.Config picked by the autotuner


def _token_minor(t: int, cols: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A (t, cols) tensor stored column by column: token stride 1, column stride t rounded up to 8 (16-byte rows
    of the transpose, as TMA needs). The backward's dh (grouped and routed alike) is stored so: the weight-gradient
    GEMM dA = dh^T x then reads a row-major dh^T, which cuBLAS runs 14-16% faster than the transposed view of a
    row-major dh (H200, RESULTS run 32), and base_gemm reads it as that tensor's transpose."""
    ld = -(-t // 8) * 8
    buf = _alloc((cols, ld), like, dtype)
    if ld > t and not like.is_cuda:
        # torch's CPU bfloat16 mm (oneDNN) reads a strided operand's rows past their t columns: NaN or inf bits
        # left there by the allocator made whole rows of dA NaN, now and then (torch 2.13; a (36, 37) view of
        # stride 40). cuBLAS reads only the view, so the GPU skips this fill
        buf[:, t:].zero_()
    return buf[:, :t].t()


def _t_bucket(t: int) -> int:
    # autotune per power-of-two token bucket (decode and training want different tiles)
    return min(_pow2(max(t, 1)), 8192)


def _flags(dtype: torch.dtype) -> dict:
    return {"F32_DOT": _INTERPRET, "IEEE": dtype == torch.float32}


def bench_graphed(fn: Callable[[], object], quantiles: tuple[float, ...] | None = None) -> list[float] | float:
    """An autotuner timer (`triton.autotune(do_bench=...)`) for kernels of a few to tens of microseconds, which
    run under CUDA-graph replay in decode: times them that way, where eager timing is launch overhead and ranks
    configs by noise (for the NF4 small-T kernel the eager-timed tuner picked configs 9% / 50% slower than the
    best at T = 1 / 16, RESULTS run 10). Eager do_bench while a graph is being captured or cannot be."""
    from triton.testing import do_bench, do_bench_cudagraph

    if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
        # it times on a stream of its own: let this stream's work (which may share the kernel's buffers) finish
        torch.cuda.synchronize()
        try:
            return do_bench_cudagraph(fn, rep=20, quantiles=quantiles)
        except RuntimeError:
            pass
    return do_bench(fn, quantiles=quantiles)


def _launch(kernel, key: tuple, grid, args: tuple, consts: dict) -> None:
    """Launch an autotuned kernel: through the autotuner the first time a key is seen, then straight
    through its JITFunction with the config the autotuner chose (same arguments as the autotuner
    passes, so the same compiled kernel). grid: meta-parameters -> grid tuple. Every config is
    correct for every shape; only SPLIT changes what the caller must allocate (see _accumulator)."""
    chosen = _CHOSEN.get(key)
    if chosen is None:
        kernel[grid](*args, **consts)
        cfg = getattr(kernel, "best_config", None)
        if cfg is not None:  # a Triton without .best_config keeps launching through the autotuner
            _CHOSEN[key] = (cfg.kwargs, cfg.all_kwargs())
        return
    meta, all_kwargs = chosen
    kernel.fn.run(*args, grid=grid(meta), warmup=False, **all_kwargs, **consts)


def _split(key: tuple) -> int:
    """SPLIT of the config chosen for key; 0 while not yet tuned (the tuning run may pick any)."""
    chosen = _CHOSEN.get(key)
    return 0 if chosen is None else chosen[0]["SPLIT"]


def _accumulator(t: int, r_tot: int, like: torch.Tensor, key: tuple) -> torch.Tensor:
    # split-K programs add into it with atomics, so it must start at zero; one program per tile stores.
    if _split(key) == 1:
        return _alloc((t, r_tot), like, torch.float32)
    return torch.zeros((t, r_tot), device=like.device, dtype=torch.float32)


def _shrink(x: torch.Tensor, a_cat: torch.Tensor) -> torch.Tensor:
    """h = x @ a_cat^T in float32 (kept for backward: dgates needs it unrounded)."""
    t, n_in = x.shape
    r_tot = a_cat.shape[0]
    bucket = _t_bucket(t)
    key = ("shrink", bucket, n_in, r_tot, x.dtype)
    h = _accumulator(t, r_tot, x, key)
    if t == 0:
        return h

    def grid(m):
        return (_cdiv(t, m["BT"]), _cdiv(r_tot, m["BR"]), m["SPLIT"])
    _launch(_shrink_kernel, key, grid, (x, a_cat, h, t, n_in, r_tot, bucket), _flags(x.dtype))
    return h


def _b_cat(lora_B: torch.Tensor) -> torch.Tensor:
    """(E, out, r) -> B_cat (E*r, out): a (transposed) view when lora_B is stored expert-interleaved, as
    MoLLinear stores it (memory order (out, E, r)), else a copy."""
    e, n_out, rank = lora_B.shape
    return lora_B.permute(0, 2, 1).reshape(e * rank, n_out)


def _grad_b(dy: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, f32: bool = False) -> torch.Tensor:
    """dB = (dy^T u) as (E, out, r), in lora_B's own memory layout where that is the expert-interleaved one (then
    dy^T u (out, E*r) already is dB, a view: no copy here, and autograd stores it as the .grad without one).
    f32: computed into float32 (for float32 adapters of a 16-bit layer)."""
    e, n_out, rank = lora_B.shape
    d = (_mm_f32(dy.t(), u) if f32 else torch.mm(dy.t(), u)).view(n_out, e, rank).permute(1, 0, 2)
    return d if d.stride() == lora_B.stride() else d.contiguous()


def _expand(base: torch.Tensor, h: torch.Tensor, b_cat: torch.Tensor, rank: int,
            gates: torch.Tensor, ids: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    t, n_out = base.shape
    if t == 0:
        return out
    r_tot, k = b_cat.shape[0], ids.shape[1]
    bucket = _t_bucket(t)

    def grid(m):
        return (_cdiv(t, m["BT"]), _cdiv(n_out, m["BK"]))
    _launch(_expand_kernel, ("expand", bucket, n_out, r_tot, rank, k, base.dtype), grid,
            (base, h, b_cat, gates, ids, out, float(scale), t, n_out, r_tot, bucket),
            {"RANK": rank, "K": k, **_flags(base.dtype)})
    return out


DU_CUBLAS = True  # CUDA: du from cuBLAS (x's dtype in, float32 out); False: the Triton _du_kernel
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) exists (torch >= 2.8)


def _du(dy: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """du = dy @ B_cat^T in float32, (T, E*r), B in its (E, out, r) layout."""
    t, n_out = dy.shape
    e, _, rank = lora_B.shape
    r_tot = e * rank
    if DU_CUBLAS and dy.is_cuda and _MM_OUT_DTYPE and t > 0:
        # cuBLAS reaches 58% of copy bandwidth here where the Triton kernel reached 29-40% (H100, RESULTS run 8);
        # the kernel stays for torch < 2.8 and the interpreter
        b_t = lora_B.permute(1, 0, 2).reshape(n_out, r_tot)  # (out, R): a view for MoLLinear's layout, else a copy
        return _mm_f32(dy, b_t)
    bucket = _t_bucket(t)
    key = ("du", bucket, n_out, r_tot, rank, dy.dtype)
    du = _accumulator(t, r_tot, dy, key)
    if t == 0:
        return du

    def grid(m):
        return (_cdiv(t, m["BT"]), _cdiv(r_tot, m["BR"]), m["SPLIT"])
    lora_B = _as_b(lora_B, lora_B.dtype)
    _launch(_du_kernel, key, grid, (dy, lora_B, du, t, n_out, r_tot, bucket, lora_B.stride(0), lora_B.stride(1)),
            {"RANK": rank, **_flags(dy.dtype)})
    return du


def _row_tile(r_tot: int) -> tuple[int, int]:
    """(BT, BRP) of the per-token kernels that hold all E*r columns of a token block (_gated_kernel, the backward
    epilogue): the columns padded to a power of two, about 4096 elements a block."""
    brp = max(16, _pow2(r_tot))
    return max(1, min(64, 4096 // brp)), brp


def _expand_bwd(dy, h, lora_B, gates, ids, scale):
    t = dy.shape[0]
    rank = lora_B.shape[2]
    r_tot = lora_B.shape[0] * rank
    du = _du(dy, lora_B)
    dh = _token_minor(t, r_tot, dy)  # separate buffers: custom-op outputs may not alias each other
    u = _alloc((t, r_tot), dy)
    dgates = _alloc(ids.shape, dy, torch.float32)
    if t == 0:
        return dh, u, dgates
    bt, brp = _row_tile(r_tot)
    _bwd_epilogue_kernel[(_cdiv(t, bt),)](du, h, gates, ids, dh, u, dgates, float(scale), t, r_tot,
                                          dh.stride(0), dh.stride(1),
                                          RANK=rank, K=ids.shape[1], BT=bt, BRP=brp)
    return dh, u, dgates


# True: the shrink, the expand and the adapters' dx as the routed layer runs them (cuBLAS, and base_gemm's one GEMM
# with the adapters as extra K); False: the Triton shrink and expand kernels, which also run wherever torch.mm has no
# out_dtype (torch < 2.8). Measured on an H200 (RESULTS run 33; fwd+bwd under CUDA graphs interleaved with the bare
# base, x the base): T=8192 4096->4096 E=8 top-2 r=16 1.188x against 1.262x, 4096->14336 1.125x against 1.195x,
# E=32 top-4 r=8 1.261x against 1.374x, T=2048 1.280x against 1.391x.
DENSE_GEMMS = True


def _gemm_path(x: torch.Tensor) -> bool:
    """Whether this call takes the DENSE_GEMMS path: metadata only, so fake kernels and backward agree."""
    return DENSE_GEMMS and x.shape[0] > 0 and (_INTERPRET or (x.is_cuda and _MM_OUT_DTYPE))



def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 (float32 accumulation and output) by cuBLAS: the skinny products whose float32 result the
    gate kernels read (the shrink's h, the backward's du)."""
    if not a.is_cuda:  # the interpreter's CPU: no low-precision mm with float32 output; exact products, fp32 sums
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b) if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)


def _gated(h: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, scale: float, rank: int,
           dtype: torch.dtype) -> torch.Tensor:
    """u = scale*g*h (T, E*r) in dtype."""
    t, r_tot = h.shape
    u = _alloc((t, r_tot), h, dtype)
    bt, brp = _row_tile(r_tot)
    _gated_kernel[(_cdiv(t, bt),)](h, gates, ids, u, float(scale), t, r_tot, RANK=rank, K=ids.shape[1], BT=bt,
                                   BRP=brp)
    return u


def _gated_shrink(x, lora_A, lora_B, gates, expert_ids, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense path's forward up to the expand: (h = x A_cat^T in float32, u = scale*g*h in x's dtype)."""
    h = _mm_f32(x, lora_A.reshape(-1, lora_A.shape[-1]).t())
    return h, _gated(h, gates, expert_ids, scale, lora_B.shape[2], x.dtype)


def _add_fwd_impl(base_out, x, lora_A, lora_B, gates, expert_ids, scale):
    if _gemm_path(x):
        # a caller's autocast would re-type these cuBLAS calls (h in bf16, y in bf16 against a float32 base)
        with autocast_off(x.device.type):
            h, u = _gated_shrink(x, lora_A, lora_B, gates, expert_ids, scale)
            return torch.addmm(base_out, u, _b_cat(lora_B)), h
    h = _shrink(x, lora_A.reshape(-1, lora_A.shape[-1]))
    out = _alloc(base_out.shape, base_out)
    b_cat = _b_cat(lora_B)
    _expand(base_out, h, b_cat if b_cat.is_contiguous() else b_cat.contiguous(), lora_B.shape[2],
            gates, expert_ids, scale, out)
    return out, h


def _linear_fwd_impl(x, weight, bias, lora_A, lora_B, gates, expert_ids, scale):
    if _gemm_path(x):
        from mol.kernels import base_gemm as bg  # it imports this module

        with autocast_off(x.device.type):
            h, u = _gated_shrink(x, lora_A, lora_B, gates, expert_ids, scale)
            return bg.base_mm(x, weight, True, u, _b_cat(lora_B), False, bias), h
    h = _shrink(x, lora_A.reshape(-1, lora_A.shape[-1]))
    # base GEMM through cuBLAS, then the expand accumulates into its fresh output in place:
    # no second (T, out) buffer and no separate add pass.
    with autocast_off(x.device.type):  # y in x's dtype, as the op's fake kernel says
        y = torch.nn.functional.linear(x, weight, bias)
    b_cat = _b_cat(lora_B)
    _expand(y, h, b_cat if b_cat.is_contiguous() else b_cat.contiguous(), lora_B.shape[2],
            gates, expert_ids, scale, y)
    return y, h


# ----------------------------------------------------------------------------- custom ops
# What torch.compile (fullgraph) traces: schemas, fake kernels and autograd formulas. Eager calls take
# the autograd.Function fast path further down, which runs the same implementation functions without the
# custom-op dispatch (that dispatch cost ~2x the whole rest of a small-T forward+backward on the host).

_LIB = torch.library.Library("mol", "FRAGMENT")


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], torch._ops.OpOverload]:
    """``torch.library.custom_op`` without its Python wrappers: the function's schema (inferred from its type hints,
    as custom_op does) is defined in the ``mol`` namespace and the function registered as the op's kernel for every
    backend (CompositeExplicitAutograd), so a call from compiled code goes dispatcher -> our function. Our ops need
    none of custom_op's per-call layers (autograd is _RoutedLoRAFn's, or registered with register_autograd), and
    they cost: a trivial op's call is 12.6 µs through custom_op against 4.5 here on the H200 host, and a stack of
    MoL layers under torch.compile's default mode took twice eager mode's step through custom_op, the same as eager
    this way (RESULTS run 26). Returns the OpOverload; register its fake kernel with ``torch.library.register_fake``."""
    def define(fn: Callable) -> torch._ops.OpOverload:
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(torch.ops.mol, name).default
    return define


@kernel_op("grouped_lora_add_fwd")
def _add_fwd(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             gates: torch.Tensor, expert_ids: torch.Tensor, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return _add_fwd_impl(base_out, x, lora_A, lora_B, gates, expert_ids, scale)


@torch.library.register_fake(_add_fwd)
def _(base_out, x, lora_A, lora_B, gates, expert_ids, scale):
    return torch.empty_like(base_out), x.new_empty((x.shape[0], lora_A.shape[0] * lora_A.shape[1]), dtype=torch.float32)


@kernel_op("grouped_lora_linear_fwd")
def _linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, gates: torch.Tensor,
                expert_ids: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_fwd_impl(x, weight, bias, lora_A, lora_B, gates, expert_ids, scale)


@torch.library.register_fake(_linear_fwd)
def _(x, weight, bias, lora_A, lora_B, gates, expert_ids, scale):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0] * lora_A.shape[1]), dtype=torch.float32))


@kernel_op("grouped_lora_bwd")
def _bwd(dy: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, gates: torch.Tensor,
         expert_ids: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _expand_bwd(dy, h, lora_B, gates, expert_ids, scale)


@torch.library.register_fake(_bwd)
def _(dy, h, lora_B, gates, expert_ids, scale):
    return (_token_minor(h.shape[0], h.shape[1], dy), dy.new_empty(h.shape),
            gates.new_empty(gates.shape, dtype=torch.float32))


def _lora_grads(saved, scale, needs, dy, weight=None, bwd=_bwd, base_mm=None):
    """Shared backward: returns (dx, dA, dB, dgates) given dy (T, out); dx includes the frozen base's dy @ weight
    when weight is given (grouped_lora_linear).

    bwd and base_mm are the custom ops when traced by torch.compile, the plain launchers in eager mode."""
    x, lora_A, lora_B, gates, ids, h = saved[:6]
    need_x, need_a, need_b, need_g = needs
    if not dy.is_contiguous():
        dy = dy.contiguous()
    dh, u, dgates = bwd(dy, h, lora_B, gates, ids, scale)
    e, rank, n_in = lora_A.shape
    dx = dA = dB = None
    with autocast_off(dy.device.type):  # a backward run inside autocast: the gradients stay in the forward's dtypes
        if need_x:
            a_cat = lora_A.reshape(e * rank, n_in)
            if weight is None:
                dx = torch.mm(dh, a_cat)
            elif _gemm_path(dy):  # the adapters' dx as extra K of the base's dx GEMM (base_gemm): one output pass
                if base_mm is None:
                    from mol.kernels.base_gemm import base_mm_op as base_mm
                dx = base_mm(dy, weight, False, dh, a_cat, False, None)
            else:  # accumulate into the base's dx buffer (one r/w pass)
                dx = torch.mm(dy, weight).addmm_(dh, a_cat)
        if need_a:
            dA = torch.mm(dh.t(), x).view(e, rank, n_in)
        if need_b:
            dB = _grad_b(dy, u, lora_B)
    return dx, dA, dB, (dgates if need_g else None)


def _add_setup(ctx, inputs, output):
    base_out, x, lora_A, lora_B, gates, expert_ids, scale = inputs
    ctx.save_for_backward(x, lora_A, lora_B, gates, expert_ids, output[1])
    ctx.scale = scale
    ctx.needs = (x.requires_grad, lora_A.requires_grad, lora_B.requires_grad, gates.requires_grad)


def _add_backward(ctx, dout, dh_unused):
    dx, dA, dB, dg = _lora_grads(ctx.saved_tensors, ctx.scale, ctx.needs, dout)
    return dout, dx, dA, dB, dg, None, None


torch.library.register_autograd(_add_fwd, _add_backward, setup_context=_add_setup)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, gates, expert_ids, scale = inputs
    ctx.save_for_backward(x, lora_A, lora_B, gates, expert_ids, output[1], weight)
    ctx.scale = scale
    ctx.needs = (x.requires_grad, lora_A.requires_grad, lora_B.requires_grad, gates.requires_grad)


def _linear_backward(ctx, dout, dh_unused):
    saved = ctx.saved_tensors
    if not dout.is_contiguous():
        dout = dout.contiguous()
    dx, dA, dB, dg = _lora_grads(saved, ctx.scale, ctx.needs, dout, saved[6])
    return dx, None, None, dA, dB, dg, None, None


torch.library.register_autograd(_linear_fwd, _linear_backward, setup_context=_linear_setup)


# ----------------------------------------------------------------------------- eager fast path

class _AddFn(torch.autograd.Function):
    """Eager twin of mol::grouped_lora_add_fwd (same impl and backward formula, no op dispatch)."""

    @staticmethod
    def forward(ctx, base_out, x, lora_A, lora_B, gates, expert_ids, scale):
        out, h = _add_fwd_impl(base_out, x, lora_A, lora_B, gates, expert_ids, scale)
        ctx.save_for_backward(x, lora_A, lora_B, gates, expert_ids, h)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        n = ctx.needs_input_grad
        dx, dA, dB, dg = _lora_grads(ctx.saved_tensors, ctx.scale, (n[1], n[2], n[3], n[4]), dout,
                                     bwd=_expand_bwd)
        return dout, dx, dA, dB, dg, None, None


class _LinearFn(torch.autograd.Function):
    """Eager twin of mol::grouped_lora_linear_fwd."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gates, expert_ids, scale):
        y, h = _linear_fwd_impl(x, weight, bias, lora_A, lora_B, gates, expert_ids, scale)
        ctx.save_for_backward(x, lora_A, lora_B, gates, expert_ids, h, weight)
        ctx.scale = scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        from mol.kernels.base_gemm import base_mm  # it imports this module

        n = ctx.needs_input_grad
        saved = ctx.saved_tensors
        if not dout.is_contiguous():
            dout = dout.contiguous()
        dx, dA, dB, dg = _lora_grads(saved, ctx.scale, (n[0], n[3], n[4], n[5]), dout, saved[6], bwd=_expand_bwd,
                                     base_mm=base_mm)
        return dx, None, None, dA, dB, dg, None, None


def _no_vmap(info, in_dims, *args):
    """The vmap rule of the Functions torch.func's transforms use (here and routed_lora's): none exists."""
    raise RuntimeError("mol: torch.func.vmap cannot batch the Triton kernels (they have no batching rule); vmap a "
                       "layer with backend='torch', or loop over the batch")


class _FuncAddFn(torch.autograd.Function):
    """mol::grouped_lora_add_fwd under torch.func's transforms (grad, jacrev, vjp over functional_call): the
    Function torch.library.register_autograd makes has no setup_context, which the transforms need."""

    forward = staticmethod(_add_fwd_impl)
    setup_context = staticmethod(_add_setup)
    backward = staticmethod(_add_backward)
    vmap = staticmethod(_no_vmap)


class _FuncLinearFn(torch.autograd.Function):
    """mol::grouped_lora_linear_fwd under torch.func's transforms (see _FuncAddFn)."""

    forward = staticmethod(_linear_fwd_impl)
    setup_context = staticmethod(_linear_setup)
    backward = staticmethod(_linear_backward)
    vmap = staticmethod(_no_vmap)


def _functorch() -> bool:
    """Whether torch.func's transforms are active (outside torch.compile, which handles them itself)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Testing/benchmark switch: False sends eager calls through the custom ops too.
EAGER_FAST_PATH = True


def _use_fast_path(*tensors: torch.Tensor) -> bool:
    """Eager plain tensors only: torch.compile/export, fake tensors, dispatch modes (make_fx,
    FlopCounter), functorch transforms and autocast all go through the registered custom ops."""
    # is_compiling first: Dynamo constant-folds it to True and never traces the rest
    return (EAGER_FAST_PATH and not torch.compiler.is_compiling()
            and all(type(t) in _PLAIN for t in tensors)
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._are_functorch_transforms_active()
            and not autocast_enabled(tensors[0].device.type))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # skip the no-op .to()/.contiguous() dispatches: each is an ATen call on the host
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _as_b(lora_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """lora_B in dtype; any layout with unit rank stride is kept (the kernels and _b_cat take its strides)."""
    if lora_B.dtype != dtype:
        lora_B = lora_B.to(dtype)
    return lora_B if lora_B.stride(2) == 1 else lora_B.contiguous()


# ----------------------------------------------------------------------------- public API

def _check(x, lora_A, lora_B, gates, expert_ids, n_out, where):
    if x.dim() != 2:
        raise ValueError(f"{where}: x must be (T, in), got shape {tuple(x.shape)}; flatten leading dims first")
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"{where}: lora_A must be (E, r, in) and lora_B (E, out, r), got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    e, rank, n_in = lora_A.shape
    if lora_B.shape != (e, n_out, rank) or n_in != x.shape[1]:
        raise ValueError(f"{where}: shape mismatch: x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, "
                         f"lora_B {tuple(lora_B.shape)}, out features {n_out}; expected lora_A "
                         f"(E, r, {x.shape[1]}) and lora_B (E, {n_out}, r)")
    if gates.shape != expert_ids.shape or gates.dim() != 2 or gates.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: gates and expert_ids must both be (T={x.shape[0]}, K), got "
                         f"{tuple(gates.shape)} and {tuple(expert_ids.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{where}: x dtype {x.dtype} unsupported; use bfloat16, float16 or float32")
    if expert_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: expert_ids must be an integer tensor (int64), got {expert_ids.dtype}")
    dev = x.device
    if lora_A.device != dev or lora_B.device != dev or gates.device != dev or expert_ids.device != dev:
        devs = {t.device for t in (x, lora_A, lora_B, gates, expert_ids)}
        raise ValueError(f"{where}: all tensors must be on one device, got {sorted(map(str, devs))}")
    if dev.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"{where}: the Triton kernels need CUDA tensors (got {x.device}); move the model "
                           "to a GPU, use the PyTorch reference (backend='torch'), or set TRITON_INTERPRET=1 "
                           "before importing mol.kernels to run them (slowly) on the CPU")


def grouped_lora_add(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, gates: torch.Tensor, expert_ids: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Return base_out + scale * sum_k gates[:,k] * B[e] (A[e] x), e = expert_ids[:,k].

    x: (T, in); base_out: (T, out) same dtype as x; lora_A: (E, r, in); lora_B: (E, out, r)
    (cast to x.dtype); gates: (T, K) float; expert_ids: (T, K) int64. Ids outside [0, E)
    contribute nothing. Differentiable in base_out, x, lora_A, lora_B and gates.
    """
    _check(x, lora_A, lora_B, gates, expert_ids, base_out.shape[-1], "grouped_lora_add")
    if base_out.shape != (x.shape[0], lora_B.shape[1]) or base_out.dtype != x.dtype:
        raise ValueError(f"grouped_lora_add: base_out must be (T, out) = {(x.shape[0], lora_B.shape[1])} "
                         f"in {x.dtype}, got {tuple(base_out.shape)} {base_out.dtype}")
    dt = x.dtype
    args = (_as(base_out, dt), _as(x, dt), _as(lora_A, dt), _as_b(lora_B, dt), _as(gates, torch.float32),
            _as(expert_ids, torch.int64), float(scale))
    if _use_fast_path(*args[:5]):
        return _AddFn.apply(*args)
    if _functorch():
        return _FuncAddFn.apply(*args)[0]
    return _add_fwd(*args)[0]


def grouped_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_A: torch.Tensor, lora_B: torch.Tensor, gates: torch.Tensor,
                        expert_ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused frozen-base + grouped LoRA: F.linear(x, weight, bias) + the grouped_lora_add delta.

    weight (out, in) and bias are treated as frozen (no gradient; an error if they require one).
    Saves one read+write pass over dx in backward by accumulating the LoRA dx into the base dx
    buffer, and the (T, out) temporary in forward.
    """
    _check(x, lora_A, lora_B, gates, expert_ids, weight.shape[0], "grouped_lora_linear")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("grouped_lora_linear: the base weight/bias must be frozen (requires_grad=False); "
                         "use F.linear + grouped_lora_add to train the base too")
    if weight.shape[1] != x.shape[1] or weight.dtype != x.dtype:
        raise ValueError(f"grouped_lora_linear: weight must be (out, {x.shape[1]}) in {x.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"grouped_lora_linear: bias must be (out,) = ({weight.shape[0]},) in {x.dtype} on "
                         f"{x.device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    dt = x.dtype
    args = (_as(x, dt), weight, bias, _as(lora_A, dt), _as_b(lora_B, dt), _as(gates, torch.float32),
            _as(expert_ids, torch.int64), float(scale))
    if _use_fast_path(args[0], weight, args[3], args[4], args[5]):
        return _LinearFn.apply(*args)
    if _functorch():
        return _FuncLinearFn.apply(*args)[0]
    return _linear_fwd(*args)[0]
