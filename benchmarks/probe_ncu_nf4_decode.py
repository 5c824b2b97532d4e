"""The NF4 decode kernels for Nsight Compute: warmed up, then one call each between cudaProfilerStart/Stop.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats python benchmarks/probe_ncu_nf4_decode.py

4096x4096 bf16, in this order: the T = 1 FMA kernel ((16, 512) tile, LUT=5), the T = 1 bf16 GEMV, the T = 16 Gluon MMA kernel with the fastest plain
and the fastest pairs configs of RESULTS run 40 (where Triton has Gluon), and the T = 16 GEMV. Runs 13-14 read
the decode kernels as bound by each warp's chain of dependent steps (load, lookups, FMA or MMA, scale) with few
warps to hide it; the warp-state sections say what they stall on. ncu runs each kernel alone (caches flushed), so
the codes come from DRAM here where a graph replay finds them in L2.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.kernels import nf4_mma  # noqa: E402
from mol.quant import quantize_nf4  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from probe_nf4_floor import FIXED as FMA  # noqa: E402  (the T = 1 config probe_nf4_floor --sweep times)

DEV, DT = "cuda", torch.bfloat16
MMA_PLAIN = dict(warps_k=4, warps_m=1, m_rep=1, cpl=4, split_k=1, prefetch=False, maxnreg=128)
MMA_PAIRS = dict(warps_k=4, warps_m=1, m_rep=1, cpl=2, split_k=1, prefetch=True, maxnreg=128, pairs=True)


def main():
    g = torch.Generator(device=DEV).manual_seed(0)
    w = torch.randn(4096, 4096, device=DEV, dtype=DT, generator=g) * 0.02
    p = quantize_nf4(w)
    x1 = torch.randn(1, 4096, device=DEV, dtype=DT, generator=g)
    x16 = torch.randn(16, 4096, device=DEV, dtype=DT, generator=g)
    calls = [lambda: nf4k.nf4_matmul_small(x1, p, config=FMA),
             lambda: F.linear(x1, w)]
    if nf4_mma.AVAILABLE:
        calls += [lambda: nf4_mma.nf4_matmul_mma(x16, p, None, MMA_PLAIN),
                  lambda: nf4_mma.nf4_matmul_mma(x16, p, None, MMA_PAIRS)]
    calls.append(lambda: F.linear(x16, w))
    for _ in range(3):  # compile and warm up outside the profiled range
        for call in calls:
            call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
