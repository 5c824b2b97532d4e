"""NF4 frozen bases (QLoRA): quantize / dequantize, NF4Linear, and bitsandbytes checkpoint interop."""

from .checkpoint import bnb_4bit_state_dict, save_bnb_4bit
from .linear import NF4Linear, NF4Tensor, load_bnb_4bit, quantize
from .experts import NF4Experts
from .nf4 import (
    NF4_LEVELS,
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_reference,
    dynamic_map,
    from_bnb_tensors,
    quantize_nf4,
    to_bnb_tensors,
)
from .pretrained import from_bnb_4bit

__all__ = ["NF4Experts", "NF4Linear", "NF4Tensor", "NF4Weight", "NF4_LEVELS", "quantize", "quantize_nf4",
           "dequantize_nf4",
           "dequantize_nf4_reference", "dynamic_map", "load_bnb_4bit", "from_bnb_tensors", "to_bnb_tensors",
           "bnb_4bit_state_dict", "save_bnb_4bit", "from_bnb_4bit"]
