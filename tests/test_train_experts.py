"""``python -m mol.train`` with LoRA on the fused expert tensors of a mixture-of-experts model (LoRAConfig's
target_parameters), on a tiny Qwen3-MoE built from a config: the CLI keys (model.target_parameters,
method.target_parameters, experiment=qwen3_moe_lora), what the run trains and saves, mol.evaluate of the saved
adapter, resume, and the mistakes refused before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_train_utils import REPO, compose, make_causal_data, make_tiny_llama, make_tokenizer, quiet_trainer_overrides

EXPERTS = "method.target_parameters=[experts.gate_up_proj,experts.down_proj]"
NUM_EXPERTS, LAYERS, RANK = 4, 2, 4


def make_tiny_qwen3_moe(out: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen3-MoE (4 experts, top-2; transformers 5 keeps each layer's experts as 3-D tensors) and the
    word-level tokenizer of the other train tests, saved to ``out``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=NUM_EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"moe": make_tiny_qwen3_moe(root / "moe"), "causal": make_causal_data(root / "causal")}


def _overrides(tiny, out: Path, *extra: str) -> list[str]:
    return ["model=hf_causal", f"model.path={tiny['moe']}", "data=jsonl", f"data.train={tiny['causal']['train']}",
            f"data.val={tiny['causal']['val']}", "data.batch_size=8", "data.max_length=32",
            f"data.cache_dir={out.parent / 'cache'}", "trainer.max_epochs=2", "optim.lr=1e-2",
            "optim.warmup_ratio=0", f"method.rank={RANK}", f"method.alpha={2 * RANK}", f"output_dir={out}",
            *quiet_trainer_overrides(), *extra]


def _expert_names(tensors=("gate_up_proj", "down_proj")) -> set[str]:
    return {f"model.layers.{i}.mlp.experts.lora_{ab}.{t}" for i in range(LAYERS) for ab in "AB" for t in tensors}


@pytest.mark.parametrize("how", ["experiment", "experts_alone"])
def test_expert_lora_trains_saves_and_evaluates_to_the_same_loss(how, tiny, tmp_path):
    """experiment=qwen3_moe_lora (attention + experts, bfloat16 base as the experiment sets it) and method=lora with
    method.target_parameters and method.target_modules=[] (the experts alone): every expert's LoRA pair trains, the
    adapter file and the checkpoint hold exactly those tensors (no base weight), results.json and
    training_meta.json are written, and mol.evaluate of the saved adapter on a fresh base reproduces the run's
    validation loss."""
    from safetensors.torch import load_file

    import mol
    from mol.evaluate import evaluate
    from mol.io import WEIGHTS_NAME
    from mol.train.app import run

    out = tmp_path / "run"
    if how == "experiment":  # the GPU experiment, on this CPU: only the trainer and the model's folder differ
        extra = ["experiment=qwen3_moe_lora", "trainer=cpu"]
    else:
        extra = ["method=lora", EXPERTS, "method.target_modules=[]"]
    res = run(compose(_overrides(tiny, out, *extra)))

    saved = load_file(str(out / "adapter" / WEIGHTS_NAME))
    experts = {k: v for k, v in saved.items() if ".mlp.experts." in k}
    assert set(experts) == _expert_names()
    others = set(saved) - set(experts)
    if how == "experiment":  # model.target_modules=all-linear: the attention too, not the router (mlp.gate)
        assert others and all(".self_attn." in k for k in others), sorted(others)
    else:
        assert not others, sorted(others)
    for name, t in experts.items():
        assert t.dtype == torch.float32 and t.shape[0] == NUM_EXPERTS, (name, t.dtype, t.shape)
        assert t.shape[1 if ".lora_A." in name else 2] == RANK, (name, t.shape)
        if ".lora_B." in name:  # zero at the start: nonzero only if the experts' adapters trained
            assert t.abs().amax() > 0, name
    assert res["run"]["trainable_params"] == sum(t.numel() for t in saved.values())
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert {k.removeprefix("model.") for k in ckpt["state_dict"]} == set(saved)

    recorded = json.loads((out / "results.json").read_text())
    assert recorded["method_config"]["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    assert recorded["method_config"]["target_modules"] == ("all-linear" if how == "experiment" else [])
    meta = json.loads((out / "adapter" / "training_meta.json").read_text())
    assert meta["model_path"] == str(tiny["moe"].resolve())
    assert meta["dtype"] == ("bfloat16" if how == "experiment" else "float32")

    ev = evaluate(compose([f"adapter={out / 'adapter'}", "split=val", "trainer.enable_progress_bar=false",
                           f"data.cache_dir={tmp_path / 'cache'}"], config_name="evaluate"))
    assert ev["examples"] == 8
    assert ev["val/loss"] == pytest.approx(res["run"]["val/loss"], rel=1e-6, abs=1e-6)

    # the base's own experts were not touched: a fresh base with the adapter loaded holds them as saved
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny["moe"]))
    loaded = mol.load_adapter(AutoModelForCausalLM.from_pretrained(str(tiny["moe"])), str(out / "adapter"))
    layers = [m for m in loaded.modules() if isinstance(m, mol.ExpertsLoRA)]
    assert len(layers) == LAYERS
    for i, layer in enumerate(layers):
        for t in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(layer.base_layer, t), getattr(base.model.layers[i].mlp.experts, t))


def test_a_resumed_expert_lora_run_follows_the_uninterrupted_one(tiny, tmp_path):
    """A run stopped at step 2 and resumed (resume=auto) to step 4 logs the losses of a run that went to step 4 at
    once, and ends with the same expert adapters; dropout is on, so the RNG restore is exercised (a constant
    learning rate: the stopped run's schedule ends at its own max_steps). A checkpoint of
    other target_parameters is refused before anything trains, naming the tensor it lacks."""
    from safetensors.torch import load_file

    from mol.io import WEIGHTS_NAME
    from mol.train.app import ConfigError, run
    from mol.train.callbacks import read_loss_history

    def fit(out: Path, steps: int, *extra: str) -> dict:
        run(compose(_overrides(tiny, out, "method=lora", EXPERTS, "method.target_modules=[]", "method.dropout=0.1",
                               "optim.min_lr_ratio=1.0", "trainer.max_epochs=-1", f"trainer.max_steps={steps}",
                               "trainer.ckpt_every_n_steps=1", *extra)))
        return read_loss_history(str(out / "train_loss.jsonl"))

    full = fit(tmp_path / "full", 4)
    fit(tmp_path / "stopped", 2)
    resumed = fit(tmp_path / "stopped", 4, "resume=auto")
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), (step, resumed, full)
    a = load_file(str(tmp_path / "full" / "adapter" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "stopped" / "adapter" / WEIGHTS_NAME))
    assert a.keys() == b.keys() == _expert_names()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)

    other = "method.target_parameters=[experts.gate_up_proj]"
    with pytest.raises(ConfigError, match=r"resume: .*another method or model config .*experts\.lora_A\.down_proj"):
        run(compose(_overrides(tiny, tmp_path / "stopped", "method=lora", other, "method.target_modules=[]",
                               "trainer.max_epochs=-1", "trainer.max_steps=6", "resume=auto")))


@pytest.mark.parametrize("overrides, match", [
    (["method=mol", "method.target_parameters=[experts.gate_up_proj]"],
     r"^method.target_parameters: MoLConfig has no target_parameters\. .*use method=lora \(or method=qlora\)"),
    (["method=mol", "model.target_parameters=[experts.gate_up_proj]"], None),  # mol ignored it; refused at build
    (["method=lora", "model.target_paramters=[experts.down_proj]"], r"did you mean model\.target_parameters\?"),
])
def test_the_keys_are_checked_before_anything_loads(overrides, match):
    """method.target_parameters is a key of method=lora (and qlora, through it) and of the model group; a method
    without the field names method=lora as the fix instead of Hydra's advice to add the key with '+', or difflib's
    guess, target_modules."""
    from mol.train.app import check_overrides

    for ok in (["method=lora", EXPERTS], ["method=qlora", EXPERTS, "method.target_modules=[]"],
               ["method=lora", "model.target_parameters=[experts.down_proj]"]):
        assert check_overrides(ok, REPO / "conf") is None, ok
    msg = check_overrides(overrides, REPO / "conf")
    if match is None:
        assert msg is None
    else:
        assert msg is not None and "\n" not in msg and "+method" not in msg
        assert re.search(match, msg), msg


@pytest.mark.parametrize("overrides, given", [
    (["method=mol", "model.target_parameters=[experts.gate_up_proj,experts.down_proj]"],
     "model.target_parameters=[experts.gate_up_proj,experts.down_proj]"),
    (["method=mol", "+method.target_parameters=[experts.gate_up_proj]"], "method.target_parameters"),
    (["method=ia3", "model.target_parameters=[experts.down_proj]"], "model.target_parameters=[experts.down_proj]"),
])
def test_a_method_without_target_parameters_is_refused_naming_lora(overrides, given, tmp_path, monkeypatch):
    """model.target_parameters with method=mol used to train MoL on the linear layers alone, the experts frozen,
    without a word; '+method.target_parameters' got "did you mean method.target_modules?"."""
    from mol.train import app

    monkeypatch.setattr(app, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    cfg = compose(["model=hf_causal", "model.path=/x", "data=jsonl", "data.train=/y", f"output_dir={tmp_path}",
                   *overrides])
    with pytest.raises(app.ConfigError) as err:
        app.build_method_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{given}: ") and "has no target_parameters" in msg, msg
    assert "use method=lora (or method=qlora) with the same target_parameters" in msg, msg


@pytest.mark.parametrize("model, targets, match", [
    ("moe", "[experts.nosuch]", r"target_parameters \['experts\.nosuch'\] matched no tensor of Qwen3MoeForCausalLM; "
                                r"expert tensors on offer: \['experts\.down_proj', 'experts\.gate_up_proj'\]"),
    ("moe", "[self_attn.q_proj.weight]", r"a \(32, 32\) tensor of Linear: mol puts LoRA on the 3-D expert tensors"),
    ("llama", "[experts.gate_up_proj]", r"holds no mixture-of-experts layer with fused 3-D expert tensors"),
])
def test_target_parameters_that_fit_nothing_stop_before_training(model, targets, match, tiny, tmp_path):
    """The error names target_parameters and the key to set (it named model.target_modules, which the message
    mentions as the way to adapt linear layers), and nothing has trained or been written."""
    from mol.train.app import ConfigError, run

    path = tiny["moe"] if model == "moe" else make_tiny_llama(tmp_path / "llama")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match) as err:
        run(compose(_overrides(tiny, out, "method=lora", f"method.target_parameters={targets}",
                               f"model.path={path}")))
    assert re.search(r"\(set model\.target_parameters(, model\.target_modules)?\)$", str(err.value)), str(err.value)
    assert not (out / "checkpoints").exists() and not (out / "train_loss.jsonl").exists()


def test_a_peft_format_upload_holds_the_expert_adapters(tiny, tmp_path, monkeypatch):
    """hub.peft_format=true passes check_hub before training and uploads the trained model in PEFT's format, with the
    expert pairs as PEFT's target_parameters: PEFT's own loader computes what the run's saved adapter computes (the
    export used to write the attention's LoRA alone). The upload itself is a stand-in for push_to_hub."""
    import huggingface_hub
    import huggingface_hub.constants

    import mol
    import mol.io
    from mol.train.app import run

    peft = pytest.importorskip("peft")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # what check_hub asks: online, a token
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "tok")
    uploaded = tmp_path / "uploaded"

    def push_to_hub(model, repo_id, peft_format=False, **kwargs):
        assert (repo_id, peft_format) == ("me/moe", True)
        mol.export_peft(model, uploaded)
        return "commit-url"

    monkeypatch.setattr(mol.io, "push_to_hub", push_to_hub)
    out = tmp_path / "run"
    res = run(compose(_overrides(tiny, out, "experiment=qwen3_moe_lora", "trainer=cpu", "model.dtype=float32",
                                 "hub.repo_id=me/moe", "hub.peft_format=true")))
    assert res["run"]["hub"] == "commit-url"
    config = json.loads((uploaded / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"], config

    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 30, (2, 9))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny["moe"])),
                                                str(uploaded)).eval()(input_ids=ids).logits
        ours = mol.load_adapter(AutoModelForCausalLM.from_pretrained(str(tiny["moe"])),
                                str(out / "adapter")).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny["moe"])).eval()(input_ids=ids).logits
    assert not torch.allclose(ours, base, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_on_the_experts_trains_nf4_experts_and_evaluates_to_the_same_loss(dtype, tiny, tmp_path):
    """method=qlora with model.target_parameters (a float32 and a bfloat16 base): the base's expert tensors are
    held in NF4 (NF4Experts under each ExpertsLoRA) and the attention's linears too; every expert's LoRA pair trains,
    the adapter file holds exactly the LoRA tensors (no NF4 code, no base weight), and mol.evaluate of the saved
    adapter, which quantizes a fresh base again, reproduces the run's validation loss."""
    from safetensors.torch import load_file

    import mol
    from mol.evaluate import evaluate
    from mol.io import WEIGHTS_NAME
    from mol.train.app import run

    out = tmp_path / "run"
    res = run(compose(_overrides(tiny, out, "method=qlora", "model.target_modules=[q_proj,v_proj]",
                                 "model.target_parameters=[experts.gate_up_proj,experts.down_proj]",
                                 f"model.dtype={dtype}")))
    saved = load_file(str(out / "adapter" / WEIGHTS_NAME))
    experts = {k: v for k, v in saved.items() if ".mlp.experts." in k}
    assert set(experts) == _expert_names()
    others = set(saved) - set(experts)
    assert others and all(re.search(r"\.self_attn\.[qv]_proj\.lora_[AB]$", k) for k in others), sorted(others)
    for name, t in experts.items():
        assert t.dtype == torch.float32 and t.shape[0] == NUM_EXPERTS, (name, t.dtype, t.shape)
        if ".lora_B." in name:
            assert t.abs().amax() > 0, name
    assert res["run"]["trainable_params"] == sum(t.numel() for t in saved.values())
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert {k.removeprefix("model.") for k in ckpt["state_dict"]} == set(saved)
    recorded = json.loads((out / "results.json").read_text())
    assert recorded["method_config"]["quantize_base"] == "nf4"
    assert recorded["method_config"]["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]

    ev = evaluate(compose([f"adapter={out / 'adapter'}", "split=val", "trainer.enable_progress_bar=false",
                           f"data.cache_dir={tmp_path / 'cache'}"], config_name="evaluate"))
    assert ev["val/loss"] == pytest.approx(res["run"]["val/loss"], rel=1e-5, abs=1e-5)

    from transformers import AutoModelForCausalLM

    loaded = mol.load_adapter(AutoModelForCausalLM.from_pretrained(str(tiny["moe"])), str(out / "adapter"))
    layers = [m for m in loaded.modules() if isinstance(m, mol.ExpertsLoRA)]
    assert len(layers) == LAYERS
    assert all(isinstance(layer.base_layer, mol.NF4Experts) for layer in layers)


def test_ddp_two_processes_train_the_expert_adapters_as_one_process(tiny, tmp_path):
    """Lightning DDP (2 CPU processes, gloo) with LoRA on the experts alone gives the adapter 1 process gives with
    the same global batch: every expert pair takes part in every step's gradient (the grouped GEMM covers experts
    no token of a rank chose, with zero gradients), so DDP's all-reduce sees the same parameters on both ranks and
    none goes unused."""
    from safetensors.torch import load_file

    from test_train_utils import run_cli

    common = ["method=lora", EXPERTS, "method.target_modules=[]", "trainer.max_epochs=-1", "trainer.max_steps=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = run_cli([*_overrides(tiny, one, *common, "trainer=cpu")], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli([*_overrides(tiny, two, *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                             "data.batch_size=4")], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) == _expert_names()
    moved = max(float(a[k].abs().max()) for k in a if ".lora_B." in k)
    assert moved > 1e-2, "lora_B barely left its zero init: the comparison would be vacuous"
    for k in a:  # float summation order only (two half-batch means all-reduced against one full mean)
        assert float((a[k] - b[k]).abs().max()) < 2e-3, k
    assert json.loads((two / "results.json").read_text())["run"]["steps"] == 4
