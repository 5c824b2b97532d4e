"""Triton kernels for NF4 weights (bitsandbytes layout, see mol/quant/nf4.py).

- `nf4_dequantize`: packed NF4 -> dense (bf16/fp16/fp32) weight, one pass (reads 4.13 bits, writes 16 per value).
- `nf4_matmul_small`: y = x @ W^T (+ bias) for T <= 16 rows of x, reading the 4-bit codes directly
  (decode / GEMV): one launch, each program streams the codes of BLOCK_N whole rows (or, split-K, a run of their K
  steps) with a one-step software prefetch, builds the levels by byte permutes of register tables (16-bit x; a
  16-entry table gather for float32 x; for T <= 2 also one lookup per code byte in a shared table of level pairs)
  and multiplies with packed 16-bit FMAs (T <= 2) or tl.dot (larger T); see
  the comment above the kernel. On an H100 under CUDA-graph replay, autotuned (RESULTS run 40): T=1 4096x4096
  5.1-6.4 us (0.51-0.65x the bf16 GEMV, by machine), in 14336 -> out 4096 12.2 us (0.28x), 4096 -> 14336
  12.8-13.1 us (0.32-0.33x); T=2 0.64-0.67x, 0.41x, 0.46-0.48x. (On an H200, NF4 run 10: dequantize + cuBLAS
  23.7 us at T=1 4096x4096; T=16 11.5 / 31.6 us.)
  NF4Linear uses it by default for T <= 2 on CUDA, and for 3 <= T <= 16 where Triton
  has no Gluon: there mol/kernels/nf4_mma.py's kernel, which feeds the tensor cores from registers, is 11-26%
  faster (RESULTS NF4 run 12). MOL_NF4_FUSED_DECODE=0 or `fused_decode = False` turns both off.
For other T the layer dequantizes into a scratch weight and calls cuBLAS (see mol/quant/linear.py): at T=8192
the dequant pass is ~20 us (4096x4096) against ~400 us for the GEMM.

Under TRITON_INTERPRET=1 use float32 activations (the interpreter mis-computes tl.dot on bf16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mol.kernels import grouped_lora as gl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET_C = tl.constexpr(_INTERPRET)
MAX_SMALL_T = 16


@triton.jit
def _nf4_level(q, LUT: tl.constexpr, code_ptr):
    """NF4 level of 4-bit indices q (int32): a gather from the 16-entry table, or (LUT=1) a select tree on the
    index bits with the bitsandbytes constants, which needs no memory access."""
    if LUT == 0:
        v = tl.load(code_ptr + q)
    else:
        b0 = (q & 1) != 0
        b1 = (q & 2) != 0
        b2 = (q & 4) != 0
        v00 = tl.where(b0, -0.6961928009986877, -1.0)
        v01 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
        v02 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
        v03 = tl.where(b0, 0.0, -0.09105003625154495)
        v04 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
        v05 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
        v06 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
        v07 = tl.where(b0, 1.0, 0.7229568362236023)
        v10 = tl.where(b1, v01, v00)
        v11 = tl.where(b1, v03, v02)
        v12 = tl.where(b1, v05, v04)
        v13 = tl.where(b1, v07, v06)
        lo = tl.where(b2, v11, v10)
        hi = tl.where(b2, v13, v12)
        v = tl.where((q & 8) != 0, hi, lo)
    return v


@triton.jit
def _nf4_dequant_kernel(codes_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, out_ptr, n_bytes,
                        numel, BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, LUT: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # byte index; byte j holds elements 2j (high nibble), 2j+1
    mask = offs < n_bytes
    b = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    blk = offs // (BS // 2)
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(ncode_ptr + qa) * tl.load(nabs_ptr + blk // NBS, mask=mask, other=0.0) + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    hi = _nf4_level(b >> 4, LUT, code_ptr) * s
    lo = _nf4_level(b & 15, LUT, code_ptr) * s
    v = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))  # interleave: hi, lo, hi, lo, ...
    out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    # numel, not 2 * n_bytes: an odd-sized weight's last byte holds one padding code, which has no element
    tl.store(out_ptr + out_offs, v.to(out_ptr.dtype.element_ty), mask=out_offs < numel)


def _tensors(p):
    """Kernel arguments for the optional nested tensors (a dummy pointer when not nested)."""
    if p.nested:
        return p.nested_absmax, p.nested_code, p.offset.reshape(1)
    return p.absmax, p.absmax, p.absmax


DEQUANT_LUT = 0  # 0: table gather; 1: select tree (measured ~20% slower for the dequant on an H100)


def nf4_dequantize(packed, dtype: torch.dtype, out: torch.Tensor | None = None, lut: int | None = None) -> torch.Tensor:
    """Dequantize a packed NF4Weight to a dense tensor of `packed.shape` and `dtype` with one Triton launch."""
    n_bytes = packed.codes.numel()
    if 2 * n_bytes >= 2**31:
        raise ValueError(f"nf4_dequantize: {2 * n_bytes} elements exceed the int32 indexing of this kernel; "
                         "split the weight")
    if out is None:
        out = torch.empty(packed.shape, dtype=dtype, device=packed.device)
    nabs, ncode, off = _tensors(packed)
    if not out.is_contiguous() or tuple(out.shape) != tuple(packed.shape):
        raise ValueError(f"nf4_dequantize: out must be contiguous with shape {packed.shape}")
    BLOCK = 1024
    _nf4_dequant_kernel[(gl._cdiv(n_bytes, BLOCK),)](
        packed.codes, packed.absmax, packed.code, nabs, ncode, off, out, n_bytes, packed.numel,
        BS=packed.blocksize, NBS=packed.nested_blocksize, NESTED=packed.nested,
        LUT=DEQUANT_LUT if lut is None else lut, BLOCK=BLOCK,
        # no FMA contraction: absmax = code2[q] * absmax2 + offset must round twice, as bitsandbytes and the
        # PyTorch reference do, or a few bf16 outputs land 1 ulp away (seen on an H100, 4096x14336)
        enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------- small T (decode): y = x @ W^T (+ bias)
#
# One launch, grid = (cdiv(N, BLOCK_N), splits): with SPLIT_K = 1 each program owns BLOCK_N output rows and the
# whole K, streams their codes once and writes y in x's dtype (bias added): no zero-init, no atomics, no cast
# pass. With SPLIT_K > 1 (what fills the GPU on the dot path, where BLOCK_N >= 64 leaves N / 64 programs) each
# program takes a run of K steps and stores a float32 partial; the last of a row block's programs to take its
# ticket adds the partials in split order (so results do not depend on timing) and writes y. It also resets the
# ticket, so the zeroed ticket buffer (one per stream, _tickets) is never refilled: still one launch.
#
# The codes are read as int32 words (8 nibbles each), a (BLOCK_N, BLOCK_KB // 4) tile per step: 16 contiguous bytes
# per thread per row, one 128-bit load. K is a constexpr, so the step count is too. The K loop is a runtime loop
# with a software prefetch: step s + 1's code words and absmax bytes are loaded (into registers carried by the loop)
# before step s is dequantized, and the last step is peeled. The prefetch has to be written out: the dequant's
# shared-memory round trips (the gather, x's layout change) put barriers in every step, and ptxas never moves a
# load across one. (A fully unrolled K loop did the same but took >25 min to compile at K = 14336.)
# Each word is cut into its 8 nibbles with a shift and a mask; byte i of a word holds element 2i in its high
# nibble and 2i+1 in its low nibble (bitsandbytes' order). The 16 NF4 levels are looked up with `tl.gather` from a
# register copy of the table (LUT=2: one shared-memory load per element, 32-bit address folded into the load) or
# with `tl.load(code_ptr + q)` from the global table (LUT=0: an L1 hit, plus 64-bit address math per element); the
# select tree (LUT=1) is not used here. Counted on the sm_90 SASS of the loop body, T = 1, K = 4096: 4.9-5.7
# instructions per weight element with LUT=2 (shift, mask, LDS, FFMA, plus x and scale handling) and 7.5 with LUT=0
# under triton 3.9; 5.2-6.0 and 12.6 under triton 3.6. LUT=4 (16-bit x; float32 x falls back to LUT=2) has no table
# gather and no float conversion: byte permutes (PRMT) look the levels' low and high bytes up in eight int32
# registers (levels 0-7 and 8-15, selected by bit 3) and interleave them into int32 pairs of 16-bit levels in
# element order. LUT=5 (16-bit x, FMA path only) looks each code byte up as one pair of levels in a 256-entry table
# in shared memory, one copy per lane, so no lookup waits on a bank (see _pair_table_fill): 0.8 integer-pipe
# instructions per weight instead of 2.6 (sm_90 SASS). The FMA path autotunes LUT=5 and LUT=4 configs, the dot
# path LUT=4 (its tiles plus the 32 KiB table pass the 48 KiB a launch gets without opting in); LUT=2 and 0 stay
# selectable by `config=`.
# - T <= 2 (FMA path, BLOCK_T = T): p = sum_i level_i * x_i per word: LUT=4 multiplies each level pair by x's pair
#   (read as one int32, no conversion) with fma.rn.bf16x2 / f16x2, four per word into one pair of 16-bit partial
#   sums, then adds the two halves in float32 (so each four-term partial rounds to x's dtype: relative error vs
#   float64 3.3-4.2e-3 in bf16 against LUT=2's 1.7-2.3e-3, about the output's own rounding); LUT=2 runs an FFMA chain
#   in float32. Either way summed per absmax block, times the block's scale, accumulated per (row, block) in float32;
#   one reduction over the blocks at the end. SASS (`compile_sm90.py --sass`, (16, 512-byte) tile, T = 1): 4.4
#   instructions and 0.14 shared-memory ops per weight with LUT=4 (4.9 before the integer-pipe change below), 5.3
#   and 1.3 with LUT=2; timed 11-17% faster than LUT=2 at T = 1 and 18-26% at T = 2 (RESULTS NF4 run 8).
# - 3 <= T <= 16 (dot path, BLOCK_T = 16): the weights in x's dtype, multiplied with tl.dot (T padded to 16,
#   float32 accumulation; exact "ieee" float32 for float32 x). LUT=2: levels times their block scales in float32,
#   rounded once (as the dequantize + GEMM path rounds them). LUT=4 (16-bit x; float32 x falls back to LUT=2):
#   no table gather and no float conversion: byte permutes (PRMT) look the levels' low and high bytes up in eight
#   int32 registers and interleave them into pairs of 16-bit levels (as above), which
#   one mul.rn.bf16x2 / f16x2 scales; each weight is rounded twice (level, then product), ~1 ulp more error. Per
#   element on the sm_90 SASS (triton 3.6, 64 x 128-byte tile, nested absmax; `compile_sm90.py --sass`): 6.0
#   instructions (6.3 before the integer-pipe change) and 0.4 shared-memory ops with LUT=4, 7.3 and 1.4 with LUT=2;
#   timed 6-11% faster at T = 16 (RESULTS NF4 run 8), so LUT=4 is autotuned. The dot path takes ~11-12 us at 4096^2
#   whatever T (its dequant, layout change through shared memory and wgmma run in sequence in each step), against
#   the FMA path's 5.8 at T = 1 and 6.8 at T = 2: so FMA for T = 1 and 2, dot from T = 3. (W as the A operand of
#   mma.sync with BLOCK_N < 64, tried in SASS only, moves the tile through shared memory too: 0.75 shared-memory
#   ops per weight.)
# The integer pipe bounds the LUT=4 lookups: on sm_90 PRMT, LOP3 and SHF issue at half the FMA pipe's rate, and at
# T = 1 they were 3.4 of the 4.9 instructions per weight. So the permutes are inline prmt.b32 (libdevice.byte_perm
# masks its selector with one more LOP3 per call; our selectors never set the sign-mode bit), the selectors' right
# shifts are mul.hi.u32 (an IMAD, FMA pipe; `_shr`), the bank select's mask-and-or is one lop3 (`_bank_select`), and the
# bf16 pair sum is a mask and a multiply (`_pair_sum`): 2.55 integer-pipe instructions per weight (16 PRMTs and 3
# LOP3s per code word), 8-10% faster at T = 1-2 and 3% on the dot path (RESULTS NF4 run 10).
#   Timed on an H100 (benchmarks/RESULTS.md, NF4 run 4): LUT=2 beat LUT=0 by ~3.4x under triton 3.6.

SMALL_FMA_MAX_T = 2


# The autotuned configs (what nf4_matmul_small's `config=` takes), the fastest of a sweep of ~120 per path on an
# H200 (benchmarks/probe_nf4_decode.py, RESULTS NF4 run 6; 4096x4096, 14336x4096 and 4096x14336). FMA path: a
# warp spans BLOCK_KB bytes of one row, so a thread holds BLOCK_N / num_warps rows, which share x's conversion and
# layout shuffle; every config lands within 15% of the best (6.9 us at 4096^2), split-K gains nothing at T = 1.
# They ran LUT=4 from NF4 run 8 (the same six, timed with both lookups: LUT=4 faster in every one at T = 1 and 2).
# Run 39 (H100) added four LUT=5 configs, the fastest of a T = 1 sweep, and dropped three LUT=4 ones that were
# never among the fastest: at T = 1 the pair table is 2.5-15% faster (4096x4096 6.34 against 6.50 us, 14336 ->
# 4096 12.8 against 15.0), at T = 2 the two lookups are within 3% of each other, so both stay (the tuner picks).
# (8, 2048, 4, 1), a whole 4096-wide row in one step (32 code words per thread), joined in NF4 run 9: 6.01 against
# 6.18 us at T = 1 4096^2, 17.44 against 17.48 at 4096 -> 14336; no num_stages moved any config by 1%.
# Dot path: BLOCK_N >= 64 makes the weight tile the MMA's A operand (wgmma, one warpgroup per 64 rows); at
# N = 4096 that is 64 programs, so it is split-K (SPLIT_K programs per row block, partials summed by the last,
# see the kernel) that fills the GPU: 20.3 -> 13.5 us at 4096^2, 65 -> 38 us at 14336x4096. The BLOCK_N = 32 config
# (x as the A operand, mma.sync) keeps narrow weights covered. (64, 128, 4, 4, 3) replaced (64, 128, 4, 4, 1) after
# a second sweep (RESULTS NF4 run 7): 12.9 against 13.4 us at 4096^2, 33.5 against 38.1 at 14336x4096. A third
# (NF4 run 8, LUT=4 over the whole grid) found the same six shapes fastest; they now run LUT=4.
FMA_CONFIGS = [dict(BLOCK_N=bn, BLOCK_KB=kb, LUT=lut, num_warps=w, SPLIT_K=sk, num_stages=st)
               for bn, kb, w, sk, st, lut in [(16, 512, 4, 1, 1, 5), (16, 512, 4, 1, 3, 5), (16, 1024, 8, 1, 1, 5),
                                              (8, 1024, 4, 1, 3, 5), (16, 512, 4, 1, 1, 4), (8, 512, 2, 1, 1, 4),
                                              (8, 2048, 4, 1, 1, 4), (32, 256, 4, 2, 1, 4)]]
DOT_CONFIGS = [dict(BLOCK_N=bn, BLOCK_KB=kb, LUT=4, num_warps=w, SPLIT_K=sk, num_stages=st)
               for bn, kb, w, sk, st in [(64, 64, 4, 4, 1), (64, 64, 4, 8, 1), (128, 64, 4, 8, 1), (64, 64, 4, 1, 3),
                                         (64, 128, 4, 4, 3), (32, 128, 4, 1, 1)]]


def _autotune_configs(configs):
    if _INTERPRET:  # one config: the interpreter has nothing to tune (tests pass every config through `config=`)
        configs = configs[:1]
    return [triton.Config({"SPLIT_K": 1, **{k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}},
                          num_warps=c["num_warps"], num_stages=c.get("num_stages", 1))
            for c in configs]


@triton.jit
def _nf4_levels8(w, tab, code_ptr, LUT: tl.constexpr):
    """The 8 NF4 levels (float32) of int32 code words w, in element order: byte i (little endian) of a word holds
    element 2i in its high nibble and element 2i+1 in its low nibble. LUT=4 and 5 gather as LUT=2 here (float32 x;
    their pair lookups are for 16-bit x, in _level_pairs and, LUT=4 only, _nf4_tile_prmt)."""
    if LUT == 2 or LUT == 4 or LUT == 5:
        # one gather for all 8 nibbles; join(a, b) stacks along a new last axis, so split() takes them back in
        # the reverse nesting order
        q = tl.join(tl.join(tl.join((w >> 4) & 15, w & 15), tl.join((w >> 12) & 15, (w >> 8) & 15)),
                    tl.join(tl.join((w >> 20) & 15, (w >> 16) & 15), tl.join((w >> 28) & 15, (w >> 24) & 15)))
        lv = tl.reshape(tl.gather(tab, tl.reshape(q, (q.numel,)), 0), q.shape)
        l0123, l4567 = tl.split(lv)
        l01, l23 = tl.split(l0123)
        l45, l67 = tl.split(l4567)
        l0, l1 = tl.split(l01)
        l2, l3 = tl.split(l23)
        l4, l5 = tl.split(l45)
        l6, l7 = tl.split(l67)
    else:
        l0 = _nf4_level((w >> 4) & 15, LUT, code_ptr)
        l1 = _nf4_level(w & 15, LUT, code_ptr)
        l2 = _nf4_level((w >> 12) & 15, LUT, code_ptr)
        l3 = _nf4_level((w >> 8) & 15, LUT, code_ptr)
        l4 = _nf4_level((w >> 20) & 15, LUT, code_ptr)
        l5 = _nf4_level((w >> 16) & 15, LUT, code_ptr)
        l6 = _nf4_level((w >> 28) & 15, LUT, code_ptr)
        l7 = _nf4_level((w >> 24) & 15, LUT, code_ptr)
    return l0, l1, l2, l3, l4, l5, l6, l7


@triton.jit
def _x8(x_ptr, kw, km, BW: tl.constexpr):
    """x[8 kw + i] for i < 8 as eight float32 (BW,) tensors (one contiguous (BW, 8) load, then splits)."""
    x8 = tl.load(x_ptr + 8 * kw[:, None] + tl.arange(0, 8)[None, :], mask=km[:, None], other=0.0).to(tl.float32)
    xa, xb = tl.split(tl.reshape(x8, (BW, 4, 2)))  # even / odd columns
    xa0, xa1 = tl.split(tl.reshape(xa, (BW, 2, 2)))  # columns (0, 4) / (2, 6)
    xb0, xb1 = tl.split(tl.reshape(xb, (BW, 2, 2)))  # columns (1, 5) / (3, 7)
    x0, x4 = tl.split(xa0)
    x2, x6 = tl.split(xa1)
    x1, x5 = tl.split(xb0)
    x3, x7 = tl.split(xb1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _dot8(l0, l1, l2, l3, l4, l5, l6, l7, x_ptr, kw, km, BW: tl.constexpr):
    """sum_i level_i * x[8 kw + i] per word: (BLOCK_N, BW) float32, one FMUL and seven FFMAs per word."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x8(x_ptr, kw, km, BW)
    p = l0 * x0[None, :]
    p += l1 * x1[None, :]
    p += l2 * x2[None, :]
    p += l3 * x3[None, :]
    p += l4 * x4[None, :]
    p += l5 * x5[None, :]
    p += l6 * x6[None, :]
    p += l7 * x7[None, :]
    return p


@triton.jit
def _load_step(wptr, absmax_ptr, row_w, row_blk, s, KW: tl.constexpr, NBLK: tl.constexpr, BW: tl.constexpr,
               NB: tl.constexpr):
    """Step s's code words (BLOCK_N, BW) and absmax entries (BLOCK_N, NB); masked only when BW does not divide
    the row (then only the last step has lanes past the row's end)."""
    kw = s * BW + tl.arange(0, BW)
    blk = s * NB + tl.arange(0, NB)
    wp = wptr + row_w[:, None] + kw[None, :]
    ap = absmax_ptr + row_blk[:, None] + blk[None, :]
    if KW % BW == 0:
        w = tl.load(wp)
        a = tl.load(ap)
    else:
        w = tl.load(wp, mask=(kw < KW)[None, :], other=0)
        a = tl.load(ap, mask=(blk < NBLK)[None, :], other=0)
    return w, a


@triton.jit
def _prmt(a, b, sel):
    """PTX prmt.b32 (byte permute) with 3-bit selectors: byte i of the result is byte (sel >> 4i) & 7 of the
    8-byte value {b, a} (a = bytes 0-3). `sel` is a tensor whose selector nibbles have bit 3 clear (bit 3 is
    prmt's sign-replicate mode; libdevice.byte_perm would mask it with one more integer op per call, which
    the callers' selectors never need). The interpreter runs the same selection with shifts."""
    if _INTERPRET_C:
        out = _prmt_emulated(a, b, sel)
    else:
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def _prmt_imm(a, b, SEL: tl.constexpr):
    """_prmt with a constant selector, an immediate of the instruction."""
    if _INTERPRET_C:
        out = _prmt_emulated(a, b, SEL)
    else:
        tl.static_assert(SEL == 0x4051 or SEL == 0x6273, "add this selector's asm string")
        if SEL == 0x4051:
            asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x4051;"
        else:
            asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x6273;"
        out = tl.inline_asm_elementwise(asm, "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton.jit
def _prmt_emulated(a, b, sel):
    ab = (b.to(tl.int64) << 32) | (a.to(tl.int64) & 0xFFFFFFFF)
    r = ab * 0
    for i in tl.static_range(4):
        r |= ((ab >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i)
    return r.to(tl.int32)


@triton.jit
def _shr(v, S: tl.constexpr):
    """v >> S (logical) for int32 v, compiled as a multiply-high: that runs on the FMA pipe, while shifts share
    the integer pipe with the permutes, which bound the lookups (RESULTS NF4 run 10)."""
    if _INTERPRET_C:
        out = (v.to(tl.uint32, bitcast=True) >> S).to(tl.int32, bitcast=True)
    else:
        tl.static_assert(S == 1 or S == 16, "add this shift's asm string")
        if S == 1:
            asm: tl.constexpr = "mul.hi.u32 $0, $1, 0x80000000;"
        else:
            asm: tl.constexpr = "mul.hi.u32 $0, $1, 0x10000;"
        out = tl.inline_asm_elementwise(asm, "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton.jit
def _bits16(v):
    """The bit pattern of 16-bit float values v as int32 in [0, 65536)."""
    return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _pack2(lo, hi):
    """Two 16-bit float tensors as int32 pairs: lo in the low half, hi in the high half."""
    return _bits16(lo) | (_bits16(hi) << 16)


@triton.jit
def _prmt_tables(code_ptr, DT: tl.constexpr):
    """The 16 NF4 levels rounded to DT (bf16 / fp16), as eight int32 byte tables for `_prmt`: (low bytes of
    levels 0-3, 4-7, 8-11, 12-15, then the high bytes likewise). Built once per program from the code table."""
    i = tl.arange(0, 16)
    bits = _bits16(tl.load(code_ptr + i).to(DT))
    sh = 8 * (i % 4)
    g = i // 4
    lo = (bits & 0xFF) << sh
    hi = (bits >> 8) << sh
    return (tl.sum(tl.where(g == 0, lo, 0)), tl.sum(tl.where(g == 1, lo, 0)),
            tl.sum(tl.where(g == 2, lo, 0)), tl.sum(tl.where(g == 3, lo, 0)),
            tl.sum(tl.where(g == 0, hi, 0)), tl.sum(tl.where(g == 1, hi, 0)),
            tl.sum(tl.where(g == 2, hi, 0)), tl.sum(tl.where(g == 3, hi, 0)))


@triton.jit
def _prmt_pairs(sel, s2, tabs):
    """The four 16-bit levels of the 4 codes in the low half of a code word (sel: their 3-bit indices, s2: the
    select between the lower and upper eight levels; both read in their low 16 bits only), as two int32 words
    of two levels each, in element order (byte i of a code word holds element 2i in its high nibble)."""
    lo = _prmt(_prmt(tabs[0], tabs[1], sel), _prmt(tabs[2], tabs[3], sel), s2)
    hi = _prmt(_prmt(tabs[4], tabs[5], sel), _prmt(tabs[6], tabs[7], sel), s2)
    # lo / hi byte j: the low / high byte of the level of nibble j; element 0 is nibble 1, element 1 nibble 0
    return _prmt_imm(lo, hi, 0x4051), _prmt_imm(lo, hi, 0x6273)


@triton.jit
def _prmt_levels(w, tabs):
    """The 8 levels of int32 code words w as four int32 pairs of 16-bit levels (elements 0-1, 2-3, 4-5, 6-7)."""
    # a permute reads its selector's low 16 bits: the upper four codes' selectors are the lower ones shifted
    sel = w & 0x77777777
    hilo = _bank_select(w)
    p01, p23 = _prmt_pairs(sel, hilo, tabs)
    p45, p67 = _prmt_pairs(_shr(sel, 16), _shr(hilo, 16), tabs)
    return p01, p23, p45, p67


# LUT=5: a code byte (two weights) looked up as one pair of 16-bit levels in a 256-entry table in shared memory,
# kept in 32 copies (entry e, copy c at word 32 e + c) so that each lane reads its own copy and a warp's 32 lookups
# fall in 32 different banks, whatever the codes. Per byte that is one multiply-high (the shift, FMA pipe), one lop3
# (mask, and the lane's copy or-ed in) and one LDS: in the sm_90 SASS of the K loop (T = 1, triton 3.6) 3.30
# instructions per weight, 0.8 of them on the integer pipe, against LUT=4's 4.47 and 2.6, whose permutes bound it
# (RESULTS NF4 run 10). Triton has no shared-memory gather with a per-lane index, so
# the table is a static .shared array declared and addressed in inline PTX (32 KiB besides Triton's own; a program
# fills it once, 64 words a thread at 4 warps, behind the first step's loads). Measured on an H100 (RESULTS run
# 39, T = 1, same process, filled first): 2.5% faster than LUT=4 at 4096x4096 (6.34 against 6.50 us), 6% at
# 4096 -> 14336, 15% at 14336 -> 4096.
_PAIR_SHIFT = ("mul.lo.u32 t, $1, 128;", "mul.hi.u32 t, $1, 0x80000000;", "mul.hi.u32 t, $1, 0x800000;",
               "mul.hi.u32 t, $1, 0x8000;")  # byte i of a word to bits 7-14: << 7, >> 1, >> 9, >> 17
_PAIR_LOOKUP0, _PAIR_LOOKUP1, _PAIR_LOOKUP2, _PAIR_LOOKUP3 = (
    tl.constexpr("{ .reg .b32 t, a; " + sh + " lop3.b32 t, t, 0x7F80, $2, 0xEA; mov.u32 a, mol_nf4_pairs; "
                 "add.u32 t, t, a; ld.shared.b32 $0, [t]; }") for sh in _PAIR_SHIFT)
# the table's declaration (once per thread), one word's store ($1: byte offset, $2: the pair) and a lane's copy
# offset (4 * %laneid); the Gluon kernel (nf4_mma.py) builds the same table with them
_PAIR_DECLARE = tl.constexpr(".shared .align 16 .b32 mol_nf4_pairs[8192];\n\tmov.u32 $0, 0;")
_PAIR_STORE = tl.constexpr("{ .reg .b32 a; mov.u32 a, mol_nf4_pairs; add.u32 a, a, $1; st.shared.b32 [a], $2; "
                           "mov.u32 $0, 0; }")
_PAIR_LANE = tl.constexpr("mov.u32 $0, %laneid;\n\tshl.b32 $0, $0, 2;")


@triton.jit
def _pair_table_fill(code_ptr, DT: tl.constexpr):
    """Declare the shared pair table and fill it: entry e holds the levels of codes e >> 4 (element 2i, low half)
    and e & 15 (element 2i + 1, high half) in DT, as byte e of a code word needs them. Ends with a CTA barrier."""
    tl.inline_asm_elementwise(_PAIR_DECLARE, "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False,
                              pack=1)
    # (entry, copy), the copies along a warp's lanes (conflict-free stores); an entry's pair is built once per
    # thread that holds it and broadcast along the copies (5% faster at T = 1 4096^2 than an (8192,) pass with two
    # loads per word, RESULTS run 39)
    e = tl.arange(0, 256)
    v = _pack2(tl.load(code_ptr + e // 16).to(DT), tl.load(code_ptr + e % 16).to(DT))
    word = e[:, None] * 32 + tl.arange(0, 32)[None, :]
    v = v[:, None] + word * 0
    tl.inline_asm_elementwise(_PAIR_STORE, "=r,r,r", [word * 4, v], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def _pair_lanes(w):
    """4 * the lane of the thread holding each element of w (the byte offset of its copy in the pair table), built
    from w so that it has w's layout: a layout change would move values between threads."""
    if _INTERPRET_C:
        out = w * 0
    else:
        out = tl.inline_asm_elementwise(_PAIR_LANE, "=r,r", [w * 0], dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton.jit
def _pair_byte(w, lanes, code_ptr, I: tl.constexpr, DT: tl.constexpr):
    """The level pair of byte I of code words w (elements 2I, 2I + 1 in the low, high half), from the pair table;
    the interpreter builds it from the code table."""
    if _INTERPRET_C:
        out = _pack2(tl.load(code_ptr + ((w >> (8 * I + 4)) & 15)).to(DT),
                     tl.load(code_ptr + ((w >> (8 * I)) & 15)).to(DT))
    else:
        if I == 0:
            asm: tl.constexpr = _PAIR_LOOKUP0
        elif I == 1:
            asm: tl.constexpr = _PAIR_LOOKUP1
        elif I == 2:
            asm: tl.constexpr = _PAIR_LOOKUP2
        else:
            asm: tl.constexpr = _PAIR_LOOKUP3
        out = tl.inline_asm_elementwise(asm, "=r,r,r", [w, lanes], dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton.jit
def _level_pairs(w, tab, code_ptr, LUT: tl.constexpr, DT: tl.constexpr):
    """The 8 levels of int32 code words w as four int32 pairs of DT levels (elements 0-1, 2-3, 4-5, 6-7) for the FMA
    path: from the shared pair table (LUT=5, tab = _pair_lanes) or by byte permutes of register tables (LUT=4, tab
    = _prmt_tables)."""
    if LUT == 5:
        return (_pair_byte(w, tab, code_ptr, 0, DT), _pair_byte(w, tab, code_ptr, 1, DT),
                _pair_byte(w, tab, code_ptr, 2, DT), _pair_byte(w, tab, code_ptr, 3, DT))
    else:
        return _prmt_levels(w, tab)


@triton.jit
def _bank_select(w):
    """The selector between the lower / upper eight levels for the codes of words w: nibble j is j % 4, plus 4
    when bit 3 of code j is set, i.e. ((w >> 1) & 0x44444444) | 0x32103210, the mask-and-or as one lop3 with the
    OR constant in a register (two immediates would make two LOP3s)."""
    v = _shr(w, 1)
    if _INTERPRET_C:
        out = (v & 0x44444444) | 0x32103210
    else:
        out = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x44444444, $2, 0xEA;", "=r,r,r",
                                        [v, tl.full(v.shape, 0x32103210, tl.int32)], dtype=tl.int32, is_pure=True,
                                        pack=1)
    return out


@triton.jit
def _half(p, DT: tl.constexpr, HIGH: tl.constexpr):
    if HIGH:
        v = (p >> 16).to(tl.int16)
    else:
        v = p.to(tl.int16)
    return v.to(DT, bitcast=True)


@triton.jit
def _mul2(p, s2, DT: tl.constexpr):
    """Two DT values packed in each int32 of p times those of s2, rounded to nearest (one fma.rn.bf16x2 with
    -0 added / mul.rn.f16x2 per pair; the interpreter multiplies the halves)."""
    if _INTERPRET_C:
        out = _pack2(_half(p, DT, False) * _half(s2, DT, False), _half(p, DT, True) * _half(s2, DT, True))
    elif DT == tl.bfloat16:
        # mul.bf16x2 needs sm_90 (ptxas rejects it for sm_80-89); fma.rn.bf16x2 (sm_80) adding -0 rounds the
        # product once, as mul.rn does, and keeps a -0 product's sign, so the bits are the same
        out = tl.inline_asm_elementwise("{ .reg .b32 nz; mov.b32 nz, 0x80008000; fma.rn.bf16x2 $0, $1, $2, nz; }",
                                        "=r,r,r", [p, s2], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [p, s2], dtype=tl.int32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def _fma2(a, b, c, DT: tl.constexpr):
    """a * b + c on the two DT values packed in each int32 (one fma.rn.bf16x2 / f16x2; the interpreter computes
    the halves in float32 and rounds each once to DT)."""
    if _INTERPRET_C:
        lo = (_half(a, DT, False).to(tl.float32) * _half(b, DT, False).to(tl.float32)
              + _half(c, DT, False).to(tl.float32)).to(DT)
        hi = (_half(a, DT, True).to(tl.float32) * _half(b, DT, True).to(tl.float32)
              + _half(c, DT, True).to(tl.float32)).to(DT)
        out = _pack2(lo, hi)
    else:
        op: tl.constexpr = "fma.rn.bf16x2" if DT == tl.bfloat16 else "fma.rn.f16x2"
        out = tl.inline_asm_elementwise(op + " $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def _dot8_pairs(p01, p23, p45, p67, x_ptr, kw, km, BW: tl.constexpr, DT: tl.constexpr):
    """sum_i level_i * x[8 kw + i] per word, (rows, BW) float32, for 16-bit x: the levels as DT pairs
    (_prmt_levels), the eight products summed in DT pairs by four fma.rn.*x2 (x's pairs read as int32, no
    conversion), then the two halves in float32. The four-term sums round to DT: ~1 ulp of DT of a word's
    partial, which over K / 8 words comes to about the output's own rounding (RESULTS NF4 run 8)."""
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    xq = tl.load(x32 + 4 * kw[:, None] + tl.arange(0, 4)[None, :], mask=km[:, None], other=0)
    xa, xb = tl.split(tl.reshape(xq, (BW, 2, 2)))  # pairs (0, 2) / (1, 3)
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    acc = _fma2(p01, x0[None, :], p01 * 0, DT)
    acc = _fma2(p23, x1[None, :], acc, DT)
    acc = _fma2(p45, x2[None, :], acc, DT)
    acc = _fma2(p67, x3[None, :], acc, DT)
    return _pair_sum(acc, DT)


@triton.jit
def _pair_sum(p, DT: tl.constexpr):
    """The two DT values packed in each int32 of p, summed in float32."""
    if DT == tl.bfloat16:  # a bf16 is a float32's upper half: a mask, and a shift done as a multiply (FMA pipe)
        out = (p & -65536).to(tl.float32, bitcast=True) + (p * 65536).to(tl.float32, bitcast=True)
    else:
        out = _half(p, DT, False).to(tl.float32) + _half(p, DT, True).to(tl.float32)
    return out


@triton.jit
def _nf4_tile_prmt(w, s2, tabs, DT: tl.constexpr):
    """The (rows, 8 * words) tile of the NF4 weights in DT of int32 code words w (s2: each word's scale, twice
    per int32): the levels by byte permutes of register tables, then scaled a pair at a time; no shared-memory
    lookup, no float conversion. Each weight is rounded twice (level, then level times scale) where the
    dequantize path rounds once: ~1 ulp of DT more error per weight."""
    p01, p23, p45, p67 = _prmt_levels(w, tabs)
    p01 = _mul2(p01, s2, DT)
    p23 = _mul2(p23, s2, DT)
    p45 = _mul2(p45, s2, DT)
    p67 = _mul2(p67, s2, DT)
    # join stacks along a new last axis, so the nesting that flattens to element order 0..7 pairs j with j + 4
    e = tl.join(tl.join(tl.join(_half(p01, DT, False), _half(p45, DT, False)),
                        tl.join(_half(p23, DT, False), _half(p67, DT, False))),
                tl.join(tl.join(_half(p01, DT, True), _half(p45, DT, True)),
                        tl.join(_half(p23, DT, True), _half(p67, DT, True))))
    return tl.reshape(e, (w.shape[0], w.shape[1] * 8))


@triton.jit
def _small_step(w, a, s, acc0, acc1, accd, x_ptr, tab, code_ptr, ncode_ptr, nabs_ptr, off, row_blk, offs_t, T,
                stride_xt, K: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, BLOCK_T: tl.constexpr,
                IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr, WB: tl.constexpr, NB: tl.constexpr,
                NBLK: tl.constexpr, LUT: tl.constexpr, W_AS_A: tl.constexpr, PRMT: tl.constexpr):
    """Dequantize step s's words w (scales from absmax entries a) and accumulate against x."""
    KW: tl.constexpr = K // 8
    blk = s * NB + tl.arange(0, NB)
    if NESTED:
        sc = (tl.load(ncode_ptr + a.to(tl.int32)) *
              tl.load(nabs_ptr + (row_blk[:, None] + blk[None, :]) // NBS, mask=(blk < NBLK)[None, :], other=0.0)
              + off)
    else:
        sc = a
    kw = s * BW + tl.arange(0, BW)
    km = kw < KW
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if BLOCK_T > 2:
        if PRMT:  # levels in DT by byte permutes, times the block scales in DT
            # each word's block scale in DT, twice in one int32 (the multiplier of a pair of levels)
            s2 = tl.reshape(tl.broadcast_to(_pack2(sc.to(DT), sc.to(DT))[:, :, None], (BLOCK_N, NB, WB)),
                            (BLOCK_N, BW))
            wt = _nf4_tile_prmt(w, s2, tab, DT)
        else:
            l0, l1, l2, l3, l4, l5, l6, l7 = _nf4_levels8(w, tab, code_ptr, LUT)
            # back to element order along the last axis (the inverse of _nf4_levels8's nesting), scaled per block
            lv = tl.join(tl.join(tl.join(l0, l4), tl.join(l2, l6)), tl.join(tl.join(l1, l5), tl.join(l3, l7)))
            lv = tl.reshape(lv, (BLOCK_N, NB, WB * 8)) * sc[:, :, None]
            wt = tl.reshape(lv, (BLOCK_N, BW * 8)).to(DT)
        kk = 8 * s * BW + tl.arange(0, 8 * BW)
        if W_AS_A:  # (BLOCK_N, k) @ (k, BLOCK_T): the weight tile is the A operand (wgmma takes M = 64)
            xt = tl.load(x_ptr + offs_t[None, :] * stride_xt + kk[:, None],
                         mask=(offs_t < T)[None, :] & (kk < K)[:, None], other=0.0)
            if IEEE:
                accd = tl.dot(wt, xt, accd, input_precision="ieee")
            else:
                accd = tl.dot(wt, xt, accd)
        else:  # (BLOCK_T, k) @ (k, BLOCK_N): x is the A operand (M = 16), each warp takes BLOCK_N / num_warps rows
            xs = tl.load(x_ptr + offs_t[:, None] * stride_xt + kk[None, :],
                         mask=(offs_t < T)[:, None] & (kk < K)[None, :], other=0.0)
            if IEEE:
                accd = tl.dot(xs, tl.trans(wt), accd, input_precision="ieee")
            else:
                accd = tl.dot(xs, tl.trans(wt), accd)
    elif PRMT:  # FMA path, 16-bit x: levels and products in DT pairs
        p01, p23, p45, p67 = _level_pairs(w, tab, code_ptr, LUT, DT)
        p = _dot8_pairs(p01, p23, p45, p67, x_ptr, kw, km, BW, DT)
        acc0 += tl.sum(tl.reshape(p, (BLOCK_N, NB, WB)), axis=2) * sc
        if BLOCK_T == 2:
            p = _dot8_pairs(p01, p23, p45, p67, x_ptr + stride_xt, kw, km, BW, DT)
            acc1 += tl.sum(tl.reshape(p, (BLOCK_N, NB, WB)), axis=2) * sc
    else:
        l0, l1, l2, l3, l4, l5, l6, l7 = _nf4_levels8(w, tab, code_ptr, LUT)
        p = _dot8(l0, l1, l2, l3, l4, l5, l6, l7, x_ptr, kw, km, BW)
        acc0 += tl.sum(tl.reshape(p, (BLOCK_N, NB, WB)), axis=2) * sc
        if BLOCK_T == 2:
            p = _dot8(l0, l1, l2, l3, l4, l5, l6, l7, x_ptr + stride_xt, kw, km, BW)
            acc1 += tl.sum(tl.reshape(p, (BLOCK_N, NB, WB)), axis=2) * sc
    return acc0, acc1, accd


@triton.jit
def _nf4_matmul_small_kernel(x_ptr, codes_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr,
                             y_ptr, ws_ptr, ticket_ptr, T, N, stride_xt, stride_yt,
                             K: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, LUT: tl.constexpr,
                             SPLIT_K: tl.constexpr):
    """y[t, n] = sum_k x[t, k] W[n, k] (+ bias[n]) for rows n of this program, t < T. BLOCK_T <= 2: FMA path
    (T == BLOCK_T); BLOCK_T == 16: tl.dot path (T <= 16). Rows past N re-read row N - 1 and are not stored.
    SPLIT_K > 1: program (i, j) covers the j-th of _splits(K, BLOCK_KB, SPLIT_K) runs of steps of row block i,
    stores its float32 partial in ws (splits, BLOCK_T, N), and the last of them to take a ticket
    (ticket_ptr[i], zero on entry, left zero on exit) adds the partials in split order and writes y."""
    KW: tl.constexpr = K // 8  # int32 code words per row
    BW: tl.constexpr = BLOCK_KB // 4  # words per step
    WB: tl.constexpr = BS // 8  # words per absmax block
    NB: tl.constexpr = BW // WB  # absmax blocks per step
    NBLK: tl.constexpr = K // BS  # absmax blocks per row
    NSTEPS: tl.constexpr = (KW + BW - 1) // BW
    SPK: tl.constexpr = (NSTEPS + SPLIT_K - 1) // SPLIT_K  # steps per split
    SPLITS: tl.constexpr = (NSTEPS + SPK - 1) // SPK  # splits that have steps (the grid's second axis)
    W_AS_A: tl.constexpr = BLOCK_N >= 64
    pid = tl.program_id(0)
    if SPLITS == 1:
        s_first = 0
        s_last = NSTEPS - 1
    else:
        s_first = tl.program_id(1) * SPK
        s_last = tl.minimum(s_first + SPK, NSTEPS) - 1
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1)  # clamped: the loads need no row mask
    row_w = rows.to(tl.int64) * KW
    row_blk = rows.to(tl.int64) * NBLK
    wptr = codes_ptr.to(tl.pointer_type(tl.int32))
    # LUT=4 (byte-permute levels, both paths) and LUT=5 (shared pair table, FMA path) are for 16-bit x; for
    # float32 x they are the LUT=2 gather
    PRMT: tl.constexpr = (LUT == 4 or LUT == 5) and x_ptr.dtype.element_ty != tl.float32
    tl.static_assert(LUT != 5 or BLOCK_T <= 2, "LUT=5 is for the FMA path (T <= 2)")
    if PRMT:
        if LUT != 5:  # LUT=5's table is filled below, after the first step's loads are out
            tab = _prmt_tables(code_ptr, x_ptr.dtype.element_ty)
    else:
        tab = tl.load(code_ptr + tl.arange(0, 16))
    if NESTED:
        off = tl.load(offset_ptr)
    else:
        off = 0.0
    offs_t = tl.arange(0, BLOCK_T)
    acc0 = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    if W_AS_A:
        accd = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    else:
        accd = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    # software prefetch: step s + 1's loads are issued before step s is dequantized (the dequant's shared-memory
    # round trips put barriers in every step, and no load is moved across a barrier); the last step is peeled
    w_next, a_next = _load_step(wptr, absmax_ptr, row_w, row_blk, s_first, KW, NBLK, BW, NB)
    if PRMT and LUT == 5:
        # the fill's 64 shared stores a thread and its barrier overlap the first loads' latency: 1-11% faster at
        # T = 1 than filling first (RESULTS run 40)
        if not _INTERPRET_C:
            _pair_table_fill(code_ptr, x_ptr.dtype.element_ty)
        tab = _pair_lanes(w_next)
    for s in range(s_first, s_last):
        w = w_next
        a = a_next
        w_next, a_next = _load_step(wptr, absmax_ptr, row_w, row_blk, s + 1, KW, NBLK, BW, NB)
        acc0, acc1, accd = _small_step(w, a, s, acc0, acc1, accd, x_ptr, tab, code_ptr, ncode_ptr, nabs_ptr, off,
                                       row_blk, offs_t, T, stride_xt, K, NBS, NESTED, BLOCK_T, IEEE, BLOCK_N, BW,
                                       WB, NB, NBLK, LUT, W_AS_A, PRMT)
    acc0, acc1, accd = _small_step(w_next, a_next, s_last, acc0, acc1, accd, x_ptr, tab, code_ptr, ncode_ptr,
                                   nabs_ptr, off, row_blk, offs_t, T, stride_xt, K, NBS, NESTED, BLOCK_T, IEEE,
                                   BLOCK_N, BW, WB, NB, NBLK, LUT, W_AS_A, PRMT)
    # this program's sums as (BLOCK_T, BLOCK_N) float32; the FMA path's rows past BLOCK_T stay zero
    if BLOCK_T > 2:
        if W_AS_A:
            part = tl.trans(accd)
        else:
            part = accd
    else:
        part = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        part += tl.where(offs_t[:, None] == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
        if BLOCK_T == 2:
            part += tl.where(offs_t[:, None] == 1, tl.sum(acc1, axis=1)[None, :], 0.0)
    out_mask = (offs_t < T)[:, None] & n_mask[None, :]
    if SPLITS > 1:
        ws_io = offs_t[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + tl.program_id(1) * (BLOCK_T * N) + ws_io, part, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket publishes them
        ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel")
        if ticket == SPLITS - 1:  # the last split of this row block: add all partials, in split order
            tl.debug_barrier()
            part = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(SPLITS):  # unrolled: the partials are read at once, not one round trip each
                part += tl.load(ws_ptr + j * (BLOCK_T * N) + ws_io, mask=out_mask, other=0.0, cache_modifier=".cg")
            _small_store(part, bias_ptr, y_ptr, offs_t, offs_n, n_mask, out_mask, stride_yt, HAS_BIAS)
            tl.store(ticket_ptr + pid, 0)  # ready for the next launch on this stream
    else:
        _small_store(part, bias_ptr, y_ptr, offs_t, offs_n, n_mask, out_mask, stride_yt, HAS_BIAS)


@triton.jit
def _small_store(acc, bias_ptr, y_ptr, offs_t, offs_n, n_mask, out_mask, stride_yt, HAS_BIAS: tl.constexpr):
    """y[t, n] = acc (+ bias[n]) in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


_AUTOTUNE_KEY = ["N", "K", "BLOCK_T", "NESTED", "HAS_BIAS"]
_small_fma = gl.autotune(configs=_autotune_configs(FMA_CONFIGS), key=_AUTOTUNE_KEY,
                         do_bench=gl.bench_graphed)(_nf4_matmul_small_kernel)
_small_dot = gl.autotune(configs=_autotune_configs(DOT_CONFIGS), key=_AUTOTUNE_KEY,
                         do_bench=gl.bench_graphed)(_nf4_matmul_small_kernel)


def small_matmul_supported(packed, T: int) -> bool:
    """Whether nf4_matmul_small handles this weight and T: 2-D, rows made of whole absmax blocks of 32..256 values,
    T <= 16, codes contiguous and 4-byte aligned (they are read as int32 words)."""
    return (len(packed.shape) == 2 and 1 <= T <= MAX_SMALL_T and packed.shape[1] % packed.blocksize == 0
            and 32 <= packed.blocksize <= 256 and packed.codes.is_contiguous()
            and packed.codes.data_ptr() % 4 == 0)


def nf4_matmul_small(x: torch.Tensor, packed, bias: torch.Tensor | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x of shape (T, K), T <= 16, reading W's 4-bit codes directly; y in x's dtype.
    `config` (BLOCK_N, BLOCK_KB, LUT, num_warps[, SPLIT_K, num_stages]) bypasses the autotuner, for tests
    and benchmarks; the dot path (T > 2) needs BLOCK_N >= 16. LUT: 2 gathers the levels from a 16-entry table, 0 loads
    them from the global one, 4 builds them by byte permutes for 16-bit x (for float32 x it is 2), 5 looks each code
    byte up in a shared table of level pairs (16-bit x, T <= 2)."""
    T, K = x.shape
    N = packed.shape[0]
    if config is not None and config.get("LUT") == 5 and T > SMALL_FMA_MAX_T:
        raise ValueError(f"nf4_matmul_small: LUT=5 is for T <= {SMALL_FMA_MAX_T} (the FMA path); with T = {T} "
                         "use LUT=4 (the pair table's 32 KiB and the dot path's tiles exceed the 48 KiB a launch "
                         "gets by default)")
    if not small_matmul_supported(packed, T) or packed.shape[1] != K:
        raise ValueError(f"nf4_matmul_small: unsupported x {tuple(x.shape)} for weight {packed.shape} "
                         f"(blocksize {packed.blocksize}); needs 1 <= T <= {MAX_SMALL_T}, in_features % blocksize "
                         "== 0, blocksize in 32..256 and contiguous, 4-byte aligned codes")
    block_t = T if T <= SMALL_FMA_MAX_T else 16
    fma = block_t <= SMALL_FMA_MAX_T
    x = x.contiguous()
    if x.data_ptr() % 4:  # LUT=4/5 read 16-bit x as int32 pairs (an offset view, e.g. x[1:], is the rare case)
        x = x.clone()
    if bias is not None:
        bias = bias.contiguous()
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    nabs, ncode, off = _tensors(packed)
    # the autotuner's own key: after the first call gl._launch launches the chosen config directly
    key = ("nf4_small", fma, N, K, block_t, packed.nested, bias is not None)
    if config is not None:
        configs = [{"SPLIT_K": 1, **config}]
    else:
        chosen = gl._CHOSEN.get(key)
        configs = [chosen[0]] if chosen is not None else (FMA_CONFIGS if fma else DOT_CONFIGS)
    # the split-K partials, (splits, BLOCK_T, N) float32: every element a program reads back was written by its
    # split in the same launch, so no zero-fill; sized for the largest split a config still in the running takes
    max_splits = max(_splits(K, c["BLOCK_KB"], c.get("SPLIT_K", 1)) for c in configs)
    ws = torch.empty((max_splits, block_t, N) if max_splits > 1 else (1,), dtype=torch.float32, device=x.device)
    tickets = _tickets(x.device, max(gl._cdiv(N, c["BLOCK_N"]) for c in configs))

    def grid(meta):
        return gl._cdiv(N, meta["BLOCK_N"]), _splits(K, meta["BLOCK_KB"], meta["SPLIT_K"])
    args = (x, packed.codes, packed.absmax, packed.code, nabs, ncode, off, bias if bias is not None else x, y, ws,
            tickets, T, N, x.stride(0), y.stride(0))
    consts = dict(K=K, BS=packed.blocksize, NBS=packed.nested_blocksize, NESTED=packed.nested,
                  HAS_BIAS=bias is not None, BLOCK_T=block_t, IEEE=x.dtype == torch.float32)
    if config is not None:
        _nf4_matmul_small_kernel[grid](*args, **consts, **{"num_stages": 1, **configs[0]})
    else:
        gl._launch(_small_fma if fma else _small_dot, key, grid, args, consts)
    return y


def split_runs(n_steps: int, split_k: int) -> int:
    """The split-K programs a row block of n_steps K steps gets (a kernel's SPLITS): the steps cut into split_k runs
    of equal length, the last possibly shorter, none empty (so fewer than split_k where it does not divide)."""
    per_split = gl._cdiv(n_steps, max(1, min(split_k, n_steps)))
    return gl._cdiv(n_steps, per_split)


def _splits(k: int, block_kb: int, split_k: int) -> int:
    """The small-T kernel's SPLITS: split_runs over its K steps of block_kb bytes."""
    return split_runs(gl._cdiv(k // 8, block_kb // 4), split_k)


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros, one per row block, for the split-K kernels' tickets: the last program of a row block resets
    its ticket, so one buffer serves every launch on a stream (gl.zeroed_workspace)."""
    return gl.zeroed_workspace(device, "nf4_tickets", max(n, 1024))
