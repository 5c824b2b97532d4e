"""Where the small-T (decode) forward of the fused routed layer spends its time, under CUDA-graph replay.

    python benchmarks/probe_small_t.py

For T = 1 and 16 and three layer shapes: the bare base GEMV (cuBLAS), the whole two-launch forward with the base
GEMV inside the one Triton launch (weight=) and with it left to cuBLAS (base_out=), the shrink's split-K (partial
sums the routing program adds up) at 4, 8 and 16, and the large-T launch sequence for comparison.
Relative error of y against float64 is printed for each variant.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.grouped_lora as gl  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402
from bench_layer import graph_time  # noqa: E402
from tests.reference import routed_layer_float64  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def main():
    g = torch.Generator(device=DEV).manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call, CUDA-graph replay of 20 calls")
    print("| T | in→out E top-k r | variant | µs | × base | rel err vs fp64 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n_in, n_out, E, K, r in ((4096, 4096, 8, 2, 16), (4096, 14336, 8, 2, 16), (4096, 4096, 32, 4, 8)):
        W = torch.randn(n_out, n_in, device=DEV, generator=g).div_(n_in ** 0.5).to(DT)
        A = torch.randn(E, r, n_in, device=DEV, generator=g).div_(n_in ** 0.5).to(DT)
        B = torch.randn(E, n_out, r, device=DEV, generator=g).mul_(0.1).to(DT)
        Wr = torch.randn(E, n_in, device=DEV, generator=g).div_(n_in ** 0.5)
        for T in (1, 16):
            x = torch.randn(T, n_in, device=DEV, generator=g).to(DT)
            xd = x.double()
            ref = routed_layer_float64(xd, xd, W.double(), None, None, A.double(), B.double(), Wr.double(), None,
                                       "topk", K, 2.0, 0.0, 0.0)[0]
            tb = graph_time(lambda: F.linear(x, W))
            shape = f"{n_in}→{n_out} E={E} top-{K} r={r}"

            def row(name, fn, y=None):
                t = graph_time(fn)
                err = "" if y is None else f"{((y.double() - ref).norm() / ref.norm()).item():.1e}"
                print(f"| {T} | {shape} | {name} | {t * 1e3:.1f} | {t / tb:.2f}× | {err} |", flush=True)
            print(f"| {T} | {shape} | bare base (cuBLAS) | {tb * 1e3:.1f} | 1.00× | |", flush=True)
            with torch.no_grad():
                def whole():
                    return rl.routed_lora_linear(x, A, B, Wr, "topk", K, 2.0, weight=W)[0]
                row("one launch, base GEMV in Triton (weight=)", whole, whole())

                def cublas_base():
                    return rl.routed_lora_linear(x, A, B, Wr, "topk", K, 2.0, base_out=F.linear(x, W))[0]
                row("cuBLAS base + one launch (base_out=)", cublas_base, cublas_base())
                saved = rl._small_t_split
                for n_part in (4, 16):
                    rl._small_t_split = lambda n, n_part=n_part: n_part
                    try:
                        row(f"weight=, shrink split {n_part}", whole, whole())
                    finally:
                        rl._small_t_split = saved
                small, rl.SMALL_T_MAX = rl.SMALL_T_MAX, 0
                try:
                    row("large-T sequence (shrink, gate, mm, addmm)", whole, whole())
                finally:
                    rl.SMALL_T_MAX = small
        for k, v in gl._CHOSEN.items():
            if k[0] == "small_t" and k[2:4] == (n_in, n_out):
                print(f"  chosen {k[:6]}: {v[0]}, warps {v[1].get('num_warps')}, stages {v[1].get('num_stages')}")


if __name__ == "__main__":
    main()
