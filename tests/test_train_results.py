"""What a finished run reports: the loss log under gradient accumulation, the validation numbers of the final
model, and an evaluation of the saved adapter that reproduces them (the run's tokenizer and dtype)."""

from __future__ import annotations

import json

import pytest
from test_train_utils import compose, make_causal_data, make_tiny_llama, quiet_trainer_overrides


def _cfg(model, data, out, *extra):
    return compose(["method=mol", "method.dropout=0", "model=hf_causal", f"model.path={model}", "data=jsonl",
                    f"data.train={data['train']}", f"data.val={data['val']}", "data.batch_size=4",
                    "data.max_length=24", f"data.cache_dir={out.parent / 'cache'}", f"output_dir={out}",
                    *quiet_trainer_overrides(), *extra])


def test_loss_log_under_gradient_accumulation(tmp_path):
    """At lr 0 every batch sees the same weights, so a step that accumulates two batches logs the mean of the two
    losses a plain run logs for them (Lightning hands callbacks the loss divided by the accumulation count), one
    line per optimizer step, the epoch's shorter last window included: 8 batches an epoch, 3 per step."""
    from mol.train.app import run
    from mol.train.callbacks import read_loss_history

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    common = ["optim.lr=0", "router.noise=0", "trainer.max_epochs=1", "trainer.val_check_interval=1.0"]
    run(_cfg(model, data, tmp_path / "plain", *common))
    plain = read_loss_history(str(tmp_path / "plain" / "train_loss.jsonl"))
    run(_cfg(model, data, tmp_path / "acc", *common, "trainer.accumulate_grad_batches=3"))
    acc = read_loss_history(str(tmp_path / "acc" / "train_loss.jsonl"))
    assert sorted(plain) == list(range(1, 9)) and sorted(acc) == [1, 2, 3]
    for step, batches in {1: [1, 2, 3], 2: [4, 5, 6], 3: [7, 8]}.items():
        want = sum(plain[b] for b in batches) / len(batches)
        assert abs(acc[step] - want) <= 1e-5 * abs(want), (step, acc, plain)


def test_results_report_the_final_model_and_evaluate_reproduces_them(tmp_path, capsys):
    """Validation every 5 steps of a 7-step run: results.json's val numbers are the final model's (not step 5's),
    and mol.evaluate on the saved adapter, given nothing but the adapter and the data, reproduces them: it takes the
    run's model dtype (bfloat16 here) from training_meta.json."""
    from mol.evaluate import evaluate
    from mol.train.app import run

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    out = tmp_path / "run"
    results = run(_cfg(model, data, out, "trainer.max_epochs=-1", "trainer.max_steps=7",
                       "trainer.val_check_interval=5", "model.dtype=bfloat16", "optim.lr=1e-2"))
    meta = json.loads((out / "adapter" / "training_meta.json").read_text())
    assert meta["dtype"] == "bfloat16"
    got = evaluate(compose(["model=hf_causal", "data=jsonl", f"data.val={data['val']}", f"adapter={out / 'adapter'}",
                            "split=val", "trainer.enable_progress_bar=false"], config_name="evaluate"))
    assert got["val/loss"] == pytest.approx(results["run"]["val/loss"], rel=1e-6, abs=0)


def test_an_endless_run_is_refused_before_training(tmp_path):
    from mol.train.app import ConfigError, prepare

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="never ends.*set trainer.max_steps=N or a finite trainer.max_epochs"):
        prepare(_cfg(model, data, tmp_path / "run", "trainer.max_epochs=-1", "trainer.max_steps=-1"))
    assert not (tmp_path / "run").exists()


def test_lightning_setting_that_does_not_fit_the_data_is_one_config_error(tmp_path):
    """val_check_interval=100 on an 8-batch epoch: Lightning's own check, raised inside fit, reaches the CLI as a
    ConfigError (one line, no traceback) naming the setting."""
    from mol.train.app import ConfigError, run

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="val_check_interval"):
        run(_cfg(model, data, tmp_path / "run", "trainer.max_epochs=1", "trainer.val_check_interval=100"))


def test_a_wrong_resume_path_fails_before_anything_trains(tmp_path):
    """resume=<no such file> used to surface only in the method's fit, after the head-only baseline had trained."""
    from mol.train.app import ConfigError, run
    from test_train_utils import make_classification_data, make_tiny_bert

    model, data = make_tiny_bert(tmp_path / "bert"), make_classification_data(tmp_path / "data")
    cfg = compose(["method=lora", "model=hf_classifier", f"model.path={model}", "data=jsonl",
                   f"data.train={data['train']}", f"data.val={data['val']}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"output_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false", "baseline.enabled=true",
                   f"resume={tmp_path / 'nowhere.ckpt'}"])
    with pytest.raises(ConfigError, match="is not a checkpoint file"):
        run(cfg)
    assert not (tmp_path / "run" / "baseline").exists()
