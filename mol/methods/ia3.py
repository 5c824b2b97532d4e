"""IA³ (Liu et al. 2022): learned vectors that rescale activations, as Hugging Face PEFT's ``IA3Config`` defines them.

For a target linear layer ``y = W x + b`` with a vector ``l`` (initialised to ones):

- attention-type targets (keys, values): ``y = (W x + b) * l``, ``l`` has ``out_features`` entries;
- feed-forward targets (the MLP's down projection): ``y = W (x * l) + b``, ``l`` has ``in_features`` entries.

Both fold exactly into ``W`` (and ``b``), so the adapter merges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from mol.config import (MethodConfig, TargetModules, check_adapter_dtype, check_modules_to_save, check_targets,
                        register_config)
from mol.inject import fused_experts, match_modules, name_matches, register_method, replace_module
from mol.layers import AdapterLayer, adapter_dtype_for, base_dtype_device, dense_weight_blocker
from mol.methods._util import is_conv1d, model_type

# PEFT's defaults per model type (target_modules, feedforward_modules), as in peft.utils.constants.
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **{t: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for t in ("llama", "mistral")},
    **{t: (["q_proj", "v_proj", "down_proj"], ["down_proj"]) for t in ("qwen2", "qwen3", "gemma", "gemma2")},
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    **{t: (["key", "value", "output.dense"], ["output.dense"]) for t in ("bert", "roberta")},
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    **{t: (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]) for t in ("falcon", "gpt_neox")},
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    **{t: (["q_proj", "v_proj", "down_proj"], ["down_proj"]) for t in ("gemma3_text", "llama4")},
}


def _io_features(base: nn.Module) -> tuple[int, int]:
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.nf)
    return int(base.in_features), int(base.out_features)


@register_config
@dataclass
class IA3Config(MethodConfig):
    """IA³ with PEFT's semantics: ``target_modules`` get a vector; those also in ``feedforward_modules`` scale their
    input, the others their output. None picks PEFT's defaults for the model type (Llama: k_proj, v_proj and the
    input of down_proj). ``adapter_dtype``: as MoLConfig's ("auto": float32 vectors on a 16-bit model, as PEFT).
    ``modules_to_save``: as MoLConfig's (trained in full, saved along).
    """

    method: ClassVar[str] = "ia3"

    target_modules: Optional[TargetModules] = None
    feedforward_modules: Optional[TargetModules] = None
    adapter_dtype: str = "auto"
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_adapter_dtype(self)
        check_targets("IA3Config", "target_modules", self.target_modules)
        check_targets("IA3Config", "feedforward_modules", self.feedforward_modules)
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ValueError("IA3Config.feedforward_modules is set but target_modules is None; set both "
                             "(feedforward_modules must be a subset of target_modules) or neither")
        if (isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list)
                and not set(self.feedforward_modules) <= set(self.target_modules)):
            raise ValueError(f"IA3Config.feedforward_modules {self.feedforward_modules} must be a subset of "
                             f"target_modules {self.target_modules}; add them to target_modules")
        check_modules_to_save(self)


class IA3Linear(AdapterLayer):
    """A frozen linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) with an IA³ scaling vector ``ia3_l``."""

    def __init__(self, base: nn.Module, feedforward: bool, adapter_dtype: Optional[str] = None):
        super().__init__()
        self.base_layer = base
        self.feedforward = feedforward
        in_f, out_f = _io_features(base)
        dtype, device = base_dtype_device(base)
        dtype = adapter_dtype_for(adapter_dtype, dtype)
        self.ia3_l = nn.Parameter(torch.ones(in_f if feedforward else out_f, device=device, dtype=dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, features={self.ia3_l.numel()}"

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer((x * self.ia3_l).to(x.dtype))
        y = self.base_layer(x)
        return (y * self.ia3_l).to(y.dtype)

    def merge_blocker(self) -> Optional[str]:
        return dense_weight_blocker(self.base_layer)

    def _scale_weight(self, s: Tensor) -> None:
        """Multiply the base weight (and, for output scaling, bias) by ``s`` along the scaled axis."""
        base, w = self.base_layer, self.base_layer.weight
        out_axis = 1 if is_conv1d(base) else 0  # Conv1D stores (in, out)
        axis = 1 - out_axis if self.feedforward else out_axis
        shape = [1, 1]
        shape[axis] = -1
        # float32 or wider: a float64 weight must not pass through float32, which would round it
        dtype = torch.promote_types(torch.promote_types(w.dtype, s.dtype), torch.float32)
        w.data = (w.data.to(dtype) * s.to(dtype).view(shape)).to(w.dtype)
        if not self.feedforward and base.bias is not None:
            base.bias.data = (base.bias.data.to(dtype) * s.to(dtype)).to(base.bias.dtype)

    def merge(self) -> None:
        reason = self.merge_blocker()
        if reason:
            raise ValueError(reason)
        if not self.merged:
            with torch.no_grad():
                self._scale_weight(self.ia3_l.detach())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            l = self.ia3_l.detach()
            if bool((l == 0).any()):
                raise ValueError("cannot unmerge IA³: a scaling entry is exactly 0, so the merged weight lost that "
                                 "row/column; reload the base model and the adapter instead")
            with torch.no_grad():
                self._scale_weight(1.0 / l.to(torch.promote_types(l.dtype, torch.float32)))
            self.merged = False


def _resolve(model: nn.Module, cfg: IA3Config) -> tuple[list[str], list[str]]:
    targets, ff = cfg.target_modules, cfg.feedforward_modules
    if targets is None:
        mtype = model_type(model)
        if mtype not in DEFAULT_TARGETS:
            raise ValueError(f"IA3Config has no default target_modules for model type {mtype!r}; set target_modules "
                             "(e.g. ['k_proj', 'v_proj', 'down_proj']) and feedforward_modules (e.g. ['down_proj'])")
        targets, ff = DEFAULT_TARGETS[mtype]
        missing = [t for t in targets if not any(name_matches(n, [t]) for n, _ in model.named_modules())]
        if missing:
            # PEFT's table predates transformers 5, which fused Mixtral's w1/w2/w3 experts into 3-D tensors: the
            # error of match_modules would blame a target_modules the user never set
            kept = [t for t in targets if t not in missing]
            kept_ff = [f for f in ff if f not in missing]
            why = ("transformers 5 keeps the experts of a mixture-of-experts model as fused 3-D tensors, which mol "
                   "cannot adapt; " if fused_experts(list(model.named_modules())) else "")
            raise ValueError(f"IA3Config's default targets for model type {mtype!r}, PEFT's {targets}, name "
                             f"{missing}, which is no layer of this {type(model).__name__} ({why}PEFT drops the "
                             f"name and adapts the rest): set target_modules={kept}"
                             + (f" and feedforward_modules={kept_ff}" if kept_ff else "")
                             + " for what PEFT does, or name the layers to adapt")
    names = match_modules(model, targets, exclude=cfg.modules_to_save)
    ff_names: list[str] = []
    idle: list[str] = []
    if isinstance(ff, str):
        ff_names = [n for n in names if re.fullmatch(ff, n)]
        idle = [] if ff_names else [ff]
    elif ff is not None:
        ff_names = [n for n in names if name_matches(n, ff)]
        idle = [p for p in ff if not any(name_matches(n, [p]) for n in names)]
    if idle:
        # silently dropped, the layers it meant would scale their output instead of their input
        raise ValueError(f"IA3Config.feedforward_modules {idle[0]!r} matches none of the {len(names)} layers "
                         f"target_modules selected (e.g. {names[0]!r}); a regex string must match a layer's full "
                         "name (e.g. r'.*\\.down_proj'), a list entry its name or suffix (['down_proj'])")
    return names, ff_names


@register_method(IA3Config)
def _inject_ia3(model: nn.Module, cfg: IA3Config) -> list[str]:
    names, ff_names = _resolve(model, cfg)
    trainable = []
    for name in names:
        replace_module(model, name, IA3Linear(model.get_submodule(name), feedforward=name in ff_names,
                                              adapter_dtype=cfg.adapter_dtype))
        trainable.append(f"{name}.ia3_l")
    return trainable
