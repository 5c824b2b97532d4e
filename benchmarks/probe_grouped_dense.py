"""grouped_lora_linear with DENSE_GEMMS on and off, and MoLLinear's sequence router that runs it (CUDA).

    python benchmarks/probe_grouped_dense.py [--rounds 7]

grouped_lora_linear takes its routing as given (gates, expert_ids): it is what the sequence router and any router
outside the fused kinds run. With grouped_lora.DENSE_GEMMS it computes the same dense-over-experts products as the
routed layer (cuBLAS shrink, u = scale*g*h, the base GEMM with the adapters as extra K, dh stored token-minor);
without, the Triton shrink and expand kernels and a separate base GEMM. Each case checks both forms against a
float32 PyTorch formula (y and every gradient, relative error), then times fwd+bwd of each under CUDA graphs,
replayed interleaved with the bare base's (bench_layer.interleaved_graph_times), medians of --rounds rounds.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
import mol.kernels.grouped_lora as gl  # noqa: E402
from mol.routers import _MeanPool  # noqa: E402
from bench_layer import interleaved_graph_times, mol_step  # noqa: E402
from probe_ab import with_switches  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
FORMS = {"dense GEMMs (now)": True, "Triton shrink/expand (before)": False}


def with_dense(flag, fn):
    return with_switches([(gl, "DENSE_GEMMS", flag)], fn)


def reference(x, W, A, B, gates, ids, scale):
    """float32: y = x W^T + (scale * g * (x A_cat^T)) B_cat with the per-column gate g."""
    E, r, _ = A.shape
    g = torch.zeros(x.shape[0], E, device=x.device).scatter_add_(1, ids, gates.float())
    h = x.float() @ A.float().reshape(E * r, -1).t()
    u = scale * g.repeat_interleave(r, dim=1) * h
    return x.float() @ W.float().t() + u @ B.float().permute(0, 2, 1).reshape(E * r, -1)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grouped_case(T, n_out, E, K, r, rounds, gen):
    n = 4096
    x = torch.randn(T, n, device=DEV, generator=gen).to(DT).requires_grad_()
    W = (torch.randn(n_out, n, device=DEV, generator=gen) / n ** 0.5).to(DT)
    A = (torch.randn(E, r, n, device=DEV, generator=gen) / n ** 0.5).to(DT).requires_grad_()
    B = (torch.randn(E, n_out, r, device=DEV, generator=gen) * 0.1).to(DT).requires_grad_()
    ids = torch.rand(T, E, device=DEV, generator=gen).argsort(dim=1)[:, :K].contiguous()
    gates = torch.rand(T, K, device=DEV, generator=gen)
    gates = (gates / gates.sum(1, keepdim=True)).requires_grad_()
    dy = torch.randn(T, n_out, device=DEV, generator=gen).to(DT)
    leaves = [x, A, B, gates]
    y_ref = reference(x, W, A, B, gates, ids, 2.0)
    g_ref = torch.autograd.grad(y_ref, leaves, dy.float())
    name = f"T={T} 4096→{n_out} E={E} top-{K} r={r}"
    for form, flag in FORMS.items():
        def fwd_bwd():
            y = gl.grouped_lora_linear(x, W, None, A, B, gates, ids, 2.0)
            return y, torch.autograd.grad(y, leaves, dy)
        y, grads = with_dense(flag, fwd_bwd)()
        errs = [rel(y, y_ref)] + [rel(a, b) for a, b in zip(grads, g_ref)]
        print(f"check {name} {form}: y, dx, dA, dB, dgates rel err vs float32: "
              + ", ".join(f"{e:.1e}" for e in errs) + ("  ok" if max(errs) < 1e-2 else "  FAILED"), flush=True)
    # fresh leaves for the graphs: the eager backward above gave these leaves autograd nodes on the default
    # stream, and a capture that touches them synchronises with it and fails
    x, A, B, gates = leaves = [t.detach().clone().requires_grad_() for t in leaves]
    fns = {"bare base": lambda: torch.autograd.grad(F.linear(x, W), [x], dy)}
    for form, flag in FORMS.items():
        fns[form] = with_dense(flag, lambda: torch.autograd.grad(
            gl.grouped_lora_linear(x, W, None, A, B, gates, ids, 2.0), leaves, dy))
    return name, interleaved_graph_times(fns, n=10, rounds=rounds)


def sequence_case(batch, seq, E, K, r, rounds, gen):
    n = 4096
    base = torch.nn.Linear(n, n, bias=False, device=DEV, dtype=DT).requires_grad_(False)
    m = mol.MoLLinear(base, num_experts=E, top_k=K, rank=r, alpha=2.0 * r, router="sequence",
                      backend="triton").to(DEV)
    with torch.no_grad():
        m.lora_B.normal_(generator=gen)
    x = torch.randn(batch, seq, n, device=DEV, generator=gen).to(DT).requires_grad_()
    dy = torch.randn(batch, seq, n, device=DEV, generator=gen).to(DT)
    fns = {"bare base": lambda: torch.autograd.grad(base(x), [x], dy)}
    for form, flag in FORMS.items():
        fns[form] = with_dense(flag, mol_step(m, x, dy))
    return f"MoLLinear router=sequence, {batch}×{seq} tokens 4096² E={E} top-{K} r={r}", \
        interleaved_graph_times(fns, n=10, rounds=rounds)


def pooling_case(batch, seq, E, rounds, gen):
    """The sequence router's scores alone, fwd+bwd w.r.t. x: mean-pooled in float32 through a float32 copy of x
    (before), with float32 accumulation only, and as the router does it now (mol.routers._MeanPool)."""
    n = 4096
    w = torch.randn(E, n, device=DEV, generator=gen) * 0.02
    x = torch.randn(batch, seq, n, device=DEV, generator=gen).to(DT).requires_grad_()
    dl = torch.randn(batch, E, device=DEV, generator=gen)
    fns = {"bare base": lambda: torch.autograd.grad(F.linear(x, torch.zeros(n, n, device=DEV, dtype=DT)), [x],
                                                    torch.ones(batch, seq, n, device=DEV, dtype=DT))}
    fns["mol.routers._MeanPool (now): float32 accumulation, dx a broadcast view"] = lambda: torch.autograd.grad(
        F.linear(_MeanPool.apply(x), w), [x], dl)
    fns["x.mean(dtype=float32), autograd's backward"] = lambda: torch.autograd.grad(
        F.linear(x.mean(dim=1, dtype=torch.float32), w), [x], dl)
    fns["x.float().mean() (before)"] = lambda: torch.autograd.grad(F.linear(x.float().mean(dim=1), w), [x], dl)
    return f"sequence router scores alone, {batch}×{seq} tokens, 4096 features, E={E}", \
        interleaved_graph_times(fns, n=10, rounds=rounds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only-sequence", action="store_true", help="only the sequence router's rows")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, fwd+bwd under CUDA graphs, "
          f"{args.rounds} interleaved rounds, µs")
    rows = [] if args.only_sequence else [grouped_case(*c, args.rounds, gen) for c in (
        (8192, 4096, 8, 2, 16), (8192, 14336, 8, 2, 16), (8192, 4096, 32, 4, 8), (2048, 4096, 8, 2, 16))]
    rows += [sequence_case(8, 1024, 8, 1, 16, args.rounds, gen), sequence_case(8, 1024, 8, 2, 16, args.rounds, gen)]
    print("\n| case | bare base | " + " | ".join(FORMS) + " |\n| --- | --- | " + "--- | " * len(FORMS))
    for name, times in rows:
        if "bare base" not in times:
            print(f"| {name} | capture failed | |")
            continue
        base = times["bare base"][0]
        cells = [f"{times[f][0] * 1e3:.1f} ({times[f][0] / base:.3f}×)" if f in times else "-" for f in FORMS]
        print(f"| {name} | {base * 1e3:.1f} | " + " | ".join(cells) + " |")
    name, times = pooling_case(8, 1024, 8, args.rounds, gen)
    print(f"\n{name} (the first row: the bare base's fwd+bwd, for scale), µs:\n")
    for k, (med, lo, hi) in times.items():
        print(f"- {k}: {med * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f})")


if __name__ == "__main__":
    main()
