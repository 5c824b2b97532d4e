"""Whole-model bitsandbytes 4-bit checkpoints: load_bnb_4bit's refusals, and the exporter's round trips."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
import torch.nn as nn

from mol.quant import NF4Linear, load_bnb_4bit, quantize


def _llama(cls_name="LlamaForCausalLM", **kw):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                   tie_word_embeddings=False, **kw)
    return getattr(transformers, cls_name)(cfg).eval()


def _bnb_sd(model):
    """The bitsandbytes-format tensors of every NF4Linear of a quantized model."""
    sd = {}
    for n, m in model.named_modules():
        if isinstance(m, NF4Linear):
            sd.update(m.to_bnb_state_dict(n + "."))
    return sd


def _types(model):
    return {n: type(m) for n, m in model.named_modules()}


def test_load_bnb_4bit_names_a_prefix_mismatch():
    """4-bit entries none of which names a module of the model (a LlamaForCausalLM checkpoint into a LlamaModel,
    and the reverse) raise, naming a few keys, the model's layer names and the prefix that differs."""
    sd = _bnb_sd(quantize(_llama(), "nf4"))
    base = _llama("LlamaModel")
    before = _types(base)
    with pytest.raises(ValueError, match=r"none of the state dict's 7 4-bit entries names a module of LlamaModel: "
                                         r"e.g. \['model.layers.0.self_attn.q_proj.weight'.*named e.g. "
                                         r"\['layers.0.self_attn.q_proj'.*carry the prefix 'model.' that the model's "
                                         r"lack: strip it"):
        load_bnb_4bit(base, sd)
    assert _types(base) == before
    inner = _bnb_sd(quantize(_llama("LlamaModel"), "nf4"))
    with pytest.raises(ValueError, match=r"The model's names carry the prefix 'model.' that the checkpoint's lack"):
        load_bnb_4bit(_llama(), inner)
    # the right pairing loads every layer, and a shard without 4-bit entries replaces nothing
    full = _llama()
    assert len(load_bnb_4bit(full, sd)) == 7
    assert load_bnb_4bit(_llama(), {"model.embed_tokens.weight": torch.zeros(96, 64)}) == []


def test_load_bnb_4bit_refuses_an_8bit_checkpoint():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))
    try:
        import bitsandbytes as bnb

        l8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        l8.load_state_dict(nn.Linear(64, 32).state_dict())
        sd8 = {f"0.{k}": v for k, v in l8.to("cpu").state_dict().items()}  # weight (int8), bias, SCB, weight_format
    except Exception:  # bitsandbytes absent: the keys its Linear8bitLt writes
        sd8 = {"0.weight": torch.zeros(32, 64, dtype=torch.int8), "0.bias": torch.zeros(32), "0.SCB": torch.ones(32),
               "0.weight_format": torch.tensor(0, dtype=torch.uint8)}
    assert "0.SCB" in sd8
    with pytest.raises(ValueError, match=r"bitsandbytes 8-bit \(LLM.int8\) entries \(\['0.SCB'\]\); mol reads 4-bit "
                                         r"NF4 checkpoints only, 8-bit is not supported"):
        load_bnb_4bit(model, sd8)
    # beside 4-bit entries too: a mixed state dict is no NF4 checkpoint
    mixed = {**NF4Linear.from_linear(nn.Linear(32, 32)).to_bnb_state_dict("1."), **sd8}
    with pytest.raises(ValueError, match="8-bit is not supported"):
        load_bnb_4bit(model, mixed)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]


def test_load_bnb_4bit_refuses_an_entry_for_a_module_that_is_no_linear():
    import mol

    model = _llama()
    sd = _bnb_sd(quantize(_llama(), "nf4"))
    mol.inject(model, mol.LoRAConfig(rank=4, target_modules=["q_proj"]))
    before = _types(model)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4' is "
                                         r"for 'model.layers.0.self_attn.q_proj', a MoLLinear, not an nn.Linear"):
        load_bnb_4bit(model, sd)
    assert _types(model) == before
