"""Adapter dtype: on a 16-bit base, ``mol.inject`` makes float32 adapters by default, as PEFT's get_peft_model does,
because a bf16 weight cannot take an AdamW step much smaller than itself; the layer still computes in the base's
dtype, on every path."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import mol
from conftest import make_tiny_llama
from mol.layers import MoLLinear, adapter_dtype_for

TARGETS = ["q_proj", "v_proj", "down_proj"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MoLLinear)]


def test_inject_makes_float32_adapters_on_a_16_bit_base_as_peft_does():
    base = make_tiny_llama(dtype=torch.bfloat16)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS))
    peft_dtypes = {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    ours = mol.inject(copy.deepcopy(base), mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=TARGETS))
    layers = _layers(ours)
    assert peft_dtypes == {torch.float32}
    assert {t.dtype for m in layers for t in (m.lora_A, m.lora_B, m.router.weight)} == {torch.float32}
    assert {m.base_layer.weight.dtype for m in layers} == {torch.bfloat16}  # the frozen base is left as it was

    kept = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=TARGETS, adapter_dtype="base"))
    assert {t.dtype for m in _layers(kept) for t in (m.lora_A, m.lora_B)} == {torch.bfloat16}
    fp32_base = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=4, target_modules=TARGETS))
    assert {t.dtype for m in _layers(fp32_base) for t in (m.lora_A, m.lora_B)} == {torch.float32}
    forced = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=4, target_modules=TARGETS, adapter_dtype="bfloat16"))
    assert {t.dtype for m in _layers(forced) for t in (m.lora_A, m.lora_B)} == {torch.bfloat16}


def test_adapter_dtype_choices():
    assert adapter_dtype_for("auto", torch.float16) == torch.float32
    assert adapter_dtype_for("auto", torch.float64) == torch.float64
    assert adapter_dtype_for(None, torch.bfloat16) == adapter_dtype_for("base", torch.bfloat16) == torch.bfloat16
    assert adapter_dtype_for(torch.float16, torch.float32) == torch.float16
    with pytest.raises(ValueError, match="adapter_dtype='int8' is not a floating dtype"):
        adapter_dtype_for("int8", torch.float32)
    with pytest.raises(ValueError, match="MoLConfig.adapter_dtype='fp32' is unknown; choose one of"):
        mol.inject(make_tiny_llama(), mol.MoLConfig(adapter_dtype="fp32"))


def test_lora_with_float32_adapters_on_a_bf16_base_is_peft():
    """PEFT's default on a bf16 model (float32 adapters, input cast up, the sum rounded once): same logits and
    gradients to the last bit of float32 ops in the same order."""
    base = make_tiny_llama(dtype=torch.bfloat16)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=12, target_modules=TARGETS))
    peft_params = dict(peft_model.named_parameters())
    for name, layer in ours.named_modules():
        if isinstance(layer, MoLLinear):
            with torch.no_grad():
                layer.lora_A[0].copy_(peft_params[f"base_model.model.{name}.lora_A.default.weight"])
                layer.lora_B[0].copy_(peft_params[f"base_model.model.{name}.lora_B.default.weight"])
    ids = torch.randint(0, 101, (3, 9))
    out_p = peft_model(input_ids=ids, labels=ids)
    out_m = ours(input_ids=ids, labels=ids)
    assert torch.equal(out_m.logits, out_p.logits)
    out_p.loss.backward()
    out_m.loss.backward()
    for name, layer in ours.named_modules():
        if isinstance(layer, MoLLinear):
            assert torch.equal(layer.lora_A.grad[0], peft_params[f"base_model.model.{name}.lora_A.default.weight"].grad)
            assert torch.equal(layer.lora_B.grad[0], peft_params[f"base_model.model.{name}.lora_B.default.weight"].grad)


@pytest.mark.parametrize("adapter_dtype, moved_at_least, moved_at_most", [("auto", 0.99, 1.0), ("base", 0.0, 0.2)])
def test_small_adamw_steps_reach_float32_adapters(adapter_dtype, moved_at_least, moved_at_most):
    """Why "auto" upcasts: an AdamW step of lr 1e-5 is below half a bf16 ulp of lora_A's kaiming-initialised
    values (|a| up to 1/sqrt(in)), so in bf16 nearly every element stays where it was."""
    model = mol.inject(make_tiny_llama(hidden=64, dtype=torch.bfloat16),
                       mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=TARGETS, adapter_dtype=adapter_dtype))
    with torch.no_grad():
        for m in _layers(model):
            m.lora_B.normal_(0, 0.02)  # so that lora_A has a gradient
    params = [p for p in model.parameters() if p.requires_grad]
    before = [m.lora_A.detach().clone() for m in _layers(model)]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, 101, (2, 12))
    out = model(input_ids=ids, labels=ids)
    (out.loss + mol.aux_loss(model)).backward()
    opt.step()
    moved = torch.cat([(m.lora_A.detach() != b).flatten() for m, b in zip(_layers(model), before)]).float().mean()
    assert moved_at_least <= moved.item() <= moved_at_most


@pytest.mark.parametrize("tokens", [7, 40])  # the one-launch decode kernel, and the regular kernels
def test_triton_path_computes_in_the_base_dtype_with_float32_adapters(tokens):
    torch.manual_seed(tokens)
    base = torch.nn.Linear(48, 40, bias=True).to(torch.bfloat16).requires_grad_(False)
    ref = MoLLinear(base, num_experts=4, top_k=2, rank=8, alpha=16, adapter_dtype="auto", backend="torch")
    assert ref.lora_A.dtype == ref.lora_B.dtype == torch.float32
    with torch.no_grad():
        ref.lora_B.normal_(0, 0.1)
        ref.lora_A.copy_(ref.lora_A.bfloat16().float())  # values the bf16 kernels hold exactly
        ref.lora_B.copy_(ref.lora_B.bfloat16().float())
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    x = torch.randn(tokens, 48, dtype=torch.bfloat16)
    dy = torch.randn(tokens, 40, dtype=torch.bfloat16)
    outs, grads = [], []
    for layer in (ref, tri):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        torch.autograd.backward([y, layer.aux_loss()], [dy, torch.ones(())])
        outs.append(y)
        grads.append((xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad))
    assert outs[1].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads[1][1:])  # the float32 parameters get float32 gradients
    assert rel(outs[1], outs[0]) < 1e-2
    for g_tri, g_ref in zip(grads[1], grads[0]):
        assert rel(g_tri, g_ref) < 2e-2


def test_saved_adapter_keeps_its_dtype_and_old_configs_load(tmp_path):
    model = mol.inject(make_tiny_llama(dtype=torch.bfloat16), mol.LoRAConfig(rank=4, target_modules=TARGETS))
    with torch.no_grad():
        for m in _layers(model):
            m.lora_B.normal_(0, 0.1)
    mol.save_adapter(model, tmp_path)
    loaded = mol.load_adapter(make_tiny_llama(dtype=torch.bfloat16), tmp_path)
    for a, b in zip(_layers(model), _layers(loaded)):
        assert a.lora_B.dtype == b.lora_B.dtype == torch.float32 and torch.equal(a.lora_B, b.lora_B)
    # an adapter saved before adapter_dtype existed has no such field: it loads, with the default
    cfg_file = next(p for p in tmp_path.iterdir() if p.suffix == ".json")
    saved = json.loads(cfg_file.read_text())
    entries = saved if isinstance(saved, list) else saved.get("configs", [saved])
    assert any("adapter_dtype" in e for e in entries if isinstance(e, dict))
    for e in entries:
        if isinstance(e, dict):
            e.pop("adapter_dtype", None)
    cfg_file.write_text(json.dumps(saved))
    old = mol.load_adapter(make_tiny_llama(dtype=torch.bfloat16), tmp_path)
    assert torch.equal(_layers(old)[0].lora_B, _layers(model)[0].lora_B)


@pytest.mark.parametrize("fast_path", [True, False])  # eager launchers, and the custom ops torch.compile sees
@pytest.mark.parametrize("tokens", [5, 37])
def test_routed_kernels_take_float32_adapters_as_their_bf16_copies(tokens, fast_path, monkeypatch):
    """Adapters of another dtype are cast inside the autograd node (and inside any captured graph): the same
    outputs and dx as casting them before the call; their weight gradients come straight out of float32 GEMMs
    (no bf16 rounding, no cast after), so they agree with the bf16 path's to its rounding and carry more bits."""
    from mol.kernels import grouped_lora as gl
    from mol.kernels.routed_lora import routed_lora_linear

    monkeypatch.setattr(gl, "EAGER_FAST_PATH", fast_path)
    # every buffer the kernels fill starts as NaN: an element read but never written fails every run, where it
    # failed only when the allocator's leftovers held NaN bits (the dh padding that torch's CPU bf16 mm reads)
    monkeypatch.setattr(gl, "POISON", True)
    g = torch.Generator().manual_seed(tokens)
    E, r, n_in, n_out = 4, 8, 40, 24
    x = torch.randn(tokens, n_in, generator=g).bfloat16()
    W = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).bfloat16()
    A32 = (torch.randn(E, r, n_in, generator=g) / n_in**0.5).bfloat16().float()
    B32 = torch.randn(n_out, E, r, generator=g).bfloat16().float().permute(1, 0, 2)  # MoLLinear's layout
    Wr = torch.randn(E, n_in, generator=g)
    dy = torch.randn(tokens, n_out, generator=g).bfloat16()
    results = []
    for cast_before in (True, False):
        xi, A, B, wr = (t.clone().requires_grad_() for t in (x, A32, B32, Wr))
        a, b = (A.bfloat16(), B.bfloat16()) if cast_before else (A, B)
        y, aux, *_ = routed_lora_linear(xi, a, b, wr, "topk", 2, 1.5, weight=W, lb_coef=0.1, z_coef=0.01)
        torch.autograd.backward([y, aux], [dy, torch.ones(())])
        results.append((y, xi.grad, A.grad, B.grad, wr.grad))
        with torch.no_grad():  # the inference branch casts too
            results[-1] += (routed_lora_linear(x, a, b, Wr, "topk", 2, 1.5, weight=W)[0],)
    y, dx, dA, dB, dWr, y_inference = results[1]
    assert dA.dtype == dB.dtype == dWr.dtype == torch.float32
    for got, want in ((y, results[0][0]), (dx, results[0][1]), (y_inference, results[0][5])):
        assert torch.equal(got, want)
    for got, want in ((dA, results[0][2]), (dB, results[0][3]), (dWr, results[0][4])):
        if fast_path:  # eager: float32-output GEMMs, not a bf16 result cast up
            assert rel(got, want) < 1e-2 and not torch.equal(got, got.bfloat16().float())
        else:  # traced (the custom ops torch.compile sees): the bf16 GEMM, cast after, as every backend lowers it
            assert torch.equal(got, want)


@pytest.mark.parametrize("tokens", [5, 37])
def test_float32_lora_A_is_rounded_by_the_shrink_operand_kernel_as_torch_rounds_it(tokens):
    """Above the small-T kernel, the one-GEMM shrink reads a float32 lora_A as it is (no cast launch, no bf16 copy
    held until backward): its operand kernel rounds A to bf16 itself, to nearest even as torch's .to() does, so the
    layer's output and dx keep the bits of casting A first, also for float32 values bf16 cannot hold. (On the GPU
    the kernel asks for rtne; here conftest makes the interpreter's every float32 -> bf16 cast round so.)"""
    from mol.kernels import routed_lora as rl

    g = torch.Generator().manual_seed(100 + tokens)
    E, r, n_in, n_out = 4, 8, 40, 24
    x = torch.randn(tokens, n_in, generator=g).bfloat16()
    W = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).bfloat16()
    A32 = torch.randn(E, r, n_in, generator=g) / n_in**0.5  # full float32 mantissas: the rounding shows
    assert not torch.equal(A32, A32.bfloat16().float())
    B = torch.randn(n_out, E, r, generator=g).bfloat16().permute(1, 0, 2)
    Wr = torch.randn(E, n_in, generator=g)
    dy = torch.randn(tokens, n_out, generator=g).bfloat16()
    kept = rl._compute_dtype(A32, B, x, eager=True)[0]
    assert (kept is A32) == (tokens > rl.SMALL_T_MAX)  # small T: the one-launch kernel needs A in x's dtype
    if tokens > rl.SMALL_T_MAX:
        w_dx = rl.route_shrink_gemm(x, A32.reshape(E * r, n_in), Wr)[2]
        assert torch.equal(w_dx[:E * r], A32.reshape(E * r, n_in).bfloat16())
    results = []
    for a in (A32.bfloat16(), A32):
        xi = x.clone().requires_grad_()
        y, aux, *_ = rl.routed_lora_linear(xi, a, B, Wr, "topk", 2, 1.5, weight=W, lb_coef=0.1, z_coef=0.01)
        torch.autograd.backward([y, aux], [dy, torch.ones(())])
        results.append((y, xi.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("tokens", [1, 7])  # the small-T kernel's FMA (T=1) and dot forms
def test_small_t_kernel_rounds_float32_adapters_as_torch_rounds_them(tokens):
    """Without gradients (decode; graph_inference_tokens replays), the one-launch small-T forward reads float32
    lora_A and lora_B as they are and rounds them to bf16 as it loads them (no cast launches inside each replayed
    decode graph): y, the routing and aux keep the bits of casting first, also for float32 values bf16 cannot hold.
    With gradients the backward needs bf16 copies, so those calls still cast."""
    from mol.kernels import routed_lora as rl

    g = torch.Generator().manual_seed(200 + tokens)
    E, r, n_in, n_out = 4, 8, 40, 24
    x = torch.randn(tokens, n_in, generator=g).bfloat16()
    W = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).bfloat16()
    A32 = torch.randn(E, r, n_in, generator=g) / n_in**0.5
    B32 = torch.randn(n_out, E, r, generator=g).permute(1, 0, 2)  # MoLLinear's expert-interleaved layout
    assert not torch.equal(A32, A32.bfloat16().float()) and not torch.equal(B32, B32.bfloat16().float())
    Wr = torch.randn(E, n_in, generator=g)
    a, b = rl._compute_dtype(A32, B32, x, eager=True, grad=False)
    assert a is A32 and b is B32
    a, b = rl._compute_dtype(A32, B32, x, eager=True)  # with gradients
    assert a.dtype == b.dtype == torch.bfloat16
    with torch.no_grad():
        outs = [rl.routed_lora_linear(x, A, B, Wr, "topk", 2, 1.5, weight=W, lb_coef=0.1, z_coef=0.01)
                for A, B in ((A32.bfloat16(), B32.bfloat16()), (A32, B32))]
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("tokens", [5, 37])
def test_inference_reuses_the_cast_adapters_until_they_change(tokens):
    """Without gradients (generation, evaluation) the bf16 copies of float32 adapters are made once and reused, so a
    decode step does not cast every layer's adapters again; a change to the adapters (an optimizer step, a load)
    is seen at once, and a forward with gradients drops the copies."""
    import io

    torch.manual_seed(tokens)
    base = torch.nn.Linear(48, 40, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = MoLLinear(base, num_experts=4, top_k=2, rank=8, alpha=16, adapter_dtype="auto", backend="triton")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(tokens, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        y1 = layer(x)
        copies = layer.__dict__["_cast_adapters"]
        y2 = layer(x)
    assert layer.__dict__["_cast_adapters"] is copies and torch.equal(y1, y2)
    assert copies[1].dtype == copies[2].dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.equal(layer(x), y1)
    assert layer.__dict__["_cast_adapters"] is copies
    fresh = copy.deepcopy(layer)  # a copy carries no cache, and computes the same
    assert "_cast_adapters" not in fresh.__dict__
    buf = io.BytesIO()
    torch.save(layer, buf)
    assert "_cast_adapters" not in torch.load(io.BytesIO(buf.getvalue()), weights_only=False).__dict__
    with torch.no_grad():
        assert torch.equal(fresh(x), y1)
        layer.lora_B.add_(0.05)  # what an optimizer step does: in place
        fresh.lora_B.add_(0.05)
        y3 = layer(x)
        assert not torch.equal(y3, y1) and torch.equal(y3, copy.deepcopy(fresh)(x))
    y_grad = layer(x)  # with gradients: cast inside the autograd node, the copies dropped
    assert "_cast_adapters" not in layer.__dict__ and torch.equal(y_grad.detach(), y3)
    # an EMA swap writes through .data (no version bump) and then switches to eval(): the switch drops the copies
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.lora_B.data.copy_(torch.randn_like(layer.lora_B) * 0.1)
        fresh.lora_B.data.copy_(layer.lora_B.data)
        layer.eval()
        assert torch.equal(layer(x), copy.deepcopy(fresh)(x))


@pytest.mark.parametrize("make", [
    lambda dt: mol.IA3Config(adapter_dtype=dt),
    lambda dt: mol.PrefixTuningConfig(num_virtual_tokens=3, adapter_dtype=dt),
    lambda dt: mol.PromptTuningConfig(num_virtual_tokens=3, adapter_dtype=dt),
    lambda dt: mol.AdapterConfig(reduction_factor=4, adapter_dtype=dt)], ids=["ia3", "prefix", "prompt", "adapter"])
def test_every_method_trains_float32_tensors_on_a_bf16_model(make):
    """PEFT's get_peft_model makes IA3 vectors and prefix / prompt embeddings float32 on a bf16 model (checked here
    against PEFT itself where it has the method); every mol method does the same by default, and computes in bf16."""
    import peft

    base = make_tiny_llama(dtype=torch.bfloat16)
    cfg = make("auto")
    peft_cfg = {"IA3Config": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
                "PrefixTuningConfig": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                "PromptTuningConfig": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                }.get(type(cfg).__name__)
    if peft_cfg is not None:
        ref = get_peft_model(copy.deepcopy(base), peft_cfg())
        assert {p.dtype for p in ref.parameters() if p.requires_grad} == {torch.float32}
    model = mol.inject(copy.deepcopy(base), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and {p.dtype for p in params} == {torch.float32}
    ids = torch.randint(0, 101, (2, 6))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    kept = mol.inject(copy.deepcopy(base), make("base"))
    assert {p.dtype for p in kept.parameters() if p.requires_grad} == {torch.bfloat16}
