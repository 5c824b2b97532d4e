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


@pytest.mark.parametrize("damage", [b"", b"\x80\x02garbage", None])
def test_a_damaged_token_cache_file_is_rebuilt_with_a_warning(tmp_path, damage):
    """A cache file cut short (a copy or a full disk), or one that holds no list of examples, failed setup with
    torch.load's bare error (or fed the data module garbage); it is a cache: the examples are tokenised again from
    the data file, which is said, and the file rewritten."""
    from mol.train.data import TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    a = _write(tmp_path / "a.jsonl", [{"text": "one two three"}] * 6)

    def examples():
        dm = TextDataModule(tok, "causal_lm", train=str(a), batch_size=2, max_length=16,
                            cache_dir=str(tmp_path / "cache"), seed=1)
        dm.setup()
        return dm.splits["train"].examples

    good = examples()
    (cache,) = (tmp_path / "cache").glob("*.pt")
    if damage is None:
        torch.save({"not": "a list"}, cache)
    else:
        cache.write_bytes(damage)
    with pytest.warns(UserWarning, match=rf"token cache {cache} .*tokenising .*a\.jsonl again"):
        assert examples() == good
    assert torch.load(cache) == good


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
    # a file in another encoding (here Latin-1) was a UnicodeDecodeError traceback; an empty one named no fix
    for name in ("latin1.jsonl", "latin1.json"):
        (tmp_path / name).write_bytes('{"text": "a"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
        with pytest.raises(DataError, match=f"{name}:2 is not UTF-8 text .*re-save it as UTF-8"):
            TextDataModule(tok, "causal_lm", train=str(tmp_path / name), cache_dir=None).setup()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl has no records; write one JSON object per line"):
        TextDataModule(tok, "causal_lm", train=str(tmp_path / "empty.jsonl"), cache_dir=None).setup()


def DataLoaderOf(dm):
    """The training loader outside a Trainer (rank 0 of 1)."""
    from mol.train.data import ResumableSampler
    from torch.utils.data import DataLoader

    ds = dm.splits["train"]
    return DataLoader(ds, batch_sampler=ResumableSampler(len(ds), dm.batch_size, 0, True), collate_fn=dm._collator())


@pytest.mark.parametrize("line, kind, match", [
    ('"a text on its own"', "causal_lm", r"bad.jsonl:1: record is \"a text on its own\", not a JSON object"),
    ("42", "causal_lm", "bad.jsonl:1: record is 42, not a JSON object"),
    ('{"text": null}', "causal_lm", "bad.jsonl:1: `text` is null, not a string"),
    ('{"prompt": "red", "response": 3}', "causal_lm", "bad.jsonl:1: `response` is 3, not a string"),
    ('{"text": "red", "label": null}', "classification", "bad.jsonl:1: `label` is null; a label is a string or"),
    ('{"text": "red", "label": 1.0}', "classification", "`label` is 1.0"),
    ('{"text": "red", "label": true}', "classification", "`label` is true"),
])
def test_a_record_of_the_wrong_shape_is_one_data_error(line, kind, match, tmp_path):
    """These reached the tokenizer (AttributeError, TypeError, transformers' ValueError) or became classes named
    "None" / "1.0" / "True"; a JSON string record even passed as a text record (`"text" in "...text..."`)."""
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    good = '{"text": "cat dog", "label": "animal"}\n{"text": "red", "label": "color"}\n'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n" + good)
    with pytest.raises(DataError, match=match):
        TextDataModule(tok, kind, train=str(bad), batch_size=1, cache_dir=None).scan()


def test_labels_mixing_numbers_and_strings_are_refused(tmp_path):
    """str() made 1 and "1" one class without a word; a file of integer labels alone still trains."""
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    tr = _write(tmp_path / "tr.jsonl", [{"text": "cat", "label": 1}, {"text": "red", "label": 0}] * 2)
    val = _write(tmp_path / "val.jsonl", [{"text": "dog", "label": "1"}])
    with pytest.raises(DataError, match=r"mix whole numbers and strings .*tr.jsonl:1 \(1\) and .*val.jsonl:1"):
        TextDataModule(tok, "classification", train=str(tr), val=str(val), cache_dir=None).scan()
    dm = TextDataModule(tok, "classification", train=str(tr), batch_size=2, cache_dir=None)
    dm.setup()
    assert dm.label_names == ["0", "1"]


def test_an_empty_text_is_refused_also_from_the_token_cache(tmp_path):
    """A record of no tokens crashed the model's forward (reshape of 0 elements) once a batch held only such."""
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")  # adds no special tokens: "" is zero tokens
    tr = _write(tmp_path / "tr.jsonl", [{"text": "cat dog", "label": "a"}, {"text": "", "label": "b"}])
    for _ in range(2):  # the second pass reads the first one's cache file
        with pytest.raises(DataError, match=r"tr.jsonl:2: the record tokenizes to no tokens"):
            TextDataModule(tok, "classification", train=str(tr), cache_dir=str(tmp_path / "cache")).setup()


def test_causal_examples_with_nothing_to_learn_within_max_length_are_left_out(tmp_path):
    """A prompt of max_length tokens or more truncated its whole response away: batches of only such examples
    logged a NaN loss (0/0) and trained nothing."""
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    tr = _write(tmp_path / "tr.jsonl", [{"prompt": "red blue green", "response": "cat"},
                                        {"prompt": "red", "response": "cat dog"}] * 3)
    dm = TextDataModule(tok, "causal_lm", train=str(tr), val=str(tr), batch_size=1, max_length=3, cache_dir=None)
    with pytest.warns(UserWarning, match="3 of 6 examples have no token to learn within data.max_length=3"):
        dm.setup()
    assert len(dm.splits["train"]) == 3 and len(dm.splits["val"]) == 6  # evaluation keeps every example
    for batch in DataLoaderOf(dm):
        assert (batch["labels"][:, 1:] != -100).any()
    with pytest.raises(DataError, match="no data.train example has a token to learn within data.max_length=1"):
        TextDataModule(tok, "causal_lm", train=str(tr), batch_size=1, max_length=1, cache_dir=None).setup()
    only_test = TextDataModule(tok, "causal_lm", train=None, test=str(tr), max_length=1, cache_dir=None)
    only_test.setup()  # as mol.evaluate builds it: no train split to filter
    assert len(only_test.splits["test"]) == 6


@pytest.mark.parametrize("weight", ["abc", -1, 0, True, float("nan"), float("inf")])
def test_a_mixture_weight_that_is_no_positive_number_is_one_data_error(weight, tmp_path):
    """`weight: abc` was a TypeError traceback from the comparison with 0; nan and inf (YAML .nan / .inf) passed it
    and failed in setup's int(weight), a ValueError / OverflowError traceback once fit began."""
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    tr = _write(tmp_path / "tr.jsonl", [{"text": "cat dog"}] * 4)
    with pytest.raises(DataError, match=f"tr.jsonl has weight {weight!r}; a weight is a finite number > 0"):
        TextDataModule(tok, "causal_lm", train=[{"path": str(tr), "weight": weight}], cache_dir=None).scan()


def test_a_cache_dir_that_is_a_file_is_one_data_error(tmp_path):
    """data.cache_dir naming a file (or a path under one) was a FileExistsError traceback while tokenising."""
    from mol.train.data import DataError, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    tr = _write(tmp_path / "tr.jsonl", [{"text": "cat dog"}] * 4)
    (tmp_path / "f").write_text("")
    for cache in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(DataError, match=r"data.cache_dir=.*f(/sub)? cannot hold the token cache .*data.cache_dir="
                                            r"null"):
            TextDataModule(tok, "causal_lm", train=str(tr), batch_size=2, cache_dir=str(cache)).setup()


@pytest.mark.parametrize("name, text", [("bom.jsonl", '{"text": "caf\u00e9 one"}\n\n{"text": "two red"}\n'),
                                        ("bom.json", '[{"text": "caf\u00e9 one"}, {"text": "two red"}]')])
def test_a_utf8_file_with_a_byte_order_mark_reads_as_without(name, text, tmp_path):
    """A file saved as "UTF-8 with BOM" (Windows editors) failed its first line: 'is not valid JSON (Unexpected UTF-8
    BOM (decode using utf-8-sig)); one JSON object per line', and a .json array was read as JSON lines."""
    from mol.train.data import TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    (tmp_path / name).write_bytes(text.encode("utf-8-sig"))
    dm = TextDataModule(tok, "causal_lm", train=str(tmp_path / name), batch_size=1, cache_dir=None)
    dm.setup()
    assert [e["input_ids"] for e in dm.splits["train"].examples] == [tok("caf\u00e9 one")["input_ids"],
                                                                      tok("two red")["input_ids"]]


def test_a_classification_record_without_its_label_names_the_field(tmp_path):
    """One record of a labelled file without its label was told to 'use a causal LM model (model=hf_causal) for
    text, prompt/response or chat data', which fits a file without labels, not a row that lost its own."""
    from mol.train.data import DataError, Fields, TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    rows = [{"sentence": "cat dog", "y": "animal"}, {"sentence": "red", "y": "color"}] * 2 + [{"sentence": "blue"}]
    tr = _write(tmp_path / "tr.jsonl", rows)
    with pytest.raises(DataError, match=r"tr.jsonl:5: the record has no `y \(data.label_field\)`; model.task="
                                        r"classification needs one on every record: add it, or remove the record"):
        TextDataModule(tok, "classification", train=str(tr), cache_dir=None,
                       fields=Fields(text="sentence", label="y")).setup()


def test_limit_train_examples_draws_from_every_source_of_a_mixture(tmp_path):
    """data.limit_train_examples kept the first N examples of the concatenated mixture: every one from the first
    source, the other tasks left out without a word."""
    from mol.train.data import TextDataModule

    tok = make_tokenizer(tmp_path / "tok")
    a = _write(tmp_path / "a.jsonl", [{"text": "cat dog bird"}] * 40)
    b = _write(tmp_path / "b.jsonl", [{"text": "red green blue"}] * 40)

    def tasks(seed):
        dm = TextDataModule(tok, "causal_lm", train=[{"path": str(a), "task": "a"}, {"path": str(b), "task": "b"}],
                            cache_dir=None, limit_train_examples=20, seed=seed)
        dm.setup()
        return [e["task"] for e in dm.splits["train"].examples]

    drawn = tasks(0)
    assert len(drawn) == 20 and {"a", "b"} == set(drawn) and drawn == sorted(drawn) and drawn == tasks(0)
