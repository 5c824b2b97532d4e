"""Backend choice: which Triton the kernels accept, and what a forced backend says when they cannot run."""
import pytest
import torch

from mol import MoLLinear, dispatch
from mol.quant import dequantize_nf4, quantize_nf4


@pytest.mark.parametrize("text, want", [("3.3.1", (3, 3)), ("3.6.0+git9a2b", (3, 6)), ("3.10.0", (3, 10)),
                                        ("3.2.0rc1", (3, 2)), ("4.0", (4, 0))])
def test_triton_versions_compare_as_numbers(text, want):
    assert dispatch._version(text) == want


@pytest.fixture
def old_triton(monkeypatch):
    """A Triton older than MIN_TRITON, seen fresh by triton_available (its answer is cached per process)."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setattr(dispatch, "_TRITON_OK", None)
    monkeypatch.setattr(dispatch, "_TRITON_WHY", "")
    yield
    dispatch._TRITON_OK = None  # let the next caller see the real Triton again


def test_old_triton_turns_kernels_off_with_a_warning(old_triton):
    with pytest.warns(UserWarning, match=r"triton 3\.2\.0 is older than the 3\.3"):
        assert not dispatch.triton_available()
    # auto on CUDA-looking input takes the reference; nothing here needs a GPU, is_cuda is all it reads
    x = torch.randn(4, 8)
    assert not dispatch.auto_uses_triton(x)
    assert dispatch.resolve_backend("auto", x) == "torch"


def test_forced_triton_on_old_triton_names_the_cause_and_the_fix(old_triton):
    with pytest.warns(UserWarning):
        dispatch.triton_available()
    layer = MoLLinear(torch.nn.Linear(8, 8), num_experts=2, top_k=1, rank=2, alpha=4, backend="triton")
    with pytest.raises(RuntimeError, match=r"triton 3\.2\.0 is older.*triton>=3\.3.*backend='torch'"):
        layer(torch.randn(3, 8))
    packed = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match=r"dequantize_nf4: backend='triton' was forced"):
        dequantize_nf4(packed, backend="triton")
