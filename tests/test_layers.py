"""MoLLinear against an independent float64 reference of

    y = base(x) + scale * sum_{e in chosen(x)} g_e(x) * B_e (A_e x)

computed token by token (no dense gate matrix, no shared code with mol.dispatch), for every router,
including its load-balance and z-loss, and all gradients."""

import copy
import math
import warnings

import pytest
import torch

import mol
from mol import MoLConfig, MoLLinear


def reference(layer: MoLLinear, x: torch.Tensor):
    """float64 forward of the formula + aux losses; returns (y, aux, leaf tensors for gradients)."""
    d = torch.float64
    W = layer.base_layer.weight.detach().to(d).requires_grad_(False)
    b = layer.base_layer.bias.detach().to(d) if layer.base_layer.bias is not None else None
    A = layer.lora_A.detach().to(d).requires_grad_(True)
    B = layer.lora_B.detach().to(d).requires_grad_(True)
    Wr = layer.router.weight.detach().to(d).requires_grad_(True)
    xx = x.detach().to(d).requires_grad_(True)
    E, K, kind = layer.num_experts, layer.router.top_k, layer.router.kind

    seqs = xx.reshape(-1, x.shape[-2], x.shape[-1])  # (batch, seq, in)
    rows, lb_f, lb_p, zs, ys = [], torch.zeros(E, dtype=d), [], [], []
    for s in range(seqs.shape[0]):
        if kind == "sequence":
            pooled = seqs[s].mean(0)
            logit_seq = Wr @ pooled
        for t in range(seqs.shape[1]):
            xt = seqs[s, t]
            logits = logit_seq if kind == "sequence" else Wr @ xt
            probs = torch.softmax(logits, 0)
            if kind == "soft":
                chosen, gates = list(range(E)), probs
            else:
                k = 1 if kind == "switch" else K
                chosen = sorted(range(E), key=lambda e: -probs[e].item())[:k]
                g = probs[chosen]
                gates = g if kind == "switch" else g / g.sum()
            y = W @ xt + (b if b is not None else 0)
            for e, g in zip(chosen, gates):
                y = y + layer.scaling * g * (B[e] @ (A[e] @ xt))
            ys.append(y)
            if kind != "sequence" or t == 0:
                for e in chosen:
                    lb_f[e] += 1
                lb_p.append(probs)
                zs.append(torch.logsumexp(logits, 0) ** 2)
    f = lb_f / lb_f.sum()
    P = torch.stack(lb_p).mean(0)
    aux = layer.aux_loss_coef * E * (f * P).sum() + layer.z_loss_coef * torch.stack(zs).mean()
    out = torch.stack(ys).reshape(*x.shape[:-1], -1)
    return out, aux, (xx, A, B, Wr)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_layer(kind, E, K, k_in, k_out, r, bias=True):
    base = torch.nn.Linear(k_in, k_out, bias=bias)
    layer = MoLLinear(base, num_experts=E, top_k=K, rank=r, alpha=2.0 * r + 1, router=kind,
                      aux_loss_coef=0.05, z_loss_coef=0.01, backend="torch")
    with torch.no_grad():  # B starts at zero; give it values so the delta and its gradients are tested
        layer.lora_B.normal_(0, 0.5)
        layer.router.weight.normal_(0, 0.5)
    return layer


CASES = [  # kind, E, K, x shape, in, out, r
    ("topk", 8, 2, (1, 1), 5, 3, 2),
    ("topk", 4, 3, (1, 7), 19, 45, 4),
    ("topk", 8, 8, (13,), 6, 11, 3),
    ("soft", 5, 5, (2, 9), 13, 7, 2),
    ("switch", 6, 1, (3, 5), 9, 10, 4),
    ("sequence", 4, 2, (3, 6), 12, 8, 3),
    ("sequence", 6, 1, (5, 2), 7, 9, 2),
]


@pytest.mark.parametrize("kind,E,K,shape,k_in,k_out,r", CASES)
def test_forward_backward_matches_float64_reference(kind, E, K, shape, k_in, k_out, r):
    layer = make_layer(kind, E, K, k_in, k_out, r, bias=(E % 2 == 0))
    x = torch.randn(*shape, k_in, requires_grad=True)
    y = layer(x)
    weights = torch.randn_like(y)
    ((y * weights).sum() + layer.aux_loss()).backward()

    y_ref, aux_ref, (x_ref, A_ref, B_ref, Wr_ref) = reference(layer, x)
    ((y_ref * weights.double()).sum() + aux_ref).backward()

    assert y.shape == (*shape, k_out)
    assert rel(y, y_ref) < 1e-5
    assert abs(layer.aux_loss().item() - aux_ref.item()) < 1e-5 * max(1.0, abs(aux_ref.item()))
    assert rel(x.grad, x_ref.grad) < 1e-5
    assert rel(layer.lora_A.grad, A_ref.grad) < 1e-5
    assert rel(layer.lora_B.grad, B_ref.grad) < 1e-5
    assert rel(layer.router.weight.grad, Wr_ref.grad) < 1e-4


@pytest.mark.parametrize("kind,E,K,shape,k_in,k_out,r", CASES)
def test_float64_layer_is_float64_accurate(kind, E, K, shape, k_in, k_out, r):
    """A float64 layer scores its router in float64 (16- and 32-bit ones in float32): output, aux loss and every
    gradient equal the float64 formula to float64 rounding, and gradcheck passes for x and every parameter."""
    layer = make_layer(kind, E, K, k_in, k_out, r, bias=(E % 2 == 0)).double()
    x = torch.randn(*shape, k_in, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    weights = torch.randn_like(y)
    ((y * weights).sum() + layer.aux_loss()).backward()
    y_ref, aux_ref, (x_ref, A_ref, B_ref, Wr_ref) = reference(layer, x)
    ((y_ref * weights).sum() + aux_ref).backward()
    assert rel(y, y_ref) < 1e-12 and rel(layer.aux_loss(), aux_ref) < 1e-12
    for got, want in ((x.grad, x_ref.grad), (layer.lora_A.grad, A_ref.grad), (layer.lora_B.grad, B_ref.grad),
                      (layer.router.weight.grad, Wr_ref.grad)):
        assert rel(got, want) < 1e-10

    names = ("lora_A", "lora_B", "router.weight")

    def f(x, *params):
        y = torch.func.functional_call(layer, dict(zip(names, params)), (x,))
        return y, layer.aux_loss()
    params = [getattr(layer, n) if "." not in n else layer.router.weight for n in names]
    # fast_mode: the Jacobian along random directions (both sides), not column by column: the full check took
    # 2 x 1,233 forwards for the (1, 7) x 19 -> 45 case alone (~30 s of CI), and the gradients are compared in full
    # against the float64 formula above
    assert torch.autograd.gradcheck(f, (x.detach().requires_grad_(), *(p.detach().requires_grad_() for p in params)),
                                    fast_mode=True)


@pytest.mark.parametrize("backend,kind,E,K,trained_base", [
    ("torch", "sequence", 4, 2, False), ("torch", "topk", 4, 2, False), ("triton", "topk", 4, 2, False),
    ("triton", "soft", 3, 3, False), ("triton", "sequence", 4, 2, False), ("triton", "sequence", 4, 2, True)])
def test_torch_func_transforms_match_the_float64_reference(backend, kind, E, K, trained_base):
    """torch.func over a routed layer: grad of functional_call (parameters and x, aux loss included) and jacrev equal
    the float64 reference's gradients; vmap over a batch gives the per-sample calls' outputs, or, where the
    Triton kernels run, an error saying so. The sequence router on Triton runs the grouped kernels (fused with a
    frozen base, or added to a trained one's output)."""
    layer = make_layer(kind, E, K, 12, 8, 3)
    layer.backend = backend
    layer.base_layer.requires_grad_(trained_base)
    x, w_y = torch.randn(2, 5, 12), torch.randn(2, 5, 8)
    names = ("lora_A", "lora_B", "router.weight")
    params = {n: p.detach() for n, p in layer.named_parameters() if n in names}

    def loss(params, x):
        return (torch.func.functional_call(layer, params, (x,)) * w_y).sum() + layer.aux_loss()
    g_params, g_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    jac = torch.func.jacrev(lambda x: torch.func.functional_call(layer, params, (x,)))(x)  # (2, 5, 8, 2, 5, 12)

    y_ref, aux_ref, (x_ref, A_ref, B_ref, Wr_ref) = reference(layer, x)
    (dy_dx,) = torch.autograd.grad((y_ref * w_y.double()).sum(), x_ref, retain_graph=True)
    ((y_ref * w_y.double()).sum() + aux_ref).backward()
    assert rel(g_x, x_ref.grad) < 1e-5
    for name, want in zip(names, (A_ref.grad, B_ref.grad, Wr_ref.grad)):
        assert rel(g_params[name], want) < 1e-4, name
    assert rel(torch.einsum("bso,bsoxyi->xyi", w_y, jac), dy_dx) < 1e-5

    if backend == "triton":
        with pytest.raises(RuntimeError, match="vmap cannot batch the (fused )?Triton kernels.*backend='torch'"):
            torch.func.vmap(layer)(x)
    else:
        assert rel(torch.func.vmap(layer)(x), torch.stack([layer(xi) for xi in x])) < 1e-6


@pytest.mark.parametrize("kind", ["topk", "soft", "switch", "sequence"])
def test_routed_layer_runs_on_the_meta_device(kind):
    """On the meta device (shape inference, init_empty_weights), for which torch has no autocast: a routed layer's
    forward gives nn.Linear's output shape, and a scalar aux loss."""
    layer = MoLLinear(torch.nn.Linear(12, 10), num_experts=4, top_k=1 if kind == "switch" else 2, rank=3,
                      router=kind).to("meta")
    x = torch.randn(2, 5, 12, device="meta")
    y = layer(x)
    assert y.device.type == "meta" and y.shape == torch.nn.Linear(12, 10, device="meta")(x).shape
    assert layer.aux_loss().shape == ()


def test_empty_expert_and_all_tokens_on_one_expert():
    torch.manual_seed(1)
    layer = make_layer("topk", 8, 1, 16, 10, 4)
    direction = torch.randn(16)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.01)
        layer.router.weight[3] = 2.0 * direction  # every token scores expert 3 highest
    x = (torch.randn(2, 11, 16) * 0.1 + direction).requires_grad_(True)
    y = layer(x)
    stats = layer.last_stats
    assert stats["counts"][3].item() == 22 and stats["counts"].sum().item() == 22
    assert torch.allclose(stats["load"][3], torch.tensor(1.0))
    # Load balance is E * f_3 * P_3, close to E when all mass sits on one expert.
    assert layer.last_stats["load_balance_loss"].item() > 0.9 * 8
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    y_ref, _, (x_ref, A_ref, B_ref, _) = reference(layer, x)
    (y_ref * weights.double()).sum().backward()
    assert rel(y, y_ref) < 1e-5 and rel(x.grad, x_ref.grad) < 1e-5
    assert rel(layer.lora_B.grad, B_ref.grad) < 1e-5
    # Experts that received no token get exactly zero gradient.
    idle = [e for e in range(8) if e != 3]
    assert layer.lora_A.grad[idle].abs().max().item() == 0.0
    assert layer.lora_B.grad[idle].abs().max().item() == 0.0


def test_one_expert_is_plain_lora_and_fresh_adapter_is_identity():
    base = torch.nn.Linear(10, 7)
    layer = MoLLinear(base, num_experts=1, top_k=1, rank=4, alpha=8, use_rslora=True)
    assert layer.router is None
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x).double() + (x.double() @ layer.lora_A[0].double().T @ layer.lora_B[0].double().T) * 8 / math.sqrt(4)
    assert rel(layer(x), expected) < 1e-6


def test_parameter_shapes_are_predictable():
    layer = MoLLinear(torch.nn.Linear(12, 20), num_experts=6, top_k=2, rank=3)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters() if p.requires_grad}
    assert shapes == {"lora_A": (6, 3, 12), "lora_B": (6, 20, 3), "router.weight": (6, 12)}
    assert not layer.base_layer.weight.requires_grad
    assert layer.lora_B.abs().max().item() == 0.0
    # Experts start different from each other (independent random A).
    assert (layer.lora_A[0] - layer.lora_A[1]).abs().max().item() > 0


def test_lora_B_is_stored_expert_interleaved_and_keeps_that_layout():
    """lora_B (E, out, r) lives in (out, E, r) memory order, so the kernels' B_cat and its gradient are views; the
    layout survives .to(), an optimizer step, and a state-dict round trip."""
    E, n_in, n_out, r = 4, 12, 20, 3
    layer = MoLLinear(torch.nn.Linear(n_in, n_out), num_experts=E, top_k=2, rank=r)
    interleaved = (r, E * r, 1)
    assert layer.lora_B.stride() == interleaved
    assert layer.lora_B.permute(0, 2, 1).reshape(E * r, n_out)._base is not None  # B_cat: a view, no copy
    torch.nn.init.normal_(layer.lora_B)
    layer = layer.to(torch.float64)
    assert layer.lora_B.stride() == interleaved
    x = torch.randn(2, 5, n_in, dtype=torch.float64)
    (layer(x).square().sum() + layer.aux_loss()).backward()
    assert layer.lora_B.grad.stride() == interleaved
    torch.optim.AdamW(layer.parameters(), lr=1e-2).step()
    assert layer.lora_B.stride() == interleaved
    fresh = MoLLinear(torch.nn.Linear(n_in, n_out), num_experts=E, top_k=2, rank=r).to(torch.float64)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.lora_B.stride() == interleaved and torch.equal(fresh.lora_B, layer.lora_B)


def test_router_noise_only_in_training():
    layer = make_layer("topk", 4, 2, 8, 8, 2)
    layer.router.noise_std = 1.0
    x = torch.randn(5, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind,E,K", [("topk", 4, 2), ("switch", 3, 1), ("soft", 3, 3), ("sequence", 4, 2)])
def test_triton_backend_computes_the_reference_function(kind, E, K):
    """MoLLinear(backend='triton') (kernels under TRITON_INTERPRET on CPU) against backend='torch'."""
    pytest.importorskip("triton")
    layer = make_layer(kind, E, K, 13, 9, 3)
    x = torch.randn(2, 5, 13, requires_grad=True)
    y_t = layer(x)
    w = torch.randn_like(y_t)
    ((y_t * w).sum() + layer.aux_loss()).backward()
    grads_t = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.router.weight.grad.clone()]

    x.grad = None
    layer.zero_grad()
    layer.backend = "triton"
    y_k = layer(x)
    ((y_k * w).sum() + layer.aux_loss()).backward()
    grads_k = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad]
    assert rel(y_k, y_t) < 1e-5
    for gk, gt in zip(grads_k, grads_t):
        assert rel(gk, gt) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind,E,K", [("topk", 8, 2), ("switch", 8, 1), ("topk", 64, 4), ("sequence", 8, 3)])
def test_tied_router_scores_choose_the_lowest_expert_ids(kind, E, K, backend):
    """Equal router probabilities (a zero-initialised router) choose the lowest expert ids on every backend, as the
    Triton kernels do. torch.topk leaves ties to the platform (on the CPU it chose experts 6 and 5 of 8), so the
    reference path computed another output and other statistics than the kernels for the same weights."""
    if backend == "triton":
        pytest.importorskip("triton")
    layer = make_layer(kind, E, K, 13, 9, 3)
    layer.backend = backend
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(2, 5, 13, requires_grad=True)
    y = layer(x)
    assert torch.equal(layer._last.expert_ids.reshape(-1, K), torch.arange(K).expand(10, K))
    # float64: every probability is 1/E, so topk's renormalised gates are 1/K and switch's gate is 1/E
    gate = 1 / E if kind == "switch" else 1 / K
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    xd = x.detach().double()
    base = layer.base_layer
    y_ref = torch.nn.functional.linear(xd, base.weight.double(), None if base.bias is None else base.bias.double())
    y_ref = y_ref + layer.scaling * gate * sum(xd @ A[e].T @ B[e].T for e in range(K))
    assert rel(y, y_ref) < 1e-5
    seqs_or_tokens = 2 if kind == "sequence" else 10
    counts = torch.zeros(E).index_fill_(0, torch.arange(K), seqs_or_tokens)
    assert torch.equal(layer.last_stats["counts"], counts)


def test_router_scores_in_float32_under_autocast():
    layer = make_layer("topk", 4, 2, 16, 8, 2)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = layer.router(x)
    expected = torch.softmax(x.double() @ layer.router.weight.double().T, -1).topk(2, -1)
    assert routed.gates.dtype == torch.float32
    assert torch.equal(routed.expert_ids, expected.indices)
    assert rel(routed.gates, expected.values / expected.values.sum(-1, keepdim=True)) < 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_triton_fused_and_unfused_base_paths_match_reference(dropout):
    """No dropout: base GEMM fused with the experts; dropout: separate base + grouped add. Same function."""
    pytest.importorskip("triton")
    layer = make_layer("topk", 4, 2, 11, 7, 3)
    layer.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
    layer.train()
    x = torch.randn(9, 11, requires_grad=True)
    torch.manual_seed(5)
    y_t = layer(x)
    (y_t.square().sum()).backward()
    g_t = (x.grad.clone(), layer.lora_A.grad.clone())
    x.grad = None
    layer.zero_grad()
    layer.backend = "triton"
    torch.manual_seed(5)  # same dropout mask
    y_k = layer(x)
    (y_k.square().sum()).backward()
    assert rel(y_k, y_t) < 1e-5
    assert rel(x.grad, g_t[0]) < 1e-4 and rel(layer.lora_A.grad, g_t[1]) < 1e-4


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_triton_backend_over_a_bitsandbytes_style_base_matches_reference(kind):
    """A base that subclasses nn.Linear but holds codes as its weight (bitsandbytes' Linear8bitLt / Linear4bit, as
    transformers loads them, which README says take adapters as they are): the fused path runs it as a module and
    the experts add to its output, the same function, and gradients, as the reference path's."""
    pytest.importorskip("triton")
    from conftest import Bnb4bitLike, Bnb8bitLike

    torch.manual_seed(0)
    base = (Bnb8bitLike if kind == "8bit" else Bnb4bitLike)(torch.nn.Linear(40, 24, bias=False))
    layer = MoLLinear(base, num_experts=4, top_k=2, rank=3)
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(7, 40, requires_grad=True)
    grads = {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        y = layer(x)
        dx, dA, dB = torch.autograd.grad(y.square().sum() + layer.aux_loss(), (x, layer.lora_A, layer.lora_B))
        grads[backend] = (y, dx, dA, dB)
    for got, want in zip(grads["triton"], grads["torch"]):
        assert rel(got, want) < 1e-4
    assert rel(grads["torch"][0], base(x)) > 1e-2  # the experts contribute


def test_adapters_follow_a_quantized_base_dtype():
    """An NF4 base has no float weight: the experts take its compute dtype and device, not float32."""
    from mol.quant import NF4Linear

    base = NF4Linear.from_linear(torch.nn.Linear(128, 64).to(torch.bfloat16))
    layer = MoLLinear(base, num_experts=4, top_k=2, rank=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer.lora_A.device == base.qweight.device
    assert layer(torch.randn(3, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["4bit compute_dtype", "4bit quant_state", "8bit bias"])
def test_adapters_follow_a_bitsandbytes_base_dtype(case):
    """bitsandbytes' layers hold codes as their weight: "base" adapters, IA³ vectors and BitFit biases take the
    dtype the layer computes in (Linear4bit's compute_dtype, else the dtype its quant_state came from, else the
    bias's), as on an NF4Linear; "auto" stays float32 on a 16-bit base, as PEFT's."""
    from conftest import Bnb4bitLike, Bnb8bitLike

    import mol
    from mol.layers import base_compute_dtype
    from mol.methods.bitfit import BitFitConfig
    from mol.methods.ia3 import IA3Linear

    lin = torch.nn.Linear(32, 16, bias=case == "8bit bias")
    if case == "4bit compute_dtype":  # loaded from float32 weights, computing in bf16
        base, want = Bnb4bitLike(lin, compute_dtype=torch.bfloat16), torch.bfloat16
    elif case == "4bit quant_state":  # compute_dtype not set yet: the dtype the codes came from
        base, want = Bnb4bitLike(lin.to(torch.float16)), torch.float16
    else:
        base, want = Bnb8bitLike(lin), torch.bfloat16
        base.bias = torch.nn.Parameter(lin.bias.detach().to(torch.bfloat16), requires_grad=False)
    assert base_compute_dtype(base) == want
    layer = MoLLinear(base, num_experts=2, top_k=1, rank=4, adapter_dtype="base")
    assert layer.lora_A.dtype == layer.lora_B.dtype == want
    layer = MoLLinear(base, num_experts=2, top_k=1, rank=4, adapter_dtype="auto")
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert IA3Linear(base, feedforward=False, adapter_dtype="base").ia3_l.dtype == want
    if case != "8bit bias":
        model = torch.nn.Sequential(base)
        mol.inject(model, BitFitConfig(target_modules=["0"]))
        assert base.bias.dtype == want and base.bias.requires_grad


def _both_backends(layer: MoLLinear, x: torch.Tensor, w: torch.Tensor, before_each) -> list[list[torch.Tensor]]:
    """y and the gradients of x, lora_A, lora_B and the router weight of ``(y * w).sum() + aux_loss``, on the torch
    backend, then on the triton one (``before_each()`` called before each)."""
    results = []
    for backend in ("torch", "triton"):
        layer.backend = backend
        x.grad = None
        layer.zero_grad()
        before_each()
        y = layer(x)
        ((y * w).sum() + layer.aux_loss()).backward()
        results.append([y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad])
    return results


@pytest.mark.parametrize("own_kernel", [False, True])
def test_triton_backend_over_an_nf4_base_matches_reference(own_kernel, monkeypatch):
    """QLoRA-MoL on the fused path: the NF4 base is dequantized inside the fused function (once in forward, once
    in backward, nothing dense kept between) or, when the base has its own kernel for the input, run first."""
    pytest.importorskip("triton")
    from mol.quant import NF4Linear

    torch.manual_seed(0)
    base = NF4Linear.from_linear(torch.nn.Linear(64, 24))
    layer = MoLLinear(base, num_experts=4, top_k=2, rank=3)
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    calls = []
    dequantize = base.dequantize
    monkeypatch.setattr(base, "dequantize", lambda dtype=None: calls.append(dtype) or dequantize(dtype))
    monkeypatch.setattr(base, "uses_own_kernel", lambda x: own_kernel)
    ref, fused = _both_backends(layer, torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 5, 24), calls.clear)
    for a, b in zip(fused, ref):
        assert rel(a, b) < 1e-4
    assert calls == ([] if own_kernel else [torch.float32, torch.float32])  # the triton backend's


class _UnitStandIn(torch.nn.Module):
    """What the fused path sees of an FSDP unit (mol.train.fsdp.adapter_units makes each adapted base one): a module
    holding the base as ``_fsdp_wrapped_module`` that forwards attribute reads to it, as FullyShardedDataParallel
    does, and whose tensors are whole only inside its forward (counted here)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self._fsdp_wrapped_module = inner
        self.calls = 0

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._fsdp_wrapped_module, name)

    def forward(self, x):
        self.calls += 1
        return self._fsdp_wrapped_module(x)


@pytest.mark.parametrize("quantized", [False, True])
def test_a_base_in_an_fsdp_unit_of_its_own_is_called_as_a_module(quantized, monkeypatch):
    """A base FSDP holds in a unit of its own is run through its forward (where FSDP gathers it), never read
    directly by the fused kernels: its NF4 codes are not dequantized outside it (its attributes, forwarded by the
    unit, would be this process's shard). Same function as the reference path."""
    pytest.importorskip("triton")
    from mol.quant import NF4Linear

    torch.manual_seed(0)
    inner = torch.nn.Linear(64, 24).requires_grad_(False)
    inner = NF4Linear.from_linear(inner) if quantized else inner
    layer = MoLLinear(_UnitStandIn(inner), num_experts=4, top_k=2, rank=3)
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    if quantized:
        monkeypatch.setattr(inner, "dequantize", lambda dtype=None: pytest.fail("dequantized outside the unit"))
    ref, fused = _both_backends(layer, torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 5, 24),
                                lambda: setattr(layer.base_layer, "calls", 0))
    assert layer.base_layer.calls == 1  # the triton backend's forward (its backward recomputes nothing)
    for a, b in zip(fused, ref):
        assert rel(a, b) < 1e-4


def test_sequence_pooling_gradient():
    """The sequence router's mean pool (float32 accumulation; its dx a broadcast view) against autograd's own
    derivative of the mean, in float64, to second order; in bf16 its dx comes back in x's dtype and shape."""
    from mol.routers import _MeanPool

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_MeanPool.apply, (x,)) and torch.autograd.gradgradcheck(_MeanPool.apply, (x,))
    xb = torch.randn(2, 4, 6).bfloat16().requires_grad_()
    pooled = _MeanPool.apply(xb)
    assert pooled.dtype == torch.float32 and rel(pooled, xb.double().mean(1)) < 1e-6
    g = torch.randn(2, 6)
    pooled.backward(g)
    assert xb.grad.dtype == torch.bfloat16 and xb.grad.shape == xb.shape
    assert rel(xb.grad, (g.double() / 4)[:, None, :].expand(2, 4, 6)) < 1e-2


@pytest.mark.parametrize("kind", ["topk", "sequence"])
def test_one_token_without_batch_dims(kind):
    """A 1-D input (in,) is one token (and, for the sequence router, a sequence of one): the same output as (1, in)."""
    layer = make_layer(kind, 4, 2, 16, 12, 3)
    x = torch.randn(16)
    y = layer(x)
    assert y.shape == (12,) and torch.allclose(y, layer(x[None])[0])


@pytest.mark.parametrize("kind", ["topk", "soft", "switch", "sequence"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 16), (0, 5, 16), (2, 0, 16)], ids=["no_tokens", "no_sequences", "empty_sequences"])
def test_empty_batch_gives_finite_losses_and_gradients(kind, backend, shape):
    """A batch without tokens (or of empty sequences) trains through: output and dx of the right shapes, and the aux
    loss, its statistics and the router's gradient finite (a NaN there would reach every parameter through the
    training loss). Both backends; the Triton one runs its kernels under TRITON_INTERPRET on CPU."""
    if backend == "triton":
        pytest.importorskip("triton")
    layer = make_layer(kind, 4, 1 if kind == "switch" else 2, 16, 12, 3)
    layer.backend = backend
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    (y.sum() + layer.aux_loss()).backward()
    assert y.shape == (*shape[:-1], 12) and x.grad.shape == x.shape
    assert torch.isfinite(layer.aux_loss()) and torch.isfinite(layer.router.weight.grad).all()
    assert all(torch.isfinite(v).all() for v in layer.last_stats.values())


def test_wrong_input_width_is_named():
    layer = make_layer("topk", 4, 2, 16, 12, 3)
    with pytest.raises(ValueError, match="last dimension is 15.*in_features=16"):
        layer(torch.randn(3, 15))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deepcopy_after_a_training_forward(backend):
    """An EMA or DPO reference copy taken mid-training: the routing a layer keeps from its last forward holds that
    forward's graph, which deepcopy refused ("only graph leaves"). The copy keeps it detached: the same router loss
    value; the original still backpropagates into its own router only, and the copy trains on its own."""
    import copy

    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = MoLLinear(torch.nn.Linear(24, 16), num_experts=4, top_k=2, rank=3, backend=backend)
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(5, 24)
    y = layer(x)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin.aux_loss().detach(), layer.aux_loss().detach())
    (y.square().sum() + layer.aux_loss()).backward()
    assert layer.router.weight.grad is not None and twin.router.weight.grad is None
    (twin(x).square().sum() + twin.aux_loss()).backward()
    torch.testing.assert_close(twin.router.weight.grad, layer.router.weight.grad)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, r"alpha must be > 0, got 0.0"),
    ({"alpha": -2.0}, r"alpha must be > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"dropout": -0.5}, r"dropout must be in \[0, 1\)"),
    ({"num_experts": True}, r"num_experts must be an integer >= 1, got True"),
    ({"top_k": 2.0}, r"top_k must be an integer, got 2.0"),
    ({"num_experts": 1, "router": "tpok"}, r"router='tpok' is unknown; choose one of"),
    ({"aux_loss_coef": -0.1}, r"aux_loss_coef must be a finite number >= 0 \(0 turns it off\), got -0.1"),
    ({"z_loss_coef": float("nan")}, r"z_loss_coef must be a finite number >= 0 \(0 turns it off\), got nan"),
    ({"router_noise": -1.0}, r"router_noise must be a finite number >= 0"),
    ({"alpha": "16"}, r"alpha must be > 0, got '16'"),
    ({"alpha": float("inf")}, r"alpha must be > 0, got inf"),
    ({"dropout": None}, r"dropout must be in \[0, 1\), got None"),
    ({"use_rslora": "false"}, r"use_rslora must be true or false, got 'false'"),
])
def test_layer_built_by_hand_refuses_what_the_config_refuses(kwargs, message):
    """MoLLinear made directly (not through MoLConfig): an alpha of 0 or a dropout of 1 would silently never train,
    a bool num_experts or float top_k fail deep inside; each is refused naming the argument."""
    with pytest.raises(ValueError, match=message):
        MoLLinear(torch.nn.Linear(8, 8), **kwargs)


def test_router_built_by_hand_names_a_bad_expert_count():
    # it said "top_k=2 is outside 1..num_experts=0; set top_k between 1 and 0"
    from mol.routers import Router

    with pytest.raises(ValueError, match=r"num_experts must be an integer >= 1, got 0"):
        Router(8, 0)


@pytest.mark.parametrize("top_k", [2.0, True, "2"])
def test_router_built_by_hand_refuses_a_top_k_that_is_no_integer(top_k):
    """Router(8, 3, top_k=2.0) was built and failed only at its first forward ("slice indices must be integers");
    top_k=True silently routed to one expert, "2" raised a bare TypeError. MoLConfig and MoLLinear refuse them."""
    from mol.routers import Router

    with pytest.raises(ValueError, match=rf"top_k must be an integer, got {top_k!r}"):
        Router(8, 3, top_k=top_k)


@pytest.mark.parametrize("noise", [-1.0, float("nan")])
def test_router_built_by_hand_refuses_a_bad_noise_std(noise):
    """Router(8, 3, noise_std=nan) was built and made every training forward's logits NaN; MoLLinear refuses it."""
    from mol.routers import Router

    with pytest.raises(ValueError, match=r"noise_std must be a finite number >= 0 \(0 turns it off\)"):
        Router(8, 3, noise_std=noise)


@pytest.mark.parametrize("kwargs, message", [
    ({"aux_loss_coef": -0.1}, r"MoLConfig.aux_loss_coef must be a finite number >= 0 \(0 turns it off\), got -0.1"),
    ({"z_loss_coef": -1e-3}, r"MoLConfig.z_loss_coef must be a finite number >= 0 .*got -0.001"),
    ({"router_noise": -1.0}, r"MoLConfig.router_noise must be a finite number >= 0 .*got -1.0"),
    ({"aux_loss_coef": float("nan")}, r"MoLConfig.aux_loss_coef must be a finite number >= 0 .*got nan"),
    ({"z_loss_coef": float("inf")}, r"MoLConfig.z_loss_coef must be a finite number >= 0 .*got inf"),
    ({"alpha": float("nan")}, r"MoLConfig.alpha must be > 0, got nan"),
    ({"rank": True}, r"MoLConfig.rank must be a positive integer, got True"),
    ({"rank": 0}, r"MoLConfig.rank must be a positive integer, got 0; use e.g. rank=8"),
    ({"top_k": 2.0}, r"MoLConfig.top_k must be an integer, got 2.0; use e.g. top_k=2"),
    ({"num_experts": True}, r"MoLConfig.num_experts must be an integer >= 1, got True"),
    ({"num_experts": 4, "top_k": 5}, r"MoLConfig.top_k=5 is outside 1..4 .*set top_k between 1 and 4"),
    ({"top_k": 0}, r"MoLConfig.top_k=0 is outside 1..8 .*set top_k between 1 and 8"),
    ({"router": "expert_choice"}, r"MoLConfig.router='expert_choice' is unknown; choose one of"),
    # each of these failed with a bare TypeError from a comparison or a loop, or (use_rslora, modules_to_save as a
    # string) passed: "false" turned rsLoRA on, and each letter of "lm_head" was taken for a module name
    ({"alpha": "16"}, r"MoLConfig.alpha must be > 0, got '16'"),
    ({"dropout": None}, r"MoLConfig.dropout must be in \[0, 1\), got None"),
    ({"use_rslora": "false"}, r"MoLConfig.use_rslora must be true or false, got 'false'"),
    ({"target_modules": 5}, r"MoLConfig.target_modules=5 is invalid; give a list of module names"),
    ({"target_modules": ["q_proj", None]}, r"MoLConfig.target_modules=\['q_proj', None\] is invalid"),
    ({"modules_to_save": "lm_head"}, r"got the string 'lm_head'; use modules_to_save=\['lm_head'\]"),
    ({"modules_to_save": 5}, r"MoLConfig.modules_to_save must be a list of module names, got 5"),
])
def test_config_refuses_bad_router_settings_naming_the_field_and_fix(kwargs, message):
    """MoLConfig.validate names the bad field, its value and the fix. A NaN or inf coefficient (which "< 0" let
    through) makes every router loss and so the training loss NaN; a negative one was refused without saying which
    of the three it was; a float top_k or a bool rank / num_experts passed the config and failed only in inject."""
    with pytest.raises(ValueError, match=message):
        MoLConfig(**kwargs).validate()


@pytest.mark.parametrize("config_class", [MoLConfig, mol.LoRAConfig, mol.IA3Config])
def test_modules_to_save_none_means_none_as_in_peft(config_class):
    """PEFT's default modules_to_save is None (and Hydra's ``model.modules_to_save=null``): no module saved in full,
    as the empty list; the saved config holds the list."""
    cfg = config_class(modules_to_save=None)
    cfg.validate()
    assert cfg.modules_to_save == [] and cfg.to_dict()["modules_to_save"] == []



def test_switch_router_needs_no_top_k_and_the_default_stays_two():
    """The switch router takes one expert per token by definition; MoLConfig(router="switch"), MoLLinear(...,
    router="switch") and Router(kind="switch") refused to build without top_k=1 spelled out (the README calls it
    top-1). Left out, top_k is now 1 for switch and 2 otherwise; a top_k given is checked as before."""
    from mol.routers import Router

    cfg = mol.MoLConfig(router="switch", num_experts=4)
    assert cfg.top_k == 1 and mol.MoLConfig(num_experts=4).top_k == 2 == mol.MoLConfig(router="sequence").top_k
    assert cfg == mol.MoLConfig(router="switch", num_experts=4, top_k=1)  # what a saved switch adapter holds
    model = mol.inject(torch.nn.Sequential(torch.nn.Linear(6, 5)), cfg)
    assert model[0].router.top_k == 1
    assert MoLLinear(torch.nn.Linear(6, 5), num_experts=4, router="switch").router.top_k == 1
    assert MoLLinear(torch.nn.Linear(6, 5), num_experts=4).router.top_k == 2
    assert Router(6, 4, kind="switch").top_k == 1 and Router(6, 4).top_k == 2
    with pytest.raises(ValueError, match="top_k=1"):
        mol.inject(torch.nn.Sequential(torch.nn.Linear(6, 5)), mol.MoLConfig(router="switch", top_k=2))


def test_one_expert_config_needs_no_top_k_and_is_lora():
    """MoLConfig(num_experts=1) (the docstring's "1: plain LoRA, no router") was refused with "top_k=2 is outside
    1..1": the default top_k of 2 was checked against one expert, though MoLLinear(base, num_experts=1) takes the
    same default. Left out, top_k is now at most num_experts; the layer is the one-expert LoRA, base + s * B A x."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    model = mol.inject(torch.nn.Sequential(copy.deepcopy(base)), MoLConfig(num_experts=1, rank=2, alpha=4))
    layer = model[0]
    assert layer.router is None and MoLConfig(num_experts=1).top_k == 1 == MoLConfig(num_experts=1, router="sequence").top_k
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    want = base.double()(x.double()) + 2.0 * x.double() @ layer.lora_A[0].double().t() @ layer.lora_B[0].double().t()
    torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)


def test_linear_forward_problem_builds_no_graph_and_warns_nothing():
    """The reference product of linear_forward_problem ran outside no_grad: for a subclass whose weight requires grad
    (every fresh model's), it built an autograd graph and float() of it warned 'Converting a tensor with
    requires_grad=True to a scalar' at every inject / quantize."""
    from mol.layers import linear_forward_problem

    class Passthrough(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)

    class Halved(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) / 2

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert linear_forward_problem(Passthrough(16, 8)) is None
        assert "something other than" in linear_forward_problem(Halved(16, 8))


def test_linear_forward_problem_reads_weights_accelerate_offloaded():
    """A model dispatched by accelerate with offload (device_map with "cpu" / "disk") holds its weights on the meta
    device, brought in by a hook around each forward. The check compared the output's shape alone there, so a
    subclass whose forward is no linear map but keeps the shape (a block-diagonal projection) was adapted by
    "all-linear" on the offloaded model and left out on the same model in memory: an adapter trained on one failed
    to load into the other ("lacks tensor '1.lora_A'")."""
    accelerate = pytest.importorskip("accelerate")
    from mol.layers import linear_forward_problem

    class BlockDiagonal(torch.nn.Linear):
        def forward(self, x):
            w = self.weight.clone()
            w[: self.out_features // 2, self.in_features // 2:] = 0
            return torch.nn.functional.linear(x, w, self.bias)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 16), BlockDiagonal(16, 16), torch.nn.Linear(16, 4))

    offloaded = make()
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded[1].weight.device.type == "meta"
    assert "something other than" in linear_forward_problem(offloaded[1])
    assert offloaded[1].weight.device.type == "meta"  # offloaded again, as after a forward
    assert linear_forward_problem(offloaded[0]) is None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = mol.inject(make(), mol.LoRAConfig(rank=2))
        mol.inject(offloaded, mol.LoRAConfig(rank=2))
    adapted = [n for n, m in trained.named_modules() if isinstance(m, MoLLinear)]
    # an adapter on its output only needs the output's shape, which both forms give: adapted on both alike
    assert adapted == [n for n, m in offloaded.named_modules() if isinstance(m, MoLLinear)] == ["0", "1", "2"]


def test_a_qat_fake_quantized_linear_is_adapted_but_not_nf4_quantized():
    """torchao's QAT FakeQuantizedLinear subclasses nn.Linear and fake-quantizes its weight in forward, so its
    values differ from x @ W.T; LoRA on it (QAT + LoRA) is a standard recipe, and PEFT's all-linear adapts it. The
    check that kept tuple-returning routers out of "all-linear" (which compares values) refused it too. Adapters now
    ask only for one output tensor of the linear's shape; mol.quantize, whose NF4Linear would drop the fake
    quantization, still keeps such a layer in full precision."""
    from mol.layers import linear_forward_problem

    class FakeQuantized(torch.nn.Linear):
        def forward(self, x):
            scale = self.weight.detach().abs().amax() / 7
            w = self.weight + ((self.weight / scale).round() * scale - self.weight).detach()  # straight-through
            return torch.nn.functional.linear(x, w, self.bias)

    torch.manual_seed(0)
    base = torch.nn.Sequential(FakeQuantized(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert "something other than" in linear_forward_problem(base[0])
    assert linear_forward_problem(base[0], compare_values=False) is None
    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "leaves out" warning
        model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["0"]))
    layer = model[0]
    assert isinstance(layer, MoLLinear)
    torch.nn.init.normal_(layer.lora_B)
    delta = x @ layer.lora_A[0].T @ layer.lora_B[0].T * layer.scaling
    torch.testing.assert_close(model(x), base[2](torch.relu(base[0](x) + delta)))
    quantized = mol.quantize(copy.deepcopy(base), "nf4", skip=[])
    assert type(quantized[0]) is FakeQuantized
