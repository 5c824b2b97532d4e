"""The Gluon base GEMM (mol/kernels/base_gemm_gluon.py) on the CPU: what can be checked without a GPU.

Gluon has no interpreter: benchmarks/probe_gluon_gemm.py checks every config against float64 on a Hopper GPU, and
tests/test_routed_kernels.py::test_kernels_compile_for_sm90 builds each config for sm_90 here.
"""
import pytest
import torch

from mol.kernels import base_gemm as bg
from mol.kernels import base_gemm_gluon as bgg

SM90_SHARED = 232448  # bytes of shared memory a CTA may use on sm_90


@pytest.mark.parametrize("cfg", bgg.CONFIGS)
def test_configs_fit_sm90_shared_memory(cfg):
    """Stage buffers (a and b tiles) and the output tile (or its half) within an sm_90 CTA's shared memory."""
    _, bm, bn, bk, _, warps, stages, epi = cfg
    stage = (bm * bk + bn * bk) * 2
    assert stages * stage + bm * (bn // epi) * 2 + 8 * stages <= SM90_SHARED
    assert bm == 16 * warps  # one 16-row wgmma slab per warp: warps_per_cta [num_warps, 1]
    assert epi in (1, 2) and stages >= 3


def test_declines_what_it_cannot_run():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    assert not bgg.supported(x, True, None, True)  # a CPU tensor
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        xc = x.cuda()
        assert not bgg.supported(xc, True, xc, False)  # b and v in different orientations


def test_gluon_configs_are_not_given_to_the_fused_routed_gemm(monkeypatch):
    """routed_gemm builds its fused kernel from the base GEMM's tuned Triton config; a Gluon pick is no such config:
    "auto" runs unfused, "on" falls back to the first Triton config."""
    from mol.kernels import routed_gemm as rg

    a = torch.randn(32, 64, dtype=torch.bfloat16)
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    u = torch.randn(32, 16, dtype=torch.bfloat16)
    v = torch.randn(48, 16, dtype=torch.bfloat16)
    side = torch.randn(24, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(bg, "plan", lambda *args: (bgg.CONFIGS[0], (w, True, u, False, v, True)))
    monkeypatch.setattr(bg, "triton_supported", lambda *args: True)
    monkeypatch.setattr(bg, "EAGER_CUBLAS_ROWS", 0)
    monkeypatch.setattr(rg, "TensorDescriptor", object)
    for mode, want in (("auto", None), ("on", bg._INTERPRET_CONFIG if bg.gl._INTERPRET else bg.CONFIGS[0])):
        monkeypatch.setattr(rg, "FUSED", mode)
        assert rg.config(a, w, True, u, v, None, side) == want
