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


def test_evaluate_with_a_gpu_trainer_and_no_gpu(trained, monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    import mol.evaluate
    from mol.train.app import ConfigError

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(mol.evaluate, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(ConfigError, match="no GPU.*use trainer=cpu"):
        _evaluate(f"adapter={trained['adapter']}", "trainer=gpu")
