"""A mol-quantized model as a bitsandbytes 4-bit checkpoint: the state dict under bitsandbytes' names, and a
directory transformers' ``from_pretrained`` loads with bitsandbytes (and ``load_bnb_4bit`` loads without it).

``model.save_pretrained`` of a model holding NF4Linear layers writes mol's buffer names (``qweight``, ``absmax``,
...) and no ``quantization_config``: transformers would rebuild those layers at random and say nothing."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from mol.inject import check_model
from mol.layers import AdapterLayer, is_conv1d

from .experts import NF4Experts
from .linear import NF4Linear

PathLike = Union[str, os.PathLike]


def bnb_4bit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict with every NF4Linear's tensors under the names bitsandbytes' Linear4bit saves
    ('<layer>.weight', '.weight.absmax', '.weight.quant_map', '.weight.nested_absmax', '.weight.nested_quant_map',
    '.weight.quant_state.bitsandbytes__nf4', '<layer>.bias'); every other tensor as ``model.state_dict()`` has it.
    Raises if the model carries mol adapters: export the base after ``mol.unload`` and the adapter with
    ``mol.save_adapter``."""
    check_model(model, "bnb_4bit_state_dict")
    _check_no_adapters(model, "bnb_4bit_state_dict")
    experts = [name for name, m in model.named_modules() if isinstance(m, NF4Experts)]
    if experts:  # bitsandbytes quantizes linear layers only: no checkpoint of its holds 4-bit 3-D expert tensors
        raise ValueError(f"bnb_4bit_state_dict: {type(model).__name__} holds fused mixture-of-experts tensors in NF4 "
                         f"({experts[0]!r}, {len(experts)} such modules), which bitsandbytes' 4-bit format has no "
                         "entry for; keep the full-precision checkpoint and quantize after loading "
                         "(mol.quantize(model, 'nf4'), or quantize_base='nf4'), or mol.quantize(model, 'nf4', "
                         "skip=['experts']) for a checkpoint with 4-bit linears and 16-bit experts")
    nf4 = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not nf4:
        raise ValueError(f"bnb_4bit_state_dict: {type(model).__name__} holds no NF4Linear layer; quantize it first "
                         "(mol.quantize(model, 'nf4')) or save it with save_pretrained")
    own = {f"{name}.{k}" if name else k for name, m in nf4.items() for k in m.state_dict()}
    sd = {k: v for k, v in model.state_dict().items() if k not in own}
    for name, m in nf4.items():
        sd.update(m.to_bnb_state_dict(f"{name}." if name else ""))
    return sd


def save_bnb_4bit(model: nn.Module, directory: PathLike, compute_dtype: torch.dtype | None = None) -> Path:
    """Write a transformers model holding NF4Linear layers as transformers saves a bitsandbytes 4-bit model
    (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True)``):
    ``model.safetensors`` with ``bnb_4bit_state_dict(model)`` (tied copies left out, as save_pretrained does) and
    ``config.json`` with its ``quantization_config``, whose ``llm_int8_skip_modules`` lists every linear layer mol
    kept in full precision (so transformers builds Linear4bit exactly where the checkpoint has 4-bit entries), and,
    for a model that generates, ``generation_config.json`` as save_pretrained writes it. ``compute_dtype``
    (bnb_4bit_compute_dtype): default the dtype the layers were quantized from. Everything is checked before the
    first file is written; each file is written whole (a temp file renamed). Returns the directory. Load it with
    ``AutoModel...from_pretrained(directory)`` (bitsandbytes installed), or without bitsandbytes with
    ``mol.from_bnb_4bit(directory)``."""
    check_model(model, "save_bnb_4bit", then_directory=True)
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_string", None)):
        raise ValueError(f"save_bnb_4bit: {type(model).__name__} has no transformers config to write config.json "
                         "from; save bnb_4bit_state_dict(model) yourself (e.g. safetensors.torch.save_file)")
    _check_no_adapters(model, "save_bnb_4bit")
    sd = bnb_4bit_state_dict(model)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    dtypes = {m.weight_dtype for m in nf4}
    if compute_dtype is None:
        compute_dtype = nf4[0].weight_dtype if len(dtypes) == 1 else torch.float32
    if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"save_bnb_4bit: compute_dtype must be torch.float16, torch.bfloat16 or torch.float32; got "
                         f"{compute_dtype!r}")
    nested = {m.nested_absmax is not None for m in nf4}
    if len(nested) > 1:
        raise ValueError("save_bnb_4bit: the model mixes double-quantized and plain NF4 layers, and transformers' "
                         "quantization_config has one bnb_4bit_use_double_quant for all; quantize them alike")
    kept = sorted(n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m)))
    # tied copies (the head sharing the input embedding): transformers saves one name and ties again on load
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in (tied.items() if isinstance(tied, dict) else ()):
        # state_dict() gives each name its own detached tensor: one tied tensor is one storage, not one object
        if target in sd and source in sd and _same_tensor(sd[target], sd[source]):
            del sd[target]
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}  # safetensors: no shared memory
    cfg = copy.deepcopy(config)
    cfg.quantization_config = _bnb_config(compute_dtype, nested.pop(), kept)
    # as save_pretrained: the architecture, and the dtype of the full-precision tensors (without it transformers
    # picks its own default dtype for them, and bitsandbytes computes in it)
    cfg.architectures = [type(model).__name__]
    dtype = getattr(model, "dtype", None)
    dtype = str(dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else compute_dtype)
    setattr(cfg, "dtype" if _transformers_major() >= 5 else "torch_dtype", dtype.replace("torch.", ""))

    from safetensors.torch import save_file

    from mol.io import _atomic_write_files, _directory  # one atomic write for every file mol saves (and its mode)

    writes = [("model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
              ("config.json", lambda tmp: Path(tmp).write_text(cfg.to_json_string(use_diff=True)))]
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
        # as save_pretrained: a chat model's stop tokens and sampling defaults, which from_pretrained reads back
        text = generation.to_json_string(use_diff=True)
        writes.append(("generation_config.json", lambda tmp: Path(tmp).write_text(text)))
    out = _directory(directory, "save_bnb_4bit", writing=True)
    _atomic_write_files(out, writes)
    return out


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two state-dict entries are views of the same memory (a tied weight under two names)."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


def _bnb_config(compute_dtype: torch.dtype, double_quant: bool, skip: list[str]) -> dict:
    """The quantization_config transformers writes for a bitsandbytes 4-bit NF4 model (BitsAndBytesConfig.to_dict)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).replace("torch.", ""),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        # None would let transformers pick its own defaults; the list names exactly the layers kept unquantized
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
    }


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _check_no_adapters(model: nn.Module, who: str) -> None:
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    extra = [n for n in ("mol_prefix", "mol_prompt") if hasattr(model, n)]
    if adapted or extra:
        raise ValueError(f"{who}: the model carries mol adapters ({(adapted + extra)[:3]}); a bitsandbytes checkpoint "
                         "holds the base only: save the adapter with mol.save_adapter, then mol.unload(model) (which "
                         "keeps the NF4 base) and export that")
