"""Evaluate a saved adapter: ``python -m mol.evaluate adapter=runs/<run>/adapter [split=val] [data.test=...]``.

Loads the base model recorded in ``<adapter>/training_meta.json`` (or ``base_model=DIR``), applies the adapter
with ``mol.load_adapter`` and reports loss and accuracy (classification) or perplexity (causal LM).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from mol.train.app import (ConfigError, _fail, build_datamodule, check_accelerator, check_overrides,  # noqa: E402
                           find_conf_dir, load_model, register_resolvers, run_guarded)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Metrics of ``cfg.adapter`` on ``cfg.split`` of the data group; also printed as one JSON line."""
    import lightning.pytorch as pl

    import mol
    from mol.train.module import MoLModule

    register_resolvers()
    adapter = Path(str(cfg.adapter)).expanduser()
    meta_file = adapter / "training_meta.json"
    if not meta_file.is_file():
        raise ConfigError(f"{adapter} has no training_meta.json (not written by mol.train?); "
                          "point adapter= at <run>/adapter")
    check_accelerator(cfg.trainer, check_devices=False)  # evaluate runs on one device
    meta = json.loads(meta_file.read_text())
    # the tokenizer and dtype the run trained with, unless given here (older metas record neither)
    model_cfg = OmegaConf.merge(cfg.model, {"task": meta["task"], "path": str(cfg.base_model or meta["model_path"]),
                                            "tokenizer": cfg.model.get("tokenizer") or meta.get("tokenizer"),
                                            "dtype": cfg.model.get("dtype") or meta.get("dtype") or "float32"})
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split} is unknown; use split=test or split=val")
    data_cfg = OmegaConf.merge(cfg.data, {"train": None, "val": None, "test": cfg.data.get(cfg.split),
                                          "max_length": meta.get("max_length", cfg.data.max_length)})
    if data_cfg.test is None:
        raise ConfigError(f"data.{cfg.split} is not set; pass data.{cfg.split}=path/to.jsonl")
    run_cfg = OmegaConf.create({"model": model_cfg, "data": data_cfg, "seed": 0})
    model, tokenizer = load_model(run_cfg.model, meta.get("labels") or [])
    mol.load_adapter(model, str(adapter))
    dm = build_datamodule(run_cfg, tokenizer)
    dm.fixed_labels = meta.get("labels") or None
    dm.setup()
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
    if not any(a.startswith("-") for a in argv):
        msg = check_overrides(argv, conf_dir, config_name="evaluate")
        if msg:
            _fail(msg)
    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(conf_dir), config_name="evaluate", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
