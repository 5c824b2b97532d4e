"""The one-expert MoL layer is PEFT's LoRA: same logits and gradients on a tiny Llama, and adapters move
between the two libraries in PEFT's own file format."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import mol
from conftest import make_tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS, ALPHAS = {"v_proj": 6, r"layers\.1\.mlp\.down_proj": 2}, {"q_proj": 20.0, "down_proj": 3.0}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomise_peft(peft_model):
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def _copy_peft_into_mol(peft_model, mol_model):
    peft_params = dict(peft_model.named_parameters())
    for name, layer in mol_model.named_modules():
        if isinstance(layer, mol.MoLLinear):
            with torch.no_grad():
                layer.lora_A[0].copy_(peft_params[f"base_model.model.{name}.lora_A.default.weight"])
                layer.lora_B[0].copy_(peft_params[f"base_model.model.{name}.lora_B.default.weight"])


def _same_as_peft(peft_model, ours, ids) -> int:
    """Logits, and the gradients of every adapter tensor, of ``ours`` equal PEFT's; returns the layers checked."""
    out_p, out_m = peft_model(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel(out_m.logits, out_p.logits) <= 1e-6
    out_p.loss.backward()
    out_m.loss.backward()
    grads_p = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    checked = 0
    for name, layer in ours.named_modules():
        if isinstance(layer, mol.MoLLinear):
            for part in ("lora_A", "lora_B"):
                want = grads_p[f"base_model.model.{name}.{part}.default.weight"]
                assert rel(getattr(layer, part).grad[0], want) <= 1e-6
            checked += 1
    return checked


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_logits_and_gradients_as_peft(use_rslora):
    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS,
                                                                use_rslora=use_rslora))
    _randomise_peft(peft_model)
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=12, target_modules=TARGETS,
                                                          use_rslora=use_rslora))
    _copy_peft_into_mol(peft_model, ours)

    assert _same_as_peft(peft_model, ours, torch.randint(0, 101, (3, 9))) == 2 * len(TARGETS)
    assert mol.trainable_parameters(ours)[0] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("options", [dict(use_rslora=True), dict(rank_pattern=RANKS, alpha_pattern=ALPHAS)],
                         ids=["rslora", "per-layer"])
def test_export_to_peft_and_import_from_peft(tmp_path, options):
    """mol -> PEFT -> mol -> mol's own format, the logits kept; per-layer ranks included (mol used to refuse a PEFT
    adapter that had them)."""
    base = make_tiny_llama()
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, **options))
    with torch.no_grad():
        for layer in ours.modules():
            if isinstance(layer, mol.MoLLinear):
                layer.lora_B.normal_(0, 0.3)
    ids = torch.randint(0, 101, (2, 8))
    expected = ours(input_ids=ids).logits

    mol.export_peft(ours, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft")
    assert rel(loaded(input_ids=ids).logits, expected) <= 1e-6

    # And back: PEFT writes, mol reads.
    loaded.save_pretrained(tmp_path / "from_peft")
    back = mol.import_peft(copy.deepcopy(base), tmp_path / "from_peft")
    assert rel(back(input_ids=ids).logits, expected) <= 1e-6
    assert isinstance(back.model.layers[0].self_attn.q_proj, mol.MoLLinear)
    mol.save_adapter(back, tmp_path / "mol")
    again = mol.load_adapter(copy.deepcopy(base), tmp_path / "mol")
    assert rel(again(input_ids=ids).logits, expected) <= 1e-6


def test_peft_trained_adapter_with_modules_to_save_imports(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=24, num_labels=3)).eval()
    peft_model = get_peft_model(copy.deepcopy(bert), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                                modules_to_save=["classifier"], task_type="SEQ_CLS"))
    _randomise_peft(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    ids = torch.randint(0, 50, (2, 6))
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "p")
    ours = mol.import_peft(copy.deepcopy(bert), tmp_path / "p")
    assert rel(ours(input_ids=ids).logits, expected) <= 1e-6


def test_export_refuses_lora_on_a_sequence_classifier_head(tmp_path):
    """PEFT's SEQ_CLS models wrap the head whole (modules_to_save), so a LoRA on `score` written in PEFT's format
    fails in PeftModel.from_pretrained: export refuses it, naming the fix, and writes nothing; the same head through
    modules_to_save exports and loads in PEFT with the same logits."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=3, pad_token_id=0)
    base = LlamaForSequenceClassification(cfg).eval()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["q_proj", "score"]))
    with pytest.raises(ValueError, match=r"classification head 'score'.*modules_to_save=\['score'\]"):
        mol.export_peft(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["q_proj"], modules_to_save=["score"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    mol.export_peft(model, tmp_path / "b")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
    ids = torch.randint(1, 50, (2, 6))
    assert rel(peft_model(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6


def test_export_of_a_sequence_classifier_adapter_with_a_frozen_head_loads_in_peft(tmp_path):
    """LoRA on a classifier's attention alone, its head frozen (a fine-tuned classifier's own head): export_peft
    wrote task_type SEQ_CLS, whose PEFT class wraps the head whole and requires its weights in the file, so
    PeftModel.from_pretrained failed with a KeyError. It loads now, with the base's head and mol's logits, and
    imports back."""
    from peft import PeftModel
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_labels=3)).eval()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    ids = torch.randint(1, 50, (2, 6))
    want = model(input_ids=ids).logits
    mol.export_peft(model, tmp_path / "p")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert rel(peft_model(input_ids=ids).logits, want) <= 1e-6
    assert rel(mol.import_peft(copy.deepcopy(base), tmp_path / "p")(input_ids=ids).logits, want) <= 1e-6


@pytest.mark.parametrize("configs, why", [
    ([mol.MoLConfig(num_experts=4, top_k=2, target_modules=["q_proj"])], "a token-routed MoL, which has no PEFT"),
    ([mol.LoRAConfig(target_modules=["q_proj"]), mol.LoRAConfig(target_modules=["v_proj"])], "several adapters"),
    ([mol.IA3Config(target_modules=["k_proj"], feedforward_modules=None)], r"\(ia3 is not LoRA\)")])
def test_export_refuses_what_peft_lora_cannot_hold_and_says_why(tmp_path, configs, why):
    model = mol.inject(make_tiny_llama(), configs)
    with pytest.raises(ValueError, match=why):
        mol.export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def test_gpt2_conv1d_layers_as_peft_adapts_them(tmp_path):
    """GPT-2 builds its linears as transformers' Conv1D (weight stored (in, out)); PEFT adapts them with
    fan_in_fan_out. LoRA on them equals PEFT's (logits and gradients), merges into the transposed weight, and moves
    to and from PEFT's format."""
    base = _tiny_gpt2()
    targets = ["c_attn", "c_proj", "c_fc"]
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                fan_in_fan_out=True))
    _randomise_peft(peft_model)
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=8, target_modules=targets))
    _copy_peft_into_mol(peft_model, ours)
    adapted = [m for m in ours.modules() if isinstance(m, mol.MoLLinear)]
    assert len(adapted) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block

    ids = torch.randint(0, 50, (2, 7))
    assert _same_as_peft(peft_model, ours, ids) == len(adapted)

    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        mol.merge(ours)
        assert rel(ours(input_ids=ids).logits, expected) <= 1e-5  # the delta folded into (in, out) weights
        mol.unmerge(ours)
        assert rel(ours(input_ids=ids).logits, expected) <= 1e-6

    mol.export_peft(ours, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft")
    assert loaded.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        assert rel(loaded(input_ids=ids).logits, expected) <= 1e-6
    peft_model.save_pretrained(tmp_path / "from_peft")
    back = mol.import_peft(copy.deepcopy(base), tmp_path / "from_peft")
    with torch.no_grad():
        assert rel(back(input_ids=ids).logits, peft_model(input_ids=ids).logits) <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt2_trains_with_mol_on_all_linear(backend):
    """MoL on GPT-2's Conv1D layers ("all-linear"): a training step moves every adapter and router tensor."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    model = mol.inject(_tiny_gpt2().train(), mol.MoLConfig(num_experts=4, top_k=2, rank=4, backend=backend))
    layers = [m for m in model.modules() if isinstance(m, mol.MoLLinear)]
    assert len(layers) == 8 and all(mol.layers.is_conv1d(m.base_layer) for m in layers)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 50, (2, 7))
    out = model(input_ids=ids, labels=ids)
    (out.loss + mol.aux_loss(model)).backward()
    for m in layers:
        for p in (m.lora_A, m.lora_B, m.router.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0



def test_per_layer_ranks_and_alphas_as_peft():
    """rank_pattern / alpha_pattern with PEFT's matching (first key that ends the name at a dot boundary): the
    same layer shapes, logits and gradients as PEFT's LoraConfig with the same patterns."""
    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS,
                                                                rank_pattern=RANKS, alpha_pattern=ALPHAS))
    _randomise_peft(peft_model)
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=12, target_modules=TARGETS,
                                                          rank_pattern=RANKS, alpha_pattern=ALPHAS))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, mol.MoLLinear)}
    assert layers["model.layers.0.self_attn.v_proj"].rank == 6
    assert (layers["model.layers.1.mlp.down_proj"].rank, layers["model.layers.0.mlp.down_proj"].rank) == (2, 4)
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 20.0 / 4
    assert layers["model.layers.1.mlp.down_proj"].scaling == 3.0 / 2
    _copy_peft_into_mol(peft_model, ours)
    assert _same_as_peft(peft_model, ours, torch.randint(0, 101, (3, 9))) == len(layers)


@pytest.mark.parametrize("patterns, message", [
    (dict(rank_pattern={"v_proj": 0}), r"rank_pattern\['v_proj'\] must be a positive integer"),
    (dict(alpha_pattern={"v_proj": -1.0}), r"alpha_pattern\['v_proj'\] must be > 0"),
    (dict(rank_pattern={"v_proj(": 4}), r"rank_pattern key 'v_proj\(' is not a regex"),
])
def test_bad_patterns_name_the_fix(patterns, message):
    with pytest.raises(ValueError, match=message):
        mol.inject(make_tiny_llama(), mol.LoRAConfig(rank=4, target_modules=TARGETS, **patterns))


@pytest.mark.parametrize("choice", [dict(layers_to_transform=[1], layers_pattern="layers"),
                                    dict(exclude_modules=["down_proj"])], ids=["layers_to_transform", "exclude"])
def test_peft_adapters_on_chosen_layers_import(tmp_path, choice):
    """PEFT options that only choose the layers (layers_to_transform, exclude_modules): the adapter's own tensors
    name them, and import_peft adapts exactly those."""
    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **choice))
    _randomise_peft(peft_model)
    ids = torch.randint(0, 101, (2, 8))
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    ours = mol.import_peft(copy.deepcopy(base), tmp_path)
    adapted = {n for n, m in ours.named_modules() if isinstance(m, mol.MoLLinear)}
    want = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
            for n, _ in peft_model.named_parameters() if n.endswith(".lora_A.default.weight")}
    assert adapted == want and len(want) < 2 * len(TARGETS)
    assert rel(ours(input_ids=ids).logits, expected) <= 1e-6


def test_peft_options_mol_does_not_compute_are_refused(tmp_path):
    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS))
    peft_model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["lora_bias"] = True
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="PEFT option lora_bias=True changes what a LoRA layer computes"):
        mol.import_peft(copy.deepcopy(base), tmp_path)


def test_import_peft_of_a_mol_adapter_names_load_adapter(tmp_path):
    """It said 'holds a PEFT None adapter; import_peft reads LORA only', naming neither what the directory is nor
    the call that reads it."""
    base = make_tiny_llama()
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=TARGETS))
    mol.save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match=r"holds a mol adapter \(written by mol.save_adapter\), not a PEFT one: "
                                         r"load it with mol.load_adapter"):
        mol.import_peft(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 101, (2, 6))
    assert torch.equal(mol.load_adapter(copy.deepcopy(base), tmp_path)(input_ids=ids).logits,
                       ours(input_ids=ids).logits)


def test_import_peft_of_a_config_that_is_no_json_object_names_it(tmp_path):
    # it failed with "'list' object has no attribute 'get'"
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"adapter_config.json holds a JSON list, not a PEFT adapter config"):
        mol.import_peft(make_tiny_llama(), tmp_path)


def test_target_modules_as_a_set_as_peft_takes_them(tmp_path):
    """PEFT's LoraConfig takes target_modules as a set; mol's took one too, trained, and only save_adapter failed
    (JSON holds no set): the set is now a sorted list, and the adapter is PEFT's and saves."""
    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=set(TARGETS)))
    _randomise_peft(peft_model)
    ours = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=8, target_modules=set(TARGETS),
                                                          modules_to_save={"lm_head"}))
    _copy_peft_into_mol(peft_model, ours)
    ids = torch.randint(0, 101, (2, 6))
    assert rel(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits) <= 1e-6
    mol.save_adapter(ours, tmp_path)
    assert torch.equal(mol.load_adapter(copy.deepcopy(base), tmp_path)(input_ids=ids).logits,
                       ours(input_ids=ids).logits)


def test_peft_adapter_saved_as_bin_imports(tmp_path):
    """Older PEFT versions (and safe_serialization=False) write adapter_model.bin: it imports too; a damaged one
    says so."""
    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomise_peft(peft_model)
    ids = torch.randint(0, 101, (2, 8))
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    assert rel(mol.import_peft(copy.deepcopy(base), tmp_path)(input_ids=ids).logits, expected) <= 1e-6
    data = (tmp_path / "adapter_model.bin").read_bytes()
    tensors = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    name = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[name] = tensors[name][:, :-1]  # a shape the model does not fit: the error names the file read
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: tensor .* has shape"):
        mol.import_peft(copy.deepcopy(base), tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.bin is truncated, corrupt"):
        mol.import_peft(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_import_refuses_inits_that_rewrite_the_base_and_takes_peft_s_conversion(init, tmp_path):
    # PiSSA / OLoRA replace each base weight by W - scale * B0 A0 when PEFT builds (or reloads) the adapter: the
    # tensors alone on the original base compute something else, so import must refuse them; PEFT's conversion to
    # plain LoRA (the refusal's advice) imports exactly
    base = make_tiny_llama()
    ids = torch.randint(0, 101, (2, 7))
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=init))
    pm.peft_config["default"].init_lora_weights = True  # the initial adapter, as PEFT's docs save it
    pm.save_pretrained(tmp_path / "initial")
    pm.peft_config["default"].init_lora_weights = init
    _randomise_peft(pm)
    pm.save_pretrained(tmp_path / "trained")
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' rewrites the base weights.*"
                                         "path_initial_model_for_weight_conversion"):
        mol.import_peft(copy.deepcopy(base), tmp_path / "trained")
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = mol.import_peft(copy.deepcopy(base), tmp_path / "converted").eval()
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
        assert (want - base(input_ids=ids).logits).abs().max() > 1e-3
        assert rel(ours(input_ids=ids).logits, want) < 1e-5


def test_modules_to_save_on_tied_embeddings_cross_both_ways(tmp_path):
    # mol trains a tied embedding/head as the one tensor; PEFT trains an untied copy of each saved module, so the
    # export writes every name and asks PEFT to tie them again, and an import of PEFT's untied copy is refused
    # until the model is untied as PEFT's is
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()

    ids = torch.randint(0, 101, (2, 7))
    ours = mol.inject(base(), mol.LoRAConfig(rank=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n in ours.mol_trainable:
            ours.get_parameter(n).add_(torch.randn_like(ours.get_parameter(n)) * 0.1)
        want = ours(input_ids=ids).logits
    mol.export_peft(ours, tmp_path / "mol")
    peft_side = PeftModel.from_pretrained(base(), tmp_path / "mol").eval()
    back = mol.import_peft(base(), tmp_path / "mol").eval()
    with torch.no_grad():
        assert rel(peft_side(input_ids=ids).logits, want) < 1e-6
        assert rel(back(input_ids=ids).logits, want) < 1e-6

    pm = get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _randomise_peft(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"PEFT trained its own copy of 'lm_head', whose weight this model ties to "
                                         r"\['model\.embed_tokens\.weight'\].*untie it first"):
        mol.import_peft(base(), tmp_path / "peft")
    untied = base()
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    got = mol.import_peft(untied, tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel(got(input_ids=ids).logits, pm.eval()(input_ids=ids).logits) < 1e-6


@pytest.mark.parametrize("config", [mol.MoLConfig(num_experts=2, top_k=1, rank=2), mol.LoRAConfig(rank=2)],
                         ids=["mol", "lora"])
def test_inject_on_a_peft_model_is_refused_and_changes_nothing(config):
    """mol.inject on a PeftModel wrapped PEFT's own lora_A / lora_B linears in LoRA of their own ("all-linear" took
    them for layers of the model) and froze PEFT's adapter, without a word. It now refuses, naming the fixes, and
    leaves the model as it was: PEFT's output and trainable tensors."""
    torch.manual_seed(0)
    peft_model = get_peft_model(make_tiny_llama(layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    _randomise_peft(peft_model)
    ids = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"PEFT modules.*merge_and_unload\(\).*mol\.import_peft"):
        mol.inject(peft_model, config)
    assert not any(isinstance(m, mol.MoLLinear) for m in peft_model.modules())
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == trainable
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=0, atol=0)
    # the fix it names: fold PEFT's adapter in, then inject on the plain model
    plain = peft_model.merge_and_unload()
    mol.inject(plain, config)
    assert any(isinstance(m, mol.MoLLinear) for m in plain.modules())
