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
