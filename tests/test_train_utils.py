"""Helpers shared by the tests/test_train_*.py files: tiny models, a word-level tokenizer, tiny JSONL data.

Everything is built locally from configs (no hub, no downloads) so the tests run offline in seconds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta apple banana cherry grape red green blue black one two three four "
         "cat dog bird fish sun moon star sky code bug test run").split()
TOPICS = {"fruit": WORDS[4:8], "color": WORDS[8:12], "number": WORDS[12:16], "animal": WORDS[16:20]}


def make_tokenizer(out: Path):
    """A whitespace word-level fast tokenizer over WORDS, saved to ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "<s>", "</s>"] + list(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>")
    tok.save_pretrained(str(out))
    return tok


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def make_tiny_bert(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=4)
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    return out


def make_classification_data(out: Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> dict[str, Path]:
    """text/label JSONL: each text mostly uses its topic's words (learnable), random lengths."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        p = out / f"{split}.jsonl"
        with open(p, "w") as fh:
            for _ in range(n):
                label = rng.choice(sorted(TOPICS))
                words = [rng.choice(TOPICS[label]) if rng.random() < 0.7 else rng.choice(WORDS)
                         for _ in range(rng.randint(3, 12))]
                fh.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
        paths[split] = p
    return paths


def make_causal_data(out: Path, n_train: int = 32, n_val: int = 8, seed: int = 0) -> dict[str, Path]:
    """prompt/response JSONL with a task tag (two tasks) for a mixture."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        p = out / f"{split}.jsonl"
        with open(p, "w") as fh:
            for i in range(n):
                topic = sorted(TOPICS)[i % 4]
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
                fh.write(json.dumps({"prompt": prompt, "response": " ".join(TOPICS[topic]),
                                     "task": "even" if i % 2 == 0 else "odd"}) + "\n")
        paths[split] = p
    return paths


def compose(overrides: list[str], config_name: str = "config"):
    """The training config as ``python -m mol.train <overrides>`` would compose it."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mol.train.app import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hcompose(config_name=config_name, overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mol.train", *args], cwd=str(cwd), env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def quiet_trainer_overrides() -> list[str]:
    return ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "baseline.enabled=false"]


@pytest.mark.parametrize("n,b,w,grouped", [(37, 4, 2, False), (64, 8, 1, True), (20, 3, 3, False), (90, 2, 2, True)])
def test_sampler_shards_partition_the_global_batch(n, b, w, grouped):
    """W processes with batch b see, step by step, exactly the examples 1 process with batch b*W sees."""
    from mol.train.data import ResumableSampler

    lengths = [random.Random(i).randint(1, 50) for i in range(n)] if grouped else None
    single = list(ResumableSampler(n, b * w, seed=3, shuffle=True, lengths=lengths, group_size=4))
    shards = [list(ResumableSampler(n, b, seed=3, shuffle=True, rank=r, world_size=w, lengths=lengths, group_size=4))
              for r in range(w)]
    assert all(len(s) == len(single) for s in shards)
    for step, batch in enumerate(single):
        union = sorted(i for s in shards for i in s[step])
        assert union == sorted(batch) and len(batch) == b * w
    # and the skip after a resume drops exactly the consumed batches
    assert sorted(i for batch in single for i in batch) == sorted(set(i for batch in single for i in batch))
    s = ResumableSampler(n, b * w, seed=3, shuffle=True, lengths=lengths, group_size=4)
    s._skip = (0, 2)
    if len(single) > 2:
        assert list(s) == single[2:]
    else:  # a checkpoint on the epoch's last batch: the resume starts the next epoch
        following = ResumableSampler(n, b * w, seed=3, shuffle=True, lengths=lengths, group_size=4)
        following.set_epoch(1)
        assert list(s) == list(following) != single
    s.set_epoch(1)
    assert list(s) != single  # a new shuffle each epoch, and the skip applied only once
