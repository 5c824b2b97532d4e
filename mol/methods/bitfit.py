"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the frozen model.

Target linear layers without a bias (Llama's) get a zero bias, so a fresh adapter changes nothing. The adapter that
``save_adapter`` writes is exactly these biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mol.config import MethodConfig, TargetModules, check_modules_to_save, check_targets, register_config
from mol.inject import match_modules, register_method
from mol.layers import base_dtype_device
from mol.methods._util import is_conv1d



@register_config
@dataclass
class BitFitConfig(MethodConfig):
    """Bias-only fine-tuning.

    ``target_modules``: the linear layers whose bias trains (a zero bias is added where missing); ``"all-linear"``
    is every linear but the output head. ``all_biases``: also train every other bias the model already has
    (LayerNorm biases, as in the BitFit paper). ``modules_to_save``: as MoLConfig's (trained in full, saved along).
    """

    method: ClassVar[str] = "bitfit"

    target_modules: TargetModules = "all-linear"
    all_biases: bool = True
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_targets("BitFitConfig", "target_modules", self.target_modules, allow_none=False)
        if not isinstance(self.all_biases, bool):
            raise ValueError(f"BitFitConfig.all_biases must be true or false, got {self.all_biases!r}")
        check_modules_to_save(self)


def _out_features(m: nn.Module) -> int:
    return int(m.nf) if is_conv1d(m) else int(m.out_features)


@register_method(BitFitConfig)
def _inject_bitfit(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    trainable = []
    for name in match_modules(model, cfg.target_modules, exclude=cfg.modules_to_save):
        layer = model.get_submodule(name)
        if getattr(layer, "bias", None) is None:
            dtype, device = base_dtype_device(layer)
            # nn.Linear, Conv1D and NF4Linear all add ``self.bias`` when it is not None.
            layer.bias = nn.Parameter(torch.zeros(_out_features(layer), device=device, dtype=dtype))
            layer.mol_added_bias = True  # merge_and_unload declares it in the model's config (declare_added_biases)
        trainable.append(f"{name}.bias")
    if cfg.all_biases:
        trainable += [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and n not in trainable]
    return trainable


# transformers config flags that give a family's linears a bias: (flag, a name part of the layers it covers)
_BIAS_FLAGS = (("attention_bias", ("attn", "attention")), ("mlp_bias", ("mlp",)))


def declare_added_biases(model: nn.Module) -> list[str]:
    """After merge_and_unload: biases BitFit added to layers that had none must be in the model's config, or
    transformers' ``from_pretrained`` drops them from a ``save_pretrained`` checkpoint. Sets the config's
    ``attention_bias`` / ``mlp_bias`` (Llama-style configs) where they cover the layers; returns the names of added
    biases no flag covers (the caller warns), and clears the marks."""
    config = getattr(model, "config", None)
    uncovered = []
    for name, module in model.named_modules():
        if not module.__dict__.pop("mol_added_bias", False):
            continue
        parts = name.split(".")
        flag = next((f for f, keys in _BIAS_FLAGS if hasattr(config, f) and any(k in p for p in parts for k in keys)),
                    None)
        if flag is None:
            uncovered.append(name)
        else:
            setattr(config, flag, True)
    return uncovered
