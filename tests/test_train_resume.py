"""SIGKILL a CPU training run part-way, resume it from its last checkpoint, and the remaining loss curve equals
an uninterrupted run's, step for step. Dropout and router noise are on, so RNG restore is exercised, and the
run crosses an epoch boundary after the resume, so the data position and the next epoch's shuffle are too."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_utils import REPO, cli_env, make_causal_data, make_tiny_llama, run_cli

MAX_STEPS = 24  # 32 examples / batch 4 = 8 steps per epoch: three epochs
KILL_AFTER_STEP = 7


def _args(model, data, out, cache):
    return ["model=hf_causal", f"model.path={model}", "data=jsonl", f"data.train={data['train']}",
            f"data.val={data['val']}", "data.batch_size=4", "data.max_length=24", f"data.cache_dir={cache}",
            "method=mol", "method.dropout=0.1", "router.noise=0.5", "trainer.max_epochs=-1",
            f"trainer.max_steps={MAX_STEPS}", "trainer.ckpt_every_n_steps=5", "trainer.val_check_interval=6",
            "trainer.enable_progress_bar=false", "optim.lr=5e-3", "baseline.enabled=false", f"output_dir={out}"]


def _losses(path, skip_lines=0):
    rows = [json.loads(line) for line in open(path).read().splitlines()[skip_lines:] if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def test_sigkill_resume_matches_uninterrupted_run(tmp_path):
    model = make_tiny_llama(tmp_path / "llama")
    data = make_causal_data(tmp_path / "data")
    cache = tmp_path / "cache"

    full = tmp_path / "full"
    p = run_cli(_args(model, data, full, cache), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    reference = _losses(full / "train_loss.jsonl")
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))

    # same run, killed with SIGKILL once it has passed KILL_AFTER_STEP (a checkpoint exists at step 5)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mol.train", *_args(model, data, killed, cache)], cwd=str(REPO),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "train_loss.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(_losses(log)) >= KILL_AFTER_STEP:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)
    resumed_from = ckpt["global_step"]
    assert 5 <= resumed_from < MAX_STEPS
    # small: trainable tensors only (no frozen base weights)
    assert all("base_layer" not in k and "embed_tokens" not in k for k in ckpt["state_dict"])

    n_before = len(open(log).read().splitlines())
    p = run_cli(_args(model, data, killed, cache) + ["resume=auto"], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = _losses(log, skip_lines=n_before)
    assert sorted(resumed) == list(range(resumed_from + 1, MAX_STEPS + 1))
    for step, loss in resumed.items():
        assert loss == reference[step] or abs(loss - reference[step]) <= 1e-6 * abs(reference[step]), \
            (step, loss, reference[step])
    # and the final adapters agree
    from safetensors.torch import load_file

    a = load_file(str(next((full / "adapter").glob("*.safetensors"))))
    b = load_file(str(next((killed / "adapter").glob("*.safetensors"))))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused, max_epochs", [("false", -1), ("true", -1), ("false", 3)])
def test_resume_after_the_first_epoch_and_each_epoch_reshuffles(fused, max_epochs, tmp_path, monkeypatch):
    """In process, 4 steps an epoch: a run stopped at step 6 (mid-epoch 1) and resumed to step 10 takes the
    uninterrupted run's steps 7-10, and each epoch draws its own order. Before the loader handed Lightning's epoch to
    the batch sampler, every epoch replayed epoch 0's order and this resume skipped nothing. With optim.fused=true the
    fused AdamW's state (its step counts on the parameters' device) round-trips through last.ckpt too. With a finite
    trainer.max_epochs (the default config's form) the learning-rate schedule used to ask Lightning for the run's
    length before the checkpoint was restored, which built the loader early: the resumed run replayed epoch 0.
    The resumed run appends to metrics.csv and train_loss.jsonl; a resume=auto with no checkpoint starts them anew."""
    from mol.train.app import run
    from mol.train.callbacks import read_loss_history
    from mol.train.data import ResumableSampler
    from test_train_utils import compose, quiet_trainer_overrides

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    orders = []
    batches = ResumableSampler._global_batches

    def recording(self):
        out = batches(self)
        orders.append((self.epoch, out))
        return out

    monkeypatch.setattr(ResumableSampler, "_global_batches", recording)

    def losses(name, *extra):
        cfg = compose(["method=mol", "model=hf_causal", f"model.path={model}", "data=jsonl",
                       f"data.train={data['train']}", f"data.val={data['val']}", "data.batch_size=8",
                       "data.max_length=32", f"data.cache_dir={tmp_path / 'cache'}", "optim.lr=1e-2",
                       f"optim.fused={fused}", "optim.warmup_ratio=0", "optim.min_lr_ratio=1.0",
                       f"trainer.max_epochs={max_epochs}", "trainer.ckpt_every_n_steps=3",
                       f"output_dir={tmp_path / name}",
                       *quiet_trainer_overrides(), *extra])
        run(cfg)
        return read_loss_history(str(tmp_path / name / "train_loss.jsonl"))

    full = losses("full", "trainer.max_steps=10")
    assert [e for e, _ in orders] == [0, 1, 2]
    assert orders[0][1] != orders[1][1] and orders[1][1] != orders[2][1]
    # resume=auto where a run was killed before its first checkpoint starts afresh, and its logs with it: they
    # used to be appended to, repeating steps 1.. after the killed run's
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "train_loss.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    losses("stopped", "trainer.max_steps=6", "resume=auto")
    assert len((tmp_path / "stopped" / "train_loss.jsonl").read_text().splitlines()) == 6
    resumed = losses("stopped", "trainer.max_steps=10", "resume=auto")
    assert sorted(full) == sorted(resumed) == list(range(1, 11))
    for step in range(7, 11):
        assert abs(resumed[step] - full[step]) <= 1e-6 * abs(full[step]), (step, resumed, full)
    # and metrics.csv keeps the rows from before the resume (Lightning's CSV writer deleted the file on start)
    with open(tmp_path / "stopped" / "logs" / "metrics.csv") as fh:
        logged = [int(r["step"]) for r in csv.DictReader(fh) if r["train/loss"]]
    assert logged == list(range(10)), logged


def test_resume_from_an_epochs_last_step_takes_the_next_epochs_order(tmp_path):
    """A run stopped on an epoch's last step (step 4 of 4 an epoch; a kill after a checkpoint that falls there, as
    ckpt_every_n_steps=20 does at 40 steps an epoch) and resumed to step 12 takes the uninterrupted run's steps 5-12,
    the epoch after the next one included. Lightning, restored on the last batch, opens the loader while still in the
    finished epoch and runs it as the next: the sampler skipped the whole finished epoch, so that epoch passed empty
    and training went on with epoch 2's order instead of epoch 1's."""
    from mol.train.app import run
    from mol.train.callbacks import read_loss_history
    from test_train_utils import compose, quiet_trainer_overrides

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")

    def losses(name, *extra):
        run(compose(["method=lora", "model=hf_causal", f"model.path={model}", "data=jsonl",
                     f"data.train={data['train']}", f"data.val={data['val']}", "data.batch_size=8",
                     "data.max_length=32", f"data.cache_dir={tmp_path / 'cache'}", "optim.lr=1e-2",
                     "optim.warmup_ratio=0", "optim.min_lr_ratio=1.0", "trainer.max_epochs=-1",
                     "trainer.ckpt_every_n_steps=2", f"output_dir={tmp_path / name}", *quiet_trainer_overrides(),
                     *extra]))
        return read_loss_history(str(tmp_path / name / "train_loss.jsonl"))

    full = losses("full", "trainer.max_steps=12")
    losses("stopped", "trainer.max_steps=4")
    resumed = losses("stopped", "trainer.max_steps=12", "resume=auto")
    assert sorted(full) == sorted(resumed) == list(range(1, 13))
    for step in range(5, 13):
        assert abs(resumed[step] - full[step]) <= 1e-6 * abs(full[step]), (step, resumed, full)


def test_a_run_stopped_mid_epoch_by_max_steps_resumes_there_and_epochs_save_last(tmp_path, monkeypatch):
    """Lightning's ModelCheckpoint with save_top_k=0 saved last.ckpt only every ckpt_every_n_steps, and else once,
    when training ended, recording the epoch as finished: a run stopped by trainer.max_steps=3 (of 4 steps an epoch,
    no checkpoint step on the way) and resumed to step 8 skipped the rest of epoch 0 and took epoch 1's order, and
    trainer.ckpt_every_n_steps=0 ("last.ckpt only at epoch ends and validations") saved nothing until the run ended,
    so a killed run had no checkpoint at all."""
    import lightning.pytorch as pl

    from mol.train.app import run
    from mol.train.callbacks import read_loss_history
    from test_train_utils import compose, quiet_trainer_overrides

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    saves = []
    save = pl.Trainer.save_checkpoint

    def recording(self, path, *a, **k):
        saves.append(self.global_step)
        return save(self, path, *a, **k)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", recording)

    def losses(name, *extra):
        run(compose(["method=lora", "model=hf_causal", f"model.path={model}", "data=jsonl",
                     f"data.train={data['train']}", "data.batch_size=8", "data.max_length=32",
                     f"data.cache_dir={tmp_path / 'cache'}", "optim.lr=1e-2", "optim.warmup_ratio=0",
                     "optim.min_lr_ratio=1.0", "trainer.max_epochs=2", f"output_dir={tmp_path / name}",
                     *quiet_trainer_overrides(), *extra]))
        return read_loss_history(str(tmp_path / name / "train_loss.jsonl"))

    full = losses("full", "trainer.ckpt_every_n_steps=0")
    assert saves == [4, 8]  # each epoch's end
    saves.clear()
    losses("validated", "trainer.ckpt_every_n_steps=0", f"data.val={data['val']}", "trainer.val_check_interval=3")
    assert saves == [3, 4, 7, 8]  # each validation's end, and each epoch's
    losses("stopped", "trainer.max_steps=3")
    resumed = losses("stopped", "trainer.max_steps=8", "resume=auto")
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    for step in range(4, 9):
        assert abs(resumed[step] - full[step]) <= 1e-6 * abs(full[step]), (step, resumed, full)


def test_a_resume_with_another_lr_or_weight_decay_trains_with_them(tmp_path):
    """The restored optimizer and schedule held the checkpoint's lr and weight decay: a run resumed with a lower
    optim.lr (say, after its loss diverged) went on at the old one without a word."""
    from mol.train.app import run
    from test_train_utils import compose, quiet_trainer_overrides

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")

    def go(*extra):
        run(compose(["method=lora", "model=hf_causal", f"model.path={model}", "data=jsonl",
                     f"data.train={data['train']}", "data.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}",
                     "optim.warmup_ratio=0", "optim.min_lr_ratio=1.0", "trainer.max_epochs=-1",
                     f"output_dir={tmp_path / 'run'}", *quiet_trainer_overrides(), *extra]))

    go("trainer.max_steps=2")
    go("trainer.max_steps=4", "resume=auto", "optim.lr=0.25", "optim.weight_decay=0.1")
    with open(tmp_path / "run" / "logs" / "metrics.csv") as fh:
        lrs = [float(r["lr-AdamW"]) for r in csv.DictReader(fh) if r.get("lr-AdamW")]
    assert lrs == [1e-3, 1e-3, 0.25, 0.25]
    groups = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]
    assert [(g["lr"], g["weight_decay"]) for g in groups["param_groups"]] == [(0.25, 0.1)]


def test_a_resume_with_another_global_batch_is_one_data_error(tmp_path):
    """The checkpoint's data position counts batches: resumed with another data.batch_size it skipped the wrong
    number of examples of the epoch's order (half of them at half the batch), without a word."""
    from mol.train.app import run
    from mol.train.data import DataError
    from test_train_utils import compose, quiet_trainer_overrides

    model, data = make_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")

    def go(*extra):
        return run(compose(["method=lora", "model=hf_causal", f"model.path={model}", "data=jsonl",
                            f"data.train={data['train']}", f"data.cache_dir={tmp_path / 'cache'}",
                            "trainer.max_epochs=-1", f"output_dir={tmp_path / 'run'}", *quiet_trainer_overrides(),
                            *extra]))

    go("data.batch_size=8", "trainer.max_steps=2")
    with pytest.raises(DataError, match="global batches of 8 examples and this run's are 4 .* resume with "
                                        "data.batch_size=8"):
        go("data.batch_size=4", "trainer.max_steps=4", "resume=auto")
    assert go("data.batch_size=8", "trainer.max_steps=4", "resume=auto")["run"]["steps"] == 4


def _cls_cfg(tmp_path, out, *extra):
    from test_train_utils import compose, make_classification_data, make_tiny_bert

    model = tmp_path / "bert"
    if not model.exists():
        make_tiny_bert(model)
        make_classification_data(tmp_path / "cls", n_train=32, n_val=8)
    return compose(["model=hf_classifier", f"model.path={model}", "data=jsonl",
                    f"data.train={tmp_path / 'cls/train.jsonl'}",
                    f"data.val={tmp_path / 'cls/val.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}",
                    "data.batch_size=8", "trainer.max_epochs=-1", "trainer.max_steps=2",
                    "trainer.ckpt_every_n_steps=1",
                    "trainer.enable_progress_bar=false", "baseline.max_epochs=1", f"output_dir={out}", *extra])


def test_a_fresh_run_into_a_used_output_dir_is_refused_or_replaces_it(tmp_path):
    """A second run into the first one's output_dir without resume used to report the first run's baseline as its
    own and append its losses to the first run's train_loss.jsonl. Now it is refused before anything trains (the
    first run's files untouched); with overwrite=true it replaces them and reports what a run into a new folder
    reports."""
    from mol.train.app import ConfigError, run
    from mol.train.callbacks import read_loss_history

    out = tmp_path / "run"
    run(_cls_cfg(tmp_path, out, "seed=0"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds a run .*resume=auto.*output_dir=.*overwrite=true"):
        run(_cls_cfg(tmp_path, out, "seed=1", "baseline.lr=1e-1"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    second = run(_cls_cfg(tmp_path, out, "seed=1", "baseline.lr=1e-1", "overwrite=true"))
    reference = run(_cls_cfg(tmp_path, tmp_path / "ref", "seed=1", "baseline.lr=1e-1"))
    for part in ("baseline", "run"):
        assert second[part]["val/loss"] == reference[part]["val/loss"], part
    assert json.loads((out / "baseline" / "results.json").read_text())["val/loss"] == reference["baseline"]["val/loss"]
    losses = read_loss_history(str(out / "train_loss.jsonl"))
    assert len((out / "train_loss.jsonl").read_text().splitlines()) == 2
    assert losses == read_loss_history(str(tmp_path / "ref" / "train_loss.jsonl"))


def test_a_checkpoint_that_does_not_fit_is_refused_before_the_baseline(tmp_path):
    """resume= a checkpoint of another method (mol -> lora) or shape (8 -> 4 experts) used to train the baseline
    first and then die in a ~70-line size-mismatch traceback; a truncated one in PytorchStreamReader's traceback.
    Now each is one ConfigError, naming the first differing tensor and both shapes, before the baseline trains."""
    from mol.train.app import ConfigError, run

    run(_cls_cfg(tmp_path, tmp_path / "mol", "baseline.enabled=false"))
    ckpt = tmp_path / "mol" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    cases = [("method=lora", ckpt, r"another method or model config \(.*\[.*\].*\); resume with the original"),
             ("method.num_experts=4", ckpt, r"\(model\.\S+ is \[8, .*\] in the checkpoint and \[4, .*\] in this run\)"),
             ("seed=0", truncated, r"cannot read .*truncated\.ckpt .*truncated or not a checkpoint")]
    for i, (override, path, match) in enumerate(cases):
        out = tmp_path / f"late{i}"
        with pytest.raises(ConfigError, match=match) as e:
            run(_cls_cfg(tmp_path, out, override, f"resume={path}"))
        assert "\n" not in str(e.value) and "new output_dir=" in str(e.value)
        assert not (out / "baseline").exists()


def test_empty_folders_of_a_run_stopped_before_training_do_not_block_the_next(tmp_path):
    """A run stopped by Lightning's own check of the settings (val_check_interval longer than an epoch) has made
    logs/ and nothing in it; the corrected command into the same output_dir was refused as "already holds a run"."""
    from mol.train.app import ConfigError, claim_output_dir
    from test_train_utils import compose

    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "heatmaps").mkdir()
    cfg = compose([f"output_dir={out}"])
    claim_output_dir(cfg, out)  # nothing there is a run's
    (out / "logs" / "metrics.csv").write_text("step\n")
    with pytest.raises(ConfigError, match=r"already holds a run \(logs\)"):
        claim_output_dir(cfg, out)


@pytest.mark.parametrize("content", [b"", b'{"a": 1}', b"\x00" * 64])
def test_a_resume_file_that_is_no_torch_archive_says_so_without_torch_s_mmap_advice(tmp_path, content):
    """torch.load(mmap=True) of a zero-byte or non-zip file says "mmap can only be used with files saved with
    torch.save(..., _use_new_zipfile_serialization=True), please torch.save your checkpoint with this option": advice
    to re-save, quoted as the reason, for a file that is no checkpoint at all."""
    from mol.train.app import ConfigError, read_checkpoint_shapes

    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"cannot read .*last\.ckpt \((empty file|not a torch\.save zip archive)\); "
                                          r"it is truncated or not a checkpoint") as e:
        read_checkpoint_shapes(str(path))
    assert "mmap" not in str(e.value)


def test_a_checkpoint_with_damaged_bytes_is_refused_not_loaded(tmp_path):
    """torch.load checks no checksum: a last.ckpt with flipped bytes inside a tensor (a bad disk, a copy gone wrong)
    resumed with those bytes as adapter weights and Adam moments, without a word. The zip's CRCs catch it."""
    from mol.train.app import ConfigError, read_checkpoint_shapes

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.w": torch.arange(4096, dtype=torch.float32)}}, path)
    assert read_checkpoint_shapes(str(path)) == {"model.w": (4096,)}
    data = bytearray(path.read_bytes())
    at = data.find(torch.arange(4096, dtype=torch.float32)[1000:1004].numpy().tobytes())
    assert at > 0
    data[at:at + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"resume: .*last\.ckpt is damaged \(its entry \S+/data/0 fails its "
                                          r"checksum\): pass another \.ckpt"):
        read_checkpoint_shapes(str(path))
