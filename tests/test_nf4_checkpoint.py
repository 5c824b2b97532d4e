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


# ---------------------------------------------------------------- exporting a mol-quantized model

def _models():
    import transformers

    return {
        "llama": lambda: _llama(),
        "llama-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)).eval(),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(  # Conv1D layers
            vocab_size=96, n_embd=64, n_layer=1, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)).eval(),
        "bert-cls": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(  # a kept head
            vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
            num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval(),
    }


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2", "bert-cls"])
def test_save_bnb_4bit_loads_back_with_load_bnb_4bit(kind, tmp_path):
    """The directory's state dict, read into a fresh full-precision model of the same class with load_bnb_4bit
    (the 4-bit layers) and load_state_dict (the rest), gives the saved model's outputs exactly; nothing is left
    over or missing, and the model saved is not changed (its config gains no quantization_config)."""
    from safetensors.torch import load_file

    from mol.quant import bnb_4bit_state_dict, save_bnb_4bit

    build = _models()[kind]
    model = quantize(build(), "nf4")
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    assert save_bnb_4bit(model, tmp_path) == tmp_path
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd_before.items())
    sd = load_file(tmp_path / "model.safetensors")
    assert {k for k in sd if "quant_state" in k} == {k for k in bnb_4bit_state_dict(model) if "quant_state" in k}
    assert not any(k.endswith((".qweight", ".offset")) for k in sd)
    fresh = build()
    names = load_bnb_4bit(fresh, sd)
    assert sorted(names) == sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear))
    rest = {k: v for k, v in sd.items() if not any(k.startswith(n + ".") for n in names)}
    missing, unexpected = fresh.load_state_dict(rest, strict=False)
    tied = set(fresh.all_tied_weights_keys)  # a tied head's copy is left out, as save_pretrained does
    assert unexpected == [] and all(any(k.startswith(n + ".") for n in names) or k in tied for k in missing)
    assert not tied & set(sd)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, ref)


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2", "bert-cls"])
def test_save_bnb_4bit_loads_in_transformers_with_bitsandbytes(kind, tmp_path):
    """transformers' from_pretrained of the directory builds bitsandbytes Linear4bit layers exactly where mol has
    NF4Linear ones (its quantization_config lists the layers mol kept) and computes the saved model's logits.
    (Compared in training mode, dropout off: in eval bitsandbytes' CPU path repacks the weights to compute in
    bfloat16.)"""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        pytest.skip("bitsandbytes does not import here")
    from mol.quant import save_bnb_4bit

    model = quantize(_models()[kind](), "nf4")
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_bnb_4bit(model, tmp_path)
    loaded = type(model).from_pretrained(tmp_path, device_map="cpu").train()
    assert ({n for n, m in loaded.named_modules() if type(m).__name__ == "Linear4bit"}
            == {n for n, m in model.named_modules() if isinstance(m, NF4Linear)})
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=0, atol=1e-6)


def test_exporters_refuse_what_they_cannot_write(tmp_path):
    import mol
    from mol.quant import bnb_4bit_state_dict, save_bnb_4bit

    with pytest.raises(ValueError, match="holds no NF4Linear layer; quantize it first"):
        bnb_4bit_state_dict(_llama())
    adapted = mol.inject(_llama(), mol.LoRAConfig(rank=4, target_modules=["q_proj"], quantize_base="nf4"))
    with pytest.raises(ValueError, match=r"save_bnb_4bit: the model carries mol adapters "
                                         r"\(\['model.layers.0.self_attn.q_proj'\]\).*mol.unload"):
        save_bnb_4bit(adapted, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
    mol.unload(adapted)  # the NF4 base stays: it exports
    assert isinstance(adapted.model.layers[0].self_attn.q_proj, NF4Linear)
    save_bnb_4bit(adapted, tmp_path)
    plain = quantize(nn.Sequential(nn.Linear(64, 64)), "nf4")
    assert set(bnb_4bit_state_dict(plain)) >= {"0.weight", "0.weight.absmax", "0.bias"}
    with pytest.raises(ValueError, match="has no transformers config to write config.json"):
        save_bnb_4bit(plain, tmp_path / "other")
    with pytest.raises(ValueError, match="compute_dtype must be"):
        save_bnb_4bit(quantize(_llama(), "nf4"), tmp_path / "other", compute_dtype=torch.int8)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("bias", [torch.zeros(3), torch.zeros(64, 2), torch.zeros(64, dtype=torch.int64)])
def test_load_bnb_4bit_refuses_a_bias_that_does_not_fit_its_layer(bias):
    """A '<layer>.bias' of another length (a checkpoint of another model mixed in) was taken as the NF4Linear's bias
    without a word; the model failed only at its first forward, far from the file."""
    sd = _bnb_sd(quantize(_llama(), "nf4"))
    sd["model.layers.0.self_attn.q_proj.bias"] = bias
    model = _llama()
    before = _types(model)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.bias' is .* but the layer's bias is 64 "
                                         r"floats \(out_features\): the checkpoint is damaged or mixes two models"):
        load_bnb_4bit(model, sd)
    assert _types(model) == before


def test_load_bnb_4bit_keeps_a_bias_the_state_dict_lacks_and_refuses_one_the_layer_lacks():
    """A layer's bias outside the state dict given (a shard holding the 4-bit weight but not the bias, as
    transformers' sharding may split them) was dropped: the NF4Linear was built without one, and the later
    load_state_dict(rest, strict=False) ignored the bias key as unexpected, so the layer computed x W^T alone. A bias
    for a layer the model declares without one was taken without a word."""
    from mol.quant import dequantize_nf4_reference

    torch.manual_seed(0)
    source = _llama(attention_bias=True)
    with torch.no_grad():
        source.model.layers[0].self_attn.q_proj.bias.normal_()
    bias = source.model.layers[0].self_attn.q_proj.bias.detach().clone()
    sd = {**_bnb_sd(quantize(source, "nf4")), "model.layers.0.self_attn.q_proj.bias": bias}
    weights = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    biases = {k: v for k, v in sd.items() if k.endswith(".bias")}
    model = _llama(attention_bias=True)
    names = load_bnb_4bit(model, weights)
    assert "model.layers.0.self_attn.q_proj" in names
    result = model.load_state_dict(biases, strict=False)
    assert not result.unexpected_keys
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    ref = x.double() @ dequantize_nf4_reference(q.packed, torch.float64).T + bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)
    # a bias for a layer without one
    plain = _llama()
    before = _types(plain)
    with pytest.raises(ValueError, match=r"holds 'model.layers.0.self_attn.q_proj.bias', but "
                                         r"'model.layers.0.self_attn.q_proj' has no bias in the model"):
        load_bnb_4bit(plain, sd)
    assert _types(plain) == before
