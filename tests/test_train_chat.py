"""Chat records ({"messages": [...]}) rendered with the tokenizer's chat template, loss on the assistant turns only;
the field mapping (data.text_field ...); the token cache keyed by template and mapping; a 2-step training run.

The expected labels are written out by hand from a word-level tokenizer (one token per word), not derived from the
code under test: a token is learned exactly when it is an assistant content word or the end-of-turn token after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_utils import WORDS, compose, quiet_trainer_overrides

ROLES = ["system", "user", "assistant"]
VOCAB = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "<s>", "</s>"] + list(WORDS) + ROLES
                                    + ["tool", "developer", "call"])}
VOCAB_INV = {i: t for t, i in VOCAB.items()}
# a Llama-3-like template: each turn is "<role> <content> </s> ", the generation prompt opens an assistant turn
PLAIN = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {{ eos_token }} {% endfor %}"
         "{% if add_generation_prompt %}assistant {% endif %}")
# the same rendering with TRL-style {% generation %} markers around what the assistant writes
MARKED = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }} {{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }} {{ eos_token }}{% endif %}"
          " {% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
CHAT = [{"role": "system", "content": "sky star"}, {"role": "user", "content": "red blue"},
        {"role": "assistant", "content": "cat dog"}, {"role": "user", "content": "one two three"},
        {"role": "assistant", "content": "sun moon bird"}]


def chat_tokenizer(out: Path | None = None, template: str | None = PLAIN):
    """A whitespace word-level fast tokenizer that also knows the role words, with ``template`` as chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = template
    if out is not None:
        tok.save_pretrained(str(out))
    return tok


def hand_tokens(messages: list[dict], with_header_loss: bool = False) -> tuple[list[int], list[int]]:
    """ids and labels of ``messages`` under PLAIN/MARKED, written from the template's shape by hand."""
    ids, labels = [VOCAB["<s>"]], [-100]
    for m in messages:
        role = [VOCAB[m["role"]]]
        body = [VOCAB[w] for w in m["content"].split()] + [VOCAB["</s>"]]
        learn = m["role"] == "assistant"
        ids += role + body
        labels += (role if learn and with_header_loss else [-100]) + (body if learn else [-100] * len(body))
    return ids, labels


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("template", [PLAIN, MARKED], ids=["prefix_by_prefix", "generation_markers"])
def test_multi_turn_labels_are_the_assistant_turns_only(template):
    from mol.train.data import chat_tokens

    tok = chat_tokenizer(template=template)
    ids, labels = chat_tokens(tok, CHAT)
    want_ids, want_labels = hand_tokens(CHAT)
    assert ids == want_ids
    assert labels == want_labels
    learned = [VOCAB_INV[t] for t in labels if t != -100]
    assert learned == ["cat", "dog", "</s>", "sun", "moon", "bird", "</s>"]  # both turns, each with its end of turn


def test_markers_agree_with_transformers_assistant_mask():
    """The generation-marker path is what TRL's assistant_only_loss reads: transformers' assistant mask."""
    from mol.train.data import chat_tokens

    tok = chat_tokenizer(template=MARKED)
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trl_labels = [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"])]
    assert chat_tokens(tok, CHAT) == (list(out["input_ids"]), trl_labels)
    # and the prefix-by-prefix path on the unmarked template finds the very same tokens
    assert chat_tokens(chat_tokenizer(template=PLAIN), CHAT)[1] == trl_labels


class _NoOffsets:
    """A tokenizer as a slow (Python) one looks to chat_tokens: no offsets, so token counts of prefixes are used."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        assert "return_offsets_mapping" not in kw
        return self._tok(text, **kw)


def test_a_tokenizer_without_offsets_finds_the_same_tokens():
    from mol.train.data import chat_tokens

    assert chat_tokens(_NoOffsets(chat_tokenizer(template=MARKED)), CHAT) == hand_tokens(CHAT)


def test_a_chatml_template_with_special_tokens():
    """ChatML (Qwen, ...): role headers and end-of-turn are special tokens; the header and the newlines stay out."""
    from mol.train.data import chat_tokens

    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = chat_tokenizer(template=chatml)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, labels = chat_tokens(tok, CHAT)
    want_ids, want_labels = [], []
    for m in CHAT:
        body = [VOCAB[w] for w in m["content"].split()] + [end]
        want_ids += [start, VOCAB[m["role"]]] + body
        want_labels += [-100, -100] + (body if m["role"] == "assistant" else [-100] * len(body))
    assert (ids, labels) == (want_ids, want_labels)


def test_a_template_without_generation_prompt_learns_the_assistant_header():
    """Without an add_generation_prompt branch the turn starts where the previous one ends: the role word is
    learned too (a documented fallback, not silently dropped tokens)."""
    from mol.train.data import chat_tokens

    no_prompt = PLAIN.split("{% if add_generation_prompt %}")[0]
    ids, labels = chat_tokens(chat_tokenizer(template=no_prompt), CHAT)
    assert (ids, labels) == hand_tokens(CHAT, with_header_loss=True)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    from mol.train.data import DataError, chat_tokens

    # drops the content of every assistant turn but the last (as reasoning templates drop past thinking)
    rewriting = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['content'] }} {% endif %}{{ eos_token }} {% endfor %}")
    with pytest.raises(DataError, match=r"rewrites earlier turns.*\{% generation %\}.*model.chat_template"):
        chat_tokens(chat_tokenizer(template=rewriting), CHAT)


def test_a_tokenizer_without_template_names_the_fix(tmp_path):
    from mol.train.data import DataError, TextDataModule

    tok = chat_tokenizer(template=None)
    f = _write(tmp_path / "c.jsonl", [{"messages": CHAT}] * 2)
    with pytest.raises(DataError, match=r"c\.jsonl:1: chat records need a chat template.*model\.chat_template.*"
                                        r"chat model's tokenizer"):
        TextDataModule(tok, "causal_lm", train=str(f), batch_size=1, cache_dir=None).setup()


@pytest.mark.parametrize("record,match", [
    ({"messages": []}, r"`messages` is \[\], not a non-empty list"),
    ({"messages": "hi"}, r"`messages` is \"hi\", not a non-empty list"),
    ({"messages": [["user", "hi"]]}, r"message 0 of `messages` is .*not an object with `role` and `content`"),
    ({"messages": [{"role": "user", "content": "red"}, {"role": "bot", "content": "cat"}]},
     r"message 1 has role \"bot\"; use one of system, developer, user, assistant, tool"),
    ({"messages": [{"role": "assistant", "content": ["cat"]}]},
     r"message 0 has content parts \[\"cat\"\]; mol trains on text: give the content as a string or as text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                                 {"type": "text", "text": "red"}]},
                   {"role": "assistant", "content": "cat"}]},
     r"message 0 has content parts .* of type image_url; mol trains on text"),
    ({"messages": [{"role": "user", "content": {"text": "red"}}, {"role": "assistant", "content": "cat"}]},
     r"message 0 has content \{\"text\": \"red\"\}, not a string; write each content as a JSON string or a list "
     r"of text parts"),
    ({"messages": [{"role": "user", "content": "red"}, {"role": "assistant", "content": None}]},
     r"message 1 has content null, not a string.*null only in an assistant turn with tool_calls"),
    ({"messages": [{"role": "user", "content": "red"}]}, r"the chat has no assistant message.*add the assistant"),
])
def test_bad_chat_records_name_file_record_and_fix(tmp_path, record, match):
    from mol.train.data import DataError, TextDataModule

    good = {"messages": CHAT}
    f = _write(tmp_path / "c.jsonl", [good, good, record])
    with pytest.raises(DataError, match=rf"c\.jsonl:3: {match}"):
        TextDataModule(chat_tokenizer(), "causal_lm", train=str(f), batch_size=1, cache_dir=None).scan()


def test_truncation_and_chats_with_nothing_left_to_learn(tmp_path):
    from mol.train.data import DataError, TextDataModule

    tok = chat_tokenizer()
    short = [{"role": "user", "content": "red"}, {"role": "assistant", "content": "cat dog"}]  # <s> user red </s> ..
    long_user = [{"role": "user", "content": " ".join(WORDS[:12])}, {"role": "assistant", "content": "cat"}]
    f = _write(tmp_path / "c.jsonl", [{"messages": short}, {"messages": long_user}, {"messages": CHAT},
                                      {"text": "one two three"}])  # formats mix per record, as before
    dm = TextDataModule(tok, "causal_lm", train=str(f), batch_size=1, max_length=11, cache_dir=None)
    with pytest.warns(UserWarning, match="1 of 4 examples have no token to learn within data.max_length=11"):
        dm.setup()
    ex = dm.splits["train"].examples
    assert len(ex) == 3 and all(len(e["input_ids"]) <= 11 for e in ex)
    assert (ex[0]["input_ids"], ex[0]["labels"]) == hand_tokens(short)  # 8 tokens: untouched
    ids, labels = hand_tokens(CHAT)
    assert (ex[1]["input_ids"], ex[1]["labels"]) == (ids[:11], labels[:11])  # cut inside the first assistant turn
    assert [VOCAB_INV[t] for t in ex[1]["labels"] if t != -100] == ["cat"]
    only_long = _write(tmp_path / "long.jsonl", [{"messages": long_user}] * 2)
    with pytest.raises(DataError, match="no data.train example has a token to learn within data.max_length=11"):
        TextDataModule(tok, "causal_lm", train=str(only_long), batch_size=1, max_length=11, cache_dir=None).setup()


def test_field_mapping(tmp_path):
    from mol.train.data import DataError, Fields, TextDataModule

    tok = chat_tokenizer()
    cls = _write(tmp_path / "cls.jsonl", [{"sentence": "red blue", "label": "color"},
                                          {"sentence": "cat dog", "label": "animal"}] * 2)
    dm = TextDataModule(tok, "classification", train=str(cls), batch_size=2, cache_dir=None,
                        fields=Fields(text="sentence"))
    dm.setup()
    assert dm.label_names == ["animal", "color"]
    assert dm.splits["train"].examples[0]["input_ids"] == [VOCAB["red"], VOCAB["blue"]]
    with pytest.raises(DataError, match=r"cls\.jsonl:1: record has keys \['label', 'sentence'\]; expected text"):
        TextDataModule(tok, "classification", train=str(cls), cache_dir=None).scan()  # unmapped: refused
    with pytest.raises(DataError, match=r"expected phrase, .*the mapped field phrase \(data\.text_field\) must name"):
        TextDataModule(tok, "classification", train=str(cls), cache_dir=None, fields=Fields(text="phrase")).scan()

    inst = _write(tmp_path / "inst.jsonl", [{"instruction": "red blue", "output": "cat dog"}] * 2)
    dm = TextDataModule(tok, "causal_lm", train=str(inst), batch_size=1, cache_dir=None,
                        fields=Fields(prompt="instruction", response="output"))
    dm.setup()
    e = dm.splits["train"].examples[0]
    red, blue, cat, dog, eos = (VOCAB[w] for w in ("red", "blue", "cat", "dog", "</s>"))
    assert (e["input_ids"], e["labels"]) == ([red, blue, cat, dog, eos], [-100, -100, cat, dog, eos])

    conv = _write(tmp_path / "conv.jsonl", [{"conversation": CHAT}] * 2)
    dm = TextDataModule(tok, "causal_lm", train=str(conv), batch_size=1, cache_dir=None,
                        fields=Fields(messages="conversation"))
    dm.setup()
    assert (dm.splits["train"].examples[0]["input_ids"], dm.splits["train"].examples[0]["labels"]) == hand_tokens(CHAT)


def test_hydra_keys_reach_the_field_mapping(tmp_path):
    from mol.train.app import ConfigError, build_datamodule
    from mol.train.data import Fields

    cfg = compose(["model=hf_causal", "model.path=x", "data=jsonl", "data.train=x.jsonl", "data.text_field=sentence",
                   "data.messages_field=conversation"])
    dm = build_datamodule(cfg, chat_tokenizer())
    assert dm.fields == Fields(text="sentence", messages="conversation")
    assert build_datamodule(compose(["data=jsonl", "data.train=x.jsonl"]), chat_tokenizer()).fields == Fields()
    with pytest.raises(ConfigError, match="data.label_field=3 is not a field name; pass e.g. data.label_field=my_"):
        build_datamodule(compose(["data=jsonl", "data.train=x.jsonl", "data.label_field=3"]), chat_tokenizer())


def test_the_token_cache_follows_the_template_and_the_mapping(tmp_path):
    from mol.train.data import Fields, TextDataModule

    f = _write(tmp_path / "c.jsonl", [{"messages": CHAT, "text": "red blue"}] * 2)
    cache = tmp_path / "cache"

    def examples(tok, fields=None):
        dm = TextDataModule(tok, "causal_lm", train=str(f), batch_size=1, cache_dir=str(cache), fields=fields)
        dm.setup()
        return dm.splits["train"].examples

    plain = examples(chat_tokenizer())
    assert plain[0]["input_ids"] == hand_tokens(CHAT)[0]
    assert len(list(cache.glob("*.pt"))) == 1
    assert examples(chat_tokenizer()) == plain and len(list(cache.glob("*.pt"))) == 1  # reused
    # another template renders the system turn differently: re-tokenised, not read back from the cache
    other = PLAIN.replace("{{ m['role'] }} {{ m['content'] }}", "{{ m['role'] }} {{ m['content'] }} {{ m['role'] }}")
    assert examples(chat_tokenizer(template=other))[0]["input_ids"] != plain[0]["input_ids"]
    assert len(list(cache.glob("*.pt"))) == 2
    # a mapping that no longer finds the messages reads the `text` field instead
    assert examples(chat_tokenizer(), Fields(messages="conversation"))[0]["input_ids"] == [VOCAB["red"], VOCAB["blue"]]
    assert len(list(cache.glob("*.pt"))) == 3


def test_model_chat_template_from_a_file_or_text(tmp_path):
    from omegaconf import OmegaConf

    from mol.train.app import ConfigError, apply_model_chat_template

    tok = chat_tokenizer(template=None)
    (tmp_path / "t.jinja").write_text(MARKED)
    apply_model_chat_template(tok, OmegaConf.create({"chat_template": str(tmp_path / "t.jinja")}))
    assert tok.chat_template == MARKED
    apply_model_chat_template(tok, OmegaConf.create({"chat_template": PLAIN}))
    assert tok.chat_template == PLAIN
    apply_model_chat_template(tok, OmegaConf.create({"chat_template": None}))
    assert tok.chat_template == PLAIN  # unset: the tokenizer's own stays
    with pytest.raises(ConfigError, match="model.chat_template=nope.jinja is neither a file nor a Jinja template"):
        apply_model_chat_template(tok, OmegaConf.create({"chat_template": "nope.jinja"}))


@pytest.mark.parametrize("where", ["tokenizer", "model.chat_template"])
def test_two_training_steps_on_chat_data_then_evaluate(tmp_path, where):
    """mol.train end to end on chat records with a mapped field: a tiny Llama whose tokenizer has a chat template,
    or whose tokenizer has none and model.chat_template gives one; mol.evaluate reads the data as the run did."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mol.evaluate import evaluate
    from mol.train.app import run
    from mol.train.callbacks import read_loss_history

    model_dir = tmp_path / "llama"
    tok = chat_tokenizer(model_dir, template=MARKED if where == "tokenizer" else None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(model_dir))
    (tmp_path / "chat.jinja").write_text(PLAIN)
    template = [f"model.chat_template={tmp_path / 'chat.jinja'}"] if where == "model.chat_template" else []
    train = _write(tmp_path / "chat.jsonl", [{"conversation": CHAT}, {"conversation": CHAT[1:3]}] * 4)
    out = tmp_path / "run"
    res = run(compose(["method=mol", "model=hf_causal", f"model.path={model_dir}", *template, "data=jsonl",
                       f"data.train={train}", "data.messages_field=conversation", "data.batch_size=2",
                       "data.max_length=32", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
                       f"output_dir={out}", *quiet_trainer_overrides()]))
    assert res["run"]["steps"] == 2
    losses = read_loss_history(str(out / "train_loss.jsonl"))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    meta = json.loads((out / "adapter" / "training_meta.json").read_text())
    assert meta["fields"]["messages"] == "conversation"
    assert meta["chat_template"] == (PLAIN if template else None)
    # without the run's mapping (and, for a template-less tokenizer, its template) this file could not be read
    got = evaluate(compose([f"adapter={out / 'adapter'}", "data=jsonl", f"data.test={train}",
                            f"data.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false"],
                           config_name="evaluate"))
    assert got["examples"] == 8 and torch.isfinite(torch.tensor(got["test/loss"]))


# a Qwen-like template: a default system turn is written when the chat has none first
DEFAULT_SYSTEM = ("{{ bos_token }}{% if not messages or messages[0]['role'] != 'system' %}system sky star "
                  "{{ eos_token }} {% endif %}" + PLAIN.removeprefix("{{ bos_token }}"))


@pytest.mark.parametrize("empty_chat_renders", [True, False])
def test_a_chat_opened_by_the_assistant_learns_neither_default_system_prompt_nor_header(empty_chat_renders):
    """A chat whose first message is the assistant's took its span from the very start of the rendering: the
    template's default system prompt (Qwen's templates insert one) and the assistant header were learned. They are
    not now, whether the template can render an empty chat (its generation prompt is then the header) or not (the
    text before the first reply's content is)."""
    from mol.train.data import chat_tokens

    template = DEFAULT_SYSTEM if empty_chat_renders else (
        "{% if messages[0]['role'] %}{% endif %}" + DEFAULT_SYSTEM)  # reads messages[0]: an empty chat fails
    chat = [{"role": "assistant", "content": "cat dog"}, {"role": "user", "content": "red blue"},
            {"role": "assistant", "content": "sun moon bird"}]
    ids, labels = chat_tokens(chat_tokenizer(template=template), chat)
    want_ids, want_labels = hand_tokens([{"role": "system", "content": "sky star"}] + chat)
    assert (ids, labels) == (want_ids, want_labels)


# OpenAI-style tool use: an assistant turn of tool_calls (no content), rendered "call <name>", and a tool result turn
TOOLS = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} "
         "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}call {{ c['function']['name'] }} {% endfor %}{% else %}{{ m['content'] }} {% endif %}{{ eos_token }} "
         "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")


def test_tool_calls_are_learned_and_tool_results_are_not(tmp_path):
    """Function-calling data (OpenAI's format, which chat templates render): the assistant's tool-call turn, whose
    content is null, is learned like any reply; the tool's result and a developer turn are not. The roles
    'tool' / 'developer' and a null content beside tool_calls were refused as bad records."""
    from mol.train.data import TextDataModule, chat_tokens

    chat = [{"role": "developer", "content": "sky"}, {"role": "user", "content": "red blue"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
                                                                   "function": {"name": "cat", "arguments": {}}}]},
            {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "moon bird"}]
    v, ig = VOCAB, -100
    want_ids = [v["<s>"], v["developer"], v["sky"], v["</s>"], v["user"], v["red"], v["blue"], v["</s>"],
                v["assistant"], v["call"], v["cat"], v["</s>"], v["tool"], v["sun"], v["</s>"],
                v["assistant"], v["moon"], v["bird"], v["</s>"]]
    want_labels = [ig] * 9 + [v["call"], v["cat"], v["</s>"]] + [ig] * 4 + [v["moon"], v["bird"], v["</s>"]]
    assert chat_tokens(chat_tokenizer(template=TOOLS), chat) == (want_ids, want_labels)
    f = _write(tmp_path / "tools.jsonl", [{"messages": chat}] * 2)
    dm = TextDataModule(chat_tokenizer(template=TOOLS), "causal_lm", train=str(f), batch_size=1, cache_dir=None)
    dm.scan()  # the records' check, which refused them: raises on a bad record


def test_content_given_as_text_parts_trains_as_the_same_string(tmp_path):
    """OpenAI-format datasets give content as a list of parts even for plain text; text parts are joined into the
    string a text-only template renders (it would write the list's repr), so the tokens and labels are those of
    the same chat written with strings."""
    from mol.train.data import TextDataModule

    parts = [{"role": "system", "content": [{"type": "text", "text": "sky star"}]},
             {"role": "user", "content": [{"type": "text", "text": "red "}, {"type": "text", "text": "blue"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "cat dog"}]},
             {"role": "user", "content": "one two three"},
             {"role": "assistant", "content": [{"type": "text", "text": "sun"},
                                               {"type": "text", "text": " moon bird"}]}]
    f = _write(tmp_path / "parts.jsonl", [{"messages": parts}])
    dm = TextDataModule(chat_tokenizer(), "causal_lm", train=str(f), batch_size=1, max_length=64, cache_dir=None)
    dm.setup()
    example = dm.splits["train"].examples[0]
    want_ids, want_labels = hand_tokens(CHAT)
    assert (example["input_ids"], example["labels"]) == (want_ids, want_labels)
