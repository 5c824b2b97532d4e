"""The Gluon base GEMM (mol/kernels/base_gemm_gluon.py) on the CPU: what can be checked without a GPU.

Gluon has no interpreter: benchmarks/probe_gluon_gemm.py checks every config against float64 on a Hopper GPU, and
tests/test_routed_kernels.py::test_kernels_compile_for_sm90 builds each config for sm_90 here.
"""
import pytest
import torch

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


@pytest.mark.skipif(not bgg.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.parametrize("block,dtype,gl_dtype", [((128, 64), torch.bfloat16, "bfloat16"),
                                                 ((64, 256), torch.float16, "float16")])
def test_shared_layouts_are_cached_and_equal_a_fresh_build(block, dtype, gl_dtype):
    """Each call's five TMA descriptors reuse one layout per (block, dtype) instead of building it (~4 µs each)."""
    from triton.experimental.gluon import language as gl
    fresh = gl.NVMMASharedLayout.get_default_for(list(block), getattr(gl, gl_dtype))
    assert bgg._smem_layout(block, dtype) == fresh and bgg._smem_layout(block, dtype) is bgg._smem_layout(block, dtype)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    assert bgg._smem_layout(block, other) is not bgg._smem_layout(block, dtype)  # keyed by dtype too
