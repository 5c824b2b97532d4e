"""NF4 fused experts (mol.NF4Experts): mol.quantize turns a mixture-of-experts layer's 3-D expert tensors into NF4,
and LoRA on them (LoRAConfig(quantize_base="nf4", target_parameters=[...])) is QLoRA for MoE models.

Reference: the same transformers model holding the dequantized values as ordinary parameters, computed by
transformers' own experts forward; so the NF4 path must compute exactly what transformers computes with those
weights, forward and backward, and LoRA on it what LoRA on those weights computes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T
from torch import nn

import mol
from mol.quant import NF4Experts, dequantize_nf4_reference, quantize_nf4

VOCAB = 101
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0)
FAMILIES = {
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        **_DECODER, max_position_embeddings=64, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32)),
    # GPT-OSS: expert tensors stored (experts, in, out), biases, interleaved gate/up with its own clamp
    "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(
        **_DECODER, max_position_embeddings=131072, head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _base(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # from_config's init leaves fused expert tensors (and GPT-OSS's biases) as torch.empty
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.05)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Experts)]


def _dequantized_twin(base: nn.Module, quantized: nn.Module) -> nn.Module:
    """``base`` with every weight mol.quantize turned into NF4 replaced by its dequantized values: what an NF4 model
    must compute, by transformers' own code."""
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, NF4Experts):
                for tensor, held in m.nf4.items():
                    getattr(twin.get_submodule(name), tensor).copy_(held.dequantize())
            elif isinstance(m, mol.NF4Linear):
                twin.get_submodule(name).weight.copy_(m.dequantize())
    return twin


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_experts_compute_what_transformers_computes_with_their_values(family):
    base = _base(family)
    quantized = mol.quantize(copy.deepcopy(base), "nf4")
    held = _experts_modules(quantized)
    assert [n for n, _ in held] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    for name, m in held:
        original = base.get_submodule(name)
        assert list(m.nf4) == ["gate_up_proj", "down_proj"]
        for tensor, nf4 in m.nf4.items():
            w = getattr(original, tensor)
            # NF4 of the flattened tensor, as bitsandbytes lays out any weight (its levels and scales are checked
            # against torchao and bitsandbytes in test_nf4.py), within NF4's error of the original values
            assert torch.equal(nf4.dequantize(), dequantize_nf4_reference(quantize_nf4(w.detach().reshape(-1)))
                               .reshape(w.shape))
            assert ((nf4.dequantize() - w).norm() / w.norm()) < 0.12
            # 4-bit codes, an 8-bit scale per 64 values, a float32 scale per 256 scales and the offset: 4.127 bits
            # per value on a large tensor, as bitsandbytes'
            blocks = -(-w.numel() // 64)
            assert nf4.packed.storage_bits() == w.numel() * 4 + blocks * 8 + -(-blocks // 256) * 32 + 32
            assert tensor not in m.experts._parameters  # the 16-bit copy is gone
        assert all(p.dim() < 3 for p in m.parameters())
    twin = _dequantized_twin(base, quantized)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, twin(ids).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backward_through_nf4_experts_keeps_no_dense_expert_tensor(family):
    """dx through the NF4 experts equals transformers' with the dequantized weights, and the autograd graph saves
    no tensor of an expert tensor's size (the backward dequantizes again, as NF4Linear does)."""
    base = _base(family)
    quantized = mol.quantize(copy.deepcopy(base), "nf4", skip=["self_attn"])
    twin = _dequantized_twin(base, quantized)
    sizes = {held.packed.numel for _, m in _experts_modules(quantized) for held in m.nf4.values()}
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    grads, saved = [], []

    def keep(t):
        saved.append(t.numel())
        return t

    for model in (quantized, twin):
        layer = model.model.layers[0].mlp
        xg = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = layer(xg)
            y = out[0] if isinstance(out, tuple) else out  # GPT-OSS's MLP returns (hidden, router scores)
        y.backward(torch.ones_like(y))
        grads.append(xg.grad)
        if model is quantized:
            assert not sizes & set(saved), "a dense expert tensor was saved for the backward"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_qlora_on_nf4_experts_is_lora_on_their_dequantized_values(family, tmp_path):
    base = _base(family)
    config = mol.LoRAConfig(rank=4, alpha=8, quantize_base="nf4", target_modules=["q_proj"],
                            target_parameters=EXPERTS)
    qlora = mol.inject(copy.deepcopy(base), config)
    experts = qlora.model.layers[0].mlp.experts
    assert isinstance(experts, mol.ExpertsLoRA) and isinstance(experts.base_layer, NF4Experts)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    twin = _dequantized_twin(base, mol.quantize(copy.deepcopy(base), "nf4"))
    lora = mol.inject(twin, mol.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    lora.load_state_dict({k: v for k, v in qlora.state_dict().items() if "lora_" in k}, strict=False)
    ids = _ids()
    losses = []
    for model in (qlora, lora):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in lora.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)

    # saved and loaded again, the adapter computes the same on a fresh base (quantized by the load)
    qlora.eval()
    mol.save_adapter(qlora, tmp_path)
    again = mol.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, qlora(ids).logits)
    # unload leaves the 4-bit experts computing; merging into 4-bit codes is refused by name
    unloaded = mol.unload(copy.deepcopy(qlora))
    assert isinstance(unloaded.model.layers[0].mlp.experts, NF4Experts)
    with pytest.raises(ValueError, match="cannot merge"):
        mol.merge_and_unload(copy.deepcopy(qlora))
    with pytest.raises(RuntimeError, match=r"expert tensors are stored in NF4 \(QLoRA\)"):
        experts.merge()


def test_quantize_skips_experts_by_name_and_refuses_what_it_cannot_quantize():
    base = _base("qwen3_moe")
    kept = mol.quantize(copy.deepcopy(base), "nf4", skip=["experts"])
    assert not _experts_modules(kept) and isinstance(kept.model.layers[0].self_attn.q_proj, mol.NF4Linear)

    broken = copy.deepcopy(base)
    with torch.no_grad():
        broken.model.layers[1].mlp.experts.down_proj[0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in broken.state_dict().items()}
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts"):
        mol.quantize(broken, "nf4")
    # checked before any change: layer 0's experts (and the linears) are still as they were
    assert not _experts_modules(broken) and not any(isinstance(m, mol.NF4Linear) for m in broken.modules())
    after = broken.state_dict()
    assert all(torch.equal(after[k], v, ) or torch.isnan(v).any() for k, v in before.items())

    with pytest.raises(ValueError, match="bitsandbytes' 4-bit format has no entry for.*skip=\\['experts'\\]"):
        mol.bnb_4bit_state_dict(mol.quantize(copy.deepcopy(base), "nf4"))


def test_nf4_experts_move_devices_but_keep_their_quantization_state_dtype():
    quantized = mol.quantize(_base("gpt_oss"), "nf4")
    m = _experts_modules(quantized)[0][1]
    before = {n: (b.dtype, b.clone()) for n, b in m.named_buffers()}
    quantized.to(torch.bfloat16)
    for n, b in m.named_buffers():
        assert b.dtype == before[n][0] and torch.equal(b, before[n][1])
    assert m.experts.gate_up_proj_bias.dtype == torch.bfloat16  # the module's own float tensors follow the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = quantized(_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_a_decode_step_dequantizes_only_the_chosen_experts_and_computes_the_same(monkeypatch):
    """With fewer (token, expert) pairs than experts (decode: T * k rows), the NF4 experts dequantize the pairs' own
    expert slices instead of the whole tensor (on Qwen3-30B-A3B at T=1, 8 of 128 experts). Forward and dx equal the
    whole-tensor path's and transformers' on the dequantized values; the slices taken are the chosen experts'."""
    from mol.quant import experts as nf4_experts

    torch.manual_seed(0)
    # slices of 16384 values (whole blocks at both NF4 levels), as every real expert tensor's are
    model = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**{**_DECODER, "hidden_size": 128}, max_position_embeddings=64,
                                                  head_dim=32, num_experts=8, num_experts_per_tok=2,
                                                  moe_intermediate_size=128)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.05)
    quantized = mol.quantize(copy.deepcopy(model), "nf4", skip=["self_attn"])
    twin = _dequantized_twin(model, quantized)
    selected = []
    real = nf4_experts._selected
    monkeypatch.setattr(nf4_experts, "_selected", lambda packed, ids: selected.append(ids.clone()) or real(packed, ids))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))  # 3 tokens, top-2: 6 pairs of 8 experts
    index = torch.tensor([[1, 6], [6, 3], [0, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    outs, grads = [], []
    for experts in (quantized.model.layers[0].mlp.experts, twin.model.layers[0].mlp.experts):
        xg = x.clone().requires_grad_(True)
        y = experts(xg, index, weights)
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append(xg.grad)
    # forward: gate_up and down; backward: both again; each on the pairs' experts in sorted order
    assert len(selected) == 4 and all(ids.tolist() == [0, 1, 1, 3, 6, 6] for ids in selected)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(nf4_experts, "_selected", lambda packed, ids: None)  # the whole-tensor path
    with torch.no_grad():
        whole = quantized.model.layers[0].mlp.experts(x, index, weights)
    torch.testing.assert_close(outs[0], whole, rtol=1e-5, atol=1e-6)


@pytest.fixture
def grouped_dtypes(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """The (input, weight) dtypes of each grouped GEMM NF4Experts runs."""
    import mol.quant.experts as nf4_experts

    seen = []
    real = nf4_experts.grouped_mm

    def recording(x, weight, offsets):
        seen.append((x.dtype, weight.dtype))
        return real(x, weight, offsets)

    monkeypatch.setattr(nf4_experts, "grouped_mm", recording)
    return seen


def test_nf4_experts_compute_in_the_dtype_the_model_is_cast_to(grouped_dtypes):
    """A model quantized in float32 and then cast to bfloat16 (model.to, Lightning's bf16-true): dense experts would
    compute in bfloat16, and so does NF4Experts (NF4Linear computes in its input's dtype). It went on dequantizing
    to float32 and computing in it: twice the scratch memory, and on a GPU torch's grouped GEMM (bfloat16 only) left
    for a per-expert loop that reads the offsets on the host. Its dequantize() (mol.unload) follows too."""
    quantized = mol.quantize(_base("qwen3_moe"), "nf4").to(torch.bfloat16)
    with torch.no_grad():
        out = quantized(_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert grouped_dtypes and set(grouped_dtypes) == {(torch.bfloat16, torch.bfloat16)}, set(grouped_dtypes)
    m = _experts_modules(quantized)[0][1]
    assert {info[1] for info in m.quantized_expert_tensors().values()} == {torch.bfloat16}
    assert all(t.dequantize().dtype == torch.bfloat16 for t in m.nf4.values())
    assert all(b.dtype in (torch.uint8, torch.float32) for b in m.buffers())  # the NF4 state keeps its dtypes
    # a device move alone changes nothing; .float() goes back to float32
    quantized.to("cpu")
    assert {info[1] for info in m.quantized_expert_tensors().values()} == {torch.bfloat16}
    quantized.float()
    assert {info[1] for info in m.quantized_expert_tensors().values()} == {torch.float32}


def test_nf4_experts_compute_in_the_autocast_dtype(grouped_dtypes):
    """A float32 model quantized to NF4 under autocast (mol.train's bf16-mixed): the experts dequantize into bf16
    and multiply in it, as dense float32 experts do there (ExpertsLoRA's projection_dtype), and the logits agree
    with the dequantized twin's under the same autocast."""
    base = _base("qwen3_moe")
    quantized = mol.quantize(copy.deepcopy(base), "nf4", skip=["lm_head", "self_attn"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantized(_ids()).logits
        twin = _dequantized_twin(base, quantized)(_ids()).logits
    assert grouped_dtypes and set(grouped_dtypes) == {(torch.bfloat16, torch.bfloat16)}, set(grouped_dtypes)
    assert torch.allclose(out.float(), twin.float(), rtol=0, atol=2e-2 * float(twin.abs().max()))


@pytest.mark.parametrize("how", ["quantize_base", "quantized_first"])
def test_a_target_parameters_typo_on_nf4_experts_lists_the_tensors_on_offer(how):
    """With quantize_base="nf4" (or on a model mol.quantize made) the expert tensors are NF4 buffers when
    target_parameters are matched: a typo was answered "it holds no mixture-of-experts layer with fused 3-D expert
    tensors (adapt its linear layers with target_modules)", which sends the user the wrong way. The error lists the
    tensors on offer, and the model is left as it was."""
    base = _base("qwen3_moe")
    if how == "quantized_first":
        mol.quantize(base, "nf4")
    before = {n: t.clone() for n, t in base.state_dict().items()}
    config = mol.LoRAConfig(rank=2, target_modules=["q_proj"], target_parameters=["experts.gate_up"],
                            quantize_base="nf4")
    with pytest.raises(ValueError, match=r"target_parameters \['experts\.gate_up'\] matched no tensor of "
                                         r"Qwen3MoeForCausalLM; expert tensors on offer: \['experts\.down_proj', "
                                         r"'experts\.gate_up_proj'\]"):
        mol.inject(base, config)
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())


def test_trainable_parameters_count_nf4_weights_as_the_values_they_hold():
    """Reference: the same adapter on the full-precision model. The NF4 codes (buffers, or parameters of a quarter as
    many float32 elements once stored for FSDP) were counted as nothing, or as their storage elements."""
    lora = mol.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])
    want = mol.trainable_parameters(mol.inject(_base("qwen3_moe"), lora))
    quantized = mol.inject(mol.quantize(_base("qwen3_moe"), "nf4"), lora)
    from mol.quant.linear import NF4Tensor

    nf4 = [m for m in quantized.modules() if isinstance(m, NF4Tensor)]
    assert _experts_modules(quantized) and any(isinstance(m, mol.quant.NF4Linear) for m in nf4)
    assert mol.trainable_parameters(quantized) == want
    assert all(m.store_codes_as(torch.float32) for m in nf4)
    assert mol.trainable_parameters(quantized) == want
