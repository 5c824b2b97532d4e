"""The base GEMM with the experts' product as extra K (base_gemm.py's function), as one pipeline (Gluon, sm_90).

    c = a @ op(b) + op(u) @ op(v) (+ bias)

base_gemm's Triton kernel runs two K loops per output tile, the base's and then the experts' few steps, and
Triton pipelines each loop on its own: every tile drains the pipeline once for the base K, refills it for the
extra K, drains it again and refills it for the next tile. At T=8192 4096^2 the extra K cost it 24-28 us a GEMM
(RESULTS run 29: 372 / 375 us against ~347 for the bare base).

Here a program's loads walk one flat sequence of (tile, k step) pairs, the base's K steps then the extra ones,
STAGES - 1 steps ahead of the MMAs across both kinds of step and across tile boundaries: the stage buffers are
shared, each load goes to a or u (b or v) by its predicate, and the next tile's first loads are in flight while
this tile's epilogue stores. One warpgroup MMA stays in flight (a stage is reloaded once the MMA that
read it has retired).

Hopper only (wgmma); base_gemm times it beside its Triton configs and cuBLAS and keeps the fastest per shape.
Measured on an H200 (RESULTS run 36, T=8192 4096^2): 411.0 us for the bare GEMM (cuBLAS 411.3, Triton 413.4) and
425.6 / 431.3 with the forward's / backward's extra K (Triton 428.5 / 435.5): the refills were a small part of the
extra K's cost, most of it is the steps' own MMAs. The layer gained 1-19 us (0.1-1.4%) at the issue's shapes.
"""
from __future__ import annotations

import functools

import torch

from mol.kernels import base_gemm as bg  # its tile order (read when a kernel compiles) and device properties
from mol.kernels.grouped_lora import _cdiv  # plain Python: triton.cdiv costs ~1.5 µs a host call

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    # TMA copies: async_copy_global_to_shared / async_copy_shared_to_global up to Triton 3.6, then renamed
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # a shared-memory view under another shape and layout: _reinterpret up to Triton 3.6, then reinterpret
    _PUBLIC_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False

# ("gluon", BM, BN, BK, GROUP_M, num_warps, STAGES, EPI_SPLIT): 128x256 tiles over two warpgroups, as base_gemm's
# Triton configs; three stages (3 x 48 KB) and the 64 KB output tile fill 208 of sm_90's 227 KB of shared memory,
# or four with the tile stored in halves (224 KB).
CONFIGS = [("gluon", 128, 256, 64, 8, 8, 3, 1), ("gluon", 128, 256, 64, 8, 8, 4, 2),
           ("gluon", 128, 256, 64, 16, 8, 4, 2)]
# u^T tiles (U_T) go to the MMA through registers rather than as a transposed shared-memory operand (both forms
# pass probe_gluon_gemm's check, RESULTS run 36; the shared-memory one is the default)
U_REG = False


def supported(a: torch.Tensor, b_t: bool, u: torch.Tensor | None, v_t: bool) -> bool:
    """Whether the Gluon kernel can take these (TMA-ready, base_gemm.triton_supported) operands: a Hopper GPU, and
    b and v in the same orientation (their tiles share the stage buffers)."""
    if not AVAILABLE or not a.is_cuda or bg._props(a.device)[0] != 9:
        return False
    return u is None or v_t == b_t


if AVAILABLE:
    @gluon.jit
    def _u_view(buf, u_desc):
        """A stage's a-tile buffer seen as a u^T tile (the same bytes, u_desc's shape and layout)."""
        if _PUBLIC_REINTERPRET:
            return buf.reinterpret(u_desc.dtype, u_desc.block_type.shape, u_desc.layout)
        else:
            return buf._reinterpret(u_desc.dtype, u_desc.block_type.shape, u_desc.layout)

    @gluon.jit
    def _issue_loads(kk, om, on, s, live, n_main, a_desc, b_desc, u_desc, v_desc, bars, a_bufs, b_bufs,
                     B_T: gl.constexpr, U_T: gl.constexpr, HAS_U: gl.constexpr):
        """Start the loads of k step kk of the output tile at (om, on) into stage s: a base step (kk < n_main)
        reads a and b, an extra one u and v; nothing unless live."""
        BK: gl.constexpr = a_desc.block_type.shape[1]
        bar = bars.index(s)
        # a and u tiles have the same bytes, and so do b and v: one count whichever pair this step reads
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=live)
        main = live & (kk < n_main)
        k = kk * BK
        _tma_load(a_desc, [om, k], bar, a_bufs.index(s), pred=main)
        if B_T:
            _tma_load(b_desc, [on, k], bar, b_bufs.index(s), pred=main)
        else:
            _tma_load(b_desc, [k, on], bar, b_bufs.index(s), pred=main)
        if HAS_U:
            extra = live & (kk >= n_main)
            kr = k - n_main * BK
            if U_T:
                _tma_load(u_desc, [kr, om], bar, _u_view(a_bufs.index(s), u_desc), pred=extra)
            else:
                _tma_load(u_desc, [om, kr], bar, a_bufs.index(s), pred=extra)
            if B_T:
                _tma_load(v_desc, [on, kr], bar, b_bufs.index(s), pred=extra)
            else:
                _tma_load(v_desc, [kr, on], bar, b_bufs.index(s), pred=extra)

    @gluon.jit
    def _next_step(kk, tile, om, on, n_k, nprog, num_m, num_n, GROUP_M: gl.constexpr, BM: gl.constexpr,
                   BN: gl.constexpr):
        """The (k step, tile, om, on) after (kk, tile): counters, so that the per-step work has no division (every
        warp runs it; a division per step cost ~25% of the GEMM in a first form)."""
        kk += 1
        if kk == n_k:
            kk = 0
            tile += nprog
            m, on = bg._tile_origin(tile, num_m, num_n, GROUP_M, BN)
            om = m * BM
        return kk, tile, om, on

    @gluon.jit
    def _base_gemm_gluon_kernel(a_desc, b_desc, u_desc, v_desc, c_desc, bias_ptr, M, N, K, KR,
                                GROUP_M: gl.constexpr, B_T: gl.constexpr, U_T: gl.constexpr, HAS_U: gl.constexpr,
                                HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, EPI_SPLIT: gl.constexpr,
                                U_REG: gl.constexpr, num_warps: gl.constexpr):
        """c (M, N) = a (M, K) @ op(b) + op(u) (M, KR) @ op(v) (+ bias), persistent; op(b), op(v) transposed when
        B_T (b (N, K), v (N, KR)); u stored (KR, M) when U_T. Out-of-bounds elements load as zero (TMA)."""
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1] * EPI_SPLIT
        dtype: gl.constexpr = a_desc.dtype
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BN, 16])
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(bars.index(st), count=1)

        num_m = gl.cdiv(M, BM)
        num_n = gl.cdiv(N, BN)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        n_main = gl.cdiv(K, a_desc.block_type.shape[1])
        n_k = n_main
        if HAS_U:
            n_k = n_main + gl.cdiv(KR, a_desc.block_type.shape[1])
        total = gl.cdiv(num_m * num_n - pid, nprog) * n_k  # this program's (tile, k step) pairs

        # the loads run STAGES - 1 steps ahead of the MMAs: (lk, l_tile, l_om, l_on) is the next load's step
        m0, on0 = bg._tile_origin(pid, num_m, num_n, GROUP_M, BN)
        lk = 0
        l_tile = pid
        l_om = m0 * BM
        l_on = on0
        for p in gl.static_range(STAGES - 1):
            _issue_loads(lk, l_om, l_on, p, p < total, n_main, a_desc, b_desc, u_desc, v_desc, bars, a_bufs,
                         b_bufs, B_T, U_T, HAS_U)
            lk, l_tile, l_om, l_on = _next_step(lk, l_tile, l_om, l_on, n_k, nprog, num_m, num_n, GROUP_M, BM, BN)
        c_om = m0 * BM  # the tile the MMAs are on
        c_on = on0
        c_tile = pid
        c = 0  # steps consumed
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma_layout)
        # a tile loop around a k-step loop (not one flat loop): the epilogue's wait for the last MMA then comes after
        # the k loop on every path, where in a branch of a flat loop ptxas waited for every MMA on every step (~7%)
        for _ in range(total // n_k):
            for kk in range(n_k):
                s = c % STAGES
                mbarrier.wait(bars.index(s), (c // STAGES) & 1)
                if B_T:
                    b_op = b_bufs.index(s).permute((1, 0))
                else:
                    b_op = b_bufs.index(s)
                # each branch waits for all but its own MMA: the MMA of step c - 1 has retired, so its stage takes
                # the load STAGES - 1 steps ahead (an if cannot yield the in-flight accumulator)
                if HAS_U and U_T:
                    if kk < n_main:
                        acc = warpgroup_mma(a_bufs.index(s), b_op, acc, use_acc=kk > 0, is_async=True)
                        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    elif U_REG:  # u^T through registers: the MMA's A operand K-major, as for a
                        a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
                        u_reg = _u_view(a_bufs.index(s), u_desc).permute((1, 0)).load(a_reg)
                        acc = warpgroup_mma(u_reg, b_op, acc, use_acc=True, is_async=True)
                        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    else:
                        acc = warpgroup_mma(_u_view(a_bufs.index(s), u_desc).permute((1, 0)), b_op, acc,
                                            use_acc=True, is_async=True)
                        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                else:
                    acc = warpgroup_mma(a_bufs.index(s), b_op, acc, use_acc=kk > 0, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                _issue_loads(lk, l_om, l_on, (c + STAGES - 1) % STAGES, c + STAGES - 1 < total, n_main, a_desc,
                             b_desc, u_desc, v_desc, bars, a_bufs, b_bufs, B_T, U_T, HAS_U)
                lk, l_tile, l_om, l_on = _next_step(lk, l_tile, l_om, l_on, n_k, nprog, num_m, num_n, GROUP_M, BM,
                                                    BN)
                c += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            out = acc
            if HAS_BIAS:
                offs_n = c_on + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
                out = out + gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
            out = out.to(c_desc.dtype)
            if EPI_SPLIT == 2:  # in column halves: a smaller c_smem leaves room for a fourth stage
                out0, out1 = gl.split(gl.permute(gl.reshape(out, (BM, 2, BN // 2)), (0, 2, 1)))
                tma.store_wait(pendings=0)  # the previous store has read c_smem
                c_smem.store(out0)
                fence_async_shared()
                _tma_store(c_desc, [c_om, c_on], c_smem)
                tma.store_wait(pendings=0)
                c_smem.store(out1)
                fence_async_shared()
                _tma_store(c_desc, [c_om, c_on + BN // 2], c_smem)
            else:
                tma.store_wait(pendings=0)  # the previous tile's store has read c_smem
                c_smem.store(out)
                fence_async_shared()
                _tma_store(c_desc, [c_om, c_on], c_smem)
            c_tile += nprog
            m, c_on = bg._tile_origin(c_tile, num_m, num_n, GROUP_M, BN)
            c_om = m * BM
        tma.store_wait(pendings=0)
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(st))


@functools.lru_cache(maxsize=None)  # each costs ~4 µs of host time to build, and a call makes five
def _smem_layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _desc(t: torch.Tensor, block: list[int]):
    return GluonDescriptor.from_tensor(t, block, _smem_layout(tuple(block), t.dtype))


def gluon_base_mm(a, b, b_t, u=None, v=None, v_t=False, bias=None, config=None, u_t: bool = False,
                  out: torch.Tensor | None = None, num_progs: int | None = None) -> torch.Tensor:
    """c = a @ op(b) + op(u) @ op(v) (+ bias) by the Gluon kernel, in a's dtype; operands as base_gemm's
    triton_base_mm takes them (row-major, TMA-ready; `supported` says whether they fit); `config` one of CONFIGS."""
    _, bm, bn, bk, group_m, warps, stages, epi = config or CONFIGS[0]
    M, K = a.shape
    N = b.shape[0] if b_t else b.shape[1]
    c = out if out is not None else torch.empty((M, N), device=a.device, dtype=a.dtype)
    a_d = _desc(a, [bm, bk])
    b_d = _desc(b, [bn, bk] if b_t else [bk, bn])
    if u is not None:
        u_d = _desc(u, [bk, bm] if u_t else [bm, bk])
        v_d = _desc(v, [bn, bk] if v_t else [bk, bn])
        kr = u.shape[0] if u_t else u.shape[1]
    else:
        u_d, v_d, kr, u_t = a_d, b_d, 0, False
    c_d = _desc(c, [bm, bn // epi])
    progs = num_progs or min(bg._num_sms(a.device), _cdiv(M, bm) * _cdiv(N, bn))
    _base_gemm_gluon_kernel[(progs,)](a_d, b_d, u_d, v_d, c_d, bias if bias is not None else a, M, N, K, kr,
                                      GROUP_M=group_m, B_T=b_t, U_T=u_t, HAS_U=u is not None,
                                      HAS_BIAS=bias is not None, STAGES=stages, EPI_SPLIT=epi, U_REG=U_REG,
                                      num_warps=warps)
    return c
