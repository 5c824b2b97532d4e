"""The frozen base GEMM with the experts' small GEMM riding in it as extra K, one Triton kernel (TMA, sm_90+).

    c = a @ op(b) + op(u) @ op(v) (+ bias)      op(m) = m^T where m is stored transposed ((N, K) for b and v,
                                                (K, M) for u: the routed backward's dhl is stored token-minor)

The routed layer's forward is y = x W^T + u B_cat (K = in + R) and its backward dx = dy W + dhl [A_cat; Wr]
(K = out + R + E). cuBLAS runs each as two GEMMs: the small one writes c, the base GEMM reads it back as its C
(beta = 1), so a T x out tensor is written and read once more than needed. Here one kernel runs the base's K loop
and then the second pair's few K steps into the same float32 accumulator, and writes c once.

It wins only where this GEMM keeps up with cuBLAS on the base shape, which differs by GPU and shape, so
BASE_GEMM="auto" times both (the Triton configs below and cuBLAS's two GEMMs) the first time a shape key is seen
and keeps the faster. Measured on an H200 (RESULTS run 23, forward / backward, us, against cuBLAS's two GEMMs):
T=8192 4096->4096 E=8 r=16 412 / 417 against 416 / 423; E=32 r=8 425 / 433 against 453 / 440; T=2048 99 / 100
against 104 / 107; 2048->2048 at T=8192 109 / 112 against 117 / 120; at T=512 cuBLAS wins (37 / 34 against 91 / 42).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from mol.kernels import base_gemm_gluon as bgg
from mol.kernels import env_flag
from mol.kernels import grouped_lora as gl

try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: cuBLAS only
    TensorDescriptor = None

# "auto": per shape key, the fastest of the Triton kernel's configs, the Gluon kernel's (base_gemm_gluon.py, where
# GLUON and a Hopper GPU allow) and cuBLAS's two GEMMs, timed once; "cublas" / "triton": always that one (where the
# kernel cannot run, e.g. misaligned strides, cuBLAS runs); "gluon": the Gluon kernel where it can run, else the
# Triton one, else cuBLAS.
# MOL_BASE_GEMM sets it at import; read at call time, so tests and benchmarks may set it.
BASE_GEMM = os.environ.get("MOL_BASE_GEMM", "auto")
_CHOICES = ("auto", "cublas", "triton", "gluon")

# (BM, BN, BK, GROUP_M, num_warps, num_stages, EPI_SPLIT): persistent programs, one per SM; EPI_SPLIT stores the
# output tile in halves, which frees shared memory for a fourth stage. The five that were fastest somewhere in a
# sweep of eleven over nine layer shapes (RESULTS run 23: T = 512-8192, 2048-14336 features, R = 128 and 256);
# 128x128, 256x128 and 64x256 tiles never were.
CONFIGS = [(128, 256, 64, 8, 8, 3, 1), (128, 256, 64, 16, 8, 3, 1), (128, 256, 64, 4, 8, 3, 1),
           (128, 256, 64, 8, 8, 4, 2), (128, 256, 64, 8, 8, 3, 2)]
# Eager (uncaptured) CUDA calls run cuBLAS under "auto" whatever was tuned; calls being captured into a CUDA graph
# (graph_tokens, a captured step, torch.compile's reduce-overhead) run the tuned choice. The Triton and Gluon
# kernels' launch hands Triton five TMA descriptors to encode on the host: 87-138 µs of CPU per call on an H100
# host against 36-52 for cuBLAS's two GEMMs, to save the GPU 4-17 µs of a 420-440 µs GEMM at T=8192 (RESULTS run
# 45; 106-117 against 31 µs on an H200, runs 23 and 34), and eager steps on these hosts are host-bound. On
# bench_model's MoL step (calling-thread backward, settings interleaved on one model) cuBLAS for every eager call
# took 111.9 against 131.2 ms with the tuned choice in one run, 97.4 against 94.3 (within the rounds' spread) in
# another, and 84.1 against 113.0 against the rules it replaces (cuBLAS at <= 2048 rows, or while the stream was
# idle; run 45). It also makes eager results independent of timing, which the idle-stream rule was not. Descriptors
# made on the device (tl.make_tensor_descriptor) cut the launch to 56-93 µs but slowed the kernel 3-20 µs (run
# 45), so they were dropped. MOL_BASE_GEMM_EAGER_CUBLAS=0 lets eager calls run the tuned choice too (a GPU-bound
# eager step may gain ~1-4% of its base GEMMs' time); BASE_GEMM="triton" forces the kernel everywhere.
EAGER_CUBLAS = env_flag("MOL_BASE_GEMM_EAGER_CUBLAS", True)
# Whether "auto" and "triton" also time the Gluon kernel (base_gemm_gluon.py: one pipeline over the base's and the
# experts' K steps, Hopper only): at cuBLAS's speed on the bare GEMM and 3-4 µs ahead of the Triton kernel with the
# extra K, so the layer 0.1-1.4% faster (RESULTS run 36). MOL_BASE_GEMM_GLUON=0 leaves it out.
GLUON = env_flag("MOL_BASE_GEMM_GLUON", True)
TUNE_ROUNDS = 3  # candidates timed in turn, each's best round kept: one pass ranks them by the clock's drift
_INTERPRET_CONFIG = (16, 16, 16, 2, 4, 1, 2)


@triton.jit
def _k_steps(acc, x_desc, y_desc, om, on, K, BK: tl.constexpr, Y_T: tl.constexpr, F32_DOT: tl.constexpr,
             X_T: tl.constexpr = False):
    """acc += op(x)[om:, :K] @ op(y)[:K, on:], BK columns of K at a time; op(y) = y^T for y stored (N, K) when Y_T,
    op(x) = x^T for x stored (K, M) when X_T."""
    for k in range(0, K, BK):
        if X_T:
            x = x_desc.load([k, om]).T
        else:
            x = x_desc.load([om, k])
        if Y_T:
            y = y_desc.load([on, k]).T
        else:
            y = y_desc.load([k, on])
        if F32_DOT:  # the CPU interpreter mis-computes low-precision tl.dot
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc)
    return acc


@triton.jit
def _base_gemm_kernel(a_desc, b_desc, u_desc, v_desc, c_desc, bias_ptr, M, N, K, KR,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      B_T: tl.constexpr, U_T: tl.constexpr, V_T: tl.constexpr, HAS_U: tl.constexpr,
                      HAS_BIAS: tl.constexpr,
                      EPI_SPLIT: tl.constexpr, NUM_PROGS: tl.constexpr, F32_DOT: tl.constexpr):
    """c (M, N) = a (M, K) @ op(b) + op(u) (M, KR) @ op(v) (+ bias); op(b) = b^T for b (N, K) when B_T, else b
    (K, N); op(u) = u^T for u (KR, M) when U_T.
    Out-of-bounds tile elements load as zero (TMA) and are not stored, so no size needs to divide a block."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS):
        m, on = _tile_origin(tile, num_m, num_n, GROUP_M, BN)
        om = m * BM
        acc = _k_steps(tl.zeros((BM, BN), dtype=tl.float32), a_desc, b_desc, om, on, K, BK, B_T, F32_DOT)
        if HAS_U:
            acc = _k_steps(acc, u_desc, v_desc, om, on, KR, BK, V_T, F32_DOT, U_T)
        _store_tile(acc, c_desc, bias_ptr, om, on, N, BM, BN, HAS_BIAS, EPI_SPLIT)


@triton.jit
def _tile_origin(tile, num_m, num_n, GROUP_M: tl.constexpr, BN: tl.constexpr):
    """(row block, first column) of output tile `tile` in grouped order: GROUP_M row blocks share each column
    tile of b while it is in L2."""
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + tile % size_m, ((tile % in_group) // size_m) * BN


@triton.jit
def _store_tile(acc, c_desc, bias_ptr, om, on, N, BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                EPI_SPLIT: tl.constexpr):
    """c[om:, on:] = acc (+ bias) in c's dtype; EPI_SPLIT == 2 stores it in two column halves."""
    if HAS_BIAS:
        offs_n = on + tl.arange(0, BN)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if EPI_SPLIT == 2:
        c0, c1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        c_desc.store([om, on], c0.to(c_desc.dtype))
        c_desc.store([om, on + BN // 2], c1.to(c_desc.dtype))
    else:
        c_desc.store([om, on], acc.to(c_desc.dtype))


def _op(m: torch.Tensor, transposed: bool) -> torch.Tensor:
    return m.t() if transposed else m


def _cublas(a, b, b_t, u, v, v_t, bias, u_t=False):
    """Today's two cuBLAS GEMMs: the small product (with the bias) written first, the base accumulated into it."""
    u = _op(u, u_t) if u is not None else None
    if u is None:
        return torch.mm(a, _op(b, b_t)) if bias is None else torch.addmm(bias, a, _op(b, b_t))
    c = torch.mm(u, _op(v, v_t)) if bias is None else torch.addmm(bias, u, _op(v, v_t))
    return c.addmm_(a, _op(b, b_t))


def _tma_ok(*ts: torch.Tensor | None) -> bool:
    """2-D, unit inner stride, 16-byte aligned row strides and base addresses (what a TMA descriptor needs)."""
    for t in ts:
        if t is None:
            continue
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def triton_supported(a, b, u=None, v=None, bias=None, b_t: bool = True) -> bool:
    """Whether the Triton kernel can run these operands (else base_mm runs cuBLAS): TMA reads a, b, u and v and
    stores the output (a's rows by b's N = b.shape[0] if b_t else b.shape[1]), so all need 16-byte rows."""
    if TensorDescriptor is None or a.dtype not in (torch.bfloat16, torch.float16) or min(*a.shape, *b.shape) == 0:
        return False
    if u is not None and min(*u.shape, *v.shape) == 0:
        return False
    if any(t is not None and t.dtype != a.dtype for t in (b, u, v)):
        return False
    if gl._INTERPRET:
        on_device = a.device.type == "cpu"
    else:
        on_device = a.is_cuda and _props(a.device)[3]
    n_out = b.shape[0] if b_t else b.shape[1]
    return (on_device and _tma_ok(a, b, u, v) and (n_out * a.element_size()) % 16 == 0
            and (bias is None or bias.is_contiguous()))


_PROPS: dict = {}
# the shared memory a block may opt into by compute capability, for a torch whose device properties lack
# shared_memory_per_block_optin (CUDA programming guide; sm_86 / 89 / 120: 99 KB, sm_75: 64 KB)
_SMEM_OPTIN = {(7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
               (10, 3): 227 * 1024}


def _props(device: torch.device) -> tuple[int, int, int, bool]:
    """(compute capability major, SM count, shared memory a block may opt into, whether the TMA kernel runs there),
    looked up once per device: these calls cost host time every layer."""
    if device not in _PROPS:
        p = torch.cuda.get_device_properties(device)
        smem = getattr(p, "shared_memory_per_block_optin", 0) or _SMEM_OPTIN.get((p.major, p.minor), 99 * 1024)
        # TMA descriptors need sm_90+; the 128x256 tiles' shared memory sm_90 / sm_100 (not sm_120's 99 KB).
        # Worked out here: triton_supported runs on every planned call, and fitting() costs ~1 µs of Python
        kernel = p.major >= 9 and any(config_smem(c) <= smem for c in CONFIGS)
        _PROPS[device] = (p.major, p.multi_processor_count, smem, kernel)
    return _PROPS[device]


def config_smem(cfg: tuple) -> int:
    """Shared memory a 16-bit config (BM, BN, BK, GROUP_M, num_warps, num_stages, EPI_SPLIT) of the Triton kernel or
    ("gluon", ...) of the Gluon one takes: its stages of a and b tiles and the output tile (the compiler's figure is
    within 2 KB above, barriers; 177-225 KB for CONFIGS, which only sm_90 / sm_100's 227 KB hold)."""
    bm, bn, bk, _, _, stages, epi = cfg[1:] if cfg[0] == "gluon" else cfg
    return 2 * (stages * (bm + bn) * bk + bm * bn // epi) + 2048


def fitting(configs: list, device: torch.device) -> list:
    """The configs whose shared memory this GPU holds: none on a 99 KB one (sm_120, RTX 50xx), where cuBLAS runs
    rather than compiling each config only to see its launch fail."""
    return [c for c in configs if config_smem(c) <= _props(device)[2]]


def _num_sms(device: torch.device) -> int:
    return _props(device)[1] if device.type == "cuda" else 4


def triton_base_mm(a, b, b_t, u=None, v=None, v_t=False, bias=None, config=None,
                   num_progs: int | None = None, u_t: bool = False) -> torch.Tensor:
    """c = a @ op(b) + op(u) @ op(v) (+ bias) by the Triton kernel, in a's dtype (see the module docstring);
    `config` (BM, BN, BK, GROUP_M, num_warps, num_stages, EPI_SPLIT), default the first of CONFIGS;
    `num_progs` the persistent programs (default: one per SM, at most one per tile). A Gluon config (first item
    "gluon", base_gemm_gluon.CONFIGS) runs that kernel instead."""
    if config is not None and config[0] == "gluon":
        out = gl._alloc((a.shape[0], b.shape[0] if b_t else b.shape[1]), a)
        return bgg.gluon_base_mm(a, b, b_t, u, v, v_t, bias, config, u_t=u_t, out=out, num_progs=num_progs)
    bm, bn, bk, group_m, warps, stages, epi = config or (_INTERPRET_CONFIG if gl._INTERPRET else CONFIGS[0])
    M, K = a.shape
    N = b.shape[0] if b_t else b.shape[1]
    c = gl._alloc((M, N), a)
    a_d = TensorDescriptor.from_tensor(a, [bm, bk])
    b_d = TensorDescriptor.from_tensor(b, [bn, bk] if b_t else [bk, bn])
    if u is not None:
        u_d = TensorDescriptor.from_tensor(u, [bk, bm] if u_t else [bm, bk])
        v_d = TensorDescriptor.from_tensor(v, [bn, bk] if v_t else [bk, bn])
        kr = u.shape[0] if u_t else u.shape[1]
    else:
        u_d, v_d, kr = a_d, b_d, 0
    c_d = TensorDescriptor.from_tensor(c, [bm, bn // epi])
    progs = num_progs or min(_num_sms(a.device), gl._cdiv(M, bm) * gl._cdiv(N, bn))
    _base_gemm_kernel[(progs,)](a_d, b_d, u_d, v_d, c_d, bias if bias is not None else a, M, N, K, kr,
                                BM=bm, BN=bn, BK=bk, GROUP_M=group_m, B_T=b_t, U_T=u_t, V_T=v_t,
                                HAS_U=u is not None,
                                HAS_BIAS=bias is not None, EPI_SPLIT=epi, NUM_PROGS=progs, F32_DOT=gl._INTERPRET,
                                num_warps=warps, num_stages=stages)
    return c


# shape key -> the config chosen, or None for cuBLAS
_CHOSEN: dict = {}
# the shapes eager "auto" calls have planned (base_mm): their later eager calls skip the planning
_EAGER_PLANNED: set = set()


def _choose(key, a, b, b_t, u, v, v_t, bias, u_t=False):
    """The fastest of CONFIGS (and, for "auto", cuBLAS, as None) for this key: each candidate's best do_bench
    median over TUNE_ROUNDS interleaved rounds."""
    if gl._INTERPRET or torch.cuda.is_current_stream_capturing():
        return _INTERPRET_CONFIG if gl._INTERPRET else None  # nothing can be timed inside a graph capture
    torch.cuda.synchronize()
    fns = {None: lambda: _cublas(a, b, b_t, u, v, v_t, bias, u_t)} if BASE_GEMM == "auto" else {}
    gluon = bgg.CONFIGS if (GLUON or BASE_GEMM == "gluon") and bgg.supported(a, b_t, u, v_t) else []
    for cfg in fitting(gluon if BASE_GEMM == "gluon" and gluon else CONFIGS + gluon, a.device):
        try:
            triton_base_mm(a, b, b_t, u, v, v_t, bias, cfg, u_t=u_t)
        except Exception:  # noqa: BLE001 - a config this GPU cannot run (e.g. its shared memory) is left out
            continue
        fns[cfg] = lambda cfg=cfg: triton_base_mm(a, b, b_t, u, v, v_t, bias, cfg, u_t=u_t)
    best = {c: float("inf") for c in fns}
    for _ in range(TUNE_ROUNDS):
        for c, fn in fns.items():
            best[c] = min(best[c], do_bench(fn, warmup=2, rep=10))
    choice = min(best, key=best.get) if best else None
    _CHOSEN[key] = choice
    return choice


def base_mm(a: torch.Tensor, b: torch.Tensor, b_t: bool, u: torch.Tensor | None = None,
            v: torch.Tensor | None = None, v_t: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """c = a @ op(b) + u @ op(v) (+ bias), op(m) = m^T when the flag is set; a fresh tensor in a's dtype. u may be
    row- or column-major (a transposed view).
    BASE_GEMM picks the Triton kernel or cuBLAS (see there); both compute the same function."""
    if BASE_GEMM not in _CHOICES:
        raise ValueError(f"mol.kernels.base_gemm.BASE_GEMM={BASE_GEMM!r}; use one of {_CHOICES}")
    if BASE_GEMM == "cublas" or a.dtype not in (torch.bfloat16, torch.float16):
        return _cublas(a, b, b_t, u, v, v_t, bias)
    if BASE_GEMM == "auto" and _eager_cublas(a):
        # cuBLAS whatever is tuned; the first eager call of a shape plans it (tuning it for a capture to come: graph
        # captures time nothing and find what eager warm-ups chose), later ones skip the planning's host time
        seen = (GLUON, a.device, a.dtype, gl._t_bucket(a.shape[0]), b.shape, b_t, None if u is None else u.shape[1],
                v_t, bias is None)
        if seen not in _EAGER_PLANNED:
            plan(a, b, b_t, u, v, v_t, bias)
            _EAGER_PLANNED.add(seen)
        return _cublas(a, b, b_t, u, v, v_t, bias)
    cfg, operands = plan(a, b, b_t, u, v, v_t, bias)
    if cfg is None:
        return _cublas(a, b, b_t, u, v, v_t, bias)
    kb, kb_t, ku, ku_t, kv, kv_t = operands
    return triton_base_mm(a, kb, kb_t, ku, kv, kv_t, bias, cfg, u_t=ku_t)


def plan(a: torch.Tensor, b: torch.Tensor, b_t: bool, u: torch.Tensor | None, v: torch.Tensor | None, v_t: bool,
         bias: torch.Tensor | None) -> tuple[tuple | None, tuple]:
    """(config, operands): the Triton config base_mm runs for these operands' shape key, tuned on first sight
    (None: cuBLAS, or the kernel cannot run them), and the operands as the kernel reads them (kb, kb_t, ku, ku_t,
    kv, kv_t). The eager rule (_eager_cublas) is the caller's."""
    # the kernel reads rows: a column-major b, u or v is taken as its (row-major) transpose, the flag flipped, here
    # and not by the caller, so that the cuBLAS path pays no view ops for it
    kb, kb_t = _row_major(b, b_t)
    ku, ku_t = _row_major(u, False)
    kv, kv_t = _row_major(v, v_t)
    operands = (kb, kb_t, ku, ku_t, kv, kv_t)
    if not triton_supported(a, kb, ku, kv, bias, kb_t):
        return None, operands
    key = (BASE_GEMM, GLUON, a.device, a.dtype, gl._t_bucket(a.shape[0]), tuple(kb.shape), kb_t,
           None if u is None else (u.shape[1], ku_t, kv_t), bias is not None)
    cfg = _CHOSEN[key] if key in _CHOSEN else _choose(key, a, kb, kb_t, ku, kv, kv_t, bias, ku_t)
    return cfg, operands


def _eager_cublas(a: torch.Tensor) -> bool:
    """An eager (uncaptured) CUDA call, which "auto" runs on cuBLAS whatever was tuned (EAGER_CUBLAS)."""
    return EAGER_CUBLAS and a.is_cuda and not torch.cuda.is_current_stream_capturing()


def _row_major(m: torch.Tensor | None, transposed: bool) -> tuple[torch.Tensor | None, bool]:
    """(m, transposed), or (m^T, not transposed) where m is column-major: the same op(m), in a row-major tensor."""
    if m is None or m.stride(1) == 1 or m.stride(0) != 1:
        return m, transposed
    return m.t(), not transposed


@gl.kernel_op("base_mm")
def base_mm_op(a: torch.Tensor, b: torch.Tensor, b_t: bool, u: torch.Tensor | None, v: torch.Tensor | None,
               v_t: bool, bias: torch.Tensor | None) -> torch.Tensor:
    """base_mm as a custom op (what torch.compile and dispatch modes see)."""
    return base_mm(a, b, b_t, u, v, v_t, bias)


@torch.library.register_fake(base_mm_op)
def _(a, b, b_t, u, v, v_t, bias):
    return a.new_empty((a.shape[0], b.shape[0] if b_t else b.shape[1]))
