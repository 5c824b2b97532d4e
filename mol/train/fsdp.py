"""mol.train's FSDP pieces (``trainer=fsdp``): its strategy, Lightning's with checkpoints that gather only what they
keep, and the gathers of FSDP's shards that saving needs.

A mol.train checkpoint holds the trainable tensors alone (MoLModule.on_save_checkpoint). Lightning's FSDP strategy
builds its full state dict first, gathering every weight of the model, frozen base included, into rank 0's CPU
memory at every checkpoint; this one gathers one FSDP unit at a time, on the device, and copies out only the unit's
trainable tensors.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from mol.inject import unwrapped_name


def fsdp_root(module: Optional[pl.LightningModule]) -> Optional[nn.Module]:
    """The FullyShardedDataParallel unit ``configure_model`` made of the module's model, else None."""
    model = getattr(module, "model", None)
    if model is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model if isinstance(model, FullyShardedDataParallel) else None


def whole_parameters(root: Any) -> Any:
    """A context in which the parameters of the FSDP unit ``root`` and of every unit inside it are whole on rank 0
    (gathered into its CPU memory on GPUs)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    # on GPUs rank 0 gathers each unit's weights into CPU memory, as Lightning's full-state-dict checkpoints do;
    # unsharded (NO_SHARD, which FSDP also picks for a single process) they are whole already, and FSDP refuses
    # to offload them
    offload = root.compute_device.type == "cuda" and root.sharding_strategy != ShardingStrategy.NO_SHARD
    return FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=True, offload_to_cpu=offload)


def gather_trainable(root: nn.Module, to_rank0: bool) -> dict[str, torch.Tensor]:
    """Every trainable parameter of the FSDP units inside ``root``, whole, on the CPU, by its name before wrapping
    (on rank 0 where ``to_rank0``; empty elsewhere). Every process must call it: each unit's gather is collective."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = {p: unwrapped_name(n) for n, p in root.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    for unit in FSDP.fsdp_modules(root):  # the same units in the same order on every process
        nested = {p for sub in FSDP.fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
        own = [p for p in unit.parameters() if p in names and p not in nested]
        if not own:
            continue
        # use_orig_params: inside, the unit's own parameters are views of its gathered flat parameter
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=to_rank0):
            if not to_rank0 or torch.distributed.get_rank() == 0:
                out.update({names[p]: p.detach().to("cpu", copy=True) for p in own})
    return out


class FSDPStrategy(pl.strategies.FSDPStrategy):
    """Lightning's FSDPStrategy whose full-state-dict checkpoints hold the trainable tensors alone, gathered unit by
    unit (see the module's docstring). Sharded checkpoints (``state_dict_type="sharded"``) are Lightning's."""

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        return gather_trainable(self.model, to_rank0=True)
