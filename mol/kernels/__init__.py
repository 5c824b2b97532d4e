"""Triton kernels for mol (grouped mixture-of-LoRA forward/backward).

Imported lazily: the Triton kernels are compiled (or, with TRITON_INTERPRET=1, interpreted)
according to the environment at the moment mol.kernels.grouped_lora is first imported, so
importing `mol` never pulls in Triton by itself.
"""
import importlib

__all__ = ["grouped_lora_add", "grouped_lora_linear"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("mol.kernels.grouped_lora"), name)
    raise AttributeError(f"module 'mol.kernels' has no attribute {name!r}")
