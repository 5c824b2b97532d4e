"""First-contact mistakes of ``python -m mol.train``: each is refused (or handled) before anything trains, in one
line that names the fix, or the run does the sensible thing and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_train_utils import (REPO, cli_env, compose, make_causal_data, make_classification_data, make_tiny_bert,
                              make_tiny_llama, make_tokenizer, run_cli)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": make_tiny_llama(root / "llama"), "bert": make_tiny_bert(root / "bert"),
            "causal": make_causal_data(root / "causal"), "cls": make_classification_data(root / "cls")}


def _cls_cfg(tiny, out, *extra):
    return compose(["model=hf_classifier", f"model.path={tiny['bert']}", "data=jsonl",
                    f"data.train={tiny['cls']['train']}", f"data.val={tiny['cls']['val']}",
                    f"data.cache_dir={out.parent / 'cache'}", "data.batch_size=8", "trainer.max_steps=2",
                    "trainer.enable_progress_bar=false", f"output_dir={out}", *extra])


def _one_error_line(stderr: str) -> str:
    err = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return err[0]


# ---------------------------------------------------------------------------- 1: the method checked before the baseline
@pytest.mark.parametrize("override, match", [
    ("method=prefix", "cannot apply PrefixTuningConfig to BertForSequenceClassification.*use prompt tuning"),
    ("model.target_modules=nomatch", "'nomatch' matched no module.*set model.target_modules"),
])
def test_a_method_that_cannot_apply_fails_before_the_baseline_trains(override, match, tiny, tmp_path):
    """Prefix tuning on an encoder, or target_modules matching nothing, used to surface after the head-only baseline
    had trained (minutes on the default model)."""
    from mol.train.app import ConfigError, run

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        run(_cls_cfg(tiny, out, override, "baseline.enabled=true"))
    assert not (out / "baseline").exists()


def _snapshot(model):
    return ([(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()], dict(model.__dict__))


@pytest.mark.parametrize("method", ["mol", "lora", "qlora-mol", "prefix", "prompt", "ia3", "bitfit", "adapter"])
def test_the_trial_injection_leaves_the_model_as_it_was(method, tiny, tmp_path):
    """check_injection injects and undoes it: the same modules, tensors, requires_grad flags, hooks and attributes,
    and the global RNG where it was (the baseline then trains as it did without the check)."""
    from transformers import AutoModelForCausalLM

    from mol.train.app import build_method_config, check_injection

    cfg = compose([f"method={method}", "model=hf_causal", f"model.path={tiny['llama']}", "data=jsonl",
                   f"data.train={tiny['causal']['train']}", f"output_dir={tmp_path}"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny["llama"]))
    before, rng = _snapshot(model), torch.get_rng_state()
    check_injection(model, build_method_config(cfg))
    after = _snapshot(model)
    assert after[0] == before[0] and after[2] == before[2] and after[3].keys() == before[3].keys()
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(type(m).__name__ == "NF4Linear" for m in model.modules())


# ---------------------------------------------------------------------------- 2: trainer=gpu without a GPU
@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_a_gpu_trainer_without_a_gpu_is_one_line_before_loading(trainer, tiny, tmp_path, monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    import mol.train.app as app

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(app, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    cfg = compose([f"trainer={trainer}", "model=hf_causal", f"model.path={tiny['llama']}", "data=jsonl",
                   f"data.train={tiny['causal']['train']}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(app.ConfigError, match="trainer.accelerator=gpu but torch sees no GPU.*use trainer=cpu"):
        app.run(cfg)


def test_more_devices_than_gpus_is_one_line(tiny, tmp_path, monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator

    import mol.train.app as app

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: 1))
    cfg = compose(["trainer=fsdp", "model=hf_causal", f"model.path={tiny['llama']}", "data=jsonl",
                   f"data.train={tiny['causal']['train']}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(app.ConfigError, match="trainer.devices=2 but torch sees 1 GPU.*set trainer.devices=1"):
        app.run(cfg)


def test_a_gpu_trainer_without_a_gpu_from_the_cli(tiny, tmp_path):
    env = {**cli_env(), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "mol.train", "trainer=gpu", "model=hf_causal",
                        f"model.path={tiny['llama']}", "data=jsonl", f"data.train={tiny['causal']['train']}",
                        f"output_dir={tmp_path / 'run'}"], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "trainer=cpu" in _one_error_line(p.stderr)


# ---------------------------------------------------------------------------- 3: a saved head of another size
def test_a_saved_classifier_with_another_label_count_gets_a_new_head(tiny, tmp_path, capsys):
    """The tiny BERT was saved with a 4-label head; data with 2 labels used to stop in transformers
    (ignore_mismatched_sizes). The head is re-initialised, trains with modules_to_save, and mol.evaluate loads it."""
    from mol.evaluate import evaluate
    from mol.train.app import run

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        rows = [json.loads(line) for line in open(tiny["cls"][split])]
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": r["text"], "label": "fruit" if r["label"] == "fruit" else "other"}) + "\n"
            for r in rows))
    out = tmp_path / "run"
    res = run(compose(["method=lora", "model=hf_classifier", f"model.path={tiny['bert']}", "data=jsonl",
                       f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}",
                       f"data.test={data / 'val.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=8",
                       "trainer.max_steps=2", f"output_dir={out}", "trainer.enable_progress_bar=false"]))
    assert capsys.readouterr().out.count("4-label classification head and the data 2 labels") == 1  # not per fit
    assert "test/acc" in res["baseline"]
    ev = evaluate(compose([f"adapter={out / 'adapter'}", "trainer.enable_progress_bar=false",
                           f"data.cache_dir={tmp_path / 'cache'}"], config_name="evaluate"))
    assert ev["test/acc"] == pytest.approx(res["run"]["test/acc"], abs=1e-6)


# ---------------------------------------------------------------------------- 6: a mistyped key
@pytest.mark.parametrize("overrides, must, must_not", [
    (["method.rnak=8"], ["method.rnak", "MoLConfig", "did you mean method.rank?", "num_experts"], ["+method"]),
    (["method=lora", "method.num_experts=4"], ["LoRAConfig has no key 'num_experts'", "rank"], ["+method"]),
    (["router.topk=1"], ["did you mean router.top_k?"], ["+router"]),
    (["trainer.max_step=3"], ["did you mean trainer.max_steps?"], ["+trainer"]),
    (["model.targt_modules=x"], ["did you mean model.target_modules?"], ["+model"]),
    (["trainer.limit_train_batches=2"], ["+trainer.limit_train_batches=2"], []),  # a Trainer argument: '+' is right
    (["method.init=gaussian"], ["+method.init=gaussian"], []),  # a MoLConfig field the yaml leaves out
])
def test_a_mistyped_key_names_the_keys_there_are(overrides, must, must_not):
    from mol.train.app import check_overrides

    msg = check_overrides(overrides, REPO / "conf")
    assert msg is not None and "\n" not in msg
    for word in must:
        assert word in msg, (word, msg)
    for word in must_not:
        assert word not in msg, (word, msg)


def test_a_key_added_with_plus_that_is_no_field_names_the_fields(tmp_path):
    from mol.train.app import ConfigError, build_method_config

    with pytest.raises(ConfigError, match=r"method.rnak: MoLConfig has no key 'rnak' \(did you mean method.rank\?\)"):
        build_method_config(compose(["+method.rnak=8", f"output_dir={tmp_path}"]))


# ---------------------------------------------------------------------------- 7: data that does not fit the model
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows, kind", [([{"prompt": "red blue", "response": "cat"}] * 4, "prompt/response"),
                                        ([{"text": "one two"}] * 4, "text")])
def test_a_classifier_on_records_without_labels_says_so(rows, kind, tmp_path):
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    dm = TextDataModule(tok, "classification", train=_write(tmp_path / "a.jsonl", rows), cache_dir=None)
    with pytest.raises(DataError, match=f"no records with a `label` field \\({kind} records in .*model=hf_causal"):
        dm.scan()


def test_a_causal_lm_on_labelled_records_warns_once(tmp_path):
    import warnings

    from mol.train.data import TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    # two tokens each: a one-token text has nothing to predict and is left out of training
    rows = [{"text": "cat dog", "label": "animal"}, {"text": "red blue", "label": "color"}] * 4
    dm = TextDataModule(tok, "causal_lm", train=_write(tmp_path / "a.jsonl", rows),
                        val=_write(tmp_path / "b.jsonl", rows), cache_dir=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dm.setup()
    mine = [w for w in seen if "ignores every `label`" in str(w.message)]
    assert len(mine) == 1 and "model=hf_classifier" in str(mine[0].message)
    assert len(dm.splits["train"]) == 8  # trains on the text all the same


# ---------------------------------------------------------------------------- 8: own configs of an installed package
def test_an_unknown_group_option_names_config_dir(tmp_path, monkeypatch):
    import mol.train.app as app

    msg = app.check_overrides(["method=mymol"], REPO / "conf")
    assert "or add conf/method/mymol.yaml, or DIR/method/mymol.yaml and pass --config-dir DIR" in msg
    installed = tmp_path / "site" / "mol"
    shutil.copytree(REPO / "conf", installed / "conf")
    monkeypatch.setattr(app, "_package_dir", lambda: installed)
    msg = app.check_overrides(["method=mymol"], installed / "conf")
    assert "(or write DIR/method/mymol.yaml and pass --config-dir DIR)" in msg and "conf/method" not in msg


def test_config_dir_options_are_checked_like_the_shipped_ones(tiny, tmp_path):
    """``--config-dir DIR``: DIR's options are accepted, and a typo in one of their keys is one line as well."""
    from mol.train.app import _config_dir_args, check_overrides

    own = tmp_path / "myconf"
    (own / "method").mkdir(parents=True)
    (own / "method" / "mymol.yaml").write_text("defaults:\n  - mol\n  - _self_\nrank: 4\n")
    assert _config_dir_args(["--config-dir", str(own), "method=mymol"]) == (["method=mymol"], [str(own)])
    assert check_overrides(["method=mymol"], REPO / "conf", extra_dirs=(str(own),)) is None
    p = run_cli(["--config-dir", str(own), "method=mymol", "method.rnk=2", f"output_dir={tmp_path / 'run'}"],
                cwd=tmp_path, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "did you mean method.rank?" in _one_error_line(p.stderr)


# ---------------------------------------------------------------------------- 9: each log line once
def test_each_lightning_line_is_printed_once(tiny, tmp_path):
    p = run_cli(["model=hf_causal", f"model.path={tiny['llama']}", "data=jsonl",
                 f"data.train={tiny['causal']['train']}", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                 f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    both = p.stdout + p.stderr
    assert both.count("`Trainer.fit` stopped: `max_steps=2` reached.") == 1, both[-3000:]
    assert "[HYDRA]" not in both


def test_hydra_own_lines_still_print(tmp_path):
    # multirun: Hydra's "Launching N jobs" goes to its own logger, once
    p = run_cli(["-m", "trainer.max_epochs=-1", "trainer.max_steps=-1", "seed=0,1",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, timeout=300)
    assert p.stdout.count("Launching 2 jobs locally") == 1, p.stdout[-2000:]
    assert os.path.isdir(tmp_path / "sweep")


# ---------------------------------------------------------------------------- texts longer than a position table
@pytest.mark.parametrize("extra, match", [
    ([], r"longest data.train example is 68 tokens \(data.max_length=256\), and BertForSequenceClassification has "
         r"learned positions for 64; pass data.max_length=64"),
    (["method=prompt", "data.max_length=64"], r"64 tokens \+ 20 virtual tokens .* pass data.max_length=44"),
])
def test_texts_longer_than_the_models_positions_are_one_line_before_training(extra, match, tiny, tmp_path):
    """data=jsonl's max_length 256 on a BERT of 64 positions (or prompt tuning's 20 virtual tokens on top of 64) failed
    inside the first forward with 'The expanded size of the tensor (256) must match the existing size (64)', after
    the baseline had trained, instead of naming data.max_length."""
    from mol.train.app import ConfigError, run

    long_rows = tmp_path / "train.jsonl"
    rows = open(tiny["cls"]["train"]).read().splitlines()
    rows[0] = json.dumps({"text": " ".join(["apple"] * 68), "label": "fruit"})  # 68 tokens: no [CLS]
    long_rows.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        run(_cls_cfg(tiny, out, f"data.train={long_rows}", "baseline.enabled=true", *extra))
    assert not (out / "baseline").exists() and not (out / "logs").exists()
    assert run(_cls_cfg(tiny, tmp_path / "ok", f"data.train={long_rows}", "data.max_length=44", *extra[:1]))["run"]


def test_evaluate_reads_data_max_length_and_checks_the_positions(tiny, tmp_path):
    """mol.evaluate's data.max_length was replaced by the run's without a word; now it is read, and a length beyond
    the model's positions is one ConfigError naming it."""
    from mol.evaluate import evaluate
    from mol.train.app import ConfigError, run

    run(_cls_cfg(tiny, tmp_path / "run", "baseline.enabled=false"))
    long_rows = tmp_path / "test.jsonl"
    long_rows.write_text(json.dumps({"text": " ".join(["apple"] * 100), "label": "fruit"}) + "\n")

    def ev(*o):
        return evaluate(compose([f"adapter={tmp_path / 'run' / 'adapter'}", f"data.test={long_rows}",
                                 f"data.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false", *o],
                                config_name="evaluate"))

    with pytest.raises(ConfigError, match=r"100 tokens \(data.max_length=256\).* pass data.max_length=64"):
        ev()  # the run's data.max_length
    with pytest.raises(ConfigError, match=r"100 tokens \(data.max_length=100\).* pass data.max_length=64"):
        ev("data.max_length=100")
    short, longer = ev("data.max_length=4"), ev("data.max_length=64")
    assert short["examples"] == longer["examples"] == 1 and short["test/loss"] != pytest.approx(longer["test/loss"])


def test_a_router_override_on_a_method_without_a_router_says_so(tiny, tmp_path):
    """router=switch with method=lora trained plain LoRA without a word: the router group only feeds method=mol and
    qlora-mol. Said once per job that ignores it (a sweep across methods and routers still runs)."""
    p = run_cli(["-m", "method=lora,mol", "router=switch", "router.top_k=1", "model=hf_causal",
                 f"model.path={tiny['llama']}", "data=jsonl", f"data.train={tiny['causal']['train']}",
                 "trainer.max_steps=1", "trainer.enable_progress_bar=false", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'sweep'}"], cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    said = "mol: router=switch router.top_k=1 changes nothing: LoRAConfig has no router (the router group configures " \
        "method=mol and qlora-mol)"
    assert p.stdout.count(said) == 1, p.stdout[-3000:]
    assert json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())["method_config"]["router"] == "switch"
