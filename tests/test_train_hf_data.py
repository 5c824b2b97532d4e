"""Data read through Hugging Face ``datasets``: parquet / csv / .json files, dataset folders (Hub-repo layout and
``save_to_disk``), Hub ids; split slicing, the field mapping, the token cache, the errors. Offline: datasets are
built in tmp_path, Hub ids are checked with the hub unreachable or with ``load_dataset`` replaced by a local one.

The reference for every reader is the same records written as JSONL and read by the JSONL reader.
"""

from __future__ import annotations

import csv
import json

import pytest
from test_train_utils import compose, make_tiny_llama, make_tokenizer, quiet_trainer_overrides

datasets = pytest.importorskip("datasets")  # the dev extra installs it (via the data extra)
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# mixed formats and a task tag on some rows: a table stores the missing fields as nulls
ROWS = [{"prompt": "red blue", "response": "cat dog", "task": "qa"}, {"text": "one two three"},
        {"prompt": "sun", "response": "moon star"}, {"text": "apple banana cherry", "task": "fruit"},
        {"prompt": "green", "response": "fish bird"}, {"text": "code bug test run"}]
TRAIN, VAL = ROWS[:4], ROWS[4:]


@pytest.fixture(autouse=True)
def _offline_local_cache(tmp_path, monkeypatch):
    """datasets' cache in tmp_path (not ~/.cache); the hub unreachable, as in CI, whatever the environment says."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys (from_pylist takes the first row's)
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), str(path))
    return path


def _csv(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)  # a missing field is an empty cell, which datasets reads as null
    return path


def _repo(path, train, val):
    """A folder laid out like a Hub dataset repo: load_dataset(path) maps the file names to splits."""
    _parquet(path / "data" / "train-00000-of-00001.parquet", train)
    _parquet(path / "data" / "validation-00000-of-00001.parquet", val)
    return path


def _disk(path, rows, val=None):
    """save_to_disk of a Dataset, or of a DatasetDict {train, validation} when ``val`` is given."""
    def table(rows):
        cols = list(dict.fromkeys(k for r in rows for k in r))
        return datasets.Dataset.from_dict({c: [r.get(c) for r in rows] for c in cols})

    ds = table(rows)
    if val is not None:
        ds = datasets.DatasetDict({"train": ds, "validation": table(val)})
    ds.save_to_disk(str(path))
    return path


def _examples(tok, train, fields=None, cache=None, **kw):
    from mol.train.data import TextDataModule

    dm = TextDataModule(tok, "causal_lm", train=train, batch_size=1, max_length=16, cache_dir=cache, fields=fields,
                        **kw)
    dm.setup()
    return dm.splits["train"].examples, dm.task_names


SOURCES = {  # name -> (make(tmp_path) -> source of exactly TRAIN)
    "parquet": lambda t: str(_parquet(t / "rows.parquet", TRAIN)),
    "csv": lambda t: str(_csv(t / "rows.csv", TRAIN)),
    "json_array": lambda t: str((t / "rows.json").write_text(json.dumps(TRAIN, indent=1)) and t / "rows.json"),
    "json_lines": lambda t: str(_jsonl(t / "rows.json", TRAIN)),
    "repo_dir": lambda t: {"path": str(_repo(t / "repo", TRAIN, VAL)), "split": "train"},
    "disk_dataset": lambda t: str(_disk(t / "disk", TRAIN)),
    "disk_dict": lambda t: {"path": str(_disk(t / "disk", TRAIN, VAL)), "split": "train"},
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_each_reader_gives_what_the_same_records_as_jsonl_give(kind, tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    want = _examples(tok, {"path": str(_jsonl(tmp_path / "ref.jsonl", TRAIN)), "task": "t"})
    src = SOURCES[kind](tmp_path)
    src = {**src, "task": "t"} if isinstance(src, dict) else {"path": src, "task": "t"}
    assert _examples(tok, src) == want
    assert want[1] == ["qa", "t", "fruit"]  # row tags beside the source's task: nulls read as absent fields


@pytest.mark.parametrize("make, split, rows", [
    (lambda t: _parquet(t / "rows.parquet", ROWS), "train[:2]", ROWS[:2]),
    (lambda t: _parquet(t / "rows.parquet", ROWS), "train[50%:]", ROWS[3:]),
    (lambda t: _repo(t / "repo", TRAIN, VAL), "validation", VAL),
    (lambda t: _repo(t / "repo", TRAIN, VAL), "train[1:]+validation", ROWS[1:]),
    (lambda t: _disk(t / "disk", TRAIN, VAL), "train[-2:]", TRAIN[-2:]),
    (lambda t: _disk(t / "disk", TRAIN, VAL), "validation+train[:1]", VAL + TRAIN[:1]),
    (lambda t: _disk(t / "disk", ROWS), "train[:3]", ROWS[:3]),  # a lone Dataset: its one split is "train"
], ids=["parquet_head", "parquet_percent", "repo_split", "repo_concat", "disk_tail", "disk_concat", "disk_single"])
def test_split_slicing_gives_those_rows(make, split, rows, tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    want = _examples(tok, {"path": str(_jsonl(tmp_path / "ref.jsonl", rows)), "task": "t"})
    assert _examples(tok, {"path": str(make(tmp_path)), "split": split, "task": "t"}) == want


def test_the_field_mapping_applies_and_a_missing_field_lists_the_columns(tmp_path):
    from mol.train.data import DataError, Fields

    tok = make_tokenizer(tmp_path / "tok")
    alpaca = [{"instruction": r["prompt"], "output": r["response"]} for r in ROWS if "prompt" in r]
    fields = Fields(prompt="instruction", response="output")
    src = str(_parquet(tmp_path / "alpaca.parquet", alpaca))
    want = _examples(tok, {"path": str(_jsonl(tmp_path / "alpaca.jsonl", alpaca)), "task": "t"}, fields)
    assert _examples(tok, {"path": src, "task": "t"}, fields) == want
    with pytest.raises(DataError, match=r"alpaca.parquet row 0: record has keys \['instruction', 'output'\]; expected "
                                        r"sentence.*alpaca.parquet has columns \['instruction', 'output'\]"):
        _examples(tok, src, Fields(text="sentence"))


def test_the_token_cache_is_reused_and_rebuilt_when_the_split_or_data_change(tmp_path):
    import os

    import torch

    tok = make_tokenizer(tmp_path / "tok")
    cache = tmp_path / "cache"
    path = _parquet(tmp_path / "rows.parquet", ROWS)
    first = _examples(tok, str(path), cache=str(cache))
    (key,) = cache.glob("rows-*.pt")
    # a marker in the cache file: what the next setup returns if (and only if) it reads the cache
    marker = [{"input_ids": [5, 6], "labels": [5, 6], "task": "rows"}]
    torch.save(marker, key)
    assert _examples(tok, str(path), cache=str(cache))[0] == marker
    sliced = _examples(tok, {"path": str(path), "split": "train[:2]"}, cache=str(cache))
    assert sliced[0] == first[0][:2] and len(list(cache.glob("rows-*.pt"))) == 2
    # new content: datasets' fingerprint of a local file follows its modification time, here set apart
    # explicitly (a file system may keep one within its time resolution)
    _parquet(path, ROWS[::-1])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    again = _examples(tok, str(path), cache=str(cache))
    assert again[0] == first[0][::-1] and len(list(cache.glob("rows-*.pt"))) == 3


def test_a_hub_id_is_passed_to_load_dataset_and_its_revision_keys_the_cache(tmp_path, monkeypatch):
    """Hub ids go to datasets.load_dataset(path, name=, split=, revision=) (here a local stand-in) inside a mixture
    beside a JSONL file; another revision is another token cache file."""
    tok = make_tokenizer(tmp_path / "tok")
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision, kw))
        # the fingerprint of a Hub dataset follows its resolved files: here, the revision
        ds = datasets.Dataset.from_dict({c: [r.get(c) for r in TRAIN] for c in ("prompt", "response", "task", "text")})
        ds._fingerprint = f"fp-{revision}"
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ref = _jsonl(tmp_path / "ref.jsonl", TRAIN)
    want = _examples(tok, [{"path": str(ref), "task": "t"}, {"path": str(ref), "task": "t", "weight": 0.5}])
    hub = {"path": "someorg/alpaca-like", "name": "main", "split": "train[:95%]", "task": "t", "weight": 0.5}
    got = _examples(tok, [{"path": str(ref), "task": "t"}, dict(hub, revision="v1")], cache=str(tmp_path / "c"))
    assert got == want
    assert calls == [("someorg/alpaca-like", "main", "train[:95%]", "v1", {})] * 2  # scan, then tokenisation
    _examples(tok, [dict(hub, revision="v2")], cache=str(tmp_path / "c"))
    assert len(list((tmp_path / "c").glob("alpaca-like-*.pt"))) == 2


@pytest.mark.parametrize("spec, kind", [
    ("tatsu-lab/alpaca", "hub"), ({"path": "imdb", "split": "train"}, "hub"), ("HuggingFaceH4/ultrachat_200k", "hub"),
    ("imdb", "jsonl"),  # a bare name alone is a (missing) local path: its error suggests the Hub forms
    ("data/train.jsonl", "jsonl"), ("data/train.parquet", "jsonl"), ("./org/other", "jsonl"), ("/abs/org", "jsonl"),
    ({"path": "data/train.csv", "split": "train"}, "jsonl"), ("org/name", "dir"),  # an existing local folder wins
])
def test_a_hub_id_is_told_from_a_local_path(spec, kind, tmp_path, monkeypatch):
    from mol.train.data import _as_sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (src,) = _as_sources(spec)
    assert src.kind == kind


def test_evaluate_accepts_a_recorded_hub_source_and_refuses_a_lost_local_one(tmp_path):
    from omegaconf import OmegaConf

    from mol.evaluate import _eval_data
    from mol.train.app import ConfigError

    cfg = OmegaConf.create({"split": "test", "data": {"test": None}})
    hub = {"path": "org/ds", "task": None, "weight": 1.0, "split": "test", "name": "x"}
    assert _eval_data(cfg, {"data": {"test": [hub]}}, tmp_path / "m.json") == [hub]
    lost = {"path": str(tmp_path / "gone.parquet"), "task": None, "weight": 1.0, "split": "train[:2]"}
    with pytest.raises(ConfigError, match="gone.parquet .* no longer exists"):
        _eval_data(cfg, {"data": {"test": [lost]}}, tmp_path / "m.json")


def _error(tok, train):
    from mol.train.data import DataError

    with pytest.raises(DataError) as e:
        _examples(tok, train)
    return str(e.value)


def test_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    tok = make_tokenizer(tmp_path / "tok")
    disk = str(_disk(tmp_path / "disk", TRAIN, VAL))
    repo = str(_repo(tmp_path / "repo", TRAIN, VAL))
    msg = _error(tok, disk)
    assert "holds a DatasetDict with splits ['train', 'validation']; choose one with split:" in msg
    assert "(its splits are ['train', 'validation']); choose one with split:" in _error(tok, repo)
    msg = _error(tok, {"path": repo, "split": "test"})
    assert "split 'test' does not exist" in msg and "['train', 'validation']" in msg
    msg = _error(tok, {"path": disk, "split": "test[:5]"})
    assert "split 'test[:5]' does not name one of its splits ['train', 'validation']" in msg
    msg = _error(tok, {"path": repo, "splt": "train"})
    assert "unknown key splt; a source takes path, task, weight, split, name, revision" in msg
    assert "has no path" in _error(tok, {"split": "train"})
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    msg = _error(tok, str(empty))
    assert msg.startswith(f"{empty} has no records (") and msg.endswith("point data.* at a non-empty dataset or widen "
                                                                        "the split")
    assert f"{disk} (split=train[:0]) has no records" in _error(tok, {"path": disk, "split": "train[:0]"})
    # datasets' own reading error keeps its cause (here datasets 5.2 failing on a parquet file of no rows)
    bad = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(bad))
    msg = _error(tok, str(bad))
    assert msg.startswith(f"{bad}: datasets could not read it (") and "fix the file, or export the data to JSONL" in msg
    jsonl = str(_jsonl(tmp_path / "a.jsonl", TRAIN))
    assert "a JSONL file, which has no split (a JSON(L) file is read whole)" in _error(tok, {"path": jsonl,
                                                                                          "split": "train"})
    msg = _error(tok, {"path": str(tmp_path / "rows.csv") if _csv(tmp_path / "rows.csv", TRAIN) else "",
                       "revision": "main"})
    assert "a csv file, which has no revision (it takes only split)" in msg
    assert "(a Hugging Face Hub dataset is named owner/name, or give {path: NAME, split: train})" in _error(tok, "imdb")


def test_a_hub_dataset_out_of_reach_is_one_clear_error(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    msg = _error(tok, {"path": "someorg/not-cached", "split": "train"})
    assert msg.startswith("someorg/not-cached (split=train): no local file or folder of that name, and the Hugging "
                          "Face dataset could not be loaded (")
    assert "HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1" in msg and "point data.* at a local file or folder" in msg
    msg = _error(tok, "someorg/not-cached")
    assert msg.startswith("someorg/not-cached: no local file or folder of that name, and as a Hugging Face Hub "
                          "dataset its splits could not be listed (offline, a typo, or a private or gated dataset")


def test_a_missing_local_path_read_as_a_hub_id_says_there_is_no_such_file(tmp_path, monkeypatch):
    """data.train=data/train (a typo for data/train.jsonl, or run from another directory) reads as a Hub id: the
    error says first that no such local file or folder exists, not only that the dataset needs a split: or the
    datasets package."""
    import sys

    tok = make_tokenizer(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    msg = _error(tok, "data/train")
    assert msg.startswith("data/train: no local file or folder of that name, and as a Hugging Face Hub dataset its "
                          "splits could not be listed"), msg
    assert "fix the path, or choose a split with split:, e.g. {path: data/train, split: train}" in msg
    monkeypatch.setitem(sys.modules, "datasets", None)
    msg = _error(tok, "data/train")
    assert msg.startswith("data/train: no local file or folder of that name; as a Hugging Face Hub dataset, reading "
                          "it needs the `datasets` package"), msg


def test_without_datasets_installed_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    tok = make_tokenizer(tmp_path / "tok")
    path = str(_parquet(tmp_path / "rows.parquet", TRAIN))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    msg = _error(tok, path)
    assert msg.startswith(f"{path} is a parquet file: reading it needs the `datasets` package, which is not installed")
    assert "pip install 'mol-lora[data]'" in msg
    assert _examples(tok, str(_jsonl(tmp_path / "a.jsonl", TRAIN)))  # JSONL needs no datasets


def test_the_default_data_module_does_not_import_datasets(tmp_path):
    """import datasets costs about a second: only a source read through it imports it."""
    import subprocess
    import sys

    from test_train_utils import REPO, cli_env

    code = ("import sys, json; from mol.train.data import TextDataModule; import mol.train.app, mol.evaluate; "
            "from test_train_utils import make_tokenizer; from pathlib import Path; "
            f"p = Path({str(tmp_path)!r}); (p / 'a.jsonl').write_text(json.dumps({{'text': 'one two'}}) + '\\n'); "
            "dm = TextDataModule(make_tokenizer(p / 'tok'), 'causal_lm', train=str(p / 'a.jsonl'), batch_size=1, "
            "cache_dir=None); dm.setup(); print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", env=cli_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_train_on_parquet_splits_then_evaluate_the_recorded_source(tmp_path):
    """mol.train end to end with train/val/test as slices of one parquet file; mol.evaluate reads the slice the
    run recorded."""
    import torch

    from mol.evaluate import evaluate
    from mol.train.app import run

    model = make_tiny_llama(tmp_path / "llama")
    rows = [r for r in ROWS * 2]
    path = _parquet(tmp_path / "all.parquet", rows)
    out = tmp_path / "run"
    res = run(compose(["method=mol", "model=hf_causal", f"model.path={model}", "data=jsonl",
                       f"data.train={{path: {path}, split: 'train[:8]'}}",
                       f"data.test={{path: {path}, split: 'train[8:]', task: held}}", "data.batch_size=2",
                       "data.max_length=16", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
                       f"output_dir={out}", *quiet_trainer_overrides()]))
    assert res["run"]["steps"] == 2
    meta = json.loads((out / "adapter" / "training_meta.json").read_text())
    assert meta["data"]["test"] == [{"path": str(path), "task": "held", "weight": 1.0, "split": "train[8:]"}]
    got = evaluate(compose([f"adapter={out / 'adapter'}", f"data.cache_dir={tmp_path / 'cache'}",
                            "trainer.enable_progress_bar=false"], config_name="evaluate"))
    assert got["examples"] == 4 and torch.isfinite(torch.tensor(got["test/loss"]))


def test_a_classlabel_column_gives_its_class_names_as_string_labels_in_jsonl_do(tmp_path):
    """sst2 / imdb store `label` as a ClassLabel: its class names are the labels (as a JSONL file of string labels
    gives them), in save_to_disk folders and in parquet files (which keep the features); GLUE's -1 (an unlabelled
    test row) is no class."""
    from mol.train.data import TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    rows = [{"text": "red blue", "label": "pos"}, {"text": "sun moon", "label": "neg"}, {"text": "cat", "label": "pos"}]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": [1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "disk"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))

    def scanned(source):
        dm = TextDataModule(tok, "classification", train=source, batch_size=1, max_length=16, cache_dir=None)
        dm.setup()
        return dm.label_names, [(e["input_ids"], e["labels"]) for e in dm.splits["train"].examples]

    want = scanned(str(_jsonl(tmp_path / "ref.jsonl", rows)))
    assert want[0] == ["neg", "pos"]
    assert scanned(str(tmp_path / "disk")) == want
    assert scanned(str(tmp_path / "rows.parquet")) == want

    from mol.train import hf_data

    unlabelled = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [-1, 0]}, features=features)
    assert hf_data.records(unlabelled) == [{"text": "x"}, {"text": "y", "label": "neg"}]
