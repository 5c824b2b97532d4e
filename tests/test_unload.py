"""merge_and_unload / unload: the plain model back, as PEFT's methods of those names give it; merged, the model
saves with save_pretrained and reloads as the stock architecture with the adapted outputs."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import mol
from conftest import Bnb4bitLike, Bnb8bitLike, make_tiny_llama
from mol.layers import AdapterLayer


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_merged_lora_and_ia3_save_as_the_stock_model(tmp_path):
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), [mol.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "up_proj"]),
                                             mol.IA3Config(target_modules=["k_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"])])
    _randomise(model)
    ids = torch.randint(0, 101, (2, 9))
    adapted = _logits(model, ids)
    assert (adapted - _logits(base, ids)).abs().max() > 1e-3  # the adapters do something

    plain = mol.merge_and_unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())  # the stock names: no base_layer., no lora_
    assert not hasattr(plain, "mol_configs") and _hook_count(plain) == _hook_count(base)
    torch.testing.assert_close(_logits(plain, ids), adapted, rtol=1e-5, atol=1e-5)

    plain.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), adapted, rtol=1e-5, atol=1e-5)


def test_merged_bitfit_declares_its_added_biases_for_save_pretrained(tmp_path):
    """BitFit gives Llama's linears biases its config says they lack: merge_and_unload sets attention_bias /
    mlp_bias, so save_pretrained + from_pretrained reload them (transformers dropped them as unexpected keys and the
    reloaded model lost the training). A model whose config has no such flag gets a warning naming a layer."""
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.BitFitConfig(target_modules=["q_proj", "up_proj"]))
    _randomise(model)
    ids = torch.randint(0, 101, (2, 9))
    adapted = _logits(model, ids)
    plain = mol.merge_and_unload(model)
    assert plain.config.attention_bias and plain.config.mlp_bias
    plain.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), adapted, rtol=1e-5, atol=1e-5)

    bare = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 4, bias=False))
    mol.inject(bare, mol.BitFitConfig(target_modules=["0"], all_biases=False))
    with pytest.warns(UserWarning, match=r"BitFit gave 1 layers a bias their model config does not declare "
                                         r"\(e\.g\. '0'\)"):
        mol.merge_and_unload(bare)


def test_unload_gives_back_the_base_model_bit_for_bit():
    """MoL with its routing hooks and router loss in the output, bottleneck adapters (forward hooks on their
    sub-layers) and prefix tuning (hooks on the model): all removed, the original outputs exactly."""
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), [
        mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q_proj", "gate_proj"], aux_loss_in_output=True),
        mol.AdapterConfig(placement="pfeiffer", reduction_factor=4),
        mol.PrefixTuningConfig(num_virtual_tokens=3)])
    _randomise(model)
    ids = torch.randint(0, 101, (2, 7))
    assert (_logits(model, ids) - _logits(base, ids)).abs().max() > 1e-3
    plain = mol.unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    assert _hook_count(plain) == _hook_count(base)
    assert not any(a in plain.__dict__ for a in ("mol_configs", "mol_trainable", "mol_routing_context",
                                                  "mol_aux_loss_in_output"))
    # the routing context sits on every model the routers' hooks are on (its inner model too): gone from each
    assert not any("mol_routing_context" in m.__dict__ for m in plain.modules())
    assert torch.equal(_logits(plain, ids), _logits(base, ids))
    plain.train()
    out = plain(input_ids=ids, labels=ids)
    base.train()
    assert torch.equal(out.loss, base(input_ids=ids, labels=ids).loss)  # no router loss added any more


def test_unload_unmerges_a_merged_lora():
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["v_proj"]))
    _randomise(model)
    mol.merge(model)
    plain = mol.unload(model)
    ids = torch.randint(0, 101, (2, 5))
    torch.testing.assert_close(_logits(plain, ids), _logits(base, ids), rtol=1e-5, atol=1e-6)


def test_what_cannot_be_merged_or_unloaded_fails_before_any_change():
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), [mol.LoRAConfig(rank=4, target_modules=["v_proj"]),
                                             mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q_proj"])])
    names = set(model.state_dict())
    with pytest.raises(ValueError, match="cannot merge .*q_proj.*token-routed"):
        mol.merge_and_unload(model)
    assert set(model.state_dict()) == names and not any(m.merged for m in model.modules()
                                                         if isinstance(m, AdapterLayer))
    bitfit = mol.inject(copy.deepcopy(base), mol.BitFitConfig())
    with pytest.raises(ValueError, match="BitFit trains the base's own biases"):
        mol.unload(bitfit)
    assert hasattr(bitfit, "mol_configs")
    kept = mol.merge_and_unload(bitfit)  # the trained biases are the merged form
    assert not hasattr(kept, "mol_configs")
    with pytest.raises(ValueError, match="carries no mol adapter"):
        mol.unload(base)


def test_a_qlora_adapter_merges_into_the_full_precision_base(tmp_path):
    """QLoRA trains against the NF4 rounding of the weights; to ship a merged model the adapter goes onto the
    original weights (load_adapter(..., quantize_base=False), as PEFT users load a QLoRA adapter onto a bf16 base)
    and merge_and_unload folds it in, giving the stock model with that LoRA's outputs."""
    from mol.quant import NF4Linear

    base = make_tiny_llama(hidden=64)
    qlora = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"],
                                                           quantize_base="nf4"))
    _randomise(qlora)
    mol.save_adapter(qlora, tmp_path)
    assert any(isinstance(m, NF4Linear) for m in mol.load_adapter(copy.deepcopy(base), tmp_path).modules())

    on_fp = mol.load_adapter(copy.deepcopy(base), tmp_path, quantize_base=False)
    assert not any(isinstance(m, NF4Linear) for m in on_fp.modules())
    assert all(c.quantize_base is None for c in on_fp.mol_configs)
    adapted = dict(on_fp.named_parameters())
    for name, p in qlora.named_parameters():
        if p.requires_grad:
            assert torch.equal(adapted[name], p)
    ids = torch.randint(0, 101, (2, 9))
    want = _logits(on_fp, ids)
    plain = mol.merge_and_unload(on_fp)
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(plain, ids), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot merge"):  # the quantized base itself does not merge
        mol.merge_and_unload(qlora)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapters_on_other_libraries_quantized_linears_refuse_to_merge_and_change_nothing(method):
    """A model loaded 8- or 4-bit through transformers' BitsAndBytesConfig holds bitsandbytes' Linear8bitLt /
    Linear4bit, nn.Linear subclasses whose weight is codes: the adapters inject and train on them, but merging must
    refuse before any layer changes (a float delta written into int8 codes would corrupt them silently, into packed
    uint8 codes fail halfway through the model)."""
    from mol.inject import replace_module

    base = make_tiny_llama()
    for name, mod in list(base.named_modules()):
        if name.endswith(("q_proj", "k_proj")):
            replace_module(base, name, Bnb8bitLike(mod))
        elif name.endswith(("v_proj", "up_proj")):
            replace_module(base, name, Bnb4bitLike(mod))
    # in module order the 8-bit q_proj and k_proj come before the 4-bit v_proj: merged layer by layer, as the old
    # check let them be, they were corrupted before the merge failed there
    targets = ["o_proj", "q_proj", "v_proj", "k_proj", "up_proj"]
    cfg = (mol.LoRAConfig(rank=4, target_modules=targets) if method == "lora"
           else mol.IA3Config(target_modules=targets, feedforward_modules=["up_proj"]))
    model = mol.inject(copy.deepcopy(base), cfg)
    _randomise(model)
    ids = torch.randint(0, 101, (2, 9))
    adapted = _logits(model, ids)
    assert (adapted - _logits(base, ids)).abs().max() > 1e-3  # the adapters run on these bases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fn in (mol.merge, mol.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge .*q_proj.*Bnb8bitLike holds a Parameter of torch.int8"):
            fn(model)
        after = model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
        assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)
    # the 4-bit layers alone name their packed shape
    packed = ["v_proj", "up_proj"]
    only_4bit = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=packed) if method == "lora"
                           else mol.IA3Config(target_modules=packed, feedforward_modules=["up_proj"]))
    with pytest.raises(ValueError, match=r"Bnb4bitLike holds a Parameter of torch.uint8 \(\d+, 1\)"):
        mol.merge_and_unload(only_4bit)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_layer_on_a_tied_weight_refuses_to_merge(method):
    """LoRA / IA³ on a head that shares its weight with the input embedding (named explicitly; "all-linear" leaves
    the head out): a merge wrote the delta into the shared tensor, so the embedding changed too and the merged model
    computed something else than the adapter, silently. Refused before any change, naming the tie; once the head
    is untied it merges to the adapter's logits."""
    from transformers import LlamaConfig

    base = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=70, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    cfg = (mol.LoRAConfig(rank=4, target_modules=["lm_head", "q_proj"]) if method == "lora"
           else mol.IA3Config(target_modules=["lm_head", "v_proj"]))
    model = mol.inject(copy.deepcopy(base), cfg)
    _randomise(model)
    ids = torch.randint(0, 101, (2, 9))
    adapted = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fn in (mol.merge, mol.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge lm_head: its base weight is tied to "
                                             r"\['model.embed_tokens.weight'\]"):
            fn(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.config.tie_word_embeddings = False
    model.lm_head.base_layer.weight = torch.nn.Parameter(model.lm_head.base_layer.weight.detach().clone(),
                                                         requires_grad=False)
    torch.testing.assert_close(_logits(mol.merge_and_unload(model), ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [mol.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                                    mol.IA3Config()], ids=["lora", "ia3"])
def test_merging_a_float64_model_keeps_float64_precision(config):
    """merge / merge_and_unload computed the merged weights through float32 (w.float() + delta), so on a float64
    model every merged weight was rounded to float32: outputs ~1e-7 off the unmerged model, and unmerge no longer
    gave back the base weights. They now compute in the weights' own dtype where it is wider than float32."""
    torch.manual_seed(0)
    base = make_tiny_llama(layers=2).double()
    model = mol.inject(copy.deepcopy(base), config)
    _randomise(model)
    ids = torch.randint(0, 101, (2, 9))
    want = _logits(model, ids)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    mol.merge(model)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-12, atol=1e-12)
    mol.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-13, atol=1e-15, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(_logits(mol.merge_and_unload(model), ids), want, rtol=1e-12, atol=1e-12)
