"""Shared fixtures: tiny Hugging Face models built from configs (no download), fresh seeds per test."""

import os
import re
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs the kernels on CPU tensors through Triton's interpreter, on any machine (a GPU's checks are
# benchmarks/gpu_check_*.py). Triton decides at @jit time whether to interpret, its own library functions
# (tl.zeros) when triton.language is imported, so this must precede every import of Triton: set only on machines
# without a GPU, a test module that set it later (test_compile_model) ran interpreted kernels calling compiled
# tl.zeros on a GPU machine ("Cannot call @triton.jit'd outside of the scope of a kernel")
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


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why the kernels' tests cannot run in this Triton's interpreter with this numpy, with the fix; else None.
    Triton < 3.7's interpreter reads a scalar kernel argument with int() of a 1-element array, which numpy >= 2.3
    refuses ("only 0-dimensional arrays can be converted to Python scalars"): every interpreted kernel test would
    fail with that error, far from its cause (measured: 3.3.1, 3.5.0 and 3.6.0 fail, 3.7.0 to 3.9 pass)."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 3):
        return (f"Triton {triton_version}'s interpreter, which runs the kernels' tests on the CPU, does not work with "
                f"numpy {numpy_version}: install numpy < 2.3 (pip install 'numpy<2.3') or Triton >= 3.7")
    return None


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
    except ImportError:  # pragma: no cover - no Triton: the kernels' tests say so themselves
        return
    problem = interpreter_numpy_problem(triton.__version__, np.__version__)
    if problem:
        raise pytest.UsageError(problem)


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


class Bnb8bitLike(torch.nn.Linear):
    """bitsandbytes' Linear8bitLt (what transformers' BitsAndBytesConfig(load_in_8bit=True) loads) as mol sees
    it, for a CPU suite without bitsandbytes: an nn.Linear subclass whose `.weight` holds int8 codes of the
    weight's own shape (a row scale beside them)."""

    def __init__(self, lin):
        super().__init__(lin.in_features, lin.out_features, bias=False)
        scale = lin.weight.detach().abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.weight = torch.nn.Parameter((lin.weight.detach() / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return torch.nn.functional.linear(x, (self.weight.float() * self.scale).to(x.dtype))


class Bnb4bitLike(torch.nn.Linear):
    """bitsandbytes' Linear4bit (load_in_4bit=True) as mol sees it: an nn.Linear subclass whose `.weight` holds
    packed uint8 codes, two per byte, shape (out * in / 2, 1) (the dense weight kept aside here, for the forward),
    with Linear4bit's ``compute_dtype`` (None until bitsandbytes' first forward unless the loader set it) and the
    weight's ``quant_state.dtype``, the dtype the codes were quantized from."""

    def __init__(self, lin, compute_dtype=None):
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.register_buffer("dense", lin.weight.detach().clone())
        self.weight = torch.nn.Parameter(torch.randint(0, 256, (lin.weight.numel() // 2, 1), dtype=torch.uint8),
                                         requires_grad=False)
        self.weight.quant_state = types.SimpleNamespace(dtype=lin.weight.dtype)
        if lin.bias is not None:
            self.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dense.to(x.dtype), bias)
