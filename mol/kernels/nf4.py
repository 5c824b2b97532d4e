"""Triton kernels for NF4 weights (bitsandbytes layout, see mol/quant/nf4.py).

- `nf4_dequantize`: packed NF4 -> dense (bf16/fp16/fp32) weight, one pass (reads 4.13 bits, writes 16 per value).
- `nf4_matmul_small`: y = x @ W^T (+ bias) for T <= 16 rows of x, reading the 4-bit codes directly
  (decode / GEMV): the weight is dequantized block by block in registers and never written out.
  OPT-IN (NF4Linear's `fused_decode`, or MOL_NF4_FUSED_DECODE=1): timed on an H100 it is no faster than
  dequantize + cuBLAS yet (27.8 against 26.6 us at T=1, 4096x4096: still latency bound, see
  benchmarks/RESULTS.md), so by default NF4Linear dequantizes for every T.
For other T the layer dequantizes into a scratch weight and calls cuBLAS (see mol/quant/linear.py): at T=8192
the dequant pass is ~20 us (4096x4096) against ~400 us for the GEMM.

Under TRITON_INTERPRET=1 use float32 activations (the interpreter mis-computes tl.dot on bf16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
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
                        BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, LUT: tl.constexpr,
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
    tl.store(out_ptr + out_offs, v.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)


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
    _nf4_dequant_kernel[(triton.cdiv(n_bytes, BLOCK),)](
        packed.codes, packed.absmax, packed.code, nabs, ncode, off, out, n_bytes,
        BS=packed.blocksize, NBS=packed.nested_blocksize, NESTED=packed.nested,
        LUT=DEQUANT_LUT if lut is None else lut, BLOCK=BLOCK,
        # no FMA contraction: absmax = code2[q] * absmax2 + offset must round twice, as bitsandbytes and the
        # PyTorch reference do, or a few bf16 outputs land 1 ulp away (seen on an H100, 4096x14336)
        enable_fp_fusion=False)
    return out


def _small_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "GPI": 2, "LUT": 0}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "GPI": g, "LUT": lut}, num_warps=4, num_stages=3)
            # configs without register spills in the sm_90 compiler report (GPI 8-16 at 4 warps spill)
            for bn, g in [(16, 2), (32, 2), (32, 4), (64, 4)] for lut in (0, 1)]


@triton.autotune(configs=_small_configs(), key=["N", "K", "NESTED"], reset_to_zero=["y_ptr"])
@triton.jit
def _nf4_matmul_small_kernel(x_ptr, codes_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr,
                             y_ptr, T, N, K, stride_xt, stride_yt,
                             BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr, LUT: tl.constexpr):
    """y[t, n] += sum_k x[t, k] W[n, k] into a zeroed float32 y. Program (i, j) takes rows i*BLOCK_N.. and the
    j-th of num_programs(1) slices of the absmax blocks (split-K: a GEMV has too few row tiles to keep enough
    bytes in flight). Each step takes GPI absmax blocks: the high and low nibbles (even and odd k) are two dots
    against x's even and odd columns, so no interleaving shuffle is needed, and the block's scale multiplies
    the (BLOCK_N, BLOCK_T) partial product in float32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_j = tl.arange(0, BS // 2)  # byte within an absmax block
    nblk = K // BS  # absmax blocks per row (K % BS == 0)
    per_split = tl.cdiv(nblk, tl.num_programs(1))
    g_lo = pid_k * per_split
    g_hi = tl.minimum(nblk, g_lo + per_split)
    row_byte = offs_n.to(tl.int64) * (K // 2)
    row_blk = offs_n.to(tl.int64) * nblk
    if NESTED:
        off = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for g0 in range(g_lo, g_hi, GPI):
        for gi in tl.static_range(GPI):
            g = g0 + gi
            okj = (offs_j * 0 + g) < g_hi  # as tensors: the interpreter rejects scalar-bool masks
            okn = n_mask & ((offs_n * 0 + g) < g_hi)
            b = tl.load(codes_ptr + row_byte[:, None] + g * (BS // 2) + offs_j[None, :],
                        mask=okn[:, None] & okj[None, :], other=0).to(tl.int32)
            kk = g * BS + 2 * offs_j
            xp = x_ptr + offs_t[:, None] * stride_xt + kk[None, :]
            xm = t_mask[:, None] & okj[None, :]
            xe = tl.load(xp, mask=xm, other=0.0)
            xo = tl.load(xp + 1, mask=xm, other=0.0)
            part = tl.dot(_nf4_level(b >> 4, LUT, code_ptr).to(xe.dtype), tl.trans(xe))
            part = tl.dot(_nf4_level(b & 15, LUT, code_ptr).to(xe.dtype), tl.trans(xo), part)
            blk = row_blk + g
            if NESTED:
                qa = tl.load(absmax_ptr + blk, mask=okn, other=0).to(tl.int32)
                s = tl.load(ncode_ptr + qa) * tl.load(nabs_ptr + blk // NBS, mask=okn, other=0.0) + off
            else:
                s = tl.load(absmax_ptr + blk, mask=okn, other=0.0)
            acc += part * s[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask & ((offs_n * 0 + pid_k) == 0), other=0.0).to(tl.float32)
        acc += bias[:, None]
    tl.atomic_add(y_ptr + offs_t[None, :] * stride_yt + offs_n[:, None], acc, mask=n_mask[:, None] & t_mask[None, :])


def small_matmul_supported(packed, T: int) -> bool:
    """Whether nf4_matmul_small handles this weight (2-D, rows made of whole blocks, small blocks) and T."""
    return (len(packed.shape) == 2 and T <= MAX_SMALL_T and packed.shape[1] % packed.blocksize == 0
            and 32 <= packed.blocksize <= 256)


def nf4_matmul_small(x: torch.Tensor, packed, bias: torch.Tensor | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x of shape (T, K), T <= 16, reading W's 4-bit codes directly.
    `config` (BLOCK_N, GPI, LUT, num_warps, num_stages) bypasses the autotuner, for tests and benchmarks."""
    T, K = x.shape
    N = packed.shape[0]
    if not small_matmul_supported(packed, T) or packed.shape[1] != K:
        raise ValueError(f"nf4_matmul_small: unsupported x {tuple(x.shape)} for weight {packed.shape} "
                         f"(blocksize {packed.blocksize}); needs T <= {MAX_SMALL_T} and in_features % blocksize == 0")
    x = x.contiguous()
    y = torch.zeros((T, N), dtype=torch.float32, device=x.device)  # split-K partial sums land here
    nabs, ncode, off = _tensors(packed)
    nblk = K // packed.blocksize
    target = _target_programs(x.device)
    split = lambda bn: max(1, min(nblk, target // triton.cdiv(N, bn)))  # noqa: E731
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split(meta["BLOCK_N"]))  # noqa: E731
    kernel = _nf4_matmul_small_kernel if config is None else _nf4_matmul_small_kernel.fn
    kernel[grid](
        x, packed.codes, packed.absmax, packed.code, nabs, ncode, off, bias if bias is not None else x, y,
        T, N, K, x.stride(0), y.stride(0),
        BS=packed.blocksize, NBS=packed.nested_blocksize, NESTED=packed.nested, HAS_BIAS=bias is not None,
        BLOCK_T=16, **(config or {}))
    return y.to(x.dtype)


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """About 4 programs per SM, so each SM has several slices' loads in flight (8 under the interpreter, which
    exercises split-K on small test shapes)."""
    if _INTERPRET or device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 4 * _SM_COUNT[idx]
