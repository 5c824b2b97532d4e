"""mol.train's FSDP pieces (``trainer=fsdp``): its strategy, Lightning's with checkpoints that gather only what they
keep, the gathers of FSDP's shards that saving needs, and NF4 codes held so that FSDP shards them (FSDP-QLoRA).

A mol.train checkpoint holds the trainable tensors alone (MoLModule.on_save_checkpoint). Lightning's FSDP strategy
builds its full state dict first, gathering every weight of the model, frozen base included, into rank 0's CPU
memory at every checkpoint; this one gathers one FSDP unit at a time, on the device, and copies out only the unit's
trainable tensors.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from mol.inject import name_matches, tied_parameter_names, unwrapped_name


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


def flat_dtype(model: nn.Module) -> torch.dtype:
    """The dtype FSDP's flat parameters hold for ``model``: its floating parameters' most common one (by count),
    which every parameter of a unit must share. NF4 codes held as parameters (store_codes_as) do not count: they
    are bytes that take any dtype, and ``.to()`` leaves them in their old one."""
    from mol.quant.linear import code_parameter_ids

    # a large model's codes outnumber its other weights: counted, they kept a cast model's codes in the old dtype
    codes = code_parameter_ids(model)
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in codes:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def routers_to(model: nn.Module, dtype: torch.dtype) -> int:
    """Every MoL router's weight cast to ``dtype`` (they are float32 whatever the model's dtype, which FSDP cannot
    flatten beside a 16-bit unit; they still score in float32); returns how many were cast."""
    from mol.routers import Router

    routers = [m for m in model.modules() if isinstance(m, Router) and m.weight.dtype != dtype]
    for router in routers:
        router.to(dtype)
    return len(routers)


def nf4_codes_as_parameters(model: nn.Module) -> Optional[torch.dtype]:
    """Before wrapping: every NF4 weight's 4-bit codes made a frozen parameter of the model's floating dtype (the
    same bytes), so that FSDP shards them with the unit's other weights (it shards no buffers, and flattens only
    floating tensors of one dtype per unit), as bitsandbytes' ``quant_storage`` does for FSDP-QLoRA. Returns that
    dtype, or None if the model holds no NF4 weight. The few whose code bytes do not fill whole elements of it stay
    buffers, which every process holds whole; a warning names them. Raises on a model FSDP wrapped already."""
    from mol.quant.linear import NF4Tensor

    wrapped = any(getattr(p, "_fsdp_flattened", False) for p in model.parameters())
    if not wrapped and torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    if wrapped:
        # FSDP shards only the parameters it found when wrapping: codes made parameters now would stay whole on
        # every process, while this returned a dtype as if they were sharded
        raise ValueError("nf4_codes_as_parameters: the model is wrapped in FullyShardedDataParallel already, which "
                         "shards only the parameters it found when wrapping; call it on the model before wrapping")
    tensors = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Tensor)]
    if not tensors:
        return None
    dtype = flat_dtype(model)
    whole = [n for n, m in tensors if not m.store_codes_as(dtype)]
    if whole:
        more = " ..." if len(whole) > 3 else ""
        warnings.warn(f"{len(whole)} NF4 weights ({whole[:3]}{more}) have a code byte count that is not a multiple "
                      f"of {dtype.itemsize} ({dtype}): FSDP cannot shard their codes, and every process holds them "
                      "whole", stacklevel=2)
    return dtype


def adapter_units(model: nn.Module) -> set[int]:
    """The ids of the modules that become FSDP units of their own so that no unit flattens frozen and trainable
    tensors together: each adapter layer (MoL/LoRA, IA3) with a frozen base, and that base, each bottleneck
    adapter, prefix / prompt tuning's virtual tokens (their hooks call them as modules, through the unit), and each
    module of modules_to_save. FSDP (use_orig_params) keeps a gradient for the whole of a flat
    parameter that holds any trainable tensor, and reduce-scatters all of it every step: with the frozen base beside
    its adapters, as many gradient elements and as much traffic as fine-tuning the whole unit. (PEFT's
    fsdp_auto_wrap_policy separates its LoRA linears likewise.) An adapted base that trains a tensor itself
    (BitFit's biases) and LoRA on fused MoE experts, whose kernels read the experts' tensors directly, stay in their
    decoder layer's unit; a tied modules_to_save module in the root's."""
    from mol.layers import MoLLinear
    from mol.methods.adapters import BottleneckAdapter
    from mol.methods.ia3 import IA3Linear
    from mol.methods.prefix import _VirtualTokens

    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, (BottleneckAdapter, _VirtualTokens)):
            ids.add(id(m))
        elif isinstance(m, (MoLLinear, IA3Linear)) and not any(p.requires_grad for p in m.base_layer.parameters()):
            # the layer calls its base as a module once FSDP wraps it (dispatch's fused paths read a bare
            # nn.Linear's or NF4Linear's weight themselves, which a unit of its own holds only inside its forward)
            ids.update((id(m), id(m.base_layer)))
    # modules_to_save (a classifier's head) beside the root's frozen embeddings; not one whose tensors another
    # module shares (a head tied to the embeddings: FSDP keeps a shared tensor in one unit)
    saved = [entry for c in getattr(model, "mol_configs", []) for entry in getattr(c, "modules_to_save", [])]
    if not saved:
        return ids
    tied = list(tied_parameter_names(model).values())
    for name, m in model.named_modules():
        if not name or not name_matches(name, saved):
            continue
        inside = [[n.startswith(name + ".") for n in names] for names in tied]  # each tied tensor's names
        own = list(m.parameters())
        if own and all(p.requires_grad for p in own) and not any(any(i) and not all(i) for i in inside):
            ids.add(id(m))
    return ids


def prompt_embedding_holders(model: nn.Module) -> set[int]:
    """The ids of the modules that hold the input embeddings prompt tuning reads, which must not be FSDP units: its
    pre-hook embeds the tokens with them in the model's own forward, outside any such unit's, where their weights
    are this process's flat shard (BERT's _no_split_modules names BertEmbeddings). In the root unit they are whole
    for the model's whole forward, as with models whose decoder layers alone are units."""
    from mol.methods.prefix import PromptEmbedding

    embeddings = []
    for m in model.modules():
        if isinstance(getattr(m, "mol_prompt", None), PromptEmbedding):
            owners = [m, m.get_encoder()] if hasattr(m, "get_encoder") else [m]  # the encoder's, encoder-decoder
            embeddings += [o.get_input_embeddings() for o in owners if hasattr(o, "get_input_embeddings")]
    return {id(m) for m in model.modules() if any(any(e is s for s in m.modules()) for e in embeddings)}


def unit_rule(model: nn.Module, classes: Iterable[type] = ()) -> Callable[[nn.Module], bool]:
    """Which modules of ``model`` FSDP makes units, as ``trainer=fsdp`` wraps it: each module of ``classes`` (the
    model's decoder layers, e.g. ``{LlamaDecoderLayer}``) but those holding the input embeddings prompt tuning reads
    (``prompt_embedding_holders``), and inside them ``adapter_units``. For a model wrapped by hand, or by Accelerate
    (its FSDP plugin's ``auto_wrap_policy``): ``CustomPolicy(unit_rule(model, {DecoderLayer}))`` from
    torch.distributed.fsdp.wrap. Call it on the model about to be wrapped (it keeps module ids)."""
    separate, whole, classes = adapter_units(model), prompt_embedding_holders(model), tuple(classes)
    return lambda m: (id(m) in separate or isinstance(m, classes)) and id(m) not in whole


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
    unit (see the module's docstring), and the optimizer state by parameter names. Sharded checkpoints
    (``state_dict_type="sharded"``) are Lightning's."""

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        return gather_trainable(self.model, to_rank0=True)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's full state keyed by parameter names, as FSDP gives it (Lightning's load takes either).
        Lightning renumbers it by parameter ids: for a single-process (NO_SHARD) QLoRA run it numbered the param
        groups' entries apart from the state's, and the resume then looked up a frozen weight's name and failed."""
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from lightning.pytorch.strategies.fsdp import _get_full_state_dict_context
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with _get_full_state_dict_context(self.model, world_size=self.world_size):
            return FSDP.optim_state_dict(self.model, optimizer)
