"""A transformers model saved with bitsandbytes 4-bit NF4 (a ``*-bnb-4bit`` Hub repo, ``save_pretrained`` of a
bitsandbytes model, ``mol.save_bnb_4bit``) loaded into NF4Linear layers, without bitsandbytes.

The model is built on the meta device, so no layer is ever allocated in full precision: the 4-bit layers are read
straight into NF4Linear (``load_bnb_4bit``), the other tensors are assigned from the checkpoint, and the
non-persistent buffers (rotary ``inv_freq``) are computed by transformers' own ``_init_weights``, as
``from_pretrained`` does."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from mol.experts import expert_tensors
from mol.inject import name_matches

from .linear import NF4Linear, load_bnb_4bit

PathLike = Union[str, os.PathLike]

WHO = "from_bnb_4bit"
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION = "generation_config.json"


def from_bnb_4bit(source: PathLike, model_class: Any = None, *, dtype: Optional[torch.dtype] = None,
                  device: Union[str, torch.device] = "cpu", backend: str = "auto", revision: Optional[str] = None,
                  token: Union[str, bool, None] = None, new_heads: Sequence[str] = (),
                  config_overrides: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Load a transformers model saved with bitsandbytes 4-bit NF4 into NF4Linear layers, without bitsandbytes and
    without ever allocating its 4-bit layers in full precision.

    ``source``: a local directory holding ``config.json`` and ``model.safetensors`` (or
    ``model.safetensors.index.json`` and its shards), or a Hugging Face Hub repo id (``owner/name``, at
    ``revision``, with ``token``), downloaded into (or read offline from) Hugging Face's cache. Its config must hold
    a bitsandbytes ``quantization_config`` with ``load_in_4bit`` and ``bnb_4bit_quant_type='nf4'``.
    ``model_class``: a transformers model class or auto class (default: the class ``config.architectures`` names,
    else ``AutoModelForCausalLM``). ``dtype``: the dtype of the full-precision tensors (embeddings, norms, head)
    and so the compute dtype (default: ``bnb_4bit_compute_dtype``, else the config's dtype, else float32).
    ``backend``: NF4Linear's kernel backend. Returns the model on ``device`` in eval mode, as a model that
    ``mol.quantize`` put in NF4 (its config carries no ``quantization_config``): ``mol.inject`` on top gives QLoRA,
    ``mol.save_bnb_4bit`` writes it back. Raises before reading any tensor on a missing file or shard, on an fp4,
    8-bit or non-bitsandbytes checkpoint and on a checkpoint without quantization; after the 4-bit layers but
    before any full-precision tensor, on entries that do not fit (load_bnb_4bit's checks) and on keys or shapes
    the architecture does not have or lacks.

    A task head the checkpoint lacks (a causal LM read as ``AutoModelForSequenceClassification``: ``score``) is
    named in ``new_heads`` (module names, as ``modules_to_save`` matches them): such a head is read where the
    checkpoint holds it in the model's shape, else initialised as transformers initialises a new head (a warning
    names it), and the checkpoint's tensors the model has no place for (the LM's ``lm_head``) are left unused, as
    from_pretrained leaves them. ``config_overrides`` are set on the config before the model is built (e.g.
    ``num_labels``, ``id2label``, ``label2id``)."""
    import transformers

    directory = _checkpoint_dir(source, revision, token)
    config = transformers.AutoConfig.from_pretrained(str(directory))
    qc = _check_quantization(config, directory)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    dtype = _dtype(dtype, qc, config)
    cls = _model_class(model_class, config)
    files = _shards(directory)
    tensors = _LazyTensors(files)
    try:
        model = _build(cls, config, dtype)
        _load(model, tensors, backend, directory, dtype, list(new_heads))
    finally:
        tensors.close()
    if (directory / GENERATION).is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(directory))
    model.config._name_or_path = str(source)
    return model.to(device).eval()


def is_bnb_nf4_config(config: Any) -> bool:
    """Whether a transformers config (or config.json's dict) holds a bitsandbytes 4-bit NF4 quantization_config,
    which from_bnb_4bit reads."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    return (isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))
            and not qc.get("load_in_8bit") and qc.get("bnb_4bit_quant_type", "fp4") == "nf4")


# ---------------------------------------------------------------- files

def _checkpoint_dir(source: Any, revision: Optional[str], token: Union[str, bool, None]) -> Path:
    from mol.io import _adapter_source, _hub_repo_id

    repo = _hub_repo_id(source) is not None
    directory = _adapter_source(source, WHO, (CONFIG, GENERATION, SINGLE, INDEX), revision, None, token,
                                required=CONFIG, what="transformers model")
    if not directory.is_dir():
        raise FileNotFoundError(f"{WHO}: {directory} does not exist; give a directory written by save_pretrained "
                                "or mol.save_bnb_4bit, or a Hub repo id (owner/name)")
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{WHO}: {directory} holds no {CONFIG}, so it is no transformers model; give the "
                                "directory save_pretrained or mol.save_bnb_4bit wrote")
    if repo and (directory / INDEX).is_file() and not (directory / SINGLE).is_file():
        # the shards the index lists, from the commit the first download resolved (a branch may move meanwhile)
        names = sorted(set(_index(directory).values()))
        directory = _adapter_source(source, WHO, tuple(names), directory.name, None, token, required=CONFIG,
                                    what="transformers model")
    return directory


def _index(directory: Path) -> dict[str, str]:
    path = directory / INDEX
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{WHO}: {path} is no valid safetensors index ({e}); download or save the model again") \
            from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and v and not Path(v).is_absolute() and ".." not in Path(v).parts
            for v in weight_map.values()):
        raise ValueError(f"{WHO}: {path} has no valid 'weight_map' (tensor name -> shard file inside the directory);"
                         " download or save the model again")
    return weight_map


def _shards(directory: Path) -> list[Path]:
    """The safetensors files of the checkpoint, every one checked to exist."""
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    if not (directory / INDEX).is_file():
        bins = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
        also = f" (it holds {bins[:2]}: mol reads safetensors only; re-save with save_pretrained)" if bins else ""
        raise FileNotFoundError(f"{WHO}: {directory} holds neither {SINGLE} nor {INDEX}{also}")
    names = sorted(set(_index(directory).values()))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{WHO}: {directory / INDEX} lists {len(names)} shards, of which {missing[:3]} "
                                f"{'is' if len(missing) == 1 else 'are'} missing; download the model again")
    return [directory / n for n in names]


class _LazyTensors(Mapping):
    """The checkpoint's tensors by name across its shards, each read from its file when asked for (so that
    load_bnb_4bit reads the 4-bit entries of a layer even where a shard boundary splits them)."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{WHO}: {path} is truncated or no safetensors file ({e}); download or save the "
                                 "model again") from None
            self._handles[path] = handle
            for key in handle.keys():
                if key in self._files:
                    raise ValueError(f"{WHO}: {key!r} is in both {self._files[key].name} and {path.name}: the "
                                     "directory mixes two checkpoints")
                self._files[key] = path

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._files[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def file(self, key: str) -> Path:
        return self._files[key]

    def close(self) -> None:
        self._handles.clear()


# ---------------------------------------------------------------- config

def _check_quantization(config: Any, directory: Path) -> dict:
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    where = f"{WHO}: {directory / CONFIG}"
    if not qc:
        raise ValueError(f"{where} has no quantization_config: the checkpoint is full precision. Load it with "
                         "from_pretrained and call mol.quantize(model, 'nf4'), or inject with "
                         "MoLConfig(quantize_base='nf4') / LoRAConfig(quantize_base='nf4')")
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config is {type(qc).__name__}, not a mapping; the config is damaged")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"{where} is quantized with quant_method={method!r}; mol reads bitsandbytes 4-bit NF4 "
                         f"checkpoints only: load this one with transformers and its {method} package")
    if qc.get("load_in_8bit"):
        raise ValueError(f"{where} is a bitsandbytes 8-bit (LLM.int8) checkpoint; mol reads 4-bit NF4 only: load "
                         "it with transformers and bitsandbytes, or load the full-precision model and call "
                         "mol.quantize(model, 'nf4')")
    if not qc.get("load_in_4bit"):
        raise ValueError(f"{where}: its bitsandbytes quantization_config has neither load_in_4bit nor load_in_8bit; "
                         "the config is damaged")
    kind = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default
    if kind != "nf4":
        raise ValueError(f"{where} is a bitsandbytes 4-bit checkpoint of quant_type {kind!r}; mol reads NF4 only "
                         "(bnb_4bit_quant_type='nf4'): load it with transformers and bitsandbytes")
    return qc


def _as_dtype(value: Any) -> Optional[torch.dtype]:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        return found if isinstance(found, torch.dtype) else None
    return None


def _dtype(dtype: Optional[torch.dtype], qc: dict, config: Any) -> torch.dtype:
    if dtype is None:
        dtype = (_as_dtype(qc.get("bnb_4bit_compute_dtype")) or _as_dtype(getattr(config, "dtype", None))
                 or _as_dtype(getattr(config, "torch_dtype", None)) or torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{WHO}: dtype must be a floating torch.dtype (torch.bfloat16, torch.float16, "
                         f"torch.float32); got {dtype!r}")
    return dtype


def _model_class(model_class: Any, config: Any) -> Any:
    import transformers

    if model_class is None:
        names = getattr(config, "architectures", None) or []
        found = getattr(transformers, names[0], None) if names else None
        return found if isinstance(found, type) else transformers.AutoModelForCausalLM
    auto = hasattr(model_class, "_model_mapping")
    if not isinstance(model_class, type) or not (auto or issubclass(model_class, transformers.PreTrainedModel)):
        raise TypeError(f"{WHO}: model_class must be a transformers model class or auto class (e.g. "
                        f"AutoModelForCausalLM); got {model_class!r}")
    return model_class


def _build(cls: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device: nothing allocated, transformers' weight init skipped."""
    cfg = copy.deepcopy(config)
    del cfg.quantization_config  # else transformers would set the model up for bitsandbytes
    build = cls.from_config if hasattr(cls, "_model_mapping") else cls._from_config
    with torch.device("meta"):
        return build(cfg, dtype=dtype)


# ---------------------------------------------------------------- loading

def _owner(key: str, names: set[str]) -> Optional[str]:
    """The replaced layer that ``key`` belongs to (its '<layer>.weight...' or '<layer>.bias'), if any."""
    parts = key.split(".")
    for j in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:j])
        if prefix in names:
            return prefix
    return None


def _ignored_unexpected(model: nn.Module) -> list[re.Pattern]:
    # checkpoints of older transformers hold each layer's rotary inv_freq; the model class names its own leftovers
    patterns = [r"rotary_emb\.inv_freq", *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return [re.compile(p) for p in patterns]


def _load(model: nn.Module, tensors: _LazyTensors, backend: str, directory: Path, dtype: torch.dtype,
          new_heads: list[str]) -> None:
    # the 4-bit layers first: load_bnb_4bit checks every entry before it replaces the first layer
    replaced = set(load_bnb_4bit(model, tensors, backend=backend))
    if not replaced:
        raise ValueError(f"{WHO}: {directory} holds no bitsandbytes 4-bit entry ('<layer>.weight.quant_state."
                         "bitsandbytes__nf4'), though its config says load_in_4bit; the checkpoint is damaged")
    expected = model.state_dict(keep_vars=True)
    rest = [k for k in tensors if _owner(k, replaced) is None]
    ignored = _ignored_unexpected(model)
    unexpected = [k for k in rest if k not in expected and not any(p.search(k) for p in ignored)]
    rest = [k for k in rest if k in expected]
    heads = {n for n, _ in model.named_modules() if n and name_matches(n, new_heads)}

    def in_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in heads)

    per_expert = [k for k in unexpected if re.search(r"\.experts\.\d+\.", k)]
    if per_expert and any(expert_tensors(m) for m in model.modules()):
        raise ValueError(f"{WHO}: {directory} holds the mixture-of-experts weights one expert at a time (e.g. "
                         f"{per_expert[0]!r}: the layout transformers saves, and loads by fusing the experts), while "
                         f"{type(model).__name__} holds them fused (3-D tensors); {WHO} reads checkpoints with fused "
                         "experts only (as save_bnb_4bit writes them). Load the full-precision model with "
                         "from_pretrained and call mol.quantize(model, 'nf4'), which puts the experts in NF4 too")
    unused = []
    if new_heads:  # a checkpoint of another head: its tensors are left unused, as from_pretrained leaves them
        unused, unexpected = unexpected, []
    if unexpected:
        raise ValueError(f"{WHO}: {directory} holds {len(unexpected)} tensors that {type(model).__name__} has no "
                         f"place for, e.g. {unexpected[:3]}; load it with the model class it was saved from "
                         "(model_class=), or name the new task head this class adds in new_heads= (e.g. "
                         "['score'] for a causal LM read as a classifier)")
    mismatched, resized = [], []
    for k in rest:
        shape = tuple(tensors._handles[tensors.file(k)].get_slice(k).get_shape())
        if shape != tuple(expected[k].shape):
            if in_head(k):  # a head of another size (another label count): initialised anew below
                resized.append(k)
            else:
                mismatched.append(f"{k}: {shape} in the checkpoint, {tuple(expected[k].shape)} in the model")
    rest = [k for k in rest if k not in resized]
    if mismatched:
        raise ValueError(f"{WHO}: {len(mismatched)} tensors of {directory} do not fit {type(model).__name__}: "
                         f"{mismatched[:3]}; the checkpoint is of another architecture or config")
    # a replaced layer's tensors were read from the checkpoint, but a bias it lacks (still on the meta device)
    given = set(rest) | {k for k in expected if _owner(k, replaced) is not None and not expected[k].is_meta}
    missing = {k for k in expected if k not in given}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    untied = [k for k in sorted(missing) if not any(
        (k == t and s not in missing) or (k == s and t not in missing) for t, s in tied.items())]
    nonpersistent = _non_persistent(model)
    untied = [k for k in untied if k not in nonpersistent and not in_head(k)]
    if untied:
        raise ValueError(f"{WHO}: {directory} lacks {len(untied)} tensors of {type(model).__name__}, e.g. "
                         f"{untied[:3]}; the checkpoint does not match the architecture: load it with the model "
                         "class it was saved from (model_class=)")

    # one shard at a time, so that only one shard's full-precision tensors are read at once
    for path in dict.fromkeys(tensors.file(k) for k in rest):
        part = {}
        for k in (k for k in rest if tensors.file(k) == path):
            t, want = tensors[k], expected[k]
            part[k] = t.to(want.dtype) if t.is_floating_point() and want.is_floating_point() else t
        model.load_state_dict(part, strict=False, assign=True)
    loaded = model.state_dict(keep_vars=True)
    for t in loaded.values():
        t._is_hf_initialized = True  # transformers' init functions leave flagged tensors alone
    model.tie_weights(missing_keys=missing)
    _compute_non_persistent_buffers(model)
    _init_new_heads(model, heads, unused, directory)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"{WHO}: {len(on_meta)} tensors of {type(model).__name__} were not in {directory} "
                         f"(e.g. {on_meta[:3]}); the checkpoint does not match the architecture")
    for m in model.modules():
        if isinstance(m, NF4Linear):
            # the dtype it computes in, as after .to(dtype): what adapter_dtype="base" takes and save_bnb_4bit
            # records as bnb_4bit_compute_dtype (the quant_state's dtype is the one it was quantized from)
            m.weight_dtype = dtype
            if m.bias is not None and m.bias.dtype != dtype:
                m.bias.data = m.bias.data.to(dtype)  # as every other full-precision tensor


def _init_new_heads(model: nn.Module, heads: set[str], unused: list[str], directory: Path) -> None:
    """Initialise, by the model's own ``_init_weights`` (transformers' init of a new head), the head modules the
    checkpoint did not fill; warn naming them and the checkpoint tensors left unused."""
    fresh = []
    for name in sorted(heads):
        module = model.get_submodule(name)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            module.to_empty(device="cpu")
            with torch.no_grad():
                for sub in module.modules():
                    model._init_weights(sub)
            fresh.append(name)
    said = []
    if fresh:
        said.append(f"{', '.join(fresh)}: not in {directory} in this model's shape, initialised as transformers "
                    "initialises a new head (train it: modules_to_save)")
    if unused:
        said.append(f"{len(unused)} tensors of {directory} this model has no place for are left unused, e.g. "
                    f"{unused[:2]}")
    if said:
        warnings.warn(f"{WHO}: " + "; ".join(said), stacklevel=3)


def _non_persistent(model: nn.Module) -> set[str]:
    return {f"{n}.{b}" if n else b for n, m in model.named_modules() for b in m._non_persistent_buffers_set}


def _compute_non_persistent_buffers(model: nn.Module) -> None:
    """The non-persistent buffers (rotary inv_freq, position ids) from_config left on the meta device, computed on
    the CPU by the ``_init_weights`` of the transformers model that holds them, as from_pretrained does. A buffer
    that ``_init_weights`` does not write raises (it would hold garbage)."""
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    def visit(module: nn.Module, owner: Any, prefix: str) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        fresh = {}
        for b in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(b)
            if buf is not None and buf.is_meta:
                module._buffers[b] = fresh[b] = torch.empty_like(buf, device="cpu")
        if fresh:
            versions = {b: t._version for b, t in fresh.items()}
            with torch.no_grad(), guard_torch_init_functions():
                owner._init_weights(module)
            unwritten = [prefix + b for b, t in fresh.items() if module._buffers[b] is t and t._version == versions[b]]
            if unwritten:
                raise ValueError(f"{WHO}: transformers' {type(owner).__name__}._init_weights does not compute the "
                                 f"buffer {unwritten[0]!r}, which is not in the checkpoint; this architecture cannot "
                                 "be built on the meta device: load it with from_pretrained and call mol.quantize")
        for name, child in module.named_children():
            visit(child, owner, f"{prefix}{name}.")

    visit(model, model, "")
