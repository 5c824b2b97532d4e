"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

Each adapter is ``h + up(act(down(h)))`` applied to the output ``h`` of a sub-layer, before that output joins the
residual stream. ``up`` starts at zero, so a fresh adapter is the identity. Placement:

- ``pfeiffer``: after the MLP of every block (one adapter per block);
- ``houlsby``: after the attention and after the MLP of every block (two per block).

The adapter hooks whole sub-layer modules (``self_attn``/``mlp`` on Llama-style models, ``attn``/``mlp`` on GPT-2)
rather than their output projections, so it composes with MoL/LoRA on every linear layer. On BERT the attention and
MLP modules return their output after add & norm, so there the adapter hooks the dropout right after each output
projection: exactly Houlsby's position (projection -> adapter -> add & norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from mol.config import (MethodConfig, TargetModules, check_adapter_dtype, check_modules_to_save, check_targets,
                        is_number, register_config)
from mol.inject import match_modules, register_method
from mol.layers import AdapterLayer, adapter_dtype_for
from mol.methods._util import config_int, text_config

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = ("pfeiffer", "houlsby")

# (attention outputs, MLP outputs) per model family, tried in order; the first pair that matches wins.
DEFAULT_PLACES: list[tuple[TargetModules, TargetModules]] = [
    (["self_attn"], ["mlp"]),                                            # Llama, Mistral, Qwen, Gemma, Phi-3 ...
    (["attn"], ["mlp"]),                                                 # GPT-2, GPT-J, GPT-NeoX style
    (["self_attn"], ["feed_forward"]),                                   # Llama 4 (its MoE or dense MLP)
    (r".*\.attention\.output\.dropout", r".*\.layer\.\d+\.output\.dropout"),  # BERT, RoBERTa, MiniLM
]


@register_config
@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters.

    ``placement``: ``"pfeiffer"`` (after each MLP) or ``"houlsby"`` (after each attention and each MLP).
    Bottleneck width: ``bottleneck_size`` if given, else ``hidden_size // reduction_factor``.
    ``attn_modules`` / ``mlp_modules``: the sub-layers whose outputs get an adapter (names, suffixes or one regex);
    None picks the defaults for Llama-, GPT-2- and BERT-style models. ``non_linearity``: relu, gelu, silu, tanh.
    ``dropout``: on the adapter's input, in training. ``adapter_dtype``: as MoLConfig's ("auto": float32 adapters
    on a 16-bit model; they compute in it). ``modules_to_save``: as MoLConfig's (trained in full, saved along).
    """

    method: ClassVar[str] = "adapter"

    placement: str = "pfeiffer"
    reduction_factor: int = 16
    bottleneck_size: Optional[int] = None
    non_linearity: str = "relu"
    dropout: float = 0.0
    attn_modules: Optional[TargetModules] = None
    mlp_modules: Optional[TargetModules] = None
    adapter_dtype: str = "auto"
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement={self.placement!r} is unknown; choose one of {PLACEMENTS}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"AdapterConfig.reduction_factor must be a positive integer, got "
                             f"{self.reduction_factor!r}; e.g. 16 gives a bottleneck of hidden_size // 16")
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1):
            raise ValueError(f"AdapterConfig.bottleneck_size must be a positive integer or None, got "
                             f"{self.bottleneck_size!r}; None uses hidden_size // reduction_factor")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.non_linearity={self.non_linearity!r} is unknown; "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        check_adapter_dtype(self)
        check_targets("AdapterConfig", "attn_modules", self.attn_modules)
        check_targets("AdapterConfig", "mlp_modules", self.mlp_modules)
        custom = self.attn_modules is not None or self.mlp_modules is not None
        if custom and (self.mlp_modules is None or (self.placement == "houlsby" and self.attn_modules is None)):
            raise ValueError("AdapterConfig: set mlp_modules (and attn_modules for placement='houlsby') together, "
                             "or leave both None for the model's defaults")
        if self.placement == "pfeiffer" and self.attn_modules is not None:
            # else dropped without a word: Pfeiffer adapts the MLP outputs alone
            raise ValueError("AdapterConfig.attn_modules only applies with placement='houlsby' (Pfeiffer adapts the "
                             "MLP outputs alone); set placement='houlsby' or leave attn_modules=None")
        check_modules_to_save(self)

    def bottleneck(self, hidden_size: int) -> int:
        """Bottleneck width for a model of ``hidden_size``."""
        return self.bottleneck_size or max(1, hidden_size // self.reduction_factor)


class BottleneckAdapter(AdapterLayer):
    """``h + up(act(down(h)))`` applied by a forward hook to the output ``h`` of the sub-layer it is attached to.

    It lives as the child ``mol_adapter`` of that sub-layer instead of replacing it, so no existing parameter name
    changes: adapters compose with methods injected before or after them (IA³ on the keys, MoL on every linear).
    A sub-layer may return a tensor or a tuple starting with one (HF attention modules return ``(out, weights)``).
    """

    def __init__(self, hidden_size: int, bottleneck: int, non_linearity: str = "relu", dropout: float = 0.0,
                 like: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        if dtype is not None:
            kw["dtype"] = dtype
        self.adapter_down = nn.Linear(hidden_size, bottleneck, **kw)
        self.adapter_act = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck, hidden_size, **kw)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            # BERT-style init for the down projection; the zero up projection makes the adapter the identity.
            nn.init.normal_(self.adapter_down.weight, std=0.02)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: Tensor) -> Tensor:
        z = self.adapter_down(self.adapter_dropout(h.to(self.adapter_down.weight.dtype)))
        return h + self.adapter_up(self.adapter_act(z)).to(h.dtype)

    def attach(self, sublayer: nn.Module) -> None:
        if hasattr(sublayer, "mol_adapter"):
            raise ValueError(f"{type(sublayer).__name__} already carries a bottleneck adapter; inject one "
                             "AdapterConfig per model")
        sublayer.add_module("mol_adapter", self)
        sublayer.register_forward_hook(self._hook)  # a bound method: copy.deepcopy(model) re-binds it to the copy

    def _hook(self, sublayer: nn.Module, args: tuple, out: Any) -> Any:
        if self.disabled:
            return out
        h = out[0] if isinstance(out, tuple) and out else out
        if isinstance(h, Tensor) and h.shape[-1:] != (self.adapter_down.in_features,):
            # else a matmul error naming neither the sub-layer nor the sizes
            raise ValueError(f"a bottleneck adapter of hidden size {self.adapter_down.in_features} sits on a "
                             f"{type(sublayer).__name__} whose output is {tuple(h.shape)}: point "
                             "attn_modules/mlp_modules at sub-layers whose output has the model's hidden size (the "
                             "attention or MLP block, or its output projection)")
        # the sub-layer's child, not self: trainer=fsdp makes the adapter an FSDP unit of its own (adapter_units),
        # which puts its wrapper there and gathers the weights only inside the wrapper's forward
        adapter = sublayer._modules.get("mol_adapter", self)
        if isinstance(out, Tensor):
            return adapter(out)
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            return (adapter(out[0]),) + tuple(out[1:])
        raise TypeError(f"a bottleneck adapter needs its sub-layer to return a tensor or a tuple starting with one; "
                        f"{type(sublayer).__name__} returned {type(out).__name__}: point attn_modules/mlp_modules "
                        "at the sub-layer (or its output projection) instead")

    def merge_blocker(self) -> Optional[str]:
        return "a bottleneck adapter is nonlinear (down -> activation -> up) and cannot be folded into a weight"


def resolve_places(model: nn.Module, cfg: AdapterConfig) -> tuple[list[str], list[str]]:
    """Names of the attention and MLP sub-layers that get adapters (attention list empty for Pfeiffer)."""
    pick = lambda m: True  # noqa: E731  (any module: the adapter wraps its output, whatever it is)
    if cfg.mlp_modules is not None:
        mlp = match_modules(model, cfg.mlp_modules, predicate=pick, exclude=cfg.modules_to_save)
        attn = (match_modules(model, cfg.attn_modules, predicate=pick, exclude=cfg.modules_to_save)
                if cfg.placement == "houlsby" else [])
        return attn, mlp
    for attn_pat, mlp_pat in DEFAULT_PLACES:
        try:
            attn = match_modules(model, attn_pat, predicate=pick, exclude=cfg.modules_to_save)
            mlp = match_modules(model, mlp_pat, predicate=pick, exclude=cfg.modules_to_save)
        except ValueError:
            continue
        if len(attn) == len(mlp):  # one of each per block, or the pattern pair is not this model's
            return (attn if cfg.placement == "houlsby" else []), mlp
    raise ValueError(f"AdapterConfig found no default attention/MLP sub-layers in {type(model).__name__}; set "
                     "attn_modules and mlp_modules to the modules whose outputs should be adapted "
                     "(e.g. attn_modules=['self_attn'], mlp_modules=['mlp'])")


@register_method(AdapterConfig)
def _inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    hidden = config_int(text_config(model), "hidden_size", "d_model", "n_embd")
    if hidden is None:
        raise ValueError(f"cannot read hidden_size from {type(model).__name__}.config; adapters need it")
    attn, mlp = resolve_places(model, cfg)
    trainable = []
    for name in attn + mlp:
        # the device and dtype of the block the sub-layer is in, not of the model's first tensor: a model split over
        # devices (device_map) has each block on its own. A parameter-less sub-layer (BERT's dropout) asks its parent
        parts = name.split(".")
        like = next((p for i in range(len(parts), -1, -1)
                     for p in model.get_submodule(".".join(parts[:i])).parameters()), None)
        dtype = adapter_dtype_for(cfg.adapter_dtype, like.dtype) if like is not None else None
        adapter = BottleneckAdapter(hidden, cfg.bottleneck(hidden), cfg.non_linearity, cfg.dropout, like=like,
                                    dtype=dtype)
        adapter.attach(model.get_submodule(name))
        trainable += [f"{name}.mol_adapter.{p}" for p, _ in adapter.named_parameters()]
    return trainable
