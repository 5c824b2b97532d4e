"""Evaluate a saved adapter: ``python -m mol.evaluate adapter=runs/<run>/adapter [split=val] [data.test=...]``.

Loads the base model recorded in ``<adapter>/training_meta.json`` (or ``base_model=DIR``), applies the adapter
with ``mol.load_adapter`` and reports loss and accuracy (classification) or perplexity (causal LM) on the run's own
test (or val) files, also recorded there, unless ``data.test=`` / ``data.val=`` names others.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from mol.io import CONFIG_NAME, WEIGHTS_NAME, _adapter_source, _hub_repo_id, _read_configs
from mol.train.app import (ConfigError, _config_dir_args, _fail, _one_line, asset_path, build_datamodule,
                           check_accelerator, check_data_values, check_overrides, check_positions, find_conf_dir,
                           load_model, model_source, register_resolvers, run_guarded)


def _read_meta(meta_file: Path) -> dict:
    """The run's training_meta.json; a damaged one is one ConfigError (it failed with a bare JSONDecodeError,
    AttributeError or KeyError)."""
    fix = "copy the run's adapter folder again, or point adapter= at <run>/adapter of a mol.train run"
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{meta_file} is not valid JSON ({e}); the file is damaged: {fix}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{meta_file} holds a JSON {type(meta).__name__}, not the run's record (an object); {fix}")
    if not isinstance(meta.get("task"), str):
        raise ConfigError(f"{meta_file} lacks 'task' (the run's model.task), which mol.train writes; {fix}")
    return meta


def _base_model(cfg: DictConfig, meta: dict, meta_file: Path) -> str:
    """``base_model=`` (or ``model.path=``, the training key), else the model.path the run recorded."""
    given = cfg.get("base_model") or cfg.model.get("path")
    if not given and not meta.get("model_path"):
        raise ConfigError(f"{meta_file} records no model_path (the run's base model); pass base_model=DIR")
    path = str(given or meta["model_path"])
    if given:
        return model_source(path, "base_model", "pass base_model=DIR, a local folder made with save_pretrained, or "
                                                "a Hub repo id")[0]
    return model_source(path, "base_model", "moved or deleted? pass base_model=DIR",
                        shown=f"the base model {path} that {meta_file} records")[0]


def _eval_data(cfg: DictConfig, meta: dict, meta_file: Path) -> Any:
    """The ``split`` data: ``data.<split>=`` if given, else the files the run recorded in training_meta.json,
    else (a run from before those were recorded) the bundled fortunes split, as mol.evaluate always took."""
    split = cfg.split
    given = cfg.data.get(split)
    if given is not None:
        return OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else given
    recorded = meta.get("data")
    if recorded is None:
        path = asset_path(f"fortunes/{split}.jsonl")
        print(f"mol.evaluate: {meta_file} does not record the run's data (written before mol.train did): evaluating "
              f"on the bundled fortunes {split} split, {path}; pass data.{split}=FILE for other data",
              file=sys.stderr, flush=True)
        return path
    sources = recorded.get(split) or []
    if not sources:
        other = "val" if split == "test" else "test"
        alt = f", or split={other} (the run's data.{other})" if recorded.get(other) else ""
        raise ConfigError(f"the run had no data.{split} (see {meta_file}); pass data.{split}=FILE{alt}")
    from mol.train.data import Source  # torch and lightning: not before a config error can be reported

    recorded_sources = [Source(**src) for src in sources]
    for src in recorded_sources:
        if src.kind != "hub" and not Path(src.path).exists():  # a Hub dataset is found (or not) when it loads
            raise ConfigError(f"the run's data.{split} file {src.path} (recorded in {meta_file}) no longer exists; "
                              f"pass data.{split}=FILE")
    print(f"mol.evaluate: data.{split} = the run's {', '.join(s.label() for s in recorded_sources)}", file=sys.stderr,
          flush=True)
    return sources


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Metrics of ``cfg.adapter`` on ``cfg.split`` of the run's data (or ``data.*``); also printed as one JSON line."""
    import lightning.pytorch as pl

    import mol
    from mol.train.module import MoLModule

    register_resolvers()
    adapter = Path(str(cfg.adapter)).expanduser()
    if not adapter.exists() and _hub_repo_id(str(cfg.adapter)):  # a run's adapter that hub.repo_id uploaded
        try:
            adapter = _adapter_source(str(cfg.adapter), "mol.evaluate",
                                      (CONFIG_NAME, WEIGHTS_NAME, "training_meta.json"), None, None, None)
        except OSError as e:
            raise ConfigError(str(e)) from None
    if not adapter.exists():
        raise ConfigError(f"adapter={adapter} does not exist; point adapter= at the adapter folder of a mol.train run "
                          "(<output_dir>/adapter)")
    meta_file = adapter / "training_meta.json"
    if not meta_file.is_file():
        raise ConfigError(f"{adapter} has no training_meta.json (not written by mol.train?); "
                          "point adapter= at <run>/adapter")
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split} is unknown; use split=test or split=val")
    check_accelerator(cfg.trainer, check_devices=False)  # evaluate runs on one device
    check_data_values(cfg.data, unset_ok=("max_length",))  # null: the run's
    meta = _read_meta(meta_file)
    tokenizer = cfg.model.get("tokenizer") or meta.get("tokenizer")
    if (tokenizer and not cfg.model.get("tokenizer") and not Path(str(tokenizer)).expanduser().exists()
            and not _hub_repo_id(str(tokenizer))):  # a Hub tokenizer (model.tokenizer=owner/name) loads from there
        raise ConfigError(f"the tokenizer {tokenizer} that {meta_file} records does not exist (moved?); pass "
                          "model.tokenizer=DIR")
    # the tokenizer and dtype the run trained with, unless given here (older metas record neither)
    model_cfg = OmegaConf.merge(cfg.model, {"task": meta["task"], "path": _base_model(cfg, meta, meta_file),
                                            "tokenizer": tokenizer,
                                            "dtype": cfg.model.get("dtype") or meta.get("dtype") or "float32"})
    data_cfg = OmegaConf.merge(cfg.data, {"train": None, "val": None, "test": _eval_data(cfg, meta, meta_file),
                                          "max_length": cfg.data.get("max_length") or meta.get("max_length", 64)})
    # chat data is read as the run read it: its chat template and field names, unless given here
    with open_dict(model_cfg), open_dict(data_cfg):
        model_cfg.chat_template = cfg.model.get("chat_template") or meta.get("chat_template")
        for kind, name in (meta.get("fields") or {}).items():
            data_cfg[f"{kind}_field"] = cfg.data.get(f"{kind}_field") or name
    run_cfg = OmegaConf.create({"model": model_cfg, "data": data_cfg, "seed": 0})
    # the adapter's own configs first: a damaged one (target_modules=[]) fails inject's validate() naming those keys
    # too, and is no base model's fault: it must not get the base-model advice below
    configs, nested = _read_configs(adapter)
    for config in [*configs, *(c for _, inner in nested for c in inner)]:
        try:
            config.validate()
        except ValueError as e:
            raise ConfigError(f"{adapter / CONFIG_NAME} holds an invalid config ({_one_line(e)}); the file is "
                              "damaged: copy the run's adapter folder again") from e
    model, tokenizer = load_model(run_cfg.model, meta.get("labels") or [])
    try:
        mol.load_adapter(model, str(adapter))
    except ValueError as e:
        # load_adapter's advice ("fix target_modules / modules_to_save") is for its config, which evaluate reads from
        # the adapter: here the fix is the base model. Its other errors (a damaged file) name their own fix
        if not any(k in str(e) for k in ("target_modules", "target_parameters", "modules_to_save")):
            raise
        if cfg.get("base_model") or cfg.model.get("path"):
            raise ConfigError(f"the adapter {adapter} does not fit the base model {model_cfg.path}: {_one_line(e)}; "
                              f"evaluate it on the model it was trained on ({meta.get('model_path')}, recorded in "
                              f"{meta_file}): leave base_model= out or point it there") from e
        # the model the run recorded, which no longer holds the layers it trained (replaced since?)
        raise ConfigError(f"the adapter {adapter} does not fit {model_cfg.path}, the base model {meta_file} records "
                          f"(changed since the run?): {_one_line(e)}; pass base_model=DIR, the model it was trained "
                          "on") from e
    dm = build_datamodule(run_cfg, tokenizer)
    dm.fixed_labels = meta.get("labels") or None
    dm.setup()
    check_positions(model, dm, configs)
    module = MoLModule(model, task=meta["task"])
    trainer = pl.Trainer(accelerator=str(cfg.trainer.accelerator), devices=1, precision=cfg.trainer.precision,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=bool(cfg.trainer.enable_progress_bar))
    metrics = trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)[0]
    result = {k.replace("test/", f"{cfg.split}/"): float(v) for k, v in metrics.items()}
    result["examples"] = len(dm.splits["test"])
    print(json.dumps({"adapter": str(adapter), **result}), flush=True)
    return result


def _task(cfg: DictConfig) -> None:
    run_guarded(evaluate, cfg, example=" (e.g. adapter=runs/<run>/adapter)", extra_errors=(ValueError,))


def main(argv: Optional[list[str]] = None) -> None:
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    conf_dir = find_conf_dir()
    register_resolvers()
    overrides, config_dirs = _config_dir_args(argv)
    if not any(a.startswith("-") for a in overrides):
        msg = check_overrides(overrides, conf_dir, config_name="evaluate", extra_dirs=tuple(config_dirs))
        if msg:
            _fail(msg)
    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(conf_dir), config_name="evaluate", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
