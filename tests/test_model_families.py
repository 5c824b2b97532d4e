"""mol on the model families people fine-tune in transformers 5 that test_architectures.py does not build: Qwen3
(q/k norms), Gemma 2 (soft-capping, tied and scaled embeddings), Phi-3 (fused qkv_proj / gate_up_proj), ModernBERT
and DeBERTa-v2 classifiers, and the mixture-of-experts models whose experts are fused 3-D tensors (Qwen3-MoE) or
whose router subclasses nn.Linear but returns a tuple (Llama 4).

Reference: Hugging Face PEFT given the same tensors (mol's LoRA is PEFT's to the bit), and the model itself.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers as T
from torch import nn

import mol

peft = pytest.importorskip("peft")

VOCAB = 101
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_labels=3, pad_token_id=0)
FAMILIES = {
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_DECODER, head_dim=8)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_DECODER, head_dim=8, sliding_window=4)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_DECODER)),
    "modernbert": lambda: T.ModernBertForSequenceClassification(T.ModernBertConfig(**_ENCODER)),
    "debertav2": lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**_ENCODER)),
}


def _qwen3_moe() -> nn.Module:
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**_DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=16))


def _llama4() -> nn.Module:
    return T.Llama4ForCausalLM(T.Llama4TextConfig(**_DECODER, head_dim=8, num_local_experts=2,
                                                  intermediate_size_mlp=48))


def _make(make) -> nn.Module:
    torch.manual_seed(0)
    return make().eval()


def _batch(causal: bool) -> dict:
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    if causal:
        mask[1, :2] = 0  # left padding, as a decoder's batch for generate() is padded
    else:
        mask[1, 5:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _peft_lora_names(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, LoraLayer) and not n.endswith(".base_layer"))


def _adapted(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, mol.MoLLinear))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_lora_is_peft_s_and_merges_exports_and_generates_the_same(family, tmp_path):
    base = _make(FAMILIES[family])
    causal = family not in ("modernbert", "debertav2")
    task = "CAUSAL_LM" if causal else "SEQ_CLS"
    keep = [] if causal else ["classifier"]  # PEFT's SEQ_CLS trains the head whole
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                       task_type=task)).eval()
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=8, modules_to_save=keep))
    assert _adapted(ours) == _peft_lora_names(ref)  # Phi-3's fused qkv_proj / gate_up_proj are layers like any
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name in _adapted(ours):
            layer = ours.get_submodule(name)
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)[0].copy_(params[f"base_model.model.{name}.{part}.default.weight"].normal_(0, .2))
        if keep:
            ours.classifier.weight.normal_()
            ref.base_model.model.classifier.modules_to_save["default"].weight.copy_(ours.classifier.weight)
    batch = _batch(causal)
    want = _logits(ours, batch)
    torch.testing.assert_close(want, _logits(ref, batch), rtol=0, atol=0)

    mol.export_peft(ours, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(loaded, batch), want, rtol=1e-6, atol=1e-6)
    mol.save_adapter(ours, tmp_path / "mol")
    torch.testing.assert_close(_logits(mol.load_adapter(copy.deepcopy(base), tmp_path / "mol"), batch), want,
                               rtol=0, atol=0)
    if causal:  # a KV cache (Gemma 2's sliding-window layers included) decodes what the full forward does
        gen = dict(attention_mask=batch["attention_mask"], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        with torch.no_grad():
            assert torch.equal(ours.generate(batch["input_ids"], use_cache=True, **gen),
                               ours.generate(batch["input_ids"], use_cache=False, **gen))
    merged = mol.merge_and_unload(ours)
    assert not _adapted(merged)
    torch.testing.assert_close(_logits(merged, batch), want, rtol=1e-5, atol=1e-5)


def test_llama4_router_that_returns_a_tuple_is_left_out_and_refused_by_name(tmp_path):
    """Llama4Router subclasses nn.Linear but returns (scores, logits): LoRA on it crashed the first forward
    ('can only concatenate tuple'), as PEFT's all-linear does, and mol.quantize replaced it by an NF4Linear that
    returns one tensor ('too many values to unpack')."""
    base = _make(_llama4)
    batch = _batch(True)
    with pytest.warns(UserWarning, match=r"leaves out \['model\.layers\.0\.feed_forward\.router', .*Llama4Router "
                                         r"subclasses nn\.Linear but is no linear layer \(its forward returns a tuple"):
        model = mol.inject(copy.deepcopy(base), mol.MoLConfig(num_experts=4, top_k=2, rank=4))
    assert not [n for n in _adapted(model) if n.endswith("router")] and "shared_expert.down_proj" in _adapted(model)[0]
    model.train()
    (model(**batch, labels=batch["input_ids"]).loss + mol.aux_loss(model)).backward()
    with pytest.raises(ValueError, match=r"selected 'model\.layers\.0\.feed_forward\.router', a Llama4Router, which "
                                         r"subclasses nn\.Linear but is no linear layer.*narrow target_modules"):
        mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["q_proj", "router"]))

    adapters = mol.inject(copy.deepcopy(base), mol.AdapterConfig())  # Llama 4 names its MLP feed_forward
    assert {n.split(".")[3] for n in adapters.mol_trainable} == {"feed_forward"}

    qlora = mol.quantize(copy.deepcopy(base), "nf4")  # transformers' bitsandbytes loading converts nn.Linear only
    assert type(qlora.model.layers[0].feed_forward.router).__name__ == "Llama4Router"
    _logits(qlora, batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4))
    with torch.no_grad():
        for layer in lora.modules():
            if isinstance(layer, mol.MoLLinear):
                layer.lora_B.normal_(0, 0.2)
    mol.export_peft(lora, tmp_path)  # "all-linear" read by PEFT would put LoRA on the router and crash
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert _peft_lora_names(loaded) == _adapted(lora)
    torch.testing.assert_close(_logits(loaded, batch), _logits(lora, batch), rtol=1e-6, atol=1e-6)


def test_fused_moe_experts_are_named_where_target_modules_leaves_them(tmp_path):
    """Qwen3-MoE in transformers 5 keeps its experts as 3-D tensors in one module: "all-linear" adapted the attention
    alone without a word (PEFT's adapts the experts and router too, through target_parameters), and a target naming
    the experts' tensors got 'matched no module' with a list lacking them."""
    base = _make(_qwen3_moe)
    with pytest.warns(UserWarning, match=r"fused mixture-of-experts layers \('model\.layers\.0\.mlp\.experts', a "
                                         r"Qwen3MoeExperts holding gate_up_proj \(4, 32, 32\), down_proj \(4, 32, 16\)"
                                         r".*routers beside them \(\['model\.layers\.0\.mlp\.gate'.*target_parameters"):
        model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4))
    assert all(n.split(".")[-2] == "self_attn" for n in _adapted(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named layers: the user chose them, nothing to say
        mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    for targets in (["q_proj", "gate_up_proj"], ["down_proj"], r".*\.experts\.down_proj"):
        with pytest.raises(ValueError, match=r"names the fused expert tensors of a mixture-of-experts layer .*"
                                             r"LoRAConfig\(target_parameters=.*Move those names to target_parameters"):
            mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=targets))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.experts', a Qwen3MoeExperts, which this method "
                                         r"cannot adapt \(it holds its experts' weights as 3-D tensors"):
        mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["experts"]))

    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, mol.MoLLinear):
                layer.lora_B.normal_(0, 0.2)
    mol.export_peft(model, tmp_path)  # PEFT would read "all-linear" as the attention plus the experts and router
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert _peft_lora_names(loaded) == _adapted(model)
    batch = _batch(True)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-6, atol=1e-6)


def test_lora_export_of_a_dense_model_keeps_all_linear_and_vit_is_no_mixture_of_experts(tmp_path):
    """The fused-experts rules look at experts only: ViT's 3-D position embeddings and an adapter's own (experts,
    rank, in) tensors are none, so a ViT says nothing of experts and a dense model's adapter goes to PEFT as
    "all-linear", as before."""
    vit = T.ViTModel(T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=48))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mol.inject(vit, mol.MoLConfig(num_experts=2, top_k=1, rank=2))
    model = mol.inject(_make(FAMILIES["qwen3"]), mol.LoRAConfig(rank=2))
    mol.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "all-linear"


def test_ia3_defaults_naming_pre_fusion_expert_layers_say_so():
    """IA3Config() takes PEFT's defaults for the model type, and Mixtral's name 'w2', an expert layer transformers 5
    fused into a 3-D tensor: the error blamed "target_modules pattern(s) ['w2']", which the user never set."""
    base = _make(lambda: T.MixtralForCausalLM(T.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)))
    with pytest.raises(ValueError, match=r"IA3Config's default targets for model type 'mixtral', PEFT's "
                                         r"\['k_proj', 'v_proj', 'w2'\], name \['w2'\].*set "
                                         r"target_modules=\['k_proj', 'v_proj'\] for what PEFT does"):
        mol.inject(copy.deepcopy(base), mol.IA3Config())
    model = mol.inject(copy.deepcopy(base), mol.IA3Config(target_modules=["k_proj", "v_proj"]))
    assert len(model.mol_trainable) == 4  # PEFT's IA3Config() on this model: k_proj and v_proj of both layers


def test_import_of_a_peft_all_linear_adapter_with_expert_parameters_names_them(tmp_path):
    """PEFT's all-linear on Qwen3-MoE writes target_parameters (experts and router) that the user never set: the
    refusal said the option 'changes what a LoRA layer computes', which left them wondering what they had done. mol
    imports the expert tensors (tests/test_peft_experts.py) but has no LoRA for a router: it names that."""
    base = _make(_qwen3_moe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                 task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"PEFT put LoRA on parameters, target_parameters=\[.*'gate_up_proj'.*selected "
                                         r"model\.layers\.0\.mlp\.gate\.weight, a \(4, 32\) tensor of "
                                         r"Qwen3MoeTopKRouter: mol puts LoRA on the 3-D expert tensors.*adds the "
                                         r"routers' weights, e\.g\. 'gate\.weight', itself on Mixtral and Qwen3-MoE"):
        mol.import_peft(copy.deepcopy(base), tmp_path)
