"""The base GEMM with the experts' product as extra K (mol.kernels.base_gemm) on CPU under TRITON_INTERPRET=1,
against float64: both operand layouts, a bias, sizes no block divides, the cuBLAS fallback, and the routed layer
running it in its forward and backward."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

gl = pytest.importorskip("mol.kernels.grouped_lora")
if not gl._INTERPRET:
    pytest.skip("mol.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
pytest.importorskip("triton.tools.tensor_descriptor")
from mol.kernels import base_gemm as bg  # noqa: E402


@pytest.fixture(autouse=True)
def poison():
    gl.POISON = True  # an output element the kernel does not write stays NaN
    yield
    gl.POISON = False


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def operands(M, K, N, KR, dtype, b_t, v_t, g):
    def r(*s):
        return torch.randn(*s, generator=g).to(dtype)
    a, u = r(M, K), r(M, KR)
    b = r(N, K) if b_t else r(K, N)
    v = r(N, KR) if v_t else r(KR, N)
    return a, b, u, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b_t, v_t, with_u, with_bias", [(True, True, True, True), (False, False, True, False),
                                                         (True, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("setting", ["triton", "auto"])
def test_base_mm_matches_float64(dtype, b_t, v_t, with_u, with_bias, setting, monkeypatch):
    monkeypatch.setattr(bg, "BASE_GEMM", setting)
    g = torch.Generator().manual_seed(hash((dtype, b_t, v_t, with_u, with_bias, setting)) % 2**31)
    M, K, N, KR = 37, 40, 24, 24  # the interpreter's tile is 16: no size is a multiple of it but N
    a, b, u, v = operands(M, K, N, KR, dtype, b_t, v_t, g)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    if not with_u:
        u = v = None
    assert bg.triton_supported(a, b, u, v, bias, b_t)
    calls = []
    orig = bg.triton_base_mm
    monkeypatch.setattr(bg, "triton_base_mm", lambda *args, **kw: calls.append(1) or orig(*args, **kw))
    c = bg.base_mm(a, b, b_t, u, v, v_t, bias)
    ref = a.double() @ bg._op(b.double(), b_t)
    if with_u:
        ref = ref + u.double() @ bg._op(v.double(), v_t)
    if with_bias:
        ref = ref + bias.double()
    assert calls == [1] and c.dtype == dtype and c.shape == (M, N)
    # float32 sums rounded once to the output's dtype (the interpreter's bf16 rounding is coarser than the GPU's)
    assert rel(c, ref) < (1e-3 if dtype == torch.float16 else 8e-3)


def test_misaligned_operands_run_cublas_and_agree(monkeypatch):
    monkeypatch.setattr(bg, "BASE_GEMM", "triton")
    g = torch.Generator().manual_seed(3)
    a, b, u, v = operands(9, 19, 16, 8, torch.float16, True, False, g)  # a row of 19 halves: not 16-byte aligned
    assert not bg.triton_supported(a, b, u, v)
    monkeypatch.setattr(bg, "triton_base_mm", lambda *args, **kw: pytest.fail("the kernel cannot take these"))
    c = bg.base_mm(a, b, True, u, v, False)
    ref = a.double() @ b.double().t() + u.double() @ v.double()
    assert rel(c, ref) < 2e-3


def test_eager_calls_run_cublas_under_auto(monkeypatch):
    # an eager (uncaptured) CUDA call runs cuBLAS under "auto" whatever was tuned (the kernel's launch costs the host
    # more than it saves the GPU); "triton" still forces the kernel, and a CPU tensor (the interpreter) never counts
    # as such a call, so the tests above keep running the kernel
    g = torch.Generator().manual_seed(11)
    a, b, u, v = operands(24, 16, 24, 8, torch.float16, True, False, g)
    ref = a.double() @ b.double().t() + u.double() @ v.double()
    assert not bg._eager_cublas(a)
    calls = []
    orig = bg.triton_base_mm
    monkeypatch.setattr(bg, "triton_base_mm", lambda *args, **kw: calls.append(1) or orig(*args, **kw))
    monkeypatch.setattr(bg, "BASE_GEMM", "auto")
    assert rel(bg.base_mm(a, b, True, u, v, False), ref) < 2e-3 and calls == [1]  # tuned: the kernel
    monkeypatch.setattr(bg, "_eager_cublas", lambda a: True)  # as an eager CUDA call
    assert rel(bg.base_mm(a, b, True, u, v, False), ref) < 2e-3 and calls == [1]  # cuBLAS
    monkeypatch.setattr(bg, "BASE_GEMM", "triton")
    bg.base_mm(a, b, True, u, v, False)
    assert calls == [1, 1]


def test_eager_calls_plan_each_shape_once(monkeypatch):
    # eager "auto" calls run cuBLAS; the first of a shape still plans it (tuning it for the graph captures to come,
    # which cannot time anything), the next ones of that shape skip the planning
    monkeypatch.setattr(bg, "BASE_GEMM", "auto")
    monkeypatch.setattr(bg, "_EAGER_PLANNED", set())
    monkeypatch.setattr(bg, "_eager_cublas", lambda a: True)
    planned = []
    orig = bg.plan
    monkeypatch.setattr(bg, "plan", lambda *args: planned.append(args[0].shape) or orig(*args))
    g = torch.Generator().manual_seed(12)
    for M in (24, 24, 24, 40, 40):
        a, b, u, v = operands(M, 16, 24, 8, torch.float16, True, False, g)
        c = bg.base_mm(a, b, True, u, v, False)
        assert rel(c, a.double() @ b.double().t() + u.double() @ v.double()) < 2e-3
    assert planned == [(24, 16), (40, 16)]


def test_eager_cublas_rule(monkeypatch):
    # which CUDA calls "auto" sends to cuBLAS: every eager one, whatever its size; never one being captured (its
    # launch costs the host nothing per replay), nor any with EAGER_CUBLAS off
    class FakeCuda:
        is_cuda, device = True, torch.device("cuda", 0)

        def __init__(self, rows):
            self.shape = (rows, 64)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    small, large = FakeCuda(16), FakeCuda(1 << 20)
    assert bg.EAGER_CUBLAS and bg._eager_cublas(small) and bg._eager_cublas(large)
    assert not bg._eager_cublas(torch.zeros(4, 4))  # CPU tensors (the interpreter) always run the kernel
    capturing[0] = True
    assert not bg._eager_cublas(small) and not bg._eager_cublas(large)
    capturing[0] = False
    monkeypatch.setattr(bg, "EAGER_CUBLAS", False)
    assert not bg._eager_cublas(small) and not bg._eager_cublas(large)


def test_unknown_base_gemm_setting_is_named(monkeypatch):
    monkeypatch.setattr(bg, "BASE_GEMM", "fast")
    a = torch.randn(8, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="BASE_GEMM='fast'.*auto"):
        bg.base_mm(a, a, True)


def test_base_mm_op_opcheck():
    g = torch.Generator().manual_seed(5)
    a, b, u, v = operands(20, 16, 24, 8, torch.float16, False, False, g)
    torch.library.opcheck(torch.ops.mol.base_mm.default, (a, b, False, u, v, False, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mode", ["weight", "weight_fn"])
def test_routed_layer_runs_the_base_gemm_forward_and_backward(mode, monkeypatch):
    # 8-aligned features: the routed layer's y = x W^T + u B_cat and dx = dy W + dhl [A_cat; Wr] go through the
    # kernel (the other routed-layer tests' odd sizes take the cuBLAS fallback); checked against float64 there.
    # float16: the interpreter truncates float32 -> bf16 casts (up to 2x the GPU's rounding error), which on top of
    # the layer's own bf16 roundings of dhl and Wr crosses the 1e-2 bound for ~3% of seeds; bf16 is checked on the
    # GPU (benchmarks/gpu_check_routed.py)
    dtype = torch.float16
    from tests.test_routed_kernels import _check_layer

    calls = []
    orig = bg.triton_base_mm
    monkeypatch.setattr(bg, "triton_base_mm", lambda a, b, b_t, *rest, **kw: calls.append(b_t) or orig(a, b, b_t, *rest, **kw))
    _check_layer((40, 48, 24, 8, 2, 2, "topk"), mode, dtype)  # dhl: R + E = 24 columns
    assert calls == [True, False]  # the forward's (W stored (out, in)), then the backward's (dy W)


def test_empty_sizes_run_cublas():
    a, b = torch.randn(0, 16).half(), torch.randn(8, 16).half()
    assert not bg.triton_supported(a, b) and bg.base_mm(a, b, True).shape == (0, 8)
    a, b = torch.randn(4, 0).half(), torch.randn(8, 0).half()
    assert not bg.triton_supported(a, b) and torch.equal(bg.base_mm(a, b, True), torch.zeros(4, 8).half())


def test_column_major_operands_take_the_kernel(monkeypatch):
    # b, u and v handed over as transposed views (column-major), as the routed layer hands over B_cat (a view of
    # MoLLinear's expert-interleaved lora_B) and dhl (stored token-minor): base_mm reads them as their row-major
    # transposes. M = 21 tokens: u's column stride is padded to 24 (16-byte rows for TMA), as the layer pads it.
    monkeypatch.setattr(bg, "BASE_GEMM", "triton")
    g = torch.Generator().manual_seed(7)
    a, b_nk, u, v_nk = operands(21, 40, 24, 16, torch.float16, True, True, g)  # b (N, K), v (N, KR) row-major
    u_km = torch.full((16, 24), float("nan"), dtype=torch.float16)
    u_km[:, :21] = u.t()
    u_view = u_km[:, :21].t()  # (M, KR), strides (1, 24)
    calls = []
    orig = bg.triton_base_mm
    monkeypatch.setattr(bg, "triton_base_mm",
                        lambda *args, **kw: calls.append((args[2], kw.get("u_t"), args[5])) or orig(*args, **kw))
    c = bg.base_mm(a, b_nk.t(), False, u_view, v_nk.t(), False)  # op(b) = b_nk^T given as a (K, N) column-major view
    ref = a.double() @ b_nk.double().t() + u.double() @ v_nk.double().t()
    assert calls == [(True, True, True)]  # flags flipped with the layout: b_t, u_t, v_t
    assert rel(c, ref) < 1e-3
    # and cuBLAS (the other choice of "auto") reads the same views
    monkeypatch.setattr(bg, "BASE_GEMM", "cublas")
    assert rel(bg.base_mm(a, b_nk.t(), False, u_view, v_nk.t(), False), ref) < 1e-3


def test_grouped_lora_linear_runs_the_base_gemm_forward_and_backward(monkeypatch):
    # grouped_lora_linear (given routing: the sequence router, custom routers) takes the routed layer's form with
    # DENSE_GEMMS: y = x W^T + u B_cat and dx = dy W + dh A_cat through the kernel, dh stored token-minor (u_t)
    from tests.test_kernels import make, reference

    monkeypatch.setattr(bg, "BASE_GEMM", "triton")
    monkeypatch.setattr(gl, "DENSE_GEMMS", True)
    T, n_in, n_out, E, r, K = 37, 48, 24, 4, 4, 2
    _, x, A, B, gates, ids = make(T, n_in, n_out, E, r, K, torch.float16, seed=13)
    W = (torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(14)) / n_in ** 0.5).half()
    calls = []
    orig = bg.triton_base_mm
    monkeypatch.setattr(bg, "triton_base_mm",
                        lambda a, b, b_t, *rest, **kw: calls.append((b_t, kw.get("u_t"))) or orig(a, b, b_t, *rest, **kw))
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    y = gl.grouped_lora_linear(leaves[0], W, None, *leaves[1:], ids, 0.5)
    dy = torch.randn(T, n_out, generator=torch.Generator().manual_seed(15)).half()
    y.backward(dy)
    assert calls == [(True, False), (False, True)]  # forward (W stored (out, in)), backward (dy W, dh token-minor)
    ref = [t.double().requires_grad_() for t in (x, A, B, gates)]
    y_ref = reference(ref[0] @ W.double().t(), *ref[:3], ref[3], ids, 0.5)
    y_ref.backward(dy.double())
    assert rel(y, y_ref.detach()) < 1e-2
    for name, a, b in zip(["x", "lora_A", "lora_B", "gates"], leaves, ref):
        assert rel(a.grad, b.grad) < 1e-2, f"d{name} rel err {rel(a.grad, b.grad)}"
