"""Triton kernels for mol (grouped mixture-of-LoRA forward/backward)."""
from mol.kernels.grouped_lora import grouped_lora_add, grouped_lora_linear

__all__ = ["grouped_lora_add", "grouped_lora_linear"]
