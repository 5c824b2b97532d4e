"""Lightning DDP with 2 CPU processes (gloo) gives the same adapter as 1 process with the same global batch.

The router's load-balance and z losses are set to 0 here: they are computed per process (as Switch and
ST-MoE do), so with them on, 2 processes optimise a slightly different objective than 1 process by design.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from test_train_utils import REPO, make_classification_data, make_tiny_bert, run_cli


def _args(model, data, out, cache):
    return ["model=hf_classifier", f"model.path={model}", "data=jsonl", f"data.train={data['train']}",
            f"data.val={data['val']}", f"data.cache_dir={cache}", "method=mol", "router.aux_loss_coef=0",
            "router.z_loss_coef=0", "trainer.max_epochs=-1", "trainer.max_steps=6", "trainer.ckpt_every_n_steps=3",
            "trainer.enable_progress_bar=false", "optim.lr=1e-2", "baseline.enabled=false", f"output_dir={out}"]


def test_ddp_two_processes_equals_one_process(tmp_path):
    model = make_tiny_bert(tmp_path / "bert")
    data = make_classification_data(tmp_path / "data", n_train=48, n_val=8)
    cache = tmp_path / "cache"

    one = tmp_path / "one"
    p = run_cli(_args(model, data, one, cache) + ["trainer=cpu", "data.batch_size=8"], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    two = tmp_path / "two"
    p = run_cli(_args(model, data, two, cache) + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                                  "data.batch_size=4"], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world_size=2" in p.stdout + p.stderr or "distributed_backend=gloo" in p.stdout + p.stderr

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    # Gradients differ only by float summation order (all-reduce of two half-batch means vs one full mean).
    # Adam divides by sqrt(v): where a gradient entry is ~0 (e.g. the pooler's router, which sees 1 token per
    # sequence) that rounding noise can move a weight by up to ~lr, so a few entries get a looser bound. A real
    # DDP bug (unsynchronised gradients, wrong shard) moves weights by O(lr * steps) = 6e-2 everywhere.
    moved, tight = 0.0, 0
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff < 2e-3, (k, diff)
        tight += diff < 2e-5
        if "lora_B" in k:
            moved = max(moved, float(a[k].abs().max()))  # lora_B starts at zero
    assert tight >= 0.9 * len(a), f"only {tight}/{len(a)} tensors agree to 2e-5"
    assert moved > 1e-2, "lora_B barely left its zero init: the comparison would be vacuous"
    # both saw 6 optimiser steps with the same data
    assert json.loads((one / "results.json").read_text())["run"]["steps"] == 6
    assert json.loads((two / "results.json").read_text())["run"]["steps"] == 6


def test_ddp_resume_follows_the_uninterrupted_run_with_dropout(tmp_path):
    """2 processes, dropout and router noise on: a run stopped at step 4 and resumed to step 8 takes the
    uninterrupted run's steps 5-8. Each rank's random stream advances with its own batches; the checkpoint used to
    hold rank 0's state only, which every rank restored, so rank 1's dropout left the reference from step 5 on."""
    from mol.train.callbacks import read_loss_history

    model = make_tiny_bert(tmp_path / "bert")
    data = make_classification_data(tmp_path / "data", n_train=48, n_val=8)
    cache = tmp_path / "cache"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4", "method.dropout=0.2",
           "router.noise=0.5", "optim.warmup_ratio=0", "optim.min_lr_ratio=1.0", "data.group_by_length=false"]

    def fit(out, steps, *extra):
        args = _args(model, data, out, cache) + ddp + [f"trainer.max_steps={steps}", *extra]
        p = run_cli(args, cwd=REPO)
        assert p.returncode == 0, p.stderr[-3000:]

    fit(tmp_path / "full", 8)
    fit(tmp_path / "stopped", 4)
    fit(tmp_path / "stopped", 8, "resume=auto")
    full = read_loss_history(str(tmp_path / "full" / "train_loss.jsonl"))
    resumed = read_loss_history(str(tmp_path / "stopped" / "train_loss.jsonl"))
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(resumed[step] - full[step]) <= 1e-6 * abs(full[step]), (step, resumed, full)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_ddp_loss_logs_are_the_global_batch_loss(tmp_path):
    """train_loss.jsonl and metrics.csv's train/loss under 2 processes (batch 4 each) equal 1 process's (batch 8),
    dropout-free with the router losses off, so both compute the same function. They used to record rank 0's loss
    over its half of the batch."""
    import csv

    from mol.train.callbacks import read_loss_history

    model = make_tiny_bert(tmp_path / "bert")
    data = make_classification_data(tmp_path / "data", n_train=48, n_val=8)
    cache = tmp_path / "cache"
    runs = {"one": ["trainer=cpu", "data.batch_size=8"],
            "two": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4"]}
    for name, extra in runs.items():
        p = run_cli(_args(model, data, tmp_path / name, cache) + extra + ["trainer.max_steps=3",
                                                                          "trainer.log_every_n_steps=1"], cwd=REPO)
        assert p.returncode == 0, p.stderr[-3000:]
    one, two = (read_loss_history(str(tmp_path / n / "train_loss.jsonl")) for n in runs)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one, two)

    def csv_losses(name):
        rows = csv.DictReader(open(tmp_path / name / "logs" / "metrics.csv"))
        return [float(r["train/loss"]) for r in rows if r.get("train/loss")]

    a, b = csv_losses("one"), csv_losses("two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
