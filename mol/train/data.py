"""Data for training: JSONL files and Hugging Face datasets, tokenised once and cached, mixed by task.

A source (``Source``) is a JSONL file, or, read through ``datasets`` (``mol.train.hf_data``, imported only then),
a .json / .parquet / .csv file, a dataset folder (Hub repo layout or ``save_to_disk``) or a Hub id, with optional
``split`` / ``name`` / ``revision``; ``Source.kind`` says which. Rows of a dataset become the same records as
JSONL lines (null fields left out).

Record formats (one JSON object per line), told apart record by record (a file may mix them):
- ``{"text": ...}``                     causal LM on the whole text
- ``{"prompt": ..., "response": ...}``  causal LM, loss on the response tokens only
- ``{"text": ..., "label": ...}``       sequence classification (label: string or int)
- ``{"messages": [{"role": ..., "content": ...}, ...]}``  a chat, rendered with the tokenizer's chat template,
  loss on the assistant turns only (roles: system, developer, user, assistant, tool; assistant tool_calls too)
Any record may carry ``"task"``; otherwise the task is the source's ``task`` field or the file's stem.
The field names can be mapped to a dataset's own columns (``Fields``: data.text_field=sentence ...).

Batches are dicts of tensors (``input_ids``, ``attention_mask``, ``labels``, ``task_ids``) plus the
host-side int ``num_tokens`` so throughput is logged without reading a device tensor back.

Resuming: the training loader is stateful (Lightning saves ``state_dict()`` in each checkpoint and calls
``load_state_dict()`` before iterating), so a resumed run skips exactly the batches already consumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad data configuration or records; the message names the problem and the fix."""


SOURCE_KEYS = ("path", "task", "weight", "split", "name", "revision")
# suffixes read through `datasets` (its builder names in mol.train.hf_data); .json is read here, as an array or lines
DATASETS_SUFFIXES = (".parquet", ".csv")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".tsv")  # a path, never a Hub id
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Source:
    """One source of the mixture. ``weight`` scales how often its examples appear per epoch (1 = once).

    ``path``: a JSONL / JSON / parquet / csv file, a dataset folder (data files laid out like a Hub dataset repo, or
    written by ``save_to_disk``), or a Hugging Face Hub dataset id. ``split`` (datasets' syntax: ``train``,
    ``train[:95%]``, ``train+validation``), ``name`` (the dataset's config) and ``revision`` (Hub only) apply to
    the sources read through ``datasets``; see ``kind``."""

    path: str
    task: Optional[str] = None
    weight: float = 1.0
    split: Optional[str] = None
    name: Optional[str] = None
    revision: Optional[str] = None

    @cached_property  # read for each record's message location: the file system is asked once
    def kind(self) -> str:
        """How it is read: ``jsonl`` (also any unlisted suffix, and a missing path), ``json`` (an array or lines),
        ``file`` (parquet / csv), ``disk`` (a ``save_to_disk`` folder), ``dir`` (a folder of data files) or ``hub``.
        An existing local path always wins; a missing one is a Hub id if it reads ``owner/name`` without a data file
        suffix, or a bare ``name`` given with ``split``/``name``/``revision``."""
        p = Path(self.path)
        if p.is_dir():
            return "disk" if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file() else "dir"
        suffix = p.suffix.lower()
        if p.exists():
            return "file" if suffix in DATASETS_SUFFIXES else "json" if suffix == ".json" else "jsonl"
        hub_options = any(v is not None for v in (self.split, self.name, self.revision))
        if _HUB_ID.fullmatch(self.path) and suffix not in FILE_SUFFIXES and ("/" in self.path or hub_options):
            return "hub"
        return "jsonl"

    def kind_text(self) -> str:
        """The kind in words, for messages."""
        return {"jsonl": "a JSONL file", "json": "a JSON file", "file": f"a {Path(self.path).suffix[1:]} file",
                "disk": "a dataset saved with save_to_disk", "dir": "a dataset folder",
                "hub": "a Hugging Face Hub dataset"}[self.kind]

    def label(self) -> str:
        """The path with the options that pick its rows: ``org/ds (name=x, split=train[:95%])``."""
        opts = [f"{k}={v}" for k, v in (("name", self.name), ("split", self.split), ("revision", self.revision))
                if v is not None]
        return f"{self.path} ({', '.join(opts)})" if opts else self.path

    def where(self, i: int) -> str:
        """Where record ``i`` (0-based) is, for messages: ``file:line`` for JSON lines, ``source row i`` (an index
        into the dataset, as ``ds[i]``) otherwise."""
        return f"{self.path}:{i + 1}" if self.kind == "jsonl" else f"{self.label()} row {i}"

    @property
    def default_task(self) -> str:
        """The task of records without their own tag: the source's ``task``, else the file's (or dataset's) stem."""
        return self.task or Path(self.path).stem

    def spec(self) -> dict[str, Any]:
        """As a saved run records it (local paths made absolute, so ``mol.evaluate`` finds them from anywhere);
        ``Source(**spec)`` reads it back."""
        path = self.path if self.kind == "hub" else str(Path(self.path).expanduser().resolve())
        out: dict[str, Any] = {"path": path, "task": self.task, "weight": self.weight}
        out.update({k: getattr(self, k) for k in ("split", "name", "revision") if getattr(self, k) is not None})
        return out

    def check_options(self) -> None:
        """``split`` / ``name`` / ``revision`` only where they mean something, never silently ignored."""
        kind = self.kind
        allowed = {"jsonl": (), "json": (), "file": ("split",), "disk": ("split",), "dir": ("split", "name"),
                   "hub": ("split", "name", "revision")}[kind]
        extra = [k for k in ("split", "name", "revision") if getattr(self, k) is not None and k not in allowed]
        if extra:
            takes = f"it takes only {', '.join(allowed)}" if allowed else "a JSON(L) file is read whole"
            raise DataError(f"data source {self.path} is {self.kind_text()}, which has no {'/'.join(extra)} ({takes}); "
                            "drop it, or use a parquet/csv file, a dataset folder or a Hub id for split/name/revision")


@dataclass(frozen=True)
class Fields:
    """The record keys each format reads (data.text_field, data.label_field, ...): a dataset's own column names,
    e.g. ``Fields(text="sentence")`` or ``Fields(prompt="instruction", response="output")``."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"

    def name(self, kind: str) -> str:
        """``sentence`` (data.text_field) where mapped, else the plain key: what an error message shows."""
        key = getattr(self, kind)
        return f"{key} (data.{kind}_field)" if key != kind else key


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _as_sources(spec: Union[None, str, dict, Sequence[Any]]) -> list[Source]:
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        return [Source(str(spec))]
    if isinstance(spec, dict) or hasattr(spec, "keys"):
        d = dict(spec)
        unknown = sorted(str(k) for k in d if k not in SOURCE_KEYS)
        if unknown or "path" not in d:
            plural = "s" if len(unknown) > 1 else ""
            what = f"has unknown key{plural} {', '.join(unknown)}" if unknown else "has no path"
            raise DataError(f"data source {d} {what}; a source takes {', '.join(SOURCE_KEYS)} (path required), e.g. "
                            "{path: org/dataset, split: train, task: qa, weight: 1}")
        for k in ("split", "name", "revision"):  # `split: 1` from YAML
            if d.get(k) is not None:
                d[k] = str(d[k])
        w = d.get("weight", 1.0)
        # `weight: abc` was a TypeError later; nan and inf (YAML .nan / .inf) an int() traceback in setup
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
            raise DataError(f"data source {d['path']} has weight {w!r}; a weight is a finite number > 0, e.g. "
                            "weight: 0.5")
        return [Source(**d)]
    return [s for item in spec for s in _as_sources(item)]


def _read_records(path: Path) -> list[dict]:
    """The records of a JSONL file (one JSON value per line)."""
    if not path.exists():
        hint = (" (a Hugging Face Hub dataset is named owner/name, or give {path: NAME, split: train})"
                if not path.suffix and "/" not in str(path) else "")
        raise DataError(f"data file {path} does not exist; fix the data.* path (paths are relative to where you "
                        f"run){hint}")
    records = []
    for i, line in enumerate(io.StringIO(_utf8_text(path), newline=None), 1):  # newlines as open() reads them
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i} is not valid JSON ({e.msg}); one JSON object per line") from e
    if not records:
        raise DataError(f"{path} has no records; write one JSON object per line, e.g. {{\"text\": \"...\"}}")
    return records


def _utf8_text(path: Path) -> str:
    """The file's text; one that is not UTF-8 (a binary file, another encoding) is one DataError naming the line,
    not a UnicodeDecodeError traceback. A leading byte-order mark (Windows editors' "UTF-8 with BOM") is dropped: it
    failed the first line as invalid JSON."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line} is not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason}); data files are "
                        "UTF-8 JSON: re-save it as UTF-8") from None


def _read_json(path: Path) -> list[Any]:
    """The records of a .json file: a JSON array of records, or JSON lines (as a .jsonl file)."""
    text = _utf8_text(path)
    if not text.lstrip().startswith("["):
        return _read_records(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); a .json file holds one array of records "
                        "or one JSON object per line") from e
    if not records:
        raise DataError(f"{path} has no records; write a JSON array of objects, e.g. [{{\"text\": \"...\"}}]")
    return records


class _Opened:
    """A source ready to read: what identifies its content for the token cache (None: no cache), and its records
    (read when first asked: a cache hit never converts a dataset's rows)."""

    def __init__(self, source: Source):
        self.source, self.columns = source, None
        self._records: Optional[list] = None
        self._dataset: Any = None
        kind = source.kind
        if Path(source.path).exists() or kind == "hub":  # a missing file: _read_records says so, options aside
            source.check_options()
        if kind in ("jsonl", "json"):
            p = Path(source.path)
            self.identity = p.read_bytes() if p.is_file() else None  # a missing file: _read_records says so
        else:
            from mol.train import hf_data

            self._dataset = hf_data.load(source)
            self.columns = list(self._dataset.column_names)
            # datasets' _fingerprint changes with the data (local files: their modification times; Hub: the
            # resolved files), the options pick the rows
            self.identity = json.dumps({"kind": kind, "source": source.spec(), "fingerprint":
                                        self._dataset._fingerprint}, sort_keys=True).encode()

    def records(self) -> list:
        if self._records is None:
            kind, p = self.source.kind, Path(self.source.path)
            if kind == "jsonl":
                self._records = _read_records(p)
            elif kind == "json":
                self._records = _read_json(p)
            else:
                from mol.train import hf_data

                self._records = hf_data.records(self._dataset)
        return self._records

    def format(self, rec: Any, i: int, fields: Fields) -> str:
        """``record_format`` of record ``i``; a dataset's error also lists its columns (the names to map)."""
        try:
            return record_format(rec, self.source.where(i), fields)
        except DataError as e:
            if self.columns is None:
                raise
            raise DataError(f"{e}; {self.source.label()} has columns {self.columns}") from e


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:60]


def _text_parts(content: Any) -> Optional[str]:
    """The text of a content given as a list of parts (OpenAI's format, ``[{"type": "text", "text": ...}]``, which
    datasets in that format use for plain text too), its parts joined as given; None where it is no such list."""
    if not isinstance(content, list) or not content:
        return None
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return "".join(texts) if len(texts) == len(content) and all(isinstance(t, str) for t in texts) else None


def text_messages(messages: list[dict]) -> list[dict]:
    """``messages`` with each content given as text parts joined into one string: what a text-only chat template
    renders (it would write a list's Python repr), and what a multimodal one renders the same."""
    return [{**m, "content": text} if (text := _text_parts(m.get("content"))) is not None else m for m in messages]


def _check_messages(messages: Any, where: str, key: str) -> None:
    """A chat's ``messages``: a non-empty list of {role, content} dicts with a known role and string content, and
    at least one assistant turn (the only tokens it trains on). An assistant turn that calls tools (a non-empty
    ``tool_calls`` list, OpenAI's format, which chat templates render) may have no content; ``tool`` turns carry
    the tools' results and, like ``developer`` (OpenAI's newer system role), are not learned."""
    example = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `{key}` is {_shown(messages)}, not a non-empty list of messages; write e.g. "
                        f"{example}")
    for j, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list) \
            and bool(m["tool_calls"])
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise DataError(f"{where}: message {j} of `{key}` is {_shown(m)}, not an object with `role` and "
                            f"`content`; write each message as {{\"role\": ..., \"content\": ...}}")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: message {j} has role {_shown(m['role'])}; use one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list) and content and _text_parts(content) is None:
            kinds = sorted({str(p.get("type")) for p in content if isinstance(p, dict)} - {"text"})
            raise DataError(f"{where}: message {j} has content parts {_shown(content)}"
                            + (f" of type {', '.join(kinds)}" if kinds else "") + "; mol trains on text: give the "
                            "content as a string or as text parts only ([{\"type\": \"text\", \"text\": ...}])")
        if not isinstance(content, str) and _text_parts(content) is None and not (calls and content is None):
            raise DataError(f"{where}: message {j} has content {_shown(content)}, not a string; write each "
                            "content as a JSON string or a list of text parts (null only in an assistant turn with "
                            "tool_calls)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant message, so nothing to learn (the loss is on the "
                        "assistant turns only); add the assistant's reply or remove the record")


def record_format(rec: Any, where: str, fields: Fields = Fields()) -> str:
    """``chat``, ``text``, ``prompt_response`` or ``text_label`` for one record; raises naming the expected keys
    (as mapped by ``fields``), or the field that is no string / no valid chat (it would reach the tokenizer)."""
    if not isinstance(rec, dict):  # `"text" in rec` would test a substring of a JSON string
        raise DataError(f"{where}: record is {_shown(rec)}, not a JSON object; write one object per line, e.g. "
                        '{"text": "..."}')
    f = fields
    if f.messages in rec:
        _check_messages(rec[f.messages], where, f.messages)
        return "chat"
    if f.prompt in rec and f.response in rec:
        fmt, keys = "prompt_response", (f.prompt, f.response)
    elif f.text in rec and f.label in rec:
        fmt, keys = "text_label", (f.text,)
    elif f.text in rec:
        fmt, keys = "text", (f.text,)
    else:
        mapped = [k for k in ("text", "label", "prompt", "response", "messages") if getattr(f, k) != k]
        hint = (f"; the mapped field{'s' if len(mapped) > 1 else ''} "
                f"{', '.join(f.name(k) for k in mapped)} must name keys the records have" if mapped else "")
        raise DataError(f"{where}: record has keys {sorted(rec)}; expected {f.text}, {f.prompt}/{f.response}, "
                        f"{f.text}/{f.label} or {f.messages}{hint}")
    for k in keys:
        if not isinstance(rec[k], str):
            raise DataError(f"{where}: `{k}` is {_shown(rec[k])}, not a string; write each {k} as a JSON string")
    return fmt


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
NO_TEMPLATE_FIX = ("set model.chat_template to a Jinja chat template (the text, or a .jinja file), or use a chat "
                   "model's tokenizer (model.tokenizer=DIR)")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _first_header(tokenizer: Any, through: str, message: dict) -> str:
    """What the template writes before a chat's first message when that message is the assistant's: the generation
    prompt of an empty chat, which holds any default system prompt the template inserts (Qwen's "You are ...") and
    the assistant header, neither of them learned. A template that cannot render an empty chat (it reads
    messages[0]) gives the text before the message's content instead."""
    try:
        return _render(tokenizer, [], True)
    except Exception:  # noqa: BLE001 - a template raises whatever its Jinja code raises on an empty chat
        at = through.find(message["content"]) if message.get("content") else -1
        return through[:at] if at >= 0 else ""


def chat_tokens(tokenizer: Any, messages: list[dict], where: str = "chat") -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` of one chat, rendered with the tokenizer's chat template; labels are
    IGNORE_INDEX except on the assistant turns (their content and end-of-turn tokens, as the template writes them).

    A template with ``{% generation %}`` markers names the assistant tokens itself (transformers'
    ``return_assistant_tokens_mask``, what TRL's ``assistant_only_loss`` reads). Otherwise each assistant turn is
    located by rendering the chat up to it (with the generation prompt, so the assistant header is not learned) and
    through it: both must be prefixes of the whole rendering, else the template rewrites earlier turns (e.g. drops
    past reasoning) and no span can be trusted: a DataError says so."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"{where}: chat records need a chat template, and the tokenizer has none; {NO_TEMPLATE_FIX}")
    fast = getattr(tokenizer, "is_fast", False)
    try:
        if fast and isinstance(template, str) and _GENERATION_TAG.search(template):
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids = list(out["input_ids"])
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
        whole = _render(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            through = _render(tokenizer, messages[: i + 1])
            before = _render(tokenizer, messages[:i]) if i > 0 else ""  # an empty chat renders nothing
            if not (whole.startswith(through) and whole.startswith(before)):
                raise DataError(f"{where}: the chat template renders the conversation up to message {i} differently "
                                "from the same turns inside the whole conversation (it rewrites earlier turns), so the "
                                "assistant tokens cannot be located; use a template that marks them with "
                                "{% generation %} ... {% endgeneration %} (model.chat_template=...)")
            # start after the assistant header the generation prompt writes (never learned, as with TRL's markers),
            # where the template's generation prompt is how the turn begins; else at the end of the previous turn
            header = _render(tokenizer, messages[:i], True) if i > 0 else _first_header(tokenizer, through, m)
            start = len(header) if through.startswith(header) else len(before)
            end = len(through)
            spans.append((start, end))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a template raises whatever its Jinja code raises
        why = str(e).splitlines()[0][:160] if str(e) else ""
        raise DataError(f"{where}: the chat template failed on this chat ({type(e).__name__}: {why}); fix the record "
                        f"or {NO_TEMPLATE_FIX}") from e
    if fast:
        enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # a token is learned if any of its characters lies in an assistant span (as transformers' assistant mask)
        keep = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    else:  # no offsets: count the tokens of each prefix (exact when tokens do not merge across a turn boundary)
        ids = list(tokenizer(whole, add_special_tokens=False)["input_ids"])
        keep = [False] * len(ids)
        for s, e in spans:
            a = len(tokenizer(whole[:s], add_special_tokens=False)["input_ids"])
            b = len(tokenizer(whole[:e], add_special_tokens=False)["input_ids"])
            keep[a:b] = [True] * (b - a)
    return ids, [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]


def _fingerprint(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    # chats are rendered with the template: another template (model.chat_template) must re-tokenise them
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:16]


class TokenizedSet(Dataset):
    """Tokenised examples: each a dict with ``input_ids`` (list[int]), ``labels`` and ``task``."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def tokenize_file(path: Path, tokenizer: Any, task_kind: str, max_length: int, label_to_id: dict[str, int],
                  default_task: str, cache_dir: Optional[Path], fields: Fields = Fields()) -> list[dict]:
    """``tokenize_source`` of one file (any source ``Source(str(path))`` reads)."""
    return tokenize_source(Source(str(path)), tokenizer, task_kind, max_length, label_to_id, default_task, cache_dir,
                           fields)


def tokenize_source(source: Source, tokenizer: Any, task_kind: str, max_length: int, label_to_id: dict[str, int],
                    default_task: str, cache_dir: Optional[Path], fields: Fields = Fields()) -> list[dict]:
    """Tokenise one source, reusing ``cache_dir/<hash>.pt`` when its content (a file's bytes; a dataset's
    fingerprint and options), tokenizer (with its chat template), field mapping and settings are unchanged."""
    path = Path(source.path)
    opened = _Opened(source)
    key = None
    if cache_dir is not None and opened.identity is not None:
        h = hashlib.sha256(opened.identity)
        h.update(json.dumps([_fingerprint(tokenizer), task_kind, max_length, sorted(label_to_id.items()),
                             default_task, sorted(asdict(fields).items())]).encode())
        key = cache_dir / f"{path.stem}-{h.hexdigest()[:20]}.pt"
        if key.exists():
            try:
                cached = torch.load(key)
            except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
                cached = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'cut short'}"
            if isinstance(cached, list) and all(isinstance(x, dict) for x in cached):
                return cached
            # only a cache: the data file still holds every example, so read it again rather than stop the run
            why = cached if isinstance(cached, str) else f"it holds a {type(cached).__name__}, not a list of examples"
            warnings.warn(f"token cache {key} is damaged ({why}); tokenising {source.label()} again and rewriting it")
    examples = []
    eos = tokenizer.eos_token_id
    for i, rec in enumerate(opened.records()):
        where = source.where(i)
        fmt = opened.format(rec, i, fields)
        task = str(rec.get("task", default_task))
        if task_kind == "classification":
            if fmt == "text":  # scan() found labels on other records: this one lacks its own
                raise DataError(f"{where}: the record has no `{fields.name('label')}`; model.task=classification "
                                "needs one on every record: add it, or remove the record")
            if fmt != "text_label":
                raise DataError(f"{where}: model.task=classification needs text/label records, got {fmt}; "
                                "use a causal LM model (model=hf_causal) for text, prompt/response or chat data")
            label = str(rec[fields.label])
            if label not in label_to_id:
                raise DataError(f"{where}: label {label!r} is not in the training labels {sorted(label_to_id)}")
            ids = tokenizer(rec[fields.text], truncation=True, max_length=max_length)["input_ids"]
            examples.append({"input_ids": ids, "labels": label_to_id[label], "task": task})
        else:
            if fmt == "chat":
                # the template writes the special tokens (bos, end of turn) itself: no eos appended
                ids, labels = chat_tokens(tokenizer, text_messages(rec[fields.messages]), where)
                ids, labels = ids[:max_length], labels[:max_length]
            elif fmt == "prompt_response":
                p = tokenizer(rec[fields.prompt])["input_ids"]
                r = tokenizer(rec[fields.response], add_special_tokens=False)["input_ids"]
                r = r + ([eos] if eos is not None else [])
                ids = (p + r)[:max_length]
                labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]  # loss on the response only
            else:
                ids = tokenizer(rec[fields.text], truncation=True, max_length=max_length)["input_ids"]
                labels = list(ids)
            examples.append({"input_ids": ids, "labels": labels, "task": task})
    if key is not None:
        try:
            key.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file of that name, or no permission: a FileExistsError / PermissionError traceback
            raise DataError(f"data.cache_dir={cache_dir} cannot hold the token cache ({e.strerror}: {e.filename}); "
                            "pick another data.cache_dir=DIR, or data.cache_dir=null to tokenise without one") from None
        tmp = key.with_suffix(f".tmp{os.getpid()}")
        torch.save(examples, tmp)
        os.replace(tmp, key)  # atomic: a killed run never leaves half a cache file
    return examples


class ResumableSampler(Sampler[list[int]]):
    """Batches of indices: a seeded permutation per epoch, this rank's share, skipping consumed batches.

    The permutation depends only on (seed, epoch), so 1 process with batch B*W sees, step by step, the
    same examples as W processes with batch B each (rank r takes every W-th index of each global batch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, lengths: Optional[Sequence[int]] = None, group_size: int = 32):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.lengths, self.group_size = lengths, group_size
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self._skip: Optional[tuple[int, int]] = None  # (epoch, batches) to skip once after a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        gb = self.batch_size * self.world_size
        if self.lengths is not None and self.shuffle:
            # Length grouping: sort each window of group_size global batches by length, so a batch pads to
            # similar lengths (less wasted compute), then shuffle the batch order again.
            win = gb * self.group_size
            order = [i for w in range(0, self.n, win)
                     for i in sorted(order[w:w + win], key=lambda j: -self.lengths[j])]
        batches = [order[i:i + gb] for i in range(0, self.n, gb)]
        if self.drop_last and batches and len(batches[-1]) < gb:
            batches.pop()
        if self.lengths is not None and self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __len__(self) -> int:
        gb = self.batch_size * self.world_size
        return self.n // gb if self.drop_last else -(-self.n // gb)

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._skip is not None:
            # The first pass after a resume continues the checkpoint's position, whatever epoch the loader was
            # told: restored on an epoch's last batch, Lightning opens this iterator while still in the finished
            # epoch and runs it as the next one. A finished epoch resumes as the next epoch from its start.
            self.epoch, skip = self._skip
            if skip >= len(self):
                self.epoch, skip = self.epoch + 1, 0
        self._skip = None
        for b in self._global_batches()[skip:]:
            mine = b[self.rank::self.world_size]
            if mine:
                yield mine


class ResumableLoader(DataLoader):
    """A DataLoader whose position survives a checkpoint (Lightning's ``_Stateful`` protocol).

    ``position_fn`` returns how many batches of the current epoch the trainer has finished; it is read at
    checkpoint time, so batches the loader has prefetched but not trained on are not counted. ``epoch_fn``
    returns the trainer's epoch (None without a trainer), handed to the sampler at each ``iter``: Lightning's
    ``set_epoch`` reaches ``loader.sampler`` and ``loader.batch_sampler.sampler``, never a batch sampler itself, so
    without it every epoch would replay epoch 0's order and a resume after the first epoch would skip nothing.
    """

    def __init__(self, *args: Any, position_fn: Callable[[], tuple[int, int]],
                 epoch_fn: Callable[[], Optional[int]] = lambda: None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.position_fn, self.epoch_fn = position_fn, epoch_fn

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn()
        if epoch is not None:
            self.batch_sampler.set_epoch(epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.position_fn()
        sampler = self.batch_sampler
        return {"epoch": epoch, "batches_done": done, "global_batch": sampler.batch_size * sampler.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.batch_sampler
        saved, now = state.get("global_batch"), sampler.batch_size * sampler.world_size
        if saved is not None and int(saved) != now:
            # the position counts batches of the checkpoint's size: resumed with another, it skipped the wrong number
            # of examples of the epoch's order, without a word
            per = f"data.batch_size={int(saved) // sampler.world_size}" if int(saved) % sampler.world_size == 0 else \
                f"data.batch_size x processes = {int(saved)}"
            raise DataError(f"resume: the checkpoint's data position counts global batches of {int(saved)} examples "
                            f"and this run's are {now} (data.batch_size={sampler.batch_size} x {sampler.world_size} "
                            f"process(es)); resume with {per}, or start afresh in a new output_dir=...")
        sampler._skip = (int(state["epoch"]), int(state["batches_done"]))


class Collator:
    """Pads a list of examples to the longest one (right padding)."""

    def __init__(self, pad_id: int, task_kind: str, task_to_id: dict[str, int]):
        self.pad_id, self.task_kind, self.task_to_id = pad_id, task_kind, task_to_id

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        if self.task_kind == "classification":
            labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        else:
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for i, e in enumerate(examples):
                labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        task_ids = torch.tensor([self.task_to_id.get(e["task"], -1) for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": task_ids,
                "num_tokens": int(mask.sum())}


class TextDataModule(pl.LightningDataModule):
    """Train/val/test splits from JSONL (or datasets) sources, tokenised with the model's tokenizer.

    ``train`` may be one path, a list of paths, or a list of ``{path, task, weight}`` (a task mixture;
    ``weight`` 2 repeats a source twice per epoch, 0.5 keeps a fixed, seeded half of it; ``split``, ``name``,
    ``revision``: see ``Source``).
    ``group_by_length``: batches of similar lengths (shuffled), which cuts padding a lot on short-text data.
    ``fields``: the record keys to read, for a dataset with its own column names (default: text, label, ...).
    """

    def __init__(self, tokenizer: Any, task_kind: str, train: Any, val: Any = None, test: Any = None,
                 batch_size: int = 16, eval_batch_size: int = 64, max_length: int = 128, seed: int = 0,
                 cache_dir: Optional[str] = ".cache/mol-tokens", num_workers: int = 0, shuffle: bool = True,
                 limit_train_examples: Optional[int] = None, group_by_length: bool = True,
                 label_names: Optional[list[str]] = None, fields: Optional[Fields] = None):
        super().__init__()
        self.fields = fields or Fields()
        self.group_by_length = group_by_length
        self.allow_zero_length_dataloader_with_multiple_devices = True  # tiny eval sets on many processes
        if task_kind not in ("classification", "causal_lm"):
            raise DataError(f"model.task={task_kind!r} is unknown; use classification or causal_lm")
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size} must be >= 1")
        self.tokenizer, self.task_kind = tokenizer, task_kind
        self.sources = {"train": _as_sources(train), "val": _as_sources(val), "test": _as_sources(test)}
        if not any(self.sources.values()):
            raise DataError("data.train is empty; give a JSONL path (e.g. data.train=my/train.jsonl)")
        self.batch_size, self.eval_batch_size, self.max_length = batch_size, eval_batch_size, max_length
        self.seed, self.num_workers, self.shuffle = seed, num_workers, shuffle
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.limit_train_examples = limit_train_examples
        self.fixed_labels = list(label_names) if label_names else None  # e.g. from a saved adapter's metadata
        self.label_names: list[str] = []
        self.task_names: list[str] = []
        self.splits: dict[str, TokenizedSet] = {}
        self._prepared = False
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)

    # Labels and tasks are read before the model is built (the classifier needs num_labels).
    def scan(self) -> None:
        """Collect label names and task names from the sources; cheap, no tokenisation."""
        labels, tasks = set(), []
        formats: dict[str, str] = {}  # record format -> first file holding it
        train_formats: dict[str, str] = {}
        label_kinds: dict[type, str] = {}  # str / int -> where the first such label is
        for split, srcs in self.sources.items():
            for s in srcs:
                p = s.label()
                opened = _Opened(s)
                for i, r in enumerate(opened.records()):
                    fmt = opened.format(r, i, self.fields)
                    formats.setdefault(fmt, p)
                    if fmt == "text_label" and self.task_kind == "classification":
                        label = r[self.fields.label]
                        if isinstance(label, bool) or not isinstance(label, (str, int)):  # a class named "None"
                            raise DataError(f"{s.where(i)}: `{self.fields.label}` is {_shown(label)}; a label is "
                                            "a string or a whole number")
                        label_kinds.setdefault(type(label), f"{s.where(i)} ({_shown(label)})")
                    if split == "train":
                        train_formats.setdefault(fmt, p)
                    if split == "train" and fmt == "text_label":
                        labels.add(str(r[self.fields.label]))
                    t = str(r.get("task", s.default_task))
                    if t not in tasks:
                        tasks.append(t)
        if len(label_kinds) > 1:
            # labels are compared as text: 1 and "1" would silently be one class
            raise DataError(f"the labels mix whole numbers and strings (e.g. {label_kinds[int]} and "
                            f"{label_kinds[str]}); write every label of data.train/val/test in one kind")
        if self.task_kind == "causal_lm" and "text_label" in formats:
            # a causal LM learns the text alone: the labels would vanish without a word
            warnings.warn(f"{formats['text_label']} has text/label records; a causal LM (model.task=causal_lm) reads "
                          "only the text and ignores every `label` (to classify, use a classifier: "
                          "model=hf_classifier)", stacklevel=3)
        if self.fixed_labels is not None:
            self.label_names = self.fixed_labels
        else:
            if self.task_kind == "classification" and not labels:
                kinds = ", ".join(f"{f.replace('_', '/')} records in {p}" for f, p in train_formats.items())
                raise DataError(f"data.train has no records with a `{self.fields.name('label')}` field "
                                f"({kinds or 'no records'}); "
                                "model.task=classification trains on text/label records: for text or prompt/response "
                                "data use a causal LM (model=hf_causal model.path=DIR)")
            if self.task_kind == "classification" and len(labels) < 2:
                raise DataError(f"classification needs >= 2 distinct labels in data.train, found {sorted(labels)}")
            self.label_names = sorted(labels)
        self.task_names = tasks

    def source_specs(self) -> dict[str, list[dict]]:
        """The sources of each split as ``{path, task, weight}`` (plus ``split``/``name``/``revision`` where set)
        with absolute local paths: what a saved run records so that ``mol.evaluate`` finds the same data from
        anywhere."""
        return {split: [s.spec() for s in srcs] for split, srcs in self.sources.items()}

    def setup(self, stage: Optional[str] = None) -> None:
        if self._prepared:
            return
        if not self.task_names:
            self.scan()
        label_to_id = {n: i for i, n in enumerate(self.label_names)}
        for split, srcs in self.sources.items():
            examples: list[dict] = []
            for s in srcs:
                ex = tokenize_source(s, self.tokenizer, self.task_kind, self.max_length, label_to_id,
                                     s.default_task, self.cache_dir, self.fields)
                empty = next((i for i, e in enumerate(ex) if not e["input_ids"]), None)
                if empty is not None:  # a batch of such records has no shape the model can take
                    raise DataError(f"{s.where(empty)}: the record tokenizes to no tokens (empty text?); fill it in "
                                    "or remove it")
                if split == "train" and s.weight != 1.0:
                    if s.weight <= 0:
                        raise DataError(f"data source {s.path} has weight {s.weight}; weights must be > 0")
                    g = torch.Generator().manual_seed(self.seed)
                    whole, frac = int(s.weight), s.weight - int(s.weight)
                    extra = torch.randperm(len(ex), generator=g)[: int(round(frac * len(ex)))].tolist()
                    ex = ex * whole + [ex[i] for i in extra]
                examples += ex
            if split == "train" and self.limit_train_examples and len(examples) > self.limit_train_examples:
                # a seeded draw over the whole mixture, in its order: the first N came from the first source alone
                g = torch.Generator().manual_seed(self.seed)
                keep = sorted(torch.randperm(len(examples), generator=g)[: self.limit_train_examples].tolist())
                examples = [examples[i] for i in keep]
            if split == "train" and examples and self.task_kind == "causal_lm":  # mol.evaluate has no train split
                # a prompt of max_length tokens or more (or a one-token text, or a chat whose turns before the first
                # assistant reply fill max_length) leaves no token to learn: a batch of only such examples has a
                # loss of 0/0 (NaN in the logs) and trains nothing
                kept = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"][1:])]
                if not kept:
                    raise DataError(f"no data.train example has a token to learn within data.max_length="
                                    f"{self.max_length} (prompts or chat turns before the first assistant reply "
                                    "fill it, or texts are one token); raise "
                                    "data.max_length")
                if len(kept) < len(examples):
                    warnings.warn(f"data.train: {len(examples) - len(kept)} of {len(examples)} examples have no "
                                  f"token to learn within data.max_length={self.max_length} (a prompt, or chat turns "
                                  "before the first assistant reply, that fill it, or a one-token text) and are left "
                                  "out; raise data.max_length to keep them",
                                  stacklevel=2)
                examples = kept
            if examples:
                self.splits[split] = TokenizedSet(examples)
        self._prepared = True

    def _world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _position(self) -> tuple[int, int]:
        t = self.trainer
        return t.current_epoch, t.fit_loop.epoch_loop.batch_progress.current.processed

    def _epoch(self) -> Optional[int]:
        t = getattr(self, "trainer", None)
        return t.current_epoch if t is not None else None

    def _collator(self) -> Collator:
        return Collator(self.pad_id, self.task_kind, {n: i for i, n in enumerate(self.task_names)})

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        ds = self.splits["train"]
        if len(ds) < self.batch_size * world:
            raise DataError(f"data.train has {len(ds)} examples, fewer than one global batch "
                            f"({self.batch_size} x {world} processes); lower data.batch_size")
        lengths = [len(e["input_ids"]) for e in ds.examples] if self.group_by_length else None
        sampler = ResumableSampler(len(ds), self.batch_size, self.seed, self.shuffle, rank, world, lengths=lengths)
        return ResumableLoader(ds, batch_sampler=sampler, collate_fn=self._collator(),
                               num_workers=self.num_workers, position_fn=self._position, epoch_fn=self._epoch)

    def _eval_loader(self, split: str) -> Optional[DataLoader]:
        if split not in self.splits:
            return None
        rank, world = self._world()
        ds = self.splits[split]
        # Eval batches never mix tasks, so routing statistics can be attributed to one task.
        by_task: dict[str, list[int]] = {}
        for i, e in enumerate(ds.examples):
            by_task.setdefault(e["task"], []).append(i)
        # Each rank takes every world-th example of each task, without padding: metrics are reduced as sums,
        # so uneven shards give exact totals.
        shards = [idx[rank::world] for idx in by_task.values()]
        mine = [sh[i:i + self.eval_batch_size] for sh in shards for i in range(0, len(sh), self.eval_batch_size)]
        return DataLoader(ds, batch_sampler=mine, collate_fn=self._collator(), num_workers=self.num_workers)

    def val_dataloader(self) -> Any:
        return self._eval_loader("val") or []

    def test_dataloader(self) -> Any:
        return self._eval_loader("test") or []
