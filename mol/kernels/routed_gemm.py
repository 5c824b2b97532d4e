"""The routed layer's base GEMM with its routing chain inside: one persistent Triton kernel (TMA, sm_90+) per pass.

    forward   y  = x W^T  + u B_cat (+ bias)      u   = gate(hl),        hl = x [A_cat; Wr parts]^T   (side tiles)
    backward  dx = dy W   + dhl [A_cat; Wr]       dhl = gate_bwd(du, ...), du = dy B_cat^T            (side tiles)

Unfused (routed_lora), each pass is three launches in sequence: a skinny GEMM over the T x 4096 activation (the
shrink, or du), a gate kernel, and the base GEMM carrying the adapters as extra K (base_gemm). The skinny GEMM
reads x (or dy) once more at 50-60% of copy bandwidth and the gate kernel is latency-bound: 41 us of a 1000 us
layer at T=8192 4096² E=8 on an H200, forward, and 38 backward (RESULTS runs 14, 29).

Here the skinny GEMM is cut into *side tiles* (BM rows x SN of its columns) that run inside the base GEMM's
persistent kernel, mostly on the programs that would otherwise sit idle through the base GEMM's last, partial wave
(T/BM x N/BN tiles rarely divide evenly over the SMs; _quotas). The last side tile of a row block to finish (a
ticket) runs the gate for its BM tokens and raises that row block's flag; each base tile runs its own K loop
first and waits for its row block's flag only before the adapters' extra K steps, so the chain hides behind the
base GEMM. Side tiles are claimed from one counter, in row-block order; before a base tile starts, its program
claims (and runs) whatever of its row block's side tiles nobody has claimed yet. So a program only ever waits
for side tiles that a running program holds and finishes without waiting: the kernel cannot deadlock, however
few of its programs are resident (other streams' kernels, NCCL), and under the interpreter, which runs programs
one after another.

The same functions as the unfused path compute the gate (routed_lora._gate_fwd_rows / _gate_bwd_rows), on the
same float32 hl and du, so routing decisions are identical; y and dx differ from the unfused path by float32
summation order only.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mol.kernels import base_gemm as bg
from mol.kernels import grouped_lora as gl
from mol.kernels import routed_lora as rl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the unfused path runs
    TensorDescriptor = None

# "auto": fused wherever base_gemm runs its Triton kernel for the pass's base GEMM (base_gemm.plan: tuned
# against cuBLAS per shape), above base_gemm.EAGER_CUBLAS_ROWS tokens, eager or captured; "on": wherever the
# kernel can run (the first base_gemm config where none was tuned); "off": never. The default is "off": timed on
# an H200 the fused pass is slower, 1137 against 983 us for the whole layer at T=8192 4096^2 E=8 top-2 (RESULTS
# run 35, benchmarks/probe_ab.py --variants default fused=on); the 255-register kernel's base tiles wait for
# the gate epilogue. MOL_ROUTED_GEMM sets it at import.
FUSED = os.environ.get("MOL_ROUTED_GEMM", "off")
_CHOICES = ("auto", "on", "off")
SIDE_N = 64  # columns of a side tile: R + 3E = 152 at E=8 r=16 is 3 of them, each a quarter of a 128x256 base tile
SIDE_QUOTA: int | None = None  # testing aid: side tiles every program claims first (0: only as base tiles need them)


@triton.jit
def _side_tile(a_desc, s_desc, side_ptr, om, oc, M, N_SIDE, K, LD_SIDE, BM: tl.constexpr, SN: tl.constexpr,
               BK: tl.constexpr, S_T: tl.constexpr, F32_DOT: tl.constexpr):
    """side[om:om+BM, oc:oc+SN] = a[om:, :K] @ op(s)[:K, oc:] in float32 (op(s) = s^T for s stored (N_SIDE, K))."""
    acc = bg._k_steps(tl.zeros((BM, SN), dtype=tl.float32), a_desc, s_desc, om, oc, K, BK, S_T, F32_DOT)
    offs_m = om + tl.arange(0, BM)
    offs_c = oc + tl.arange(0, SN)
    tl.store(side_ptr + offs_m.to(tl.int64)[:, None] * LD_SIDE + offs_c[None, :], acc,
             mask=(offs_m < M)[:, None] & (offs_c < N_SIDE)[None, :])


@triton.jit
def _side_work(j, a_desc, s_desc, side_ptr, u_ptr, sync_ptr, hl_ptr, noise_ptr, gates_ptr, ids_ptr, stats_ptr,
               aux_ptr, scale, c_lb, c_z, part_scale, M, K, N_SIDE, LD_SIDE, SU_T, SU_C, R, E, LD_HL,
               BM: tl.constexpr, BK: tl.constexpr, SN: tl.constexpr, S_T: tl.constexpr, F32_DOT: tl.constexpr,
               BACKWARD: tl.constexpr, RANK: tl.constexpr, TOPK: tl.constexpr, KIND: tl.constexpr,
               EP: tl.constexpr, GBT: tl.constexpr, BR: tl.constexpr, HAS_NOISE: tl.constexpr,
               HAS_AUX: tl.constexpr, SELECT: tl.constexpr, NPARTS: tl.constexpr):
    """Side tile j (row block j // chunks, column chunk j % chunks); the row block's last one to finish routes its
    BM tokens (the forward's or the backward's gate) and raises the row block's flag."""
    n_chunks = tl.cdiv(N_SIDE, SN)
    m = j // n_chunks
    _side_tile(a_desc, s_desc, side_ptr, m * BM, (j % n_chunks) * SN, M, N_SIDE, K, LD_SIDE, BM, SN, BK, S_T,
               F32_DOT)
    tl.debug_barrier()  # every thread's part is stored before the ticket publishes it
    ticket = tl.atomic_add(sync_ptr + 2 + 3 * m, 1, sem="acq_rel")
    if ticket == n_chunks - 1:
        tl.debug_barrier()
        for g0 in tl.range(0, BM, GBT):
            offs_t = m * BM + g0 + tl.arange(0, GBT)
            if BACKWARD:
                # (token weights: the fused path is not taken with them, HAS_W=False)
                rl._gate_bwd_rows(offs_t, side_ptr, hl_ptr, noise_ptr, noise_ptr, noise_ptr, gates_ptr, ids_ptr,
                                  stats_ptr, aux_ptr, u_ptr, scale, c_lb, c_z, M, R, E, LD_HL, SU_T, SU_C, RANK, TOPK,
                                  KIND, EP, GBT, BR, HAS_NOISE, HAS_AUX, False, SELECT, True)
            else:
                rl._gate_fwd_rows(offs_t, side_ptr, noise_ptr, noise_ptr, noise_ptr, gates_ptr, ids_ptr, u_ptr,
                                  stats_ptr, aux_ptr, scale, c_lb, c_z, M, R, E, LD_SIDE, part_scale,
                                  tl.cdiv(M, BM) * (BM // GBT), RANK, TOPK, KIND, EP, GBT, BR, HAS_NOISE, False,
                                  SELECT, NPARTS, True)
        tl.debug_barrier()  # the whole block's u is stored before the flag publishes it
        tl.store(sync_ptr + 2 + 3 * m, 0)
        tl.atomic_xchg(sync_ptr + 3 + 3 * m, 1, sem="release")


@triton.jit
def _wait_flag(flag_ptr):
    """Spin until *flag_ptr != 0 (plain volatile loads: hundreds of programs polling one word with atomics
    contend), then one acquire so that what the flag publishes is read after it."""
    ready = tl.load(flag_ptr, volatile=True)
    while ready == 0:
        ready = tl.load(flag_ptr, volatile=True)
    tl.atomic_add(flag_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _routed_gemm_kernel(
        a_desc, b_desc, s_desc, v_desc, c_desc, bias_ptr,
        side_ptr, u_ptr, sync_ptr,
        # the gate's operands (forward: hl = side, u, gates, ids; backward: du = side, hl, gates, ids, dhl = u)
        hl_ptr, noise_ptr, gates_ptr, ids_ptr, stats_ptr, aux_ptr,
        scale, c_lb, c_z, part_scale,
        M, N, K, N_SIDE, LD_SIDE, KR, SU_T, SU_C, R, E, LD_HL, SLACK, Q_SLACK, Q_OTHER,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SN: tl.constexpr,
        B_T: tl.constexpr, S_T: tl.constexpr, V_T: tl.constexpr, HAS_BIAS: tl.constexpr, EPI_SPLIT: tl.constexpr,
        NUM_PROGS: tl.constexpr, F32_DOT: tl.constexpr, BACKWARD: tl.constexpr,
        RANK: tl.constexpr, TOPK: tl.constexpr, KIND: tl.constexpr, EP: tl.constexpr, GBT: tl.constexpr,
        BR: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_AUX: tl.constexpr, SELECT: tl.constexpr,
        NPARTS: tl.constexpr):
    """c (M, N) = a @ op(b) + u (M, KR) @ op(v) (+ bias), u = gate(a @ op(s)) (the module docstring).
    sync_ptr (int32, zero on entry and left zero): [0] the next side tile to claim, [1] programs done, then per
    row block its side tiles' ticket, its flag and the count of its base tiles past the flag. u is read through
    its strides (SU_T a token, SU_C a column)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    n_chunks = tl.cdiv(N_SIDE, SN)
    n_side = num_m * n_chunks
    # Side tiles are claimed in order from one counter: first up to a quota per program, Q_SLACK for programs
    # 0..SLACK-1 (the base tiles, dealt round robin from program SLACK on, leave them one short) and Q_OTHER for the
    # rest; then, before each base tile, whatever its row block still needs. So every side tile a base tile waits
    # for was claimed by a running program, which finishes it without waiting on anything: no deadlock, however
    # few programs are resident.
    # `seen` is the counter as this program last saw it, always from a scalar atomic, whose result Triton
    # broadcasts to every thread: a per-thread load could differ between threads and split the CTA at a barrier
    quota = Q_SLACK if pid < SLACK else Q_OTHER
    n_done = 0
    seen = 0
    while n_done < quota:
        j = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        seen = j + 1
        if j < n_side:
            _side_work(j, a_desc, s_desc, side_ptr, u_ptr, sync_ptr, hl_ptr, noise_ptr, gates_ptr, ids_ptr,
                       stats_ptr, aux_ptr, scale, c_lb, c_z, part_scale, M, K, N_SIDE, LD_SIDE, SU_T, SU_C, R, E,
                       LD_HL, BM, BK, SN, S_T, F32_DOT, BACKWARD, RANK, TOPK, KIND, EP, GBT, BR, HAS_NOISE, HAS_AUX,
                       SELECT, NPARTS)
            n_done += 1
        else:
            n_done = quota
    slot = (pid + NUM_PROGS - SLACK % NUM_PROGS) % NUM_PROGS
    for tile in tl.range(slot, num_m * num_n, NUM_PROGS):
        m, on = bg._tile_origin(tile, num_m, num_n, GROUP_M, BN)
        om = m * BM
        if seen < (m + 1) * n_chunks:  # (once the counter has passed n_side, no more atomics)
            seen = tl.atomic_add(sync_ptr, 0, sem="relaxed")
        while seen < (m + 1) * n_chunks:  # this row block's side tiles not all claimed yet: take them
            j = tl.atomic_add(sync_ptr, 1, sem="relaxed")
            if j < n_side:
                _side_work(j, a_desc, s_desc, side_ptr, u_ptr, sync_ptr, hl_ptr, noise_ptr, gates_ptr, ids_ptr,
                           stats_ptr, aux_ptr, scale, c_lb, c_z, part_scale, M, K, N_SIDE, LD_SIDE, SU_T, SU_C, R,
                           E, LD_HL, BM, BK, SN, S_T, F32_DOT, BACKWARD, RANK, TOPK, KIND, EP, GBT, BR, HAS_NOISE,
                           HAS_AUX, SELECT, NPARTS)
            seen = j + 1
        acc = bg._k_steps(tl.zeros((BM, BN), dtype=tl.float32), a_desc, b_desc, om, on, K, BK, B_T, F32_DOT)
        _wait_flag(sync_ptr + 3 + 3 * m)
        offs_m = om + tl.arange(0, BM)
        for k in range(0, KR, BK):
            offs_k = k + tl.arange(0, BK)
            # u was written by other programs of this launch: read through L2 (rl._ld)
            u = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * SU_T + offs_k.to(tl.int64)[None, :] * SU_C,
                        mask=(offs_m < M)[:, None] & (offs_k < KR)[None, :], other=0.0, cache_modifier=".cg")
            if V_T:
                v = v_desc.load([on, k]).T
            else:
                v = v_desc.load([k, on])
            if F32_DOT:
                u = u.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(u, v, acc)
        # the last base tile of the row block past its flag lowers it for the next launch
        if tl.atomic_add(sync_ptr + 4 + 3 * m, 1, sem="relaxed") == num_n - 1:
            tl.store(sync_ptr + 3 + 3 * m, 0)
            tl.store(sync_ptr + 4 + 3 * m, 0)
        bg._store_tile(acc, c_desc, bias_ptr, om, on, N, BM, BN, HAS_BIAS, EPI_SPLIT)
    # the last program to finish resets the claim counter: every program's claims come before its ticket
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == NUM_PROGS - 1:
        tl.store(sync_ptr, 0)
        tl.store(sync_ptr + 1, 0)


def config(a: torch.Tensor, w: torch.Tensor, w_t: bool, u: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor | None, side: torch.Tensor) -> tuple | None:
    """The base_gemm config to run a pass fused with (FUSED decides), None for the unfused path. a: x or dy; w the
    frozen weight (w_t: stored (N, K)); u the buffer the pass's gate fills, the extra-K operand (forward u,
    backward dhl: what routed_forward / routed_backward are then given); v its weight (R or R+E rows); side the
    side tiles' operand (forward [A_cat; Wr parts], backward B_cat^T)."""
    mode = FUSED
    if mode not in _CHOICES:
        raise ValueError(f"mol.kernels.routed_gemm.FUSED={mode!r}; use one of {_CHOICES}")
    if mode == "off" or TensorDescriptor is None or bg.BASE_GEMM == "cublas" or a.shape[0] == 0:
        return None
    if mode == "auto" and a.shape[0] <= bg.EAGER_CUBLAS_ROWS:
        # eager calls this small run cuBLAS (base_gemm's rule); captured ones too here, so that a graph captures
        # the kernels its eager warm-up compiled (graph_tokens warms up eagerly, then captures)
        return None
    cfg, (kb, kb_t, _, _, kv, _) = bg.plan(a, w, w_t, u, v, False, bias)
    if not bg.triton_supported(a, kb, None, kv, bias, kb_t) or not bg._tma_ok(side):
        return None
    if cfg is not None and cfg[0] == "gluon":  # the tuned base GEMM is the Gluon kernel, which has no fused form
        cfg = None
    if cfg is None and mode == "on":
        cfg = bg._INTERPRET_CONFIG if gl._INTERPRET else bg.CONFIGS[0]
    return cfg


def _quotas(num_tiles: int, n_side: int, side_cost: float, progs: int) -> tuple[int, int, int]:
    """(slack, q_slack, q_other): the side tiles each program claims before its base tiles. The base tiles leave
    `slack` programs one short (progs - num_tiles % progs, none when that divides); those take up to a base tile's
    worth of side tiles each (side_cost: a side tile's work over a base tile's) and the others share the rest
    evenly, so the side work fills the last wave's gap and spreads what does not fit. SIDE_QUOTA overrides both
    quotas (tests: 0, only base tiles claim)."""
    slack = progs - num_tiles % progs if num_tiles % progs else 0
    q_slack = max(1, int(1.0 / side_cost))
    rest = max(0, n_side - slack * q_slack)
    q_other = -(-rest // (progs - slack)) if progs > slack else 0
    if SIDE_QUOTA is not None:
        q_slack = q_other = SIDE_QUOTA
    return slack, q_slack, q_other


def _gate_tile(bm: int, ep: int, r_tot: int, backward: bool) -> tuple[int, int]:
    """(tokens, columns) a step of the gate epilogue takes: the largest that compiled for sm_90 without spilling
    inside the 8-warp kernel (triton 3.6, RESULTS' compiler report of session 31). The epilogue is a chain of
    dependent L2 round trips per step, so fewer, larger steps: all BM tokens at once where E <= 16 (columns 32
    forward, 16 backward), 64 tokens and 32 columns for more experts (EP = 32: (128, 32) spilled 176-184 bytes)."""
    if gl._INTERPRET:
        return bm, max(16, min(64, gl._pow2(r_tot)))
    if ep <= 16:
        return bm, min(16 if backward else 32, max(16, gl._pow2(r_tot)))
    return min(64, bm), min(32, max(16, gl._pow2(r_tot)))


def _launch(a, b, b_t, s, s_t, v, v_t, bias, side, u, hl, noise, gates, ids, stats, aux, scale, c_lb, c_z,
            part_scale, n_side, kr, su, r_tot, e, rank, top_k, kind, backward, has_aux, nparts, cfg):
    """c = a @ op(b) + u @ op(v), u the gate's output from side = a @ op(s) (routed_forward / routed_backward
    name the operands): the descriptors, the schedule (_quotas), the gate step (_gate_tile), one launch."""
    bm, bn, bk, group_m, warps, stages, epi = cfg
    M, K = a.shape
    N = b.shape[0] if b_t else b.shape[1]
    c = gl._alloc((M, N), a)
    sn = SIDE_N if not gl._INTERPRET else 16
    a_d = TensorDescriptor.from_tensor(a, [bm, bk])
    b_d = TensorDescriptor.from_tensor(b, [bn, bk] if b_t else [bk, bn])
    s_d = TensorDescriptor.from_tensor(s, [sn, bk] if s_t else [bk, sn])
    v_d = TensorDescriptor.from_tensor(v, [bn, bk] if v_t else [bk, bn])
    c_d = TensorDescriptor.from_tensor(c, [bm, bn // epi])
    num_m, num_n = triton.cdiv(M, bm), triton.cdiv(N, bn)
    progs = min(bg._num_sms(a.device), num_m * num_n)
    n_side_tiles = num_m * triton.cdiv(n_side, sn)
    slack, q_slack, q_other = _quotas(num_m * num_n, n_side_tiles, sn / bn, progs)
    sync = gl.zeroed_workspace(a.device, "routed_gemm", 2 + 3 * num_m)
    ep = rl._ep(e)
    gbt, br = _gate_tile(bm, ep, r_tot, backward)
    _routed_gemm_kernel[(progs,)](
        a_d, b_d, s_d, v_d, c_d, bias if bias is not None else a, side, u, sync,
        hl, noise if noise is not None else side, gates, ids, stats, aux,
        float(scale), c_lb, c_z, part_scale,
        M, N, K, n_side, side.stride(0), kr, su[0], su[1], r_tot, e, hl.stride(0), slack, q_slack, q_other,
        BM=bm, BN=bn, BK=bk, GROUP_M=group_m, SN=sn, B_T=b_t, S_T=s_t, V_T=v_t, HAS_BIAS=bias is not None,
        EPI_SPLIT=epi, NUM_PROGS=progs, F32_DOT=gl._INTERPRET, BACKWARD=backward, RANK=rank, TOPK=top_k,
        KIND=kind, EP=ep, GBT=gbt, BR=br, HAS_NOISE=noise is not None, HAS_AUX=has_aux, SELECT=rl._gate_select(),
        NPARTS=nparts, num_warps=warps, num_stages=stages)
    return c


def routed_forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, w_ext: torch.Tensor,
                   stats: torch.Tensor, b_cat: torch.Tensor, u: torch.Tensor, noise: torch.Tensor | None, rank: int,
                   kind: int, top_k: int, scale: float, lb_coef: float, z_coef: float, cfg: tuple
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, hl, gates, ids, u, aux) of the routed forward in one launch: w_ext and the zeroed stats as
    routed_lora.route_shrink_gemm builds them ([A_cat; Wr's ROUTER_PARTS 16-bit parts], (R + parts*E, in)),
    b_cat (R, out) as gl._b_cat gives it, u a (T, R) buffer in x's dtype that the gate fills, cfg a base_gemm
    config (config())."""
    t = x.shape[0]
    e = stats.shape[0] // 2 - 1
    r_tot = rank * e
    n_side = w_ext.shape[0]
    hl = gl._alloc((t, n_side), x, torch.float32)
    gates = gl._alloc((t, top_k), x, torch.float32)
    ids = gl._alloc((t, top_k), x, torch.int64)
    aux = gl._alloc((), x, torch.float32)
    c_lb, c_z = rl._aux_coefs(lb_coef, z_coef, e, t, top_k)
    v, v_t = bg._row_major(b_cat, False)
    y = _launch(x, w, True, w_ext, True, v, v_t, bias, hl, u, hl, noise, gates, ids, stats, aux, scale, c_lb, c_z,
                1.0 / rl._part_scale(x.dtype), n_side, r_tot, (r_tot, 1), r_tot, e, rank, top_k, kind, False,
                False, (n_side - r_tot) // e, cfg)
    return y, hl, gates, ids, u, aux


def routed_backward(dy: torch.Tensor, w: torch.Tensor, b_t: torch.Tensor, hl: torch.Tensor,
                    noise: torch.Tensor | None, gates: torch.Tensor, ids: torch.Tensor, stats: torch.Tensor,
                    daux: torch.Tensor | None, w_dx: torch.Tensor, dhl: torch.Tensor, rank: int, kind: int,
                    scale: float, lb_coef: float, z_coef: float, cfg: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dhl) of the routed backward in one launch: dx = dy W + dhl w_dx, dhl = gate_bwd(dy b_t, ...), with
    b_t = B_cat^T (out, R) row-major and w_dx = [A_cat; Wr] (R+E, in) in dy's dtype; dhl a (T, R+E) buffer as
    routed_lora.gate_bwd_impl makes it (_dhl_buffer), which the gate fills; cfg from config()."""
    t = dy.shape[0]
    r_tot = b_t.shape[1]
    e = r_tot // rank
    top_k = ids.shape[1]
    du = gl._alloc((t, r_tot), dy, torch.float32)
    c_lb, c_z = rl._aux_coefs(lb_coef, z_coef, e, t, top_k)
    dx = _launch(dy, w, False, b_t, False, w_dx, False, None, du, dhl, hl, noise, gates, ids, stats,
                 daux if daux is not None else stats, scale, c_lb, 2.0 * c_z, 1.0, r_tot, r_tot + e,
                 (dhl.stride(0), dhl.stride(1)), r_tot, e, rank, top_k, kind, True, daux is not None, 1, cfg)
    return dx, dhl
