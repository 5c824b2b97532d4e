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
