"""Triton grouped-LoRA kernels on CPU (TRITON_INTERPRET=1) against a float64 PyTorch reference."""
import os

# Must be set before mol.kernels.grouped_lora is imported (Triton decides at @jit time).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

gl = pytest.importorskip("mol.kernels.grouped_lora")
if not gl._INTERPRET:  # imported earlier without the interpreter: the kernels cannot run on CPU
    pytest.skip("mol.kernels.grouped_lora was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)


from tests.reference import interleaved, same_layout  # noqa: E402


def reference(base, x, A, B, gates, ids, scale):
    """float64 formula, one (token, k) pair at a time through gathered expert weights."""
    Ae, Be = A[ids], B[ids]  # (T, K, r, in), (T, K, out, r)
    h = torch.einsum("tkri,ti->tkr", Ae, x)
    d = torch.einsum("tkor,tkr->tko", Be, h)
    return base + scale * (gates[..., None] * d).sum(1)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(params=[True, False], ids=["dense_gemms", "triton_shrink_expand"])
def dense_gemms(request, monkeypatch):
    """Both forms of the grouped path: cuBLAS + base_gemm (the default where torch.mm takes out_dtype) and the Triton
    shrink / expand kernels (torch < 2.8, or DENSE_GEMMS off)."""
    monkeypatch.setattr(gl, "DENSE_GEMMS", request.param)
    return request.param


@pytest.fixture(autouse=True)
def poison():
    gl.POISON = True  # every kernel output starts as NaN: an unwritten element fails the check
    yield
    gl.POISON = False


def make(T, n_in, n_out, E, r, K, dtype, ids_mode="random", seed=0, interleave=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n_in, generator=g).to(dtype)
    base = torch.randn(T, n_out, generator=g).to(dtype)
    A = (torch.randn(E, r, n_in, generator=g) / n_in**0.5).to(dtype)
    B = torch.randn(E, n_out, r, generator=g).to(dtype)
    if interleave:
        B = interleaved(B)
    gates = torch.rand(T, K, generator=g).float()
    if ids_mode == "one_expert":  # every token routed to the last expert only (K copies)
        ids = torch.full((T, K), E - 1, dtype=torch.long)
    else:
        # distinct experts per token, expert 0 never chosen when E > K (an expert with no tokens)
        lo = 1 if E > K else 0
        ids = torch.stack([torch.randperm(E - lo, generator=g)[:K] + lo for _ in range(T)]) if T else \
            torch.empty(0, K, dtype=torch.long)
    return base, x, A, B, gates, ids


TOL = {torch.float32: 1e-5, torch.float16: 1e-2}

CASES = [  # T, in, out, E, r, K, ids_mode
    (1, 19, 45, 1, 4, 1, "random"),
    (7, 45, 19, 2, 4, 2, "random"),
    (33, 19, 45, 8, 4, 2, "random"),
    (33, 45, 19, 8, 3, 4, "random"),
    (17, 19, 45, 8, 4, 2, "one_expert"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_in{}_out{}_E{}_r{}_K{}_{}".format(*c))
def test_grouped_lora_add_forward_and_grads(case, dtype, dense_gemms):
    T, n_in, n_out, E, r, K, mode = case
    # fp16 cases take lora_B in MoLLinear's expert-interleaved layout, fp32 cases a contiguous one
    base, x, A, B, gates, ids = make(T, n_in, n_out, E, r, K, dtype, mode, seed=T * 100 + E,
                                     interleave=dtype == torch.float16)
    scale = 0.75
    leaves = [t.clone().requires_grad_() for t in (base, x, A, B, gates)]
    y = gl.grouped_lora_add(*leaves[:4], leaves[4], ids, scale)
    dy = torch.randn(T, n_out, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)

    ref_leaves = [t.detach().double().requires_grad_() for t in (base, x, A, B, gates)]
    y_ref = reference(*ref_leaves[:4], ref_leaves[4], ids, scale)
    y_ref.backward(dy.double())

    assert y.dtype == dtype and y.shape == (T, n_out)
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) < TOL[dtype], f"forward rel err {rel(y, y_ref)}"
    for name, a, b in zip(["base_out", "x", "lora_A", "lora_B", "gates"], leaves, ref_leaves):
        assert a.grad is not None and a.grad.dtype == a.dtype, name
        assert torch.isfinite(a.grad).all(), f"{name}: non-finite gradient (unwritten element?)"
        err = rel(a.grad, b.grad) if b.grad.norm() > 0 else a.grad.abs().max().item()
        assert err < TOL[dtype], f"d{name} rel err {err}"
    if mode == "random" and E > K:  # expert 0 got no tokens: its gradients are exactly zero
        assert leaves[2].grad[0].abs().max() == 0 and leaves[3].grad[0].abs().max() == 0
    assert same_layout(leaves[3].grad, leaves[3])  # dB comes in lora_B's own layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grouped_lora_linear_fused(dtype, dense_gemms):
    T, n_in, n_out, E, r, K = 21, 19, 45, 4, 4, 2
    base, x, A, B, gates, ids = make(T, n_in, n_out, E, r, K, dtype, seed=7)
    W = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
    bias = torch.randn(n_out).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    y = gl.grouped_lora_linear(leaves[0], W, bias, leaves[1], leaves[2], leaves[3], ids, 2.0)
    dy = torch.randn(T, n_out).to(dtype)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, A, B, gates)]
    base_ref = ref_leaves[0] @ W.double().t() + bias.double()
    y_ref = reference(base_ref, *ref_leaves[:3], ref_leaves[3], ids, 2.0)
    y_ref.backward(dy.double())
    assert rel(y, y_ref) < TOL[dtype]
    for name, a, b in zip(["x", "lora_A", "lora_B", "gates"], leaves, ref_leaves):
        assert rel(a.grad, b.grad) < TOL[dtype], f"d{name} rel err {rel(a.grad, b.grad)}"


def test_fp32_params_with_fp16_activations_and_partial_grads():
    """LoRA weights kept in fp32 (mixed precision) and only some inputs requiring grad."""
    base, x, A, B, gates, ids = make(9, 19, 45, 2, 4, 1, torch.float32, seed=3)
    A_p, B_p = A.clone().requires_grad_(), B.clone().requires_grad_()
    y = gl.grouped_lora_add(base.half(), x.half(), A_p, B_p, gates, ids, 1.0)
    y.float().sum().backward()
    assert A_p.grad.dtype == torch.float32 and B_p.grad.dtype == torch.float32
    Ar, Br = A.double().requires_grad_(), B.double().requires_grad_()
    reference(base.half().double(), x.half().double(), Ar, Br, gates.double(), ids, 1.0).sum().backward()
    assert rel(A_p.grad, Ar.grad) < 1e-2 and rel(B_p.grad, Br.grad) < 1e-2


def test_custom_op_registration_opcheck():
    """Schema, fake (meta) kernel and autograd registration agree with the real kernel."""
    base, x, A, B, gates, ids = make(5, 19, 45, 2, 4, 2, torch.float32, seed=5)
    args = (base, x.requires_grad_(), A.requires_grad_(), B.requires_grad_(), gates.requires_grad_(), ids, 0.5)
    gl.POISON = False  # opcheck compares two runs bit-for-bit; poisoning does not matter here
    torch.library.opcheck(torch.ops.mol.grouped_lora_add_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_inputs_raise_clear_errors():
    base, x, A, B, gates, ids = make(4, 19, 45, 2, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="lora_A"):
        gl.grouped_lora_add(base, x, A[:, :, :5], B, gates, ids, 1.0)
    with pytest.raises(ValueError, match="gates and expert_ids"):
        gl.grouped_lora_add(base, x, A, B, gates[:, :1], ids, 1.0)
    with pytest.raises(TypeError, match="expert_ids"):
        gl.grouped_lora_add(base, x, A, B, gates, ids.float(), 1.0)
    with pytest.raises(ValueError, match="frozen"):
        gl.grouped_lora_linear(x, torch.randn(45, 19, requires_grad=True), None, A, B, gates, ids, 1.0)
    for bad_bias in (torch.zeros(19), torch.zeros(45, dtype=torch.float64), torch.zeros(1, 45)):
        with pytest.raises(ValueError, match=r"bias must be \(out,\) = \(45,\)"):
            gl.grouped_lora_linear(x, torch.randn(45, 19), bad_bias, A, B, gates, ids, 1.0)


def test_torch_compile_fullgraph_matches_eager(dense_gemms):
    """The custom ops trace into one graph (fake kernels + autograd formula), same numbers as eager."""
    base, x, A, B, gates, ids = make(9, 19, 45, 4, 4, 2, torch.float32, seed=11)
    W = torch.randn(45, 19)

    def f(x, A, B, gates):
        y = gl.grouped_lora_linear(x, W, None, A, B, gates, ids, 0.5)
        return gl.grouped_lora_add(y, x, A, B, gates, ids, 0.25)

    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    eager = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    y.square().sum().backward()
    y_e = f(*eager)
    y_e.square().sum().backward()
    assert rel(y, y_e) < 1e-6
    for a, b in zip(leaves, eager):
        assert rel(a.grad, b.grad) < 1e-6


def test_zero_tokens(dense_gemms):
    base, x, A, B, gates, ids = make(0, 19, 45, 4, 4, 2, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (base, x, A, B, gates)]
    y = gl.grouped_lora_add(*leaves[:4], leaves[4], ids, 1.0)
    assert y.shape == (0, 45)
    y.sum().backward()
    assert leaves[2].grad.abs().max() == 0 and leaves[3].grad.abs().max() == 0


def _run_both(fn_args, dtype, fused):
    """Forward + backward through the public API; returns (y, grads, grad_fn name)."""
    base, x, A, B, gates, ids, W = fn_args
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    if fused:
        y = gl.grouped_lora_linear(leaves[0], W, None, *leaves[1:], ids, 0.5)
    else:
        y = gl.grouped_lora_add(base, *leaves, ids, 0.5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves], type(y.grad_fn).__name__, dy


@pytest.mark.parametrize("fused", [False, True], ids=["add", "linear"])
def test_eager_fast_path_matches_custom_op_and_reference(fused, monkeypatch, dense_gemms):
    """Eager calls take the autograd.Function fast path; the custom ops (what torch.compile traces) must
    give the same numbers, and both must match the float64 reference."""
    dtype = torch.float32
    base, x, A, B, gates, ids = make(13, 19, 45, 4, 4, 2, dtype, seed=21)
    W = (torch.randn(45, 19) / 19**0.5).to(dtype)
    args = (base, x, A, B, gates, ids, W)
    y_fast, g_fast, fn_fast, dy = _run_both(args, dtype, fused)
    monkeypatch.setattr(gl, "EAGER_FAST_PATH", False)
    y_op, g_op, fn_op, _ = _run_both(args, dtype, fused)
    assert fn_fast in ("_AddFnBackward", "_LinearFnBackward") and fn_op != fn_fast, (fn_fast, fn_op)
    assert torch.equal(y_fast, y_op)
    for a, b in zip(g_fast, g_op):
        assert torch.equal(a, b)
    ref = [t.double().requires_grad_() for t in (x, A, B, gates)]
    base_ref = ref[0] @ W.double().t() if fused else base.double()
    y_ref = reference(base_ref, *ref[:3], ref[3], ids, 0.5)
    y_ref.backward(dy.double())
    assert rel(y_fast, y_ref) < TOL[dtype]
    for name, a, b in zip(["x", "lora_A", "lora_B", "gates"], g_fast, ref):
        assert rel(a, b.grad) < TOL[dtype], f"d{name} rel err {rel(a, b.grad)}"


def test_fast_path_not_taken_under_dispatch_mode():
    """A TorchDispatchMode (FlopCounter, make_fx, fake tensors) must see the custom op, not the kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    base, x, A, B, gates, ids = make(5, 19, 45, 2, 4, 2, torch.float32, seed=4)
    with Log():
        y = gl.grouped_lora_add(base, x, A, B, gates, ids, 1.0)
    assert any("mol.grouped_lora_add_fwd" in s for s in seen), seen
    assert rel(y, reference(base.double(), x.double(), A.double(), B.double(), gates.double(), ids, 1.0)) < 1e-5


@pytest.fixture
def split1_configs():
    """Force SPLIT=1 tiles (plain stores, no zero-filled accumulator) for the shrink and du kernels."""
    saved = (gl._shrink_kernel.configs, gl._du_kernel.configs, dict(gl._CHOSEN))
    gl._shrink_kernel.configs = [gl._cfg("shrink", 16, 16, 16, 1, 4, 1)]
    gl._du_kernel.configs = [gl._cfg("du", 16, 16, 16, 1, 4, 1)]
    gl._CHOSEN.clear()
    yield
    gl._shrink_kernel.configs, gl._du_kernel.configs = saved[:2]
    gl._CHOSEN.clear()
    gl._CHOSEN.update(saved[2])


def test_split1_skips_zero_fill_and_stays_correct(split1_configs, monkeypatch):
    """Once SPLIT=1 is chosen the accumulators are NaN-poisoned empties: every element must be stored.
    The first call goes through the autotuner, the second through the cached-config launch."""
    monkeypatch.setattr(gl, "DENSE_GEMMS", False)  # the Triton shrink
    T, n_in, n_out, E, r, K = 37, 45, 19, 8, 4, 2
    base, x, A, B, gates, ids = make(T, n_in, n_out, E, r, K, torch.float32, seed=9)
    ref = [t.double().requires_grad_() for t in (base, x, A, B, gates)]
    y_ref = reference(*ref[:4], ref[4], ids, 1.5)
    dy = torch.randn(T, n_out)
    y_ref.backward(dy.double())
    for call in range(2):
        leaves = [t.clone().requires_grad_() for t in (base, x, A, B, gates)]
        y = gl.grouped_lora_add(*leaves[:4], leaves[4], ids, 1.5)
        y.backward(dy)
        assert rel(y, y_ref) < 1e-5, f"call {call}"
        for name, a, b in zip(["base_out", "x", "lora_A", "lora_B", "gates"], leaves, ref):
            assert rel(a.grad, b.grad) < 1e-5, f"call {call}: d{name} rel err {rel(a.grad, b.grad)}"
    assert gl._split(("shrink", gl._t_bucket(T), n_in, E * r, torch.float32)) == 1
    assert gl._split(("du", gl._t_bucket(T), n_out, E * r, r, torch.float32)) == 1


@pytest.mark.parametrize("fused", [False, True], ids=["add", "linear"])
def test_float32_call_inside_autocast_keeps_its_dtypes(fused, dense_gemms):
    """Called with float32 tensors inside a bf16 autocast region (forward and backward), the ops compute in float32
    and return float32, as their fake kernels declare: autocast must not re-type the cuBLAS calls inside them."""
    base, x, A, B, gates, ids = make(11, 19, 45, 4, 4, 2, torch.float32, seed=17)
    W = (torch.randn(45, 19, generator=torch.Generator().manual_seed(18)) / 19**0.5)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    dy = torch.randn(11, 45, generator=torch.Generator().manual_seed(19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if fused:
            y = gl.grouped_lora_linear(leaves[0], W, None, *leaves[1:], ids, 0.5)
        else:
            y = gl.grouped_lora_add(base, *leaves, ids, 0.5)
        y.backward(dy)
    ref = [t.double().requires_grad_() for t in (x, A, B, gates)]
    y_ref = reference(ref[0] @ W.double().t() if fused else base.double(), *ref[:3], ref[3], ids, 0.5)
    y_ref.backward(dy.double())
    assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-5
    for name, a, b in zip(["x", "lora_A", "lora_B", "gates"], leaves, ref):
        assert a.grad.dtype == torch.float32 and rel(a.grad, b.grad) < 1e-5, f"d{name} rel err {rel(a.grad, b.grad)}"


def test_on_off_environment_switches_read_every_spelling_and_refuse_others(monkeypatch):
    # MOL_DB_FIRST=true used to turn the default-on switch off (only "1" meant on)
    import subprocess
    import sys

    from mol.kernels import env_flag

    for value, want in (("true", True), ("on", True), ("YES", True), ("0", False), ("off", False), (" ", None)):
        monkeypatch.setenv("MOL_DB_FIRST", value)
        assert env_flag("MOL_DB_FIRST", True) is (True if want is None else want), value
        assert env_flag("MOL_DB_FIRST", False) is (False if want is None else want), value
    monkeypatch.setenv("MOL_DB_FIRST", "maybe")
    with pytest.raises(ValueError, match="MOL_DB_FIRST='maybe' is not an on/off value"):
        env_flag("MOL_DB_FIRST", True)
    # the kernels' module-level switches read it at import (one process: each import costs seconds)
    code = "import mol.kernels.routed_lora as r, mol.kernels.base_gemm as b; print(r.DB_FIRST, b.GLUON)"
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOL_DB_FIRST": "false", "MOL_BASE_GEMM_GLUON": "off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "False False", out.stdout
