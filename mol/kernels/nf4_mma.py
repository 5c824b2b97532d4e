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

A 64-wide chunk never spans two absmax blocks (blocksize 64, 128 or 256), so the block scale multiplies the
chunk's float32 MMA result per row instead of every weight. The warps of a program can split K among themselves
(`warps_k`: the MMA's leading batch dim; each K warp takes every warps_k-th slab of the program's run, and their
sums meet once, through shared memory, at the end), so most configs need no global split-K; where one does, the
ticket that sums the partials in split order works as in the Triton kernel. Layouts are built on the host and
passed as constexprs.

Measured on an H200 (RESULTS NF4 run 12, CUDA-graph replay): T=16 9.4 us at 4096x4096 (0.96x the bf16 GEMV),
26.0 / 25.4 us at 14336x4096 / 4096x14336 (0.78x / 0.75x), 11-26% under the Triton dot path; at T=1 the Triton
FMA path stays faster, so NF4Linear uses this kernel for 3 <= T <= 16 only. It streams the codes at 0.9-1.2 TB/s,
though a plain kernel reads them in the same narrow per-row steps at 3.4 TB/s and a cp.async pipeline with more
bytes in flight was slower (RESULTS NF4 run 13). Nor is the instruction count alone the cap: a form with x and every
block scale in shared memory, 3.7-4.4 instructions per weight in the loop (against 5.6-6.9 here) and fewer registers,
was slower still (12.9 against 10.0 us at T=16, run 14): its prologue (all of x and the scales, then a barrier)
serialises what this form overlaps. Each program's short chain of dependent steps, with few warps to hide it, is
what is left. Fewer instructions did not pay a second time either: `pairs` configs look the levels up in the Triton
kernel's shared table of level pairs (one lookup per code byte) instead of byte permutes, up to 2.2 fewer
instructions per weight, and on an H100 they are 5% faster at 4096 -> 14336 but 4-6% slower at the other two shapes
(RESULTS run 40).
"""

from __future__ import annotations

import functools

import torch

from mol.kernels import base_gemm as bg
from mol.kernels import grouped_lora as glora
from mol.kernels.nf4 import (_PAIR_DECLARE, _PAIR_LANE, _PAIR_LOOKUP0, _PAIR_LOOKUP1, _PAIR_LOOKUP2, _PAIR_LOOKUP3,
                             _PAIR_STORE, _tensors, _tickets, split_runs)

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
    # with the leading K-warp dim
    _A_PERM3 = gl.constexpr([0] + [d + 1 for d in A_PERM])
    _B_PERM3 = gl.constexpr([0] + [d + 1 for d in B_PERM])
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False




def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


# built once per config: the four layouts cost ~45 µs of host time to build, most of an eager decode call's own
@functools.lru_cache(maxsize=None)
def layouts(warps_k: int, warps_m: int, m_rep: int, block_t: int, cpl: int = 1):
    """(words, x, scales, mma) layouts, each with a leading dim of warps_k: warps_k warps take turns along K (each its
    own slabs, summed at the end), warps_m split BLOCK_M = 16 * warps_m * m_rep rows; block_t (8 or 16) tokens,
    slabs of cpl 64-wide chunks loaded at once (the chunk index in registers, outermost)."""
    bm = 16 * warps_m * m_rep
    # warp ids: the M warps first, then the K warps (the MMA layout's order for warps_per_cta [warps_k, warps_m, 1])
    warps = [[0, 16 << i, 0] for i in range(_log2(warps_m))] + [[1 << i, 0, 0] for i in range(_log2(warps_k))]
    rep_m = [[0, 16 * warps_m << i, 0] for i in range(_log2(m_rep))]
    # code words (warps_k, BLOCK_M, 8 cpl) int32: lane (g, t) holds words 2t, 2t + 1 (registers) of rows g, g + 8
    words = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 8, 0]] + rep_m + [[0, 0, 8 << i] for i in range(_log2(cpl))],
        lane_bases=[[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=warps, block_bases=[], shape=[warps_k, bm, 8 * cpl])
    # x slab as int32 pairs (warps_k, 32 cpl, block_t) at physical k / 2: lane (g, t) holds pairs 8t .. 8t + 7, i.e.
    # k = 16t .. 16t + 15 (registers), of tokens g, g + 8; the same for the M warps
    x = gl.DistributedLinearLayout(
        reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0]] + ([[0, 0, 8]] if block_t == 16 else [])
        + [[0, 32 << i, 0] for i in range(_log2(cpl))],
        lane_bases=[[0, 8, 0], [0, 16, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
        warp_bases=[[0, 0, 0]] * _log2(warps_m) + [[1 << i, 0, 0] for i in range(_log2(warps_k))], block_bases=[],
        shape=[warps_k, CHUNK // 2 * cpl, block_t])
    # block scales (warps_k, BLOCK_M, cpl): the MMA result's row layout (lane g, registers g + 8 and reps)
    scales = gl.DistributedLinearLayout(
        reg_bases=[[0, 8, 0]] + rep_m + [[0, 0, 1 << i] for i in range(_log2(cpl))],
        lane_bases=[[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=warps, block_bases=[], shape=[warps_k, bm, cpl])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps_k, warps_m, 1], instr_shape=[1, 16, 8])
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
    def _pair_fill(code_ptr, DT: gl.constexpr):
        """Declare the shared table of level pairs and fill it (as mol/kernels/nf4.py's _pair_table_fill: entry e,
        copy c at word 32 e + c holds the levels of codes e >> 4, low half, and e & 15, high half); ends with a CTA
        barrier."""
        L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [gl.num_warps(), 1], [1, 0])
        e = gl.arange(0, 256, layout=gl.SliceLayout(1, L))
        lo = gl.load(code_ptr + e // 16).to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        hi = gl.load(code_ptr + e % 16).to(DT).to(gl.int16, bitcast=True).to(gl.int32) << 16
        word = e[:, None] * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, L))[None, :]
        v = (lo | hi)[:, None] + word * 0
        one = gl.full([1], 0, gl.int32, gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))  # one declaration
        gl.inline_asm_elementwise(_PAIR_DECLARE, "=r,r", [one], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise(_PAIR_STORE, "=r,r,r", [word * 4, v], dtype=gl.int32, is_pure=False, pack=1)
        _cta_barrier()

    @gluon.jit
    def _pair_lanes(w):
        """4 * the lane holding each element of w (its copy's byte offset in the pair table), in w's layout."""
        return gl.inline_asm_elementwise(_PAIR_LANE, "=r,r", [w], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _pair_levels(w, lanes, DT: gl.constexpr):
        """The 8 levels of code words w as DT tensors in element order, one pair-table lookup per byte (a
        multiply-high for the shift, a lop3 for the mask and the lane's copy, an LDS; mol/kernels/nf4.py, LUT=5)."""
        p0 = gl.inline_asm_elementwise(_PAIR_LOOKUP0, "=r,r,r", [w, lanes], dtype=gl.int32, is_pure=True, pack=1)
        p1 = gl.inline_asm_elementwise(_PAIR_LOOKUP1, "=r,r,r", [w, lanes], dtype=gl.int32, is_pure=True, pack=1)
        p2 = gl.inline_asm_elementwise(_PAIR_LOOKUP2, "=r,r,r", [w, lanes], dtype=gl.int32, is_pure=True, pack=1)
        p3 = gl.inline_asm_elementwise(_PAIR_LOOKUP3, "=r,r,r", [w, lanes], dtype=gl.int32, is_pure=True, pack=1)
        e0, e1 = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p0], dtype=(DT.value, DT.value),
                                           is_pure=True, pack=1)
        e2, e3 = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p1], dtype=(DT.value, DT.value),
                                           is_pure=True, pack=1)
        e4, e5 = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p2], dtype=(DT.value, DT.value),
                                           is_pure=True, pack=1)
        e6, e7 = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p3], dtype=(DT.value, DT.value),
                                           is_pure=True, pack=1)
        return e0, e1, e2, e3, e4, e5, e6, e7

    @gluon.jit
    def _a_operand(w, tabs, WK: gl.constexpr, BM: gl.constexpr, DT: gl.constexpr, A_LAYOUT: gl.constexpr,
                   PAIRS: gl.constexpr):
        """The (WK, BM, 64) A operand of one chunk from its (WK, BM, 8) code words, at logical k (module doc).
        tabs: the byte tables, or with PAIRS the pair table's lane offsets in w's layout."""
        if PAIRS:
            e0, e1, e2, e3, e4, e5, e6, e7 = _pair_levels(w, tabs, DT)
        else:
            e0, e1, e2, e3, e4, e5, e6, e7 = _levels(w, tabs[0], tabs[1], tabs[2], tabs[3], tabs[4], tabs[5],
                                                     tabs[6], tabs[7], DT)
        # (m, word, b, q0, q1), word = 4 t1 + 2 t0 + w
        e = gl.join(gl.join(gl.join(e0, e1), gl.join(e2, e3)), gl.join(gl.join(e4, e5), gl.join(e6, e7)))
        e = gl.reshape(e, [WK, BM, 2, 2, 2, 2, 2, 2])  # (kw, m, t1, t0, w, b, q0, q1)
        e = gl.permute(e, _A_PERM3.value)  # (kw, m, w, q1, q0, t1, t0, b): logical k' high to low
        return gl.convert_layout(gl.reshape(e, [WK, BM, 64]), A_LAYOUT)

    @gluon.jit
    def _b_operand(xp, WK: gl.constexpr, BT: gl.constexpr, DT: gl.constexpr, B_LAYOUT: gl.constexpr):
        """x's (WK, 64, BT) chunk, loaded as (WK, 32, BT) int32 pairs at physical k, relabelled to logical k' (the
        A operand's order). (x is carried as int32: 16-bit values carried across a loop cost a repack.)"""
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xp], dtype=(DT.value, DT.value),
                                           is_pure=True, pack=1)
        xv = gl.reshape(gl.permute(gl.join(lo, hi), [0, 1, 3, 2]), [WK, 64, BT])  # physical k = 2 pair + half
        xv = gl.reshape(xv, [WK, 2, 2, 2, 2, 2, 2, BT])  # (kw, t1, t0, w, q1, q0, b, token)
        xv = gl.permute(xv, _B_PERM3.value)  # (kw, w, q1, q0, t1, t0, b, token)
        return gl.convert_layout(gl.reshape(xv, [WK, 64, BT]), B_LAYOUT)

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
    def _chunk(w, xv, s, acc, tabs, WK: gl.constexpr, BM: gl.constexpr, BT: gl.constexpr, DT: gl.constexpr,
               MMA: gl.constexpr, PAIRS: gl.constexpr):
        """acc + s * (the chunk's 64 k of W) @ (x's), s: the chunk's block scale per row, (WK, BM, 1)."""
        a = _a_operand(w, tabs, WK, BM, DT, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2), PAIRS)
        b = _b_operand(xv, WK, BT, DT, gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
        s = gl.convert_layout(gl.reshape(s, [WK, BM]), gl.SliceLayout(2, MMA))
        return acc + mma_v2(a, b, gl.zeros([WK, BM, BT], gl.float32, MMA)) * s[:, :, None]

    @gluon.jit
    def _slab(w, xv, sc, acc, tabs, WK: gl.constexpr, BM: gl.constexpr, BT: gl.constexpr, CPL: gl.constexpr,
              DT: gl.constexpr, MMA: gl.constexpr, PAIRS: gl.constexpr):
        """The CPL chunks of one slab: words (WK, BM, 8 CPL), x pairs (WK, 32 CPL, BT), block scales (WK, BM, CPL).
        With PAIRS, tabs holds the pair table's lane offsets in the words' layout and is halved with them."""
        if CPL == 1:
            acc = _chunk(w, xv, sc, acc, tabs, WK, BM, BT, DT, MMA, PAIRS)
        else:  # halve the slab (chunk index: outermost) and recurse
            w0, w1 = gl.split(gl.permute(gl.reshape(w, [WK, BM, 2, 8 * CPL // 2]), [0, 1, 3, 2]))
            x0, x1 = gl.split(gl.permute(gl.reshape(xv, [WK, 2, 32 * CPL // 2, BT]), [0, 2, 3, 1]))
            s0, s1 = gl.split(gl.permute(gl.reshape(sc, [WK, BM, 2, CPL // 2]), [0, 1, 3, 2]))
            if PAIRS:
                t0, t1 = gl.split(gl.permute(gl.reshape(tabs, [WK, BM, 2, 8 * CPL // 2]), [0, 1, 3, 2]))
            else:
                t0 = tabs
                t1 = tabs
            acc = _slab(w0, x0, s0, acc, t0, WK, BM, BT, CPL // 2, DT, MMA, PAIRS)
            acc = _slab(w1, x1, s1, acc, t1, WK, BM, BT, CPL // 2, DT, MMA, PAIRS)
        return acc

    @gluon.jit
    def _scale_loads(absmax_ptr, nabs_ptr, blk, ok, NBS: gl.constexpr, NESTED: gl.constexpr):
        """What a slab's block scales are made of: (absmax codes, nested absmax), or (absmax, absmax) if not nested."""
        if NESTED:
            a = gl.load(absmax_ptr + blk, mask=ok, other=0).to(gl.int32)
            nb = gl.load(nabs_ptr + blk // NBS, mask=ok, other=0.0)
        else:
            a = gl.load(absmax_ptr + blk, mask=ok, other=0.0)
            nb = a
        return a, nb

    @gluon.jit
    def _scales(a, nb, ok, ncode_ptr, off, NESTED: gl.constexpr):
        """The block scales of a slab; zero where ok is false (a K warp past its split's last slab)."""
        if NESTED:
            s = gl.load(ncode_ptr + a) * nb + off  # the 256-entry map stays in L1
        else:
            s = a
        return gl.where(ok, s, 0.0)

    @gluon.jit
    def _nf4_mma_kernel(x_ptr, codes_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr,
                        y_ptr, ws_ptr, ticket_ptr, T, N, stride_xt, stride_yt,
                        K: gl.constexpr, BS: gl.constexpr, NBS: gl.constexpr, NESTED: gl.constexpr,
                        HAS_BIAS: gl.constexpr, BT: gl.constexpr, BM: gl.constexpr, WK: gl.constexpr,
                        CPL: gl.constexpr, SPLIT_K: gl.constexpr, PREFETCH: gl.constexpr, W_LAYOUT: gl.constexpr,
                        X_LAYOUT: gl.constexpr, S_LAYOUT: gl.constexpr, MMA: gl.constexpr,
                        PAIRS: gl.constexpr = False):
        """y[t, n] = sum_k x[t, k] W[n, k] (+ bias[n]) for BM rows n of this program and t < T (BT >= T).
        K is read in slabs of CPL 64-wide chunks; program (i, j) covers the j-th of SPLITS runs of slabs, its WK
        K warps taking the run's slabs in turn (warp kw: slabs first + kw, first + kw + WK, ...), their sums
        added at the end. PREFETCH: a warp's next slab is loaded before this one's math. With SPLITS > 1 the last
        program of a row block to take its ticket (zero on entry, left zero) sums the partials in split order."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        NSL: gl.constexpr = K // (64 * CPL)  # slabs per row
        SPS: gl.constexpr = (NSL + SPLIT_K - 1) // SPLIT_K  # slabs per split
        SPLITS: gl.constexpr = (NSL + SPS - 1) // SPS
        STEPS: gl.constexpr = (SPS + WK - 1) // WK  # slabs per K warp
        KW: gl.constexpr = K // 8  # code words per row
        OUT: gl.constexpr = gl.SliceLayout(0, MMA)
        ROWS: gl.constexpr = gl.SliceLayout(1, OUT)
        COLS: gl.constexpr = gl.SliceLayout(0, OUT)
        pid = gl.program_id(0)
        s_first = gl.program_id(1) * SPS
        s_end = gl.minimum(s_first + SPS, NSL)

        # code words: rows clamped to N - 1 (loads need no row mask; those rows are not stored)
        WL2: gl.constexpr = gl.SliceLayout(2, W_LAYOUT)
        kw_w = gl.arange(0, WK, layout=gl.SliceLayout(1, WL2))
        rows_w = gl.minimum(pid * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, WL2)), N - 1)
        words_w = gl.arange(0, 8 * CPL, layout=gl.SliceLayout(0, gl.SliceLayout(1, W_LAYOUT)))
        wptr = (codes_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + (rows_w.to(gl.int64) * KW)[None, :, None]
                + (kw_w * (8 * CPL))[:, None, None] + words_w[None, None, :])
        slab_w = s_first + kw_w  # this K warp's first slab
        # x as int32 pairs at physical k, tokens past T read as zero
        XL2: gl.constexpr = gl.SliceLayout(2, X_LAYOUT)
        kw_x = gl.arange(0, WK, layout=gl.SliceLayout(1, XL2))
        k_x = gl.arange(0, 32 * CPL, layout=gl.SliceLayout(0, XL2))
        t_x = gl.arange(0, BT, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_LAYOUT)))
        xptr = (x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + t_x[None, None, :] * (stride_xt // 2)
                + (kw_x * (32 * CPL))[:, None, None] + k_x[None, :, None])
        slab_x = s_first + kw_x
        tok_ok = (t_x < T)[None, None, :]
        # each (row, chunk)'s absmax block: flat index of its first weight // BS (a chunk never spans two blocks)
        SL2: gl.constexpr = gl.SliceLayout(2, S_LAYOUT)
        kw_s = gl.arange(0, WK, layout=gl.SliceLayout(1, SL2))
        rows_s = gl.minimum(pid * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, SL2)), N - 1).to(gl.int64)
        chunk_s = gl.arange(0, CPL, layout=gl.SliceLayout(0, gl.SliceLayout(1, S_LAYOUT)))
        flat_s = (rows_s * K)[None, :, None] + (kw_s * (64 * CPL))[:, None, None] + (chunk_s * 64)[None, None, :]
        slab_s = s_first + kw_s

        # the first slab's loads go out before the prologue's table math
        ok_w = (slab_w < s_end)[:, None, None]
        ok_s = (slab_s < s_end)[:, None, None]
        w_next = gl.load(wptr + s_first * (8 * CPL), mask=ok_w, other=0)
        x_next = gl.load(xptr + s_first * (32 * CPL), mask=(slab_x < s_end)[:, None, None] & tok_ok, other=0)
        a_next, nb_next = _scale_loads(absmax_ptr, nabs_ptr, (flat_s + s_first * (64 * CPL)) // BS, ok_s, NBS,
                                       NESTED)
        ok_next = ok_s
        if PAIRS:  # the pair table, filled while the first loads are in flight
            _pair_fill(code_ptr, DT)
            tabs = _pair_lanes(w_next)
        else:  # the levels' byte tables: every thread builds all eight from the 16 levels (no cross-thread reduction)
            tabs = _tables(code_ptr, DT, gl.BlockedLayout([16], [32], [gl.num_warps()], [0]))
        if NESTED:
            off = gl.load(offset_ptr)
        else:
            off = 0.0

        acc = gl.zeros([WK, BM, BT], gl.float32, MMA)
        if PREFETCH:  # step i + 1's loads are issued before step i's math; the last step is peeled
            for i in range(1, STEPS):
                w = w_next
                xv = x_next
                a = a_next
                nb = nb_next
                ok = ok_next
                d = s_first + i * WK  # slab offset of this step for K warp 0
                ok_next = (slab_s + i * WK < s_end)[:, None, None]
                w_next = gl.load(wptr + d * (8 * CPL), mask=(slab_w + i * WK < s_end)[:, None, None], other=0)
                x_next = gl.load(xptr + d * (32 * CPL), mask=(slab_x + i * WK < s_end)[:, None, None] & tok_ok,
                                 other=0)
                a_next, nb_next = _scale_loads(absmax_ptr, nabs_ptr, (flat_s + d * (64 * CPL)) // BS, ok_next, NBS,
                                               NESTED)
                acc = _slab(w, xv, _scales(a, nb, ok, ncode_ptr, off, NESTED), acc, tabs, WK, BM, BT, CPL, DT, MMA,
                            PAIRS)
            acc = _slab(w_next, x_next, _scales(a_next, nb_next, ok_next, ncode_ptr, off, NESTED), acc, tabs, WK, BM,
                        BT, CPL, DT, MMA, PAIRS)
        else:
            acc = _slab(w_next, x_next, _scales(a_next, nb_next, ok_next, ncode_ptr, off, NESTED), acc, tabs, WK, BM,
                        BT, CPL, DT, MMA, PAIRS)
            for i in range(1, STEPS):
                d = s_first + i * WK
                ok = (slab_s + i * WK < s_end)[:, None, None]
                w = gl.load(wptr + d * (8 * CPL), mask=(slab_w + i * WK < s_end)[:, None, None], other=0)
                xv = gl.load(xptr + d * (32 * CPL), mask=(slab_x + i * WK < s_end)[:, None, None] & tok_ok, other=0)
                a, nb = _scale_loads(absmax_ptr, nabs_ptr, (flat_s + d * (64 * CPL)) // BS, ok, NBS, NESTED)
                acc = _slab(w, xv, _scales(a, nb, ok, ncode_ptr, off, NESTED), acc, tabs, WK, BM, BT, CPL, DT, MMA,
                            PAIRS)
        out = gl.sum(acc, 0)  # the K warps' sums (through shared memory when WK > 1)

        offs_n = pid * BM + gl.arange(0, BM, layout=ROWS)
        offs_t = gl.arange(0, BT, layout=COLS)
        n_mask = offs_n < N
        out_mask = (offs_t < T)[None, :] & n_mask[:, None]
        if SPLITS > 1:
            ws_io = offs_t[None, :] * N + offs_n[:, None]
            gl.store(ws_ptr + gl.program_id(1) * (BT * N) + ws_io, out, mask=out_mask)
            _cta_barrier()  # every thread's partial is stored before the ticket publishes them
            ticket = gl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel")
            if ticket == SPLITS - 1:
                _cta_barrier()
                out = gl.zeros([BM, BT], gl.float32, OUT)
                for j in gl.static_range(SPLITS):  # unrolled: the partials are read at once, not one round trip each
                    out += gl.load(ws_ptr + j * (BT * N) + ws_io, mask=out_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    out += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[:, None]
                gl.store(y_ptr + offs_t[None, :] * stride_yt + offs_n[:, None], out.to(DT), mask=out_mask)
                gl.store(ticket_ptr + pid, 0)
        else:
            if HAS_BIAS:
                out += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[:, None]
            gl.store(y_ptr + offs_t[None, :] * stride_yt + offs_n[:, None], out.to(DT), mask=out_mask)

# (warps_k, warps_m, m_rep, cpl, split_k, prefetch): warps_k warps along K and warps_m along M per program
# (BLOCK_M = 16 * warps_m * m_rep rows), slabs of cpl 64-wide chunks, split_k runs of slabs per row block;
# maxnreg (optional) caps the registers per thread so that more warps fit on an SM: the kernel is bound by issue
# and latency inside the SM, not by the bytes in flight (RESULTS NF4 run 13)
CONFIGS = [dict(warps_k=wk, warps_m=wm, m_rep=m, cpl=c, split_k=s, prefetch=pf) for wk, wm, m, c, s, pf in
           [(1, 4, 1, 2, 4, True), (1, 4, 1, 4, 4, False), (4, 1, 1, 2, 1, True), (4, 1, 1, 2, 2, True),
            (8, 1, 1, 1, 1, True), (8, 1, 1, 2, 1, False), (4, 1, 2, 2, 1, True), (4, 2, 1, 2, 1, True),
            (4, 1, 1, 4, 1, True), (8, 1, 1, 2, 2, True)]]
CONFIGS += [dict(warps_k=4, warps_m=1, m_rep=1, cpl=4, split_k=1, prefetch=False, maxnreg=128),
            dict(warps_k=4, warps_m=1, m_rep=1, cpl=2, split_k=1, prefetch=True, maxnreg=128)]
# pairs: the levels from the Triton kernel's shared table of level pairs (LUT=5, one lookup per code byte) instead of
# byte permutes: 0.2-2.2 fewer instructions per weight in the K loop (sm_90 SASS), yet at T = 16 on an H100 (RESULTS
# run 40, same process) 5% faster only at 4096 -> 14336 (24.6 against 25.8 us) and 4-6% slower at 4096^2 and
# 14336 -> 4096; these two were the fastest, and the tuner keeps them where they win
CONFIGS += [dict(warps_k=4, warps_m=1, m_rep=1, cpl=2, split_k=1, prefetch=True, maxnreg=128, pairs=True),
            dict(warps_k=4, warps_m=1, m_rep=1, cpl=4, split_k=1, prefetch=True, pairs=True)]


def supported(packed, x: torch.Tensor) -> bool:
    """Whether the MMA decode kernel takes this weight and x: Gluon present, a CUDA GPU of compute capability
    >= 8.0, 16-bit x with 1..16 rows, K a multiple of 64, absmax blocks of 64, 128 or 256 values (so a 64-wide
    chunk never spans two), contiguous codes."""
    return (AVAILABLE and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 1 <= x.shape[0] <= 16
            and len(packed.shape) == 2 and packed.shape[1] == x.shape[1] and x.shape[1] % CHUNK == 0
            and packed.blocksize in (64, 128, 256) and packed.codes.is_contiguous()
            and bg._props(x.device)[0] >= 8)  # cached: torch's query costs ~10 µs, and this runs twice a call


def splits(k: int, cpl: int, split_k: int) -> int:
    """The programs per row block the kernel runs (its SPLITS): split_runs over K's slabs of cpl 64-wide chunks."""
    return split_runs(k // (CHUNK * cpl), split_k)


def _cpl(k: int, cpl: int) -> int:
    while k % (CHUNK * cpl):  # slabs must tile K
        cpl //= 2
    return cpl


def nf4_matmul_mma(x: torch.Tensor, packed, bias: torch.Tensor | None = None, config: dict | None = None,
                   ws: torch.Tensor | None = None, tickets: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (T, K) with T <= 16, W NF4 (N, K); y in x's dtype. `config`: one of CONFIGS."""
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
    wk, wm, mr, cpl = cfg["warps_k"], cfg["warps_m"], cfg["m_rep"], _cpl(k, cfg["cpl"])
    bm = 16 * wm * mr
    n_splits = splits(k, cpl, cfg["split_k"])
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if ws is None:
        ws = torch.empty((n_splits, bt, n) if n_splits > 1 else (1,), dtype=torch.float32, device=x.device)
    if tickets is None:
        tickets = _tickets(x.device, glora._cdiv(n, bm))
    nabs, ncode, off = _tensors(packed)
    w_layout, x_layout, s_layout, mma = layouts(wk, wm, mr, bt, cpl)
    _nf4_mma_kernel[(glora._cdiv(n, bm), n_splits)](
        x, packed.codes, packed.absmax, packed.code, nabs, ncode, off, bias if bias is not None else x, y, ws,
        tickets, t, n, x.stride(0), y.stride(0), K=k, BS=packed.blocksize, NBS=packed.nested_blocksize,
        NESTED=packed.nested, HAS_BIAS=bias is not None, BT=bt, BM=bm, WK=wk, CPL=cpl, SPLIT_K=n_splits,
        PREFETCH=cfg.get("prefetch", True), PAIRS=cfg.get("pairs", False),
        W_LAYOUT=w_layout, X_LAYOUT=x_layout, S_LAYOUT=s_layout, MMA=mma, num_warps=wk * wm,
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return y


MIN_T = 3  # below, the Triton FMA path (mol/kernels/nf4.py) is faster: no MMA padding of T to 8
_CHOSEN: dict[tuple, dict] = {}


def nf4_matmul_decode(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """nf4_matmul_mma with its config tuned per (device, shape, dtype, T bucket): the first call of a key times
    every CONFIG under CUDA-graph replay and keeps the fastest (a call inside a graph capture, which cannot time,
    runs CONFIGS[0] and tunes nothing)."""
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
