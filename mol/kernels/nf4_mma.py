"""NF4 decode GEMM on tensor cores from registers (Gluon, sm_80+): y = x @ W^T for 1 <= T <= 16 rows of x.

The Triton small-T kernel (mol/kernels/nf4.py) dequantizes a tile, stores it to shared memory and runs a wgmma on
it, one step after another: ~11.5 us at 4096^2 whatever T (RESULTS NF4 run 10). Here the dequantized levels never
leave the registers. Each thread loads whole code words (8 weights of one row), looks the levels up with byte
permutes (as the Triton kernel), and hands them to `mma.sync` (m16n8k16) as its A operand directly.

That works because a GEMM does not care in which order it sums over k, as long as both operands agree. The MMA
wants thread (g, t) of a warp to hold, in each 16-wide k step, the pairs at k = 2t and 2t + 8 of rows g and g + 8;
a code word holds 8 consecutive k of one row. So for each 64-wide chunk of k, thread t takes the two words at
physical k = 16t .. 16t + 15 and we *relabel* k: physical k = 16 t + 8 w + 2 q + b (t: lane, w: word, q: pair in
word, b: element in pair) is logical k' = 32 w + 16 q1 + 8 q0 + 2 t + b. The relabelling is a permutation of k's
bits, written as reshape + permute, which moves no data; x (the B operand) is loaded with the same relabelling.

Each 64-wide chunk is one absmax block (blocksize 64; 128 and 256 too), so the block scale multiplies the chunk's
float32 MMA result per row instead of every weight. Split-K and the ticket that sums the partials in split order
work as in the Triton kernel. Layouts are built here, on the host, and passed as constexprs.
"""

from __future__ import annotations

import torch
import triton

CHUNK = 64  # k per MMA chunk: 4 threads x 2 code words x 8 weights
# The relabelling of k, as permutations of its bits (module doc): a chunk's levels arrive as (m, t1, t0, w, b, q0, q1)
# (the join tree's order), x as (t1, t0, w, q1, q0, b, token); both go to logical (w, q1, q0, t1, t0, b)
A_PERM = (0, 3, 6, 5, 1, 2, 4)
B_PERM = (2, 3, 4, 0, 1, 5, 6)

try:  # Gluon ships with Triton >= 3.5; the decode path falls back to the Triton kernel without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    AVAILABLE = True
    # a CTA-wide barrier: gl.thread_barrier in Triton 3.5-3.6, gl.barrier from 3.7 on
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _A_PERM = gl.constexpr(A_PERM)
    _B_PERM = gl.constexpr(B_PERM)
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False




def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


def layouts(num_warps: int, m_rep: int, block_t: int, cpl: int = 1):
    """(words, x, scales, mma) layouts for BLOCK_M = 16 * num_warps * m_rep rows, block_t (8 or 16) tokens and slabs of
    cpl 64-wide chunks loaded at once (the chunk index in registers, outermost)."""
    bm = 16 * num_warps * m_rep
    warp_m = [[16 << i, 0] for i in range(_log2(num_warps))]
    rep_m = [[16 * num_warps << i, 0] for i in range(_log2(m_rep))]
    # code words (BLOCK_M, 8 cpl) int32: lane (g, t) holds words 2t, 2t + 1 (registers) of rows g, g + 8 (+ reps)
    words = gl.DistributedLinearLayout(reg_bases=[[0, 1], [8, 0]] + rep_m + [[0, 8 << i] for i in range(_log2(cpl))],
                                       lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                       warp_bases=warp_m, block_bases=[], shape=[bm, 8 * cpl])
    # x slab as int32 pairs (32 cpl, block_t) at physical k / 2: lane (g, t) holds pairs 8t .. 8t + 7, i.e.
    # k = 16t .. 16t + 15 (registers), of tokens g, g + 8
    x = gl.DistributedLinearLayout(reg_bases=[[1, 0], [2, 0], [4, 0]] + ([[0, 8]] if block_t == 16 else [])
                                   + [[32 << i, 0] for i in range(_log2(cpl))],
                                   lane_bases=[[8, 0], [16, 0], [0, 1], [0, 2], [0, 4]],
                                   warp_bases=[[0, 0]] * _log2(num_warps), block_bases=[],
                                   shape=[CHUNK // 2 * cpl, block_t])
    # block scales (BLOCK_M, cpl): the MMA result's row layout (lane g, registers g + 8 and reps), chunks in registers
    scales = gl.DistributedLinearLayout(reg_bases=[[8, 0]] + rep_m + [[0, 1 << i] for i in range(_log2(cpl))],
                                        lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                        warp_bases=warp_m, block_bases=[], shape=[bm, cpl])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    return words, x, scales, mma


if AVAILABLE:
    @gluon.jit
    def _prmt(a, b, sel):
        return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _levels(w, t0, t1, t2, t3, t4, t5, t6, t7, DT: gl.constexpr):
        """The 8 levels of code words w as DT tensors in element order (element 2i: high nibble of byte i):
        byte permutes of the eight level-byte tables (see mol/kernels/nf4.py, _prmt_levels)."""
        sel = w & 0x77777777
        hilo = gl.inline_asm_elementwise("shr.b32 $0, $1, 1;\n\tlop3.b32 $0, $0, 0x44444444, $2, 0xEA;", "=r,r,r",
                                         [w, gl.full(w.shape, 0x32103210, gl.int32, w.type.layout)],
                                         dtype=gl.int32, is_pure=True, pack=1)
        sel_hi = gl.inline_asm_elementwise("shr.b32 $0, $1, 16;", "=r,r", [sel], dtype=gl.int32, is_pure=True,
                                           pack=1)
        hilo_hi = gl.inline_asm_elementwise("shr.b32 $0, $1, 16;", "=r,r", [hilo], dtype=gl.int32, is_pure=True,
                                            pack=1)
        lo = _prmt(_prmt(t0, t1, sel), _prmt(t2, t3, sel), hilo)
        hi = _prmt(_prmt(t4, t5, sel), _prmt(t6, t7, sel), hilo)
        lo2 = _prmt(_prmt(t0, t1, sel_hi), _prmt(t2, t3, sel_hi), hilo_hi)
        hi2 = _prmt(_prmt(t4, t5, sel_hi), _prmt(t6, t7, sel_hi), hilo_hi)
        # int32 pairs of levels (elements 0-1, 2-3, 4-5, 6-7), split into their 16-bit halves
        e0, e1 = gl.inline_asm_elementwise("{ .reg .b32 p; prmt.b32 p, $2, $3, 0x4051; mov.b32 {$0, $1}, p; }",
                                           "=h,=h,r,r", [lo, hi], dtype=(DT.value, DT.value), is_pure=True, pack=1)
        e2, e3 = gl.inline_asm_elementwise("{ .reg .b32 p; prmt.b32 p, $2, $3, 0x6273; mov.b32 {$0, $1}, p; }",
                                           "=h,=h,r,r", [lo, hi], dtype=(DT.value, DT.value), is_pure=True, pack=1)
        e4, e5 = gl.inline_asm_elementwise("{ .reg .b32 p; prmt.b32 p, $2, $3, 0x4051; mov.b32 {$0, $1}, p; }",
                                           "=h,=h,r,r", [lo2, hi2], dtype=(DT.value, DT.value), is_pure=True, pack=1)
        e6, e7 = gl.inline_asm_elementwise("{ .reg .b32 p; prmt.b32 p, $2, $3, 0x6273; mov.b32 {$0, $1}, p; }",
                                           "=h,=h,r,r", [lo2, hi2], dtype=(DT.value, DT.value), is_pure=True, pack=1)
        return e0, e1, e2, e3, e4, e5, e6, e7

    @gluon.jit
    def _a_operand(w, tabs, BM: gl.constexpr, DT: gl.constexpr, A_LAYOUT: gl.constexpr):
        """The (BM, 64) A operand of one chunk from its (BM, 8) code words, at logical k (see the module doc)."""
        e0, e1, e2, e3, e4, e5, e6, e7 = _levels(w, tabs[0], tabs[1], tabs[2], tabs[3], tabs[4], tabs[5],
                                                 tabs[6], tabs[7], DT)
        # (m, word, b, q0, q1), word = 4 t1 + 2 t0 + w
        e = gl.join(gl.join(gl.join(e0, e1), gl.join(e2, e3)), gl.join(gl.join(e4, e5), gl.join(e6, e7)))
        e = gl.reshape(e, [BM, 2, 2, 2, 2, 2, 2])  # (m, t1, t0, w, b, q0, q1)
        e = gl.permute(e, _A_PERM.value)  # (m, w, q1, q0, t1, t0, b): logical k' high to low
        return gl.convert_layout(gl.reshape(e, [BM, 64]), A_LAYOUT)

    @gluon.jit
    def _b_operand(xp, BT: gl.constexpr, DT: gl.constexpr, B_LAYOUT: gl.constexpr):
        """x's (64, BT) chunk, loaded as (32, BT) int32 pairs at physical k, relabelled to logical k' (the A
        operand's order). (x is carried as int32: 16-bit values carried across the prefetch loop cost a repack.)"""
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xp], dtype=(DT.value, DT.value),
                                           is_pure=True, pack=1)
        xv = gl.reshape(gl.permute(gl.join(lo, hi), [0, 2, 1]), [64, BT])  # physical k = 2 pair + half
        xv = gl.reshape(xv, [2, 2, 2, 2, 2, 2, BT])  # (t1, t0, w, q1, q0, b, token)
        xv = gl.permute(xv, _B_PERM.value)  # (w, q1, q0, t1, t0, b, token)
        return gl.convert_layout(gl.reshape(xv, [64, BT]), B_LAYOUT)

    @gluon.jit
    def _tables(code_ptr, DT: gl.constexpr, L: gl.constexpr):
        """The 16 NF4 levels in DT as eight int32 byte tables for prmt (mol/kernels/nf4.py, _prmt_tables)."""
        i = gl.arange(0, 16, layout=L)
        bits = gl.load(code_ptr + i).to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        sh = 8 * (i % 4)
        g = i // 4
        lo = (bits & 0xFF) << sh
        hi = (bits >> 8) << sh
        return (gl.sum(gl.where(g == 0, lo, 0), 0), gl.sum(gl.where(g == 1, lo, 0), 0),
                gl.sum(gl.where(g == 2, lo, 0), 0), gl.sum(gl.where(g == 3, lo, 0), 0),
                gl.sum(gl.where(g == 0, hi, 0), 0), gl.sum(gl.where(g == 1, hi, 0), 0),
                gl.sum(gl.where(g == 2, hi, 0), 0), gl.sum(gl.where(g == 3, hi, 0), 0))

    @gluon.jit
    def _chunk(w, xv, s, acc, tabs, BM: gl.constexpr, BT: gl.constexpr, DT: gl.constexpr, MMA: gl.constexpr):
        """acc + s * (the chunk's 64 k of W) @ (x's), s: the chunk's block scale per row, (BM, 1)."""
        a = _a_operand(w, tabs, BM, DT, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
        b = _b_operand(xv, BT, DT, gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
        s = gl.convert_layout(gl.reshape(s, [BM]), gl.SliceLayout(1, MMA))
        return acc + mma_v2(a, b, gl.zeros([BM, BT], gl.float32, MMA)) * s[:, None]

    @gluon.jit
    def _slab(w, xv, sc, acc, tabs, BM: gl.constexpr, BT: gl.constexpr, CPL: gl.constexpr, DT: gl.constexpr,
              MMA: gl.constexpr):
        """The CPL chunks of one slab: words (BM, 8 CPL), x pairs (32 CPL, BT), block scales (BM, CPL)."""
        if CPL == 1:
            acc = _chunk(w, xv, sc, acc, tabs, BM, BT, DT, MMA)
        else:  # halve the slab (chunk index: outermost) and recurse
            w0, w1 = gl.split(gl.permute(gl.reshape(w, [BM, 2, 8 * CPL // 2]), [0, 2, 1]))
            x0, x1 = gl.split(gl.permute(gl.reshape(xv, [2, 32 * CPL // 2, BT]), [1, 2, 0]))
            s0, s1 = gl.split(gl.permute(gl.reshape(sc, [BM, 2, CPL // 2]), [0, 2, 1]))
            acc = _slab(w0, x0, s0, acc, tabs, BM, BT, CPL // 2, DT, MMA)
            acc = _slab(w1, x1, s1, acc, tabs, BM, BT, CPL // 2, DT, MMA)
        return acc

    @gluon.jit
    def _scale_loads(absmax_ptr, nabs_ptr, blk, NBS: gl.constexpr, NESTED: gl.constexpr):
        """What a slab's block scales are made of: (absmax codes, nested absmax), or (absmax, absmax) if not nested."""
        if NESTED:
            a = gl.load(absmax_ptr + blk).to(gl.int32)
            nb = gl.load(nabs_ptr + blk // NBS)
        else:
            a = gl.load(absmax_ptr + blk)
            nb = a
        return a, nb

    @gluon.jit
    def _scales(a, nb, ncode_ptr, off, NESTED: gl.constexpr):
        if NESTED:
            s = gl.load(ncode_ptr + a) * nb + off  # the 256-entry map stays in L1
        else:
            s = a
        return s

    @gluon.jit
    def _nf4_mma_kernel(x_ptr, codes_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr,
                        y_ptr, ws_ptr, ticket_ptr, T, N, stride_xt, stride_yt,
                        K: gl.constexpr, BS: gl.constexpr, NBS: gl.constexpr, NESTED: gl.constexpr,
                        HAS_BIAS: gl.constexpr, BT: gl.constexpr, BM: gl.constexpr, CPL: gl.constexpr,
                        SPLIT_K: gl.constexpr, PREFETCH: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                        S_LAYOUT: gl.constexpr, MMA: gl.constexpr):
        """y[t, n] = sum_k x[t, k] W[n, k] (+ bias[n]) for BM rows n of this program and t < T (BT >= T).
        K is read in slabs of CPL 64-wide chunks, the next slab's loads issued before this one's math. Program
        (i, j) covers the j-th of SPLITS runs of slabs; with SPLITS > 1 the last program of a row block to take
        its ticket (zero on entry, left zero) sums the float32 partials in split order."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        NSL: gl.constexpr = K // (64 * CPL)  # slabs per row
        SPS: gl.constexpr = (NSL + SPLIT_K - 1) // SPLIT_K  # slabs per split
        SPLITS: gl.constexpr = (NSL + SPS - 1) // SPS
        KW: gl.constexpr = K // 8  # code words per row
        ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
        COLS: gl.constexpr = gl.SliceLayout(0, MMA)
        pid = gl.program_id(0)
        s_first = gl.program_id(1) * SPS
        s_last = gl.minimum(s_first + SPS, NSL) - 1

        # code words: rows clamped to N - 1 (loads need no mask; those rows are not stored)
        rows_w = gl.minimum(pid * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, W_LAYOUT)), N - 1)
        wptr = (codes_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + rows_w.to(gl.int64)[:, None] * KW
                + gl.arange(0, 8 * CPL, layout=gl.SliceLayout(0, W_LAYOUT))[None, :])
        # x as int32 pairs at physical k, tokens past T read as zero
        k_x = gl.arange(0, 32 * CPL, layout=gl.SliceLayout(1, X_LAYOUT))
        t_x = gl.arange(0, BT, layout=gl.SliceLayout(0, X_LAYOUT))
        xptr = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + t_x[None, :] * (stride_xt // 2) + k_x[:, None]
        xmask = (t_x < T)[None, :] & (k_x < 32 * CPL)[:, None]
        # each (row, chunk)'s absmax block: flat index of its first weight // BS (a chunk never spans two blocks)
        rows_s = gl.minimum(pid * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, S_LAYOUT)), N - 1).to(gl.int64)
        chunk_s = gl.arange(0, CPL, layout=gl.SliceLayout(0, S_LAYOUT))
        flat_s = rows_s[:, None] * K + chunk_s[None, :] * 64

        # the first slab's loads go out before the prologue's table math
        w_next = gl.load(wptr + s_first * (8 * CPL))
        x_next = gl.load(xptr + s_first * (32 * CPL), mask=xmask, other=0)
        a_next, nb_next = _scale_loads(absmax_ptr, nabs_ptr, (flat_s + s_first * (64 * CPL)) // BS, NBS, NESTED)
        # the levels' byte tables: every thread builds all eight from the 16 levels (no cross-thread reduction)
        tabs = _tables(code_ptr, DT, gl.BlockedLayout([16], [32], [gl.num_warps()], [0]))
        if NESTED:
            off = gl.load(offset_ptr)
        else:
            off = 0.0

        acc = gl.zeros([BM, BT], gl.float32, MMA)
        if PREFETCH:  # slab s + 1's loads are issued before slab s's math; the last slab is peeled
            for sl in range(s_first, s_last):
                w = w_next
                xv = x_next
                a = a_next
                nb = nb_next
                w_next = gl.load(wptr + (sl + 1) * (8 * CPL))
                x_next = gl.load(xptr + (sl + 1) * (32 * CPL), mask=xmask, other=0)
                a_next, nb_next = _scale_loads(absmax_ptr, nabs_ptr, (flat_s + (sl + 1) * (64 * CPL)) // BS, NBS,
                                               NESTED)
                acc = _slab(w, xv, _scales(a, nb, ncode_ptr, off, NESTED), acc, tabs, BM, BT, CPL, DT, MMA)
            acc = _slab(w_next, x_next, _scales(a_next, nb_next, ncode_ptr, off, NESTED), acc, tabs, BM, BT, CPL, DT,
                        MMA)
        else:
            acc = _slab(w_next, x_next, _scales(a_next, nb_next, ncode_ptr, off, NESTED), acc, tabs, BM, BT, CPL, DT,
                        MMA)
            for sl in range(s_first + 1, s_last + 1):
                w = gl.load(wptr + sl * (8 * CPL))
                xv = gl.load(xptr + sl * (32 * CPL), mask=xmask, other=0)
                a, nb = _scale_loads(absmax_ptr, nabs_ptr, (flat_s + sl * (64 * CPL)) // BS, NBS, NESTED)
                acc = _slab(w, xv, _scales(a, nb, ncode_ptr, off, NESTED), acc, tabs, BM, BT, CPL, DT, MMA)

        offs_n = pid * BM + gl.arange(0, BM, layout=ROWS)
        offs_t = gl.arange(0, BT, layout=COLS)
        n_mask = offs_n < N
        out_mask = (offs_t < T)[None, :] & n_mask[:, None]
        if SPLITS > 1:
            ws_io = offs_t[None, :] * N + offs_n[:, None]
            gl.store(ws_ptr + gl.program_id(1) * (BT * N) + ws_io, acc, mask=out_mask)
            _cta_barrier()  # every thread's partial is stored before the ticket publishes them
            ticket = gl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel")
            if ticket == SPLITS - 1:
                _cta_barrier()
                acc = gl.zeros([BM, BT], gl.float32, MMA)
                for j in range(SPLITS):
                    acc += gl.load(ws_ptr + j * (BT * N) + ws_io, mask=out_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[:, None]
                gl.store(y_ptr + offs_t[None, :] * stride_yt + offs_n[:, None], acc.to(DT), mask=out_mask)
                gl.store(ticket_ptr + pid, 0)
        else:
            if HAS_BIAS:
                acc += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[:, None]
            gl.store(y_ptr + offs_t[None, :] * stride_yt + offs_n[:, None], acc.to(DT), mask=out_mask)

# (num_warps, m_rep, cpl, split_k): BLOCK_M = 16 * num_warps * m_rep rows per program, slabs of cpl 64-wide chunks,
# split_k runs of slabs per row block
CONFIGS = [dict(num_warps=w, m_rep=m, cpl=c, split_k=s, prefetch=pf) for w, m, c, s, pf in
           [(4, 1, 2, 8, False), (4, 1, 4, 8, False), (4, 2, 2, 8, False), (4, 1, 2, 16, True), (4, 1, 1, 16, True),
            (4, 2, 2, 4, True), (8, 1, 2, 8, False), (4, 1, 2, 4, True)]]


def supported(packed, x: torch.Tensor) -> bool:
    """Whether the MMA decode kernel takes this weight and x: Gluon present, a CUDA GPU of compute capability
    >= 8.0, 16-bit x with 1..16 rows, K a multiple of 64, absmax blocks of 64, 128 or 256 values (so a 64-wide
    chunk never spans two), contiguous codes."""
    return (AVAILABLE and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 1 <= x.shape[0] <= 16
            and len(packed.shape) == 2 and packed.shape[1] == x.shape[1] and x.shape[1] % CHUNK == 0
            and packed.blocksize in (64, 128, 256) and packed.codes.is_contiguous()
            and torch.cuda.get_device_capability(x.device)[0] >= 8)


def splits(k: int, cpl: int, split_k: int) -> int:
    """The programs per row block the kernel runs (its SPLITS): K's slabs of cpl 64-wide chunks cut into split_k
    runs of equal length, the last possibly shorter, none empty."""
    n_slabs = k // (CHUNK * cpl)
    per_split = triton.cdiv(n_slabs, max(1, min(split_k, n_slabs)))
    return triton.cdiv(n_slabs, per_split)


def _cpl(k: int, cpl: int) -> int:
    while k % (CHUNK * cpl):  # slabs must tile K
        cpl //= 2
    return cpl


def nf4_matmul_mma(x: torch.Tensor, packed, bias: torch.Tensor | None = None, config: dict | None = None,
                   ws: torch.Tensor | None = None, tickets: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (T, K) with T <= 16, W NF4 (N, K); y in x's dtype. `config`: one of CONFIGS."""
    from mol.kernels import grouped_lora as glora
    from mol.kernels.nf4 import _tensors

    if not supported(packed, x):
        raise ValueError(f"nf4_matmul_mma: unsupported x {tuple(x.shape)} {x.dtype} on {x.device} for weight "
                         f"{packed.shape} (blocksize {packed.blocksize}); needs 16-bit CUDA x with 1..16 rows, "
                         "in_features % 64 == 0, blocksize 64/128/256 and Gluon")
    cfg = config or CONFIGS[0]
    t, k = x.shape
    n = packed.shape[0]
    x = x.contiguous()
    if x.data_ptr() % 4:  # x is read as int32 pairs (an odd offset view is the rare case)
        x = x.clone()
    bt = 8 if t <= 8 else 16
    nw, mr, cpl = cfg["num_warps"], cfg["m_rep"], _cpl(k, cfg["cpl"])
    bm = 16 * nw * mr
    n_splits = splits(k, cpl, cfg["split_k"])
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if ws is None:
        ws = torch.empty((n_splits, bt, n) if n_splits > 1 else (1,), dtype=torch.float32, device=x.device)
    if tickets is None:
        tickets = glora.zeroed_workspace(x.device, "nf4_tickets", max(triton.cdiv(n, bm), 1024))
    nabs, ncode, off = _tensors(packed)
    w_layout, x_layout, s_layout, mma = layouts(nw, mr, bt, cpl)
    _nf4_mma_kernel[(triton.cdiv(n, bm), n_splits)](
        x, packed.codes, packed.absmax, packed.code, nabs, ncode, off, bias if bias is not None else x, y, ws,
        tickets, t, n, x.stride(0), y.stride(0), K=k, BS=packed.blocksize, NBS=packed.nested_blocksize,
        NESTED=packed.nested, HAS_BIAS=bias is not None, BT=bt, BM=bm, CPL=cpl, SPLIT_K=n_splits, PREFETCH=cfg.get("prefetch", True),
        W_LAYOUT=w_layout, X_LAYOUT=x_layout, S_LAYOUT=s_layout, MMA=mma, num_warps=nw)
    return y


MIN_T = 3  # below, the Triton FMA path (mol/kernels/nf4.py) is faster: no MMA padding of T to 8
_CHOSEN: dict[tuple, dict] = {}


def nf4_matmul_decode(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """nf4_matmul_mma with its config tuned per (device, shape, dtype, T bucket): the first call of a key times
    every CONFIG under CUDA-graph replay and keeps the fastest (a call inside a graph capture, which cannot time,
    runs CONFIGS[0] and tunes nothing)."""
    from mol.kernels import grouped_lora as glora

    bt = 8 if x.shape[0] <= 8 else 16
    key = (x.device, tuple(packed.shape), packed.blocksize, packed.nested, bias is not None, x.dtype, bt)
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return nf4_matmul_mma(x, packed, bias, cfg)
    if glora._capturing(x.device):
        return nf4_matmul_mma(x, packed, bias, CONFIGS[0])
    timed = []
    for c in CONFIGS:
        ws = torch.empty((splits(x.shape[1], 1, c["split_k"]), bt, packed.shape[0]), dtype=torch.float32,
                         device=x.device)
        timed.append((glora.bench_graphed(lambda c=c, ws=ws: nf4_matmul_mma(x, packed, bias, c, ws=ws)), c))
    _CHOSEN[key] = cfg = min(timed, key=lambda tc: tc[0])[1]
    return nf4_matmul_mma(x, packed, bias, cfg)
