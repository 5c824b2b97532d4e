"""save/load round trips, merge, and the errors a user hits with bad input (each must name the fix)."""

import copy
import json
import os

import pytest
import torch

import mol
from conftest import make_tiny_llama


def _train_a_little(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("config", [
    mol.MoLConfig(rank=4, num_experts=4, top_k=2, router="topk", target_modules="all-linear"),
    mol.MoLConfig(rank=2, num_experts=3, top_k=1, router="sequence", target_modules=r".*\.mlp\.(up|down)_proj"),
    mol.LoRAConfig(rank=3, alpha=5, target_modules=["k_proj", "o_proj"], use_rslora=True),
])
def test_save_load_round_trip_on_fresh_base(tmp_path, config):
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), config)
    _train_a_little(model)
    ids = torch.randint(0, 101, (2, 7))
    expected = model(input_ids=ids).logits
    mol.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = mol.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(fresh(input_ids=ids).logits, expected)
    # Only the adapter was saved: far smaller than the model.
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == mol.trainable_parameters(model)[0]
    assert not any("base_layer" in k for k in saved)


def test_save_adapter_writes_given_tensors_and_refuses_a_partial_set(tmp_path):
    """save_adapter(tensors=...) (mol.train under FSDP, whose parameters are shard views) writes those tensors under
    the model's configs, and loads back as the model; a set that lacks or adds a name writes nothing."""
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.MoLConfig(rank=4, num_experts=4, top_k=2, target_modules=["q_proj"]))
    _train_a_little(model)
    whole = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()  # what the model holds is not what is written
    mol.save_adapter(model, tmp_path / "a", tensors=whole)
    loaded = mol.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for n, p in loaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, whole[n]), n
    first = sorted(whole)[0]
    for bad, match in [({k: v for k, v in whole.items() if k != first}, f"it lacks {first} .1 missing, 0 extra"),
                       ({**whole, "model.extra": whole[first]}, "model.extra is none of them .0 missing, 1 extra")]:
        with pytest.raises(ValueError, match=match + r".*nothing was written"):
            mol.save_adapter(model, tmp_path / "b", tensors=bad)
    assert not (tmp_path / "b").exists()


def test_trainable_parameters_and_head_excluded():
    model = mol.inject(make_tiny_llama(), mol.MoLConfig(rank=2, num_experts=3, top_k=1))
    assert not isinstance(model.lm_head, mol.MoLLinear)
    layers = [m for m in model.modules() if isinstance(m, mol.MoLLinear)]
    assert len(layers) == 2 * 7  # q k v o gate up down per layer
    expected = sum(3 * 2 * (m.in_features + m.out_features) + 3 * m.in_features for m in layers)
    trainable, total = mol.trainable_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in model.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "router" not in n)


def test_load_rejects_adapter_with_other_shapes(tmp_path):
    base = make_tiny_llama()
    mol.save_adapter(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["q_proj"])), tmp_path)
    bigger = make_tiny_llama(hidden=48)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.lora_A' has shape"):
        mol.load_adapter(bigger, tmp_path)


def test_load_rejects_adapter_for_other_modules(tmp_path):
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["q_proj"]))
    mol.save_adapter(model, tmp_path)
    other = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="already carries a different adapter"):
        mol.load_adapter(other, tmp_path)
    # Same config, but the tensors on disk are for a 1-layer model: the first missing key is named.
    one_layer = mol.inject(make_tiny_llama(layers=1), mol.LoRAConfig(rank=4, target_modules=["q_proj"]))
    mol.save_adapter(one_layer, tmp_path / "small")
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.1\.self_attn\.q_proj\.lora_A'"):
        mol.load_adapter(copy.deepcopy(base), tmp_path / "small")


def test_truncated_or_corrupt_files_fail_clearly_and_change_nothing(tmp_path):
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.MoLConfig(rank=2, num_experts=2, top_k=1, target_modules=["q_proj"]))
    _train_a_little(model)
    mol.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    target = mol.inject(copy.deepcopy(base), mol.MoLConfig(rank=2, num_experts=2, top_k=1, target_modules=["q_proj"]))
    before = {n: p.clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match="truncated or corrupt"):
        mol.load_adapter(target, tmp_path)
    assert all(torch.equal(before[n], p) for n, p in target.named_parameters())
    weights.write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        mol.load_adapter(target, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        mol.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mol.load_adapter(copy.deepcopy(base), tmp_path / "nowhere")


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    mol.save_adapter(model, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("mol.io.save_file", half_write)
    _train_a_little(model)
    with pytest.raises(OSError, match="disk full"):
        mol.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_merge_unmerge_lora_keeps_logits():
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=4, alpha=8))
    _train_a_little(model)
    ids = torch.randint(0, 101, (2, 5))
    expected = model(input_ids=ids).logits
    mol.merge(model)
    merged = model(input_ids=ids).logits
    assert ((merged - expected).norm() / expected.norm()).item() < 1e-5
    mol.unmerge(model)
    assert ((model(input_ids=ids).logits - expected).norm() / expected.norm()).item() < 1e-5


def test_merge_refuses_token_routed_layers_and_changes_nothing():
    model = mol.inject(make_tiny_llama(), mol.MoLConfig(num_experts=4, top_k=2, target_modules=["q_proj"]))
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ValueError, match="token-routed MoL layer .* cannot be merged"):
        mol.merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, w)


@pytest.mark.parametrize("config,message", [
    (mol.LoRAConfig(target_modules=["qq_proj"]), r"matched no module of LlamaForCausalLM; layer names on offer"),
    (mol.LoRAConfig(target_modules=r"model\.nothing\..*"), "matched no module"),
    # a bare name as a string is a regex on the full name, which PEFT matches the same way: the list is the fix
    (mol.LoRAConfig(target_modules="q_proj"), r"a string is one regex .*full name.* target_modules=\['q_proj'\]"),
    (mol.LoRAConfig(target_modules=["self_attn"]), "a LlamaAttention, which this method cannot adapt"),
    (mol.MoLConfig(num_experts=4, top_k=5), r"top_k=5 is outside 1\.\.4"),
    (mol.MoLConfig(num_experts=4, top_k=0), r"top_k=0 is outside 1\.\.4"),
    (mol.MoLConfig(router="switch", top_k=2), r"top_k=2, but router=.switch. takes one expert per token; set top_k=1"),
    (mol.MoLConfig(rank=0), "rank must be a positive integer"),
    (mol.LoRAConfig(rank=-3), "rank must be a positive integer"),
    (mol.MoLConfig(router="hash"), "router='hash' is unknown"),
    (mol.MoLConfig(modules_to_save=["nohead"]), "modules_to_save entry 'nohead' matches no module"),
    # said the pattern matched no module, offering the layer names without the one it named
    (mol.MoLConfig(target_modules=["q_proj"], modules_to_save=["q_proj"]),
     r"target_modules pattern\(s\) \['q_proj'\] select only modules of modules_to_save \['q_proj'\] .*"
     r"'model\.layers\.0\.self_attn\.q_proj'.*narrow modules_to_save"),
    (mol.LoRAConfig(target_modules=r".*\.v_proj", modules_to_save=["self_attn"]),
     r"select only modules of modules_to_save \['self_attn'\]"),
    # a typo beside the entry modules_to_save covers was said to select modules of modules_to_save too
    (mol.LoRAConfig(target_modules=["q_proj", "qq_proj"], modules_to_save=["q_proj"]),
     r"target_modules pattern\(s\) \['q_proj'\] select only modules of modules_to_save \['q_proj'\]"),
])
def test_bad_configs_fail_with_the_fix(config, message):
    with pytest.raises(ValueError, match=message):
        mol.inject(make_tiny_llama(), config)


def test_second_adapter_on_same_layers_is_refused():
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carry an adapter"):
        mol.inject(model, mol.MoLConfig(target_modules=["q_proj"]))


def test_the_same_config_twice_is_refused_and_changes_nothing():
    # BitFit took an equal second config without a word (the wrapping methods refuse adapted layers), recording the
    # adapter twice, so the model then refused load_adapter of the adapter it was given once
    for cfg in (mol.BitFitConfig(), mol.LoRAConfig(rank=2, target_modules=["q_proj"])):
        model = mol.inject(make_tiny_llama(), cfg)
        before = _structure(model)
        with pytest.raises(ValueError, match=r"inject got \w+Config\(.*\) twice: the model carries this adapter"):
            mol.inject(model, copy.deepcopy(cfg))
        assert _structure(model) == before
        with pytest.raises(ValueError, match="twice: .*or the list repeats it"):
            mol.inject(make_tiny_llama(), [cfg, cfg])


def test_all_linear_on_an_all_adapted_model_says_so():
    # the generic "matched no linear layer" would send the user looking for a naming problem
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(target_modules="all-linear"))
    with pytest.raises(ValueError, match="every one in this model already carries an adapter"):
        mol.inject(model, mol.MoLConfig(target_modules="all-linear"))
    # BitFit after a wrapping method in one list: the advice is the order that works, which then does
    with pytest.raises(ValueError, match=r"put this config before the one that wrapped them \(BitFitConfig before"):
        mol.inject(make_tiny_llama(), [mol.LoRAConfig(), mol.BitFitConfig()])
    both = mol.inject(make_tiny_llama(), [mol.BitFitConfig(), mol.LoRAConfig()])
    assert any(n.endswith("q_proj.base_layer.bias") for n in both.mol_trainable)


def test_aux_loss_collects_every_routed_layer():
    model = mol.inject(make_tiny_llama(), mol.MoLConfig(num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01))
    assert mol.aux_loss(model).item() == 0.0
    model(input_ids=torch.randint(0, 101, (2, 6)))
    layers = [m for m in model.modules() if isinstance(m, mol.MoLLinear)]
    expected = sum(0.1 * m.last_stats["load_balance_loss"] + 0.01 * m.last_stats["z_loss"] for m in layers)
    assert torch.allclose(mol.aux_loss(model), expected)
    # a model split over devices: the sum lands where it is asked for (the meta device stands in for another GPU)
    assert mol.aux_loss(model, device="meta").device.type == "meta"
    stats = mol.routing_stats(model)
    assert len(stats) == len(layers)
    assert all(torch.allclose(s["load"].sum(), torch.tensor(1.0)) for s in stats.values())
    mol.clear_routing(model)  # what a CUDA-graph capture wants dropped after its warm-up
    assert mol.aux_loss(model).item() == 0.0 and mol.routing_stats(model) == {}
    assert mol.aux_loss(model, device="meta").device.type == "meta"
    assert all(m.aux_loss() is None for m in layers)


def _structure(model):
    """What a failed call must leave as it was: module types by name, parameters' identities and flags, hooks."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
            [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            getattr(model, "mol_configs", None))


def test_failed_load_into_a_fresh_model_leaves_it_fresh(tmp_path):
    """load_adapter injects before it reads the tensors: a file that does not fit must undo that injection, so the
    same model takes the right adapter next."""
    mol.save_adapter(mol.inject(make_tiny_llama(hidden=48), mol.MoLConfig(rank=4, num_experts=2, top_k=1)),
                     tmp_path / "wide")
    base = make_tiny_llama()
    model = copy.deepcopy(base)
    before = _structure(model)
    with pytest.raises(ValueError, match="has shape"):
        mol.load_adapter(model, tmp_path / "wide")
    assert _structure(model) == before
    good = mol.inject(copy.deepcopy(base), mol.MoLConfig(rank=4, num_experts=2, top_k=1))
    _train_a_little(good)
    mol.save_adapter(good, tmp_path / "good")
    ids = torch.randint(0, 101, (2, 5))
    assert torch.equal(mol.load_adapter(model, tmp_path / "good")(input_ids=ids).logits, good(input_ids=ids).logits)


def test_failed_inject_changes_nothing():
    """A list whose second config matches nothing, or a modules_to_save typo, is found after the first method ran:
    the model is put back, and the corrected call works on it."""
    model = make_tiny_llama()
    before = _structure(model)
    with pytest.raises(ValueError, match="matched no module"):
        mol.inject(model, [mol.LoRAConfig(rank=2, target_modules=["q_proj"]), mol.IA3Config(target_modules=["nope"])])
    assert _structure(model) == before
    with pytest.raises(ValueError, match="modules_to_save entry 'lm_haed' matches no module"):
        mol.inject(model, mol.LoRAConfig(rank=2, target_modules=["q_proj"], modules_to_save=["lm_haed"]))
    assert _structure(model) == before
    mol.inject(model, mol.LoRAConfig(rank=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, mol.MoLLinear) and model.lm_head.weight.requires_grad


def test_load_into_a_merged_model_is_refused(tmp_path):
    """Loading new tensors under a merged delta would make unmerge subtract the wrong delta from the base."""
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    _train_a_little(model)
    mol.save_adapter(model, tmp_path)
    mol.merge(model)
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"q_proj is merged into its base weight; call mol\.unmerge"):
        mol.load_adapter(model, tmp_path)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)
    mol.unmerge(model)
    original = dict(base.named_parameters())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.allclose(p, original[n.replace("base_layer.", "")], atol=1e-6), n


def test_modules_to_save_on_a_tied_head_trains_the_shared_tensor(tmp_path):
    """Tied embeddings (tie_word_embeddings): the head and the input embedding are one tensor, which trains and is
    saved once, under the model's own name for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["q_proj"],
                                                           modules_to_save=["lm_head"]))
    assert model.lm_head.weight.requires_grad and "model.embed_tokens.weight" in model.mol_trainable
    _train_a_little(model)
    mol.save_adapter(model, tmp_path)
    ids = torch.randint(0, 101, (1, 6))
    fresh = mol.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_save_with_a_config_json_cannot_hold_writes_nothing(tmp_path):
    """A config field holding a value JSON cannot store (a numpy number, an OmegaConf list) fails before any file is
    written: the directory keeps the previous adapter whole, not new tensors beside an old config."""
    np = pytest.importorskip("numpy")
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    mol.save_adapter(model, tmp_path)
    files = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    model.mol_configs[0].alpha = np.float32(4.0)
    _train_a_little(model)
    with pytest.raises(TypeError, match="JSON cannot store.*Nothing was written"):
        mol.save_adapter(model, tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == files


@pytest.mark.parametrize("text, message", [
    ("[]", "is not a mol adapter config"),
    ('{"format": "mol-adapter", "format_version": 1}', "'configs' must be a non-empty list"),
    ('{"format": "mol-adapter", "format_version": 1, "configs": [null]}', "'configs' must be a non-empty list"),
    ('{"format": "mol-adapter", "format_version": 99, "configs": []}', "format_version 99.*upgrade mol"),
])
def test_damaged_adapter_config_is_named(tmp_path, text, message):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        mol.io.read_adapter_configs(tmp_path)


def test_saved_files_get_the_mode_the_umask_gives_other_files(tmp_path):
    # the atomic write went through mkstemp, whose 0600 left adapters unreadable to a server under another user
    import os
    import stat

    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2))
    old = os.umask(0o022)
    try:
        mol.save_adapter(model, tmp_path / "a")
        mol.export_peft(model, tmp_path / "p")
        mol.save_bnb_4bit(mol.quantize(make_tiny_llama(hidden=64), "nf4"), tmp_path / "bnb")
        os.umask(0o077)
        mol.save_adapter(model, tmp_path / "private")
    finally:
        os.umask(old)
    for d, mode in (("a", 0o644), ("p", 0o644), ("bnb", 0o644), ("private", 0o600)):
        for f in (tmp_path / d).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == mode, (f, oct(f.stat().st_mode))


def test_match_modules_previews_what_inject_adapts_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    preview = mol.match_modules(gpt2, "all-linear")  # raised 'matched no linear layer' on Conv1D-only GPT-2
    mol.inject(gpt2, mol.LoRAConfig(rank=2))
    assert len(preview) == 8 and preview == [n for n, m in gpt2.named_modules() if isinstance(m, mol.MoLLinear)]


def test_a_rank_pattern_key_for_no_adapted_layer_warns():
    # the README's method.rank_pattern={v_proj:16} on a BERT (whose layer is 'value') changed nothing, silently
    import warnings

    with pytest.warns(UserWarning, match=r"rank_pattern keys \['value'\] match none of the .* adapted layers"):
        model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, rank_pattern={"value": 8, "v_proj": 4}))
    assert model.model.layers[0].self_attn.v_proj.lora_A.shape[1] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 3}))


def test_a_tuple_of_target_modules_reloads_into_its_own_model(tmp_path):
    """The saved JSON holds the tuple as a list: compared as given, the model it was saved from refused it as
    "a different adapter"."""
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=("q_proj",)))
    _train_a_little(model)
    mol.save_adapter(model, tmp_path)
    ids = torch.randint(0, 101, (1, 5))
    expected = model(input_ids=ids).logits
    assert torch.equal(mol.load_adapter(model, tmp_path)(input_ids=ids).logits, expected)


@pytest.mark.parametrize("call", [
    lambda m, d: mol.inject(m, mol.LoRAConfig()), mol.save_adapter, mol.load_adapter, mol.import_peft,
    mol.export_peft, mol.save_bnb_4bit, lambda m, d: mol.load_bnb_4bit(m, {}),
    *[(lambda f: lambda m, d: f(m))(f) for f in (
        mol.merge, mol.unmerge, mol.unload, mol.merge_and_unload, mol.aux_loss, mol.routing_stats,
        mol.trainable_parameters, mol.clear_routing, mol.clear_graphs, mol.set_graphs, mol.quantize,
        mol.bnb_4bit_state_dict, lambda m: mol.disable_adapters(m).__enter__(),
        lambda m: mol.match_modules(m, "all-linear"))],
])
def test_a_path_where_the_model_goes_is_named(tmp_path, call):
    """A path (the arguments swapped) or a (model, info) tuple in the model's place failed with "'str' object has no
    attribute '__dict__'" or the like from deep inside; every function that takes a model names it, first."""
    with pytest.raises(TypeError, match=r"takes a model \(a torch\.nn\.Module\), got str 'adapter/'; load the model"):
        call("adapter/", tmp_path)
    with pytest.raises(TypeError, match=r"got tuple; .*returns \(model, info\): pass the model alone"):
        call((make_tiny_llama(), {}), tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_to_a_file_or_a_non_path_says_so_and_writes_nothing(tmp_path):
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    (tmp_path / "adapter").write_text("not a directory")
    for save in (mol.save_adapter, mol.export_peft):
        with pytest.raises(ValueError, match=r"adapter is a file, and \w+ writes a directory.*Nothing was written"):
            save(model, tmp_path / "adapter")
        with pytest.raises(TypeError, match=r"directory must be a path \(str or os\.PathLike\), got NoneType"):
            save(model, None)
    with pytest.raises(TypeError, match=r"directory must be a path \(str or os\.PathLike\), got NoneType"):
        mol.load_adapter(make_tiny_llama(), None)
    assert os.listdir(tmp_path) == ["adapter"] and (tmp_path / "adapter").read_text() == "not a directory"


def test_helpers_given_the_wrong_kind_of_argument_say_what_they_take():
    # each failed with an unrelated TypeError / AttributeError, or (register_method) registered a string silently
    with pytest.raises(TypeError, match="config_from_dict takes a dict as to_dict"):
        mol.config_from_dict("lora")
    with pytest.raises(TypeError, match="register_config takes a config class"):
        mol.register_config("lora")
    with pytest.raises(TypeError, match=r"register_method takes a config class, got str"):
        mol.register_method("lora")
    with pytest.raises(ValueError, match=r"match_modules.target_modules=None is invalid"):
        mol.match_modules(make_tiny_llama(), None)
    with pytest.raises(TypeError, match=r"load_bnb_4bit takes a state dict .*got PosixPath"):
        mol.load_bnb_4bit(make_tiny_llama(), __import__("pathlib").Path("model.safetensors"))


@pytest.mark.parametrize("save", ["save_adapter", "export_peft", "save_bnb_4bit"])
def test_a_save_failing_on_its_second_file_keeps_the_previous_save_whole(tmp_path, monkeypatch, save):
    """Each save writes two files; the second (the config) failing (disk full) left the new tensors beside the old
    config, a directory that loaded as neither save ("lacks tensor ..."). Every file is written before any replaces
    its predecessor, so the previous save stays whole and no temp file is left."""
    import pathlib

    if save == "save_bnb_4bit":
        first, second = mol.quantize(make_tiny_llama(hidden=64), "nf4"), mol.quantize(make_tiny_llama(hidden=64), "nf4")
    else:
        base = make_tiny_llama()
        first = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
        second = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["v_proj"]))
    getattr(mol, save)(first, tmp_path)
    files = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def disk_full(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="disk full"):
        getattr(mol, save)(second, tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == files


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_tensor_of_a_non_float_dtype_is_refused_not_cast(tmp_path, dtype):
    """An adapter tensor stored as integers or booleans (a damaged or hand-edited file) was cast into the float
    parameter without a word: the model then computed with truncated weights."""
    from safetensors.torch import load_file, save_file

    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    _train_a_little(model)
    mol.save_adapter(model, tmp_path / "a")
    mol.export_peft(model, tmp_path / "p")
    for directory, load in ((tmp_path / "a", mol.load_adapter), (tmp_path / "p", mol.import_peft)):
        weights = directory / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].to(dtype)
        save_file(tensors, str(weights))
        target = copy.deepcopy(base)
        before = _structure(target)
        with pytest.raises(ValueError, match=rf"tensor '[\w.]+lora_A' is {str(dtype)[6:]}, not a floating-point "
                                             r"type.*damaged: save or copy the adapter again"):
            load(target, directory)
        assert _structure(target) == before


@pytest.mark.parametrize("change, message", [
    ({"r": None}, r"'r' must be a positive integer, got None"),
    ({"r": 2.7}, r"'r' must be a positive integer, got 2\.7"),  # was read as rank 2
    ({"r": "two"}, r"'r' must be a positive integer, got 'two'"),
    ({"lora_alpha": "x"}, r"'lora_alpha' must be a number > 0, got 'x'"),
    ({"lora_dropout": None}, r"'lora_dropout' must be a number in \[0, 1\), got None"),
    ({"use_rslora": "false"}, r"'use_rslora' must be true or false, got 'false'"),  # was read as True
    ({"rank_pattern": [1]}, r"'rank_pattern' must be a JSON object \(layer pattern -> rank\), got \[1\]"),
    ({"alpha_pattern": {"q_proj": "x"}}, r"'alpha_pattern'\['q_proj'\] must be a number > 0, got 'x'"),
    ({"modules_to_save": "lm_head"}, r"'modules_to_save' must be a list of module names, got 'lm_head'"),  # dropped
    ({"target_modules": 3}, r"'target_modules' must be a list of module names or one regex string, got 3"),
    ({"r": ...}, r"lacks 'r', which PEFT's save_pretrained always writes"),
    ({"lora_alpha": ...}, r"lacks 'lora_alpha', which PEFT's save_pretrained always writes"),
    ({"target_modules": ...}, r"lacks 'target_modules', which PEFT's save_pretrained always writes"),
])
def test_import_peft_names_a_config_field_of_the_wrong_type(tmp_path, change, message):
    """A PEFT config field missing or of the wrong type failed with a bare KeyError / TypeError / AttributeError, or
    was silently misread: r=2.7 as rank 2, use_rslora="false" as True, modules_to_save="lm_head" as its letters
    (so the head's trained weights were left out)."""
    import json

    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    mol.export_peft(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    for key, value in change.items():
        if value is ...:
            del raw[key]
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))
    target = make_tiny_llama()
    before = _structure(target)
    with pytest.raises(ValueError, match=rf"adapter_config\.json: PEFT config .*{message}"):
        mol.import_peft(target, tmp_path)
    assert _structure(target) == before


@pytest.mark.parametrize("version, message", [
    (None, r"has no valid format_version \(got None;.*damaged: save the adapter again"),  # said "upgrade mol"
    ('"1"', r"has no valid format_version \(got '1';.*damaged: save the adapter again"),
    ("true", r"has no valid format_version \(got True;"),  # was read as version 1
    ("0", r"has no valid format_version \(got 0;"),  # no mol wrote it: was read as the current format
    ("3", r"has format_version 3; this mol reads version 2 or older: upgrade mol to load it"),
])
def test_a_bad_format_version_is_told_from_a_newer_one(tmp_path, version, message):
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    mol.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    del raw["format_version"]
    if version is not None:
        raw["format_version"] = json.loads(version)
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        mol.load_adapter(make_tiny_llama(), tmp_path)


def test_a_file_where_a_directory_is_expected_and_the_reverse_are_named(tmp_path):
    """load_adapter / import_peft given the adapter's config file said '.../adapter_config.json/adapter_config.json
    does not exist'; an adapter_model.safetensors that is a directory 'does not exist'."""
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    mol.save_adapter(model, tmp_path / "a")
    mol.export_peft(model, tmp_path / "p")
    for load, d in ((mol.load_adapter, tmp_path / "a"), (mol.import_peft, tmp_path / "p")):
        with pytest.raises(ValueError, match=rf"{load.__name__}: .*adapter_config\.json is a file; give the directory "
                                             r"that holds it \(.*[ap]\)"):
            load(make_tiny_llama(), d / "adapter_config.json")
        weights = d / "adapter_model.safetensors"
        weights.unlink()
        weights.mkdir()
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors is a directory, not a file"):
            load(make_tiny_llama(), d)
        weights.rmdir()
        (d / "adapter_config.json").unlink()
        (d / "adapter_config.json").mkdir()
        with pytest.raises(ValueError, match=r"adapter_config\.json is a directory, not a file"):
            load(make_tiny_llama(), d)


def test_an_unwritable_save_directory_is_named_with_the_fix(tmp_path, monkeypatch):
    """A directory below a file, or one the user may not write to, failed with the OS's bare error, naming mkdir's
    path or a temp file the user never asked for (".adapter_model.safetensors.x1y2.tmp")."""
    import tempfile

    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"cannot write to .*file/sub/a: .*file is a file, not a directory; "
                                                 r"save to a directory you can write to\. Nothing was written"):
        mol.save_adapter(model, tmp_path / "file" / "sub" / "a")

    def denied(*args, **kwargs):  # as chmod 555 does, for a user other than root
        raise PermissionError(13, "Permission denied", str(tmp_path / ".adapter_model.safetensors.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    for save in (mol.save_adapter, mol.export_peft):
        with pytest.raises(PermissionError, match=r"cannot write to .*: Permission denied; save to a directory you can "
                                                  r"write to\. Nothing was written"):
            save(model, tmp_path)
    assert os.listdir(tmp_path) == ["file"]


def test_a_peft_bin_holding_more_than_tensors_is_named_in_one_line(tmp_path):
    """The error quoted torch.load's whole paragraph, advising to re-run it with weights_only=False: arbitrary code
    from the file, for a file that is not a PEFT adapter's weights anyway."""
    model = mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=2, target_modules=["q_proj"]))
    mol.export_peft(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "adapter_model.bin")  # a pickled module, not tensors
    with pytest.raises(ValueError, match=r"adapter_model\.bin is truncated, corrupt or holds more than tensors") as e:
        mol.import_peft(make_tiny_llama(), tmp_path)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value) and len(str(e.value)) < 400
