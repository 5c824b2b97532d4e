"""Save, load, merge, and move adapters to and from Hugging Face PEFT.

An adapter directory holds ``adapter_config.json`` (the method configs, enough to rebuild the injection on a
fresh base model) and ``adapter_model.safetensors`` (only the trainable tensors, under the model's own
parameter names). Files are written to temporary names and renamed once all are written, so a failure or crash
while writing never leaves half a file, nor new tensors beside an old config (only a crash between the renames,
which follow each other at once, could: two files cannot be replaced in one step).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mol.config import LoRAConfig, MoLConfig, config_from_dict, is_number, is_whole, without_quantize_base
from mol.experts import ExpertsLoRA, expert_tensors
from mol.inject import (_uncompiled, _under_any, adapter_layers, all_configs, all_or_nothing, check_model, inject,
                        fused_experts, injected_inside, match_parameters, name_matches, nested_configs,
                        require_adapter, tied_parameter_names, unwrapped_name)
from mol.layers import MoLLinear, is_conv1d, linear_forward_problem

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"  # older PEFT adapters
FORMAT = "mol-adapter"
FORMAT_VERSION = 2  # 2: "nested", the configs of inner injects an outer one took over (written only then)
PEFT_PREFIX = "base_model.model."

PathLike = Union[str, os.PathLike]


def _atomic_write_files(directory: Path, writes: list[tuple[str, Callable[[str], None]]]) -> None:
    """Write each ``(name, write)`` through ``write(tmp_path)`` into ``directory``, and only once every one is written
    rename them over their names: a save of several files (tensors, then config) that fails on a later one (disk
    full) leaves the previous save whole, not new tensors beside an old config, and no temp file behind."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(directory, e) from None
    # mkstemp makes the file 0600; give it the mode an open() would (0666 less the umask), so that a server
    # under another user can read the adapter as it can PEFT's
    umask = os.umask(0)
    os.umask(umask)
    tmps: list[str] = []
    try:
        for name, write in writes:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            except OSError as e:  # the OS's error names the temp file, which the user never asked for
                raise _unwritable(directory, e) from None
            os.close(fd)
            tmps.append(tmp)
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)
        for (name, _), tmp in zip(writes, tmps):  # renames within one directory: they do not run out of space
            os.replace(tmp, directory / name)
    except BaseException:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _unwritable(directory: Path, e: OSError) -> OSError:
    """``e`` (its type kept, for callers that catch it) saying which directory could not be written, and why."""
    blocker = next((p for p in (*reversed(directory.parents), directory) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a directory" if blocker else (e.strerror or str(e))
    return type(e)(e.errno, f"cannot write to {directory}: {why}; save to a directory you can write to. Nothing was "
                            "written")


def _directory(directory: Any, who: str, writing: bool = False) -> Path:
    """``directory`` as a Path, refused (before anything is written) where it cannot be one: not a path; to write
    to, an existing file (mkdir then failed with a bare FileExistsError); to read from, a file (the adapter's own
    file given for its directory)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{who}: directory must be a path (str or os.PathLike), got {type(directory).__name__}; "
                        f"call mol.{who}(model, directory)")
    out = Path(directory)
    if writing and out.exists() and not out.is_dir():
        raise ValueError(f"{who}: {out} is a file, and {who} writes a directory of files; give a directory path "
                         "(it is created if missing). Nothing was written")
    if not writing and out.is_file():  # else ".../adapter_config.json/adapter_config.json does not exist"
        raise ValueError(f"{who}: {out} is a file; give the directory that holds it ({out.parent})")
    return out


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # owner/name, or a canonical name (gpt2)


def _hub_repo_id(source: Any) -> Optional[str]:
    """``source`` as a Hugging Face Hub repo id (``owner/name``), or None where it is a local path: a Path object,
    a path that exists, or a string that is no ``owner/name`` (``./x``, ``/abs``, ``a/b/c``, ``dir/``)."""
    if not isinstance(source, str) or os.path.exists(source) or not _REPO_ID.fullmatch(source):
        return None
    return None if ".." in source or source.endswith((".json", ".safetensors", ".bin")) else source


def _adapter_source(source: Any, who: str, files: tuple[str, ...], revision: Optional[str],
                    subfolder: Optional[str], token: Union[str, bool, None], *, required: str = CONFIG_NAME,
                    what: str = "adapter") -> Path:
    """The local directory of an adapter given as a directory or as a Hub repo id (``owner/name``): the repo's
    ``files`` (under ``subfolder``) are downloaded into Hugging Face's cache, or read from it offline. A path that
    does not exist and reads as ``owner/name`` is a repo id, so the error for either says both. A repo without
    ``required`` is no ``what`` (from_bnb_4bit asks for a model's config.json)."""
    if subfolder is not None and (not isinstance(subfolder, str) or not subfolder.strip("/")
                                  or ".." in Path(subfolder).parts):
        raise ValueError(f"{who}: subfolder={subfolder!r} must name a folder inside the adapter's directory or repo, "
                         "e.g. subfolder='checkpoint-100'")
    sub = subfolder.strip("/") if subfolder else None
    repo_id = _hub_repo_id(source)
    if repo_id is None:
        if revision is not None or token is not None:
            raise ValueError(f"{who}: revision= and token= choose what to download from the Hugging Face Hub, but "
                             f"{str(source)!r} is a local path; leave them out, or give the repo id (owner/name)")
        directory = _directory(source, who)
        return directory / sub if sub else directory
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # transformers depends on it: only a broken environment lacks it
        raise ImportError(f"{who}: {source!r} is no local directory, and reading it as a Hugging Face Hub repo "
                          "needs the huggingface_hub package: pip install huggingface_hub") from None
    patterns = [f"{sub}/{f}" if sub else f for f in files]
    where = f"the Hugging Face Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token))
    except GatedRepoError:
        raise PermissionError(f"{who}: {where} is gated: accept its terms on the Hub, then log in (`hf auth login`) "
                              "or pass token=") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{who}: {where} has no such revision; give a branch, tag or commit the repo "
                                "has") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{who}: {source!r} is neither a local directory nor a repo on the Hugging Face Hub "
                                "that this token can see (a typo, or a private repo: log in with `hf auth login` or "
                                "pass token=)") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{who}: {source!r} is no local directory, and {where} is not in the local Hugging "
                                "Face cache and cannot be downloaded (offline: HF_HUB_OFFLINE=1, or no network); "
                                f"download it where there is a network (`hf download {repo_id}`) or give a local "
                                "directory") from None
    except HfHubHTTPError as e:
        raise OSError(f"{who}: downloading {where} failed ({e}); try again, or give a local directory") from None
    directory = snapshot / sub if sub else snapshot
    if not (directory / required).is_file():
        hint = "" if sub or what != "adapter" else " (is it in a subfolder? pass subfolder=)"
        raise FileNotFoundError(f"{who}: {where} holds no {'/'.join([*([sub] if sub else []), required])}, so it "
                                f"is no {what}{hint}")
    return directory


def _json_text(obj: Any, who: str) -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: the adapter config holds a value JSON cannot store ({e}); give config fields plain "
                        "Python values (str, int, float, list, dict; e.g. OmegaConf.to_container(...) for a "
                        "Hydra list, float(x) for a numpy number). Nothing was written") from None


def _text_writer(text: str) -> Callable[[str], None]:
    return lambda tmp: Path(tmp).write_text(text)


def _tensor_writer(tensors: dict[str, Tensor], metadata: dict[str, str]) -> Callable[[str], None]:
    # clone: safetensors refuses tensors that share storage (tied or sliced parameters).
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return lambda tmp: save_file(cpu, tmp, metadata=metadata)


def _not_a_directory(path: Path) -> None:
    if path.is_dir():  # else opening it says "Is a directory" or, worse, "does not exist"
        raise ValueError(f"{path} is a directory, not a file; the adapter directory is damaged: save it again")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    _not_a_directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt: save the adapter again") from None


def _read_peft_tensors(directory: Path) -> tuple[Path, dict[str, Tensor]]:
    """(the file read, a PEFT adapter's tensors): adapter_model.safetensors, or the adapter_model.bin that older PEFT
    versions and ``save_pretrained(safe_serialization=False)`` write (read with torch.load(weights_only=True):
    tensors only)."""
    if (directory / WEIGHTS_NAME).is_file() or not (directory / PEFT_PICKLE_NAME).is_file():
        return directory / WEIGHTS_NAME, _read_tensors(directory / WEIGHTS_NAME)
    path = directory / PEFT_PICKLE_NAME
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
        # torch's refusal of a non-tensor pickle is a paragraph advising weights_only=False (running the file's
        # code): keep only what it found
        text = str(e).split("WeightsUnpickler error:")[-1].strip()
        why = text.splitlines()[0].split(". ")[0][:160] if text else "cut short"
        raise ValueError(f"{path} is truncated, corrupt or holds more than tensors ({type(e).__name__}: {why}); "
                         "save or copy the adapter again") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise ValueError(f"{path} does not hold a name -> tensor mapping; it is not a PEFT adapter's weights")
    return path, tensors


def _read_tensors(path: Path) -> dict[str, Tensor]:
    _not_a_directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the adapter directory is incomplete: save it again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}); save or copy the adapter again") from None


def _base_model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or "")


def _fsdp_unwrapped(model: nn.Module) -> nn.Module:
    """The model a FullyShardedDataParallel root wraps, where it carries the adapter, else model: FSDP forwards
    attribute reads to it (``mol_configs`` included), so the wrapper passed for it looked like a model holding
    another adapter inside."""
    inner = model._modules.get("_fsdp_wrapped_module") if type(model).__name__ == "FullyShardedDataParallel" else None
    return inner if inner is not None and "mol_configs" in inner.__dict__ else model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable adapter tensors, keyed by the model's parameter names."""
    model = _fsdp_unwrapped(_uncompiled(model))
    require_adapter(model)
    params = {unwrapped_name(n): p for n, p in model.named_parameters()}  # FSDP may have nested modules since
    return {name: params[name] for name in model.mol_trainable}


def save_adapter(model: nn.Module, directory: PathLike, tensors: Optional[Mapping[str, Tensor]] = None) -> Path:
    """Write the adapter of ``model`` (configs + trainable tensors only) to ``directory``; with those of the
    injects on modules inside it that its inject took over (each config under its module's name). Returns the
    directory (created if missing). ``tensors``: the trainable tensors by name, where the model's own are not whole
    (FSDP's shards between steps: mol.train.fsdp.gather_trainable gathers them); exactly the adapter's names. An
    FSDP root saves the adapter of the model it wraps."""
    check_model(model, "save_adapter", then_directory=True)
    model = _fsdp_unwrapped(_uncompiled(model))
    require_adapter(model)
    if tensors is not None and set(tensors) != set(model.mol_trainable):
        missing, extra = sorted(set(model.mol_trainable) - set(tensors)), sorted(set(tensors) - set(model.mol_trainable))
        raise ValueError(f"save_adapter(tensors=...) must hold exactly the adapter's trainable tensors: "
                         f"{f'it lacks {missing[0]}' if missing else f'{extra[0]} is none of them'} "
                         f"({len(missing)} missing, {len(extra)} extra); nothing was written")
    out = _directory(directory, "save_adapter", writing=True)
    inner = injected_inside(model)
    if inner:  # injected after the model's own inject (on a module added since): its tensors are not in the list
        raise ValueError(f"{inner[0][0]!r} inside this model carries an adapter of its own, injected after this "
                         "model's (on a module added since), which save_adapter would leave out: inject its configs "
                         "on this model instead; nothing was written")
    for layer_name, layer in adapter_layers(model):
        if layer.merged:
            raise ValueError(f"{layer_name} is merged into its base weight; call mol.unmerge(model) before saving")
    nested = nested_configs(model)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if nested else 1,  # 1 where it holds nothing older versions miss
        "base_model_name_or_path": _base_model_name(model),
        "configs": [c.to_dict() for c in model.mol_configs],
    }
    if nested:
        config["nested"] = [{"module": path, "configs": [c.to_dict() for c in configs]} for path, configs in nested]
    # serialized before anything is written: a config JSON cannot hold fails here, not beside new tensors
    text = _json_text(config, "save_adapter")
    state = adapter_state_dict(model) if tensors is None else {n: tensors[n] for n in model.mol_trainable}
    # FSDP (use_orig_params) leaves each parameter a flat view of this process's shard between steps: a LoRA factor
    # that is not 3-D (experts, rows, columns) is one, and would be written as such
    sharded = [n for n, t in state.items() if getattr(t, "_fsdp_flattened", False) and t.dim() != 3
               and (".lora_A" in n or ".lora_B" in n)]
    if sharded:
        raise ValueError(f"{sharded[0]} is a {list(state[sharded[0]].shape)} shard of FSDP's, not the whole tensor: "
                         "save inside FullyShardedDataParallel.summon_full_params(fsdp_model), or pass "
                         "tensors=mol.train.fsdp.gather_trainable(fsdp_model, to_rank0=True); nothing was written")
    _atomic_write_files(out, [(WEIGHTS_NAME, _tensor_writer(state, {"format": FORMAT})),
                              (CONFIG_NAME, _text_writer(text))])
    return out


def read_adapter_configs(directory: PathLike) -> list:
    """The method configs saved in an adapter directory (of the module saved; see read_nested_configs)."""
    return _read_configs(directory)[0]


def read_nested_configs(directory: PathLike) -> list[tuple[str, list]]:
    """The configs of the inner injects the saved module's inject took over: (module name, configs), in order."""
    return _read_configs(directory)[1]


def _read_configs(directory: PathLike) -> tuple[list, list[tuple[str, list]]]:
    path = Path(directory) / CONFIG_NAME
    raw = _read_json(path, "point load_adapter at a directory written by mol.save_adapter")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        hint = " (it looks like a PEFT adapter: use mol.import_peft)" if isinstance(raw, dict) and "peft_type" in raw \
            else ""
        raise ValueError(f"{path} is not a mol adapter config{hint}")
    version = raw.get("format_version")
    if not is_whole(version) or version < 1:  # every mol wrote one from 1: a newer mol would not help
        raise ValueError(f"{path} has no valid format_version (got {version!r}; mol writes a whole number from 1); "
                         "the file is damaged: save the adapter again")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this mol reads version {FORMAT_VERSION} or "
                         "older: upgrade mol to load it")
    configs = raw.get("configs")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
        raise ValueError(f"{path}: 'configs' must be a non-empty list of method configs (JSON objects), got "
                         f"{json.dumps(configs)[:80]}; the file is damaged: save the adapter again")
    nested = raw.get("nested", [])

    def entry(e: Any) -> bool:
        return (isinstance(e, dict) and isinstance(e.get("module"), str) and bool(e["module"])
                and isinstance(e.get("configs"), list) and bool(e["configs"])
                and all(isinstance(c, dict) for c in e["configs"]))

    if not isinstance(nested, list) or not all(entry(e) for e in nested):
        raise ValueError(f"{path}: 'nested' must be a list of {{'module': name, 'configs': [...]}}, got "
                         f"{json.dumps(nested)[:80]}; the file is damaged: save the adapter again")
    return ([config_from_dict(c) for c in configs],
            [(e["module"], [config_from_dict(c) for c in e["configs"]]) for e in nested])


def _check_and_copy(model: nn.Module, tensors: dict[str, Tensor], expected: dict[str, Tensor], source: Path) -> None:
    """Validate every key and shape before touching the model, then copy: a bad file changes nothing."""
    for name, param in expected.items():
        if name not in tensors:
            raise ValueError(f"{source} lacks tensor {name!r} that the model's adapter needs; the adapter was saved "
                             f"from a different model or config: load it into the model it was trained on")
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the model expects "
                             f"{tuple(param.shape)}; the adapter does not fit this model (different size or rank)")
        # another float dtype is a precision choice, cast below; integers or booleans are no adapter's weights,
        # and copy_ would cast them without a word
        if param.is_floating_point() and not tensors[name].is_floating_point():
            raise ValueError(f"{source}: tensor {name!r} is {str(tensors[name].dtype).removeprefix('torch.')}, not a "
                             "floating-point type, so it holds no trained weights: the file is damaged: save or copy "
                             "the adapter again")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{source} holds tensor {extra[0]!r}, which this model's adapter does not have; the adapter "
                         f"targets other modules: load it into the model it was trained on")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name].to(param.dtype))


def load_adapter(model: nn.Module, directory: PathLike, quantize_base: bool = True, *, revision: Optional[str] = None,
                 subfolder: Optional[str] = None, token: Union[str, bool, None] = None) -> nn.Module:
    """Load an adapter saved with ``save_adapter`` into ``model`` and return it; injects it first if ``model`` has
    no adapter yet (a model that carries one must carry the same configs). A file that does not fit changes nothing.

    ``directory`` is a local directory or a Hugging Face Hub repo id (``owner/name``, as ``push_to_hub`` writes):
    its two adapter files, at ``revision`` (branch, tag or commit) and under ``subfolder``, are downloaded into
    Hugging Face's cache (read from it offline); ``token`` for private or gated repos.

    ``quantize_base=False`` puts a QLoRA / QLoRA-MoL adapter (trained with ``quantize_base="nf4"``) on ``model``'s
    own full-precision linears instead of quantizing them first, as PEFT users load a QLoRA adapter onto a bf16
    base: e.g. to ``merge_and_unload`` it into a bf16 model. The adapter then acts on the original weights rather
    than on their NF4 rounding, which it was trained against (a small, usual difference)."""
    check_model(model, "load_adapter", then_directory=True)
    given, model = model, _uncompiled(model)
    directory = _adapter_source(directory, "load_adapter", (CONFIG_NAME, WEIGHTS_NAME), revision, subfolder, token)
    configs, nested = _read_configs(directory)
    if not quantize_base:
        configs = without_quantize_base(configs)
        nested = [(path, without_quantize_base(c)) for path, c in nested]
    tensors = _read_tensors(directory / WEIGHTS_NAME)

    def described(own: list, inner: list) -> list:
        return [*([path, [c.adapter_dict() for c in cs]] for path, cs in inner), [c.adapter_dict() for c in own]]

    if getattr(model, "mol_configs", None):
        have, want = described(model.mol_configs, nested_configs(model)), described(configs, nested)
        if have != want:
            raise ValueError(f"the model already carries a different adapter ({have}) than {directory} "
                             f"({want}); load into a fresh base model")
        for layer_name, layer in adapter_layers(model):
            if layer.merged:  # new tensors under a merged delta: unmerging would subtract the wrong one
                raise ValueError(f"{layer_name} is merged into its base weight; call mol.unmerge(model) before "
                                 "loading another adapter into it")
    with all_or_nothing(model):  # a file that does not fit leaves a fresh model fresh
        if not getattr(model, "mol_configs", None):
            for path, inner in nested:  # injected first, in their order: the last inject takes them over
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"{directory} holds an adapter for the module {path!r} inside the model it was "
                                     f"saved from, which {type(model).__name__} lacks: load it into a model built "
                                     "as that one was") from None
                inject(module, inner)
            inject(model, configs)
        _check_and_copy(model, tensors, adapter_state_dict(model), directory / WEIGHTS_NAME)
    return given


def _mergeable_layers(model: nn.Module) -> list:
    require_adapter(model)
    layers = list(adapter_layers(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {id(params[first]): names for first, names in tied_parameter_names(model).items()}
    for name, layer in layers:
        reason = layer.merge_blocker()
        weight = getattr(getattr(layer, "base_layer", None), "weight", None)
        if not reason and id(weight) in tied:
            # the delta written into a shared tensor changes every module that reads it (a tied head's input
            # embedding), not only this layer
            others = [n for n in tied[id(weight)] if not n.startswith(name + ".")]
            reason = (f"its base weight is tied to {others} (one tensor), which a merge would change too; untie it "
                      "first (e.g. model.config.tie_word_embeddings = False; model.lm_head.base_layer.weight = "
                      "nn.Parameter(model.lm_head.base_layer.weight.detach().clone())) or keep the adapter unmerged")
        if reason:
            raise ValueError(f"cannot merge {name}: {reason}")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter delta into its frozen base weight (checked for all layers before any changes); returns
    ``model``."""
    check_model(model, "merge")
    for _, layer in _mergeable_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` (subtract each merged delta again); returns ``model``."""
    check_model(model, "unmerge")
    for _, layer in _mergeable_layers(model):
        layer.unmerge()
    return model


def _remove_hooks(module: nn.Module, owner: Any) -> None:
    """Remove the forward (pre-)hooks of ``module`` that are ``owner``, a bound method of it, or a partial of one
    (prompt tuning's encoder hook). inject keeps no handles (a deep-copied model's hooks are re-bound to the copy,
    which a handle would not follow), so they are found by owner, and removed from every table a hook id appears
    in, as a RemovableHandle would."""
    tables = [getattr(module, t, None) for t in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                                                "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")]
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key, hook in list(hooks.items()):
            if owner in (hook, getattr(hook, "__self__", None), getattr(getattr(hook, "func", None), "__self__", None)):
                for table in tables:
                    if table is not None:
                        table.pop(key, None)


def _unload(model: nn.Module, merge_first: bool) -> nn.Module:
    check_model(model, "merge_and_unload" if merge_first else "unload")
    require_adapter(model)
    from mol.methods.adapters import BottleneckAdapter
    from mol.methods.prefix import _VirtualTokens

    layers = list(adapter_layers(model))
    methods = [c.method for c in all_configs(model)]
    if merge_first:
        _mergeable_layers(model)  # every layer checked before any changes
    elif "bitfit" in methods:
        raise ValueError("BitFit trains the base's own biases in place and keeps no copy of the originals, so it "
                         "cannot be unloaded; use mol.merge_and_unload(model), which keeps the trained biases")
    # the outermost adapter of a name first: a wrapper's base_layer may itself be an adapter (MoL around IA³)
    while layers:
        name, layer = layers[0]
        if isinstance(layer, BottleneckAdapter):
            parent = model.get_submodule(name.rpartition(".")[0])
            _remove_hooks(parent, layer)
            delattr(parent, name.rpartition(".")[2])
        elif isinstance(layer, _VirtualTokens):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            for module in owner.modules():  # the model's hooks, and prompt tuning's on an encoder-decoder's encoder
                _remove_hooks(module, layer)
            delattr(owner, name.rpartition(".")[2])
        else:  # a wrapper: the frozen layer it holds takes its place
            if merge_first:
                layer.merge()
            elif layer.merged:
                layer.unmerge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
        layers = list(adapter_layers(model))
    # what inject put on the model itself: the routers' call hooks and the router-loss hook
    from mol.calls import _RoutingCallHooks, unbind_checkpoints
    from mol.inject import _AuxLossInOutput, _InputsRequireGrad

    unbind_checkpoints(model)

    for module in model.modules():  # the input-grad hooks sit on the embeddings, the others on the model
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in list(hooks.values()):
                owner = getattr(hook, "__self__", hook)
                if isinstance(owner, (_RoutingCallHooks, _AuxLossInOutput, _InputsRequireGrad)):
                    _remove_hooks(module, owner)
    for module in model.modules():  # the routing context sits on every model its hooks are on (routing_context)
        if "mol_routing_context" in module.__dict__:
            delattr(module, "mol_routing_context")
    for module in model.modules():  # an inner inject's (taken over), and the marks of the modules inside
        for attr in ("mol_aux_loss_in_output", "mol_adapters_disabled", "mol_inside_inject"):
            module.__dict__.pop(attr, None)
    for attr in ("mol_configs", "mol_trainable", "mol_nested"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "bitfit" in methods:
        from mol.methods.bitfit import declare_added_biases

        uncovered = declare_added_biases(model)
        if uncovered:
            warnings.warn(f"merge_and_unload: BitFit gave {len(uncovered)} layers a bias their model config does not "
                          f"declare (e.g. {uncovered[0]!r}); the returned model computes with them, but a "
                          "save_pretrained checkpoint of it reloads without them in transformers. Save the model "
                          "with torch.save / safetensors, or keep the adapter (mol.save_adapter) instead")
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and remove mol from the model: the plain model (its own module
    types and parameter names, e.g. for ``save_pretrained`` and serving), as PEFT's ``merge_and_unload``. Only
    mergeable adapters (LoRA, IA³ on a float base; BitFit's biases are kept as they are); checked for every layer
    before anything changes."""
    return _unload(model, merge_first=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and mol's hooks, leaving the base model as it was before ``inject`` (merged layers
    are unmerged first), as PEFT's ``unload``. BitFit, which trains the base's biases in place, cannot be."""
    return _unload(model, merge_first=False)


# ---- Hugging Face PEFT interop (LoRA) ---------------------------------------------------------------------


def as_lora_config(config: Any) -> Optional[LoRAConfig]:
    """``config`` as the LoRAConfig PEFT's format holds: itself, or a one-expert MoLConfig's LoRA; None for any
    other method (a token-routed MoL has no PEFT equivalent)."""
    if isinstance(config, LoRAConfig):
        return config
    if isinstance(config, MoLConfig) and config.num_experts == 1:
        c = config
        return LoRAConfig(rank=c.rank, alpha=c.alpha, target_modules=c.target_modules, dropout=c.dropout,
                          use_rslora=c.use_rslora, init=c.init, adapter_dtype=c.adapter_dtype,
                          rank_pattern=dict(c.rank_pattern), alpha_pattern=dict(c.alpha_pattern),
                          modules_to_save=list(c.modules_to_save))
    return None


def _single_lora_config(model: nn.Module) -> LoRAConfig:
    require_adapter(model)
    configs = all_configs(model)
    if nested_configs(model):
        raise ValueError(f"PEFT's LoRA format holds one LoRA adapter of one model; this one carries adapters "
                         f"injected on {[p for p, _ in nested_configs(model)]} inside it and its own: export each "
                         "model's LoRA from an inject of its own, or use mol.save_adapter")
    lora = as_lora_config(configs[0]) if len(configs) == 1 else None
    if lora is not None:
        return lora
    why = ("several adapters, from one inject call each or one call with a list of configs" if len(configs) > 1
           else "a token-routed MoL, which has no PEFT equivalent" if isinstance(configs[0], MoLConfig)
           else f"{configs[0].method} is not LoRA")
    raise ValueError(f"PEFT's LoRA format holds one LoRA adapter; this model carries {[c.method for c in configs]} "
                     f"({why}): export a model with one LoRAConfig adapter, or use mol.save_adapter")


def _peft_expert_paths(name: str, layer: ExpertsLoRA) -> dict[str, str]:
    """Where PEFT keeps the LoRA of each expert tensor that ``layer`` (the ExpertsLoRA at ``name``) adapts: tensor ->
    module path. PEFT's target_parameters put one lora.ParamWrapper around the module per tensor, each around the
    one before, in the order its _inject_parameters meets them (the module's named_parameters(recurse=False)): the
    first tensor met ends deepest, under one ".base_layer" per tensor met after it; a lone tensor has none."""
    order = [t for t in expert_tensors(layer.base_layer) if t in layer.lora_A]
    return {t: name + ".base_layer" * (len(order) - 1 - i) for i, t in enumerate(order)}


def _experts_to_peft(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """ExpertsLoRA's A (experts, r, in) and B (experts, out, r) as PEFT's ParamWrapper keeps them: lora_A.weight
    (experts * r, in), expert-major, and lora_B.weight (out, r * experts), expert-minor (its get_delta_weight reads
    them back as A.reshape(experts, r, in) and B.reshape(out, r, experts))."""
    experts, out, rank = b.shape
    return a.reshape(experts * rank, a.shape[-1]), b.permute(1, 2, 0).reshape(out, rank * experts)


def _experts_from_peft(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """The tensors of every ExpertsLoRA in ``model``, taken out of ``tensors`` (a PEFT adapter's, keyed without
    PEFT_PREFIX) and converted to mol's layout, under the model's parameter names; each checked for its shape first
    (a reshape would take a wrong one without a word when the sizes multiply alike)."""
    out = {}
    for name, layer in adapter_layers(model):
        if not isinstance(layer, ExpertsLoRA):
            continue
        for tensor, path in _peft_expert_paths(name, layer).items():
            experts, in_features, out_features = layer.shape(tensor)
            rank = layer.rank[tensor]
            pair = []
            for part, shape in (("lora_A", (rank * experts, in_features)), ("lora_B", (out_features, rank * experts))):
                key = f"{path}.{part}.weight"
                if key not in tensors:
                    raise ValueError(f"{source} lacks tensor {PEFT_PREFIX + key!r}, PEFT's {part} of {name}.{tensor}, "
                                     "which the adapter's target_parameters select in this model; the adapter was "
                                     "saved from a different model or config: import it into the model it was "
                                     "trained on")
                value = tensors.pop(key)
                if tuple(value.shape) != shape:
                    raise ValueError(f"{source}: tensor {PEFT_PREFIX + key!r} has shape {tuple(value.shape)}, but "
                                     f"{name}.{tensor} of this model ({experts} experts, {in_features} in, "
                                     f"{out_features} out, rank {rank}) needs {shape} (PEFT keeps lora_A as (rank * "
                                     "experts, in), lora_B as (out, rank * experts)); the adapter does not fit this "
                                     "model (other sizes, number of experts or rank): import it into the model it "
                                     "was trained on")
                pair.append(value)
            a, b = pair
            out[f"{name}.lora_A.{tensor}"] = a.reshape(experts, rank, in_features)
            out[f"{name}.lora_B.{tensor}"] = b.reshape(out_features, rank, experts).permute(2, 0, 1)
    return out


def export_peft(model: nn.Module, directory: PathLike) -> Path:
    """Write a LoRA adapter in PEFT's own format (adapter_config.json + adapter_model.safetensors) to
    ``directory`` and return it; a routed MoL adapter or a mix of methods is refused (PEFT has no such format).
    LoRA on fused expert tensors (``target_parameters``) goes to PEFT's ``target_parameters``, as its nested
    ParamWrappers keep it; PEFT refuses dropout there, so such an adapter is written with ``lora_dropout=0.0`` (with
    a warning where it trained with dropout: the same at inference, none in further training)."""
    check_model(model, "export_peft", then_directory=True)
    model = _uncompiled(model)  # else every PEFT key would start with its "_orig_mod."
    cfg = _single_lora_config(model)
    out = _directory(directory, "export_peft", writing=True)
    task = _peft_task_type(model)
    heads = [n for n, _ in adapter_layers(model)
             if task == "SEQ_CLS" and any(n == h or n.startswith(h + ".") for h in _PEFT_SEQ_CLS_HEADS)]
    if heads:  # PEFT would wrap the head whole and fail on its LoRA keys: refuse before writing a broken directory
        raise ValueError(f"export_peft: LoRA on the classification head {heads[0]!r} cannot be read by PEFT, which "
                         f"trains a SEQ_CLS model's head whole (modules_to_save); adapt the head with "
                         f"modules_to_save=[{heads[0].split('.')[0]!r}] and target_modules without it, or keep this "
                         "adapter in "
                         "mol's format (mol.save_adapter)")
    if task == "SEQ_CLS" and not any(n.partition(".")[0] in _PEFT_SEQ_CLS_HEADS for n in model.mol_trainable
                                     if ".lora_A" not in n and ".lora_B" not in n):
        # PEFT's SEQ_CLS class wraps the head whole and then requires its weights in the file (KeyError on load); an
        # adapter that leaves the head frozen has none: load it as a plain PeftModel, the head the base model's own
        task = None
    rewritten = _peft_rewritten_linears(model)
    if rewritten:
        raise ValueError(f"export_peft: LoRA on {rewritten[0]!r} ({len(rewritten)} such layers) cannot be read by "
                         f"PEFT: on a {model.config.model_type} model PEFT's loader takes every target_modules entry "
                         f"ending in {rewritten[0].rpartition('.')[2]!r} for the expert projection of a transformers "
                         "4 adapter and moves it to target_parameters, so the loaded adapter would put no LoRA on "
                         "this layer (a dense MLP or shared expert) and compute something else. Leave such layers out "
                         "of target_modules (e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'], and the "
                         "experts through target_parameters), or keep this adapter in mol's format (mol.save_adapter)")
    tensors: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, MoLLinear):
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[0]
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[0]
        elif isinstance(layer, ExpertsLoRA):
            for tensor, path in _peft_expert_paths(name, layer).items():
                a, b = _experts_to_peft(layer.lora_A[tensor], layer.lora_B[tensor])
                tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
                tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    experts = [name for name, layer in adapter_layers(model) if isinstance(layer, ExpertsLoRA)]
    params = {unwrapped_name(n): p for n, p in model.named_parameters()}
    aliases = tied_parameter_names(model)
    tied_modules: list[str] = []
    for name in model.mol_trainable:
        if ".lora_A" not in name and ".lora_B" not in name:  # modules_to_save tensors keep their names
            # A tied tensor (an input embedding shared with the head) trains as one here. PEFT makes an untied
            # copy of each module it saves, so it needs the tensor under every name and the modules tied again
            # (ensure_weight_tying) to compute what this model computes.
            for alias in aliases.get(name, [name]):
                tensors[f"{PEFT_PREFIX}{alias}"] = params[name]
                module = alias.rpartition(".")[0]
                if len(aliases.get(name, ())) > 1 and not name_matches(module, cfg.modules_to_save):
                    tied_modules.append(module)
    target = cfg.target_modules
    if isinstance(target, str) and (experts or _peft_all_linear_takes_more(model)):
        # PEFT would expand "all-linear" over layers mol left out (fused experts and their routers through
        # target_parameters, a router that subclasses nn.Linear): it then loads adapters this one never trained, or
        # fails at the first forward. And on the mixture-of-experts models whose layout transformers 5 changed
        # (Mixtral, Qwen3-MoE, ...) PEFT's loader rewrites any string target to the bare names of the layers it
        # matches, so a regex for one layer takes that name in every block. The layers mol adapted are written by
        # name instead.
        target = [n for n, layer in adapter_layers(model) if isinstance(layer, MoLLinear)]
    dropout = cfg.dropout
    if experts and dropout:
        warnings.warn(f"export_peft: this adapter trains with dropout={dropout}, which PEFT refuses on "
                      "target_parameters (its LoRA on expert tensors adds B A to the weight, which leaves no input to "
                      "drop): the exported config says lora_dropout=0.0. Dropout acts only in training, so the "
                      "adapter computes the same in PEFT; training it further there runs without dropout, on the "
                      "linear layers too", UserWarning, stacklevel=2)
        dropout = 0.0
    conv1d = {is_conv1d(layer.base_layer) for _, layer in adapter_layers(model) if isinstance(layer, MoLLinear)}
    if len(conv1d) > 1:
        raise ValueError("PEFT's LoRA format has one fan_in_fan_out for all layers, and this adapter wraps both "
                         "nn.Linear and Conv1D layers: export the two kinds as separate adapters")
    peft_config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": _base_model_name(model) or None,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": dropout,
        "target_modules": target if isinstance(target, str) else sorted(target),
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": True if cfg.init == "kaiming" else cfg.init,
        "bias": "none",
        "fan_in_fan_out": conv1d == {True},  # PEFT's flag for Conv1D bases (GPT-2), whose weight is (in, out)
        "use_dora": False,
        "modules_to_save": list(cfg.modules_to_save) + list(dict.fromkeys(tied_modules)) or None,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "inference_mode": True,
    }
    if experts:
        parameters = list(cfg.target_parameters)
        # inject kept them off the modules_to_save; PEFT matches them over those too, wraps their tensors and then
        # fails to save such a module whole: name the adapted tensors instead
        if any(_under_any(n.rpartition(".")[0], cfg.modules_to_save) and name_matches(n, parameters)
               for n in (unwrapped_name(n) for n, _ in model.named_parameters())):
            parameters = [f"{name}.{t}" for name, layer in adapter_layers(model) if isinstance(layer, ExpertsLoRA)
                          for t in layer.lora_A]
        peft_config["target_parameters"] = parameters
    if any(len(aliases.get(n, ())) > 1 for n in model.mol_trainable):
        peft_config["ensure_weight_tying"] = True
    text = _json_text(peft_config, "export_peft")
    _atomic_write_files(out, [(WEIGHTS_NAME, _tensor_writer(tensors, {"format": "pt"})),
                              (CONFIG_NAME, _text_writer(text))])
    return out


def push_to_hub(model: nn.Module, repo_id: str, *, peft_format: bool = False, private: Optional[bool] = None,
                token: Union[str, bool, None] = None, revision: Optional[str] = None,
                commit_message: Optional[str] = None) -> Any:
    """Upload the adapter of ``model`` to the Hugging Face Hub repo ``repo_id`` (``owner/name``; created if missing,
    ``private`` then) in one commit, and return huggingface_hub's CommitInfo (``.commit_url``). It holds what
    ``save_adapter`` writes (``peft_format=True``: what ``export_peft`` writes, for a LoRA adapter that PEFT users
    then load with ``PeftModel.from_pretrained``) and, where the repo has none yet, a README model card saying how
    to load it. Load it back with ``mol.load_adapter(base_model, repo_id)`` (or ``mol.import_peft``). The adapter is
    written to a temporary directory first, so an adapter that cannot be saved uploads nothing."""
    check_model(model, "push_to_hub")
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"push_to_hub: repo_id must be a Hugging Face Hub repo id 'owner/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="mol-push-") as tmp:
        (export_peft if peft_format else save_adapter)(model, tmp)
        return push_folder(Path(tmp), repo_id, _model_card(model, repo_id, peft_format), private=private,
                           token=token, revision=revision,
                           commit_message=commit_message or f"Upload {'PEFT LoRA' if peft_format else 'mol'} adapter")


def push_folder(folder: Path, repo_id: str, card: str, *, private: Optional[bool] = None,
                token: Union[str, bool, None] = None, revision: Optional[str] = None,
                commit_message: str = "Upload mol adapter") -> Any:
    """Upload the files of ``folder`` (an adapter directory) to ``repo_id`` in one commit, creating the repo (and
    the branch ``revision``) where missing, with ``card`` as README.md where the repo has none (a card its owner
    wrote stays theirs). Returns huggingface_hub's CommitInfo."""
    from huggingface_hub import CommitOperationAdd, HfApi  # transformers' own dependency; imported where needed

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    if not api.file_exists(repo_id, "README.md", revision=revision):
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)


def _model_card(model: nn.Module, repo_id: str, peft_format: bool) -> str:
    """A short README: the Hub's metadata (base model, library, tags) and the lines that load the adapter."""
    base = _base_model_name(model)
    methods = sorted({c.method for c in all_configs(model)})
    if peft_format:
        load = ("from peft import PeftModel\n"
                f"model = PeftModel.from_pretrained(base_model, {repo_id!r})")
    else:
        load = f"import mol\nmodel = mol.load_adapter(base_model, {repo_id!r})"
    header = ["---", f"library_name: {'peft' if peft_format else 'mol'}"]
    # the Hub refuses a commit whose card's base_model is no model id: a local folder (relative ones too) or a
    # name YAML cannot hold as written is left out of the metadata
    if base and not os.path.exists(base) and ".." not in base and _MODEL_ID.fullmatch(base):
        header.append(f"base_model: {base}")
    header += ["tags:", *(f"- {t}" for t in dict.fromkeys(["mol", *methods])), "---", ""]
    base_line = (f"base_model = AutoModel.from_pretrained({base!r})  # the model class it was trained with"
                 if base else "base_model = ...  # the model the adapter was trained on")
    return "\n".join(header + [
        f"# {repo_id.split('/')[-1]}", "",
        f"An adapter ({', '.join(methods)}) trained with `mol` (Mixture-of-LoRA fine-tuning)"
        + (f" on `{base}`." if base else "."), "",
        "```python", "from transformers import AutoModel", base_line, load, "```", ""])


# The mixture-of-experts layouts whose transformers 4 adapters PEFT converts when it loads one into a transformers 5
# model (peft.utils.transformers_weight_conversion._MOE_TARGET_MODULE_MAPPING): a target_modules entry ending in one of
# these names is moved to target_parameters, whatever layer it named
_PEFT_MOE_REWRITES = {"mixtral": ("gate", "w1", "w2", "w3"), "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj")}


def _peft_rewritten_linears(model: nn.Module) -> list[str]:
    """The linear layers with LoRA that PEFT's loader would take for transformers 4 expert projections in ``model``
    (see _PEFT_MOE_REWRITES): on Qwen3-MoE, DeepSeek-V3, Mixtral, ... every layer named ``*.gate_proj``, ``*.up_proj``,
    ``*.down_proj`` (or w1 / w2 / w3) that is not an expert, e.g. a dense MLP layer's or a shared expert's."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # transformers 4: no fused experts, nothing to convert
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    leaves = _PEFT_MOE_REWRITES.get(layout, ())
    return [n for n, layer in adapter_layers(model) if isinstance(layer, MoLLinear)
            and n.rpartition(".")[2] in leaves]


def _peft_all_linear_takes_more(model: nn.Module) -> bool:
    """Whether ``model`` holds layers that mol's "all-linear" leaves out and PEFT's may take: modules with 3-D
    expert tensors (and the routers beside them) or nn.Linear subclasses that are no linear map (Llama 4's router)."""
    adapted = {n for n, _ in adapter_layers(model)}
    modules = [(n, m) for n, m in model.named_modules()  # an adapter's own lora_A (experts, rank, in) is no expert
               if n and not any(n == a or n.startswith(a + ".") for a in adapted)]
    return bool(fused_experts(modules)) or any(linear_forward_problem(m, False) for _, m in modules
                                               if isinstance(m, nn.Linear))


_PEFT_SEQ_CLS_HEADS = ("classifier", "score")  # the heads PEFT's PeftModelForSequenceClassification trains whole


def _peft_task_type(model: nn.Module) -> Any:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


# (fan_in_fan_out only says the base weights are (in, out), as Conv1D's are: each MoLLinear knows its base's kind,
# and PEFT itself corrects the flag to the layer it meets, so any value imports)
_UNSUPPORTED_PEFT = {"use_dora": False, "bias": "none"}
# PEFT options that change what a LoRA layer computes, which mol does not do: set to anything but their off value,
# the import stops and names them (init-only options such as eva_config change nothing to load; the inits that
# rewrite the base weight are refused below)
_PEFT_OFF_ONLY = ("lora_bias", "trainable_token_indices", "layer_replication", "alora_invocation_tokens",
                  "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config")
# PEFT inits (besides "pissa*") that replace the base weight by its residual: the adapter only fits that base
_PEFT_BASE_REWRITING_INITS = ("olora", "corda", "loftq")
# PEFT options that only choose which layers carry the adapter: the adapter's own tensors name those layers, and
# the import adapts exactly them
_PEFT_LAYER_CHOICE = ("exclude_modules", "layers_to_transform", "layers_pattern")


def _peft_lora_fields(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The LoRA fields of a PEFT adapter config, each checked for its type: a bare KeyError / TypeError named none of
    them, and int() / bool() misread others without a word (r=2.7 as rank 2, use_rslora="false" as True)."""
    def bad(key: str, kind: str, value: Any, entry: str = "") -> ValueError:
        return ValueError(f"{path}: PEFT config field {key!r}{entry} must be {kind}, got {repr(value)[:80]}; the file "
                          "is damaged or hand-edited: fix the field, or save the adapter again with PEFT's "
                          "save_pretrained")

    parameters = raw.get("target_parameters") or []
    if not isinstance(parameters, list) or not all(isinstance(t, str) and t for t in parameters):
        raise bad("target_parameters", "a list of tensor names", parameters)
    for key in ("r", "lora_alpha", *(() if parameters else ("target_modules",))):
        if key not in raw:
            raise ValueError(f"{path}: PEFT config lacks {key!r}, which PEFT's save_pretrained always writes; the file "
                             "is damaged or hand-written: add it, or save the adapter again with save_pretrained")
    out = {key: raw.get(key, default) for key, default in (
        ("r", None), ("lora_alpha", None), ("target_modules", None), ("lora_dropout", 0.0), ("use_rslora", False),
        ("rank_pattern", None), ("alpha_pattern", None), ("modules_to_save", None))}
    if not is_whole(out["r"]) or out["r"] <= 0:
        raise bad("r", "a positive integer", out["r"])
    alpha, dropout = out["lora_alpha"], out["lora_dropout"]
    if not (is_number(alpha) and 0 < alpha < math.inf):  # a NaN compares false: refused too
        raise bad("lora_alpha", "a number > 0", alpha)
    if not (is_number(dropout) and 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)", dropout)
    targets = out["target_modules"]
    if parameters and not targets:  # the expert tensors alone (PEFT's target_modules=None or [])
        targets = out["target_modules"] = []
    elif not ((isinstance(targets, str) and targets)
              or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))):
        raise bad("target_modules", "a list of module names or one regex string", targets)
    out["target_parameters"] = list(parameters)
    if not isinstance(out["use_rslora"], bool):
        raise bad("use_rslora", "true or false", out["use_rslora"])
    for key, what, ok, kind in (("rank_pattern", "rank", lambda v: is_whole(v) and v > 0, "a positive integer"),
                                ("alpha_pattern", "alpha", lambda v: is_number(v) and 0 < v < math.inf,
                                 "a number > 0")):
        patterns = out[key] or {}
        if not isinstance(patterns, dict):
            raise bad(key, f"a JSON object (layer pattern -> {what})", patterns)
        for pattern, value in patterns.items():
            if not ok(value):
                raise bad(key, kind, value, f"[{pattern!r}]")
        out[key] = dict(patterns)
    to_save = out["modules_to_save"] or []
    if not isinstance(to_save, list) or not all(isinstance(m, str) for m in to_save):
        raise bad("modules_to_save", "a list of module names", to_save)  # a string would be read letter by letter
    out["modules_to_save"] = to_save
    return out


def import_peft(model: nn.Module, directory: PathLike, *, revision: Optional[str] = None,
                subfolder: Optional[str] = None, token: Union[str, bool, None] = None) -> nn.Module:
    """Inject and load a PEFT LoRA adapter into ``model`` (a plain Hugging Face model without an adapter); returns
    ``model``. ``directory`` is a local directory or a Hub repo id (``owner/name``; ``revision``, ``subfolder``,
    ``token`` as in ``load_adapter``), as PEFT's ``PeftModel.from_pretrained`` takes. LoRA on fused expert tensors
    (PEFT's ``target_parameters``) becomes mol.ExpertsLoRA; options mol does not compute (DoRA, LoRA biases,
    base-rewriting inits, LoRA on a router's weight) are refused."""
    check_model(model, "import_peft", then_directory=True)
    given, model = model, _uncompiled(model)
    directory = _adapter_source(directory, "import_peft", (CONFIG_NAME, WEIGHTS_NAME, PEFT_PICKLE_NAME), revision,
                                subfolder, token)
    raw = _read_json(directory / CONFIG_NAME, "point import_peft at a directory saved by PEFT's save_pretrained")
    if not isinstance(raw, dict):
        raise ValueError(f"{directory / CONFIG_NAME} holds a JSON {type(raw).__name__}, not a PEFT adapter config "
                         "(an object); point import_peft at a directory saved by PEFT's save_pretrained")
    if raw.get("format") == FORMAT:
        raise ValueError(f"{directory} holds a mol adapter (written by mol.save_adapter), not a PEFT one: load it with "
                         "mol.load_adapter(model, directory)")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a PEFT {raw.get('peft_type')!r} adapter; import_peft reads LORA only")
    for key, ok in _UNSUPPORTED_PEFT.items():
        if raw.get(key, ok) != ok:
            raise ValueError(f"{directory}: PEFT option {key}={raw[key]!r} is not supported by mol (only {ok!r})")
    for key in _PEFT_OFF_ONLY:
        if raw.get(key):
            raise ValueError(f"{directory}: PEFT option {key}={raw[key]!r} changes what a LoRA layer computes, which "
                             "mol does not do; import an adapter trained without it")
    fields = _peft_lora_fields(raw, directory / CONFIG_NAME)
    if getattr(model, "mol_configs", None):  # before target_parameters are matched against its wrapped tensors
        raise ValueError("import_peft needs a model without an adapter; load into a fresh base model")
    experts = _peft_target_parameters(model, fields["target_parameters"], directory)
    source, tensors = _read_peft_tensors(directory)
    targets = fields["target_modules"]
    if any(raw.get(key) for key in _PEFT_LAYER_CHOICE):
        suffix = ".lora_A.weight"
        targets = sorted(k for k in (k.removeprefix(PEFT_PREFIX).removesuffix(suffix) for k in tensors
                                     if k.endswith(suffix))
                         if k.replace(".base_layer", "") not in experts)  # an expert tensor's (nested) wrapper
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and (init.startswith("pissa") or init in _PEFT_BASE_REWRITING_INITS):
        raise ValueError(f"{directory}: PEFT's init_lora_weights={init!r} rewrites the base weights (W - scale * B0 "
                         "A0) when it builds the adapter, so these tensors on the original base compute something "
                         "else; have PEFT convert it to plain LoRA first: peft_model.save_pretrained(out_dir, "
                         "path_initial_model_for_weight_conversion=<the adapter as initialised>), then import out_dir")
    # PEFT's task types append their usual head names ("classifier", "score") whether or not the model has
    # them, and PEFT ignores the ones that match nothing; do the same, keeping the saved order.
    names = [n for n, _ in model.named_modules()]
    to_save = [m for m in dict.fromkeys(fields["modules_to_save"]) if any(name_matches(n, [m]) for n in names)]
    cfg = LoRAConfig(
        rank=fields["r"], alpha=float(fields["lora_alpha"]), target_modules=targets,
        dropout=float(fields["lora_dropout"]), use_rslora=fields["use_rslora"],
        init="gaussian" if init == "gaussian" else "kaiming", modules_to_save=to_save,
        rank_pattern=fields["rank_pattern"], alpha_pattern={k: float(v) for k, v in fields["alpha_pattern"].items()},
        target_parameters=fields["target_parameters"],
    )
    with all_or_nothing(model):  # an adapter that does not fit leaves the model without one
        inject(model, cfg)
        unprefixed = {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
        converted = _experts_from_peft(model, unprefixed, source)  # takes the experts' tensors out of unprefixed
        renamed: dict[str, Tensor] = {}
        for name, value in unprefixed.items():
            for part in ("lora_A", "lora_B"):
                suffix = f".{part}.weight"
                if name.endswith(suffix):
                    name = f"{name[: -len(suffix)]}.{part}"
                    value = value[None]  # PEFT's (r, in) / (out, r) -> our one-expert (1, r, in) / (1, out, r)
            renamed[name] = value
        renamed = _tied_as_one(model, renamed, directory, bool(raw.get("ensure_weight_tying")))
        _check_and_copy(model, {**renamed, **converted}, adapter_state_dict(model), source)
    return given


def _peft_target_parameters(model: nn.Module, patterns: list[str], directory: Path) -> dict[str, list[str]]:
    """The tensors a PEFT adapter's ``target_parameters`` select in ``model``, module -> [tensor], matched as inject
    matches them (a full name or a dotted suffix, as PEFT does); refused, before anything changes, where one selects
    nothing (the adapter was trained on another model) or a tensor mol cannot adapt (a router's weight, which PEFT's
    target_modules='all-linear' adds itself on Mixtral and Qwen3-MoE)."""
    if not patterns:
        return {}
    try:
        return match_parameters(model, patterns)
    except ValueError as e:
        raise ValueError(f"{directory}: PEFT put LoRA on parameters, target_parameters={patterns!r}: {e}. Import "
                         "it into the model it was trained on, or import an adapter whose target_parameters name "
                         "expert tensors alone (PEFT's target_modules='all-linear' adds the routers' weights, e.g. "
                         "'gate.weight', itself on Mixtral and Qwen3-MoE: name the linear layers instead)") from None


def _tied_as_one(model: nn.Module, tensors: dict[str, Tensor], directory: Path, tied: bool) -> dict[str, Tensor]:
    """PEFT's saved copies of a tied tensor's modules, under the one name mol trains it by. Refused unless PEFT
    kept them tied (``tied``: ensure_weight_tying) or saved one equal copy under every name: PEFT trains each saved
    module as an untied copy, and a head trained apart from the embedding is not what a tied model computes."""
    out = dict(tensors)
    for name, names in tied_parameter_names(model).items():
        if name not in model.mol_trainable:
            continue
        found = [n for n in names if n in out]
        if found and (any(not torch.equal(out[found[0]], out[n]) for n in found[1:])
                      or (not tied and len(found) < len(names))):
            raise ValueError(f"{directory}: PEFT trained its own copy of {found[0].rpartition('.')[0]!r}, whose "
                             f"weight this model ties to {[n for n in names if n != found[0]]} (one tensor for "
                             "both, as mol trains it): untie it first (e.g. model.config.tie_word_embeddings = "
                             "False; model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())), "
                             "then import")
        for n in found:
            value = out.pop(n)
        if found:
            out[name] = value
    return out
