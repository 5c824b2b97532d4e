"""mol.from_bnb_4bit: a bitsandbytes 4-bit NF4 checkpoint (written by save_bnb_4bit) loaded into NF4Linear layers on
a model built on the meta device. References: the quantized model the checkpoint was saved from, and the manual
path (a full-precision model, load_bnb_4bit, load_state_dict of the rest)."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import mol
from mol.quant import NF4Linear, load_bnb_4bit

IDS = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _llama(tied=False, **kw):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                   max_position_embeddings=64, tie_word_embeddings=tied, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _saved(tmp_path, tied=False, name="ckpt"):
    model = mol.quantize(_llama(tied), "nf4")
    return model, mol.save_bnb_4bit(model, tmp_path / name)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _shard(directory):
    """Split model.safetensors into two shards and an index, as save_pretrained(max_shard_size=...) does; the
    boundary runs through a 4-bit layer's entries (its quant_state in the other shard than its codes)."""
    sd = load_file(directory / "model.safetensors")
    keys = sorted(sd)
    split = keys.index("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4")
    names = {"model-00001-of-00002.safetensors": keys[:split], "model-00002-of-00002.safetensors": keys[split:]}
    for file, part in names.items():
        save_file({k: sd[k] for k in part}, directory / file, metadata={"format": "pt"})
    (directory / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, part in names.items() for k in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("tied, sharded", [(False, False), (True, False), (False, True)])
def test_loads_the_saved_model_exactly(tmp_path, tied, sharded):
    model, directory = _saved(tmp_path, tied)
    if sharded:
        _shard(directory)
    loaded = mol.from_bnb_4bit(directory)
    assert type(loaded) is type(model) and not loaded.training
    assert ({n for n, m in loaded.named_modules() if isinstance(m, NF4Linear)}
            == {n for n, m in model.named_modules() if isinstance(m, NF4Linear)})
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert getattr(loaded.config, "quantization_config", None) is None  # as a mol.quantize'd model
    ref = _logits(model)
    assert torch.equal(_logits(loaded), ref)
    # rotary inv_freq is a non-persistent buffer, not in the checkpoint: computed, not left empty
    for name in ("inv_freq", "original_inv_freq"):
        assert torch.equal(getattr(loaded.model.rotary_emb, name), getattr(model.model.rotary_emb, name))
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    # the manual path: a full-precision model, load_bnb_4bit, the rest with load_state_dict
    if not sharded:
        sd = load_file(directory / "model.safetensors")
        fresh = _llama(tied)
        names = load_bnb_4bit(fresh, sd)
        fresh.load_state_dict({k: v for k, v in sd.items() if not any(k.startswith(n + ".") for n in names)},
                              strict=False)
        assert torch.equal(_logits(fresh), ref)


def test_no_layer_is_built_in_full_precision(tmp_path, monkeypatch):
    """Every nn.Linear and nn.Embedding the loader constructs holds a meta weight: nothing of the model's size is
    allocated before the checkpoint's tensors are read."""
    _, directory = _saved(tmp_path)
    devices = []
    for cls in (nn.Linear, nn.Embedding):
        original = cls.reset_parameters

        def spy(self, original=original):
            devices.append(self.weight.device.type)
            return original(self)
        monkeypatch.setattr(cls, "reset_parameters", spy)
    mol.from_bnb_4bit(directory)
    assert devices and set(devices) == {"meta"}


def test_dtype_defaults_to_the_compute_dtype_and_can_be_set(tmp_path):
    model, directory = _saved(tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_compute_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(cfg))
    loaded = mol.from_bnb_4bit(directory)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it
    as32 = mol.from_bnb_4bit(directory, dtype=torch.float32)
    assert torch.equal(_logits(as32), _logits(model))
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        mol.from_bnb_4bit(directory, dtype=torch.int8)


def test_qlora_on_the_loaded_model_trains_and_the_base_round_trips(tmp_path):
    _, directory = _saved(tmp_path)
    loaded = mol.from_bnb_4bit(directory)
    mol.inject(loaded, mol.LoRAConfig(rank=4, target_modules="all-linear"))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)  # not quantized twice
    trained = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trained and all("lora" in n for n in trained)
    opt = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    loaded.train()
    losses = []
    for _ in range(3):
        loss = loaded(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in loaded.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the base written back is the checkpoint read
    mol.unload(loaded)
    mol.save_bnb_4bit(loaded, tmp_path / "again")
    a, b = load_file(directory / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_hub_repo_id_loads_as_its_local_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from test_hub import _commit

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, directory = _saved(tmp_path)
    _commit(cache, "org/tiny-bnb", directory)
    _commit(cache, "org/tiny-bnb-sharded", _shard(_saved(tmp_path, name="other")[1]))
    ref = _logits(mol.from_bnb_4bit(directory))
    assert torch.equal(_logits(mol.from_bnb_4bit("org/tiny-bnb")), ref)
    assert torch.equal(_logits(mol.from_bnb_4bit("org/tiny-bnb-sharded")), ref)
    with pytest.raises(FileNotFoundError, match=r"'org/missing' is no local directory.*not in the local Hugging Face "
                                                r"cache"):
        mol.from_bnb_4bit("org/missing")


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    qc = cfg.get("quantization_config", {})
    for k, v in changes.items():
        if v is None:
            qc.pop(k, None)
        else:
            qc[k] = v
    if changes.get("quant_method") is None and "quant_method" in changes:
        del cfg["quantization_config"]
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, error", [
    ({"bnb_4bit_quant_type": "fp4"}, r"bitsandbytes 4-bit checkpoint of quant_type 'fp4'; mol reads NF4 only"),
    ({"load_in_4bit": False, "load_in_8bit": True}, r"is a bitsandbytes 8-bit \(LLM.int8\) checkpoint; mol reads "
                                                    r"4-bit NF4 only"),
    ({"quant_method": "gptq"}, r"is quantized with quant_method='gptq'; mol reads bitsandbytes 4-bit NF4 "
                               r"checkpoints only: load this one with transformers and its gptq package"),
    ({"quant_method": None}, r"has no quantization_config: the checkpoint is full precision. Load it with "
                             r"from_pretrained and call mol.quantize\(model, 'nf4'\)"),
])
def test_refuses_what_is_no_bnb_nf4_checkpoint(tmp_path, changes, error):
    _, directory = _saved(tmp_path)
    _edit_config(directory, **changes)
    with pytest.raises(ValueError, match=error):
        mol.from_bnb_4bit(directory)


def test_refuses_a_damaged_or_mismatched_checkpoint(tmp_path):
    import transformers

    _, directory = _saved(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds no config.json"):
        mol.from_bnb_4bit(tmp_path)
    # an architecture the tensors do not fit: another model class
    with pytest.raises(ValueError, match=r"none of the state dict's 14 4-bit entries names a module of LlamaModel"):
        mol.from_bnb_4bit(directory, transformers.LlamaModel)
    with pytest.raises(TypeError, match="model_class must be a transformers model class or auto class"):
        mol.from_bnb_4bit(directory, nn.Linear)
    # a config of another size: a shape mismatch, named
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    with pytest.raises(ValueError, match=r"do not fit LlamaForCausalLM: \['lm_head.weight: \(96, 64\) in the "
                                         r"checkpoint, \(100, 64\) in the model'"):
        mol.from_bnb_4bit(directory)
    # more layers than the checkpoint holds: missing tensors, named
    (directory / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"lacks 9 tensors of LlamaForCausalLM, e.g. \['model.layers.2.input_"
                                         r"layernorm.weight'.*does not match the architecture"):
        mol.from_bnb_4bit(directory)
    (directory / "config.json").write_text(json.dumps(cfg))
    # a tensor the model has no place for
    sd = load_file(directory / "model.safetensors")
    save_file({**sd, "model.extra.weight": torch.zeros(3)}, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"holds 1 tensors that LlamaForCausalLM has no place for, e.g. "
                                         r"\['model.extra.weight'\]"):
        mol.from_bnb_4bit(directory)
    save_file(sd, directory / "model.safetensors")
    # a sharded checkpoint with a shard missing
    _shard(directory)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 2 shards, of which \['model-00002-of-00002.safetensors'\] is "
                                                r"missing"):
        mol.from_bnb_4bit(directory)
    (directory / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds neither model.safetensors nor model.safetensors.index.json"):
        mol.from_bnb_4bit(directory)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_mol_train_trains_lora_on_a_bnb_4bit_checkpoint(tmp_path, monkeypatch, method):
    """model.path holding a bitsandbytes 4-bit checkpoint: mol.train loads it with from_bnb_4bit (no bitsandbytes)
    and trains LoRA on its NF4 layers; quantize_base=nf4 (method=qlora) on it quantizes nothing twice. The adapter
    saved loads back on the same checkpoint."""
    import transformers

    import mol.quant
    from mol.train.app import run
    from test_hub import _train_cfg

    cfg = _train_cfg(tmp_path, f"method={method}", "method.rank=4")
    model_dir = cfg.model.path
    mol.save_bnb_4bit(mol.quantize(transformers.LlamaForCausalLM.from_pretrained(model_dir), "nf4"), model_dir)
    loaded = []
    original = mol.quant.from_bnb_4bit
    monkeypatch.setattr(mol.quant, "from_bnb_4bit", lambda *a, **kw: loaded.append(original(*a, **kw)) or loaded[-1])
    results = run(cfg)
    assert results["run"]["steps"] == 2
    model = loaded[0]
    layers = [m for m in model.modules() if isinstance(m, mol.MoLLinear)]
    assert layers and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    adapter = tmp_path / "run" / "adapter"
    again = mol.load_adapter(mol.from_bnb_4bit(model_dir), adapter)
    ids = torch.randint(4, 20, (2, 6))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_a_causal_checkpoint_read_as_a_classifier_gets_a_new_head_and_the_saved_body(tmp_path):
    """AutoModelForSequenceClassification from a causal LM's bitsandbytes checkpoint: the body is the checkpoint's
    (its hidden states equal the causal model's to the bit), the `score` head it lacks is initialised as
    transformers initialises it (a warning names it, and the unused lm_head); without new_heads it is refused."""
    import transformers

    model, directory = _saved(tmp_path)
    overrides = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    with pytest.raises(ValueError, match=r"holds 1 tensors that LlamaForSequenceClassification has no place for, "
                                         r"e.g. \['lm_head.weight'\].*name the new task head this class adds in "
                                         r"new_heads="):
        mol.from_bnb_4bit(directory, transformers.AutoModelForSequenceClassification, config_overrides=overrides)
    with pytest.warns(UserWarning, match=r"score: not in .* initialised as transformers initialises a new head.*"
                                         r"1 tensors of .* left unused, e.g. \['lm_head.weight'\]"):
        clf = mol.from_bnb_4bit(directory, transformers.AutoModelForSequenceClassification, new_heads=["score"],
                                config_overrides=overrides)
    assert isinstance(clf, transformers.LlamaForSequenceClassification) and clf.config.id2label[2] == "c"
    assert clf.score.weight.shape == (3, 64) and torch.isfinite(clf.score.weight).all()
    std = clf.config.initializer_range
    assert 0.5 * std < clf.score.weight.std().item() < 1.5 * std  # transformers' normal init, not leftover memory
    with torch.no_grad():
        want = model.model(input_ids=IDS).last_hidden_state
        got = clf.model(input_ids=IDS).last_hidden_state
        assert torch.equal(got, want)
        logits = clf(input_ids=IDS).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_mol_train_trains_a_classifier_on_a_bnb_4bit_checkpoint(tmp_path, monkeypatch):
    """model=hf_classifier on a causal LM's bitsandbytes checkpoint: a new `score` head for the data's labels,
    trained through modules_to_save beside LoRA on the NF4 layers, and saved with the adapter."""
    import transformers

    import mol.quant
    from mol.train.app import run
    from test_train_utils import compose, make_classification_data, make_tiny_llama, quiet_trainer_overrides

    llama = make_tiny_llama(tmp_path / "llama")
    mol.save_bnb_4bit(mol.quantize(transformers.LlamaForCausalLM.from_pretrained(llama), "nf4"), tmp_path / "bnb")
    data = make_classification_data(tmp_path / "data")
    loaded = []
    original = mol.quant.from_bnb_4bit
    monkeypatch.setattr(mol.quant, "from_bnb_4bit", lambda *a, **kw: loaded.append(original(*a, **kw)) or loaded[-1])
    with pytest.warns(UserWarning, match="score: not in"):
        results = run(compose(["model=hf_classifier", f"model.path={tmp_path / 'bnb'}", f"model.tokenizer={llama}",
                               "model.modules_to_save=[score]", "method=lora", "method.rank=4", "data=jsonl",
                               f"data.train={data['train']}", f"data.val={data['val']}", "data.batch_size=8",
                               "data.max_length=24", f"data.cache_dir={tmp_path / 'cache'}", "baseline.enabled=false",
                               f"output_dir={tmp_path / 'run'}", "trainer.max_epochs=-1", "trainer.max_steps=3",
                               *quiet_trainer_overrides()]))
    model = loaded[0]
    assert results["run"]["steps"] == 3 and "val/acc" in results["run"]
    assert isinstance(model, transformers.LlamaForSequenceClassification) and model.score.weight.shape[0] == 4
    layers = [m for m in model.modules() if isinstance(m, mol.MoLLinear)]
    assert layers and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert torch.equal(saved["score.weight"], model.score.weight.detach().float().cpu().to(saved["score.weight"].dtype))


def test_mol_train_takes_only_nf4_checkpoints_to_from_bnb_4bit():
    """fp4 and 8-bit checkpoints still go to from_pretrained (bitsandbytes' own layers, where it is installed)."""
    from mol.quant.pretrained import is_bnb_nf4_config

    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert is_bnb_nf4_config({"quantization_config": nf4})
    for other in ({**nf4, "bnb_4bit_quant_type": "fp4"}, {k: v for k, v in nf4.items() if k != "bnb_4bit_quant_type"},
                  {"quant_method": "bitsandbytes", "load_in_8bit": True}, {**nf4, "quant_method": "gptq"}, None):
        assert not is_bnb_nf4_config({"quantization_config": other})


def test_a_checkpoint_without_a_4bit_layers_bias_is_refused(tmp_path):
    """A checkpoint lacking the bias of a 4-bit layer (a model with attention biases) loaded without a word into a
    layer without a bias, the model computing something else than the one saved."""
    model = mol.quantize(_llama(attention_bias=True), "nf4")
    directory = mol.save_bnb_4bit(model, tmp_path / "ckpt")
    assert torch.equal(_logits(mol.from_bnb_4bit(directory)), _logits(model))
    sd = load_file(directory / "model.safetensors")
    del sd["model.layers.1.self_attn.v_proj.bias"]
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors of LlamaForCausalLM, e.g. "
                                         r"\['model.layers.1.self_attn.v_proj.bias'\]"):
        mol.from_bnb_4bit(directory)


def test_the_4bit_layers_compute_in_the_compute_dtype_and_it_round_trips(tmp_path):
    """A checkpoint quantized from float32 weights with bnb_4bit_compute_dtype bfloat16 (as transformers writes
    one loaded in one dtype with a compute dtype of another): the model is built in bfloat16, but its NF4 layers
    still stood for float32 weights, so adapter_dtype="base" trained float32 adapters in a bfloat16 model (a
    bitsandbytes Linear4bit gives them its compute dtype) and save_bnb_4bit wrote bnb_4bit_compute_dtype float32."""
    _, directory = _saved(tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_compute_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(cfg))
    loaded = mol.from_bnb_4bit(directory)
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and q.weight_dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    mol.inject(loaded, mol.LoRAConfig(rank=4, adapter_dtype="base"))
    assert {p.dtype for p in loaded.parameters() if p.requires_grad} == {torch.bfloat16}
    mol.unload(loaded)
    again = mol.save_bnb_4bit(loaded, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"] == \
        "bfloat16"
    assert mol.from_bnb_4bit(again).model.layers[0].self_attn.q_proj.weight_dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [True, False])
def test_save_bnb_4bit_leaves_out_tied_copies_as_save_pretrained_does(tmp_path, tied):
    """save_bnb_4bit compared the state dict's entries of a tied head and its input embedding by identity, but
    state_dict() gives each name a tensor object of its own: the head's copy of the embedding was always written
    (a vocab x hidden tensor more than save_pretrained and bitsandbytes' checkpoints hold)."""
    model, directory = _saved(tmp_path, tied)
    _llama(tied).save_pretrained(tmp_path / "plain")
    written, plain = load_file(directory / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert ("lm_head.weight" in written) == ("lm_head.weight" in plain) == (not tied)
    loaded = mol.from_bnb_4bit(directory)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert torch.equal(_logits(loaded), _logits(model))


def test_a_moe_checkpoint_with_experts_one_at_a_time_is_refused_saying_so(tmp_path):
    """transformers saves a mixture-of-experts model's fused experts one expert at a time ('experts.0.down_proj.
    weight', fused again on load), and so does every such bitsandbytes checkpoint it writes; from_bnb_4bit, which
    reads the fused tensors only, said the tensors had no place in the model and advised the class they were saved
    from, which they were. (A checkpoint with fused experts, as save_bnb_4bit writes, loads.)"""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "plain")  # transformers' own layout of the experts
    per_expert = {k: v for k, v in load_file(tmp_path / "plain" / "model.safetensors").items() if ".experts." in k}
    assert per_expert and all(k.split(".experts.")[1].split(".")[0].isdigit() for k in per_expert)
    quantized = mol.quantize(model, "nf4", skip=["experts"])
    directory = mol.save_bnb_4bit(quantized, tmp_path / "ckpt")
    assert torch.equal(_logits(mol.from_bnb_4bit(directory)), _logits(quantized))
    sd = {k: v for k, v in load_file(directory / "model.safetensors").items() if ".experts." not in k}
    save_file({**sd, **per_expert}, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds the mixture-of-experts weights one expert at a time \(e.g. "
                                         r"'model.layers.0.mlp.experts.0.down_proj.weight'.*call "
                                         r"mol.quantize\(model, 'nf4'\)"):
        mol.from_bnb_4bit(directory)


def test_save_bnb_4bit_writes_the_generation_config_as_save_pretrained_does(tmp_path):
    """save_bnb_4bit wrote no generation_config.json: a chat model's extra stop tokens and sampling defaults (which
    from_bnb_4bit reads from a Hub checkpoint) were lost in a from_bnb_4bit -> save_bnb_4bit round trip, and
    generate() on the saved model ran past the end of a turn."""
    model = _llama()
    model.generation_config.eos_token_id = [2, 5]
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    model.save_pretrained(tmp_path / "plain")
    directory = mol.save_bnb_4bit(mol.quantize(model, "nf4"), tmp_path / "ckpt")
    written = json.loads((directory / "generation_config.json").read_text())
    reference = json.loads((tmp_path / "plain" / "generation_config.json").read_text())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == \
        {k: v for k, v in reference.items() if k != "transformers_version"}
    loaded = mol.from_bnb_4bit(directory)
    assert loaded.generation_config.eos_token_id == [2, 5] and loaded.generation_config.temperature == 0.6
    again = mol.save_bnb_4bit(loaded, tmp_path / "again")
    assert json.loads((again / "generation_config.json").read_text())["eos_token_id"] == [2, 5]
