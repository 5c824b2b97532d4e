"""``python -m mol.evaluate``: it evaluates on the data the run trained with, and a moved base model, a missing
adapter or data, or a GPU trainer without a GPU end in one line naming the key that fixes it."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train_utils import compose, make_causal_data, make_tiny_llama, quiet_trainer_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step LoRA run of a tiny Llama on its own data (with a test file of 5 records), and its results."""
    from mol.train.app import run

    root = tmp_path_factory.mktemp("ev")
    model, data = make_tiny_llama(root / "llama"), make_causal_data(root / "data")
    test = root / "data" / "test.jsonl"
    test.write_text("".join(open(data["val"]).readlines()[:5]))
    out = root / "run"
    res = run(compose(["method=lora", "model=hf_causal", f"model.path={model}", "data=jsonl",
                       f"data.train={data['train']}", f"data.val={data['val']}", f"data.test={test}",
                       "data.batch_size=8", f"data.cache_dir={root / 'cache'}", "trainer.max_steps=2",
                       f"output_dir={out}", *quiet_trainer_overrides()]))
    return {"root": root, "model": model, "data": data, "test": test, "adapter": out / "adapter", "results": res}


def _evaluate(*overrides):
    from mol.evaluate import evaluate

    return evaluate(compose([*overrides, "trainer.enable_progress_bar=false"], config_name="evaluate"))


def _copy_run(trained, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], adapter)
    return adapter, json.loads((adapter / "training_meta.json").read_text())


def test_evaluate_takes_the_runs_own_data(trained, capsys):
    """Not the bundled fortunes set: the run's test file (5 records), which reproduces the run's test loss."""
    meta = json.loads((trained["adapter"] / "training_meta.json").read_text())
    assert meta["data"]["test"] == [{"path": str(trained["test"].resolve()), "task": None, "weight": 1.0}]
    got = _evaluate(f"adapter={trained['adapter']}")
    assert got["examples"] == 5
    assert got["test/loss"] == pytest.approx(trained["results"]["run"]["test/loss"], rel=1e-6)
    assert f"the run's {trained['test'].resolve()}" in capsys.readouterr().err
    val = _evaluate(f"adapter={trained['adapter']}", "split=val")
    assert val["examples"] == 8
    # data.test= still chooses other files
    assert _evaluate(f"adapter={trained['adapter']}", "data=jsonl", f"data.test={trained['data']['val']}")[
        "examples"] == 8


def test_evaluate_says_when_the_runs_data_is_gone(trained, tmp_path):
    from mol.train.app import ConfigError

    adapter, meta = _copy_run(trained, tmp_path)
    meta["data"]["test"][0]["path"] = str(tmp_path / "moved.jsonl")
    (adapter / "training_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="moved.jsonl .* no longer exists; pass data.test=FILE"):
        _evaluate(f"adapter={adapter}")


def test_a_run_without_a_test_split_says_what_to_pass(trained, tmp_path):
    from mol.train.app import ConfigError

    adapter, meta = _copy_run(trained, tmp_path)
    meta["data"]["test"] = []
    (adapter / "training_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"the run had no data.test .*pass data.test=FILE, or split=val"):
        _evaluate(f"adapter={adapter}")
    assert _evaluate(f"adapter={adapter}", "split=val")["examples"] == 8


def test_an_older_run_without_recorded_data_says_which_data_it_uses(trained, tmp_path, capsys):
    adapter, meta = _copy_run(trained, tmp_path)
    del meta["data"]
    (adapter / "training_meta.json").write_text(json.dumps(meta))
    got = _evaluate(f"adapter={adapter}")
    assert got["examples"] > 100  # the bundled fortunes test split, as before
    assert "evaluating on the bundled fortunes test split" in capsys.readouterr().err


def test_a_moved_base_model_names_base_model(trained, tmp_path):
    from mol.train.app import ConfigError

    adapter, meta = _copy_run(trained, tmp_path)
    meta["model_path"] = str(tmp_path / "was_moved")
    (adapter / "training_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="was_moved that .* records is not a Hugging Face model folder.*base_model="):
        _evaluate(f"adapter={adapter}")
    want = trained["results"]["run"]["test/loss"]
    assert _evaluate(f"adapter={adapter}", f"base_model={trained['model']}")["test/loss"] == pytest.approx(want)
    # model.path, the key mol.train takes, works too
    assert _evaluate(f"adapter={adapter}", f"model.path={trained['model']}")["test/loss"] == pytest.approx(want)
    with pytest.raises(ConfigError, match="base_model=.*nowhere is not a Hugging Face model folder"):
        _evaluate(f"adapter={adapter}", f"base_model={tmp_path / 'nowhere'}")
    # a base model the adapter's layers are not in: load_adapter's advice, "Fix target_modules", was not a key
    # mol.evaluate takes (it reads them from the adapter)
    from test_train_utils import make_tiny_bert

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["configs"][0]["target_modules"] = ["q_proj", "v_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"the adapter .* does not fit the base model .*bert: .*q_proj.*; evaluate "
                                          r"it on the model it was trained on \(.*was_moved, recorded in .*\): leave "
                                          r"base_model= out"):
        _evaluate(f"adapter={adapter}", f"base_model={make_tiny_bert(tmp_path / 'bert')}")
    # a damaged adapter file keeps load_adapter's own line, which names that fix
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        _evaluate(f"adapter={adapter}", f"base_model={trained['model']}")
    assert "does not fit the base model" not in str(e.value)


def test_an_adapter_that_does_not_fit_the_recorded_model_gets_no_base_model_advice(trained, tmp_path):
    """With no base_model= given, an adapter that does not fit the model the run recorded was told to "leave
    base_model= out"; a damaged adapter_config.json (target_modules=[], which inject's validate refuses naming
    target_modules) was taken for a base model that does not fit."""
    from mol.train.app import ConfigError

    adapter, _ = _copy_run(trained, tmp_path)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["configs"][0]["target_modules"] = ["nope_proj"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"does not fit .*llama, the base model .* records \(changed since the "
                                          r"run\?\): .*nope_proj.*; pass base_model=DIR") as e:
        _evaluate(f"adapter={adapter}")
    assert "leave base_model= out" not in str(e.value)
    config["configs"][0]["target_modules"] = []
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"adapter_config.json holds an invalid config \(.*target_modules is empty.*"
                                          r"\); the file is damaged") as e:
        _evaluate(f"adapter={adapter}")
    assert "does not fit" not in str(e.value)


def test_a_missing_adapter_says_it_does_not_exist(tmp_path):
    from mol.train.app import ConfigError

    with pytest.raises(ConfigError, match="adapter=.*no_such_adapter does not exist"):
        _evaluate(f"adapter={tmp_path / 'no_such_adapter'}")


@pytest.mark.parametrize("text, match", [
    ("{not json", r"training_meta\.json is not valid JSON"),
    ("[]", r"training_meta\.json holds a JSON list, not the run's record \(an object\)"),
    ('{"labels": []}', r"training_meta\.json lacks 'task'"),
])
def test_a_damaged_training_meta_is_one_config_error(tmp_path, text, match):
    # each failed with a bare JSONDecodeError / AttributeError / KeyError traceback
    from mol.train.app import ConfigError

    (tmp_path / "training_meta.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"{match}.*copy the run's adapter folder again, or point adapter= at "
                                          r"<run>/adapter"):
        _evaluate(f"adapter={tmp_path}")


def test_evaluate_with_a_gpu_trainer_and_no_gpu(trained, monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    import mol.evaluate
    from mol.train.app import ConfigError

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(mol.evaluate, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(ConfigError, match="no GPU.*use trainer=cpu"):
        _evaluate(f"adapter={trained['adapter']}", "trainer=gpu")


@pytest.mark.parametrize("override, match", [("data.eval_batch_size=0", "data.eval_batch_size=0 is not a whole"),
                                             ("model.dtype=bfloat17", "model.dtype=bfloat17 is not a torch")])
def test_a_value_evaluate_cannot_use_is_one_config_error(trained, override, match):
    # were a ValueError from range() in the loader and an AttributeError from getattr(torch, ...)
    from mol.train.app import ConfigError

    with pytest.raises(ConfigError, match=match):
        _evaluate(f"adapter={trained['adapter']}", override)
