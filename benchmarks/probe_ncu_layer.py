"""One MoLLinear forward+backward for Nsight Compute: warmed up, then one step between cudaProfilerStart/Stop.

    ncu --profile-from-start off --clock-control none --csv --page raw \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size \
        python benchmarks/probe_ncu_layer.py 8192 8 2 16          # T E top-k r (4096 -> 4096, bf16)
    ncu --profile-from-start off --clock-control none -k regex:_gate --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python benchmarks/probe_ncu_layer.py 8192 8 2 16

ncu runs each kernel alone with its caches flushed, so small kernels read from DRAM what the layer would find in
L2; its per-kernel list says which launches a step makes and what each moves (RESULTS run 29).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_layer import mol_layer, mol_step  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def main():
    T, E, K, r = (int(a) for a in sys.argv[1:5]) if len(sys.argv) == 5 else (8192, 8, 2, 16)
    n = 4096
    g = torch.Generator(device=DEV).manual_seed(0)
    W = (torch.randn(n, n, device=DEV, generator=g) / n ** 0.5).to(DT)
    A = (torch.randn(E, r, n, device=DEV, generator=g) / n ** 0.5).to(DT)
    B = (torch.randn(E, n, r, device=DEV, generator=g) * 0.1).to(DT)
    x = torch.randn(T, n, device=DEV, generator=g).to(DT).requires_grad_()
    dy = torch.randn(T, n, device=DEV, generator=g).to(DT)
    step = mol_step(mol_layer(W, A, B, E, K, r, "triton"), x, dy)
    for _ in range(5):  # autotuning and the base GEMM's choice happen here, outside the profiled range
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one fwd+bwd: T={T} E={E} top-{K} r={r}")


if __name__ == "__main__":
    main()
