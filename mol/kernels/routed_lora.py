"""A whole routed MoL layer (router + experts + auxiliary losses) in a handful of launches.

The layer-level path MoLLinear takes on the Triton backend. What it saves over running the router module and
then the grouped-LoRA kernels: the router is scored in the same pass over x as the experts' shrink (it is E
more output columns), its softmax/top-k/renormalisation, the per-column gates and the load-balance and z-loss
statistics are one small kernel, and their backward (routing gradient *and* the auxiliary losses' gradient,
computed in closed form) is another. The router's dx and weight gradient then ride in the same cuBLAS GEMMs as
the experts' (one more row block of E rows). Nothing is read back to the host and no shape depends on data.

    T tokens, R = E*r expert columns, K experts per token, dt = x's dtype

    forward
      hl = [x_lora @ A_cat^T | x @ Wr^T]          (T, R+E) fp32      _route_shrink_kernel
      gates, ids, u, stats = route(hl[:, R:])     u = scale*g*h (dt)  _gate_fwd_kernel
      aux = lb_coef * LB + z_coef * Z             from stats          _aux_kernel
      y  = base(x) + u @ B_cat                    cuBLAS, accumulated into the base output
    forward, 1 <= T <= 16 (decode): all of the above in one launch, _small_t_kernel (its comment block says how)
    backward (dy, daux)
      du  = dy @ B_cat^T                          (T, R) fp32         grouped_lora._du_kernel
      dhl = [scale*g*du | dlogits]                (T, R+E) dt         _gate_bwd_kernel (stored token-minor)
      dx  = dy @ W + dhl @ [A_cat; Wr]            base_gemm (extra K of the base's dx GEMM) or cuBLAS
      [dA_cat; dWr] = dhl^T @ x,  dB_cat = u^T @ dy

The router scores in (close to) float32 whatever dt is: the router block of the shrink upcasts x and dots it
with the float32 router weight at tf32x3 precision (three tensor-core products, ~fp32 accuracy). Its
*backward* GEMMs run in dt like the experts' (dlogits and Wr rounded to dt for dx and dWr), which is where a
bf16 model's router gradient differs from the reference path by bf16 rounding.

Auxiliary losses, as mol.routers defines them: LB = E * sum_e f_e * P_e with f_e = counts_e / (T*K) and
P_e = mean_t p_te; Z = mean_t logsumexp(logits_t)^2. Their gradient w.r.t. the logits is
    dLB/dlogits_t = (E/T) * p_t * (f - <f, p_t>),   dZ/dlogits_t = (2/T) * lse_t * p_t.
With token weights w (0 for padding) every sum over t is weighted by w_t and T becomes n = sum_t w_t, a device
scalar the gate kernels read (the host cannot know it without a sync).
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable

import torch
import triton
import triton.language as tl

from mol.kernels import base_gemm as bg
from mol.kernels import env_flag
from mol.kernels import grouped_lora as gl

if TYPE_CHECKING:
    from mol.kernels.layer_graphs import LayerGraphs

KINDS = {"topk": 0, "switch": 1, "soft": 2}


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tile_dot(a, b, acc, F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b at the precision the data asks for (float32 data: "ieee"; the CPU interpreter mis-computes
    low-precision tl.dot, so there everything goes through float32)."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def _shrink_configs():
    if gl._INTERPRET:
        return [triton.Config({"BT": 16, "BR": 16, "BK": 16, "SPLIT": 2}, num_warps=4, num_stages=1)]
    if not env_flag("MOL_TRITON_AUTOTUNE", True):  # one safe config: fast start, no tuning
        return [triton.Config({"BT": 64, "BR": 64, "BK": 64, "SPLIT": 2}, num_warps=4, num_stages=3)]
    shapes = [(64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (64, 64, 128, 1, 4, 3), (64, 128, 64, 2, 4, 4),
              (128, 128, 64, 2, 8, 3), (16, 64, 128, 8, 4, 3), (16, 128, 64, 16, 4, 3), (16, 32, 128, 16, 4, 3),
              (32, 128, 64, 4, 4, 3)]
    return [triton.Config({"BT": bt, "BR": br, "BK": bk, "SPLIT": s}, num_warps=w, num_stages=st)
            for bt, br, bk, s, w, st in shapes]


@triton.jit
def _shrink_tile(x_ptr, xl_ptr, a_ptr, wr_ptr, out_ptr, pid_r, pid_t, pid_s, T, N_IN, R, E,
                 EP: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                 F32_DOT: tl.constexpr, IEEE: tl.constexpr, STORE: tl.constexpr, ROUTER_X2: tl.constexpr,
                 A_CAST: tl.constexpr):
    """One (BT rows, BR columns, 1/SPLIT of the input features) tile of [x_lora @ A_cat^T | x @ Wr^T] into out
    (row stride R+E): stored if STORE, else atomically added. Column tile pid_r < cdiv(R, BR) is an expert
    tile; the next one is the router's (float32 Wr, scored at ~float32 accuracy: tf32x3, or with ROUTER_X2 two
    tf32 products, see ROUTER_PRECISION). A_CAST: A_cat is float32 (adapters of a 16-bit layer), rounded to x's
    dtype as it is loaded, as torch's .to() rounds (to nearest even)."""
    n_rt = tl.cdiv(R, BR)
    ld = R + E
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    mask_t = offs_t < T
    chunk = tl.cdiv(tl.cdiv(N_IN, SPLIT), BK) * BK
    k_lo = pid_s * chunk
    k_hi = tl.minimum(k_lo + chunk, N_IN)
    if pid_r < n_rt:
        offs_r = pid_r * BR + tl.arange(0, BR)
        mask_r = offs_r < R
        x_row = xl_ptr + offs_t.to(tl.int64)[:, None] * N_IN
        a_row = a_ptr + offs_r.to(tl.int64)[None, :] * N_IN
        acc = tl.zeros((BT, BR), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + offs_k
            mk = kk < k_hi
            xt = tl.load(x_row + kk[None, :], mask=mask_t[:, None] & mk[None, :], other=0.0)
            at = tl.load(a_row + kk[:, None], mask=mk[:, None] & mask_r[None, :], other=0.0)
            if A_CAST:
                at = at.to(xl_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            acc = _tile_dot(xt, at, acc, F32_DOT, IEEE)
        ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * ld + offs_r[None, :]
        m2 = mask_t[:, None] & mask_r[None, :]
        if STORE:
            tl.store(ptrs, acc, mask=m2)
        else:
            tl.atomic_add(ptrs, acc, mask=m2)
    else:  # the router block; names differ from the expert branch's (Triton unifies same-named variables)
        offs_e = tl.arange(0, EP)
        mask_e = offs_e < E
        xr_row = x_ptr + offs_t.to(tl.int64)[:, None] * N_IN
        w_row = wr_ptr + offs_e.to(tl.int64)[None, :] * N_IN
        acc_r = tl.zeros((BT, EP), dtype=tl.float32)
        for k1 in range(k_lo, k_hi, BK):
            kr = k1 + offs_k
            mkr = kr < k_hi
            xr = tl.load(xr_row + kr[None, :], mask=mask_t[:, None] & mkr[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_row + kr[:, None], mask=mkr[:, None] & mask_e[None, :], other=0.0)
            if F32_DOT or IEEE:
                acc_r = tl.dot(xr, wt, acc_r, input_precision="ieee")
            else:
                # x is exact in tf32; Wr is split hi+lo: float32-accurate scores on tensor cores. (Measured twice
                # and dropped, RESULTS runs 7b and 9: bf16 x against Wr as three bf16 parts, the small parts in an
                # accumulator of their own, is 14 us faster alone at T=8192 but no faster in the whole layer,
                # slower at decode T=16, and 4.1e-6 worst relative logit error against tf32x3's 3.1e-7. Inside
                # the first expert tile with per-step fresh accumulators, run 12: 3.0e-7, no measured gain.)
                if ROUTER_X2:
                    # x (bf16/fp16) is exact in tf32: only Wr is split, hi (its leading 10 mantissa bits) + lo.
                    # Each step's two products start from zero and join the sum by an IEEE add, as tf32x3's do:
                    # carried through the MMA over all of K they measured 2.0e-5 worst logit error (run 11).
                    w_hi = (wt.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                    part = tl.dot(xr, wt - w_hi, tl.zeros((BT, EP), dtype=tl.float32), input_precision="tf32")
                    acc_r += tl.dot(xr, w_hi, part, input_precision="tf32")
                else:
                    acc_r = tl.dot(xr, wt, acc_r, input_precision="tf32x3")
        ptrs_r = out_ptr + offs_t.to(tl.int64)[:, None] * ld + R + offs_e[None, :]
        m2r = mask_t[:, None] & mask_e[None, :]
        if STORE:
            tl.store(ptrs_r, acc_r, mask=m2r)
        else:
            tl.atomic_add(ptrs_r, acc_r, mask=m2r)


@triton.jit
def _zero_stats(stats_ptr, E, EP: tl.constexpr):
    """Zero the gate kernel's 2E+2 routing statistics (done by the shrink's first program: a fill launch fewer)."""
    offs_z = tl.arange(0, 4 * EP)
    tl.store(stats_ptr + offs_z, tl.zeros((4 * EP,), dtype=tl.float32), mask=offs_z < 2 * E + 2)


@gl.autotune(configs=_shrink_configs(), key=["T_BUCKET", "N_IN", "R", "E", "ROUTER_X2"],
             prune_configs_by={"early_config_prune": gl._prune}, reset_to_zero=["hl_ptr"])
@triton.jit
def _route_shrink_kernel(x_ptr, xl_ptr, a_ptr, wr_ptr, hl_ptr, stats_ptr, T, N_IN, R, E, T_BUCKET,
                         EP: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                         SPLIT: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr, ROUTER_X2: tl.constexpr):
    """hl[:, :R] (+)= x_lora @ A_cat^T; hl[:, R:R+E] (+)= x @ Wr^T (float32 Wr). Row stride of hl: R+E.

    Program column pid_r < cdiv(R, BR) does an expert tile; the last column does the router. With the
    column axis fastest, the programs that share rows of x run together and reuse them from L2.
    Program (0, 0, 0) also zeroes the gate kernel's 2E+2 routing statistics (a fill launch fewer)."""
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    if (pid_r == 0) & (pid_t == 0) & (pid_s == 0):
        _zero_stats(stats_ptr, E, EP)
    _shrink_tile(x_ptr, xl_ptr, a_ptr, wr_ptr, hl_ptr, pid_r, pid_t, pid_s, T, N_IN, R, E, EP, BT, BR, BK, SPLIT,
                 F32_DOT, IEEE, SPLIT == 1, ROUTER_X2, False)


@triton.jit
def _router_parts_kernel(a_ptr, wr_ptr, out_ptr, stats_ptr, R, E, N_IN, c, NPARTS: tl.constexpr, EP: tl.constexpr,
                         BLOCK: tl.constexpr, A_CAST: tl.constexpr):
    """out (R + NPARTS*E, N_IN) in out's dtype: rows [0, R) = A_cat (A_CAST: a float32 A, rounded); row R + j*E + e
    = the j-th 16-bit part of the float32 router row Wr[e], scaled by c^j, with Wr = sum_j part_j / c^j (each
    residual is exact in float32, so the parts hold Wr's 24 bits). Program (0, 0) also zeroes the gate kernel's
    2E+2 routing statistics."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N_IN
    if (row == 0) & (tl.program_id(1) == 0):
        _zero_stats(stats_ptr, E, EP)
    dst = out_ptr + row.to(tl.int64) * N_IN + offs
    if row < R:
        a = tl.load(a_ptr + row.to(tl.int64) * N_IN + offs, mask=mask, other=0.0)
        if A_CAST:  # float32 adapters: rounded to nearest even, as torch's .to() rounds
            a = a.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(dst, a, mask=mask)
    else:
        j = (row - R) // E
        rest = tl.load(wr_ptr + ((row - R) % E).to(tl.int64) * N_IN + offs, mask=mask, other=0.0)
        # part 0, rounded to nearest, is also the backward's Wr in x's dtype (TRITON_INTERPRET truncates bf16)
        part = rest.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        out = part
        scale = 1.0  # c^(i-1)
        for i in tl.static_range(1, NPARTS):
            rest = rest - part.to(tl.float32) / scale  # what parts 0..i-1 leave of Wr: exact
            scale = scale * c
            part = (rest * scale).to(out_ptr.dtype.element_ty)
            out = tl.where(j == i, part, out)
        tl.store(dst, out, mask=mask)


@triton.jit
def _expert_onehot(offs_e, offs_c, RANK: tl.constexpr):
    """(EP, BR) float32: 1 where column c belongs to expert e."""
    return tl.where(offs_e[:, None] == (offs_c // RANK)[None, :], 1.0, 0.0)


@triton.jit
def _column_values(dense, offs_e, offs_c, RANK: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr,
                   EP: tl.constexpr, SELECT: tl.constexpr):
    """(BT, BR): dense[t, expert of column c], by a gather (SELECT) or a one-hot product (exact either way: one
    nonzero term per output)."""
    if SELECT:
        col_e = tl.minimum(offs_c // RANK, EP - 1)  # columns past R: any valid index, they are masked
        return tl.gather(dense, tl.broadcast_to(col_e[None, :], (BT, BR)), 1)
    else:
        return tl.dot(dense, _expert_onehot(offs_e, offs_c, RANK), input_precision="ieee")


@triton.jit
def _softmax_rows(logits, mask_t, mask_e):
    """Router softmax of a (BT, EP) block of logits: (probs, lse (BT,)), zero outside the valid rows/experts."""
    m2 = mask_t[:, None] & mask_e[None, :]
    logits = tl.where(mask_e[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    p = tl.exp(logits - mx[:, None])
    s = tl.sum(p, axis=1)
    probs = tl.where(m2, p / s[:, None], 0.0)
    lse = mx + tl.log(s)
    return probs, tl.where(mask_t, lse, 0.0)


@triton.jit
def _probs(hl_ptr, noise_ptr, offs_t, mask_t, offs_e, mask_e, LD, E, part_scale, HAS_NOISE: tl.constexpr,
           NPARTS: tl.constexpr = 1):
    """Router softmax of one row block of hl's logits (+ noise): (probs (BT, EP), lse (BT,)). hl's rows are LD
    floats, the logits its last E columns; NPARTS > 1: its last NPARTS * E columns are the router's partial
    scores (route_shrink_gemm), logits = sum_j part_j * part_scale^j, written back into the last E columns."""
    m2 = mask_t[:, None] & mask_e[None, :]
    row = hl_ptr + offs_t.to(tl.int64)[:, None] * LD + offs_e[None, :]
    logits = tl.load(row + (LD - E), mask=m2, other=0.0)
    if NPARTS > 1:
        # the smallest part first: each is a float32 product sum of exact 16-bit parts, added in float32
        for j in tl.static_range(NPARTS - 1):
            logits = logits * part_scale + tl.load(row + (LD - (j + 2) * E), mask=m2, other=0.0)
        tl.store(row + (LD - E), logits, mask=m2)
    if HAS_NOISE:
        logits += tl.load(noise_ptr + offs_t.to(tl.int64)[:, None] * E + offs_e[None, :], mask=m2, other=0.0)
    return _softmax_rows(logits, mask_t, mask_e)


@triton.jit
def _select_experts(probs, offs_t, mask_t, offs_e, mask_e, gates_ptr, ids_ptr, store_t,
                    K: tl.constexpr, KIND: tl.constexpr, EP: tl.constexpr, BT: tl.constexpr):
    """The routing decision of a row block: (dense (BT, EP) gate of every expert, 0 where not chosen; chosen
    (BT, EP) 0/1); gates/ids (T, K) stored for the rows where store_t. KIND 0: top-k renormalised; 1: switch
    (raw probability); 2: soft (every expert, K == E)."""
    if KIND == 2:
        dense = probs
        chosen = tl.where(mask_t[:, None] & mask_e[None, :], 1.0, 0.0)
        for k in tl.static_range(K):  # ids are 0..E-1 in order
            pk = tl.sum(tl.where(offs_e[None, :] == k, probs, 0.0), axis=1)
            tl.store(gates_ptr + offs_t.to(tl.int64) * K + k, pk, mask=store_t)
            tl.store(ids_ptr + offs_t.to(tl.int64) * K + k, tl.zeros_like(offs_t).to(tl.int64) + k, mask=store_t)
    else:
        # K rounds of "take the largest remaining probability" (lowest index on ties). Run twice: the first
        # pass finds the renormalising sum, the second stores (no re-reading of what this program wrote).
        sel = tl.where(mask_e[None, :], probs, -1.0)
        dense = tl.zeros((BT, EP), dtype=tl.float32)
        for k in tl.static_range(K):
            pk = tl.max(sel, axis=1)
            ik = tl.min(tl.where(sel == pk[:, None], offs_e[None, :], EP), axis=1)
            hit = offs_e[None, :] == ik[:, None]
            dense = tl.where(hit, pk[:, None], dense)
            sel = tl.where(hit, -2.0, sel)
        chosen = tl.where((sel == -2.0) & mask_t[:, None], 1.0, 0.0)
        denom = tl.zeros_like(offs_t).to(tl.float32) + 1.0
        if KIND == 0:
            denom = tl.sum(dense, axis=1)
            denom = tl.where(denom > 0, denom, 1.0)
            dense = dense / denom[:, None]
        sel = tl.where(mask_e[None, :], probs, -1.0)
        for k in tl.static_range(K):
            pk = tl.max(sel, axis=1)
            ik = tl.min(tl.where(sel == pk[:, None], offs_e[None, :], EP), axis=1)
            sel = tl.where(offs_e[None, :] == ik[:, None], -2.0, sel)
            tl.store(ids_ptr + offs_t.to(tl.int64) * K + k, ik.to(tl.int64), mask=store_t)
            tl.store(gates_ptr + offs_t.to(tl.int64) * K + k, pk / denom, mask=store_t)
    return dense, chosen


@triton.jit
def _aux_value(counts, prob_sums, lse_sq_sum, mask_e, c_lb, c_z):
    """aux = c_lb * <counts, prob_sums> + c_z * sum(lse^2) (the coefficients carry E, T, K and the weights)."""
    return c_lb * tl.sum(tl.where(mask_e, counts * prob_sums, 0.0), axis=0) + c_z * lse_sq_sum


@triton.jit
def _gate_fwd_kernel(hl_ptr, noise_ptr, w_ptr, n_ptr, gates_ptr, ids_ptr, u_ptr, stats_ptr, aux_ptr, scale, c_lb,
                     c_z, T, R, E, LD, part_scale, RANK: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr,
                     EP: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, HAS_NOISE: tl.constexpr,
                     HAS_W: tl.constexpr, SELECT: tl.constexpr, NPARTS: tl.constexpr):
    """Routing decision and gated shrink output for BT tokens (_gate_fwd_rows), one program per row block."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    _gate_fwd_rows(offs_t, hl_ptr, noise_ptr, w_ptr, n_ptr, gates_ptr, ids_ptr, u_ptr, stats_ptr, aux_ptr, scale,
                   c_lb, c_z, T, R, E, LD, part_scale, tl.num_programs(0), RANK, K, KIND, EP, BT, BR, HAS_NOISE,
                   HAS_W, SELECT, NPARTS)


@triton.jit
def _token_weights(w_ptr, n_ptr, offs_t, mask_t, c_lb, c_z):
    """(w (BT,), c_lb, c_z): the tokens' weights in the router losses (1 real, 0 padding) and the coefficients
    with the number of real tokens n (at n_ptr) in place of T: the host folded T = 1 into them."""
    w = tl.load(w_ptr + offs_t, mask=mask_t, other=0.0)
    n = tl.maximum(tl.load(n_ptr), 1.0)
    return w, c_lb / (n * n), c_z / n


@triton.jit
def _gate_fwd_rows(offs_t, hl_ptr, noise_ptr, w_ptr, n_ptr, gates_ptr, ids_ptr, u_ptr, stats_ptr, aux_ptr, scale,
                   c_lb, c_z, T, R, E, LD, part_scale, n_blocks, RANK: tl.constexpr, K: tl.constexpr,
                   KIND: tl.constexpr, EP: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, HAS_NOISE: tl.constexpr,
                   HAS_W: tl.constexpr, SELECT: tl.constexpr, NPARTS: tl.constexpr):
    """Routing decision and gated shrink output for the BT tokens offs_t, one of n_blocks row blocks.

    gates/ids (T, K): top-k of the softmax (KIND 0: renormalised; 1: switch, raw probability; 2: soft, every
    expert). u (T, R) = scale * gate(expert of column) * h in u's dtype. stats (2E+2, zeroed) += per-expert
    routed counts, per-expert sums of probabilities, sum of logsumexp^2 (atomics); stats[2E+1] counts finished
    row blocks, and the last one computes aux from the totals (saves a launch). hl: rows of LD floats, h in the
    first R columns, the router's NPARTS partial scores in the last NPARTS * E (see _probs). HAS_W: each token's
    statistics weighted by w_ptr[t] (0 for padding), aux normalised by their sum at n_ptr (_token_weights)."""
    offs_e = tl.arange(0, EP)
    mask_t = offs_t < T
    mask_e = offs_e < E
    probs, lse = _probs(hl_ptr, noise_ptr, offs_t, mask_t, offs_e, mask_e, LD, E, part_scale, HAS_NOISE, NPARTS)
    dense, chosen = _select_experts(probs, offs_t, mask_t, offs_e, mask_e, gates_ptr, ids_ptr, mask_t, K, KIND, EP, BT)
    for c0 in range(0, R, BR):
        offs_c = c0 + tl.arange(0, BR)
        mask_c = offs_c < R
        g = _column_values(dense, offs_e, offs_c, RANK, BT, BR, EP, SELECT)
        io = offs_t.to(tl.int64)[:, None] * LD + offs_c[None, :]
        m2 = mask_t[:, None] & mask_c[None, :]
        h = tl.load(hl_ptr + io, mask=m2, other=0.0)
        tl.store(u_ptr + offs_t.to(tl.int64)[:, None] * R + offs_c[None, :],
                 (h * g * scale).to(u_ptr.dtype.element_ty), mask=m2)
    # (without weights, the statements of the unweighted kernel exactly: its compiled code stays as measured)
    if HAS_W:
        # padding selected out, not multiplied by its weight 0: its scores may be NaN/inf (attention that leaves
        # fully masked rows NaN), and NaN * 0 would reach the statistics and the losses
        w, c_lb, c_z = _token_weights(w_ptr, n_ptr, offs_t, mask_t, c_lb, c_z)
        real = w != 0
        tl.atomic_add(stats_ptr + offs_e, tl.sum(chosen * w[:, None], axis=0), mask=mask_e)
        tl.atomic_add(stats_ptr + E + offs_e, tl.sum(tl.where(real[:, None], probs * w[:, None], 0.0), axis=0),
                      mask=mask_e)
        tl.atomic_add(stats_ptr + 2 * E, tl.sum(tl.where(real, lse * lse * w, 0.0), axis=0))
    else:
        tl.atomic_add(stats_ptr + offs_e, tl.sum(chosen, axis=0), mask=mask_e)
        tl.atomic_add(stats_ptr + E + offs_e, tl.sum(probs, axis=0), mask=mask_e)
        tl.atomic_add(stats_ptr + 2 * E, tl.sum(lse * lse, axis=0))
    # acq_rel: this block's adds above are visible before its ticket; the last block's reads see them all
    ticket = tl.atomic_add(stats_ptr + 2 * E + 1, 1.0, sem="acq_rel")
    if ticket == n_blocks - 1:
        _aux_from_stats(stats_ptr, aux_ptr, E, c_lb, c_z, EP)


@triton.jit
def _aux_from_stats(stats_ptr, aux_ptr, E, c_lb, c_z, EP: tl.constexpr):
    """aux (_aux_value) from the accumulated stats. Reads through L2 (atomic adds of 0): other programs'
    atomics never pass through this SM's L1."""
    offs = tl.arange(0, EP)
    m = offs < E
    cnt = tl.atomic_add(stats_ptr + offs, tl.zeros((EP,), dtype=tl.float32), mask=m, sem="relaxed")
    ps = tl.atomic_add(stats_ptr + E + offs, tl.zeros((EP,), dtype=tl.float32), mask=m, sem="relaxed")
    z = tl.atomic_add(stats_ptr + 2 * E, 0.0, sem="relaxed")
    tl.store(aux_ptr, _aux_value(cnt, ps, z, m, c_lb, c_z))


@triton.jit
def _aux_kernel(stats_ptr, aux_ptr, E, c_lb, c_z, EP: tl.constexpr):
    """aux from zero tokens' stats (T == 0: the gate kernel has no program to do it; with or without token
    weights, the statistics are zero and so is aux)."""
    _aux_from_stats(stats_ptr, aux_ptr, E, c_lb, c_z, EP)


@triton.jit
def _gate_bwd_kernel(du_ptr, hl_ptr, noise_ptr, w_ptr, n_ptr, gates_ptr, ids_ptr, stats_ptr, daux_ptr, dhl_ptr,
                     scale, c_lb, c_z, T, R, E, LD, SDT, SDC,
                     RANK: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr, EP: tl.constexpr,
                     BT: tl.constexpr, BR: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_AUX: tl.constexpr,
                     HAS_W: tl.constexpr, SELECT: tl.constexpr):
    """The gate backward (_gate_bwd_rows) of BT tokens, one program per row block."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    _gate_bwd_rows(offs_t, du_ptr, hl_ptr, noise_ptr, w_ptr, n_ptr, gates_ptr, ids_ptr, stats_ptr, daux_ptr, dhl_ptr,
                   scale, c_lb, c_z, T, R, E, LD, SDT, SDC, RANK, K, KIND, EP, BT, BR, HAS_NOISE, HAS_AUX, HAS_W,
                   SELECT)


@triton.jit
def _gate_bwd_rows(offs_t, du_ptr, hl_ptr, noise_ptr, w_ptr, n_ptr, gates_ptr, ids_ptr, stats_ptr, daux_ptr,
                   dhl_ptr, scale, c_lb, c_z, T, R, E, LD, SDT, SDC,
                   RANK: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr, EP: tl.constexpr,
                   BT: tl.constexpr, BR: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_AUX: tl.constexpr,
                   HAS_W: tl.constexpr, SELECT: tl.constexpr):
    """For the BT tokens offs_t: dhl[:, :R] = scale * g * du (the shrink's output gradient); dhl[:, R:] = d loss /
    d logits, through the gate selection and, when HAS_AUX, the auxiliary losses (c_lb = lb_coef*E/(T*T*K) and
    c_z = 2*z_coef/T, scaled by daux). Row stride of hl: LD (its logits in the last E columns, as the gate
    forward left them); dhl's strides: SDT a token, SDC a column. HAS_W: the auxiliary losses weight token t by
    w_ptr[t] and normalise by their sum (see _gate_fwd_rows); the routing gradient itself is every token's."""
    offs_e = tl.arange(0, EP)
    mask_t = offs_t < T
    mask_e = offs_e < E
    dhl_rows = dhl_ptr + offs_t.to(tl.int64)[:, None] * SDT
    probs, lse = _probs(hl_ptr, noise_ptr, offs_t, mask_t, offs_e, mask_e, LD, E, 1.0, HAS_NOISE)
    dense = tl.zeros((BT, EP), dtype=tl.float32)
    chosen = tl.zeros((BT, EP), dtype=tl.float32)
    for k in tl.static_range(K):
        ik = tl.load(ids_ptr + offs_t.to(tl.int64) * K + k, mask=mask_t, other=-1)
        gk = tl.load(gates_ptr + offs_t.to(tl.int64) * K + k, mask=mask_t, other=0.0)
        hit = offs_e[None, :] == ik[:, None]
        dense = tl.where(hit, gk[:, None], dense)
        chosen = tl.where(hit, 1.0, chosen)
    # dgates for every expert (only chosen ones are used): dg[t, e] = scale * sum_{c of e} du * h
    dg = tl.zeros((BT, EP), dtype=tl.float32)
    for c0 in range(0, R, BR):
        offs_c = c0 + tl.arange(0, BR)
        mask_c = offs_c < R
        m2 = mask_t[:, None] & mask_c[None, :]
        du = tl.load(du_ptr + offs_t.to(tl.int64)[:, None] * R + offs_c[None, :], mask=m2, other=0.0)
        h = tl.load(hl_ptr + offs_t.to(tl.int64)[:, None] * LD + offs_c[None, :], mask=m2, other=0.0)
        g = _column_values(dense, offs_e, offs_c, RANK, BT, BR, EP, SELECT)
        tl.store(dhl_rows + offs_c.to(tl.int64)[None, :] * SDC, (du * g * scale).to(dhl_ptr.dtype.element_ty), mask=m2)
        duh = du * h
        if SELECT and KIND != 2:
            # only the K chosen experts' dgates are used (top-k / switch): K masked row sums
            col_e = (offs_c // RANK)[None, :]
            for k in tl.static_range(K):
                ik = tl.load(ids_ptr + offs_t.to(tl.int64) * K + k, mask=mask_t, other=-1)
                dgk = tl.sum(tl.where(col_e == ik[:, None], duh, 0.0), axis=1)
                dg += tl.where(offs_e[None, :] == ik[:, None], dgk[:, None], 0.0)
        else:
            dg += tl.dot(duh, tl.trans(_expert_onehot(offs_e, offs_c, RANK)), input_precision="ieee")
    dg = dg * scale
    # gates -> probabilities
    if KIND == 0:  # g_k = p_k / S over the chosen set
        s = tl.sum(probs * chosen, axis=1)
        s = tl.where(s > 0, s, 1.0)
        dp = chosen * (dg - tl.sum(dg * dense, axis=1)[:, None]) / s[:, None]
    elif KIND == 1:
        dp = chosen * dg
    else:
        dp = dg
    if HAS_AUX:
        daux = tl.load(daux_ptr)
        cnt = tl.load(stats_ptr + offs_e, mask=mask_e, other=0.0)
        if HAS_W:  # each token's share of the losses, times its weight
            w, c_lb, c_z = _token_weights(w_ptr, n_ptr, offs_t, mask_t, c_lb, c_z)
            dp += ((daux * c_lb) * w)[:, None] * cnt[None, :]
        else:
            dp += (daux * c_lb) * cnt[None, :]
    # probabilities -> logits (softmax Jacobian), plus the z-loss term
    dlogits = probs * (dp - tl.sum(dp * probs, axis=1)[:, None])
    if HAS_AUX:
        if HAS_W:  # selected, as in the forward (a padding row's own routing gradient is NaN with its scores)
            dlogits += tl.where((w != 0)[:, None], ((daux * c_z) * w)[:, None] * lse[:, None] * probs, 0.0)
        else:
            dlogits += (daux * c_z) * lse[:, None] * probs
    tl.store(dhl_rows + (R + offs_e).to(tl.int64)[None, :] * SDC, dlogits.to(dhl_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_e[None, :])


# ----------------------------------------------------------------------------- small T (decode): one launch
#
# For T <= 16 the layer is a GEMV that reads W once, and the router and experts are tiny next to it but form a
# chain (shrink -> route -> expand) that costs a launch and an L2 round trip per step. One kernel runs all of it:
# the lowest program ids compute the shrink (split-K partial sums, added with float32 atomics into one zeroed
# accumulator) and the last of them to finish routes the T tokens (atomic ticket) and raises a flag; every other
# program streams its BN rows of W first and waits for the flag only before adding its experts' columns, so the
# routing chain hides behind the GEMV. Progress holds because programs start in id order (as CUB's decoupled
# look-back scan relies on): the producers are resident before any consumer spins.
# The chain is the critical path (benchmarks/probe_small_t.py --timeline, RESULTS run 8), so it keeps its L2 round
# trips few: the routing program reads one accumulated (T, R+E) tile rather than a partial sum per split, and
# the consumers poll the flag with plain loads (atomics from hundreds of programs on one address contend).

@triton.jit
def _route_small(acc_ptr, noise_ptr, hl_ptr, gates_ptr, ids_ptr, u_ptr, stats_ptr, aux_ptr, scale, c_lb, c_z,
                 T, R, E, RANK: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr,
                 EP: tl.constexpr, BR: tl.constexpr, HAS_NOISE: tl.constexpr):
    """Route T <= 16 tokens in one program from the shrink's accumulator (read through L2: other SMs added into
    it): hl = a copy of it, gates/ids, u = scale * gate * h, the statistics and the aux loss."""
    BT: tl.constexpr = 16
    offs_t = tl.arange(0, BT)
    offs_e = tl.arange(0, EP)
    mask_t = offs_t < T
    mask_e = offs_e < E
    ld = R + E
    row = offs_t.to(tl.int64)[:, None] * ld
    m2e = mask_t[:, None] & mask_e[None, :]
    logits = tl.load(acc_ptr + row + R + offs_e[None, :], mask=m2e, other=0.0, cache_modifier=".cg")
    tl.store(hl_ptr + row + R + offs_e[None, :], logits, mask=m2e)
    if HAS_NOISE:
        logits += tl.load(noise_ptr + offs_t.to(tl.int64)[:, None] * E + offs_e[None, :], mask=m2e, other=0.0)
    probs, lse = _softmax_rows(logits, mask_t, mask_e)
    dense, chosen = _select_experts(probs, offs_t, mask_t, offs_e, mask_e, gates_ptr, ids_ptr, mask_t, K, KIND, EP, BT)
    cnt = tl.sum(chosen, axis=0)
    psum = tl.sum(probs, axis=0)
    z = tl.sum(lse * lse, axis=0)
    tl.store(stats_ptr + offs_e, cnt, mask=mask_e)
    tl.store(stats_ptr + E + offs_e, psum, mask=mask_e)
    tl.store(stats_ptr + 2 * E, z)
    tl.store(stats_ptr + 2 * E + 1, 1.0)  # the gate kernel's program counter: one program did it all
    tl.store(aux_ptr, _aux_value(cnt, psum, z, mask_e, c_lb, c_z))
    for c0 in range(0, R, BR):
        offs_c = c0 + tl.arange(0, BR)
        m2c = mask_t[:, None] & (offs_c < R)[None, :]
        h = tl.load(acc_ptr + row + offs_c[None, :], mask=m2c, other=0.0, cache_modifier=".cg")
        g = tl.dot(dense, _expert_onehot(offs_e, offs_c, RANK), input_precision="ieee")
        tl.store(hl_ptr + row + offs_c[None, :], h, mask=m2c)
        tl.store(u_ptr + offs_t.to(tl.int64)[:, None] * R + offs_c[None, :],
                 (h * g * scale).to(u_ptr.dtype.element_ty), mask=m2c)


@triton.jit
def _zero_rows(ptr, T, LD, BC: tl.constexpr):
    """ptr[:T, :LD] = 0 for a (T <= 16, LD) row-major float32 buffer."""
    offs_t = tl.arange(0, 16)
    for c0 in range(0, LD, BC):
        offs_c = c0 + tl.arange(0, BC)
        tl.store(ptr + offs_t.to(tl.int64)[:, None] * LD + offs_c[None, :], tl.zeros((16, BC), dtype=tl.float32),
                 mask=(offs_t < T)[:, None] & (offs_c < LD)[None, :])


@triton.jit
def _stamp(prof_ptr, pid, i: tl.constexpr):
    """prof[pid, i] = the GPU's global nanosecond timer (benchmarks/probe_small_t.py --timeline reads it)."""
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(prof_ptr + pid * 4 + i, t)


@triton.jit
def _small_t_kernel(x_ptr, xl_ptr, a_ptr, wr_ptr, acc_ptr, sync_ptr, noise_ptr, w_ptr, bias_ptr, base_ptr, b_ptr,
                    y_ptr, hl_ptr, gates_ptr, ids_ptr, u_ptr, stats_ptr, aux_ptr, prof_ptr,
                    scale, c_lb, c_z, T, N_IN, N_OUT, R, E, stride_be, stride_bn,
                    N_PART: tl.constexpr, RANK: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr,
                    EP: tl.constexpr, BRS: tl.constexpr, BKS: tl.constexpr, BR: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, FMA: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
                    PROF: tl.constexpr, ROUTER_X2: tl.constexpr, A_CAST: tl.constexpr, B_CAST: tl.constexpr):
    """The routed layer's whole forward for T <= 16 tokens. Programs [0, n_shrink): shrink tiles (BRS columns,
    1/N_PART of the features each) added into acc (T, R+E) float32, then the last one routes (_route_small) and
    sets sync[1]. The others: y[:, BN rows] = x @ W[rows]^T (or base_out) + u @ B_cat[:, rows] (+ bias), the
    experts after sync[1] is set. sync (3,) int32 and acc must be zero, and the kernel leaves them zero (the
    routing program clears acc and the ticket, the last consumer the flag and its counter: _small_t_work). FMA
    (T == 1): float32 multiply-adds on one row of x; else tl.dot with x as the 16-row A operand (mma.sync), or,
    for BN >= 64, the W tile as the A operand (wgmma takes M = 64) and the transposed product. PROF: write a
    timeline (see _stamp) to prof (grid, 4) int64. A_CAST / B_CAST: A / B are float32 (adapters of a 16-bit layer),
    rounded to x's dtype as they are loaded, as a cast before the launch would round them."""
    BT: tl.constexpr = 16
    W_AS_A: tl.constexpr = BN >= 64
    pid = tl.program_id(0)
    if PROF:
        _stamp(prof_ptr, pid, 0)
    n_cols = tl.cdiv(R, BRS) + 1
    n_shrink = n_cols * N_PART
    if pid < n_shrink:
        pid_s = pid // n_cols
        _shrink_tile(x_ptr, xl_ptr, a_ptr, wr_ptr, acc_ptr, pid % n_cols, 0, pid_s, T, N_IN,
                     R, E, EP, BT, BRS, BKS, N_PART, F32_DOT, IEEE, N_PART == 1, ROUTER_X2, A_CAST)
        tl.debug_barrier()  # every thread's partial sums are added before the ticket releases them
        if PROF:
            _stamp(prof_ptr, pid, 1)
        ticket = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
        if ticket == n_shrink - 1:
            tl.debug_barrier()
            if PROF:
                _stamp(prof_ptr, pid, 2)
            _route_small(acc_ptr, noise_ptr, hl_ptr, gates_ptr, ids_ptr, u_ptr, stats_ptr, aux_ptr, scale, c_lb,
                         c_z, T, R, E, RANK, K, KIND, EP, BR, HAS_NOISE)
            tl.debug_barrier()  # all of acc is read (a thread may load an element another thread stores)
            _zero_rows(acc_ptr, T, R + E, BR)  # left zero for the next launch, as the ticket:
            tl.store(sync_ptr, 0)  # every shrink program has drawn its ticket
            tl.debug_barrier()
            tl.atomic_xchg(sync_ptr + 1, 1, sem="release")
            if PROF:
                _stamp(prof_ptr, pid, 3)
    else:
        offs_t = tl.arange(0, BT)
        mask_t = offs_t < T
        offs_n = (pid - n_shrink) * BN + tl.arange(0, BN)
        mask_n = offs_n < N_OUT
        offs_k = tl.arange(0, BK)
        if FMA:
            acc1 = tl.zeros((BN,), dtype=tl.float32)
        elif W_AS_A:
            acc_t = tl.zeros((BN, BT), dtype=tl.float32)
        else:
            acc = tl.zeros((BT, BN), dtype=tl.float32)
        if HAS_W:  # the frozen base, W (N_OUT, N_IN) row-major
            w_row = w_ptr + offs_n.to(tl.int64) * N_IN
            for k0 in range(0, N_IN, BK):
                kk = k0 + offs_k
                mk = kk < N_IN
                if FMA:
                    xv = tl.load(x_ptr + kk, mask=mk, other=0.0).to(tl.float32)
                    wt = tl.load(w_row[:, None] + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
                    acc1 += tl.sum(wt.to(tl.float32) * xv[None, :], axis=1)
                elif W_AS_A:
                    xt = tl.load(x_ptr + offs_t.to(tl.int64)[None, :] * N_IN + kk[:, None],
                                 mask=mk[:, None] & mask_t[None, :], other=0.0)
                    wt = tl.load(w_row[:, None] + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
                    acc_t = _tile_dot(wt, xt, acc_t, F32_DOT, IEEE)
                else:
                    xt = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * N_IN + kk[None, :],
                                 mask=mask_t[:, None] & mk[None, :], other=0.0)
                    wt = tl.load(w_row[None, :] + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
                    acc = _tile_dot(xt, wt, acc, F32_DOT, IEEE)
        if PROF:
            _stamp(prof_ptr, pid, 1)
        ready = tl.load(sync_ptr + 1, volatile=True)
        while ready == 0:
            ready = tl.load(sync_ptr + 1, volatile=True)
        tl.atomic_add(sync_ptr + 1, 0, sem="acquire")  # orders the reads of u after the flag
        tl.debug_barrier()  # no thread reads u before the flag was seen
        if PROF:
            _stamp(prof_ptr, pid, 2)
        for c0 in range(0, R, BR):  # the experts: B_cat[c, n] = B[c // RANK, n, c % RANK]
            offs_c = c0 + tl.arange(0, BR)
            mask_c = offs_c < R
            bt = tl.load(b_ptr + (offs_c // RANK).to(tl.int64)[:, None] * stride_be + offs_n[None, :] * stride_bn
                         + (offs_c % RANK)[:, None], mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            if B_CAST:
                bt = bt.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            if FMA:
                u0 = tl.load(u_ptr + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg").to(tl.float32)
                acc1 += tl.sum(u0[:, None] * bt.to(tl.float32), axis=0)
            elif W_AS_A:
                u_t = tl.load(u_ptr + offs_t.to(tl.int64)[None, :] * R + offs_c[:, None],
                              mask=mask_c[:, None] & mask_t[None, :], other=0.0, cache_modifier=".cg")
                acc_t = _tile_dot(tl.trans(bt), u_t, acc_t, F32_DOT, IEEE)
            else:
                u = tl.load(u_ptr + offs_t.to(tl.int64)[:, None] * R + offs_c[None, :],
                            mask=mask_t[:, None] & mask_c[None, :], other=0.0, cache_modifier=".cg")
                acc = _tile_dot(u, bt, acc, F32_DOT, IEEE)
        if FMA:
            if HAS_BIAS:
                acc1 += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if not HAS_W:
                acc1 += tl.load(base_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, acc1.to(y_ptr.dtype.element_ty), mask=mask_n)
        else:
            if W_AS_A:
                acc = tl.trans(acc_t)
            io = offs_t.to(tl.int64)[:, None] * N_OUT + offs_n[None, :]
            m2n = mask_t[:, None] & mask_n[None, :]
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if not HAS_W:
                acc += tl.load(base_ptr + io, mask=m2n, other=0.0).to(tl.float32)
            tl.store(y_ptr + io, acc.to(y_ptr.dtype.element_ty), mask=m2n)
        # the last consumer lowers the flag and its own counter: every consumer counted has seen the flag, so
        # none spins on it any more, and the next launch finds sync zero
        tl.debug_barrier()
        done = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if done == tl.num_programs(0) - n_shrink - 1:
            tl.store(sync_ptr + 2, 0)
            tl.store(sync_ptr + 1, 0)
        if PROF:
            _stamp(prof_ptr, pid, 3)


def _small_t_configs(fma: bool) -> list[triton.Config]:
    if gl._INTERPRET:
        return [triton.Config({"BN": 16, "BK": 16}, num_warps=4, num_stages=1)]
    if not env_flag("MOL_TRITON_AUTOTUNE", True):
        return [triton.Config({"BN": 16 if fma else 32, "BK": 512 if fma else 256}, num_warps=4, num_stages=3)]
    # FMA: a warp spans BK elements of one row (16 B per thread at BK=256), BN rows per program; more, smaller
    # programs keep every SM streaming W. Dot: BN=16..32 with x as the A operand, 64 with the W tile as A.
    shapes = ([(8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3)]
              if fma else
              [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 8, 3),
               (16, 512, 4, 3)])
    configs = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st) for bn, bk, w, st in shapes]
    # Uncapped, every config takes 255 registers a thread (the shrink and routing branches; the GEMV alone needs
    # ~150), so an SM holds two 4-warp programs: at 4096x4096, 80 shrink + 256 GEMV programs run in two waves
    # and the last GEMV programs start only when the shrink programs end (~5 us in). Capped at 168, three fit and
    # all start at once: T = 1 took 14.5 against 15.9 us on an H200 (RESULTS run 30). The dot path (T > 1) waits
    # on the routing chain, whose spills the cap lengthens: no capped config was faster there, none is listed.
    if fma:
        configs += [triton.Config({"BN": bn, "BK": bk}, num_warps=4, num_stages=3, maxnreg=168)
                    for bn, bk in ((16, 512), (32, 256))]
    return configs


# every launch leaves sync and acc zero (_small_t_work); they are also zeroed before each autotuning trial, so
# no trial's result rests on an earlier config's clean-up
_SMALL_T_KEY = ["N_IN", "N_OUT", "R", "E", "ROUTER_X2"]
# timed under CUDA-graph replay, as decode runs it (gl.bench_graphed; the zero-fills are captured with each trial)
_small_t_fma = gl.autotune(configs=_small_t_configs(True), key=_SMALL_T_KEY, do_bench=gl.bench_graphed,
                           reset_to_zero=["sync_ptr", "acc_ptr"])(_small_t_kernel)
_small_t_dot = gl.autotune(configs=_small_t_configs(False), key=_SMALL_T_KEY, do_bench=gl.bench_graphed,
                           reset_to_zero=["sync_ptr", "acc_ptr"])(_small_t_kernel)


# ----------------------------------------------------------------------------- launchers

def _aux_coefs(lb_coef: float, z_coef: float, e: int, t: int, top_k: int, weighted: bool = False
               ) -> tuple[float, float]:
    """(c_lb, c_z) of _aux_value: the load-balance and z-loss weights with E, T and K folded in (weighted, with
    token weights: T as 1, for the gate kernels divide by the real tokens' count, _token_weights)."""
    t = 1 if weighted else max(t, 1)
    return float(lb_coef * e / (t * t * top_k)), float(z_coef / t)


def _ep(e: int) -> int:
    return max(16, gl._pow2(e))


def _row_block(r_tot: int, ep: int) -> tuple[int, int]:
    br = min(128, max(16, gl._pow2(r_tot)))
    bt = 16 if gl._INTERPRET else (32 if max(br, ep) <= 64 else 16)
    return bt, br


# How the router block scores bf16/fp16 x against the float32 router weight on the GPU, at ~float32 accuracy:
# "tf32x3" (Triton's three tf32 products, 3.1e-7 worst relative logit error against float64 on an H200) or
# "tf32x2" (Wr split in two tf32 parts, x exact in tf32; 3.8e-7). tf32x2 runs the shrink + router alone in 54.8
# against 66.9 us, yet the whole layer was 7-10 us slower with it in both runs that compared them (RESULTS run 12),
# so tf32x3 stays the default. (A third form, the router inside the first expert tile against Wr in three bf16
# parts, read x once but took 119 us under a tile tuned for the other forms, and its whole layer tuned for itself
# was within the spread between machines, run 12; removed.) MOL_ROUTER_PRECISION sets it at import.
ROUTER_PRECISION = os.environ.get("MOL_ROUTER_PRECISION", "tf32x3")
_ROUTER_PRECISIONS = ("tf32x3", "tf32x2")

# How the gate kernels move values between experts and their columns: "select" (a gather for the per-column
# gates; for top-k / switch, K masked row sums for dgates) or "onehot" (a tl.dot with a one-hot matrix). In the
# sm_90 SASS, "select" needs 5-25 KB less shared memory and ~10x fewer FFMAs (RESULTS, compiler report of the gate
# kernels). Alone at T=8192 on an H200 (RESULTS run 21) its gate backward at 4 warps takes 16.7 against 24.9 us
# (E=8 top-2 r=16) and 19.1 against 66.2 (E=32 top-4 r=8), the forward 12.1 against 19.3 and 14.6 against 21.3;
# the whole layer, interleaved under CUDA graphs, is 3-14 us faster in all four issue-3 cases (T=8192 and 2048,
# 4096->14336, E=32). It became the default then; before, with the one-hot form's 2-warp backward, it had measured
# no whole-layer gain (runs 14-15). MOL_GATE_COLUMNS sets it at import.
GATE_COLUMNS = os.environ.get("MOL_GATE_COLUMNS", "select")
_GATE_COLUMN_CHOICES = ("onehot", "select")

# How the large-T forward computes hl = [x A_cat^T | x Wr^T] for bf16 / fp16 x: "gemm" (one cuBLAS GEMM against
# [A_cat; Wr's 16-bit parts], route_shrink_gemm) or "triton" (_route_shrink_kernel, router at ROUTER_PRECISION).
# The GEMM path needs torch.mm(out_dtype=) (torch >= 2.8) and x_lora None (no dropout); elsewhere, and for float32
# x, the Triton kernel runs. Measured alone on an H200 (RESULTS run 15): 28.9 against 67.0 us at T=8192 E=8 r=16,
# 39.0 against 121.2 at E=32 r=8, 14.9 against 50.0 at T=2048; worst logit error 4.7-5.6e-6 of the largest logit
# against float64 at 4096 features, 1.2e-5 at 11008 (the tensor cores' float32 accumulation; tf32x3: 3.6e-7, a
# float32 cuBLAS GEMM: 7.1e-7). The whole layer, interleaved under CUDA graphs (run 16): 1028 against 1056 us at
# T=8192, 285 against 318 at T=2048, QLoRA-MoL 1052 against 1093. MOL_SHRINK sets it at import.
SHRINK = os.environ.get("MOL_SHRINK", "gemm")
_SHRINK_CHOICES = ("gemm", "triton")
ROUTER_PARTS = 3  # 16-bit parts of Wr in the GEMM: 3 hold float32's 24 bits in bf16 (2 hold 16: 3.6e-6 off)


def _setting(name: str, choices: tuple[str, ...]) -> str:
    """The value of this module's switch `name` (read at call time, so tests and benchmarks may set it)."""
    value = globals()[name]
    if value not in choices:
        raise ValueError(f"mol.kernels.routed_lora.{name}={value!r}; use one of {choices}")
    return value


def _router_x2() -> bool:
    return _setting("ROUTER_PRECISION", _ROUTER_PRECISIONS) == "tf32x2"


def _gate_select() -> bool:
    return _setting("GATE_COLUMNS", _GATE_COLUMN_CHOICES) == "select"


def _shrink_by_gemm(x: torch.Tensor, x_lora: torch.Tensor | None) -> bool:
    """Whether route_shrink runs as one GEMM (route_shrink_gemm): decided from metadata only, so the custom op's
    fake kernel makes the same choice."""
    if _setting("SHRINK", _SHRINK_CHOICES) != "gemm" or x_lora is not None or x.shape[0] == 0:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return gl._INTERPRET or (x.device.type == "cuda" and gl._MM_OUT_DTYPE)


def _part_scale(dtype: torch.dtype) -> float:
    """c of route_shrink_gemm's parts (Wr = sum_j part_j / c^j): fp16's narrow exponent range would flush the
    small parts to zero unscaled; bf16 has float32's."""
    return 1.0 if dtype == torch.bfloat16 else 2.0 ** 11


def route_shrink_gemm(x: torch.Tensor, a_cat: torch.Tensor, router_w: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hl (T, R + ROUTER_PARTS*E) float32 = x @ [A_cat; parts of Wr]^T, one pass over x (cuBLAS, float32
    accumulation and output) instead of the Triton kernel's two column groups; the gate forward adds the parts
    into hl's last E columns, which from then on hold the logits. stats: (2E+2,) zeros. w_dx: the operand's
    first R+E rows, [A_cat; Wr rounded to x's dtype] (the first part is that rounding), which is what the
    backward's dx = dhl @ [A_cat; Wr] multiplies by: kept, it saves the backward a cat and a cast."""
    r_tot, n_in = a_cat.shape
    e = router_w.shape[0]
    n_parts = ROUTER_PARTS
    w_ext = gl._alloc((r_tot + n_parts * e, n_in), x)
    stats = torch.empty(2 * e + 2, device=x.device, dtype=torch.float32)
    block = 1024 if not gl._INTERPRET else 64
    # one launch builds the operand and zeroes stats
    _router_parts_kernel[(r_tot + n_parts * e, gl._cdiv(n_in, block))](
        a_cat, router_w, w_ext, stats, r_tot, e, n_in, _part_scale(x.dtype), NPARTS=n_parts, EP=_ep(e), BLOCK=block,
        A_CAST=a_cat.dtype != x.dtype)
    return gl._mm_f32(x, w_ext.t()), stats, w_ext[:r_tot + e]


def route_shrink_impl(x: torch.Tensor, x_lora: torch.Tensor | None, a_cat: torch.Tensor,
                      router_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hl (T, R+E) float32: the experts' shrink of x_lora (x when None) and the router's logits of x (with
    SHRINK="gemm" for bf16/fp16 x: (T, R + ROUTER_PARTS*E), see route_shrink_gemm); stats (2E+2,) float32
    zeros, for the gate kernel to accumulate into; and the backward's dx operand [A_cat; Wr in x's dtype]
    (R+E, in) where the GEMM path built it, else an empty (0, in) tensor (the backward then builds it)."""
    if _shrink_by_gemm(x, x_lora):
        return route_shrink_gemm(x, a_cat, router_w)
    t, n_in = x.shape
    r_tot, e = a_cat.shape[0], router_w.shape[0]
    bucket = gl._t_bucket(t)
    router_x2 = _router_x2()
    # the router's precision is part of the key: each form is tuned for itself (run 12 compared them under one
    # shared choice, whichever ran first)
    key = ("route_shrink", bucket, n_in, r_tot, e, x.dtype, router_x2)
    hl = gl._accumulator(t, r_tot + e, x, key)
    no_operand = x.new_empty((0, n_in))
    if t == 0:
        return hl, torch.zeros(2 * e + 2, device=x.device, dtype=torch.float32), no_operand
    stats = torch.empty(2 * e + 2, device=x.device, dtype=torch.float32)

    def grid(m):
        return (gl._cdiv(r_tot, m["BR"]) + 1, gl._cdiv(t, m["BT"]), m["SPLIT"])
    gl._launch(_route_shrink_kernel, key, grid,
               (x, x if x_lora is None else x_lora, a_cat, router_w, hl, stats, t, n_in, r_tot, e, bucket),
               {"EP": _ep(e), "ROUTER_X2": router_x2, **gl._flags(x.dtype)})
    return hl, stats, no_operand


def gate_fwd_impl(hl: torch.Tensor, stats: torch.Tensor, noise: torch.Tensor | None, r_tot: int, rank: int,
                  kind: int, top_k: int, scale: float, dtype: torch.dtype, lb_coef: float, z_coef: float,
                  token_w: torch.Tensor | None = None, n_real: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gates (T,K) fp32, ids (T,K) int64, u (T,R) dtype, aux () fp32); accumulates into the zeroed stats
    (2E+2,) fp32: per-expert counts, per-expert prob sums, sum of logsumexp^2, the kernel's program counter.
    token_w (T,) fp32 with n_real = its sum (): the statistics and aux count token t with weight token_w[t]
    (0 for padding), normalised by n_real instead of T."""
    t = hl.shape[0]
    e = r_tot // rank
    n_parts = (hl.shape[1] - r_tot) // e
    gates = gl._alloc((t, top_k), hl)
    ids = gl._alloc((t, top_k), hl, torch.int64)
    u = gl._alloc((t, r_tot), hl, dtype)
    aux = gl._alloc((), hl)
    ep = _ep(e)
    has_w = token_w is not None
    c_lb, c_z = _aux_coefs(lb_coef, z_coef, e, t, top_k, has_w)
    if t > 0:
        bt, br = _row_block(r_tot, ep)
        _gate_fwd_kernel[(gl._cdiv(t, bt),)](hl, hl if noise is None else noise, token_w if has_w else hl,
                                             n_real if has_w else hl, gates, ids, u, stats, aux,
                                             float(scale), c_lb, c_z, t, r_tot, e, hl.shape[1],
                                             1.0 / _part_scale(dtype), RANK=rank, K=top_k, KIND=kind,
                                             EP=ep, BT=bt, BR=br, HAS_NOISE=noise is not None, HAS_W=has_w,
                                             SELECT=_gate_select(), NPARTS=n_parts)
    else:
        _aux_kernel[(1,)](stats, aux, e, c_lb, c_z, EP=ep)
    return gates, ids, u, aux


def _gate_bwd_tile(r_tot: int, ep: int, select: bool) -> tuple[int, int, int]:
    """(BT, BR, warps) of the gate backward. Select: 16 rows, at most 64 columns a step, 4 warps. The (16, 128)
    tile held 237 registers a thread (ncu: two waves of programs at 12.5% occupancy, T=8192; (16, 64): 123
    registers, 7.7 against 10.8 us in the layer's step); alone, under
    do_bench with L2 flushed, (16, 64) runs 10.1-10.6 us against 14.1-15.7 at E=8 top-2 r=16 and 15.2-15.3 against
    17.8-19.0 at E=32 top-4 r=8 (H200, RESULTS run 29). One-hot columns: the forward's tile, 2 warps at 16 rows
    (22.8-22.9 against 26.6-27.0 us with 4, runs 11 and 12)."""
    bt, br = _row_block(r_tot, ep)
    if select:
        return 16, min(br, 64), 4
    return bt, br, 2 if bt == 16 else 4


# How the gate backward stores dhl (T, R+E): True, token-minor (grouped_lora._token_minor), else row-major.
# Token-minor, the weight-gradient GEMM [dA; dWr] = dhl^T x reads a row-major dhl^T, which cuBLAS runs 14-16%
# faster than the transposed view of a row-major dhl (H200, R+E = 136: 32.4 against 37.6 us at T=8192, 12.7 against
# 14.8 at T=2048; R+E = 288: 39.1 against 41.1; RESULTS run 32); the dx GEMM (base_gemm) reads it as that
# tensor's transpose.
DHL_TOKEN_MINOR = True


def _dhl_buffer(t: int, cols: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return gl._token_minor(t, cols, like, dtype) if DHL_TOKEN_MINOR else gl._alloc((t, cols), like, dtype)


def gate_bwd_impl(du: torch.Tensor, hl: torch.Tensor, noise: torch.Tensor | None, gates: torch.Tensor,
                  ids: torch.Tensor, stats: torch.Tensor, daux: torch.Tensor | None, rank: int, kind: int,
                  scale: float, lb_coef: float, z_coef: float, dtype: torch.dtype,
                  token_w: torch.Tensor | None = None, n_real: torch.Tensor | None = None) -> torch.Tensor:
    """(T, R+E) in dtype: [gradient of the shrink output h | gradient of the router logits], stored token-minor
    by default (DHL_TOKEN_MINOR). token_w, n_real: the forward's (gate_fwd_impl)."""
    t, r_tot = du.shape
    e = r_tot // rank
    top_k = ids.shape[1]
    dhl = _dhl_buffer(t, r_tot + e, hl, dtype)
    if t > 0:
        select = _gate_select()
        ep = _ep(e)
        bt, br, warps = _gate_bwd_tile(r_tot, ep, select)
        has_w = token_w is not None
        c_lb, c_z = _aux_coefs(lb_coef, z_coef, e, t, top_k, has_w)
        _gate_bwd_kernel[(gl._cdiv(t, bt),)](
            du, hl, hl if noise is None else noise, token_w if has_w else hl, n_real if has_w else hl, gates, ids,
            stats, stats if daux is None else daux, dhl,
            float(scale), c_lb, 2.0 * c_z, t, r_tot, e, hl.shape[1], dhl.stride(0), dhl.stride(1),  # d(lse^2) = 2 lse dlse
            RANK=rank, K=top_k, KIND=kind, EP=ep, BT=bt, BR=br, HAS_NOISE=noise is not None,
            HAS_AUX=daux is not None, HAS_W=has_w, SELECT=select, num_warps=warps)
    return dhl


# dB = dy^T u right after du = dy B_cat^T, the other read of dy, instead of after the dx GEMM: where dy fits in L2
# beside the rest (T <= ~2048 at 4096 features on an H100's 50 MB) the second read comes from L2. On an H100 (RESULTS
# run 50, CUDA graphs, interleaved): T=2048 4096^2 -5.1 / -2.6 us (1.301x -> 1.276x, 1.315x -> 1.302x), E=32 top-4
# -14.5 us, T=512 -0.9 us; T=8192 4096->14336 +18 us inside the rounds' spread. MOL_DB_FIRST=0: after the dx GEMM.
DB_FIRST = env_flag("MOL_DB_FIRST", True)
SMALL_T_MAX = 16  # T <= this: the one-launch forward (_small_t_kernel); 0 turns it off
# Profiling aid (CUDA only): an int64 tensor of at least 4 x (grid size) elements makes the small-T kernel stamp
# each program's start / work done / flag seen (or routing start) / end times into it (benchmarks/probe_small_t.py)
TIMELINE: torch.Tensor | None = None


def _small_t_split(n_in: int) -> int:
    """Split-K of the small-T shrink: ~256 input features (two BKS steps) per program, at most 16 splits, so a
    (T <= 16) shrink of a 4096-wide x spreads over (R/32 + 1) * 16 short programs; the split partial sums meet
    in one accumulator (atomics), so their number costs the routing program nothing."""
    return max(1, min(16, gl._cdiv(n_in, 256)))


def _small_t_work(x: torch.Tensor, cols: int) -> torch.Tensor:
    """The small-T kernel's ticket, flag and consumer counter (int32, padded to 16 bytes) and its float32
    accumulator (up to 16 rows of `cols`): zero before each launch, and each launch leaves them zero, so one
    buffer (gl.zeroed_workspace) serves every call and a decode step has no zero-fill (a memset node in its CUDA
    graph: 0.6 µs of the 16 µs at T = 1 and 16, RESULTS run 25)."""
    return gl.zeroed_workspace(x.device, ("small_t", cols), 4 + 16 * cols)


def small_t_fwd_impl(x: torch.Tensor, x_lora: torch.Tensor | None, a_cat: torch.Tensor, router_w: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, base_out: torch.Tensor | None,
                     lora_B: torch.Tensor, noise: torch.Tensor | None, rank: int, kind: int, top_k: int,
                     scale: float, lb_coef: float, z_coef: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    """The routed layer's forward for 1 <= T <= 16 in one launch: (y, hl, gates, ids, u, stats, aux), the same
    outputs (and the same backward) as the shrink / gate / GEMM sequence of larger T."""
    t, n_in = x.shape
    r_tot, e = a_cat.shape[0], router_w.shape[0]
    n_out = lora_B.shape[1]
    n_part = _small_t_split(n_in)
    work = _small_t_work(x, r_tot + e)
    sync, acc = work[:3], work[4:4 + t * (r_tot + e)].view(torch.float32)
    y = gl._alloc((t, n_out), x)
    hl = gl._alloc((t, r_tot + e), x, torch.float32)
    gates = gl._alloc((t, top_k), x, torch.float32)
    ids = gl._alloc((t, top_k), x, torch.int64)
    u = gl._alloc((t, r_tot), x)
    stats = gl._alloc((2 * e + 2,), x, torch.float32)
    aux = gl._alloc((), x, torch.float32)
    lora_B = gl._as_b(lora_B, lora_B.dtype)
    # float32 adapters of a 16-bit layer are read as they are and rounded in the kernel (_compute_dtype)
    a_cast, b_cast = a_cat.dtype != x.dtype, lora_B.dtype != x.dtype
    if weight is not None and weight.stride() != (n_in, 1):
        weight = weight.contiguous()
    fma = t == 1
    router_x2 = _router_x2()
    brs, bks = (16, 16) if gl._INTERPRET else (32, 128)
    n_shrink = (gl._cdiv(r_tot, brs) + 1) * n_part
    key = ("small_t", fma, n_in, n_out, r_tot, e, rank, top_k, kind, weight is not None, bias is not None,
           noise is not None, x.dtype, n_part, TIMELINE is not None, router_x2, a_cast, b_cast)

    def grid(m):
        return (n_shrink + gl._cdiv(n_out, m["BN"]),)
    args = (x, x if x_lora is None else x_lora, a_cat, router_w, acc, sync, acc if noise is None else noise,
            x if weight is None else weight, x if bias is None else bias, x if base_out is None else base_out,
            lora_B, y, hl, gates, ids, u, stats, aux, acc if TIMELINE is None else TIMELINE,
            float(scale), *_aux_coefs(lb_coef, z_coef, e, t, top_k), t, n_in, n_out, r_tot, e,
            lora_B.stride(0), lora_B.stride(1))
    gl._launch(_small_t_fma if fma else _small_t_dot, key, grid, args,
               {"N_PART": n_part, "RANK": rank, "K": top_k, "KIND": kind, "EP": _ep(e), "BRS": brs, "BKS": bks,
                "BR": min(128, max(16, gl._pow2(r_tot))), "FMA": fma, "HAS_W": weight is not None,
                "HAS_BIAS": bias is not None, "HAS_NOISE": noise is not None,
                "PROF": TIMELINE is not None, "ROUTER_X2": router_x2, "A_CAST": a_cast, "B_CAST": b_cast,
                **gl._flags(x.dtype)})
    return y, hl, gates, ids, u, stats, aux


lora_du_impl = gl._du  # du = dy @ B_cat^T in float32: the grouped kernels' own du launcher


# ----------------------------------------------------------------------------- custom ops (what torch.compile sees)

@gl.kernel_op("route_shrink")
def _route_shrink_op(x: torch.Tensor, x_lora: torch.Tensor | None, a_cat: torch.Tensor,
                     router_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return route_shrink_impl(x, x_lora, a_cat, router_w)


@torch.library.register_fake(_route_shrink_op)
def _(x, x_lora, a_cat, router_w):
    gemm = _shrink_by_gemm(x, x_lora)
    r_tot, e = a_cat.shape[0], router_w.shape[0]
    return (x.new_empty((x.shape[0], r_tot + (ROUTER_PARTS if gemm else 1) * e), dtype=torch.float32),
            x.new_empty((2 * e + 2,), dtype=torch.float32), x.new_empty((r_tot + e if gemm else 0, x.shape[1])))


# hl is mutated: with route_shrink_gemm's parts, the gate forward writes the summed logits into its last E columns
@gl.kernel_op("route_gate_fwd", mutates_args=("hl", "stats"))
def _gate_fwd_op(hl: torch.Tensor, stats: torch.Tensor, noise: torch.Tensor | None, r_tot: int, rank: int,
                 kind: int, top_k: int, scale: float, dtype: torch.dtype, lb_coef: float, z_coef: float,
                 token_w: torch.Tensor | None = None, n_real: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gate_fwd_impl(hl, stats, noise, r_tot, rank, kind, top_k, scale, dtype, lb_coef, z_coef, token_w, n_real)


@torch.library.register_fake(_gate_fwd_op)
def _(hl, stats, noise, r_tot, rank, kind, top_k, scale, dtype, lb_coef, z_coef, token_w=None, n_real=None):
    t = hl.shape[0]
    return (hl.new_empty((t, top_k)), hl.new_empty((t, top_k), dtype=torch.int64), hl.new_empty((t, r_tot), dtype=dtype),
            hl.new_empty(()))


@gl.kernel_op("route_gate_bwd")
def _gate_bwd_op(du: torch.Tensor, hl: torch.Tensor, noise: torch.Tensor | None, gates: torch.Tensor,
                 ids: torch.Tensor, stats: torch.Tensor, daux: torch.Tensor | None, rank: int, kind: int,
                 scale: float, lb_coef: float, z_coef: float, dtype: torch.dtype,
                 token_w: torch.Tensor | None = None, n_real: torch.Tensor | None = None) -> torch.Tensor:
    return gate_bwd_impl(du, hl, noise, gates, ids, stats, daux, rank, kind, scale, lb_coef, z_coef, dtype,
                         token_w, n_real)


@torch.library.register_fake(_gate_bwd_op)
def _(du, hl, noise, gates, ids, stats, daux, rank, kind, scale, lb_coef, z_coef, dtype, token_w=None, n_real=None):
    return _dhl_buffer(du.shape[0], du.shape[1] + du.shape[1] // rank, hl, dtype)


@gl.kernel_op("lora_du")
def _lora_du_op(dy: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    return lora_du_impl(dy, lora_B)


@torch.library.register_fake(_lora_du_op)
def _(dy, lora_B):
    return dy.new_empty((dy.shape[0], lora_B.shape[0] * lora_B.shape[2]), dtype=torch.float32)


@gl.kernel_op("route_small_t_fwd")
def _small_t_fwd_op(x: torch.Tensor, x_lora: torch.Tensor | None, a_cat: torch.Tensor, router_w: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, base_out: torch.Tensor | None,
                    lora_B: torch.Tensor, noise: torch.Tensor | None, rank: int, kind: int, top_k: int, scale: float,
                    lb_coef: float, z_coef: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    return small_t_fwd_impl(x, x_lora, a_cat, router_w, weight, bias, base_out, lora_B, noise, rank, kind, top_k,
                            scale, lb_coef, z_coef)


@torch.library.register_fake(_small_t_fwd_op)
def _(x, x_lora, a_cat, router_w, weight, bias, base_out, lora_B, noise, rank, kind, top_k, scale, lb_coef, z_coef):
    t, r_tot, e = x.shape[0], a_cat.shape[0], router_w.shape[0]
    f32 = torch.float32
    return (x.new_empty((t, lora_B.shape[1])), x.new_empty((t, r_tot + e), dtype=f32),
            x.new_empty((t, top_k), dtype=f32), x.new_empty((t, top_k), dtype=torch.int64), x.new_empty((t, r_tot)),
            x.new_empty((2 * e + 2,), dtype=f32), x.new_empty((), dtype=f32))


_EAGER = (route_shrink_impl, gate_fwd_impl, gate_bwd_impl, lora_du_impl, small_t_fwd_impl, bg.base_mm)
_OPS = (_route_shrink_op, _gate_fwd_op, _gate_bwd_op, _lora_du_op, _small_t_fwd_op, bg.base_mm_op)


# ----------------------------------------------------------------------------- autograd

def _routed_forward(x, x_lora, weight, weight_fn, bias, base_out, lora_A, lora_B, router_w, noise, token_w, meta):
    """The routed layer's forward, (y, aux, hl, gates, ids, u, stats, w_dx, n_real): what _RoutedLoRAFn.forward
    runs, and what routed_lora_linear runs alone when nothing needs a gradient (no autograd node, nothing saved).
    w_dx: the backward's dx operand [A_cat; Wr in x's dtype] where the shrink built it, else None or empty.
    n_real: token_w's sum (the router losses' token count), None without token_w."""
    kind, top_k, scale, lb_coef, z_coef, eager = meta[:6]
    shrink, gate_fwd, _, _, small_t, base_mm = _EAGER if eager else _OPS
    e, rank, n_in = lora_A.shape
    r_tot = e * rank
    a_cat = lora_A.reshape(r_tot, n_in)
    n_real = None if token_w is None else token_w.sum()
    if _small_t(x, token_w):  # decode: one launch, the base GEMV included
        w = weight if weight is not None or weight_fn is None else weight_fn(x.dtype)
        y, hl, gates, ids, u, stats, aux = small_t(x, x_lora, a_cat, router_w, w, bias, base_out, lora_B, noise,
                                                   rank, kind, top_k, scale, lb_coef, z_coef)
        del w
        w_dx = None
    else:
        b_cat = gl._b_cat(lora_B)  # (R, out): a view of MoLLinear's expert-interleaved lora_B
        hl, stats, w_dx = shrink(x, x_lora, a_cat, router_w)
        gates, ids, u, aux = gate_fwd(hl, stats, noise, r_tot, rank, kind, top_k, scale, x.dtype, lb_coef,
                                      z_coef, token_w, n_real)
        if base_out is None:
            # y = x W^T + u B_cat (+ bias): the experts' product is R more K steps of the base GEMM (base_gemm);
            # the weight is materialized after the shrink and the gate, so a dequantized NF4 weight lives less
            w = weight if weight is not None else weight_fn(x.dtype)
            y = base_mm(x, w, True, u, b_cat, False, bias)
            del w  # a dequantized scratch weight (NF4) is not kept for backward: weight_fn runs again there
        else:
            y = torch.addmm(base_out, u, b_cat)
    return y, aux, hl, gates, ids, u, stats, w_dx, n_real


def _small_t(x: torch.Tensor, token_w: torch.Tensor | None) -> bool:
    """Whether _routed_forward runs the one-launch small-T forward (which weighs every token alike: token weights
    take the other kernels)."""
    return 0 < x.shape[0] <= SMALL_T_MAX and token_w is None


def _compute_dtype(lora_A: torch.Tensor, lora_B: torch.Tensor, x: torch.Tensor, x_lora: torch.Tensor | None = None,
                   token_w: torch.Tensor | None = None, eager: bool = False, grad: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters as _routed_forward reads them for x: in x's dtype (a cast of ~E*r*(in+out) elements where they
    differ; lora_B's expert-interleaved layout kept, as the grouped kernels' own casts keep it), except float32
    adapters that a kernel rounds itself, as .to() would (to nearest even), where a cast here would be a launch (on
    the GPU hosts tens of µs each) and a copy for nothing:
    - lora_A at large T, for the one-GEMM shrink: its operand kernel (_router_parts_kernel) rounds A into x's
      dtype anyway, and the backward reads that copy (w_dx);
    - lora_A and lora_B of a call without gradients (``grad`` False: decode, evaluation) at small T: the one-launch
      forward (_small_t_kernel) rounds them as it loads them. With gradients the backward needs the copies.
    Eager calls only: traced, the cast is one of the element-wise ops inductor fuses (and the switches
    _shrink_by_gemm reads are not traceable)."""
    f32 = eager and x.dtype != torch.float32
    small = _small_t(x, token_w)
    keep_b = f32 and lora_B.dtype == torch.float32 and small and not grad
    # kept as it is only when dense: the kernels read A_cat = lora_A.reshape(E*r, in) as a row-major array
    keep_a = (f32 and lora_A.dtype == torch.float32 and lora_A.is_contiguous()
              and (keep_b if small else _shrink_by_gemm(x, x_lora)))
    return (lora_A if keep_a else gl._as(lora_A, x.dtype)), (lora_B if keep_b else gl._as_b(lora_B, x.dtype))


def _routed_forward_saved(x, x_lora, weight, weight_fn, bias, base_out, lora_A, lora_B, router_w, noise, token_w,
                          meta, need_dx: bool):
    """_routed_forward for training: its outputs (y, aux, hl, gates, ids, stats) and what _routed_backward reads
    (its ``saved``), for _RoutedLoRAFn and the captured graphs (layer_graphs) alike. Adapters of another dtype than
    x's (float32 on a bf16 layer, MoLConfig.adapter_dtype) are cast here, inside the autograd node and any captured
    graph, and the copies saved (but a float32 lora_A that the shrink GEMM rounds itself, _compute_dtype);
    _routed_backward casts their gradients back."""
    lora_A, lora_B = _compute_dtype(lora_A, lora_B, x, x_lora, token_w, meta[5])
    y, aux, hl, gates, ids, u, stats, w_dx, n_real = _routed_forward(x, x_lora, weight, weight_fn, bias, base_out,
                                                                     lora_A, lora_B, router_w, noise, token_w, meta)
    if not need_dx or (w_dx is not None and w_dx.numel() == 0):
        w_dx = None  # not needed, or not built (the backward builds it)
    return (y, aux, hl, gates, ids, stats), (x, x_lora, weight, lora_A, lora_B, router_w, noise, hl, gates, ids, u,
                                             stats, w_dx, token_w, n_real)


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t in a dense row-major layout: t itself when it already is (no dispatch), else a copy."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., n) -> (T, n): a view of a dense t (see _dense)."""
    return t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])


class _RoutedLoRAFn(torch.autograd.Function):
    """(x, x_lora, weight, bias, base_out, A, B, Wr, noise, token_w, meta) -> (y, aux, hl, gates, ids, stats).

    Exactly one of (weight, base_out) is given: a frozen weight (the base GEMM runs here, and its dx shares
    one buffer with the adapters') or an already computed base output (any base: NF4, autocast, ...)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, weight_fn, bias, base_out, lora_A, lora_B, router_w, noise, token_w, meta):
        outs, saved = _routed_forward_saved(x, x_lora, weight, weight_fn, bias, base_out, lora_A, lora_B, router_w,
                                            noise, token_w, meta, ctx.needs_input_grad[0])
        ctx.save_for_backward(*saved)
        ctx.weight_fn = weight_fn
        ctx.meta = meta
        ctx.mark_non_differentiable(*outs[2:])  # hl, gates, ids, stats
        # unused output gradients stay None: materialized, they would be four zero-fills per backward
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, daux, *_unused):  # _unused: hl, gates, ids, stats (and _FuncRoutedLoRAFn's extras)
        # x, x_lora, weight, weight_fn, bias, base_out, A, B, Wr, noise, meta: index as the first ten minus weight_fn
        need = tuple(n for i, n in enumerate(ctx.needs_input_grad) if i != 3)
        dx, dx_lora, d_base, dA, dB, dWr = _routed_backward(dy, daux, ctx.saved_tensors, need, ctx.weight_fn,
                                                            ctx.meta)
        return dx, dx_lora, None, None, None, d_base, dA, dB, dWr, None, None, None


class _FuncRoutedLoRAFn(torch.autograd.Function):
    """_RoutedLoRAFn under torch.func's transforms (grad, jacrev, vjp over functional_call), which need forward and
    setup_context apart: the tensors the backward reads that forward makes are returned after the six outputs
    (routed_lora_linear drops them). Eager and compiled calls keep _RoutedLoRAFn, whose forward saves them itself
    (no extra outputs, which Dynamo's tracing of a Function would also have to handle as None)."""

    @staticmethod
    def forward(x, x_lora, weight, weight_fn, bias, base_out, lora_A, lora_B, router_w, noise, token_w, meta):
        outs, saved = _routed_forward_saved(x, x_lora, weight, weight_fn, bias, base_out, lora_A, lora_B, router_w,
                                            noise, token_w, meta, True)
        a, b, u, w_dx, n_real = saved[3], saved[4], saved[10], saved[12], saved[14]
        # the adapters as the kernels read them, None where that is the input itself (an input returned as an
        # output would come back as a view of it): setup_context takes those from the inputs
        return (*outs, None if a is lora_A else a, None if b is lora_B else b, u, w_dx, n_real)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_lora, weight, weight_fn, _, _, lora_A, lora_B, router_w, noise, token_w, meta = inputs
        _, _, hl, gates, ids, stats, a, b, u, w_dx, n_real = output
        ctx.save_for_backward(x, x_lora, weight, lora_A if a is None else a, lora_B if b is None else b, router_w,
                              noise, hl, gates, ids, u, stats, w_dx if ctx.needs_input_grad[0] else None, token_w,
                              n_real)
        ctx.weight_fn = weight_fn
        ctx.meta = meta
        ctx.mark_non_differentiable(*(t for t in output[2:] if t is not None))
        ctx.set_materialize_grads(False)

    backward = staticmethod(_RoutedLoRAFn.backward)

    vmap = staticmethod(gl._no_vmap)


def _routed_backward(dy, daux, saved, need, weight_fn, meta):
    """The routed layer's backward: (dx, dx_lora, d_base_out, dA, dB, dWr), each None where ``need`` (the
    inputs x, x_lora, weight, bias, base_out, A, B, Wr, noise in that order) says no gradient is wanted.
    ``saved``: what _RoutedLoRAFn.forward saves. Shared by _RoutedLoRAFn and the captured graphs (layer_graphs)."""
    x, x_lora, weight, lora_A, lora_B, router_w, noise, hl, gates, ids, u, stats, w_dx, token_w, n_real = saved
    kind, top_k, scale, lb_coef, z_coef, eager, a_dtype, b_dtype = meta
    _, _, gate_bwd, lora_du, _, base_mm = _EAGER if eager else _OPS
    e, rank, n_in = lora_A.shape
    r_tot, n_out, dt = e * rank, lora_B.shape[1], x.dtype
    if dy is None:
        dy = torch.zeros(x.shape[0], n_out, device=x.device, dtype=dt)
    elif not dy.is_contiguous():
        dy = dy.contiguous()
    a_cat = lora_A.reshape(r_tot, n_in)
    dx = dx_lora = d_base = dA = dB = dWr = None
    du = lora_du(dy, lora_B)
    if need[6] and DB_FIRST:
        dB = gl._grad_b(dy, u, lora_B, f32=_f32_wgrad(u, b_dtype, eager))
    dhl = gate_bwd(du, hl, noise, gates, ids, stats, daux, rank, kind, scale, lb_coef, z_coef, dt, token_w, n_real)
    del du
    # the dense base weight, if this function owns the base GEMM (re-dequantized for an NF4 base), after du and
    # dhl: a dequantized weight is not held beside them
    w = None
    if need[0] and (weight is not None or weight_fn is not None):
        w = weight if weight is not None else weight_fn(dt)
    if x_lora is None:  # the router and the experts read the same x: one dx GEMM, one weight-gradient GEMM
        if need[0]:
            dx = _dx(base_mm, dy, w, dhl, w_dx if w_dx is not None else torch.cat([a_cat, router_w.to(dt)]))
        if need[5] or need[7]:
            d_ext = _wgrad(dhl.t(), x, a_dtype, eager)
            dA, dWr = d_ext[:r_tot].view(e, rank, n_in), d_ext[r_tot:]
    else:
        dh, dlogits = dhl[:, :r_tot], dhl[:, r_tot:]
        if need[0]:
            dx = _dx(base_mm, dy, w, dlogits, router_w.to(dt))
        if need[1]:
            dx_lora = torch.mm(dh, a_cat)
        if need[5]:
            dA = _wgrad(dh.t(), x_lora, a_dtype, eager).view(e, rank, n_in)
        if need[7]:
            dWr = torch.mm(dlogits.t(), x)
    del w
    if need[6] and not DB_FIRST:
        dB = gl._grad_b(dy, u, lora_B, f32=_f32_wgrad(u, b_dtype, eager))
    if dWr is not None:
        dWr = dWr.to(router_w.dtype) if need[7] else None
    if dA is not None and dA.dtype != a_dtype:  # float32 adapters of a 16-bit layer (see _compute_dtype)
        dA = dA.to(a_dtype)
    if dB is not None and dB.dtype != b_dtype:
        dB = dB.to(b_dtype)
    if need[4]:
        d_base = dy
    return dx, dx_lora, d_base, dA, dB, dWr


def _f32_wgrad(a: torch.Tensor, want: torch.dtype, eager: bool) -> bool:
    """Whether a weight gradient wanted in float32 (float32 adapters of a 16-bit layer) is computed straight into
    float32 (cuBLAS's float32 output, torch >= 2.8): no bf16 rounding of it, and no cast after. Eager calls only:
    traced (torch.compile), the product stays a plain mm, cast after, which every backend lowers."""
    return (eager and want == torch.float32 and a.dtype != torch.float32
            and (gl._MM_OUT_DTYPE or not a.is_cuda))


def _wgrad(a: torch.Tensor, b: torch.Tensor, want: torch.dtype, eager: bool) -> torch.Tensor:
    """a @ b, a weight gradient: in float32 where it is wanted so (_f32_wgrad), else in a's dtype."""
    return gl._mm_f32(a, b) if _f32_wgrad(a, want, eager) else torch.mm(a, b)


def _dx(base_mm, dy, w, d_small, w_small):
    """dx = dy W + d_small w_small: the adapters' product as more K steps of the base's GEMM (base_gemm) where
    this function owns the base (w given), else the adapters' product alone (the caller's base has its own)."""
    if w is None:
        return torch.mm(d_small, w_small)
    return base_mm(dy, w, False, d_small, w_small, False, None)


def _check(x, x_lora, lora_A, lora_B, weight, base_out, bias, n_out):
    where = "routed_lora_linear"
    if x.dim() < 2 or lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"{where}: x must be (..., in) with at least 2 dims, lora_A (E, r, in), lora_B (E, out, r); "
                         f"got {tuple(x.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    e, rank, n_in = lora_A.shape
    if lora_B.shape != (e, n_out, rank) or n_in != x.shape[-1]:
        raise ValueError(f"{where}: shape mismatch: x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, lora_B "
                         f"{tuple(lora_B.shape)}, out features {n_out}")
    for name, t, want in (("x_lora", x_lora, x.shape), ("weight", weight, (n_out, n_in)),
                          ("base_out", base_out, (*x.shape[:-1], n_out)), ("bias", bias, (n_out,))):
        if t is not None and t.shape != want:
            raise ValueError(f"{where}: shape mismatch: {name} has shape {tuple(t.shape)}, expected {tuple(want)} "
                             f"for x {tuple(x.shape)} and lora_B {tuple(lora_B.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{where}: x dtype {x.dtype} unsupported; use bfloat16, float16 or float32")
    others = [t for t in (x_lora, weight, base_out, bias) if t is not None]
    if any(t.dtype != x.dtype for t in others):
        raise TypeError(f"{where}: x, x_lora and the base weight/output must share x's dtype "
                        f"{x.dtype}; got {sorted({str(t.dtype) for t in others})}")
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
        raise TypeError(f"{where}: lora_A and lora_B must be floating point (cast to x's dtype {x.dtype} per call); "
                        f"got {lora_A.dtype} and {lora_B.dtype}")
    others += [lora_A, lora_B]
    if any(t.device != x.device for t in others):
        raise ValueError(f"{where}: all tensors must be on one device")
    if x.device.type != "cuda" and not gl._INTERPRET:
        raise RuntimeError(f"{where}: the Triton kernels need CUDA tensors (got {x.device}); use backend='torch'")


def _fast(*tensors: torch.Tensor) -> bool:
    return gl._use_fast_path(*(t for t in tensors if t is not None))


def routed_lora_linear(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, router_w: torch.Tensor,
                       kind: str, top_k: int, scale: float, *, weight: torch.Tensor | None = None,
                       weight_fn: Callable[[torch.dtype], torch.Tensor] | None = None,
                       bias: torch.Tensor | None = None, base_out: torch.Tensor | None = None,
                       x_lora: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       lb_coef: float = 0.0, z_coef: float = 0.0, token_weights: torch.Tensor | None = None,
                       graphs: "LayerGraphs | None" = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A routed MoL linear layer on the Triton backend: returns (y, aux, hl, gates, expert_ids, stats).

    x, x_lora: (..., in), T = prod(x.shape[:-1]) tokens, one dtype (x_lora: the experts' input when it differs from
    x, e.g. after dropout); y and base_out: (..., out); the routing tensors (hl, gates, ids): one row per token;
    lora_A (E, r, in), lora_B (E, out, r) (in x's dtype, or another float dtype, e.g. float32 adapters of a bf16
    layer: cast per call inside the autograd node, gradients returned in theirs); router_w (E, in) float32; the
    base is exactly one of
    a frozen ``weight`` (out, in), a ``weight_fn(dtype)`` that materializes it (e.g. dequantizes an NF4
    weight; called in forward and again in backward, so no dense copy lives in between), each with an
    optional ``bias``, or a computed ``base_out`` (T, out). ``noise`` (T, E) is added to the logits.
    y = base + scale * sum_k gates[:, k] * B[e] A[e] x_lora; aux = lb_coef * load_balance + z_coef * z_loss
    (differentiable, 0-d); hl[:, R:] are the router logits (float32); stats = (counts (E), prob sums (E),
    sum of logsumexp^2, a kernel-internal counter). gates, expert_ids, hl and stats carry no gradient.
    ``token_weights`` (T,): each token's weight in aux and stats (1 for a real token, 0 for padding; the losses
    are then normalised by their sum, as a batch of only the real tokens would give); every token is routed.
    ``graphs``: a layer's mol.kernels.layer_graphs.LayerGraphs; the calls it accepts replay CUDA graphs (training
    calls up to its max_tokens, calls without gradients up to its inference_tokens).
    Any tensor may come in any layout (strided views, transposes, expands): what the kernels read row-major and is
    not stored so is copied first.
    """
    if kind not in KINDS:
        raise ValueError(f"routed_lora_linear: router kind {kind!r} is not fused; choose one of {sorted(KINDS)}")
    if sum(b is not None for b in (weight, weight_fn, base_out)) != 1:
        raise ValueError("routed_lora_linear: pass exactly one of weight= or weight_fn= (the frozen base GEMM runs "
                         "here) or base_out= (a base output computed by the caller)")
    if bias is not None and base_out is not None:
        raise ValueError("routed_lora_linear: bias= goes with weight=/weight_fn=; add it to base_out yourself")
    e = lora_A.shape[0]
    if router_w.shape != (e, x.shape[-1]) or router_w.dtype != torch.float32:
        raise ValueError(f"routed_lora_linear: router_w must be float32 ({e}, {x.shape[-1]}), got "
                         f"{tuple(router_w.shape)} {router_w.dtype}")
    if kind == "soft":
        top_k = e
    if not 1 <= top_k <= e:
        raise ValueError(f"routed_lora_linear: top_k={top_k} is outside 1..{e}")
    n_out = lora_B.shape[1]
    _check(x, x_lora, lora_A, lora_B, weight, base_out, bias, n_out)
    if token_weights is not None:
        tokens = math.prod(x.shape[:-1])
        if token_weights.shape != (tokens,) or token_weights.device != x.device:
            raise ValueError(f"routed_lora_linear: token_weights must be ({tokens},) on {x.device}, one per token "
                             f"of x; got {tuple(token_weights.shape)} on {token_weights.device}")
        token_weights = token_weights.float()
    # The kernels index these as dense row-major arrays: another layout (a feature slice x[..., :n], a transpose,
    # an expand, a router weight stored transposed) is copied here, before the autograd node and the graphs, so
    # that autograd maps the gradients back through the copy. The dense common case costs one check each.
    x, x_lora, base_out, bias, router_w, noise, token_weights = (
        _dense(t) for t in (x, x_lora, base_out, bias, router_w, noise, token_weights))
    eager = _fast(x, x_lora, weight, base_out, lora_A, lora_B, router_w)
    meta = (KINDS[kind], int(top_k), float(scale), float(lb_coef), float(z_coef), eager, lora_A.dtype, lora_B.dtype)
    grad = eager and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, x_lora, weight, bias, base_out, lora_A, lora_B, router_w))
    if graphs is not None and (grad or (eager and graphs.inference_tokens)):
        # x keeps its leading dims: the graphs' static buffers take them as they come, the captured steps read
        # (T, n) views made once at capture, so a replayed call makes no view (an autograd node each, host time).
        # Without gradients (generation, evaluation): one copy, one replay and a clone instead of the launches
        args = (x, x_lora, weight, bias, base_out, lora_A, lora_B, router_w, noise, token_weights)
        out = (graphs.apply(args, weight_fn, meta, tuple(t is not None and t.requires_grad for t in args)) if grad
               else graphs.apply_inference(args, weight_fn, meta))
        if out is not None:
            return out
    lead = x.shape[:-1] if x.dim() != 2 else None
    if lead is not None:
        x, x_lora, base_out = _flat(x), _flat(x_lora), _flat(base_out)
    if eager and not grad:
        # inference (decode, evaluation): the same kernels without an autograd node, which costs host time
        # every call and would keep nothing useful
        lora_A, lora_B = _compute_dtype(lora_A, lora_B, x, x_lora, token_weights, eager, grad=False)
        y, aux, hl, gates, ids, _, stats, _, _ = _routed_forward(x, x_lora, weight, weight_fn, bias, base_out,
                                                                 lora_A, lora_B, router_w, noise, token_weights, meta)
    else:
        # (eager is False under torch.func's transforms: their tensors are wrapped)
        fn = _FuncRoutedLoRAFn if not eager and gl._functorch() else _RoutedLoRAFn
        y, aux, hl, gates, ids, stats = fn.apply(x, x_lora, weight, weight_fn, bias, base_out, lora_A, lora_B,
                                                 router_w, noise, token_weights, meta)[:6]
    return y if lead is None else y.view(*lead, y.shape[-1]), aux, hl, gates, ids, stats

