"""QLoRA through mol.inject: which layers end up 4-bit when several configs share one call, and modules_to_save
on layers that are already 4-bit.

Reference: the layer types and trainable tensors a user asked for, and the same model injected in the other order.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mol
from mol.quant import NF4Linear

VOCAB = 128


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _qlora() -> mol.LoRAConfig:
    return mol.LoRAConfig(rank=4, target_modules=["q_proj"], quantize_base="nf4")


def test_modules_to_save_of_any_config_in_the_call_stay_full_precision_and_train():
    ia3 = mol.IA3Config(target_modules=["k_proj"], feedforward_modules=None, modules_to_save=["up_proj"])
    ids = torch.randint(0, VOCAB, (2, 6))
    outs = []
    for configs in ([_qlora(), ia3], [ia3, _qlora()]):  # the second order raised before; the first lost up_proj
        model = mol.inject(_llama(), configs)
        mlp = model.model.layers[0].mlp
        assert type(mlp.up_proj) is nn.Linear and mlp.up_proj.weight.requires_grad
        assert "model.layers.0.mlp.up_proj.weight" in model.mol_trainable
        assert isinstance(mlp.down_proj, NF4Linear) and isinstance(mlp.gate_proj, NF4Linear)
        attn = model.model.layers[0].self_attn
        assert isinstance(attn.q_proj.base_layer, NF4Linear) and isinstance(attn.k_proj.base_layer, NF4Linear)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_modules_to_save_on_a_quantized_layer_is_refused_and_changes_nothing():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=128, num_labels=4)
    bert = mol.quantize(BertForSequenceClassification(cfg), "nf4", skip=["pooler"])
    if not isinstance(bert.classifier, NF4Linear):  # quantize may keep the head itself; put it in 4-bit here
        bert.classifier = NF4Linear.from_linear(bert.classifier)
    before = {n: type(m) for n, m in bert.named_modules()}
    with pytest.raises(ValueError, match=r"modules_to_save entry 'classifier' holds the quantized layer "
                                         r"'classifier'.*skip=\['classifier'\]"):
        mol.inject(bert, mol.LoRAConfig(rank=4, modules_to_save=["classifier"]))
    assert {n: type(m) for n, m in bert.named_modules()} == before and not hasattr(bert, "mol_configs")

    model = mol.inject(_llama(), _qlora())  # an earlier inject quantized up_proj
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj'.*every config in one inject call"):
        mol.inject(model, mol.IA3Config(target_modules=["k_proj"],
                                        modules_to_save=["up_proj"]))


def test_the_bitsandbytes_loader_is_public_beside_inject():
    # the README lists load_bnb_4bit beside inject / load_adapter / import_peft
    assert mol.load_bnb_4bit is mol.quant.load_bnb_4bit and "load_bnb_4bit" in mol.__all__


def test_a_modules_to_save_typo_under_qlora_names_modules_to_save():
    # quantize_base takes modules_to_save as its skip list: the typo used to be reported as a bad `skip` entry
    model = _llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"^modules_to_save entry 'lm_haed' matches no module; fix modules_to_save$"):
        mol.inject(model, mol.LoRAConfig(rank=4, quantize_base="nf4", modules_to_save=["lm_haed"]))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert mol.save_bnb_4bit is mol.quant.save_bnb_4bit and mol.bnb_4bit_state_dict is mol.quant.bnb_4bit_state_dict
