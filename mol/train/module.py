"""LightningModule around a Hugging Face model carrying mol adapters.

Loss = task loss (cross-entropy from the HF head) + ``mol.aux_loss(model)``. Only tensors with
``requires_grad`` are optimised and checkpointed, so a checkpoint is the adapter plus optimiser,
scheduler, RNG and data position: megabytes, not the base model.
"""

from __future__ import annotations

import dataclasses
import math
import random
import resource
import time
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

import mol
from mol.inject import unwrapped_name
from mol.quant.linear import NF4Tensor
from mol.train.fsdp import flat_dtype, fsdp_root, nf4_codes_as_parameters, routers_to, unit_rule

RNG_KEY = "mol_rng_state"


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident set size of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fused_adamw(setting: bool | str, on_cuda: bool, grad_scaler: bool, clipping: bool, sharded: bool) -> bool:
    """Whether ``configure_optimizers`` builds ``AdamW(fused=True)`` (``optim.fused``: auto, true or false).

    auto: on CUDA, without a GradScaler (precision=16-mixed) and without a sharding strategy. There one kernel
    updates every tensor: a MoL step's foreach AdamW took 9.8 ms of an H100's GPU time over 41.5 M float32
    adapter parameters (RESULTS run 37's profile). A fused step unscales fp16 gradients inside ``step()``, after
    the clipping that would need them unscaled, and ``configure_gradient_clipping`` clips a flat parameter list,
    which a sharded strategy does not hold; so true is refused there when gradients are clipped.
    """
    if setting == "auto":
        return on_cuda and not grad_scaler and not sharded
    if setting is True and clipping and (grad_scaler or sharded):
        why = "precision=16-mixed's GradScaler" if grad_scaler else "a sharded strategy (FSDP, DeepSpeed)"
        raise ValueError(f"optim.fused=true with trainer.gradient_clip_val set under {why}: a fused AdamW cannot "
                         "clip there; use optim.fused=auto (or false), or trainer.gradient_clip_val=null")
    return setting is True


class MoLModule(pl.LightningModule):
    """Fine-tune ``model`` (a HF ``...ForCausalLM`` or ``...ForSequenceClassification``) through its trainable tensors.

    task: ``classification`` (metric: accuracy) or ``causal_lm`` (metrics: token accuracy, perplexity).
    """

    def __init__(self, model: nn.Module, task: str, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.06, min_lr_ratio: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 log_routing_every: int = 1, fused: bool | str = "auto"):
        super().__init__()
        if fused not in ("auto", True, False):
            raise ValueError(f"optim.fused={fused!r} is unknown; use auto, true or false")
        if task not in ("classification", "causal_lm"):
            raise ValueError(f"task={task!r} is unknown; use classification or causal_lm")
        self.model, self.task = model, task
        # from_pretrained returns eval mode; Lightning keeps submodule modes, so dropout would stay off.
        self.model.train()
        self.lr, self.weight_decay, self.warmup_ratio, self.min_lr_ratio = lr, weight_decay, warmup_ratio, min_lr_ratio
        self.validated_at: Optional[int] = None  # global_step of the last validation (results report the final model)
        self.betas = tuple(betas)
        self.log_routing_every = log_routing_every
        self.fused = fused
        # Checkpoints carry only trainable tensors; the frozen base comes from model.path on resume.
        self.strict_loading = False
        self._pending_rng: Optional[dict] = None
        self.loss_weight: Optional[torch.Tensor] = None  # the last training batch's, see training_step
        self._t_last: Optional[float] = None
        self._eval_sums: dict[str, torch.Tensor] = {}
        self.fsdp_units: Optional[set[type]] = None  # under FSDP: the module classes that each become a unit

    def configure_model(self) -> None:
        """Under an FSDP strategy: the model made one FSDP unit, each module of a class in ``fsdp_units`` a unit
        inside it (the strategy's settings come through Lightning's wrapping context), once for the whole run.
        Lightning's own auto-wrapping is redone at each stage: trainer.validate / test after fit found the layers
        already wrapped, left the root unwrapped, and computed with its tensors still views of the fit's shards
        (Lightning issue #19015)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(self.trainer.strategy, FSDPStrategy) or fsdp_root(self) is not None:
            return
        from torch.distributed.fsdp.wrap import CustomPolicy, wrap

        for p in self.model.parameters():
            # FSDP keeps a tensor stored in another order than its shape's (MoLLinear's lora_B is (E, out, r) in
            # (out, E, r) memory order) in that memory order, but writes and reads its optimizer state in the shape's
            # order: a resumed run's Adam moments landed on the wrong elements. Contiguous tensors have one order.
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        overrides = {}
        if any(isinstance(m, NF4Tensor) for m in self.model.modules()):
            # Lightning casts the wrapped model to a "-true" precision's dtype, flat parameters whole: the NF4 codes'
            # bytes must already be stored in that dtype, so its cast runs here first and is a no-op after wrapping
            # (the codes themselves are never cast, see NF4Tensor._apply)
            self.model = self.trainer.strategy.precision_plugin.convert_module(self.model)
        dtype = flat_dtype(self.model)
        if routers_to(self.model, dtype) and self.global_rank == 0:
            print(f"mol: trainer=fsdp keeps one dtype per flattened module: the routers' weights take the model's "
                  f"{dtype} (they still score in float32)".replace("torch.", ""), flush=True)
        codes_dtype = nf4_codes_as_parameters(self.model)  # FSDP-QLoRA: the 4-bit codes sharded too
        mixed = self.trainer.strategy.mixed_precision_config
        if codes_dtype is not None and mixed is not None and mixed.param_dtype not in (None, codes_dtype):
            # FSDP casts a unit's flat parameter whole to param_dtype, which would turn the codes' bytes into other
            # bytes: gather in the model's dtype instead (autocast still computes in 16 bits)
            overrides["mixed_precision"] = dataclasses.replace(mixed, param_dtype=None)
            if self.global_rank == 0:
                print(f"mol: trainer=fsdp shards the NF4 codes as {codes_dtype} parameters, so FSDP gathers "
                      f"parameters in {codes_dtype}, not {mixed.param_dtype} (model.dtype={mixed.param_dtype} "
                      "gathers in 16 bits)".replace("torch.", ""), flush=True)
        # decoder-layer units and, inside them, each adapted layer and its frozen base apart
        policy = CustomPolicy(unit_rule(self.model, self.fsdp_units or ()))
        with warnings.catch_warnings():
            # "has both parameters with requires_grad=True and False": what adapter_units leaves mixed (prompt
            # tuning's tensors or a tied head in the root, BitFit's biases, LoRA on fused experts)
            warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True and False")
            self.model = wrap(self.model, auto_wrap_policy=policy, **overrides)

    # ------------------------------------------------------------------ forward / losses
    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def _metric_sums(self, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sums (not means) so that evaluation over uneven shards and batches reduces exactly."""
        logits, labels = out.logits.detach().float(), batch["labels"]
        if self.task == "classification":
            nll = nn.functional.cross_entropy(logits, labels, reduction="sum")
            correct = (logits.argmax(-1) == labels).sum().float()
            count = torch.tensor(float(labels.numel()), device=logits.device)
        else:
            logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
            mask = labels != -100
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
            correct = ((logits.argmax(-1) == labels) & mask).sum().float()
            count = mask.sum().float()
        return {"nll": nll, "correct": correct, "count": count}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        aux = mol.aux_loss(self.model)
        if getattr(self.model, "mol_aux_loss_in_output", False):  # the model's loss holds them already
            loss, task_loss = out.loss, out.loss.detach() - aux.detach()
        else:
            loss, task_loss = out.loss + aux, out.loss
        bs = batch["input_ids"].shape[0]
        # mean over the processes (DDP): each holds its own shard's loss, and rank 0 alone writes the logs
        self.log("train/loss", task_loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train/aux_loss", aux, batch_size=bs)
        sums = self._metric_sums(out, batch)
        # what this shard's loss averages over (examples; a causal LM's predicted tokens): LossHistory weighs the
        # processes' losses by it, so a DDP step logs the loss of its global batch, as one process would
        self.loss_weight = sums["count"]
        acc_name = "train/acc" if self.task == "classification" else "train/token_acc"
        self.log(acc_name, sums["correct"] / sums["count"].clamp_min(1), prog_bar=True, batch_size=bs)
        if self.task == "causal_lm":
            self.log("train/ppl", torch.exp(task_loss.detach().float()), batch_size=bs)
        self._log_throughput(batch)
        if self.log_routing_every and self.global_step % self.log_routing_every == 0:
            self._log_router_losses_and_use()
        return loss

    def _log_throughput(self, batch: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            # Host-side token count from the collator and wall time between steps: no device read-back.
            self.log("perf/tokens_per_s", batch["num_tokens"] * self.trainer.world_size / (now - self._t_last),
                     prog_bar=True, batch_size=1)
        self._t_last = now
        self.log("perf/peak_mem_mb", peak_memory_mb(self.device), batch_size=1)

    def _log_router_losses_and_use(self) -> None:
        stats = mol.routing_stats(self.model)
        if not stats:
            return
        ents = [s["entropy"] for s in stats.values() if "entropy" in s]
        loads = [s["load"] for s in stats.values() if "load" in s]
        if ents:
            self.log("route/entropy_mean", torch.stack([e.float() for e in ents]).mean(), batch_size=1)
        if loads:
            # max load x E: 1 at perfect balance; load counts (token, expert) pairs, so E / top_k when one expert
            # is in every token's choice (E only for top-1)
            imbalance = torch.stack([l.float().max() * l.numel() for l in loads]).mean()
            self.log("route/imbalance_mean", imbalance, batch_size=1)
        for key in ("load_balance_loss", "z_loss"):
            vals = [s[key] for s in stats.values() if key in s]
            if vals:
                self.log(f"train/{key}", torch.stack([v.float() for v in vals]).mean(), batch_size=1)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], prefix: str) -> None:
        out = self(batch)
        for k, v in self._metric_sums(out, batch).items():
            key = f"{prefix}/{k}"
            self._eval_sums[key] = self._eval_sums.get(key, 0) + v

    def _eval_end(self, prefix: str) -> dict[str, float]:
        keys = [f"{prefix}/nll", f"{prefix}/correct", f"{prefix}/count"]
        vals = torch.stack([torch.as_tensor(self._eval_sums.get(k, 0.0), device=self.device, dtype=torch.float32)
                            for k in keys])
        vals = self.trainer.strategy.reduce(vals, reduce_op="sum")  # every rank, every batch: exact totals
        nll, correct, count = vals.tolist()
        for k in keys:
            self._eval_sums.pop(k, None)
        count = max(count, 1.0)
        metrics = {f"{prefix}/loss": nll / count}
        if self.task == "classification":
            metrics[f"{prefix}/acc"] = correct / count
        else:
            metrics[f"{prefix}/token_acc"] = correct / count
            metrics[f"{prefix}/ppl"] = math.exp(min(nll / count, 50.0))
        for k, v in metrics.items():
            self.log(k, v, prog_bar=k.endswith(("acc", "ppl")), rank_zero_only=True)
        return metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")
        if not self.trainer.sanity_checking:
            self.validated_at = self.trainer.global_step

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable tensors; check method.target_modules / modules_to_save")
        # No weight decay on biases and norms (1-D tensors), the usual AdamW split.
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.fused_adamw(self.trainer, on_cuda=all(p.is_cuda for p in params))
        groups = [g for g in groups if g["params"]]
        self._group_decay = [g["weight_decay"] for g in groups]  # what on_train_start sets again after a resume
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=True if fused else None)
        # The schedule's length is read in on_train_start, not here: asking Lightning for estimated_stepping_batches
        # now would build the train loader before a checkpoint is restored, and a resumed run with a finite
        # max_epochs would then never get its loader's position back (it replayed epoch 0 from the start).
        self._total_steps = None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self._lr_factor(s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """warmup_cosine over the run's optimizer steps (1.0 until on_train_start knows how many)."""
        if self._total_steps is None:
            return 1.0
        return warmup_cosine(step, int(self.warmup_ratio * self._total_steps), self._total_steps, self.min_lr_ratio)

    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches  # the loaders exist by now, restored where resuming
        if not math.isfinite(total):
            raise ValueError("the learning-rate schedule needs a finite run: set trainer.max_steps, or a finite "
                             "trainer.max_epochs")
        self._total_steps = max(1, int(total))
        for config in self.trainer.lr_scheduler_configs:  # the rates of the step the run starts at, now known
            sched = config.scheduler
            # optim.lr and optim.weight_decay as this run sets them: a resumed run's optimizer and schedule come back
            # with the checkpoint's, so another value given on resume was ignored without a word
            sched.base_lrs = [self.lr] * len(sched.base_lrs)
            for group, decay in zip(sched.optimizer.param_groups, getattr(self, "_group_decay", ())):
                group["initial_lr"], group["weight_decay"] = self.lr, decay
            lrs = [base * self._lr_factor(sched.last_epoch) for base in sched.base_lrs]
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs

    def fused_adamw(self, trainer: pl.Trainer, on_cuda: bool) -> bool:
        """``fused_adamw`` for this module's ``optim.fused`` under ``trainer``'s precision, clipping and strategy."""
        return fused_adamw(self.fused, on_cuda=on_cuda,
                           grad_scaler=getattr(trainer.precision_plugin, "scaler", None) is not None,
                           clipping=bool(trainer.gradient_clip_val), sharded=not isinstance(
                               trainer.strategy, (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy)))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clip a fused AdamW's gradients here: Lightning's mixed-precision plugin refuses any optimizer that
        unscales inside ``step()``, even under bf16-mixed where no GradScaler exists (Lightning issue #21435).
        ``fused_adamw`` only picks the fused optimizer without a scaler, so these gradients are the true ones."""
        fsdp = fsdp_root(self)
        if gradient_clip_val and gradient_clip_algorithm != "value" and fsdp is not None:
            # Lightning clips FSDP's gradients by value only (its issue #19235): each rank holds a shard of every
            # gradient, and FSDP's own clip_grad_norm_ all-reduces the shards' norms so all ranks scale alike
            fsdp.clip_grad_norm_(gradient_clip_val)
            return None
        if not (gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False)):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.``-prefixed trainable tensors, the only weights a checkpoint stores."""
        # FSDP's auto-wrapping nests modules under wrappers; its full state dict, which the checkpoint holds, does not
        return {f"model.{unwrapped_name(n)}": p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(self.trainable_state_dict())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # every process's own state, indexed by global rank: under DDP each rank's stream has advanced differently
        # (its batches differ), so one rank's state restored everywhere leaves the uninterrupted run's dropout
        checkpoint[RNG_KEY] = _gather_objects(_rng_state(), self.trainer.world_size if self._trainer else 1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning's FSDP strategy loads the tensors itself and pops them first; mol.train checked the file's names
        # and shapes against this run before fit (check_checkpoint_fits)
        missing = sorted(set(self.trainable_state_dict()) - set(checkpoint.get("state_dict", self.trainable_state_dict())))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}); it was made "
                             "with another method/model config: resume with the same overrides as the original run")
        self._pending_rng = self._own_rng_state(checkpoint.get(RNG_KEY))

    def _own_rng_state(self, saved: Any) -> Optional[dict]:
        """This rank's RNG state from a checkpoint's (a list by global rank; a dict in older checkpoints)."""
        if saved is None:
            return None
        states = [saved] if isinstance(saved, dict) else list(saved)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)
        if len(states) == world:
            return states[rank]
        if rank == 0:
            warnings.warn(f"the checkpoint holds the RNG state of {len(states)} process(es) and this run has {world}: "
                          f"every process restores the first one's, so dropout and router noise do not follow the "
                          f"original run's; resume with trainer.devices={len(states)} to follow it exactly")
        return states[0]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore RNG right before the first resumed step: anything between load and here (sanity checks,
        # loader set-up) must not shift the random stream that dropout and router noise draw from.
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
