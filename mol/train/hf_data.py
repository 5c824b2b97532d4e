"""Sources read through Hugging Face ``datasets``: parquet / csv files, dataset folders, ``save_to_disk`` folders and
Hub ids. Imported only when such a source is used: ``import datasets`` costs about a second, and the default
(JSONL) run must not pay it or need the package.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

from mol.train.data import DataError

if TYPE_CHECKING:  # only for hints: the module is imported lazily
    from mol.train.data import Source

INSTALL = "pip install 'mol-lora[data]' (or pip install datasets)"
BUILDERS = {".parquet": "parquet", ".csv": "csv"}  # the datasets builder that reads each local file type


def import_datasets(source: "Source") -> ModuleType:
    """The ``datasets`` package, or a DataError naming the source that needs it and how to install it."""
    try:
        import datasets
    except ImportError as e:
        what = (": no local file or folder of that name; as a Hugging Face Hub dataset, reading it" if source.kind ==
                "hub" else f" is {source.kind_text()}: reading it")
        raise DataError(f"{source.label()}{what} needs the `datasets` package, which is not installed; {INSTALL}, "
                        "or export the data to JSONL") from e
    return datasets


def _why(e: BaseException) -> str:
    """An exception and its causes as one line for a DataError (each message whitespace-folded, cut at 300
    characters): datasets wraps the reason in a bare "An error occurred while generating the dataset"."""
    parts, seen = [], set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen and len(parts) < 4:
        seen.add(id(cur))
        text = " ".join(str(cur).split())
        parts.append(f"{type(cur).__name__}: {text[:300]}" if text else type(cur).__name__)
        cur = cur.__cause__ or cur.__context__
    return parts[0] + "".join(f" (caused by {p})" for p in parts[1:])


def _unknown_split(e: BaseException) -> bool:
    return isinstance(e, ValueError) and bool(re.search(r"Unknown split|Bad split|Unrecognized instruction|slice",
                                                         str(e)))


def _select(ds: Any, spec: str, source: "Source", datasets: ModuleType) -> Any:
    """``spec`` (``train``, ``train[:90%]``, ``train+validation``; datasets' own split syntax) of a DatasetDict
    loaded from disk (or of a lone Dataset, whose one split is named as load_dataset names it: ``train`` unless it
    records another)."""
    splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {str(ds.split or "train"): ds}
    try:
        parts = datasets.ReadInstruction.from_spec(spec).to_absolute({k: len(v) for k, v in splits.items()})
    except (ValueError, KeyError, AssertionError) as e:
        raise DataError(f"{source.label()}: split {spec!r} does not name one of its splits {sorted(splits)} "
                        f"({_why(e)}); set split: to one of them, or a slice such as {sorted(splits)[0]}[:90%]") from e
    chosen = [splits[p.splitname].select(range(p.from_, p.to)) for p in parts]
    return chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)


def _split_names(datasets: ModuleType, source: "Source") -> Optional[list[str]]:
    """The splits of a dataset folder or Hub dataset, None where they cannot be listed (offline, unknown id)."""
    try:
        return list(datasets.get_dataset_split_names(source.path, config_name=source.name, revision=source.revision))
    except Exception:  # noqa: BLE001 - only a hint for the error message being built; the load's own error follows
        return None


def _load_error(e: BaseException, source: "Source", datasets: ModuleType) -> DataError:
    """A DataError for what ``load_dataset`` raised: the source, datasets' own message and the likely fix."""
    if isinstance(e, ValueError) and "corresponds to no data" in str(e):  # datasets' word for an empty split
        return DataError(f"{source.label()} has no records ({_why(e)}); point data.* at a non-empty dataset or widen "
                         "the split")
    if _unknown_split(e):
        return DataError(f"{source.label()}: split {source.split!r} does not exist ({_why(e)}); set split: to one of "
                         "its splits, or a slice such as train[:90%]")
    if source.kind == "hub":
        if datasets.config.HF_HUB_OFFLINE:
            fix = ("the hub is not contacted (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 is set), so only a dataset "
                   "already in the datasets cache loads: run once without them (where there is a network) to "
                   "download it, or point data.* at a local file or folder")
        else:
            fix = ("check the id (https://huggingface.co/datasets/<id>), its name: (config) and revision:, the "
                   "network, and a token for a gated dataset (hf auth login); or point data.* at a local file or "
                   "folder")
        return DataError(f"{source.label()}: no local file or folder of that name, and the Hugging Face dataset could "
                         f"not be loaded ({_why(e)}); {fix}")
    return DataError(f"{source.label()}: datasets could not read it ({_why(e)}); fix the file, or export the data to "
                     "JSONL")


def load(source: "Source") -> Any:
    """The ``datasets.Dataset`` a source names (its ``split`` taken), or a DataError naming the problem and the fix.
    An empty dataset or split is refused here: it would train on nothing."""
    datasets = import_datasets(source)
    kind = source.kind
    if kind == "disk":
        try:
            ds = datasets.load_from_disk(source.path)
        except Exception as e:  # noqa: BLE001 - a damaged folder raises whatever its files make datasets raise
            raise _load_error(e, source, datasets) from e
        if isinstance(ds, datasets.DatasetDict) and source.split is None:
            raise DataError(f"{source.label()} holds a DatasetDict with splits {sorted(ds)}; choose one with split:, "
                            f"e.g. {{path: {source.path}, split: {sorted(ds)[0]}}}")
        if source.split is not None:
            ds = _select(ds, source.split, source, datasets)
    else:
        if source.split is None and kind != "file":
            names = _split_names(datasets, source)
            if names is None and kind == "hub":  # also what a mistyped local path (data/train) reads as
                raise DataError(f"{source.label()}: no local file or folder of that name, and as a Hugging Face Hub "
                                "dataset its splits could not be listed (offline, a typo, or a private or gated "
                                "dataset); fix the path, or choose a split with split:, e.g. "
                                f"{{path: {source.path}, split: train}}")
            listed = f"its splits are {names}" if names else "its splits could not be listed here"
            raise DataError(f"{source.label()} is a dataset of named splits ({listed}); choose one with split:, "
                            f"e.g. {{path: {source.path}, split: {(names or ['train'])[0]}}}")
        try:
            if kind == "file":  # one file is datasets' "train" split
                ds = datasets.load_dataset(BUILDERS[Path(source.path).suffix.lower()], data_files=source.path,
                                           split=source.split or "train")
            else:
                ds = datasets.load_dataset(source.path, name=source.name, split=source.split,
                                           revision=source.revision)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds (connection, not found, cast, split)
            raise _load_error(e, source, datasets) from e
    if len(ds) == 0:
        raise DataError(f"{source.label()} has no records; point data.* at a non-empty dataset or widen the split")
    return ds


def records(ds: Any) -> list[dict]:
    """The rows of a Dataset as plain dicts, as a JSONL file gives them. A null is how a table stores a field the
    record lacks (a column another record has), so null fields are left out: a file mixing formats (text rows and
    prompt/response rows), or tagging only some rows with ``task``, reads as the same JSONL would.

    A ``ClassLabel`` column (sst2's and imdb's ``label``) gives its class names, as a JSONL file of string labels
    would: the classifier's labels, results and training_meta.json then say ``positive``, not ``1``. Its -1 (GLUE's
    unlabelled test rows) is no class: left out, as a null is."""
    import datasets

    names = {k: f for k, f in (ds.features or {}).items() if isinstance(f, datasets.ClassLabel)}

    def value(k: str, v: Any) -> Any:
        if k in names and isinstance(v, int) and not isinstance(v, bool):
            return names[k].int2str(v) if v >= 0 else None
        return v

    rows = ({k: value(k, v) for k, v in row.items()} for row in ds)
    return [{k: v for k, v in row.items() if v is not None} for row in rows]
