"""Triton kernels for NF4 weights (bitsandbytes layout, see mol/quant/nf4.py).

- `nf4_dequantize`: packed NF4 -> dense (bf16/fp16/fp32) weight, one pass (reads 4.13 bits, writes 16 per value).
- `nf4_matmul_small`: y = x @ W^T (+ bias) for T <= 16 rows of x, reading the 4-bit codes directly
  (decode / GEMV): the weight is dequantized tile by tile in registers and never written out.
For larger T the layer dequantizes into a scratch weight and calls cuBLAS (see mol/quant/linear.py): the
dequant pass costs ~1-3% of a T=8192 GEMM, and cuBLAS beats a Triton GEMM with a dequant prologue.

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
def _nf4_dequant_kernel(codes_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, out_ptr, n_bytes,
                        BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
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
    hi = tl.load(code_ptr + (b >> 4)) * s
    lo = tl.load(code_ptr + (b & 15)) * s
    v = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))  # interleave: hi, lo, hi, lo, ...
    out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, v.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)


def _tensors(p):
    """Kernel arguments for the optional nested tensors (a dummy pointer when not nested)."""
    if p.nested:
        return p.nested_absmax, p.nested_code, p.offset.reshape(1)
    return p.absmax, p.absmax, p.absmax


def nf4_dequantize(packed, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a packed NF4Weight to a dense tensor of `packed.shape` and `dtype` with one Triton launch."""
    n_bytes = packed.codes.numel()
    if 2 * n_bytes >= 2**31:
        raise ValueError(f"nf4_dequantize: {2 * n_bytes} elements exceed the int32 indexing of this kernel; "
                         "split the weight")
    if out is None:
        out = torch.empty(packed.shape, dtype=dtype, device=packed.device)
    nabs, ncode, off = _tensors(packed)
    BLOCK = 1024
    _nf4_dequant_kernel[(triton.cdiv(n_bytes, BLOCK),)](
        packed.codes, packed.absmax, packed.code, nabs, ncode, off, out, n_bytes,
        BS=packed.blocksize, NBS=packed.nested_blocksize, NESTED=packed.nested, BLOCK=BLOCK)
    return out


def _small_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 4, 2),
                                 (32, 512, 8, 3), (64, 256, 4, 3), (64, 512, 8, 2), (16, 1024, 8, 2)]]


@triton.autotune(configs=_small_configs(), key=["N", "K", "BLOCK_T", "NESTED"])
@triton.jit
def _nf4_matmul_small_kernel(x_ptr, codes_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr,
                             y_ptr, T, N, K, stride_xt, stride_yt,
                             BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_kb = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    G: tl.constexpr = BLOCK_K // BS  # absmax blocks per tile row (K % BS == 0, so blocks never straddle rows)
    offs_g = tl.arange(0, G)
    row_byte = offs_n.to(tl.int64) * (K // 2)
    row_blk = offs_n.to(tl.int64) * (K // BS)
    if NESTED:
        off = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + offs_kb
        b = tl.load(codes_ptr + row_byte[:, None] + kb[None, :],
                    mask=n_mask[:, None] & (kb[None, :] < K // 2), other=0).to(tl.int32)
        w = tl.reshape(tl.join(tl.load(code_ptr + (b >> 4)), tl.load(code_ptr + (b & 15))), (BLOCK_N, BLOCK_K))
        g = k0 // BS + offs_g
        gmask = n_mask[:, None] & (g[None, :] < K // BS)
        blk = row_blk[:, None] + g[None, :]
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=gmask, other=0).to(tl.int32)
            s = tl.load(ncode_ptr + qa) * tl.load(nabs_ptr + blk // NBS, mask=gmask, other=0.0) + off
        else:
            s = tl.load(absmax_ptr + blk, mask=gmask, other=0.0)
        w = tl.reshape(tl.reshape(w, (BLOCK_N, G, BS)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + kk[None, :],
                    mask=t_mask[:, None] & (kk[None, :] < K), other=0.0)
        # the weight is rounded to the activation dtype first, as the dequantize-then-GEMM path does
        acc += tl.dot(w.to(x.dtype), tl.trans(x))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_t[None, :] * stride_yt + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & t_mask[None, :])


def small_matmul_supported(packed, T: int) -> bool:
    """Whether nf4_matmul_small handles this weight (2-D, rows made of whole blocks, small blocks) and T."""
    return (len(packed.shape) == 2 and T <= MAX_SMALL_T and packed.shape[1] % packed.blocksize == 0
            and packed.blocksize <= 128)


def nf4_matmul_small(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x of shape (T, K), T <= 16, reading W's 4-bit codes directly."""
    T, K = x.shape
    N = packed.shape[0]
    if not small_matmul_supported(packed, T) or packed.shape[1] != K:
        raise ValueError(f"nf4_matmul_small: unsupported x {tuple(x.shape)} for weight {packed.shape} "
                         f"(blocksize {packed.blocksize}); needs T <= {MAX_SMALL_T} and in_features % blocksize == 0")
    x = x.contiguous()
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    nabs, ncode, off = _tensors(packed)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _nf4_matmul_small_kernel[grid](
        x, packed.codes, packed.absmax, packed.code, nabs, ncode, off, bias if bias is not None else x, y,
        T, N, K, x.stride(0), y.stride(0),
        BS=packed.blocksize, NBS=packed.nested_blocksize, NESTED=packed.nested, HAS_BIAS=bias is not None,
        BLOCK_T=16)
    return y
