"""NF4Experts: the fused experts of a mixture-of-experts layer with their 3-D expert tensors stored in NF4 (QLoRA).

A MoE model's experts hold nearly all its weights (Qwen3-30B-A3B: 29 of 30 billion), so a 4-bit base that left them
in 16 bits would save little. ``mol.quantize(model, "nf4")`` (and so ``quantize_base="nf4"``) replaces each experts
module of transformers 5 (Mixtral, Qwen3-MoE, GPT-OSS, ...) by an NF4Experts: every 3-D expert tensor quantized
whole (blocks of 64 along the flattened tensor, double-quantized scales, as NF4Linear's weight), the module's other
parts (biases, activation, gate) kept as they were. Its forward is transformers' grouped one (mol.experts); each
projection dequantizes its tensor into a scratch copy for torch's grouped GEMM and frees it, and the backward
dequantizes again for dx, so no full-precision expert tensor is kept between forward and backward. LoRA on the
quantized experts is mol.experts.ExpertsLoRA around this module: QLoRA for MoE models.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from mol.experts import (base_projection, bind_inputs, expert_tensors, experts_problem, grouped_experts, grouped_mm,
                         projection_dtype, routing_inputs)

from .linear import NF4Tensor
from .nf4 import NF4Weight, check_finite, dequantize_nf4, quantize_nf4, SUPPORTED_DTYPES


def _selected(packed: NF4Weight, expert_ids: torch.Tensor) -> Optional[NF4Weight]:
    """The NF4 slices of the experts ``expert_ids`` names (one per pair, repeats allowed) as one NF4Weight of shape
    (pairs, d1, d2): the codes, scales and second-level scales of each slice, gathered. None where a slice does not
    hold whole blocks of both levels (its values a multiple of blocksize * nested_blocksize: 16384 by default, which
    every real expert tensor is), so that its scales are its own."""
    experts, d1, d2 = packed.shape
    per = d1 * d2
    if per % (packed.blocksize * (packed.nested_blocksize if packed.nested else 2)):
        return None
    nested = packed.nested_absmax.view(experts, -1)[expert_ids].reshape(-1) if packed.nested else None
    return NF4Weight(packed.codes.view(experts, -1)[expert_ids].reshape(-1),
                     packed.absmax.view(experts, -1)[expert_ids].reshape(-1), packed.code,
                     (expert_ids.numel(), d1, d2), packed.dtype, packed.blocksize, nested, packed.nested_code,
                     packed.offset, packed.nested_blocksize)


def _grouped(x: torch.Tensor, packed: NF4Weight, offsets: torch.Tensor, expert_ids: torch.Tensor, transposed: bool,
             backend: str, grad: bool = False) -> torch.Tensor:
    """x (pairs, in) times each pair's expert slice of the NF4 tensor, through a scratch dense copy; ``grad``: the
    product with the transposed slices (the backward's dx)."""
    if 0 < x.shape[0] < packed.shape[0]:
        # fewer pairs than experts (a decode step: T * k rows): dequantize the pairs' own slices, not every expert's
        # (at T=1 on Qwen3-30B-A3B, 8 of 128), and multiply pair by pair
        selected = _selected(packed, expert_ids)
        if selected is not None:
            w = dequantize_nf4(selected, x.dtype, backend=backend)                 # (pairs, d1, d2)
            weight = w if transposed else w.transpose(-2, -1)                       # (pairs, in, out)
            return torch.bmm(x.unsqueeze(1), weight.transpose(-2, -1) if grad else weight).squeeze(1)
    w = dequantize_nf4(packed, x.dtype, backend=backend)                           # (experts, d1, d2), freed on return
    weight = w if transposed else w.transpose(-2, -1)                               # (experts, in, out)
    return grouped_mm(x, weight.transpose(-2, -1) if grad else weight, offsets)


class _NF4GroupedFn(torch.autograd.Function):
    """Grouped x W_e with W stored in NF4. Saves no dense weight: the backward dequantizes it again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: NF4Weight, offsets: torch.Tensor, expert_ids: torch.Tensor,
                transposed: bool, backend: str):
        ctx.packed, ctx.transposed, ctx.backend = packed, transposed, backend
        ctx.save_for_backward(offsets, expert_ids)
        return _grouped(x, packed, offsets, expert_ids, transposed, backend)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        offsets, expert_ids = ctx.saved_tensors
        grad_x = _grouped(grad_out.contiguous(), ctx.packed, offsets, expert_ids, ctx.transposed, ctx.backend,
                          grad=True)
        return grad_x, None, None, None, None, None


class NF4Experts(nn.Module):
    """A frozen experts module (transformers 5's fused MoE experts) with its 3-D expert tensors in NF4; called as
    the module it replaces. ``experts``: that module (quantized in place: its expert tensors leave it, the rest
    stays and is read by the forward: flags, biases, activation, ``_apply_gate``). Attributes the model code reads
    on its experts module (``num_experts``, ``has_gate``, ``config``, ...) are answered by the wrapped one."""

    def __init__(self, experts: nn.Module, blocksize: int = 64, nested_blocksize: int = 256, backend: str = "auto"):
        super().__init__()
        tensors = self.check(experts)
        self.backend = backend
        self.routing_signature, self._inputs = routing_inputs(experts)
        self.nf4 = nn.ModuleDict({name: NF4Tensor(quantize_nf4(getattr(experts, name).detach(), blocksize,
                                                                nested_blocksize), backend) for name in tensors})
        for name in tensors:  # the 16-bit copies go: keeping them is what QLoRA saves
            del experts._parameters[name]
        self.experts = experts.requires_grad_(False)

    @staticmethod
    def check(experts: nn.Module) -> dict:
        """Raise, naming the problem, unless ``experts`` can be quantized (checked before anything changes); return
        its expert tensors (mol.experts.expert_tensors)."""
        problem = experts_problem(experts)
        if problem:
            raise ValueError(f"NF4Experts cannot quantize this module: {problem}")
        tensors = expert_tensors(experts)
        if not tensors:
            raise ValueError(f"NF4Experts: {type(experts).__name__} holds no 3-D expert tensor to quantize")
        for name in tensors:
            w = getattr(experts, name)
            if w.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"NF4Experts: {type(experts).__name__}.{name} is {w.dtype}; NF4 quantizes float16, "
                                "bfloat16 or float32 tensors")
            check_finite(w.detach())
        return tensors

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("experts", "nf4") or "experts" not in self._modules:
                raise
        return getattr(self._modules["experts"], name)

    def quantized_expert_tensors(self) -> dict[str, tuple[torch.Size, torch.dtype, torch.device]]:
        """name -> (shape, dtype computed in, device) of every expert tensor held in NF4, as mol.experts'
        expert_tensors reports a module's dense ones."""
        return {n: (torch.Size(t.weight_shape), t.weight_dtype, t.quant_map.device) for n, t in self.nf4.items()}

    def project_quantized(self, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor
                          ) -> torch.Tensor:
        """Each pair's row of ``x`` (pairs, in) times its expert's slice of expert tensor ``name`` (no bias); the
        pairs sorted by expert, ``offsets`` where each expert's rows end, ``expert_ids`` each row's expert."""
        tensor = self.nf4[name]
        x = x.to(projection_dtype(x, tensor.weight_dtype))  # dequantized into it
        transposed = self.experts.is_transposed
        if torch.is_grad_enabled() and x.requires_grad:
            return _NF4GroupedFn.apply(x, tensor.packed, offsets, expert_ids, transposed, self.backend)
        return _grouped(x, tensor.packed, offsets, expert_ids, transposed, self.backend)

    def dequantize(self) -> nn.Module:
        """The wrapped experts module with its expert tensors dequantized back (frozen parameters, in the dtype and
        order they had), detached from this one: e.g. for mol.unload of a QLoRA model whose experts must compute
        without mol."""
        experts = self.experts
        for name, tensor in self.nf4.items():
            experts.register_parameter(name, nn.Parameter(tensor.dequantize(), requires_grad=False))
        return experts

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x, top_k_index, top_k_weights = bind_inputs(self.routing_signature, self._inputs, args, kwargs)
        return grouped_experts(self, x, top_k_index, top_k_weights,
                               lambda name, xp, offsets, ids: base_projection(self, name, xp, offsets, ids))

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n} {tuple(t.weight_shape)}" for n, t in self.nf4.items())
        return f"{shapes}: nf4 blocksize={next(iter(self.nf4.values())).blocksize}"
