"""The fused routed-layer kernels (router + experts + auxiliary losses, mol.kernels.routed_lora) on CPU under
TRITON_INTERPRET=1, against an independent float64 formula: output, auxiliary loss and every gradient."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

gl = pytest.importorskip("mol.kernels.grouped_lora")
if not gl._INTERPRET:
    pytest.skip("mol.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
from mol.kernels import routed_lora as rl  # noqa: E402
from tests.reference import interleaved, routed_layer_float64 as reference, same_layout  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def poison():
    gl.POISON = True
    yield
    gl.POISON = False


CASES = [  # T, in, out, E, r, K, kind
    (1, 19, 45, 4, 4, 2, "topk"),
    (7, 45, 19, 2, 4, 2, "topk"),
    (33, 19, 45, 8, 4, 2, "topk"),
    (33, 45, 19, 8, 3, 4, "topk"),
    (20, 19, 33, 5, 4, 1, "switch"),
    (18, 33, 19, 3, 4, 3, "soft"),
    (17, 21, 23, 40, 2, 4, "topk"),  # E > 32: several router tiles of padding, R = 80
    # T <= 16: the one-launch small-T forward (shrink producers, one routing program, GEMV consumers)
    (16, 45, 19, 8, 3, 4, "topk"),
    (2, 21, 23, 40, 2, 4, "topk"),
    (5, 19, 33, 5, 4, 1, "switch"),
    (3, 600, 19, 3, 4, 3, "soft"),  # in > 256: several split-K partial sums
    (4, 19, 21, 40, 4, 3, "topk"),  # R = 160 > 128: the routing program's expert columns in two chunks
]


@pytest.mark.parametrize("mode", ["weight", "weight_fn", "base_out", "dropout"])
@pytest.mark.parametrize("case", CASES)
def test_routed_layer_matches_float64(case, mode):
    _check_layer(case, mode)


@pytest.mark.parametrize("mode", ["weight", "base_out"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] > rl.SMALL_T_MAX])
def test_routed_layer_with_gate_columns_by_onehot_matches_float64(case, mode, monkeypatch):
    # GATE_COLUMNS="onehot" (the default is "select": per-column gates by a gather, dgates by K masked row sums):
    # experts mapped to columns by a tl.dot with a one-hot matrix; the large-T cases, where the gate kernels run
    monkeypatch.setattr(rl, "GATE_COLUMNS", "onehot")
    _check_layer(case, mode)


@pytest.mark.parametrize("shrink", rl._SHRINK_CHOICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["weight", "base_out", "dropout"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] > rl.SMALL_T_MAX][:4])
def test_routed_layer_in_low_precision_matches_float64(case, mode, dtype, shrink, monkeypatch):
    # bf16 / fp16 data: with SHRINK="gemm" the shrink and the router's scores are one GEMM (emulated here: exact
    # products, float32 sums) against Wr's 16-bit parts, which the gate forward sums; dropout keeps the Triton kernel
    monkeypatch.setattr(rl, "SHRINK", shrink)
    _check_layer(case, mode, dtype)


@pytest.mark.parametrize("mode", ["weight", "base_out"])
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5], CASES[6], CASES[7]])
def test_routed_layer_with_padding_matches_float64(case, mode):
    # token_weights (0 for padding): the losses and statistics of the real tokens only; outputs unchanged. T <= 16
    # takes the regular kernels (the one-launch decode kernel weighs every token alike)
    _check_layer(case, mode, pad=True)


@pytest.fixture
def w_tile_as_a():
    """The small-T forward's dot path with BN=64: the W tile as the A operand (wgmma takes M = 64) and the product
    transposed. The GPU's autotuner may pick it (routed_lora._small_t_configs); the interpreter's one config
    (BN=16, x as A) never runs it."""
    import triton

    saved = rl._small_t_dot.configs
    rl._small_t_dot.configs = [triton.Config({"BN": 64, "BK": 16}, num_warps=4, num_stages=1)]
    gl._CHOSEN.clear()  # the config chosen per key is remembered: forget the interpreter's
    yield
    rl._small_t_dot.configs = saved
    gl._CHOSEN.clear()


@pytest.mark.parametrize("mode", ["weight", "base_out", "dropout"])
@pytest.mark.parametrize("case", [c for c in CASES if 1 < c[0] <= rl.SMALL_T_MAX])
def test_small_t_with_the_w_tile_as_a_matches_float64(case, mode, w_tile_as_a):
    _check_layer(case, mode)


def test_small_t_with_the_w_tile_as_a_rounds_float32_adapters_on_load(w_tile_as_a):
    """Without gradients the W-as-A form reads float32 lora_A / lora_B and rounds them to bf16 as it loads them:
    the bits of casting them first (as the x-as-A form, tests/test_adapter_dtype.py)."""
    g = torch.Generator().manual_seed(301)
    T, E, r, n_in, n_out = 7, 4, 8, 40, 70  # n_out: one full 64-row tile and a partial one
    x = torch.randn(T, n_in, generator=g).bfloat16()
    W = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).bfloat16()
    A32 = torch.randn(E, r, n_in, generator=g) / n_in**0.5
    B32 = torch.randn(n_out, E, r, generator=g).permute(1, 0, 2)  # MoLLinear's expert-interleaved layout
    Wr = torch.randn(E, n_in, generator=g)
    with torch.no_grad():
        outs = [rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.5, weight=W, lb_coef=0.1, z_coef=0.01)
                for A, B in ((A32.bfloat16(), B32.bfloat16()), (A32, B32))]
    assert gl._CHOSEN and all(c[0]["BN"] == 64 for k, c in gl._CHOSEN.items() if k[0] == "small_t")
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(got, want)


def test_routed_layer_of_padding_only():
    # no real token: zero losses and statistics, finite gradients (the routing gradient is every token's)
    _check_layer(CASES[2], "weight", pad="all")


def _check_layer(case, mode, dtype=torch.float32, pad=False):
    """The routed layer on data of `dtype` against float64 on the same (rounded) values; Wr stays float32.
    pad: random tokens (pad="all": every token) are padding, given to the kernels as token_weights = 0."""
    T, n_in, n_out, E, r, K, kind = case
    g = torch.Generator().manual_seed(hash((case, mode)) % 2**31)
    f64 = dict(dtype=torch.float64)

    def rnd(t):  # the values the kernels will see, kept in float64 for the reference
        return t.to(dtype).double()
    x = rnd(torch.randn(T, n_in, generator=g, **f64))
    x_lora = rnd(torch.randn(T, n_in, generator=g, **f64)) if mode == "dropout" else None
    W = rnd(torch.randn(n_out, n_in, generator=g, **f64) / n_in**0.5)
    bias = rnd(torch.randn(n_out, generator=g, **f64)) if mode.startswith("weight") else None
    base_out = rnd(torch.randn(T, n_out, generator=g, **f64)) if mode == "base_out" else None
    A = rnd(torch.randn(E, r, n_in, generator=g, **f64) / n_in**0.5)
    B = rnd(torch.randn(E, n_out, r, generator=g, **f64))
    Wr = torch.randn(E, n_in, generator=g, **f64).float().double()
    noise = torch.randn(T, E, generator=g, **f64) if T % 2 else None
    w_y = torch.randn(T, n_out, generator=g, **f64)
    scale, lb, zc = 1.7, 0.3, 0.05
    real = None
    if pad:
        real = torch.zeros(T, dtype=torch.bool) if pad == "all" else torch.rand(T, generator=g) < 0.6
        if pad != "all":
            real[0], real[-1] = True, False  # some of each

    leaves = {"x": x, "A": A, "B": B, "Wr": Wr}
    if x_lora is not None:
        leaves["x_lora"] = x_lora
    if base_out is not None:
        leaves["base_out"] = base_out
    ref_in = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    y_ref, aux_ref, ids_ref = reference(ref_in["x"], ref_in.get("x_lora", ref_in["x"]), None if mode == "base_out" else W,
                                        bias, ref_in.get("base_out"), ref_in["A"], ref_in["B"], ref_in["Wr"],
                                        noise, kind, K, scale, lb, zc, real)
    ((y_ref * w_y).sum() + 3.0 * aux_ref).backward()

    k_in = {k: v.to(torch.float32 if k == "Wr" else dtype).clone().requires_grad_() for k, v in leaves.items()}
    if mode in ("weight", "dropout"):  # lora_B in MoLLinear's expert-interleaved layout (a view of B_cat)
        k_in["B"] = interleaved(B.to(dtype)).requires_grad_()
    calls = []

    def weight_fn(dtype):  # a materialized base weight (as an NF4 base dequantizes), asked for in fwd and bwd
        calls.append(dtype)
        return W.to(dtype)
    y, aux, hl, gates, ids, stats = rl.routed_lora_linear(
        k_in["x"], k_in["A"], k_in["B"], k_in["Wr"], kind, K, scale,
        weight=W.to(dtype) if mode in ("weight", "dropout") else None,
        weight_fn=weight_fn if mode == "weight_fn" else None, bias=None if bias is None else bias.to(dtype),
        base_out=k_in.get("base_out"), x_lora=k_in.get("x_lora"),
        noise=None if noise is None else noise.float(), lb_coef=lb, z_coef=zc,
        token_weights=None if real is None else real.float())
    ((y.float() * w_y.float()).sum() + 3.0 * aux).backward()
    if real is not None:  # the statistics count the real tokens' (token, expert) pairs only
        counts = torch.zeros(E).scatter_add(0, ids_ref[real].reshape(-1), torch.ones(ids_ref[real].numel()))
        assert torch.equal(stats[:E], counts)

    tol_y, tol_g = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
    by_gemm = rl.SHRINK == "gemm" and dtype != torch.float32 and x_lora is None and T > rl.SMALL_T_MAX
    assert hl.shape[1] == E * r + (rl.ROUTER_PARTS if by_gemm else 1) * E  # the path this case is meant to run
    assert calls == ([dtype] * 2 if mode == "weight_fn" else [])  # forward, then backward's dx
    assert torch.equal(ids, ids_ref)
    assert rel(y, y_ref) < tol_y
    assert rel(aux, aux_ref) < 1e-5 if pad != "all" else aux.item() == 0.0
    assert rel(hl[:, -E:], ref_in["x"].detach() @ Wr.t()) < 1e-6  # the logits, float32-accurate for any x
    for name in leaves:
        assert rel(k_in[name].grad, ref_in[name].grad) < tol_g, name
    assert same_layout(k_in["B"].grad, k_in["B"])  # dB comes in lora_B's own layout (no copy for it)


def _strided(t, layout):
    """(leaf, view of it with t's values in a layout that is not dense row-major): "slice", the first columns of a
    wider tensor; "transpose", the transpose of a row-major one; "expand", a row (t's first) broadcast over t's rows
    (t's other rows are then ignored); "step", every other element of a longer 1-D tensor."""
    if layout == "slice":
        leaf = torch.cat([t, torch.randn(*t.shape[:-1], 5)], dim=-1).requires_grad_()
        return leaf, leaf[..., :t.shape[-1]]
    if layout == "transpose":
        leaf = t.t().contiguous().requires_grad_()
        return leaf, leaf.t()
    if layout == "expand":
        leaf = t[0].clone().requires_grad_()
        return leaf, leaf.expand(t.shape)
    leaf = torch.stack([t, torch.randn_like(t)], dim=1).reshape(-1).requires_grad_()  # "step"
    return leaf, leaf[::2]


@pytest.mark.parametrize("T", [6, 40])  # the one-launch small-T forward and the large-T kernels
@pytest.mark.parametrize("mode, x_layout", [("weight", "slice"), ("base_out", "transpose"), ("dropout", "expand")])
def test_any_input_layout_gives_the_dense_layouts_numbers(T, mode, x_layout):
    """Inputs the kernels read row-major, given as strided views (x a feature slice, a transpose or an expand, the
    router weight stored transposed, base_out, x_lora, bias, noise, token weights and the output gradient dy not
    dense either): the outputs and every gradient of the same call on .contiguous() copies of them."""
    n_in, n_out, E, r, K = 12, 10, 4, 3, 2
    leaves = {"x": _strided(torch.randn(T, n_in), x_layout), "Wr": _strided(torch.randn(E, n_in), "transpose")}
    if mode == "base_out":
        leaves["base_out"] = _strided(torch.randn(T, n_out), "slice")
    bias = None if mode == "base_out" else _strided(torch.randn(n_out), "step")[1].detach()  # frozen, as W
    if mode == "dropout":
        leaves["x_lora"] = _strided(torch.randn(T, n_in), "transpose")
    W = torch.randn(n_in, n_out).t()  # frozen, stored transposed
    A, B = torch.randn(E, r, n_in, requires_grad=True), torch.randn(E, n_out, r, requires_grad=True)
    noise = torch.randn(E, T).t()
    # token weights take the large-T kernels: the small-T forward weighs every token alike
    tw = _strided((torch.rand(T) < 0.7).float(), "step")[1].detach() if T > rl.SMALL_T_MAX else None
    w_y = torch.randn(T, n_out)

    def run(dense):
        for t in (A, B, *(leaf for leaf, _ in leaves.values())):
            t.grad = None
        view = {k: v.contiguous() if dense else v for k, (_, v) in leaves.items()}
        y, aux, *routing = rl.routed_lora_linear(
            view["x"], A, B, view["Wr"], "topk", K, 0.7, weight=None if mode == "base_out" else W,
            bias=None if bias is None else (bias.contiguous() if dense else bias), base_out=view.get("base_out"),
            x_lora=view.get("x_lora"),
            noise=noise.contiguous() if dense else noise, lb_coef=0.2, z_coef=0.03,
            token_weights=None if tw is None else (tw.contiguous() if dense else tw))
        # the strided call's dy is a transpose (dy through y.t()), the dense call's row-major
        loss = (y * w_y).sum() if dense else (y.t() * w_y.t()).sum()
        (loss + aux).backward()
        return [y.detach(), aux.detach(), *routing, A.grad, B.grad, *(leaf.grad for leaf, _ in leaves.values())]

    dense = run(True)
    strided = run(False)
    for name, a, b in zip(["y", "aux", "hl", "gates", "ids", "stats", "dA", "dB", *(f"d{k}" for k in leaves)],
                          strided, dense):
        assert rel(a, b) < 1e-6, name


def test_unused_outputs_and_no_grad():
    """Only the auxiliary loss in the loss (y unused), and a forward under no_grad."""
    T, n_in, n_out, E, r = 9, 16, 12, 4, 2
    x = torch.randn(T, n_in)
    A = torch.randn(E, r, n_in, requires_grad=True)
    B = torch.randn(E, n_out, r, requires_grad=True)
    Wr = torch.randn(E, n_in, requires_grad=True)
    W = torch.randn(n_out, n_in)
    y, aux, *_ = rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.0, weight=W, lb_coef=1.0, z_coef=1.0)
    aux.backward()
    ref = reference(x.double(), x.double(), W.double(), None, None, A.double(), B.double(),
                    Wr.detach().double().requires_grad_(), None, "topk", 2, 1.0, 1.0, 1.0)
    assert rel(aux, ref[1]) < 1e-5
    assert A.grad.abs().max() == 0 and Wr.grad.abs().max() > 0
    with torch.no_grad():
        y2, *_ = rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.0, weight=W)
    assert torch.equal(y2, y.detach())


@pytest.mark.parametrize("T", [9, 40])  # the one-launch small-T forward and the large-T sequence
def test_inference_forward_skips_autograd_and_matches_training_forward(T):
    """With nothing needing a gradient (no_grad, inference_mode, or frozen inputs) routed_lora_linear runs the
    kernels without an autograd node; every output equals the training forward's."""
    n_in, n_out, E, r = 16, 12, 4, 2
    x = torch.randn(T, n_in)
    A = torch.randn(E, r, n_in, requires_grad=True)
    B = torch.randn(E, n_out, r, requires_grad=True)
    Wr = torch.randn(E, n_in, requires_grad=True)
    W = torch.randn(n_out, n_in)

    def run():
        return rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 0.5, weight=W, lb_coef=0.1, z_coef=0.01)
    train = run()
    assert train[0].grad_fn is not None and train[1].grad_fn is not None
    frozen = [t.detach() for t in (A, B, Wr)]
    for mode in ("no_grad", "inference_mode", "frozen"):
        if mode == "frozen":  # grad mode on, but no input requires grad
            out = rl.routed_lora_linear(x, *frozen, "topk", 2, 0.5, weight=W, lb_coef=0.1, z_coef=0.01)
        else:
            with getattr(torch, mode)():
                out = run()
        assert all(o.grad_fn is None and not o.requires_grad for o in out), mode
        for name, a, b in zip(("y", "aux", "hl", "gates", "ids", "stats"), out, train):
            assert torch.equal(a, b.detach()), (mode, name)


@pytest.mark.parametrize("mode", ["weight", "dropout", "base_out", "padding"])
def test_leading_dims_give_the_flat_calls_numbers(mode):
    """x of shape (B, S, in): the same numbers as the flattened call, bit for bit, with outputs and gradients in the
    caller's shapes; y stays modifiable in place, as a layer's output is."""
    B, S, n_in, n_out, E, r = 2, 7, 16, 12, 4, 2
    x0, w_y = torch.randn(B, S, n_in), torch.randn(B, S, n_out)
    A, Bw, Wr = torch.randn(E, r, n_in), torch.randn(E, n_out, r), torch.randn(E, n_in)
    W = torch.randn(n_out, n_in)
    xl0, base0 = torch.randn(B, S, n_in), torch.randn(B, S, n_out)
    tw = (torch.rand(B * S) > 0.3).float() if mode == "padding" else None

    def run(shape):
        x = x0.reshape(shape).clone().requires_grad_()
        base_out = base0.reshape(*shape[:-1], n_out).clone().requires_grad_() if mode == "base_out" else None
        x_lora = xl0.reshape(shape).clone().requires_grad_() if mode == "dropout" else None
        leaves = [t.clone().requires_grad_() for t in (A, Bw, Wr)]
        y, aux, *routing = rl.routed_lora_linear(x, *leaves, "topk", 2, 0.5, weight=None if mode == "base_out" else W,
                                                 base_out=base_out, x_lora=x_lora, lb_coef=0.1, z_coef=0.01,
                                                 token_weights=tw)
        y2 = y * 1.0  # a copy to modify in place: the test's y is compared below
        y2.mul_(2.0)
        ((y2 * w_y.reshape(*shape[:-1], n_out)).sum() + aux).backward()
        grads = [t.grad for t in (x, x_lora, base_out, *leaves) if t is not None]
        return y, aux, routing, grads
    y3, aux3, routing3, grads3 = run((B, S, n_in))
    y2, aux2, routing2, grads2 = run((B * S, n_in))
    assert y3.shape == (B, S, n_out)
    assert torch.equal(y3.reshape(B * S, n_out), y2) and torch.equal(aux3, aux2)
    assert all(torch.equal(a, b) for a, b in zip(routing3, routing2))
    for g3, g2 in zip(grads3, grads2):
        assert g3.shape[-1] == g2.shape[-1] and torch.equal(g3.reshape(g2.shape), g2)
    assert grads3[0].shape == (B, S, n_in)
    with torch.no_grad():  # the path without an autograd node keeps the leading dims too
        y_ng, *_ = rl.routed_lora_linear(x0, A, Bw, Wr, "topk", 2, 0.5, weight=W)
    assert y_ng.shape == (B, S, n_out)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 8)
    A, B, Wr = torch.randn(4, 2, 8), torch.randn(4, 5, 2), torch.randn(4, 8)
    with pytest.raises(ValueError, match="exactly one of"):
        rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.0)
    with pytest.raises(ValueError, match="top_k=5"):
        rl.routed_lora_linear(x, A, B, Wr, "topk", 5, 1.0, weight=torch.randn(5, 8))
    with pytest.raises(ValueError, match="not fused"):
        rl.routed_lora_linear(x, A, B, Wr, "sequence", 2, 1.0, weight=torch.randn(5, 8))
    with pytest.raises(ValueError, match="float32"):
        rl.routed_lora_linear(x, A, B, Wr.double(), "topk", 2, 1.0, weight=torch.randn(5, 8))
    with pytest.raises(ValueError, match="shape mismatch"):
        rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.0, weight=torch.randn(6, 8))
    with pytest.raises(ValueError, match="bias has shape"):
        rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.0, weight=torch.randn(5, 8), bias=torch.randn(4))
    with pytest.raises(ValueError, match="exactly one of"):
        rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.0, weight=torch.randn(5, 8), weight_fn=lambda dt: None)


def test_custom_ops_opcheck():
    """Schemas and fake kernels of the fused path's custom ops agree with the real kernels."""
    gl.POISON = False
    T, n_in, n_out, E, r, K = 6, 19, 23, 4, 3, 2
    x, A, Wr = torch.randn(T, n_in), torch.randn(E, r, n_in), torch.randn(E, n_in)
    B, dy = torch.randn(E, n_out, r), torch.randn(T, n_out)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.mol.route_shrink.default, (x, None, A.reshape(E * r, n_in), Wr), test_utils=checks)
    hl, stats, _ = rl.route_shrink_impl(x, None, A.reshape(E * r, n_in), Wr)
    assert torch.equal(stats, torch.zeros(2 * E + 2))  # zeroed by the shrink kernel
    fwd_args = (hl, stats.clone(), None, E * r, r, 0, K, 0.5, torch.float32, 0.1, 0.01)
    torch.library.opcheck(torch.ops.mol.route_gate_fwd.default, fwd_args, test_utils=checks)
    gates, ids, u, aux = rl.gate_fwd_impl(hl, stats, *fwd_args[2:])
    assert stats[:E].sum() == T * K and stats[-1] == -(-T // 16)  # every routed pair counted; every program
    du = rl.lora_du_impl(dy, B)
    torch.library.opcheck(torch.ops.mol.lora_du.default, (dy, B), test_utils=checks)
    torch.library.opcheck(torch.ops.mol.route_gate_bwd.default,
                          (du, hl, None, gates, ids, stats, torch.tensor(1.0), r, 0, 0.5, 0.1, 0.01, torch.float32),
                          test_utils=checks)
    # dhl is stored token-minor, its column stride padded to 8 (T=6 -> 8): the weight-gradient GEMM dhl^T x then
    # reads a row-major operand, and the dx GEMM's TMA 16-byte rows (opcheck above: the fake kernel agrees)
    dhl = rl.gate_bwd_impl(du, hl, None, gates, ids, stats, torch.tensor(1.0), r, 0, 0.5, 0.1, 0.01, torch.float32)
    assert dhl.shape == (T, E * r + E) and dhl.stride() == (1, 8)
    W, bias = torch.randn(n_out, n_in), torch.randn(n_out)
    small_args = (x, None, A.reshape(E * r, n_in), Wr, W, bias, None, B, None, r, 0, K, 0.5, 0.1, 0.01)
    torch.library.opcheck(torch.ops.mol.route_small_t_fwd.default, small_args, test_utils=checks)
    y, hl_s, gates_s, ids_s, u_s, stats_s, aux_s = rl.small_t_fwd_impl(*small_args)
    # the same routing, statistics and saved tensors as the shrink / gate sequence of larger T
    assert torch.equal(ids_s, ids) and torch.allclose(gates_s, gates) and torch.allclose(hl_s, hl, atol=1e-5)
    assert torch.allclose(u_s, u, atol=1e-5) and torch.allclose(stats_s[:-1], stats[:-1]) and torch.allclose(aux_s, aux)


def test_small_t_workspace_is_left_zero_and_reused():
    """The one-launch forward's ticket, flag, counter and accumulator are one cached buffer per device, stream and
    width, never zero-filled again: each launch must leave it zero, or the next one's router reads stale sums (or
    never gets its ticket). Back-to-back calls of different T reuse it and each equals a run on a fresh buffer."""
    n_in, n_out, E, r, K = 600, 21, 5, 4, 2  # in > 256: several split-K programs add into the accumulator
    A, Wr, B = torch.randn(E * r, n_in), torch.randn(E, n_in), torch.randn(E, n_out, r)
    W, bias = torch.randn(n_out, n_in), torch.randn(n_out)
    gl._ZEROED.clear()
    work = rl._small_t_work(torch.empty(1), E * r + E)
    for T in (16, 3, 1, 16):
        args = (torch.randn(T, n_in), None, A, Wr, W, bias, None, B, None, r, 0, K, 0.5, 0.1, 0.01)
        outs = rl.small_t_fwd_impl(*args)
        assert rl._small_t_work(args[0], E * r + E) is work
        assert torch.count_nonzero(work) == 0, f"T={T}: the kernel left {torch.count_nonzero(work)} words set"
        saved = dict(gl._ZEROED)
        gl._ZEROED.clear()  # the oracle: the same call on a freshly zeroed buffer
        fresh = rl.small_t_fwd_impl(*args)
        gl._ZEROED.clear()
        gl._ZEROED.update(saved)
        for name, a, b in zip(("y", "hl", "gates", "ids", "u", "stats", "aux"), outs, fresh):
            assert torch.equal(a, b), f"T={T}: {name} differs on the reused buffer"


def test_zeroed_workspace_is_not_cached_from_inside_a_graph_capture(monkeypatch):
    """A capture records a zero-fill without running it: a buffer first made then must not serve later calls."""
    gl._ZEROED.clear()
    monkeypatch.setattr(gl, "_capturing", lambda device: True)
    inside = gl.zeroed_workspace(torch.device("cpu"), "t", 8)
    assert not gl._ZEROED and torch.count_nonzero(inside) == 0
    monkeypatch.setattr(gl, "_capturing", lambda device: False)
    outside = gl.zeroed_workspace(torch.device("cpu"), "t", 8)
    assert outside is not inside and gl.zeroed_workspace(torch.device("cpu"), "t", 4) is outside
    grown = gl.zeroed_workspace(torch.device("cpu"), "t", 9)  # too small: a larger one replaces it
    assert grown.numel() == 9 and gl.zeroed_workspace(torch.device("cpu"), "t", 8) is grown


@pytest.mark.parametrize("router", ["topk", "soft"])
def test_mol_layer_compiles_fullgraph_on_the_fused_path(router):
    """MoLLinear on the Triton backend under torch.compile(fullgraph=True): no graph break, eager numbers."""
    from mol import MoLLinear

    torch._dynamo.reset()
    layer = MoLLinear(torch.nn.Linear(16, 12), num_experts=4, top_k=2, rank=3, router=router, backend="triton")
    with torch.no_grad():
        layer.lora_B.normal_()

    def step(x):
        y = layer(x)
        return y.square().mean() + layer.aux_loss()

    x = torch.randn(2, 5, 16, requires_grad=True)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router.weight)]
    x2 = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    eager = step(x2)
    eager.backward()
    assert rel(loss, eager) < 1e-6 and rel(x.grad, x2.grad) < 1e-5
    for g, p in zip(grads, (layer.lora_A, layer.lora_B, layer.router.weight)):
        assert rel(g, p.grad) < 1e-5


def test_mol_layer_compiled_reads_a_strided_x_and_router_weight():
    """Under torch.compile too, a feature slice of a wider x and a router weight stored transposed give the numbers
    of dense copies of them."""
    from mol import MoLLinear

    torch._dynamo.reset()
    layer = MoLLinear(torch.nn.Linear(16, 12), num_experts=4, top_k=2, rank=3, backend="triton")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight = torch.nn.Parameter(torch.randn(16, 4).t())
    wide = torch.randn(2, 5, 20)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(wide[..., :16])
    with torch.no_grad():
        layer.router.weight = torch.nn.Parameter(layer.router.weight.contiguous())
    assert rel(y, layer(wide[..., :16].contiguous())) < 1e-6


def test_kernels_compile_for_sm90():
    """The interpreter never compiles: build every fused-path kernel variant for sm_90 with Triton's compiler."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compile_sm90.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # 20 large-T (one with the tf32x2 router; the gate kernels with each GATE_COLUMNS and both router score forms;
    # the one-GEMM shrink's operand kernel for bf16 and fp16, each with A in x's dtype and in float32) + 7 small-T
    # (two of them with float32 adapters, rounded as they load) + the given-routing path's 2 gate kernels + the base GEMM (forward and backward forms) at each of its configs
    # + the Gluon NF4 decode kernel at each of its configs and 7 variants (where Triton has Gluon) + the Gluon base
    # GEMM (forward with bias, backward, no extra K) at each of its configs
    from mol.kernels import base_gemm as bg
    from mol.kernels import base_gemm_gluon as bgg
    from mol.kernels import nf4_mma

    n_mma = len(nf4_mma.CONFIGS) + 7 if nf4_mma.AVAILABLE else 0
    n_gluon = 3 * len(bgg.CONFIGS) if bgg.AVAILABLE else 0
    assert res.stdout.count("compiled for sm_90") == 29 + 2 * len(bg.CONFIGS) + n_mma + n_gluon


@pytest.mark.parametrize("arch", [75, 80, 86])
def test_kernels_compile_for_turing_ampere_and_ada(arch):
    """One variant of each kernel and path built for sm_80 (A100), sm_86 (A10, RTX 30xx; sm_89's L4 / RTX 40xx has
    its limits) and sm_75 (T4), which no one has run: PTX that only sm_90 has (the NF4 kernel's mul.bf16x2 was), or
    a fixed config over the target's shared memory (99 KB on sm_86 / 89, 64 KB on sm_75), fails here. On sm_75 only
    the NF4 FMA path for float16 / float32 x (what NF4Linear runs there; the MoL kernels run only when forced, in
    float16). `compile_sm90.py --arch 80 --all-configs` builds every autotuned config too (minutes)."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compile_sm90.py")
    res = subprocess.run([sys.executable, script, "--arch", str(arch), "--quick"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    from mol.kernels import nf4_mma

    # route shrink, router parts, gate fwd / bwd, aux, small-T FMA and dot, the given-routing path's 2 gate kernels,
    # NF4 small-T FMA (pair table and byte permutes) and dot, the Gluon NF4 decode with and without the pair table
    built = res.stdout.count(f"compiled for sm_{arch}") + res.stdout.count(f"built for sm_{arch}")
    assert built == 9 + (3 if arch >= 80 else 1) + (2 if nf4_mma.AVAILABLE and arch >= 80 else 0), res.stdout
    assert "_base_gemm" not in res.stdout  # TMA / wgmma: sm_90 only, never dispatched here


@pytest.mark.parametrize("shrink", rl._SHRINK_CHOICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_scores_float32_accurate_for_low_precision_x(dtype, shrink, monkeypatch):
    """The router's float32 weight scores bf16 / fp16 x at float32 accuracy (Triton: tf32x3 on the GPU; one GEMM:
    against Wr's exact 16-bit parts, summed by the gate forward): rounding the weight to x's dtype instead would be
    ~1e-3 off and flip close routes."""
    monkeypatch.setattr(rl, "SHRINK", shrink)
    g = torch.Generator().manual_seed(11)
    T, n_in, E, r = 37, 300, 5, 4
    x = torch.randn(T, n_in, generator=g).to(dtype)
    a_cat = torch.randn(E * r, n_in, generator=g).to(dtype)
    Wr = torch.randn(E, n_in, generator=g) * 1e-3  # small weights: fp16's parts must be scaled not to flush
    hl, stats, w_dx = rl.route_shrink_impl(x, None, a_cat, Wr)
    assert hl.shape[1] == E * r + (rl.ROUTER_PARTS if shrink == "gemm" else 1) * E
    # the backward's dx operand: [A_cat; Wr rounded to x's dtype] where the GEMM built it (else empty: rebuilt)
    if shrink == "gemm":
        assert torch.equal(w_dx[:E * r], a_cat)
        if dtype == torch.float16 or not gl._INTERPRET:
            assert torch.equal(w_dx[E * r:], Wr.to(dtype))
        else:  # Wr rounded to nearest on a GPU; the interpreter's bf16 conversion truncates: within one ulp
            assert ((w_dx[E * r:].float() - Wr).abs() <= torch.finfo(dtype).eps * Wr.abs()).all()
    else:
        assert w_dx.shape == (0, n_in)
    rl.gate_fwd_impl(hl, stats, None, E * r, r, 0, 2, 1.0, dtype, 0.0, 0.0)  # leaves the logits in hl[:, -E:]
    ref = x.double() @ Wr.double().t()
    one_part = x.double() @ Wr.to(dtype).double().t()
    err = ((hl[:, -E:].double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-6, err
    assert ((one_part - ref).abs().max() / ref.abs().max()).item() > 1e-4  # the test can tell the difference
    ref_h = x.double() @ a_cat.double().t()
    assert ((hl[:, :E * r].double() - ref_h).abs().max() / ref_h.abs().max()).item() < 1e-6


def test_unknown_router_precision_is_named(monkeypatch):
    monkeypatch.setattr(rl, "ROUTER_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ROUTER_PRECISION='fp8'"):
        rl.route_shrink_impl(torch.randn(3, 8), None, torch.randn(4, 8), torch.randn(2, 8))


def test_each_router_precision_is_tuned_for_itself(monkeypatch):
    """The chosen-config cache keys on the router's precision: switching it in one process must not reuse the
    other form's tuning (run 12's comparison did)."""
    T, n_in, E, r = 40, 24, 4, 4
    x, a_cat, Wr = torch.randn(T, n_in), torch.randn(E * r, n_in), torch.randn(E, n_in)
    keys = []
    for prec in rl._ROUTER_PRECISIONS:
        monkeypatch.setattr(rl, "ROUTER_PRECISION", prec)
        before = set(gl._CHOSEN)
        rl.route_shrink_impl(x, None, a_cat, Wr)
        keys += [k for k in set(gl._CHOSEN) - before if k[0] == "route_shrink"]
    assert len(keys) == len(rl._ROUTER_PRECISIONS)


def test_unknown_shrink_is_named(monkeypatch):
    monkeypatch.setattr(rl, "SHRINK", "cutlass")
    x = torch.randn(20, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="SHRINK='cutlass'"):
        rl.route_shrink_impl(x, None, torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8))


def test_unknown_gate_columns_is_named(monkeypatch):
    monkeypatch.setattr(rl, "GATE_COLUMNS", "scatter")
    hl, stats, _ = rl.route_shrink_impl(torch.randn(3, 8), None, torch.randn(4, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="GATE_COLUMNS='scatter'"):
        rl.gate_fwd_impl(hl, stats, None, 4, 2, 0, 1, 1.0, torch.float32, 0.0, 0.0)
