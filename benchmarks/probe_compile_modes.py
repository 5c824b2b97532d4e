"""MoLLinear fwd+bwd as a training loop sees it (host time included), eager and under torch.compile, on a CUDA GPU.

    python benchmarks/probe_compile_modes.py [--t 512 2048 8192] [--layers 8] [--modes eager default reduce-overhead]

Eager, a MoLLinear step at T <= 2048 costs more CPU than GPU time on the GPU hosts (RESULTS runs 13, 25: ~0.6-1.1 ms
of host time per layer fwd+bwd), so its wall time is the host's. torch.compile's "reduce-overhead" mode replays
the compiled forward and backward as CUDA graphs, which is what a user of a training loop can switch on without
capturing graphs by hand. For each T and mode this script times a stack of `--layers` 4096->4096 bf16 layers, one
after another with one loss at the end (so per-step overheads weigh as in a model, not once per layer), of:

* the bare frozen base (nn.Linear, x requiring grad),
* LoRA r=16 (MoLLinear with one expert: PEFT's ops),
* MoLLinear E=8 top-2 r=16 with its router and auxiliary loss (the fused Triton path),

each as wall time per step (forward, loss + the router losses, backward; the stack compiled, not the loss) over a
loop of steps with one synchronisation at the end (median of 5 rounds), and checks first that the compiled step
gives eager mode's output, loss and gradients (relative error under 2e-2: both run the same kernels, so they differ
only where inductor fuses the glue ops). First it times the host cost of one call of a trivial op (CPU tensors)
registered the two ways: through torch.library.custom_op, and as mol's ops are (gl.kernel_op: a schema and a
CompositeExplicitAutograd kernel), against a plain Python call.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(kind, n, layers):
    out = []
    for _ in range(layers):
        base = torch.nn.Linear(n, n, bias=False, device=DEV, dtype=DT)
        base.weight.requires_grad_(False)
        if kind == "base":
            out.append(base)
            continue
        e, k = (1, 1) if kind == "lora" else (8, 2)
        m = mol.MoLLinear(base, num_experts=e, top_k=k, rank=16, alpha=32).to(DEV)
        with torch.no_grad():
            m.lora_B.normal_(0, 0.02)  # never time (or check) on zeros
        out.append(m)
    return torch.nn.Sequential(*out)


def step_fn(model, fwd):
    """One training step of the stack: forward (fwd: the model, or it compiled), loss + the router losses,
    backward; as a training loop does it, the model is compiled, not the loss and backward."""
    def step(x, dy):
        y = fwd(x)
        loss = (y.float() * dy).sum() + mol.aux_loss(model)
        loss.backward()
        return y.detach(), loss.detach()
    return step


def wall_us(run, x, dy, params, steps=50, rounds=5):
    def one():
        for p in params:
            p.grad = None
        x.grad = None
        run(x, dy)
    for _ in range(10):
        one()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(times), min(times), max(times)


def dispatch_us(calls=20000):
    """Host µs per call of a trivial 4-argument op: a Python call, gl.kernel_op, torch.library.custom_op."""
    from mol.kernels import grouped_lora as gl

    def trivial(a: torch.Tensor, b: torch.Tensor, flag: bool, c: torch.Tensor | None) -> torch.Tensor:
        return a.new_empty(a.shape)

    def trivial2(a: torch.Tensor, b: torch.Tensor, flag: bool, c: torch.Tensor | None) -> torch.Tensor:
        return a.new_empty(a.shape)

    def fake(a, b, flag, c):
        return a.new_empty(a.shape)
    ours = gl.kernel_op("probe_dispatch_trivial")(trivial)
    torch.library.register_fake(ours)(fake)
    theirs = torch.library.custom_op("mol_probe::trivial", mutates_args=())(trivial2)
    theirs.register_fake(fake)
    a, b = torch.randn(8, 8), torch.randn(8)
    out = {}
    for name, fn in (("python call", trivial), ("gl.kernel_op", ours), ("torch.library.custom_op", theirs)):
        for _ in range(1000):
            fn(a, b, True, None)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(a, b, True, None)
        out[name] = (time.perf_counter() - t0) / calls * 1e6
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--modes", nargs="+", default=["eager", "default", "reduce-overhead"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("host µs per op call:", ", ".join(f"{k} {v:.1f}" for k, v in dispatch_us().items()), flush=True)
    torch.manual_seed(0)
    torch.autograd.set_multithreading_enabled(False)  # the backward on the calling thread, as mol.train runs it
    rows = []
    for kind in ("base", "lora", "mol"):
        m = make(kind, args.n, args.layers)
        params = [p for p in m.parameters() if p.requires_grad]
        eager_step = step_fn(m, m)
        for mode in args.modes:
            for t in args.t:
                torch._dynamo.reset()  # a static-shape compile per T, as a training run with fixed shapes gets
                run = eager_step if mode == "eager" else step_fn(m, torch.compile(
                    m, mode=None if mode == "default" else mode))
                x = torch.randn(t, args.n, device=DEV, dtype=DT, requires_grad=True)
                dy = torch.randn(t, args.n, device=DEV)
                if mode != "eager":  # the compiled step against eager on the same inputs
                    got = []
                    for fn in (eager_step, run):
                        for p in params:
                            p.grad = None
                        x.grad = None
                        y, loss = fn(x, dy)
                        got.append([y.clone(), loss.clone(), x.grad.clone()] + [p.grad.clone() for p in params])
                    err = max(rel(a, b) for a, b in zip(got[1], got[0]))
                    status = "ok" if err < 2e-2 else "MISMATCH"
                else:
                    err, status = 0.0, "-"
                med, lo, hi = wall_us(run, x, dy, params)
                rows.append((t, kind, mode, med, lo, hi, err, status))
                print(f"T={t} {kind} {mode}: {med:.1f} us/step ({lo:.1f}-{hi:.1f}), vs eager rel err {err:.1e} "
                      f"{status}", flush=True)
    print(f"\n{args.layers} layers, µs per step (per layer: divide by {args.layers}); × the bare stack in the same mode")
    print("\n| T | mode | bare base µs | LoRA r=16 µs (× base) | MoLLinear E=8 top-2 µs (× base) | MoL check |")
    print("| --- | --- | --- | --- | --- | --- |")
    by = {(t, k, mo): (med, err, st) for t, k, mo, med, lo, hi, err, st in rows}
    for t in args.t:
        for mode in args.modes:
            b = by[(t, "base", mode)][0]
            lo_, mo_ = by[(t, "lora", mode)], by[(t, "mol", mode)]
            print(f"| {t} | {mode} | {b:.1f} | {lo_[0]:.1f} ({lo_[0] / b:.2f}×) | {mo_[0]:.1f} ({mo_[0] / b:.2f}×) | "
                  f"{mo_[2]} {mo_[1]:.1e} |")
    if any(st == "MISMATCH" for *_, st in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
