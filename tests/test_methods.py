"""Bottleneck adapters, IA³, BitFit, prefix and prompt tuning through the shared inject / save / load path.

References: Hugging Face PEFT (IA³, prefix tuning, prompt tuning) given the same trained tensors; the identity and
parameter-count formulas (adapters, BitFit); the same model without the KV cache (generation).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mol

peft = pytest.importorskip("peft")

VOCAB = 101


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=70, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def batch(b: int = 3, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with one left-padded row and one right-padded row."""
    ids = torch.randint(1, VOCAB, (b, t))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids, mask


def logits(model: nn.Module, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def peft_model(base: nn.Module, cfg) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg).eval()


def randomize(model: nn.Module) -> None:
    """Give every adapter tensor a random value (a trained adapter), away from the identity init."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in model.mol_trainable:
            params[name].copy_(torch.rand_like(params[name]) + 0.5 if name.endswith("ia3_l")
                               else torch.randn_like(params[name]) * 0.2)


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    trainable = set(model.mol_trainable)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}


def step_and_check_frozen(model: nn.Module, ids, mask) -> None:
    """One AdamW step: every trainable tensor moves, every other tensor stays bit-identical."""
    model.train()
    before = frozen_state(model)
    params = dict(model.named_parameters())
    trainable_before = {n: params[n].detach().clone() for n in model.mol_trainable}
    assert {n for n, p in params.items() if p.requires_grad} == set(model.mol_trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = model(input_ids=ids, attention_mask=mask, labels=ids if ids.dim() == 2 and model.config.model_type != "bert"
                else torch.zeros(ids.shape[0], dtype=torch.long))
    out.loss.backward()
    for n, p in params.items():
        assert (p.grad is not None) == (n in trainable_before), n
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable_before:
            assert not torch.equal(p, trainable_before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    model.eval()


def roundtrip(model: nn.Module, fresh: nn.Module, tmp_path, ids, mask) -> nn.Module:
    """save_adapter then load_adapter into ``fresh``: same logits, file holds exactly the trainable tensors."""
    mol.save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(model.mol_trainable)
    loaded = mol.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))
    return loaded


# ---- IA³ ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_matches_peft_and_merges(arch, tmp_path):
    base = MODELS[arch]()
    ids, mask = batch()
    ours = mol.inject(copy.deepcopy(base), mol.IA3Config())
    ref = peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM"))
    randomize(ours)
    params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".ia3_l." in n:
                p.copy_(params[n.removeprefix("base_model.model.").replace(".ia3_l.default", ".ia3_l")].view_as(p))
                copied += 1
    assert copied == len(ours.mol_trainable) == 3 * 2 - (arch == "gpt2") * 2  # llama: k, v, down; gpt2: c_attn, c_proj
    out = logits(ours, ids, mask)
    assert_close(out, logits(ref, ids, mask))
    assert not torch.allclose(out, logits(base, ids, mask), atol=1e-3)  # the vectors do change the model
    roundtrip(ours, copy.deepcopy(base), tmp_path, ids, mask)

    w = {n: p.detach().clone() for n, p in ours.named_parameters()}
    mol.merge(ours)
    assert_close(logits(ours, ids, mask), out)
    mol.unmerge(ours)
    assert_close(logits(ours, ids, mask), out)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, w[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("targets,feedforward", [(["k_proj", "down_proj"], "down_proj"),
                                                 (r".*\.(k_proj|down_proj)", ["up_proj"]),
                                                 (r".*\.(k_proj|down_proj)", r".*\.up_proj")])
def test_ia3_feedforward_modules_that_select_no_target_are_named(targets, feedforward):
    """A feedforward_modules entry that selects none of the targeted layers (a bare name given as a regex string,
    which must match the full name; a layer not in target_modules) used to be dropped silently: the layer meant
    scaled its output, not its input. The fixed pattern gives PEFT's model."""
    with pytest.raises(ValueError, match=r"feedforward_modules .* matches none of the 4 layers target_modules"):
        mol.inject(tiny_llama(), mol.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    base = tiny_llama()
    ours = mol.inject(copy.deepcopy(base), mol.IA3Config(target_modules=["k_proj", "down_proj"],
                                                         feedforward_modules=r".*\.down_proj"))
    ref = peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                         feedforward_modules=r".*\.down_proj"))
    randomize(ours)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".ia3_l." in n:
                p.copy_(params[n.removeprefix("base_model.model.").replace(".ia3_l.default", ".ia3_l")].view_as(p))
    ids, mask = batch()
    assert_close(logits(ours, ids, mask), logits(ref, ids, mask))


def test_ia3_defaults_are_peft_defaults():
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    from mol.methods.ia3 import DEFAULT_TARGETS

    for model_type, (targets, ff) in DEFAULT_TARGETS.items():
        assert (TARGETS[model_type], FF[model_type]) == (targets, ff), model_type


def test_ia3_feedforward_semantics_and_training():
    base = tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.IA3Config(target_modules=["v_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
    layer0 = model.model.layers[0]
    assert layer0.self_attn.v_proj.ia3_l.shape == (16,)  # out_features: 2 kv heads x 8
    assert layer0.mlp.down_proj.ia3_l.shape == (70,)  # in_features of the down projection
    x = torch.randn(5, 70)
    with torch.no_grad():
        layer0.mlp.down_proj.ia3_l.uniform_(0.5, 1.5)
        want = base.model.layers[0].mlp.down_proj(x * layer0.mlp.down_proj.ia3_l)
    assert torch.equal(layer0.mlp.down_proj(x), want)
    assert mol.trainable_parameters(model)[0] == 2 * (16 + 70)
    step_and_check_frozen(model, *batch())


# ---- prefix and prompt tuning ---------------------------------------------------------------------------


def _copy_prompt_encoder(ours: nn.Module, ref: nn.Module, attr: str) -> None:
    ours_params = dict(getattr(ours, attr).named_parameters())
    ref_params = dict(ref.prompt_encoder["default"].named_parameters())
    assert set(ours_params) == set(ref_params)
    with torch.no_grad():
        for n, p in ref_params.items():
            p.copy_(ours_params[n])


@pytest.mark.parametrize("arch,projection", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_prefix_matches_peft(arch, projection, tmp_path):
    base = MODELS[arch]()
    ids, mask = batch()
    kw = {"encoder_hidden_size": 24} if projection else {}
    ours = mol.inject(copy.deepcopy(base), mol.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=projection,
                                                                  **kw))
    ref = peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                                   prefix_projection=projection, **kw))
    randomize(ours)
    _copy_prompt_encoder(ours, ref, "mol_prefix")
    out = logits(ours, ids, mask)
    assert_close(out, logits(ref, ids, mask))
    assert_close(logits(ours, ids, None), logits(ref, ids, None))
    assert not torch.allclose(out, logits(base, ids, mask), atol=1e-3)
    roundtrip(ours, copy.deepcopy(base), tmp_path, ids, mask)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_matches_peft(arch, tmp_path):
    base = MODELS[arch]()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    ours = mol.inject(copy.deepcopy(base), mol.PromptTuningConfig(num_virtual_tokens=4))
    ref = peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    randomize(ours)
    _copy_prompt_encoder(ours, ref, "mol_prompt")
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, labels=labels)
        b = ref(input_ids=ids, attention_mask=mask, labels=labels)
    # PEFT returns logits for the virtual tokens too; ours line up with the caller's tokens (the loss sees both).
    assert b.logits.shape[1] == ids.shape[1] + 4 and a.logits.shape[1] == ids.shape[1]
    assert_close(a.logits, b.logits[:, 4:])
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * abs(b.loss.item())
    roundtrip(ours, copy.deepcopy(base), tmp_path, ids, mask)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_same_with_and_without_cache(arch, method):
    base = MODELS[arch]()
    ids = torch.randint(1, VOCAB, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as generation wants
    mask[2, :1] = 0
    if method == "prefix":
        cfg, ref_cfg = mol.PrefixTuningConfig(num_virtual_tokens=6), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                            num_virtual_tokens=6)
    else:
        cfg, ref_cfg = mol.PromptTuningConfig(num_virtual_tokens=6), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                            num_virtual_tokens=6)
    ours = mol.inject(copy.deepcopy(base), cfg)
    randomize(ours)
    gen = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = ours.generate(ids, use_cache=True, **gen)
        uncached = ours.generate(ids, use_cache=False, **gen)
    assert cached.shape == (3, 7 + 8)
    assert torch.equal(cached, uncached)
    ref = peft_model(copy.deepcopy(base), ref_cfg)
    _copy_prompt_encoder(ours, ref, f"mol_{method}")
    with torch.no_grad():
        assert torch.equal(cached, ref.generate(input_ids=ids, **gen))
    # the hooks leave the caller's cache usable for a manual next step
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = ours(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                    past_key_values=out.past_key_values, use_cache=True)
        full = ours(input_ids=torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1))
    assert_close(step.logits[:, -1], full.logits[:, -1], rel=1e-5)


def test_prompt_vocab_init_takes_the_embeddings_the_model_computes():
    """init="vocab" (PEFT's SAMPLE_VOCAB) copied rows of the embedding's raw weight; Gemma 3's embedding scales its
    output by sqrt(hidden), so the prompt started that many times smaller than the token embeddings beside it
    (PEFT embeds the sampled ids through the module). Every prompt row is now the module's embedding of a token."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    base = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=8, max_position_embeddings=64)).eval()
    for model in (base, tiny_llama()):
        emb = model.get_input_embeddings()
        with torch.no_grad():
            table = emb(torch.arange(VOCAB))
        prompt = mol.inject(copy.deepcopy(model), mol.PromptTuningConfig(num_virtual_tokens=5)).mol_prompt
        for row in prompt.embedding.weight.detach():
            assert (table == row).all(-1).any(), type(emb).__name__


def test_prefix_and_prompt_train_only_their_tensors():
    for cfg in (mol.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
                mol.PromptTuningConfig(num_virtual_tokens=3)):
        model = mol.inject(tiny_llama(), cfg)
        step_and_check_frozen(model, *batch())


# ---- bottleneck adapters --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_adapter_identity_counts_and_gradients(arch, placement, tmp_path):
    make = {"bert": tiny_bert, **MODELS}[arch]
    base = make()
    ids, mask = batch()
    model = mol.inject(copy.deepcopy(base), mol.AdapterConfig(placement=placement, reduction_factor=4))
    assert torch.equal(logits(model, ids, mask), logits(base, ids, mask))  # zero up-projection: identity
    d, b, layers = 32, 32 // 4, 2
    per_adapter = d * b + b + b * d + d
    n_adapters = layers * (2 if placement == "houlsby" else 1)
    head = sum(p.numel() for p in base.classifier.parameters()) if arch == "bert" else 0
    assert sum(isinstance(m, mol.methods.BottleneckAdapter) for m in model.modules()) == n_adapters
    assert mol.trainable_parameters(model)[0] == n_adapters * per_adapter
    assert head == 0 or not any("classifier" in n for n in model.mol_trainable)
    randomize(model)
    assert not torch.allclose(logits(model, ids, mask), logits(base, ids, mask), atol=1e-4)
    step_and_check_frozen(model, ids, mask)
    roundtrip(model, copy.deepcopy(base), tmp_path, ids, mask)


def test_adapter_bottleneck_size_and_explicit_modules():
    model = mol.inject(tiny_llama(), mol.AdapterConfig(placement="houlsby", bottleneck_size=5, non_linearity="gelu",
                                                       attn_modules=["self_attn"], mlp_modules=r".*\.mlp"))
    assert mol.trainable_parameters(model)[0] == 4 * (32 * 5 + 5 + 5 * 32 + 32)
    mlp = model.model.layers[1].mlp
    ad = mlp.mol_adapter
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        ad.adapter_up.weight.normal_()
        base_mlp = copy.deepcopy(mlp)
        base_mlp._forward_hooks.clear()  # the same MLP without its adapter
        y = base_mlp(h)
        want = y + ad.adapter_up(nn.functional.gelu(ad.adapter_down(y)))
    assert not torch.equal(want, y)
    assert torch.allclose(mlp(h), want, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_adapters_take_their_blocks_device(arch):
    """A model split over devices (device_map) has each block on its own: every adapter is built where its
    sub-layer computes (BERT's hooked dropout has no tensors: its parent's), not on the model's first tensor's
    device. The meta device stands in for a second GPU."""
    model = {"bert": tiny_bert, **MODELS}[arch]()
    blocks = model.model.layers if arch == "llama" else model.bert.encoder.layer
    blocks[1].to("meta")
    model = mol.inject(model, mol.AdapterConfig(placement="houlsby", reduction_factor=4))
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, mol.methods.BottleneckAdapter)}
    assert len(adapters) == 4
    for name, adapter in adapters.items():
        where = "meta" if (".layers.1." in name or ".layer.1." in name) else "cpu"
        assert {p.device.type for p in adapter.parameters()} == {where}, name


def test_adapter_on_a_sublayer_of_another_width_is_named():
    model = mol.inject(tiny_llama(), mol.AdapterConfig(mlp_modules=["gate_proj"]))  # 70 wide, hidden 32
    with pytest.raises(ValueError, match=r"hidden size 32 sits on a Linear whose output is \(3, 9, 70\): point "
                                         "attn_modules/mlp_modules"):
        logits(model, *batch())


# ---- BitFit ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bitfit(arch, tmp_path):
    base = MODELS[arch]()
    ids, mask = batch()
    model = mol.inject(copy.deepcopy(base), mol.BitFitConfig())
    assert torch.equal(logits(model, ids, mask), logits(base, ids, mask))
    assert all(n.endswith(".bias") for n in model.mol_trainable)
    if arch == "llama":  # no biases at all: one zero bias per linear (q, k, v, o, gate, up, down), not lm_head
        want = 2 * (32 + 16 + 16 + 32 + 70 + 70 + 32)
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    else:  # every bias GPT-2 has (linears and LayerNorms)
        want = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    assert mol.trainable_parameters(model)[0] == want
    randomize(model)
    step_and_check_frozen(model, ids, mask)
    roundtrip(model, copy.deepcopy(base), tmp_path, ids, mask)


def test_bitfit_linear_biases_only():
    model = mol.inject(tiny_gpt2(), mol.BitFitConfig(target_modules=["c_attn"], all_biases=False))
    assert model.mol_trainable == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]


# ---- composition, save/load, errors ---------------------------------------------------------------------


def test_composition_mol_mlp_plus_prefix_roundtrip(tmp_path):
    base = tiny_llama()
    ids, mask = batch()
    configs = [mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
               mol.PrefixTuningConfig(num_virtual_tokens=4)]
    model = mol.inject(copy.deepcopy(base), configs)
    randomize(model)
    assert any(n.startswith("mol_prefix.") for n in model.mol_trainable)
    assert any(".mlp.down_proj.lora_A" in n for n in model.mol_trainable)
    step_and_check_frozen(model, ids, mask)
    loaded = roundtrip(model, copy.deepcopy(base), tmp_path, ids, mask)
    assert [c.to_dict() for c in loaded.mol_configs] == [c.to_dict() for c in configs]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert [c["method"] for c in saved["configs"]] == ["mol", "prefix"]
    with torch.no_grad():
        g1 = loaded.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
        g2 = loaded.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


def test_composition_adapters_ia3_bitfit(tmp_path):
    base = tiny_llama()
    ids, mask = batch()
    configs = [mol.IA3Config(), mol.AdapterConfig(placement="houlsby"), mol.PromptTuningConfig(num_virtual_tokens=2)]
    model = mol.inject(copy.deepcopy(base), configs)
    randomize(model)
    roundtrip(model, copy.deepcopy(base), tmp_path, ids, mask)
    with pytest.raises(ValueError, match="cannot merge"):
        mol.merge(model)


@pytest.mark.parametrize("cfg,match", [
    (lambda: mol.AdapterConfig(placement="middle"), "placement"),
    (lambda: mol.AdapterConfig(reduction_factor=0), "reduction_factor"),
    (lambda: mol.AdapterConfig(non_linearity="elu"), "non_linearity"),
    (lambda: mol.AdapterConfig(mlp_modules=["nope"]), "matched no module"),
    (lambda: mol.AdapterConfig(placement="houlsby", mlp_modules=["mlp"]), "attn_modules"),
    (lambda: mol.AdapterConfig(attn_modules=["self_attn"], mlp_modules=["mlp"]), "attn_modules only applies with "
                                                                                  "placement='houlsby'"),
    (lambda: mol.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "subset"),
    (lambda: mol.IA3Config(target_modules=["self_attn"]), "cannot adapt"),
    (lambda: mol.BitFitConfig(target_modules=[]), "target_modules"),
    (lambda: mol.PrefixTuningConfig(num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: mol.PrefixTuningConfig(encoder_hidden_size=8), "prefix_projection"),
    (lambda: mol.PromptTuningConfig(init="text"), "init"),
])
def test_bad_configs_raise_with_fix(cfg, match):
    with pytest.raises(ValueError, match=match):
        mol.inject(tiny_llama(), cfg())


def test_prefix_errors():
    with pytest.raises(ValueError, match="decoder-only"):
        mol.inject(tiny_bert(), mol.PrefixTuningConfig())
    model = mol.inject(tiny_llama(), mol.PromptTuningConfig())
    with pytest.raises(ValueError, match="one of prefix or prompt"):
        mol.inject(model, mol.PrefixTuningConfig())
    ids = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 4, 4))


def test_configs_reload_from_json():
    for cfg in (mol.AdapterConfig(placement="houlsby", bottleneck_size=3), mol.IA3Config(target_modules=["k_proj"]),
                mol.BitFitConfig(all_biases=False), mol.PrefixTuningConfig(prefix_projection=True),
                mol.PromptTuningConfig(num_virtual_tokens=3, init="random")):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert mol.config_from_dict(d) == cfg


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_bert_classifier_matches_peft(method):
    """Encoders too: prompt tuning and IA³ on a BERT classifier (PEFT's SEQ_CLS), with the head trained alongside."""
    base = tiny_bert()
    ids, mask = batch()
    if method == "prompt":
        ours_cfg = mol.PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["classifier"])
        ref_cfg = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    else:
        ours_cfg = mol.IA3Config(modules_to_save=["classifier"])
        ref_cfg = peft.IA3Config(task_type="SEQ_CLS")
    ours = mol.inject(copy.deepcopy(base), ours_cfg)
    ref = peft_model(copy.deepcopy(base), ref_cfg)
    randomize(ours)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.startswith("prompt_encoder."):
                p.copy_(params["mol_prompt." + n.split("default.", 1)[1]])
            elif ".ia3_l." in n:
                p.copy_(params[n.removeprefix("base_model.model.").replace(".ia3_l.default", ".ia3_l")].view_as(p))
            elif "classifier.modules_to_save" in n:
                p.copy_(params["classifier." + n.rsplit(".", 1)[1]])
    tt = torch.zeros_like(ids)
    assert_close(logits(ours, ids, mask, token_type_ids=tt), logits(ref, ids, mask, token_type_ids=tt))
    assert any(n.startswith("classifier.") for n in ours.mol_trainable)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompt_tuning_on_a_decoder_classifier_pools_each_sequence_s_last_real_token(kind):
    """Hugging Face's decoder classifiers (Llama, GPT-2, ...ForSequenceClassification) pool each sequence's last
    token that is not pad_token_id, read from input_ids; given only inputs_embeds they pool the last position. Prompt
    tuning passed the embeddings alone, so in a right-padded batch (mol.train's collator pads right) every shorter
    sequence was classified from a padding position. Reference: the same sequence alone, without padding."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if kind == "llama":
        base = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0))
    else:
        base = GPT2ForSequenceClassification(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, num_labels=3,
                                                        pad_token_id=0))
    model = mol.inject(base.eval(), mol.PromptTuningConfig(num_virtual_tokens=3, modules_to_save=["score"]))
    randomize(model)
    short, long = torch.randint(1, 97, (5,)), torch.randint(1, 97, (8,))
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[0, :5], ids[1] = short, long
    mask = (ids != 0).long()
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for row, alone in enumerate((short, long)):
            assert_close(batched[row], model(input_ids=alone[None]).logits[0])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prompt_tuning_on_question_answering_lines_the_span_up_with_the_caller_s_tokens(kind):
    """A question-answering head's start / end logits came back over the virtual tokens too, one column per position
    in front of the caller's tokens, and its loss read start_positions / end_positions as indices into that longer
    sequence: every answer span shifted n tokens to the left, into the prompt. Reference: the base model on the
    prompt's embeddings in front of the tokens' own, its targets n further on."""
    from transformers import BertConfig, BertForQuestionAnswering, LlamaConfig, LlamaForQuestionAnswering

    torch.manual_seed(0)
    if kind == "bert":
        base = BertForQuestionAnswering(BertConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4)).eval()
    else:
        base = LlamaForQuestionAnswering(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2)).eval()
    n = 3
    model = mol.inject(copy.deepcopy(base), mol.PromptTuningConfig(num_virtual_tokens=n))
    randomize(model)
    ids, start, end = torch.randint(1, 97, (2, 8)), torch.tensor([2, 5]), torch.tensor([4, 6])
    with torch.no_grad():
        out = model(input_ids=ids, start_positions=start, end_positions=end)
        embeds = base.get_input_embeddings()(ids)
        prompted = torch.cat([model.mol_prompt.embedding.weight.expand(2, -1, -1), embeds], dim=1)
        want = base(inputs_embeds=prompted, start_positions=start + n, end_positions=end + n)
        as_tuple = model(input_ids=ids, start_positions=start, end_positions=end, return_dict=False)
    assert_close(out.loss, want.loss)
    assert_close(out.start_logits, want.start_logits[:, n:])
    assert_close(out.end_logits, want.end_logits[:, n:])
    assert_close(as_tuple[1], out.start_logits)
    assert_close(as_tuple[2], out.end_logits)


def test_ia3_and_bitfit_on_nf4_base_with_mol():
    """QLoRA-style: MoL quantizes the base to NF4; IA³ and BitFit then adapt NF4 layers (IA³ refuses to merge)."""
    base = tiny_llama()
    ids, mask = batch()
    model = mol.inject(copy.deepcopy(base), [
        mol.MoLConfig(quantize_base="nf4", target_modules=["q_proj"], num_experts=2, top_k=1, rank=2),
        mol.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        mol.BitFitConfig(target_modules=["o_proj"], all_biases=False)])
    assert getattr(model.model.layers[0].self_attn.v_proj.base_layer, "is_quantized_linear", False)
    randomize(model)
    step_and_check_frozen(model, ids, mask)
    assert "quantized" in model.model.layers[0].self_attn.v_proj.merge_blocker()


def test_deepcopy_keeps_hooks_on_the_copy():
    model = mol.inject(tiny_llama(), [mol.PrefixTuningConfig(num_virtual_tokens=3), mol.AdapterConfig()])
    randomize(model)
    ids, mask = batch()
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, ids, mask), logits(model, ids, mask))
    with torch.no_grad():
        twin.mol_prefix.embedding.weight.zero_()
        twin.model.layers[0].mlp.mol_adapter.adapter_up.weight.zero_()
    assert not torch.allclose(logits(twin, ids, mask), logits(model, ids, mask), atol=1e-4)
    assert torch.equal(logits(model, ids, mask), logits(copy.deepcopy(model), ids, mask))


def test_bitfit_then_lora_on_the_same_layers(tmp_path):
    base = tiny_llama()
    ids, mask = batch()
    model = mol.inject(copy.deepcopy(base), [mol.BitFitConfig(all_biases=False), mol.LoRAConfig(rank=2)])
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in model.mol_trainable
    randomize(model)
    step_and_check_frozen(model, ids, mask)
    roundtrip(model, copy.deepcopy(base), tmp_path, ids, mask)


def test_layers_injected_into_an_eval_model_run_in_eval_mode(tmp_path):
    """from_pretrained hands back a model in eval mode: the layers inject and load_adapter add (LoRA's and the
    bottleneck adapters' dropout) must take that mode, or inference drops activations at random. The reference is
    PEFT's PeftModel.from_pretrained of the same LoRA (eval mode) and the adapted model switched to eval itself."""
    base = tiny_llama()
    ids, mask = batch()
    trained = mol.inject(copy.deepcopy(base).train(), mol.LoRAConfig(rank=4, dropout=0.3, target_modules="all-linear"))
    randomize(trained)
    mol.export_peft(trained, tmp_path / "peft")
    mol.save_adapter(trained, tmp_path / "mol")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    for loaded in (mol.load_adapter(copy.deepcopy(base), tmp_path / "mol"),
                   mol.import_peft(copy.deepcopy(base), tmp_path / "peft")):
        assert not any(m.training for m in loaded.modules())
        assert_close(logits(loaded, ids, mask), logits(ref, ids, mask), rel=1e-6)
    adapters = mol.inject(copy.deepcopy(base), mol.AdapterConfig(dropout=0.3))
    randomize(adapters)
    first = logits(adapters, ids, mask)
    assert torch.equal(first, logits(adapters.eval(), ids, mask))
    train_base = copy.deepcopy(base).train()
    assert all(m.training for m in mol.inject(train_base, mol.LoRAConfig(rank=2, dropout=0.1)).modules())


@pytest.mark.parametrize("method, fields", [
    ("IA3Config", {"target_modules": {"k_proj", "down_proj"}, "feedforward_modules": {"down_proj"}}),
    ("BitFitConfig", {"target_modules": {"q_proj", "up_proj"}}),
    ("AdapterConfig", {"placement": "houlsby", "attn_modules": {"o_proj"}, "mlp_modules": {"down_proj"},
                       "reduction_factor": 4}),
    ("PrefixTuningConfig", {"num_virtual_tokens": 3, "modules_to_save": {"lm_head"}}),
    ("LoRAConfig", {"rank": 4, "target_modules": {"q_proj", "v_proj"}, "modules_to_save": {"lm_head"}}),
])
def test_every_method_takes_sets_of_module_names_as_peft_does(method, fields, tmp_path):
    """PEFT's configs take sets of module names. Only LoRA / MoL took them here: IA3Config, BitFitConfig and
    AdapterConfig refused a set as 'invalid', and a set in modules_to_save was refused by every other method. A set
    now gives the adapter the same names as a sorted list give, and saves and reloads."""
    base = tiny_llama()
    as_lists = {k: sorted(v) if isinstance(v, set) else v for k, v in fields.items()}
    torch.manual_seed(0)
    ours = mol.inject(copy.deepcopy(base), getattr(mol, method)(**fields))
    torch.manual_seed(0)
    ref = mol.inject(copy.deepcopy(base), getattr(mol, method)(**as_lists))
    randomize(ours)
    ref.load_state_dict(ours.state_dict())
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    ids, mask = batch()
    assert_close(logits(ours, ids, mask), logits(ref, ids, mask))
    mol.save_adapter(ours, tmp_path / "a")
    saved = json.loads(next((tmp_path / "a").glob("*.json")).read_text())
    assert all(not isinstance(v, set) for v in saved.values())
    loaded = mol.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(logits(loaded, ids, mask), logits(ours, ids, mask))
    assert mol.match_modules(base, {"v_proj", "q_proj"}) == mol.match_modules(base, ["q_proj", "v_proj"])
