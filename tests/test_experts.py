"""LoRA on the fused expert tensors of transformers 5's mixture-of-experts layers (mol.experts.ExpertsLoRA,
``LoRAConfig(target_parameters=[...])``).

Reference: a float64 loop over every (token, k) pair written here from the formula in mol/experts.py's docstring,
with each family's gate, activation and norm written out again from transformers' modeling code (not read off the
module): ``up = W_up[e] x + scaling B_up[e] A_up[e] x``, the gate, ``down = W_down[e] mid + scaling B_down[e]
A_down[e] mid``, the post-expert norm, then the routing-weighted sum over the token's k pairs. The families cover
every flag the grouped forward reads: Qwen3-MoE and Mixtral (gate_up_proj, (E, out, in)), GPT-OSS (transposed
(E, in, out) tensors, biases, interleaved gate/up with a clamped SwiGLU, its own argument names), Nemotron-H (no gate:
up_proj and relu^2) and Muse Spark (a norm after each expert).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as T
from torch import nn
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import mol
import mol.experts
from mol.experts import ExpertsLoRA

# hidden, intermediate, experts: rows of 8 / 16 / 24 values are 16-byte aligned in bf16 too, and no expert tensor is
# square (a transpose mixed up fails)
H, I, E = 24, 8, 4
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 0.6  # a low limit, so that the clamps of GPT-OSS's gate do act
NORM_EPS = 1e-5


# -- the reference, written from the formula -------------------------------------------------------------------------

def _silu_glu(h):
    """Mixtral / Qwen3-MoE / Muse Spark: the first half of gate_up_proj's output is the gate, the second the up."""
    gate, up = h[: h.shape[0] // 2], h[h.shape[0] // 2:]
    return gate * torch.sigmoid(gate) * up


def _gpt_oss_glu(h):
    """GPT-OSS: gate and up interleaved (even / odd outputs), clamped, ``(up + 1) * gate * sigmoid(alpha gate)``."""
    gate, up = h[0::2].clamp(max=GPT_OSS_LIMIT), h[1::2].clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
    return (up + 1) * gate * torch.sigmoid(gate * GPT_OSS_ALPHA)


def _relu2(h):
    """Nemotron-H: no gate, relu(up)^2."""
    return torch.relu(h) ** 2


def _input_scaled_rms_norm(v, weight):
    """Muse Spark's post-expert norm: scale by (1 + weight) first, then RMS-normalize."""
    v = v * (1 + weight)
    return v / torch.sqrt(v.pow(2).mean() + NORM_EPS)


FAMILIES = {
    # make, the up tensor's name, stored (E, in, out), biases, gate or activation, post-expert norm
    "qwen3_moe": (lambda: Qwen3MoeExperts(T.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)),
                  "gate_up_proj", False, False, _silu_glu, False),
    "mixtral": (lambda: MixtralExperts(T.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)),
                "gate_up_proj", False, False, _silu_glu, False),
    "gpt_oss": (lambda: GptOssExperts(T.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                                     swiglu_limit=GPT_OSS_LIMIT)),
                "gate_up_proj", True, True, _gpt_oss_glu, False),
    "nemotron_h": (lambda: NemotronHExperts(T.NemotronHConfig(hidden_size=H, moe_intermediate_size=I,
                                                              n_routed_experts=E)),
                   "up_proj", False, False, _relu2, False),
    "muse_spark": (lambda: MuseSparkExperts(T.MuseSparkTextConfig(moe_hidden_size=H, moe_intermediate_size=I,
                                                                  num_local_experts=E, post_norm_eps=NORM_EPS)),
                   "gate_up_proj", False, False, _silu_glu, True),
}


def reference(family, base, lora, x, index, weights, scaling):
    """float64 loop over every (token t, k) pair: the formula of mol/experts.py's docstring. ``base``: the experts
    module's tensors by name; ``lora``: name -> (A (E, r, in), B (E, out, r)); ``scaling``: name -> float."""
    _, up_name, transposed, _, gate, norm = FAMILIES[family]

    def project(name, e, v):
        w = base[name][e]
        out = v @ w if transposed else w @ v                  # (E, in, out) stored, or (E, out, in)
        if f"{name}_bias" in base:
            out = out + base[f"{name}_bias"][e]
        if name in lora:
            a, b = lora[name]
            out = out + scaling[name] * (b[e] @ (a[e] @ v))
        return out

    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(index.shape[1]):
            e = int(index[t, j])
            down = project("down_proj", e, gate(project(up_name, e, x[t])))
            if norm:
                down = _input_scaled_rms_norm(down, base["post_expert_norm.weight"])
            y = y + weights[t, j] * down
        rows.append(y)
    return torch.stack(rows)


# -- helpers -----------------------------------------------------------------------------------------------------------

def _experts(family, dtype=torch.float32):
    """The family's experts module with random weights (biases and norm weight too), in ``dtype``."""
    module = FAMILIES[family][0]()
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[1] if p.dim() == 3 and FAMILIES[family][2] else p.shape[-1]
            p.normal_(0.0, 1.0 / math.sqrt(fan_in) if p.dim() == 3 else 0.3)
    return module.to(dtype)


def _layer(family, dtype=torch.float32, rank=None, alpha=None, **kw):
    """ExpertsLoRA on both of the family's tensors, ranks 3 and 5 (no multiple of 8: the grouped GEMMs pad them),
    alphas 6 and 2.5, random B."""
    up = FAMILIES[family][1]
    rank = rank or {up: 3, "down_proj": 5}
    alpha = alpha or {up: 6.0, "down_proj": 2.5}
    layer = ExpertsLoRA(_experts(family, dtype), [up, "down_proj"], rank=rank, alpha=alpha, **kw)
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.normal_(0.0, 0.5)
    return layer


def _routing(tokens, k, case="random"):
    """(top_k_index, top_k_weights) as a router gives them: k distinct experts per token, positive weights.
    'empty': one expert no token chose; 'one_expert': every token on expert 2 (k must be 1)."""
    if case == "one_expert":
        index = torch.full((tokens, k), 2, dtype=torch.long)
    else:
        scores = torch.rand(tokens, E)
        if case == "empty":
            scores[:, torch.randint(0, E, ()).item()] = -1.0
        index = scores.topk(k, dim=-1).indices
    return index, torch.rand(tokens, k) + 0.1


def _reference_of(layer, family, x, index, weights, use_rslora=False):
    """The reference's output for ``layer``'s own tensors, as float64 leaves (their .grad to compare), and those
    leaves: (y, x, weights, {name: (A, B)})."""
    base = {n: p.detach().double() for n, p in layer.base_layer.named_parameters()}
    lora = {n: (layer.lora_A[n].detach().double().requires_grad_(), layer.lora_B[n].detach().double().requires_grad_())
            for n in layer.lora_A}
    scaling = {n: layer.alpha[n] / (math.sqrt(a.shape[1]) if use_rslora else a.shape[1]) for n, (a, _) in lora.items()}
    x64 = x.detach().double().requires_grad_()
    w64 = weights.detach().double().requires_grad_()
    return reference(family, base, lora, x64, index, w64, scaling), x64, w64, lora


def _assert_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def _check_against_reference(layer, family, x, index, weights, tol, use_rslora=False):
    """Forward and every gradient (x, the routing weights, each lora_A / lora_B) against the float64 reference,
    for a random upstream gradient."""
    xx = x.detach().clone().requires_grad_()
    ww = weights.detach().clone().requires_grad_()
    layer.zero_grad()
    y = layer(xx, index, ww)
    ref, x64, w64, lora = _reference_of(layer, family, x, index, weights, use_rslora)
    assert y.dtype == x.dtype and y.shape == x.shape
    _assert_close(y, ref, tol, "output")
    g = torch.randn_like(ref)
    (y * g.to(y.dtype)).sum().backward()
    (ref * g).sum().backward()
    _assert_close(xx.grad, x64.grad, tol, "grad x")
    _assert_close(ww.grad, w64.grad, tol, "grad routing weights")
    for name, (a, b) in lora.items():
        _assert_close(layer.lora_A[name].grad, a.grad, tol, f"grad lora_A[{name}]")
        _assert_close(layer.lora_B[name].grad, b.grad, tol, f"grad lora_B[{name}]")
    assert all(p.grad is None for p in layer.base_layer.parameters()), "the base tensors must stay frozen"
    return y


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts the calls of torch's grouped GEMM made through mol.experts."""
    calls = []
    real = mol.experts._GROUPED_MM

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)
    monkeypatch.setattr(mol.experts, "_GROUPED_MM", counting)
    return calls


# -- 1. the forward and its gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["random", "empty", "one_expert", "one_token"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_and_gradients_match_the_float64_loop(family, case, dtype, grouped_calls):
    """Every family's forward, and the gradients of x, of the routing weights and of each expert's A and B, equal the
    float64 per-(token, k) loop: for random routing, with an expert no token chose (its A and B get zero gradient),
    with every token on one expert, and for one token. Ranks 3 and 5 (zero-padded to 8 for the grouped GEMM) and
    alphas differ per tensor. float32 runs torch's grouped GEMM (counted: six per forward; two, the base's, for one
    token, whose 2 pairs take each pair's gathered factors), float64 the per-expert loop (no grouped GEMM for it)."""
    layer = _layer(family, dtype)
    tokens, k = {"one_token": (1, 2), "one_expert": (7, 1)}.get(case, (9, 2))
    index, weights = _routing(tokens, k, "one_expert" if case == "one_expert" else case)
    x = torch.randn(tokens, H, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    if family == "muse_spark" and dtype == torch.float64:
        tol = 1e-6  # its post-expert norm computes in float32 whatever the input's dtype (x.float())
    _check_against_reference(layer, family, x, index, weights.to(dtype), tol)
    # fewer pairs than experts (one token): the LoRA factors are gathered per pair, only the base is grouped
    calls = 2 if tokens * k < E else 6
    assert grouped_calls == ([dtype] * calls if dtype == torch.float32 else []), "not the path expected"
    unused = sorted(set(range(E)) - set(index.flatten().tolist()))
    if case in ("empty", "one_expert"):
        assert unused
    for name in layer.lora_A:  # an expert no token chose learns nothing (and its gradient is no garbage)
        assert torch.equal(layer.lora_A[name].grad[unused], torch.zeros_like(layer.lora_A[name].grad[unused]))
        assert torch.equal(layer.lora_B[name].grad[unused], torch.zeros_like(layer.lora_B[name].grad[unused]))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_a_fresh_adapter_is_laid_out_and_initialized_as_peft_does(family, init):
    """Each tensor gets A (experts, rank, in) and B (experts, out, rank), read off the stored layout ((E, in, out) for
    GPT-OSS); B starts at zero, A at PEFT's init: uniform(+-1/sqrt(in)) ('kaiming', its spread matching) or
    normal(0, 1/rank) ('gaussian'); the base tensors are frozen, the adapter's trainable."""
    up = FAMILIES[family][1]
    base = _experts(family)
    layer = ExpertsLoRA(base, [up, "down_proj"], rank={up: 5, "down_proj": 12}, init=init)
    up_out = I if family == "nemotron_h" else 2 * I
    shapes = {up: ((E, 5, H), (E, up_out, 5)), "down_proj": ((E, 12, I), (E, H, 12))}
    for name, (a_shape, b_shape) in shapes.items():
        a, b = layer.lora_A[name], layer.lora_B[name]
        assert (tuple(a.shape), tuple(b.shape)) == (a_shape, b_shape), name
        assert a.requires_grad and b.requires_grad and a.dtype == b.dtype == torch.float32
        assert torch.equal(b, torch.zeros_like(b))
        if init == "kaiming":
            bound = 1 / math.sqrt(a_shape[-1])
            assert a.abs().max() <= bound and a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
        else:
            assert a.std().item() == pytest.approx(1 / layer.rank[name], rel=0.2)
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_the_experts_module_argument_names_are_taken(family):
    """The layer is called as the experts module is: positionally, as the MoE blocks call it, or by the module's own
    argument names (GPT-OSS: router_indices / routing_weights; the others: top_k_index / top_k_weights), in any
    order; every way gives the reference's output."""
    layer = _layer(family, torch.float64)
    index, weights = _routing(6, 2)
    x = torch.randn(6, H, dtype=torch.float64)
    ref = _reference_of(layer, family, x, index, weights.double())[0]
    names = ("router_indices", "routing_weights") if family == "gpt_oss" else ("top_k_index", "top_k_weights")
    calls = [layer(x, index, weights.double()), layer(x, **{names[0]: index, names[1]: weights.double()}),
             layer(**{names[1]: weights.double(), "hidden_states": x, names[0]: index})]
    for y in calls:
        _assert_close(y, ref.detach(), 1e-12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_inject_takes_rank_pattern_alpha_pattern_and_rslora(use_rslora):
    """LoRAConfig(target_parameters=...) on a Qwen3-MoE model in eval mode: rank_pattern / alpha_pattern give each
    tensor its own rank and alpha (matched on the tensor's name), use_rslora scales by alpha / sqrt(rank), dropout
    and init reach the layer (which starts in eval mode, as the model is), and the wrapped layer computes the
    reference with that scaling."""
    model = _qwen3_moe()
    cfg = mol.LoRAConfig(rank=4, alpha=8, target_modules=[], use_rslora=use_rslora, dropout=0.25, init="gaussian",
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                         rank_pattern={"layers.0.mlp.experts.down_proj": 3}, alpha_pattern={"gate_up_proj": 5})
    mol.inject(model, cfg)
    layers = [m for m in model.modules() if isinstance(m, ExpertsLoRA)]
    assert len(layers) == 2
    first = model.model.layers[0].mlp.experts
    assert dict(first.rank) == {"gate_up_proj": 4, "down_proj": 3}
    assert dict(model.model.layers[1].mlp.experts.rank) == {"gate_up_proj": 4, "down_proj": 4}
    assert first.lora_A["down_proj"].shape == (4, 3, 8) and first.lora_B["down_proj"].shape == (4, 32, 3)
    assert first.lora_A["gate_up_proj"].shape == (4, 4, 32) and first.lora_B["gate_up_proj"].shape == (4, 16, 4)
    assert isinstance(first.dropout, nn.Dropout) and first.dropout.p == 0.25 and not first.training
    assert first.lora_A["gate_up_proj"].std().item() == pytest.approx(1 / 4, rel=0.2)  # init='gaussian': N(0, 1/r)
    expected = {"gate_up_proj": 5 / (2.0 if use_rslora else 4), "down_proj": 8 / (math.sqrt(3) if use_rslora else 3)}
    assert first.scaling == pytest.approx(expected, rel=1e-12)
    with torch.no_grad():
        for b in first.lora_B.values():
            b.normal_(0.0, 0.5)
    first.double()
    index, weights = _routing(8, 2)
    x = torch.randn(8, 32, dtype=torch.float64)
    _check_against_reference(first, "qwen3_moe", x, index, weights.double(), 1e-10, use_rslora=use_rslora)


# -- 2. the grouped GEMM and the loop ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_grouped_gemm_and_loop_compute_the_same(family, monkeypatch, grouped_calls):
    """The grouped-GEMM path and the per-expert loop (forced by making grouped_mm_runs say no) give the same output
    and gradients in float32, with an empty expert; a shape whose rows are not 16-byte aligned (hidden 10) takes the
    loop by itself."""
    layer = _layer(family)
    index, weights = _routing(11, 2, "empty")
    x = torch.randn(11, H)

    def run():
        layer.zero_grad()
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = layer(xx, index, ww)
        (y * g).sum().backward()
        return [y, xx.grad, ww.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]

    g = torch.randn(11, H)
    grouped = run()
    assert len(grouped_calls) == 6
    monkeypatch.setattr(mol.experts, "grouped_mm_runs", lambda *_: False)
    loop = run()
    assert len(grouped_calls) == 6, "the loop ran a grouped GEMM"
    for a, b in zip(grouped, loop, strict=True):
        _assert_close(a, b, 1e-5)
    monkeypatch.undo()
    assert not mol.experts.grouped_mm_runs(torch.randn(5, 10), torch.randn(E, 10, 8))
    assert mol.experts.grouped_mm_runs(torch.randn(5, 16), torch.randn(E, 16, 8))


# -- 3. a fresh adapter changes nothing --------------------------------------------------------------------------------

_DECODER = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def _qwen3_moe(dtype=torch.float32):
    torch.manual_seed(0)
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**_DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=8)).to(dtype).eval()


def _mixtral(dtype=torch.float32):
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2))
    return model.to(dtype).eval()


def _gpt_oss(dtype=torch.float32):
    torch.manual_seed(0)
    model = T.GptOssForCausalLM(T.GptOssConfig(**{**_DECODER, "intermediate_size": 16}, head_dim=8,
                                               num_local_experts=4, num_experts_per_tok=2)).to(dtype).eval()
    with torch.no_grad():  # GPT-OSS initializes its router and biases to zero: make them route and matter
        for name, p in model.named_parameters():
            if "router" in name or "bias" in name:
                p.normal_(0.0, 0.5)
    return model


MODELS = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "gpt_oss": _gpt_oss}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _ids():
    return torch.randint(1, 101, (2, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", list(MODELS))
def test_a_fresh_adapter_leaves_the_logits_bit_identical(model, dtype):
    """A fresh adapter (B = 0) on the experts of a whole model, which runs transformers' default grouped_mm experts
    forward, gives the base model's logits to the bit, in float32 and in bfloat16 (where Mixtral's router hands
    float32 routing weights to bf16 experts: the weighted sum must be taken in float32, as transformers takes it)."""
    base = MODELS[model](dtype)
    assert base.config._experts_implementation == "grouped_mm"
    adapted = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=[], target_parameters=EXPERTS))
    assert sum(isinstance(m, ExpertsLoRA) for m in adapted.modules()) == 2
    ids = _ids()
    with torch.no_grad():
        expected, got = base(ids).logits, adapted(ids).logits
    assert got.dtype == dtype and torch.equal(got, expected)


# -- 4. training, merging, saving --------------------------------------------------------------------------------------

def _randomize_b(model, std=0.3):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ExpertsLoRA):
                for b in layer.lora_B.values():
                    b.normal_(0.0, std)
    return model


def test_dropout_acts_in_train_mode_only():
    """dropout=0.5 drops the adapter's input in train mode only: in eval the layer computes what a dropout-free twin
    does, to the bit; in train mode two forwards differ, the base path is untouched (with B = 0 train mode equals eval
    exactly), and with only down_proj adapted (the output linear in the dropped input) the mean of many train-mode
    forwards is the eval output, within 6 standard errors."""
    layer = _layer("qwen3_moe", torch.float64, dropout=0.5)
    twin = copy.deepcopy(layer)
    twin.dropout = nn.Identity()
    index, weights = _routing(6, 2)
    x = torch.randn(6, H, dtype=torch.float64)
    weights = weights.double()
    layer.eval()
    expected = twin(x, index, weights)
    assert torch.equal(layer(x, index, weights), expected)
    layer.train()
    first, second = layer(x, index, weights), layer(x, index, weights)
    assert not torch.allclose(first, expected) and not torch.allclose(first, second)
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        for b in fresh.lora_B.values():
            b.zero_()
    assert torch.equal(fresh.train()(x, index, weights), fresh.eval()(x, index, weights))

    down_only = ExpertsLoRA(copy.deepcopy(layer.base_layer), ["down_proj"], rank=3, alpha=6.0, dropout=0.5)
    with torch.no_grad():
        down_only.lora_B["down_proj"].normal_(0.0, 0.5)
    expected = down_only.eval()(x, index, weights)
    down_only.train()
    with torch.no_grad():
        samples = torch.stack([down_only(x, index, weights) for _ in range(400)])
    assert (samples.std(0) > 0).all()
    z = (samples.mean(0) - expected).abs() / (samples.std(0) / math.sqrt(len(samples)))
    assert z.max() < 6, f"the train-mode mean is {z.max():.1f} standard errors from the eval output"


@pytest.mark.parametrize("model", ["qwen3_moe", "gpt_oss"])
def test_merge_unmerge_unload_and_disable_adapters(model):
    """With a trained adapter (random B) on a float32 model: disable_adapters gives the base model's logits exactly;
    merge folds every expert's scaling * B A into its slice of the base tensor (GPT-OSS: transposed) and gives the
    adapter's logits; unmerge restores the base tensors and the adapter's logits; merge_and_unload leaves the plain
    model (its own experts class and tensor names) with the adapter's logits; unload leaves the base model's state
    and logits exactly."""
    base = MODELS[model]()  # float32: transformers' grouped experts forward, which the base runs, takes no float64
    adapted = _randomize_b(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=3, alpha=5, target_modules=[],
                                                                            target_parameters=EXPERTS)))
    ids = _ids()
    with torch.no_grad():
        base_logits, logits = base(ids).logits, adapted(ids).logits
        assert (logits - base_logits).abs().max() > 1e-3, "the adapter must change the logits"
        with mol.disable_adapters(adapted):
            assert torch.equal(adapted(ids).logits, base_logits)
        never_merged = copy.deepcopy(adapted)
        layers = [m for m in adapted.modules() if isinstance(m, ExpertsLoRA)]
        original = [layer.base_layer.gate_up_proj.clone() for layer in layers]
        mol.merge(adapted)
        assert all(layer.merged for layer in layers)
        assert not any(torch.equal(o, layer.base_layer.gate_up_proj) for o, layer in zip(original, layers))
        _assert_close(adapted(ids).logits, logits, 1e-5, "merged")
        mol.unmerge(adapted)
        assert not any(layer.merged for layer in layers)
        for o, layer in zip(original, layers):
            _assert_close(layer.base_layer.gate_up_proj, o, 1e-6, "unmerged tensor")
        _assert_close(adapted(ids).logits, logits, 1e-5, "unmerged")

        merged = mol.merge_and_unload(copy.deepcopy(adapted))
        assert not any(isinstance(m, ExpertsLoRA) for m in merged.modules())
        assert type(merged.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
        assert list(merged.state_dict()) == list(base.state_dict())
        _assert_close(merged(ids).logits, logits, 1e-5, "merge_and_unload")

        unloaded = mol.unload(never_merged)
        assert list(unloaded.state_dict()) == list(base.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(unloaded.state_dict().values(), base.state_dict().values()))
        assert torch.equal(unloaded(ids).logits, base_logits)


def test_save_and_load_adapter_round_trip(tmp_path):
    """save_adapter then load_adapter into a fresh copy of the base model (injecting from the saved config, per-tensor
    ranks included) gives back every A and B and the logits to the bit."""
    base = _qwen3_moe()
    cfg = mol.LoRAConfig(rank=4, target_modules=["q_proj"], target_parameters=EXPERTS,
                         rank_pattern={"down_proj": 3})
    adapted = _randomize_b(mol.inject(copy.deepcopy(base), cfg))
    mol.save_adapter(adapted, tmp_path)
    loaded = mol.load_adapter(copy.deepcopy(base), tmp_path)
    want = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    got = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert list(got) == list(want) and any(".experts.lora_A.down_proj" in n for n in got)
    assert loaded.model.layers[1].mlp.experts.lora_A["down_proj"].shape[1] == 3
    assert all(torch.equal(got[n], want[n]) for n in want)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, adapted(ids).logits)


def test_float32_adapters_on_a_bf16_base(grouped_calls):
    """On a bf16 model the adapters are float32 by default (adapter_dtype), the base tensors stay bf16: the forward
    runs in bf16 through torch's grouped GEMM (bf16 on the CPU), the backward gives float32 gradients, and the layer
    agrees with the float64 reference to bf16's precision; adapter_dtype='bfloat16' makes bf16 adapters."""
    model = mol.inject(_qwen3_moe(torch.bfloat16), mol.LoRAConfig(rank=3, target_modules=[],
                                                                   target_parameters=EXPERTS))
    layer = model.model.layers[0].mlp.experts
    assert {p.dtype for p in layer.lora_A.values()} | {p.dtype for p in layer.lora_B.values()} == {torch.float32}
    assert layer.base_layer.gate_up_proj.dtype == layer.base_layer.down_proj.dtype == torch.bfloat16
    _randomize_b(model)
    out = model(_ids(), labels=_ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.lora_A["gate_up_proj"].grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.lora_B.values())
    assert grouped_calls and set(grouped_calls) == {torch.bfloat16}

    index, weights = _routing(9, 2)
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    _check_against_reference(layer, "qwen3_moe", x, index, weights.to(torch.bfloat16), 3e-2)
    bf16 = mol.inject(_qwen3_moe(torch.bfloat16), mol.LoRAConfig(rank=3, target_modules=[], adapter_dtype="bfloat16",
                                                                  target_parameters=EXPERTS))
    assert bf16.model.layers[0].mlp.experts.lora_B["down_proj"].dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_float32_experts_compute_in_the_autocast_dtype(family, grouped_calls):
    """Under autocast (mol.train's bf16-mixed on a float32 model) float32 expert tensors compute in bf16, as
    nn.Linear's matmuls do: every grouped GEMM gets bf16 operands (on a GPU: torch's bf16 grouped GEMM, not the
    per-expert loop and its host syncs). The output is the layer's own on bf16 copies of its tensors, within the
    final rounding, and the float32 adapters get float32 gradients near the float64 reference's."""
    layer = _layer(family)
    index, weights = _routing(9, 2)
    x = torch.randn(9, H)
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xx, index, weights)
    assert grouped_calls and set(grouped_calls) == {torch.bfloat16}
    assert y.dtype == torch.float32 and layer.base_layer.down_proj.dtype == torch.float32
    bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.no_grad():
        _assert_close(y, bf16(x.to(torch.bfloat16), index, weights), 1e-2, "autocast against bf16 tensors")
    ref, x64, _, lora = _reference_of(layer, family, x, index, weights)
    _assert_close(y, ref, 3e-2, "autocast against float64")
    g = torch.randn_like(ref)
    (y * g.float()).sum().backward()
    (ref * g).sum().backward()
    for name, (a, b) in lora.items():
        assert layer.lora_A[name].grad.dtype == layer.lora_B[name].grad.dtype == torch.float32
        _assert_close(layer.lora_B[name].grad, b.grad, 5e-2, f"grad lora_B[{name}]")
    _assert_close(xx.grad, x64.grad, 5e-2, "grad x")


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """transformers' gradient checkpointing (model.gradient_checkpointing_enable(), reentrant or not) recomputes the
    experts in the backward: every adapter gradient equals the one without checkpointing."""
    def grads(checkpointing):
        torch.manual_seed(1)
        model = _randomize_b(mol.inject(_qwen3_moe(), mol.LoRAConfig(rank=3, target_modules=["q_proj"],
                                                                     target_parameters=EXPERTS)))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ids = _ids()
    plain, checkpointed = grads(False), grads(True)
    assert list(plain) == list(checkpointed) and any("experts.lora_A" in n for n in plain)
    for name, g in plain.items():
        assert g is not None and checkpointed[name] is not None, name
        _assert_close(checkpointed[name], g, 1e-6, name)


# -- 5. errors -----------------------------------------------------------------------------------------------------

def _state(model):
    """What a failed inject must leave as it was: every module's name and type, every parameter and its flag."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


class _CustomExperts(nn.Module):
    """An experts module of one's own: 3-D tensors, but none of the flags transformers' decorator sets."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 24, 16))
        self.down_proj = nn.Parameter(torch.randn(4, 16, 12))


class _CustomMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.experts = _CustomExperts()


@pytest.mark.parametrize("case, match", [
    ("no_such_tensor", r"target_parameters \['experts\.nope'\] matched no tensor of Qwen3MoeForCausalLM; expert "
                       r"tensors on offer: \['experts\.down_proj', 'experts\.gate_up_proj'\]"),
    ("router", r"selected model\.layers\.0\.mlp\.gate\.weight, a \(4, 32\) tensor of Qwen3MoeTopKRouter: mol puts "
               r"LoRA on the 3-D expert tensors .* narrow target_parameters"),
    ("string", r"must be a list of tensor names, got the string 'experts\.gate_up_proj'; use "
               r"target_parameters=\['experts\.gate_up_proj'\]"),
    ("nothing", r"target_modules is empty and so is target_parameters: give the layers to adapt .* or the expert "
                r"tensors \(target_parameters="),
    ("no_linear", r"nope"),
    ("dense", r"matched no tensor of LlamaForCausalLM; it holds no mixture-of-experts layer .* target_modules"),
    ("custom", r"selected experts\.gate_up_proj, but _CustomExperts lacks \['has_gate', 'has_bias', 'is_transposed', "
               r"'num_experts'\], the flags transformers' use_experts_implementation sets"),
    ("twice", r"target_parameters \['experts\.gate_up_proj'\] selects 'model\.layers\.0\.mlp\.experts\.base_layer\."
              r"gate_up_proj', an expert tensor that already carries an adapter \(an earlier inject's\)"),
    ("saved", r"target_parameters \['experts\.gate_up_proj'\] select only tensors of modules_to_save \['mlp'\] "
              r"\(e\.g\. 'model\.layers\.0\.mlp\.experts\.gate_up_proj'\), which train whole and take no LoRA"),
    # a typo beside it was said to select tensors of modules_to_save too
    ("saved_and_typo", r"target_parameters \['experts\.gate_up_proj'\] select only tensors of modules_to_save "
                       r"\['mlp'\]"),
])
def test_errors_name_the_problem_and_leave_the_model_unchanged(case, match):
    """Each mistake raises a ValueError that names it and the fix, and the model is left as it was (modules,
    parameters, trainable flags): a tensor name that matches nothing (the expert tensors on offer are listed), the
    router's 2-D weight, a string for the list, no target at all, a target_modules entry that matches nothing beside
    valid target_parameters (the experts, wrapped first, are put back), a dense model, an experts module without
    transformers' flags, the same expert tensors injected twice, and expert tensors that modules_to_save covers
    (the model does hold them: not "it holds no mixture-of-experts layer")."""
    from conftest import make_tiny_llama

    model = _qwen3_moe()
    kw = dict(rank=4, target_modules=[], target_parameters=["experts.gate_up_proj"])
    if case == "no_such_tensor":
        kw["target_parameters"] = ["experts.nope"]
    elif case == "router":
        kw["target_parameters"] = ["mlp.gate.weight"]
    elif case == "string":
        kw["target_parameters"] = "experts.gate_up_proj"
    elif case == "nothing":
        kw["target_parameters"] = []
    elif case == "no_linear":
        kw["target_modules"] = ["nope"]
    elif case == "dense":
        model = make_tiny_llama()
    elif case == "custom":
        model = _CustomMoE()
    elif case == "saved":
        kw["modules_to_save"] = ["mlp"]
    elif case == "saved_and_typo":
        kw.update(modules_to_save=["mlp"], target_parameters=["experts.gate_up_proj", "experts.nope"])
    elif case == "twice":
        mol.inject(model, mol.LoRAConfig(rank=4, target_modules=[], target_parameters=EXPERTS))
        kw["rank"] = 2
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        mol.inject(model, mol.LoRAConfig(**kw))
    assert _state(model) == before


# -- 6. torch.compile and host syncs -----------------------------------------------------------------------------------

def _compile_inputs(dtype):
    layer = _layer("qwen3_moe", dtype)
    index, weights = _routing(10, 2, "empty")
    return layer, torch.randn(10, H, dtype=dtype), index, weights.to(dtype)


def _run(layer, x, index, weights, g):
    layer.zero_grad()
    xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = layer(xx, index, ww)
    (y * g).sum().backward()
    return [y, xx.grad, ww.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_bf16_through_the_grouped_gemm(backend, grouped_calls):
    """torch.compile(fullgraph=True) of the layer in bfloat16 (the dtype torch's grouped GEMM compiles for): traced as
    one graph through F.grouped_mm (dynamo cannot read data_ptr(), so the pointer check is left out when compiling),
    the output and every gradient equal eager's, to the bit when the graph runs op by op (aot_eager), to bf16's
    rounding when inductor fuses the elementwise ops."""
    torch._dynamo.reset()
    layer, x, index, weights = _compile_inputs(torch.bfloat16)
    g = torch.randn(10, H, dtype=torch.bfloat16)
    eager = _run(layer, x, index, weights, g)
    assert len(grouped_calls) == 6
    compiled = _run(torch.compile(layer, fullgraph=True, backend=backend), x, index, weights, g)
    assert len(grouped_calls) == 12, "traced through the grouped GEMM"
    for a, b in zip(compiled, eager, strict=True):
        if backend == "aot_eager":
            assert torch.equal(a, b)
        else:
            _assert_close(a, b, 2e-2)


def test_compile_float32_takes_the_loop(grouped_calls):
    """Under torch.compile float32 takes the per-expert loop, as transformers' grouped forward does: torch's meta
    function of grouped_mm, which tracing runs, refuses every dtype but bf16 (torch 2.13: 'Expected inputs of BF16
    type'). The loop reads the offsets on the host, so the graph breaks there (fullgraph=True cannot work in float32);
    compiled without fullgraph the layer gives eager's output and gradients."""
    torch._dynamo.reset()
    layer, x, index, weights = _compile_inputs(torch.float32)
    g = torch.randn(10, H)
    eager = _run(layer, x, index, weights, g)
    calls = len(grouped_calls)
    compiled = _run(torch.compile(layer, backend="aot_eager"), x, index, weights, g)
    assert len(grouped_calls) == calls
    for a, b in zip(compiled, eager, strict=True):
        _assert_close(a, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_sync_on_the_grouped_path(dtype, monkeypatch, grouped_calls):
    """Where grouped_mm_runs says yes, the forward and backward read nothing back to the host (a GPU would wait for
    it): Tensor.tolist / item / bool / nonzero / unique and torch.nonzero / unique are never called. The per-expert
    loop, forced, does read the offsets (so the check can fail)."""
    layer, x, index, weights = _compile_inputs(dtype)
    g = torch.randn(10, H, dtype=dtype)

    def sync(*_, **__):
        raise AssertionError("host sync")
    for owner, name in [(torch.Tensor, "tolist"), (torch.Tensor, "item"), (torch.Tensor, "__bool__"),
                        (torch.Tensor, "nonzero"), (torch.Tensor, "unique"), (torch, "nonzero"), (torch, "unique")]:
        monkeypatch.setattr(owner, name, sync)
    _run(layer, x, index, weights, g)
    assert len(grouped_calls) == 6
    monkeypatch.setattr(mol.experts, "grouped_mm_runs", lambda *_: False)
    with pytest.raises(AssertionError, match="host sync"):
        _run(layer, x, index, weights, g)
