"""Triton kernels for mol (grouped mixture-of-LoRA forward/backward).

Imported lazily: the Triton kernels are compiled (or, with TRITON_INTERPRET=1, interpreted)
according to the environment at the moment mol.kernels.grouped_lora is first imported, so
importing `mol` never pulls in Triton by itself.
"""
import contextlib
import importlib
import os

import torch

__all__ = ["grouped_lora_add", "grouped_lora_linear"]

_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_flag(name: str, default: bool) -> bool:
    """An on/off switch from the environment variable ``name`` (1/0, true/false, on/off, yes/no; unset: default).
    Anything else raises rather than silently meaning off."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not an on/off value; set it to 1 or 0 (or true/false, on/off)")


# torch keeps no autocast state for these (is_autocast_enabled raises). A set, not torch.amp.is_autocast_available:
# Dynamo of torch 2.11 cannot trace that builtin and broke the graph at every routed layer (gpu_check_compile, H100).
_NO_AUTOCAST = frozenset({"meta"})


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device autocast does not know (meta), where torch raises."""
    return device_type not in _NO_AUTOCAST and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that switches autocast off for the device, entered only where it is on: entering torch.autocast
    costs tens of microseconds of host time, and fails for a device autocast does not know (meta)."""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else contextlib.nullcontext()


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("mol.kernels.grouped_lora"), name)
    raise AttributeError(f"module 'mol.kernels' has no attribute {name!r}")
