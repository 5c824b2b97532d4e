"""The Gluon NF4 decode kernel (mol/kernels/nf4_mma.py) on the CPU: what can be checked without a GPU.

The kernel itself needs a CUDA GPU (Gluon has no interpreter): benchmarks/probe_nf4_mma.py checks every config
against float64 there, and tests/test_routed_kernels.py::test_kernels_compile_for_sm90 builds it for sm_90 here.
"""
import pytest
import torch

from mol.kernels import nf4_mma
from mol.quant import quantize_nf4


@pytest.mark.parametrize("bt", [8, 16])
def test_k_relabelling_is_the_same_permutation_for_both_operands(bt):
    """The kernel sums over a relabelled k: the A operand's levels and x go through A_PERM / B_PERM from the orders
    they are built in. Emulated here with the same reshapes on fresh data, the product must be W @ x exactly."""
    torch.manual_seed(bt)
    bm = 32
    w = torch.randn(bm, 64, dtype=torch.float64)
    x = torch.randn(64, bt, dtype=torch.float64)
    # A: the join tree yields (m, word, b, q0, q1) for element 8 word + 4 q1 + 2 q0 + b; word = (t1, t0, w)
    e = w.view(bm, 8, 2, 2, 2).permute(0, 1, 4, 3, 2)
    a = e.reshape(bm, 2, 2, 2, 2, 2, 2).permute(*nf4_mma.A_PERM).reshape(bm, 64)
    # B: x read as (32, bt) pairs, joined to (pair, token, half), then (pair, half, token) = physical k
    pairs = x.view(32, 2, bt).permute(0, 2, 1)
    xv = pairs.permute(0, 2, 1).reshape(64, bt)
    b = xv.reshape(2, 2, 2, 2, 2, 2, bt).permute(*nf4_mma.B_PERM).reshape(64, bt)
    assert not torch.equal(a, w)  # it is a real relabelling
    torch.testing.assert_close(a @ b, w @ x, rtol=1e-12, atol=1e-12)
    # one operand relabelled alone gives a different product
    assert not torch.allclose(a @ x, w @ x)


def test_unsupported_inputs_are_refused_with_the_reason():
    w = torch.randn(64, 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    p = quantize_nf4(w.to(torch.bfloat16))
    assert not nf4_mma.supported(p, x)  # a CPU tensor
    with pytest.raises(ValueError, match="16-bit CUDA x with 1..16 rows"):
        nf4_mma.nf4_matmul_mma(x, p)
    assert not nf4_mma.supported(quantize_nf4(w.to(torch.bfloat16), blocksize=32), x)  # a chunk spans 2 blocks


@pytest.mark.parametrize("k,cpl,split_k,want", [(4096, 1, 8, 8), (4096, 2, 8, 8), (4096, 4, 32, 16),
                                                 (14336, 2, 8, 8), (64, 1, 8, 1), (192, 1, 2, 2)])
def test_splits_cover_every_slab_once(k, cpl, split_k, want):
    """SPLITS programs of equal runs of slabs (the last possibly shorter, none empty) cover K's slabs once."""
    n = nf4_mma.splits(k, cpl, split_k)
    assert n == want
    n_slabs = k // (64 * cpl)
    per = -(-n_slabs // n)
    runs = [range(j * per, min((j + 1) * per, n_slabs)) for j in range(n)]
    assert all(len(r) > 0 for r in runs) and sum(len(r) for r in runs) == n_slabs


def test_cpl_tiles_k():
    assert nf4_mma._cpl(4096, 4) == 4
    assert nf4_mma._cpl(4160, 4) == 1  # 65 chunks
    assert nf4_mma._cpl(4224, 4) == 2  # 66 chunks


@pytest.mark.skipif(not nf4_mma.AVAILABLE, reason="this Triton has no Gluon")
def test_layouts_are_built_once_per_config_and_equal_a_fresh_build():
    """Eager decode calls reuse one config's layouts (building them cost ~45 µs a call); the kernel's constexprs,
    and so its compiled-kernel cache key, are the same as a fresh build's."""
    cfg = (4, 1, 1, 16, 2)
    cached = nf4_mma.layouts(*cfg)
    assert all(a is b for a, b in zip(nf4_mma.layouts(*cfg), cached))
    fresh = nf4_mma.layouts.__wrapped__(*cfg)
    assert all(a == b and hash(a) == hash(b) and a is not b for a, b in zip(cached, fresh))
    assert nf4_mma.layouts(4, 1, 1, 8, 2)[1] != cached[1]  # another token block: another x layout
