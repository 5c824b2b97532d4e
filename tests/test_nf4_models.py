"""mol.quantize on whole models: the layers it leaves in full precision (as transformers' bitsandbytes loading does),
and the errors of NF4Linear where model code expects an nn.Linear."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import copy
import re

import pytest
import torch
import torch.nn as nn

import mol
from mol.quant import NF4Linear, dequantize_nf4_reference, quantize


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The model with every NF4Linear replaced by an nn.Linear holding its dequantized weight: the reference a
    quantized model must compute exactly."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, NF4Linear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(dequantize_nf4_reference(m.packed, torch.float32))
                if m.bias is not None:
                    dense.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, dense)
    return ref


def _t5(kind):
    import transformers

    cfg_cls, model_cls = {"t5": ("T5Config", "T5ForConditionalGeneration"),
                          "mt5": ("MT5Config", "MT5ForConditionalGeneration"),
                          "umt5": ("UMT5Config", "UMT5ForConditionalGeneration")}[kind]
    cfg = getattr(transformers, cfg_cls)(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                         decoder_start_token_id=0, feed_forward_proj="gated-gelu"
                                         if kind != "t5" else "relu")
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.mark.parametrize("kind", ["t5", "mt5", "umt5"])
def test_t5_keeps_wo_in_full_precision(kind):
    """T5's feed-forward reads `self.wo.weight.dtype`; the model lists `wo` in _keep_in_fp32_modules, and
    quantize (alone or through QLoRA) leaves it an nn.Linear as transformers' bitsandbytes loading does. The
    quantized model computes what the model with each NF4 layer's dequantized weight computes."""
    model = _t5(kind)
    ids = torch.randint(0, 96, (2, 7))
    labels = torch.randint(0, 96, (2, 5))
    quantize(model, "nf4")
    wo = [n for n, m in model.named_modules() if n.endswith(".wo")]
    assert wo and all(type(model.get_submodule(n)) is nn.Linear for n in wo)
    assert isinstance(model.encoder.block[0].layer[0].SelfAttention.q, NF4Linear)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        ref = _dequantized_copy(model)(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)

    qlora = mol.inject(_t5(kind), mol.LoRAConfig(rank=4, quantize_base="nf4"))
    assert all(type(qlora.get_submodule(n).base_layer) is nn.Linear for n in wo)
    qlora(input_ids=ids, labels=labels).loss.backward()


def test_keep_in_fp32_modules_of_a_sub_model_and_strict_tensor_names():
    """Entries of _keep_in_fp32_modules(_strict) on any sub-model count, relative to it; an entry naming a tensor
    ('mlp.gate.weight', as MoE models list their router) keeps its module."""

    class Block(nn.Module):
        _keep_in_fp32_modules_strict = ["mlp.gate.weight"]

        def __init__(self):
            super().__init__()
            self.mlp = nn.ModuleDict({"gate": nn.Linear(64, 8), "up": nn.Linear(64, 64)})
            self.out = nn.Linear(64, 64)

    class Model(nn.Module):
        _keep_in_fp32_modules = ["out"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.proj = nn.Linear(64, 64)

    m = quantize(Model(), "nf4")
    for b in m.blocks:
        assert type(b.mlp.gate) is nn.Linear and type(b.out) is nn.Linear
        assert isinstance(b.mlp.up, NF4Linear)
    assert isinstance(m.proj, NF4Linear)


def test_reading_weight_of_nf4linear_says_it_is_4bit():
    q = NF4Linear.from_linear(nn.Linear(128, 64))
    with pytest.raises(AttributeError, match=r"NF4Linear \(64x128\) has no dense `weight`.*4-bit.*dequantize\(\)"):
        q.weight
    assert not hasattr(q, "weight") and getattr(q, "weight", None) is None  # code probing for a dense weight
    with pytest.raises(AttributeError, match="'NF4Linear' object has no attribute 'nothing'"):
        q.nothing


def test_multihead_attention_linears_stay_full_precision():
    """nn.MultiheadAttention computes F.linear(..., self.out_proj.weight, ...) itself, and nn.TransformerEncoderLayer's
    inference fast path hands linear1 / linear2's weights to one fused op: quantize leaves those alone (and the
    linears around them it quantizes); the model computes what its dequantized copy computes, in training and in
    eval under no_grad (the fast path)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(32, 64)
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.pool = nn.MultiheadAttention(64, 4, batch_first=True)
            self.proj = nn.Linear(64, 64)

        def forward(self, x):
            h = self.encoder(self.embed(x))
            return self.proj(self.pool(h, h, h)[0])

    model = quantize(Model(), "nf4")
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(kept) == sorted(["pool.out_proj"] + [f"encoder.layers.{i}.{c}" for i in range(2)
                                                        for c in ("self_attn.out_proj", "linear1", "linear2")])
    assert isinstance(model.embed, NF4Linear) and isinstance(model.proj, NF4Linear)
    ref = _dequantized_copy(model)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_siglip_pooling_head_attention():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             image_size=32, patch_size=8)
    pixels = torch.randn(2, 3, 32, 32)
    model = quantize(SiglipVisionModel(cfg).eval(), "nf4")
    assert type(model.head.attention.out_proj) is not NF4Linear
    assert isinstance(model.head.mlp.fc1, NF4Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).pooler_output,
                                   _dequantized_copy(model)(pixel_values=pixels).pooler_output, rtol=1e-5, atol=1e-5)
    qlora = mol.inject(SiglipVisionModel(cfg), mol.LoRAConfig(rank=4, quantize_base="nf4"))
    qlora(pixel_values=pixels).pooler_output.sum().backward()


def _tiny_llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=0, **kw)


def test_sequence_classification_head_stays_full_precision(tmp_path):
    """A sequence classifier's head (Llama's `score`, which has no get_output_embeddings) stays a trainable
    nn.Linear, and every other linear goes to NF4: the same layers transformers' bitsandbytes 4-bit loading
    quantizes (compared with it where bitsandbytes imports)."""
    from transformers import LlamaForSequenceClassification

    cfg = _tiny_llama_config(num_labels=3)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    model = quantize(LlamaForSequenceClassification.from_pretrained(tmp_path), "nf4")
    assert type(model.score) is nn.Linear
    nf4 = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 7
    ids = torch.randint(1, 96, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _dequantized_copy(model)(ids).logits, rtol=1e-5, atol=1e-5)
    qlora = mol.inject(LlamaForSequenceClassification.from_pretrained(tmp_path),
                       mol.LoRAConfig(rank=4, quantize_base="nf4", target_modules=["q_proj"],
                                      modules_to_save=["score"]))
    assert type(qlora.score) is nn.Linear and "score.weight" in qlora.mol_trainable

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception:  # pragma: no cover - bitsandbytes absent or broken on this machine
        return
    bnb = LlamaForSequenceClassification.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cpu")
    assert {n for n, m in bnb.named_modules() if type(m).__name__ == "Linear4bit"} == nf4


def test_bert_classifier_with_bias_stays_full_precision():
    """BERT's `classifier` has a bias, so its model's last parameter is `classifier.bias`: still the head, kept in
    full precision; quantize first and modules_to_save=['classifier'] later then trains its weight too."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                     num_labels=4)
    model = quantize(BertForSequenceClassification(cfg).eval(), "nf4")
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.bert.pooler.dense, NF4Linear)
    mol.inject(model, mol.LoRAConfig(rank=4, target_modules=["query"], modules_to_save=["classifier"]))
    assert {"classifier.weight", "classifier.bias"} <= set(model.mol_trainable)


def test_head_under_an_adapter_and_tied_linears_stay_full_precision():
    """The head rule looks past adapters (a LoRA on `score` injected before quantize keeps its base in full
    precision), and two linears sharing one weight (tied) both stay nn.Linear: NF4 would untie them silently."""
    from transformers import LlamaForSequenceClassification

    model = mol.inject(LlamaForSequenceClassification(_tiny_llama_config(num_labels=2)),
                       mol.LoRAConfig(rank=4, target_modules=["score", "v_proj"]))
    quantize(model, "nf4")
    assert type(model.score.base_layer) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.v_proj.base_layer, NF4Linear)

    tied = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64))
    tied[2].weight = tied[0].weight
    quantize(tied, "nf4")
    assert type(tied[0]) is nn.Linear and type(tied[2]) is nn.Linear and tied[0].weight is tied[2].weight
    assert isinstance(tied[3], NF4Linear)


def _two_proj():
    m = nn.Sequential()
    m.add_module("q_proj", nn.Linear(64, 64))
    m.add_module("v_proj", nn.Linear(64, 64))
    return m


def test_skip_entry_matching_nothing_raises_with_names_on_offer():
    """A typo in skip used to quantize the layer it meant to keep, silently; now it raises naming the entry and the
    names on offer, and leaves the model as it was. Names, suffixes, parents and regexes still match."""
    m = _two_proj()
    with pytest.raises(ValueError, match=r"quantize: skip entry \['q_porj'\] matches no module of Sequential; module "
                                         r"names on offer: \['q_proj', 'v_proj'\]"):
        quantize(m, "nf4", skip=["q_porj"])
    assert [type(x) for x in m] == [nn.Linear, nn.Linear]
    with pytest.raises(ValueError, match=r"skip entries \['a', 'b'\] match no module"):
        quantize(m, "nf4", skip=["q_proj", "a", "b"])
    for skip in (["q_proj"], "q_proj", [r"q_.*"], [r".*q_proj"]):
        m = quantize(_two_proj(), "nf4", skip=skip)
        assert type(m.q_proj) is nn.Linear and isinstance(m.v_proj, NF4Linear), skip
    from conftest import make_tiny_llama

    llama = quantize(make_tiny_llama(hidden=64), "nf4", skip=["layers.1", "mlp.up_proj"])  # a parent, a suffix
    assert all(type(x) is nn.Linear for x in llama.model.layers[1].modules() if isinstance(x, nn.Linear))
    assert type(llama.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(llama.model.layers[0].mlp.down_proj, NF4Linear)


@pytest.mark.parametrize("pattern", ["*.q_proj", "q_proj[", "(q_proj"])
def test_skip_entry_that_is_no_regex_raises_a_valueerror_naming_skip(pattern):
    m = _two_proj()
    with pytest.raises(ValueError, match=rf"quantize: skip entry {re.escape(repr(pattern))} is neither a module name "
                                         r"nor a valid regex .*not a glob"):
        quantize(m, "nf4", skip=[pattern])
    assert [type(x) for x in m] == [nn.Linear, nn.Linear]


def test_qlora_inject_passes_modules_to_save_as_skip():
    """inject hands quantize its configs' modules_to_save as skip: they match, so QLoRA still works, and a typo
    there now fails before any layer is quantized (the model unchanged)."""
    from conftest import make_tiny_llama

    model = mol.inject(make_tiny_llama(hidden=64), mol.LoRAConfig(rank=4, target_modules=["q_proj"],
                                                                   quantize_base="nf4", modules_to_save=["lm_head"]))
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
    fresh = make_tiny_llama(hidden=64)
    before = {n: type(x) for n, x in fresh.named_modules()}
    with pytest.raises(ValueError, match=r"'lm_haed'.*(matches no module|match no module)"):
        mol.inject(fresh, mol.LoRAConfig(rank=4, target_modules=["q_proj"], quantize_base="nf4",
                                         modules_to_save=["lm_haed"]))
    assert {n: type(x) for n, x in fresh.named_modules()} == before


def test_a_model_of_torch_attention_alone_says_why_nothing_is_quantized():
    """A bare nn.TransformerEncoderLayer holds only linears its own code reads the weight of: quantize says so
    rather than quantizing layers whose eval forward would then fail."""
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    with pytest.raises(ValueError, match=r"no linear layer to quantize \(left out: .*nn.MultiheadAttention / "
                                         r"nn.TransformerEncoderLayer read the weight of"):
        quantize(layer, "nf4")
    assert type(layer.linear1) is nn.Linear and type(layer.self_attn.out_proj) is not NF4Linear


def _hf_models():
    import transformers as tf

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    return {
        "llama-seq-cls": lambda: tf.LlamaForSequenceClassification(_tiny_llama_config(num_labels=3)),
        "llama-tied": lambda: tf.LlamaForCausalLM(_tiny_llama_config(tie_word_embeddings=True)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4)),
        "t5": lambda: _t5("t5"),
        "clip": lambda: tf.CLIPModel(tf.CLIPConfig(text_config=dict(vocab_size=96, **small), projection_dim=32,
                                                   vision_config=dict(image_size=32, patch_size=8, **small))),
        "bert-seq-cls": lambda: tf.BertForSequenceClassification(tf.BertConfig(vocab_size=96, num_labels=3, **small)),
    }


@pytest.mark.parametrize("kind", ["llama-seq-cls", "llama-tied", "gpt2", "t5", "clip", "bert-seq-cls"])
def test_kept_layers_are_the_ones_transformers_keeps(kind):
    """The linears quantize leaves in full precision are those transformers' bitsandbytes loading leaves
    (get_keys_to_not_convert plus _keep_in_fp32_modules, matched as transformers matches them), but for a task
    head with a bias, which transformers 5 quantizes (it strips only '.weight' from the last parameter's name)
    and quantize keeps (BERT's classifier)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _hf_models()[kind]()
    patterns = get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules or [])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    theirs = {n for n in linears if not should_convert_module(n, patterns)}
    quantize(model, "nf4")
    ours = {n for n in linears if not isinstance(model.get_submodule(n), NF4Linear)}
    assert ours == theirs | ({"classifier"} if kind == "bert-seq-cls" else set())
    assert ours  # every one of these models keeps something
