"""Where should the experts' output be accumulated: after the base GEMM (a second pass over y) or before it,
with the base GEMM's beta=1 epilogue reading it? Times both orders (and the backward's dx) with cuBLAS on one GPU.

    python benchmarks/probe_accumulate.py

Recorded in benchmarks/RESULTS.md run 6.
"""
import torch, torch.nn.functional as F
from triton.testing import do_bench
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
def b(f): return do_bench(f, warmup=30, rep=200, return_mode="median") * 1e3
for T, n_in, n_out, R in ((8192, 4096, 4096, 128), (8192, 4096, 14336, 128), (2048, 4096, 4096, 128)):
    x = torch.randn(T, n_in, device=dev, dtype=dt); W = torch.randn(n_out, n_in, device=dev, dtype=dt)
    u = torch.randn(T, R, device=dev, dtype=dt); bc = torch.randn(R, n_out, device=dev, dtype=dt)
    dy = torch.randn(T, n_out, device=dev, dtype=dt); dhl = torch.randn(T, R + 8, device=dev, dtype=dt)
    ae = torch.randn(R + 8, n_in, device=dev, dtype=dt)
    y0 = torch.empty(T, n_out, device=dev, dtype=dt)
    r = {}
    r["F.linear"] = b(lambda: F.linear(x, W))
    r["mm(u,bc)"] = b(lambda: torch.mm(u, bc))
    r["y.addmm_(u,bc) only"] = b(lambda: y0.addmm_(u, bc))
    r["y.addmm_(x,W.t()) only"] = b(lambda: y0.addmm_(x, W.t()))
    r["fwd old: linear+addmm_"] = b(lambda: F.linear(x, W).addmm_(u, bc))
    r["fwd new: mm small + addmm_ big"] = b(lambda: torch.mm(u, bc).addmm_(x, W.t()))
    r["fwd new2: addmm(mm small, x, W.t())"] = b(lambda: torch.addmm(torch.mm(u, bc), x, W.t()))
    r["fwd linear(x,W,bias=None) into out? F.linear + add"] = b(lambda: F.linear(x, W) + torch.mm(u, bc))
    r["mm(dy,W)"] = b(lambda: torch.mm(dy, W))
    r["bwd old: mm(dy,W)+addmm_(dhl,ae)"] = b(lambda: torch.mm(dy, W).addmm_(dhl, ae))
    r["bwd new: mm(dhl,ae)+addmm_(dy,W)"] = b(lambda: torch.mm(dhl, ae).addmm_(dy, W))
    print(f"T={T} {n_in}->{n_out}")
    for k, v in r.items(): print(f"  {k:55s} {v:8.1f} us")
