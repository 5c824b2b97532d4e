"""DataModule: the three JSONL formats, a weighted multi-task mixture, the token cache, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_utils import make_tokenizer


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mixture_formats_and_cache(tmp_path):
    from mol.train.data import IGNORE_INDEX, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    a = _write(tmp_path / "a.jsonl", [{"prompt": "red blue", "response": "cat dog"}] * 10)
    b = _write(tmp_path / "b.jsonl", [{"text": "one two three", "task": "count"}] * 8)
    dm = TextDataModule(tok, "causal_lm", train=[{"path": str(a), "task": "qa", "weight": 2},
                                                 {"path": str(b), "weight": 0.5}],
                        val=str(b), batch_size=4, max_length=16, cache_dir=str(tmp_path / "cache"), seed=1)
    dm.setup()
    ex = dm.splits["train"].examples
    assert len(ex) == 2 * 10 + 4
    assert sorted({e["task"] for e in ex}) == ["count", "qa"]  # record tag wins over the source tag
    assert dm.task_names == ["qa", "count"]
    qa = next(e for e in ex if e["task"] == "qa")
    n_prompt = len(tok("red blue")["input_ids"])
    # loss only on the response (+ eos): the prompt positions are ignored
    assert qa["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert qa["labels"][n_prompt:] == qa["input_ids"][n_prompt:]
    assert qa["input_ids"][-1] == tok.eos_token_id
    batch = next(iter(dm.val_dataloader()))
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())
    assert (batch["task_ids"] == dm.task_names.index("count")).all()
    # second setup reads the cache: same examples, and the cache files exist
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    assert len(files) == 2
    dm2 = TextDataModule(tok, "causal_lm", train=[{"path": str(a), "task": "qa", "weight": 2},
                                                  {"path": str(b), "weight": 0.5}],
                         batch_size=4, max_length=16, cache_dir=str(tmp_path / "cache"), seed=1)
    dm2.setup()
    assert dm2.splits["train"].examples == ex


def test_classification_labels_and_errors(tmp_path):
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    tr = _write(tmp_path / "tr.jsonl", [{"text": "cat dog", "label": "animal"}, {"text": "red", "label": "color"}] * 4)
    dm = TextDataModule(tok, "classification", train=str(tr), batch_size=2, cache_dir=None)
    dm.setup()
    assert dm.label_names == ["animal", "color"]
    batch = next(iter(DataLoaderOf(dm)))
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}

    with pytest.raises(DataError, match="does not exist"):
        TextDataModule(tok, "classification", train=str(tmp_path / "nope.jsonl"), cache_dir=None).setup()
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}] * 3)
    with pytest.raises(DataError, match="needs text/label records"):
        TextDataModule(tok, "classification", train=[str(tr), str(bad)], cache_dir=None).setup()
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match="junk.jsonl:2 is not valid JSON"):
        TextDataModule(tok, "causal_lm", train=str(junk), cache_dir=None).setup()


def DataLoaderOf(dm):
    """The training loader outside a Trainer (rank 0 of 1)."""
    from mol.train.data import ResumableSampler
    from torch.utils.data import DataLoader

    ds = dm.splits["train"]
    return DataLoader(ds, batch_sampler=ResumableSampler(len(ds), dm.batch_size, 0, True), collate_fn=dm._collator())
