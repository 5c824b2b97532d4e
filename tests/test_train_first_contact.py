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
