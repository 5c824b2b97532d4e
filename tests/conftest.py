"""Shared fixtures: tiny Hugging Face models built from configs (no download), fresh seeds per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton decides at @jit time whether to interpret, so this must precede every import of mol.kernels.
# CI has no GPU: the kernels run (and are tested) on the CPU through Triton's interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import numpy as np
import pytest
import torch


def _interpreter_rounds_bf16_to_nearest() -> None:
    """Make Triton's interpreter round float32 -> bfloat16 to nearest even, as the GPU's `.to(tl.bfloat16)` and
    stores do. Its cast (triton/runtime/interpreter.py, `_convert_float` without a rounding mode, through 3.9 at
    least) drops the low 16 bits, a truncation biased toward zero: a kernel's bf16 output came out ~1.5x further
    from float64 than the same kernel's on a GPU (routed layer, y: 5.8e-3 against 3.8e-3 for the same rounding
    done by torch), which would blur a real regression into test tolerances."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - no Triton: nothing to patch
        return
    convert = getattr(interpreter, "_convert_float", None)
    if convert is None or getattr(convert, "_mol_rne", False):
        return

    def rne(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.frombuffer(np.ascontiguousarray(input).tobytes(), dtype=np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            nan = (bits & 0x7FFFFFFF) > 0x7F800000
            out = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)
            return out.reshape(np.shape(input))
        return convert(input, input_dtype, output_dtype, rounding_mode)
    rne._mol_rne = True
    interpreter._convert_float = rne


_interpreter_rounds_bf16_to_nearest()


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
