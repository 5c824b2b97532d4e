"""Whole-layer A/B of the routed layer's module switches, interleaved, under CUDA-graph replay.

    python benchmarks/probe_ab.py [--rounds 5] [--variants default gate=onehot ...] [--nf4]
                                  [--t 8192] [--out-features 4096] [--experts 8 --top-k 2 --rank 16]

A row's time on these GPUs depends on its place in a sequence (clocks under a power cap move by several percent
over a process), so two settings timed one after the other can differ by more than they do. Here every variant's
MoLLinear fwd+bwd (T tokens, 4096 -> out features, E experts top-k rank r, bf16) is captured in a CUDA graph of its
own first, then
the graphs (and the bare base's) are replayed in turn, `--rounds` times; the table gives each one's median over
rounds and its ratio to the base's median. A variant is `default` or comma-joined switches: gate=onehot|select
(routed_lora.GATE_COLUMNS), router=tf32x3|tf32x2 (ROUTER_PRECISION), du=cublas|triton (grouped_lora.DU_CUBLAS),
shrink=gemm|triton (routed_lora.SHRINK), base=auto|cublas|triton (base_gemm.BASE_GEMM), dhl=tokens|rows
(routed_lora.DHL_TOKEN_MINOR), gluon=on|off (base_gemm.GLUON: whether the base-GEMM tuner also times the Gluon
kernel), db=first|last (routed_lora.DB_FIRST).
`--nf4` also times each variant on an NF4 base (QLoRA-MoL).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
import mol.kernels.base_gemm as bg  # noqa: E402
import mol.kernels.grouped_lora as gl  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402
from bench_layer import interleaved_graph_times, mol_layer, mol_step  # noqa: E402
from mol.quant import NF4Linear  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
SWITCHES = {"gate": (rl, "GATE_COLUMNS", {"onehot": "onehot", "select": "select"}),
            "router": (rl, "ROUTER_PRECISION", {"tf32x3": "tf32x3", "tf32x2": "tf32x2"}),
            "du": (gl, "DU_CUBLAS", {"cublas": True, "triton": False}),
            "shrink": (rl, "SHRINK", {"gemm": "gemm", "triton": "triton"}),
            "base": (bg, "BASE_GEMM", {"auto": "auto", "cublas": "cublas", "triton": "triton"}),
            "dhl": (rl, "DHL_TOKEN_MINOR", {"tokens": True, "rows": False}),
            "gluon": (bg, "GLUON", {"on": True, "off": False}),
            "db": (rl, "DB_FIRST", {"first": True, "last": False})}


def switches(variant: str) -> list:
    """[(module, attribute, value)] that a variant names."""
    out = []
    for item in ([] if variant == "default" else variant.split(",")):
        key, _, val = item.partition("=")
        if key not in SWITCHES or val not in SWITCHES[key][2]:
            raise SystemExit(f"unknown switch {item!r}; choose from "
                             + ", ".join(f"{k}={'|'.join(v[2])}" for k, v in SWITCHES.items()))
        mod, attr, vals = SWITCHES[key]
        out.append((mod, attr, vals[val]))
    return out


def with_switches(sets: list, fn):
    """fn run with the switches set (and restored after), its result returned: a graph captured from it keeps that
    variant's kernels."""
    def run():
        old = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in sets]
        for mod, attr, val in sets:
            setattr(mod, attr, val)
        try:
            return fn()
        finally:
            for mod, attr, val in old:
                setattr(mod, attr, val)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["default", "gate=onehot"])  # today's default against the other form
    ap.add_argument("--nf4", action="store_true", help="also on an NF4 base (QLoRA-MoL)")
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    g = torch.Generator(device=DEV).manual_seed(0)
    T, n, n_out, E, K, r = args.t, 4096, args.out_features, args.experts, args.top_k, args.rank
    x = torch.randn(T, n, device=DEV, generator=g).to(DT).requires_grad_()
    W = (torch.randn(n_out, n, device=DEV, generator=g) / n ** 0.5).to(DT)
    A = (torch.randn(E, r, n, device=DEV, generator=g) / n ** 0.5).to(DT)
    B = (torch.randn(E, n_out, r, device=DEV, generator=g) * 0.1).to(DT)
    dy = torch.randn(T, n_out, device=DEV, generator=g).to(DT)
    layers = {"bf16 base": mol_layer(W, A, B, E, K, r, "triton")}
    if args.nf4:
        m = mol.MoLLinear(NF4Linear.from_linear(layers["bf16 base"].base_layer), num_experts=E, top_k=K, rank=r,
                          alpha=2.0 * r, backend="triton").to(DEV)
        with torch.no_grad():  # NF4Linear has no dense weight, so MoLLinear made float32 adapters: as on bf16
            m.lora_A.data = A.clone()
            m.lora_B.data = B.clone().permute(1, 0, 2).contiguous().permute(1, 0, 2)  # MoLLinear's interleaved layout
            m.router.weight.data.copy_(layers["bf16 base"].router.weight)
        layers["NF4 base"] = m

    fns = {"bare bf16 base": lambda: torch.autograd.grad(F.linear(x, W), [x], dy)}
    for v in args.variants:
        sets = switches(v)
        for name, m in layers.items():
            fns[f"{v} | {name}"] = with_switches(sets, mol_step(m, x, dy))
    times = interleaved_graph_times(fns, n=10, rounds=args.rounds)  # ms per call: (median, min, max)
    base = times["bare bf16 base"][0] * 1e3
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; T={T} 4096->{n_out} E={E} top-{K} r={r} bf16, "
          f"fwd+bwd under CUDA graphs, {args.rounds} interleaved rounds, µs")
    print("| variant | base of the layer | median µs | × bare bf16 base | min-max over rounds |")
    print("| --- | --- | --- | --- | --- |")
    for k, (med, lo, hi) in times.items():
        v, _, b = k.partition(" | ")
        med, lo, hi = med * 1e3, lo * 1e3, hi * 1e3
        print(f"| {v} | {b or '-'} | {med:.1f} | {med / base:.3f}× | {lo:.1f}-{hi:.1f} |", flush=True)


if __name__ == "__main__":
    main()
