"""Shared fixtures: tiny Hugging Face models built from configs (no download), fresh seeds per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton decides at @jit time whether to interpret, so this must precede every import of mol.kernels.
# CI has no GPU: the kernels run (and are tested) on the CPU through Triton's interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    # A different seed per test (fresh random inputs), reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def make_tiny_llama(layers: int = 2, hidden: int = 32, vocab: int = 101, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 6, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
