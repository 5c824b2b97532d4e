"""Callbacks: routing heatmap + per-layer utilisation at each validation, a per-step loss log, the run's last.ckpt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import mol


def _short(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query`` (keeps plots readable)."""
    for marker in (".layer.", ".layers.", ".h.", ".blocks."):
        if marker in name:
            return name.split(marker, 1)[1]
    return name


def save_heatmap(load: torch.Tensor, layer_names: list[str], path: Path, title: str) -> None:
    """Write a layers x experts heatmap of load fractions to ``path`` (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    n_layers, n_exp = load.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * n_exp, 1.5 + 0.22 * n_layers), dpi=100)
    im = ax.imshow(load.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(load.max()), 1e-6))
    ax.set_xticks(range(n_exp))
    ax.set_xlabel("expert")
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels(layer_names, fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"load fraction (uniform = {1 / n_exp:.3f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


class RoutingHeatmap(pl.Callback):
    """Accumulates expert counts over each validation pass, logs per-layer load and entropy, draws a heatmap.

    Files: ``<out>/heatmaps/routing_step<N>.png`` and ``routing_latest.png``; one JSON line per validation in
    ``<out>/routing.jsonl`` (per layer: load per expert, router entropy; per task when the data has several).
    """

    def __init__(self, out_dir: str, log_per_expert: bool = True, append: bool = True):
        self.out_dir = Path(out_dir)
        self.log_per_expert = log_per_expert
        self.append = append  # False: a fresh run, whose routing.jsonl starts empty
        self._reset()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.append and trainer.is_global_zero:
            (self.out_dir / "routing.jsonl").unlink(missing_ok=True)

    def _reset(self) -> None:
        self.counts: dict[str, dict[str, torch.Tensor]] = {}  # task -> layer -> (E,)
        self.entropy: dict[str, torch.Tensor] = {}
        self.batches = 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        stats = mol.routing_stats(pl_module.model)
        if not stats:
            return
        tid = int(batch["task_ids"][0]) if "task_ids" in batch else -1  # eval batches are single-task
        names = trainer.datamodule.task_names if trainer.datamodule is not None else []
        task = names[tid] if 0 <= tid < len(names) else "all"
        per_task = self.counts.setdefault(task, {})
        for layer, s in stats.items():
            c = s["counts"].detach().float()
            per_task[layer] = per_task.get(layer, torch.zeros_like(c)) + c
            self.entropy[layer] = self.entropy.get(layer, torch.zeros((), device=c.device)) + s["entropy"].detach().float()
        self.batches += 1

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.counts:
            return
        tasks = sorted(self.counts)
        layers = list(next(iter(self.counts.values())))
        # (tasks, layers, E) counts and (layers,) entropy sums, summed over all processes
        counts = torch.stack([torch.stack([self.counts[t].get(l, torch.zeros_like(self.counts[tasks[0]][l]))
                                           for l in layers]) for t in tasks])
        ent = torch.stack([self.entropy[l] for l in layers])
        nb = torch.tensor(float(self.batches), device=ent.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        ent = trainer.strategy.reduce(ent, reduce_op="sum")
        nb = trainer.strategy.reduce(nb, reduce_op="sum")
        total = counts.sum(0)
        load = (total / total.sum(-1, keepdim=True).clamp_min(1)).cpu()
        entropy = (ent / nb.clamp_min(1)).cpu()
        short = [_short(l) for l in layers]
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        # Straight to the loggers: values are already summed over processes, and hundreds of self.log keys
        # would each ask for a cross-process sync.
        util = {f"util/{name}/entropy": float(entropy[i]) for i, name in enumerate(short)}
        if self.log_per_expert:
            util.update({f"util/{name}/load_e{e}": float(load[i, e]) for i, name in enumerate(short)
                         for e in range(load.shape[1])})
        for lg in trainer.loggers:
            lg.log_metrics(util, step=step)
        png = self.out_dir / "heatmaps" / f"routing_step{step:06d}.png"
        save_heatmap(load, short, png, f"expert load per layer, validation at step {step}")
        save_heatmap(load, short, self.out_dir / "heatmaps" / "routing_latest.png",
                     f"expert load per layer, validation at step {step}")
        record = {"step": step, "layers": short, "load": load.tolist(), "entropy": entropy.tolist()}
        if len(tasks) > 1:
            ct = counts.cpu()
            record["per_task_load"] = {t: (ct[j] / ct[j].sum(-1, keepdim=True).clamp_min(1)).tolist()
                                       for j, t in enumerate(tasks)}
        with open(self.out_dir / "routing.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class LossHistory(pl.Callback):
    """Appends ``{"step", "loss"}`` to ``<out>/train_loss.jsonl`` after every optimiser step (rank 0): the loss
    optimised, the task's plus the router losses, averaged over the step's accumulated batches. Under DDP each
    batch's loss is that of the global batch: the processes' losses weighted by what each averages over
    (``MoLModule.loss_weight``: examples, or a causal LM's predicted tokens).

    Flushed line by line, so a run killed with SIGKILL still leaves every step it finished.
    """

    def __init__(self, path: str, append: bool = True):
        self.path = Path(path)
        self.append = append  # False: a fresh run, whose file starts empty
        self._acc: list[tuple[float, float]] = []  # (loss, weight) of each batch of the step
        self._step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._acc, self._step = [], trainer.global_step
        if not self.append and trainer.is_global_zero:
            self.path.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Lightning hands back the loss it backpropagated, divided by accumulate_grad_batches
        weight = getattr(pl_module, "loss_weight", None)
        self._acc.append((float(loss.detach()) * trainer.accumulate_grad_batches,
                          1.0 if weight is None else float(weight)))
        # an optimizer step closed this batch's window (global_step advanced): a full window, or the shorter one
        # Lightning closes at an epoch's end
        if trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        if trainer.world_size > 1:  # every process reaches this step together: one small all-reduce per step
            sums = torch.tensor([[l * w, w] for l, w in self._acc], dtype=torch.float64, device=pl_module.device)
            sums = trainer.strategy.reduce(sums, reduce_op="sum").cpu()
            losses = (sums[:, 0] / sums[:, 1].clamp_min(1e-12)).tolist()
        else:
            losses = [l for l, _ in self._acc]
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": trainer.global_step, "loss": sum(losses) / len(losses)}) + "\n")
                fh.flush()
        self._acc = []


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps, at each epoch end and validation, and at the step
    where ``trainer.max_steps`` stops the run.

    Lightning's ModelCheckpoint with ``save_top_k=0`` saves ``last`` at epoch ends and validations only where a
    top-k file was saved at the same step, so without a step interval a run had no checkpoint until it ended. Its
    fallback at the end of training records the epoch as finished: a run stopped mid-epoch by ``max_steps`` and
    resumed with a larger one skipped the rest of that epoch. Here that step is saved at its batch's end, as a
    mid-epoch checkpoint, and the epoch end that follows it saves nothing."""

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not 0 < trainer.max_steps <= trainer.global_step:  # (a validation ending the epoch may have saved it)
            self._save_last_now(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)


def read_loss_history(path: str) -> dict[int, float]:
    """Step -> loss from a ``train_loss.jsonl``; a later line for the same step (a resumed run) wins."""
    out: dict[int, float] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                out[int(r["step"])] = float(r["loss"])
    return out


def appending_csv_logger(**kwargs: Any) -> Any:
    """Lightning's ``CSVLogger`` that appends to an existing ``metrics.csv`` (a resumed run's earlier rows) where
    Lightning's deletes it when its writer starts (only a warning says so)."""
    import csv

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class KeptRowsWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning's removes the file; this reads its header instead
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                    self.metrics_keys = next(csv.reader(fh), [])  # save() appends, or rewrites on new columns

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = KeptRowsWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(**kwargs)
