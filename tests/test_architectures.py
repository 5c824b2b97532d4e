"""Methods on architectures beyond Llama / GPT-2 / BERT: multi-query caches, encoder-decoder models, inputs that
are not token ids, classification heads that are modules.

References: the same model's full forward (cached steps), the model without the adapter, Hugging Face PEFT given the
same tensors, and the adapter's own formula.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mol

VOCAB = 97


def _falcon(**kw) -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **kw)
    return FalconForCausalLM(cfg).eval()


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for n in model.mol_trainable:
            p = model.get_parameter(n)
            p.copy_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("kw", [dict(multi_query=True, new_decoder_architecture=False),
                                dict(multi_query=False, new_decoder_architecture=False),
                                dict(new_decoder_architecture=True, num_kv_heads=2)],
                         ids=["falcon-7b-mqa", "falcon-mha", "falcon-40b-gqa"])
def test_prefix_on_falcon_caches_fit_and_a_cached_step_equals_the_full_forward(kw):
    # Falcon-7B's multi-query attention caches one key-value head though its config counts every head
    model = mol.inject(_falcon(**kw), mol.PrefixTuningConfig(num_virtual_tokens=3))
    _randomize(model)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
        full = model(input_ids=ids, attention_mask=mask).logits
        plain = mol.unload(model)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    assert (full - plain).abs().max() > 1e-3  # the prefix reached the attention


def test_prefix_without_cache_returns_no_cache_entry_and_beam_search_runs():
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    model = mol.inject(base, mol.PrefixTuningConfig(num_virtual_tokens=3))
    _randomize(model)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert out.past_key_values is None and "past_key_values" not in out and len(out.to_tuple()) == 1
        gen = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False,
                   pad_token_id=0)
        assert torch.equal(model.generate(ids, use_cache=False, **gen), model.generate(ids, use_cache=True, **gen))


def test_export_peft_refuses_lora_inside_a_classification_head_module(tmp_path):
    # RoBERTa's head is a module (classifier.dense, classifier.out_proj): PEFT trains it whole and cannot read LoRA
    # keys under it, so the export must refuse before writing, as it does for a one-layer head
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, num_labels=3)
    model = mol.inject(RobertaForSequenceClassification(cfg), mol.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"classification head 'classifier\.(dense|out_proj)'.*"
                                         r"modules_to_save=\['classifier'\]"):
        mol.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ok = mol.inject(RobertaForSequenceClassification(cfg), mol.LoRAConfig(rank=2, modules_to_save=["classifier"]))
    mol.export_peft(ok, tmp_path / "ok")
    assert (tmp_path / "ok" / "adapter_config.json").exists()


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48, num_labels=3)
    return ViTForImageClassification(cfg)


def _grads(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "none of the inputs require grad" is what the old code met
        model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1], num_heads=[2], window_size=2, num_labels=3)
    return SwinForImageClassification(cfg)


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin-tuple-embeddings"])
def test_reentrant_checkpointing_trains_adapters_of_a_model_fed_pixel_values(make):
    # transformers makes the embeddings' output require grad only for input_ids models; without it a reentrant
    # checkpointed ViT block gives its adapters no gradient (Swin's patch embedding returns a tuple)
    torch.manual_seed(0)
    base = make()
    batch = dict(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2]))
    plain = mol.inject(base, mol.MoLConfig(num_experts=2, top_k=1, rank=2, modules_to_save=["classifier"]))
    _randomize(plain)
    plain.train()
    want = _grads(plain, batch)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got = _grads(plain, batch)
    assert set(got) == set(want) and all(g is not None for g in got.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    mol.unload(plain)
    assert not [h for m in plain.modules() for h in m._forward_hooks.values()
                if type(getattr(h, "__self__", h)).__name__ == "_InputsRequireGrad"]


def test_multihead_attention_out_proj_is_never_adapted():
    # nn.MultiheadAttention reads out_proj.weight itself: LoRA there changed nothing, silently
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=48, batch_first=True)
    mol.inject(layer, mol.LoRAConfig(rank=2))  # all-linear
    adapted = sorted(n for n, m in layer.named_modules() if isinstance(m, mol.MoLLinear))
    assert adapted == ["linear1", "linear2"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        layer.linear2.lora_B.normal_()
    assert (layer(x) - mol.unload(layer)(x)).abs().max() > 1e-3  # what is adapted computes
    with pytest.raises(ValueError, match=r"'self_attn\.out_proj', the output projection of an nn.MultiheadAttention"):
        mol.inject(nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True),
                   mol.LoRAConfig(rank=2, target_modules=["out_proj", "linear1"]))


def _seq2seq(kind: str) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    if kind == "t5":
        cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T.T5ForConditionalGeneration(cfg).eval()
    cfg = T.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return T.BartForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_prompt_tuning_on_encoder_decoder_models_matches_peft(kind):
    # the prompt goes in front of the encoder's tokens (PEFT's num_transformer_submodules=1); labels, decoder inputs
    # and decoder logits are the decoder's own, whatever their length
    peft = pytest.importorskip("peft")
    n = 3
    ours = mol.inject(_seq2seq(kind), mol.PromptTuningConfig(num_virtual_tokens=n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_seq2seq(kind), peft.PromptTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n, num_transformer_submodules=1)).eval()
    with torch.no_grad():
        ours.mol_prompt.embedding.weight.normal_()
        ref.prompt_encoder.default.embedding.weight.copy_(ours.mol_prompt.embedding.weight)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        for length in (5, 6, 6 + n):  # 6 and 6 + n: the lengths the decoder-only rules mistook for the encoder's
            labels = torch.randint(3, VOCAB, (2, length))
            a = ours(input_ids=ids, attention_mask=mask, labels=labels)
            b = ref(input_ids=ids, attention_mask=mask, labels=labels)
            assert a.logits.shape == (2, length, VOCAB)
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        gen = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        out = ours.generate(input_ids=ids, **gen)
        assert torch.equal(out, ref.generate(input_ids=ids, **gen))
        with mol.disable_adapters(ours):
            plain = ours(input_ids=ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(plain, _seq2seq(kind)(input_ids=ids, attention_mask=mask, labels=labels).logits)
        mol.unload(ours)
        owners = [getattr(h, "__self__", None) or getattr(getattr(h, "func", None), "__self__", None)  # a partial
                  for m in ours.modules() for h in m._forward_pre_hooks.values()]
        assert not [o for o in owners if type(o).__name__ == "PromptEmbedding"]
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, labels=labels).logits, plain)


def test_prompt_tuning_on_t5_keeps_the_encoder_mask_from_the_decoder_routers():
    # MoL beside prompt tuning: a decoder as long as the prompted encoder input counted the encoder's padding
    n = 2
    ids = torch.randint(3, VOCAB, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    model = mol.inject(_seq2seq("t5"), [mol.PromptTuningConfig(num_virtual_tokens=n),
                                        mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q"])])
    for length in (5, 4 + n):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(3, VOCAB, (2, length)))
        counts = mol.routing_stats(model)["decoder.block.0.layer.0.SelfAttention.q"]["counts"]
        assert counts.sum().item() == 2 * length * 2  # every decoder token, top-2: the decoder has no padding


def _neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4)).eval()


@pytest.mark.parametrize("kind", ["t5", "bart", "neox"])
def test_ia3_defaults_cover_peft_s_model_types_and_compute_what_peft_does(kind):
    peft = pytest.importorskip("peft")
    make = _neox if kind == "neox" else (lambda: _seq2seq(kind))
    ours = mol.inject(make(), mol.IA3Config())  # no targets given: PEFT's defaults for the model type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(make(), peft.IA3Config(task_type="SEQ_2_SEQ_LM" if kind != "neox" else "CAUSAL_LM"))
    ref_vectors = {n.replace("base_model.model.", "").replace(".default", ""): p
                   for n, p in ref.named_parameters() if "ia3_l" in n}
    assert set(ref_vectors) == set(ours.mol_trainable)
    with torch.no_grad():
        for n in ours.mol_trainable:
            ours.get_parameter(n).uniform_(0.5, 1.5)
            ref_vectors[n].copy_(ours.get_parameter(n).view_as(ref_vectors[n]))
        ids = torch.randint(3, VOCAB, (2, 6))
        kw = dict(input_ids=ids) if kind == "neox" else dict(input_ids=ids, decoder_input_ids=ids[:, :4])
        torch.testing.assert_close(ours(**kw).logits, ref.eval()(**kw).logits, rtol=1e-5, atol=1e-5)


def test_prefix_and_prompt_with_a_static_cache_say_why_they_cannot():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(3, VOCAB, (2, 5))
    for method in (mol.PrefixTuningConfig(num_virtual_tokens=2), mol.PromptTuningConfig(num_virtual_tokens=2)):
        model = mol.inject(LlamaForCausalLM(cfg).eval(), method)
        with pytest.raises(ValueError, match=r"got a 4-D tensor .*static or sliding-window cache.*dynamic cache"):
            model(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5))
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)  # dynamic: fine


def test_a_model_fed_pixel_values_compiles_whole_and_trains_as_eager():
    # the embeddings hook's requires_grad_() made AOTAutograd refuse a fullgraph compile of the model
    torch.manual_seed(0)
    model = mol.inject(_vit(), mol.MoLConfig(num_experts=2, top_k=1, rank=2, backend="torch"))
    _randomize(model)
    model.train()
    batch = dict(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2]))
    want = _grads(model, batch)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad()
    compiled(**batch).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


class _Wrapper(nn.Module):
    """A module of the user's own around a Hugging Face model (a LightningModule's ``forward(batch)``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**batch)


def test_reentrant_checkpointing_trains_adapters_of_a_wrapped_model_fed_pixel_values():
    """inject on a wrapper that holds a ViT: the ViT's embeddings are hooked as when it is injected directly, so a
    reentrant checkpointed block still gives every adapter its gradient (the hook looked at the wrapper only)."""
    torch.manual_seed(0)
    batch = dict(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2]))
    model = mol.inject(_Wrapper(_vit()), mol.MoLConfig(num_experts=2, top_k=1, rank=2,
                                                       modules_to_save=["classifier"]))
    _randomize(model)
    model.train()
    want = _grads(model, batch)
    model.inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got = _grads(model, batch)
    assert set(got) == set(want) and all(g is not None for g in got.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True])
def test_all_linear_over_a_new_task_head_warns_and_names_modules_to_save(wrapped):
    """"all-linear" on a sequence classifier adapts its randomly initialised head unless modules_to_save names it
    (as PEFT without task_type): it says so, naming the head; with the head in modules_to_save, or on a causal LM,
    it says nothing."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    def classifier():
        cfg = RobertaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_labels=3)
        model = RobertaForSequenceClassification(cfg)
        return _Wrapper(model) if wrapped else model

    def head_warnings(model, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mol.inject(model, mol.LoRAConfig(**kw))
        return [str(w.message) for w in caught if "task head" in str(w.message)]

    prefix = "inner." if wrapped else ""
    (message,) = head_warnings(classifier())
    assert f"'{prefix}classifier.dense'" in message and f"modules_to_save=['{prefix}classifier']" in message
    assert head_warnings(classifier(), modules_to_save=["classifier"]) == []
    assert head_warnings(_falcon()) == []


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_with_mol_copies_and_pickles_after_a_training_forward(kind, tmp_path):
    """An EMA or reference copy of an encoder-decoder taken mid-training: each router kept its last call's context,
    whose encoder output (memory) is part of that forward's graph, which deepcopy refused ("only graph leaves") and
    torch.save refused ("non-leaf tensor"). The copies give the original's outputs."""
    import copy

    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        base = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_heads=4,
                                                   d_kv=8, decoder_start_token_id=0, dropout_rate=0.0))
    else:
        base = BartForConditionalGeneration(BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
            dropout=0.0))
    model = mol.inject(base, mol.MoLConfig(num_experts=4, top_k=2, rank=4)).train()
    _randomize(model)
    ids, labels = torch.randint(3, VOCAB, (2, 7)), torch.randint(3, VOCAB, (2, 4))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    (model(input_ids=ids, attention_mask=mask, labels=labels).loss + mol.aux_loss(model)).backward()
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        for other in (twin, loaded):
            torch.testing.assert_close(other.eval()(input_ids=ids, attention_mask=mask, labels=labels).logits, want,
                                       rtol=0, atol=0)
