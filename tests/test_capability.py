"""Which path each GPU generation gets, decided on the CPU with the device's properties mocked: the kernels were
only ever run on sm_90, and below sm_80 Triton has no tensor-core tl.dot (nor the GPU bfloat16 arithmetic)."""
import types
import warnings

import pytest
import torch

from mol import dispatch
from mol.quant import quantize_nf4
from mol.quant import linear as qlinear

pytest.importorskip("triton")
from mol.kernels import base_gemm as bg  # noqa: E402
from mol.kernels import base_gemm_gluon as bgg  # noqa: E402
from mol.kernels import nf4_mma  # noqa: E402

# (major, minor) -> the shared memory a block may opt into (CUDA programming guide)
GPUS = {(7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 9): 99, (9, 0): 227, (10, 0): 227, (12, 0): 99}


@pytest.fixture(params=list(GPUS), ids=lambda c: f"sm_{c[0]}{c[1]}")
def gpu(request, monkeypatch):
    """A mocked CUDA device of that capability; the per-device caches start empty."""
    major, minor = request.param
    props = types.SimpleNamespace(major=major, minor=minor, multi_processor_count=80,
                                  shared_memory_per_block_optin=GPUS[request.param] * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(dispatch, "_CAPABILITY", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setattr(bg, "_PROPS", {})
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    return request.param


def _x(dtype, t=4, k=128):
    """What the dispatch reads of a CUDA activation, without a GPU."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0), shape=(t, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_auto_takes_the_kernels_from_sm80_on(gpu, dtype):
    """Token-routed MoL (fused path), the sequence router's grouped kernels: Triton on sm_80+, the reference
    (cuBLAS) below, where Triton's tl.dot has no tensor cores."""
    assert dispatch.resolve_backend("auto", _x(dtype)) == ("triton" if gpu >= (8, 0) else "torch")
    assert dispatch.fused_routing_available(types.SimpleNamespace(kind="topk"), "auto", _x(dtype)) == (gpu >= (8, 0))


def test_forced_triton_below_sm80(gpu):
    """bfloat16 has nothing to run on an sm_75: a clear error naming the ways out; float16 runs, with a warning."""
    if gpu >= (8, 0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.resolve_backend("triton", _x(torch.bfloat16)) == "triton"
        return
    with pytest.raises(RuntimeError, match=r"bfloat16.*sm_75.*float16.*backend='torch'"):
        dispatch.resolve_backend("triton", _x(torch.bfloat16))
    with pytest.warns(UserWarning, match=r"sm_75.*without tensor cores"):
        assert dispatch.resolve_backend("triton", _x(torch.float16)) == "triton"


def test_the_capability_is_looked_up_once_per_device(gpu, monkeypatch):
    calls = []
    real = torch.cuda.get_device_properties
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: calls.append(device) or real())
    for _ in range(3):
        dispatch.resolve_backend("auto", _x(torch.bfloat16))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype, t", [(torch.bfloat16, 1), (torch.float16, 1), (torch.float32, 2), (torch.float16, 8),
                                      (torch.bfloat16, 16)])
def test_nf4_decode_paths(gpu, dtype, t):
    """NF4Linear at T <= 16: the fused kernels on sm_80+ (Gluon MMA for 3 <= T where Triton has Gluon); below
    sm_80 only the FMA kernel for float16 / float32 at T <= 2 (bf16x2 arithmetic needs sm_80, the dot path tensor
    cores), else dequantize + cuBLAS."""
    packed = quantize_nf4(torch.randn(64, 128))
    x = _x(dtype, t)
    fused = qlinear._use_small_kernel(x, packed, True, "auto")
    assert fused == (gpu >= (8, 0) or (t <= 2 and dtype != torch.bfloat16))
    mma = dtype != torch.float32 and nf4_mma.AVAILABLE and gpu >= (8, 0)
    assert nf4_mma.supported(packed, x) == mma


def test_nf4_forced_triton_below_sm80(gpu):
    if gpu >= (8, 0):
        return
    packed = quantize_nf4(torch.randn(64, 128))
    with pytest.raises(RuntimeError, match=r"NF4Linear.*bfloat16.*backend='torch'"):
        qlinear._use_small_kernel(_x(torch.bfloat16, 1), packed, True, "triton")
    with pytest.warns(UserWarning, match="without tensor cores"):
        assert qlinear._use_small_kernel(_x(torch.float16, 8), packed, True, "triton")


def test_base_gemm_kernels_only_where_their_tiles_fit(gpu):
    """The TMA base GEMM (sm_90+) needs 177-225 KB of shared memory: sm_90 and sm_100; sm_120's 99 KB runs cuBLAS
    without compiling a config to see it fail. The Gluon one (wgmma) is sm_90 only."""
    dev = torch.device("cuda", 0)
    fits = bg.fitting(bg.CONFIGS, dev)
    assert bool(fits) == (gpu in ((9, 0), (10, 0)))
    if fits:
        assert fits == bg.CONFIGS  # all five fit 227 KB
    a = types.SimpleNamespace(is_cuda=True, device=dev)
    assert bgg.supported(a, True, None, True) == (bgg.AVAILABLE and gpu == (9, 0))


def test_config_smem_bounds_the_compilers_figure():
    """config_smem is an upper bound of what Triton's compiler reported for sm_90 (benchmarks/compile_sm90.py), and
    within 3 KB of it."""
    compiled = {(128, 256, 64, 8, 8, 3, 1): 214040, (128, 256, 64, 8, 8, 4, 2): 230432,
                (128, 256, 64, 8, 8, 3, 2): 181272}
    for cfg, shared in compiled.items():
        assert shared <= bg.config_smem(cfg) <= shared + 3072
    assert bg.config_smem((128, 256, 64, 8, 8, 4, 2)) <= 227 * 1024


def test_base_gemm_support_check_reads_the_fit_once_per_device(gpu, monkeypatch):
    """triton_supported runs on every call base_mm plans (captures, MOL_BASE_GEMM_EAGER_CUBLAS=0): the configs'
    shared-memory fit is a property of the device, worked out once, not ~1 µs of Python per layer call."""
    if bg.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side TMA descriptors")
    sizes = []
    real = bg.config_smem
    monkeypatch.setattr(bg, "config_smem", lambda cfg: sizes.append(cfg) or real(cfg))
    monkeypatch.setattr(bg.gl, "_INTERPRET", False)  # the CPU suite runs the interpreter, which skips the device
    # an `a` the TMA checks turn down (3-D) once the device has passed: only the device part is under test
    a = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(8, 8),
                              dim=lambda: 3)
    b = torch.zeros(8, 8, dtype=torch.bfloat16)
    for _ in range(3):
        assert not bg.triton_supported(a, b)
    assert len(sizes) <= len(bg.CONFIGS)


def test_the_slow_dots_warning_keeps_fullgraph_compiling(monkeypatch):
    """backend='triton' forced on an sm_75 in float16 warns once from inside the layer's forward; a warnings.warn
    traced by Dynamo is a graph break, so torch.compile(fullgraph=True) of such a model failed outright. The check
    runs on a CPU tensor here, its device given sm_75's capability."""
    monkeypatch.setattr(dispatch, "_CAPABILITY", {torch.device("cpu"): (7, 5)})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    torch._dynamo.reset()

    def forward(x):
        dispatch.check_dot_capability(x, "MoLLinear")
        return x * 2

    compiled = torch.compile(forward, fullgraph=True, backend="eager")
    with pytest.warns(UserWarning, match=r"sm_75.*without tensor cores"):
        assert torch.equal(compiled(torch.ones(3, dtype=torch.float16)), torch.full((3,), 2.0, dtype=torch.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        compiled(torch.ones(3, dtype=torch.float16))
    torch._dynamo.reset()


@pytest.mark.parametrize("cap, expect", [((9, 0), 2.0), ((7, 5), 0.0)])
def test_the_auto_decision_traces_in_one_graph(cap, expect, monkeypatch):
    """The auto choice and NF4Linear's decode check run inside every traced forward. They compared the (major,
    minor) tuple there, which torch 2.11's Dynamo failed on (InternalTorchDynamoError in its tuple >= polyfill, on
    an H100: RESULTS run 55); the comparison now happens inside a constant-result function, so a traced forward
    meets only its bool. (torch 2.13, this suite's, traced the tuple too: this guards the path, run 55 the bug.)"""
    monkeypatch.setattr(dispatch, "_CAPABILITY", {torch.device("cpu"): cap})
    assert getattr(dispatch.dots_on_tensor_cores, "_dynamo_marked_constant", False)
    torch._dynamo.reset()

    def forward(x):
        return x * 2 if dispatch.tensor_core_dots(x) else x * 0

    assert torch.equal(torch.compile(forward, fullgraph=True, backend="eager")(torch.ones(3)), torch.full((3,), expect))
    torch._dynamo.reset()
