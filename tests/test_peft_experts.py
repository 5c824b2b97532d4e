"""PEFT interop for LoRA on the fused expert tensors of transformers 5 mixture-of-experts layers
(``LoRAConfig(target_parameters=[...])``, mol.ExpertsLoRA): export_peft writes what PEFT's
``LoraConfig(target_parameters=[...])`` saves (one nested lora.ParamWrapper per tensor, A (r * experts, in), B (out,
r * experts)), import_peft reads it back, on Qwen3-MoE, Mixtral and GPT-OSS (transposed expert tensors, biases,
interleaved gate/up).

Reference: Hugging Face PEFT itself, loading mol's export and saving what mol imports; float64 models, whose logits
then agree to the last bit or nearly.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from torch import nn

import mol
from mol.io import adapter_state_dict

peft = pytest.importorskip("peft")

VOCAB = 101
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0)
FAMILIES = {
    "qwen3_moe": lambda **kw: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        **_DECODER, max_position_embeddings=64, head_dim=8, num_experts_per_tok=2,
        **{"num_experts": 4, "moe_intermediate_size": 16, **kw})),
    "mixtral": lambda **kw: T.MixtralForCausalLM(T.MixtralConfig(
        **_DECODER, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, **kw)),
    # GPT-OSS's YaRN factor (32) is checked against max_position_embeddings / 4096
    "gpt_oss": lambda **kw: T.GptOssForCausalLM(T.GptOssConfig(
        **_DECODER, max_position_embeddings=131072, head_dim=8, num_local_experts=4, num_experts_per_tok=2, **kw)),
}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _base(family: str, dtype: torch.dtype = torch.float64, **config) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family](**config).to(dtype).eval()
    if dtype == torch.float64:  # transformers' grouped_mm experts forward has no float64 kernel on the CPU
        model.config._experts_implementation = "eager"
    return model


def _batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_batch()).logits


def _randomise(model: nn.Module, *names: str) -> nn.Module:
    """Random nonzero B (and A) in every adapter tensor whose name holds one of ``names``: a fresh B is zero, so
    a wrong layout would compute the base and go unseen."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def _peft_load(base: nn.Module, directory: Path) -> nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    return model


def _lora_linears(model: nn.Module) -> list[str]:
    """The linear layers that carry LoRA, mol's or PEFT's."""
    from peft.tuners.lora import Linear

    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, (mol.MoLLinear, Linear)))


def _peft_experts(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's expert LoRA in mol's layout, "<module>.<tensor>" -> (A (experts, r, in), B (experts, out, r)), read
    off its ParamWrappers."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            experts = module.num_experts
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{owner}.{module.parameter_name}"] = (a.reshape(experts, -1, a.shape[-1]),
                                                       b.reshape(b.shape[0], -1, experts).permute(2, 0, 1))
    return out


def _mol_experts(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"{n}.{t}": (layer.lora_A[t], layer.lora_B[t]) for n, layer in model.named_modules()
            if isinstance(layer, mol.ExpertsLoRA) for t in layer.lora_A}


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        for x, y in zip(ours[key], theirs[key]):
            assert x.shape == y.shape and torch.equal(x.to(y.dtype), y), key


# ---- mol -> PEFT ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", [[], ["q_proj", "v_proj"], "all-linear"])
def test_peft_loads_mol_s_expert_lora_and_computes_the_same(family, targets, tmp_path):
    base = _base(family)
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, alpha=4, target_modules=targets,
                                                           target_parameters=EXPERTS, rank_pattern={"down_proj": 3}))
    _randomise(model, "lora_B")
    mol.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS and config["rank_pattern"] == {"down_proj": 3}
    if targets == "all-linear":  # PEFT would add the routers (and, on Qwen3-MoE, its own gate_up_proj ranks)
        assert config["target_modules"] == sorted(n for n, m in model.named_modules() if isinstance(m, mol.MoLLinear))
    loaded = _peft_load(base, tmp_path)
    _assert_same_tensors(_mol_experts(model), _peft_experts(loaded))
    assert _lora_linears(loaded) == _lora_linears(model)
    ours = _logits(model)
    assert (ours - _logits(base)).abs().max() > 0.1  # the experts' LoRA does something
    torch.testing.assert_close(_logits(loaded), ours, rtol=1e-12, atol=1e-12)


def test_one_adapted_tensor_has_no_nested_wrapper_and_float32_matches_too(tmp_path):
    """A module with one adapted tensor is one ParamWrapper, no base_layer level; float32 on transformers' default
    (grouped_mm) experts forward."""
    base = _base("qwen3_moe", torch.float32)
    model = _randomise(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["q_proj"],
                                                                      target_parameters=["experts.down_proj"])),
                       "lora_B")
    mol.export_peft(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.experts.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.experts.lora_B.weight"].shape == (32, 4 * 4)
    assert not any("base_layer" in k for k in keys)
    loaded = _peft_load(base, tmp_path)
    _assert_same_tensors(_mol_experts(model), _peft_experts(loaded))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-5)


def test_export_follows_peft_s_nesting_order_not_the_config_s(tmp_path):
    """PEFT nests the wrappers in the order it meets the tensors in the module (gate_up_proj, then down_proj), not
    in target_parameters' order: gate_up_proj's LoRA sits under base_layer either way."""
    base = _base("mixtral")
    model = _randomise(mol.inject(copy.deepcopy(base), mol.LoRAConfig(
        rank=2, target_modules=[], target_parameters=["down_proj", "model.layers.0.mlp.experts.gate_up_proj",
                                                      "model.layers.1.mlp.experts.gate_up_proj"])), "lora_B")
    mol.export_peft(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (2 * 4, 32)
    assert keys["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (2 * 4, 48)
    loaded = _peft_load(base, tmp_path)
    _assert_same_tensors(_mol_experts(model), _peft_experts(loaded))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-12, atol=1e-12)


def test_export_of_expert_lora_with_dropout_writes_none_and_says_why(tmp_path):
    base = _base("qwen3_moe")
    model = _randomise(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, dropout=0.1, target_modules=["q_proj"],
                                                                      target_parameters=EXPERTS)), "lora_B")
    with pytest.warns(UserWarning, match=r"dropout=0\.1, which PEFT refuses on target_parameters.*lora_dropout=0\.0"
                                         r".*computes the same in PEFT; training it further there runs without"):
        mol.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    loaded = _peft_load(base, tmp_path)  # PEFT raises for lora_dropout != 0 on its ParamWrapper
    model.eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-12, atol=1e-12)
    # linear layers alone keep their dropout, without a word
    linear = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, dropout=0.1, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mol.export_peft(linear, tmp_path / "linear")
    assert json.loads((tmp_path / "linear" / "adapter_config.json").read_text())["lora_dropout"] == 0.1


def test_a_regex_target_on_a_mixture_of_experts_model_is_written_by_name(tmp_path):
    """On Qwen3-MoE (a model whose layout transformers 5 changed) PEFT's loader rewrites a string target_modules to
    the bare names it matches: a regex for layer 0's q_proj took q_proj in every layer."""
    base = _base("qwen3_moe")
    for sub, experts in (("without", []), ("with", EXPERTS)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the experts left frozen
            model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=r".*\.0\.self_attn\.q_proj",
                                                                   target_parameters=experts))
        _randomise(model, "lora_B")
        mol.export_peft(model, tmp_path / sub)
        assert json.loads((tmp_path / sub / "adapter_config.json").read_text())["target_modules"] == [
            "model.layers.0.self_attn.q_proj"]
        loaded = _peft_load(base, tmp_path / sub)
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A" not in dict(loaded.named_modules())
        torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("experts", [[], EXPERTS])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "mlp.down_proj"]])
def test_lora_on_a_dense_mlp_of_a_model_peft_rewrites_is_refused(targets, experts, tmp_path):
    """Qwen3-MoE with a dense MLP layer (mlp_only_layers; DeepSeek-V3's first_k_dense_replace alike): PEFT's loader
    takes every target_modules entry ending in gate_proj / up_proj / down_proj on such a model for the expert
    projections of a transformers 4 adapter and moves it to target_parameters. The export PEFT then loaded put no
    LoRA on the dense MLP (with the expert tensors too, their rank doubled: a size mismatch), so it computed
    something else with a mere warning. The export is refused, naming the layer and the fix, and writes nothing."""
    base = _base("qwen3_moe", mlp_only_layers=[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experts left frozen
        model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=targets,
                                                               target_parameters=experts))
    with pytest.raises(ValueError, match=r"export_peft: .*'model\.layers\.0\.mlp\.(gate|down)_proj'.*PEFT's loader .*"
                                         r"target_parameters.*mol\.save_adapter"):
        mol.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the attention alone exports, and PEFT computes what mol does
    model = _randomise(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"],
                                                                      target_parameters=experts)), "lora_B")
    mol.export_peft(model, tmp_path / "attention")
    torch.testing.assert_close(_logits(_peft_load(base, tmp_path / "attention")), _logits(model), rtol=1e-12,
                               atol=1e-12)


def test_an_experts_module_in_modules_to_save_is_left_out_of_the_exported_target_parameters(tmp_path):
    """modules_to_save=[layer 0's experts] trains that module whole and keeps inject's target_parameters off it; PEFT
    matches target_parameters without that exclusion, so the export must name the adapted tensors (PEFT wrapped layer
    0's tensors too, then refused to make a ParamWrapper a ModulesToSaveWrapper: a directory PEFT could not load)."""
    base = _base("qwen3_moe")
    model = _randomise(mol.inject(copy.deepcopy(base), mol.LoRAConfig(
        rank=2, target_modules=["q_proj"], target_parameters=EXPERTS, modules_to_save=["model.layers.0.mlp.experts"])),
        "lora_B", "experts.gate_up_proj", "experts.down_proj")
    assert not isinstance(model.model.layers[0].mlp.experts, mol.ExpertsLoRA)
    mol.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"] == [
        "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    loaded = _peft_load(base, tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_logits(mol.import_peft(copy.deepcopy(base), tmp_path)), _logits(model), rtol=1e-12,
                               atol=1e-12)


def test_push_to_hub_in_peft_format_carries_the_expert_lora(tmp_path, monkeypatch):
    base = _base("qwen3_moe")
    model = _randomise(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=[],
                                                                      target_parameters=EXPERTS)), "lora_B")
    pushed = tmp_path / "pushed"

    def push_folder(folder, repo_id, card, **kwargs):
        shutil.copytree(folder, pushed)
        return "commit-info"

    monkeypatch.setattr(mol.io, "push_folder", push_folder)
    assert mol.push_to_hub(model, "me/moe-lora", peft_format=True) == "commit-info"
    torch.testing.assert_close(_logits(_peft_load(base, pushed)), _logits(model), rtol=1e-12, atol=1e-12)


# ---- PEFT -> mol ---------------------------------------------------------------------------------------------------

def _peft_saved(base: nn.Module, directory: Path, **config) -> nn.Module:
    """A PEFT LoRA adapter on ``base`` with random nonzero tensors, saved to ``directory``; returns the PeftModel."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    _randomise(model, "lora_A", "lora_B")
    model.save_pretrained(str(directory))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("parameters", [EXPERTS, ["experts.down_proj"]])
def test_import_of_peft_s_expert_lora_computes_what_peft_does(family, parameters, tmp_path):
    base = _base(family)
    theirs = _peft_saved(base, tmp_path, r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                         target_parameters=parameters, rank_pattern={"gate_up_proj": 3}, alpha_pattern={"down_proj": 7})
    model = mol.import_peft(copy.deepcopy(base), tmp_path)
    (cfg,) = model.mol_configs
    assert sorted(cfg.target_parameters) == sorted(parameters) and cfg.dropout == 0.0  # PEFT saves them as a set
    layer = model.get_submodule("model.layers.1.mlp.experts")
    assert layer.rank == {t.split(".")[-1]: 3 if "gate_up" in t else 2 for t in parameters}
    assert layer.alpha["down_proj"] == 7 and layer.scaling["down_proj"] == 7 / 2
    _assert_same_tensors(_mol_experts(model), _peft_experts(theirs))
    torch.testing.assert_close(_logits(model), _logits(theirs), rtol=1e-12, atol=1e-12)


def test_import_of_experts_alone_and_of_layers_to_transform(tmp_path):
    """PEFT's target_modules=None with target_parameters (the experts alone); and layers_to_transform, whose
    linear targets mol reads off the saved keys, which then hold the experts' wrappers too."""
    base = _base("qwen3_moe")
    theirs = _peft_saved(base, tmp_path / "alone", r=2, target_parameters=EXPERTS)
    path = tmp_path / "alone" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": None}))  # PEFT saves [] or None
    model = mol.import_peft(copy.deepcopy(base), tmp_path / "alone")
    assert not any(isinstance(m, mol.MoLLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model), _logits(theirs), rtol=1e-12, atol=1e-12)

    theirs = _peft_saved(base, tmp_path / "layers", r=2, target_modules=["q_proj"], layers_to_transform=[1],
                         target_parameters=EXPERTS)
    model = mol.import_peft(copy.deepcopy(base), tmp_path / "layers")
    assert [n for n, m in model.named_modules() if isinstance(m, mol.MoLLinear)] == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(_logits(model), _logits(theirs), rtol=1e-12, atol=1e-12)


# ---- round trips ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trips_are_bit_identical(family, tmp_path):
    base = _base(family, torch.float32)
    model = _randomise(mol.inject(copy.deepcopy(base), mol.LoRAConfig(
        rank=3, alpha=5, target_modules=["o_proj"], target_parameters=EXPERTS, alpha_pattern={"gate_up_proj": 9})),
        "lora_A", "lora_B")
    mol.export_peft(model, tmp_path / "mol")
    back = mol.import_peft(copy.deepcopy(base), tmp_path / "mol")
    assert back.mol_configs[0].adapter_dict() == model.mol_configs[0].adapter_dict()
    ours, again = adapter_state_dict(model), adapter_state_dict(back)
    assert list(ours) == list(again) and all(torch.equal(ours[k], again[k]) for k in ours)

    _peft_saved(base, tmp_path / "peft", r=2, target_modules=["k_proj"], target_parameters=EXPERTS,
                rank_pattern={"down_proj": 4})
    mol.export_peft(mol.import_peft(copy.deepcopy(base), tmp_path / "peft"), tmp_path / "again")
    saved, exported = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "again"))
    assert sorted(saved) == sorted(exported) and all(torch.equal(saved[k], exported[k]) for k in saved)


# ---- what does not fit ---------------------------------------------------------------------------------------------

def _untouched(model: nn.Module, before: dict[str, torch.Tensor], types: list[type]) -> None:
    assert not getattr(model, "mol_configs", None)
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_an_adapter_for_other_tensors_or_sizes_is_refused_and_changes_nothing(tmp_path):
    base = _base("qwen3_moe")
    _peft_saved(base, tmp_path / "moe", r=2, target_modules=["q_proj"], target_parameters=EXPERTS)

    dense = T.Qwen3ForCausalLM(T.Qwen3Config(**_DECODER, max_position_embeddings=64, head_dim=8)).double().eval()
    before, types = dense.state_dict(), [type(m) for m in dense.modules()]
    with pytest.raises(ValueError, match=r"target_parameters \['experts\.\w+', 'experts\.\w+'\] matched no "
                                         r"tensor of Qwen3ForCausalLM; it holds no mixture-of-experts layer.*"
                                         r"Import it into the model it was trained on"):
        mol.import_peft(dense, tmp_path / "moe")
    _untouched(dense, before, types)

    for config, needs in (({"moe_intermediate_size": 24}, r"lora_B\.weight' has shape \(32, 8\), but .*\.gate_up_proj "
                                                           r"of this model \(4 experts, 32 in, 48 out, rank 2\) needs "
                                                           r"\(48, 8\)"),
                          ({"num_experts": 8}, r"lora_A\.weight' has shape \(8, 32\), but .*\.gate_up_proj of this "
                                              r"model \(8 experts, 32 in, 32 out, rank 2\) needs \(16, 32\)")):
        other = _base("qwen3_moe", **config)
        before, types = other.state_dict(), [type(m) for m in other.modules()]
        with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.mlp\.experts\.base_layer\."
                                             rf"{needs} \(PEFT keeps.*the adapter does not fit this model"):
            mol.import_peft(other, tmp_path / "moe")
        _untouched(other, before, types)
        theirs = _peft_saved(other, tmp_path / "own", r=2, target_parameters=EXPERTS)
        # the refusal left the model fresh: its own adapter imports
        torch.testing.assert_close(_logits(mol.import_peft(other, tmp_path / "own")), _logits(theirs))
        shutil.rmtree(tmp_path / "own")

    # a file lacking one expert tensor's LoRA
    tensors = load_file(tmp_path / "moe" / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.mlp.experts.lora_B.weight"]
    shutil.copy(tmp_path / "moe" / "adapter_config.json", tmp_path / "adapter_config.json")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh = copy.deepcopy(base)
    before, types = fresh.state_dict(), [type(m) for m in fresh.modules()]
    with pytest.raises(ValueError, match=r"lacks tensor 'base_model\.model\.model\.layers\.1\.mlp\.experts\.lora_B\."
                                         r"weight', PEFT's lora_B of model\.layers\.1\.mlp\.experts\.down_proj"):
        mol.import_peft(fresh, tmp_path)
    _untouched(fresh, before, types)


def test_peft_s_router_lora_is_refused_by_name(tmp_path):
    """PEFT's all-linear on Qwen3-MoE adds the experts and the routers' weights (gate.weight) as target_parameters;
    mol imports expert tensors but has no LoRA for a router."""
    base = _base("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft_saved(base, tmp_path, r=2, target_modules="all-linear")
    assert "gate.weight" in json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"]
    fresh = copy.deepcopy(base)
    before, types = fresh.state_dict(), [type(m) for m in fresh.modules()]
    with pytest.raises(ValueError, match=r"selected model\.layers\.0\.mlp\.gate\.weight, a \(4, 32\) tensor of "
                                         r"Qwen3MoeTopKRouter: mol puts LoRA on the 3-D expert tensors.*"
                                         r"import an adapter whose target_parameters name expert tensors alone"):
        mol.import_peft(fresh, tmp_path)
    _untouched(fresh, before, types)
