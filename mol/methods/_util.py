"""Small helpers shared by the methods in this package."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


from mol.layers import is_conv1d  # noqa: F401  (the methods' name for it; MoLLinear adapts Conv1D too)


def text_config(model: nn.Module) -> Any:
    """The (text) config of a Hugging Face model, or raise naming what is missing."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no Hugging Face `config`; this method needs a transformers model "
                         "(or pass the sizes explicitly in the method config)")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def config_int(cfg: Any, *names: str) -> Optional[int]:
    """First of ``names`` set on ``cfg`` (transformers aliases n_embd -> hidden_size etc.)."""
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    return None


def model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def check_modules_to_save(cfg: Any) -> None:
    name = type(cfg).__name__
    if not isinstance(cfg.modules_to_save, (list, tuple)) or not all(isinstance(m, str) for m in cfg.modules_to_save):
        raise ValueError(f"{name}.modules_to_save must be a list of module names, got {cfg.modules_to_save!r}")


def check_targets(name: str, field: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    ok = (isinstance(value, str) and value) or (isinstance(value, (list, tuple)) and value
                                                and all(isinstance(v, str) and v for v in value))
    if not ok:
        raise ValueError(f"{name}.{field}={value!r} is invalid; give a list of module names/suffixes, one regex string"
                         + (", or None for the model's defaults" if allow_none else ""))
