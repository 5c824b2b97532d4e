"""Host (CPU) cost of one MoLLinear on the Triton path, measured on the GPU machine, piece by piece.

    python benchmarks/profile_host.py [--t 16 512 2048 8192] [--calls 50] [--no-cprofile] [--adapter-dtype auto]

Eager, a layer's wall time is max(its GPU time, its host time); on the GPU hosts an eager MoLLinear fwd+bwd costs
~0.7-1.6 ms of CPU (RESULTS runs 9-19, 34), which is what bounds the eager T=512 row and the model-level step, and
on a slow host even T=8192's. Prints
(1) host microseconds per call (no synchronisation inside the timed loop, the GPU held busy by a sleep kernel so
that it never makes the host wait, whatever T) of whole fwd+bwd steps: the bare base,
PEFT-style LoRA, MoLLinear with the backward on autograd's worker thread and on the calling thread, and the no-grad
forward; (2) the host cost of each piece the layer calls (our launchers, a trivial Triton launch, small torch ops,
an empty autograd.Function), each best of 5 rounds; (3) a cProfile of the fwd+bwd step (calling-thread backward,
so the profile sees it), top functions by own time.
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
from mol.kernels import base_gemm as bg  # noqa: E402
from mol.kernels import grouped_lora as gl  # noqa: E402
from mol.kernels import routed_lora as rl  # noqa: E402
from probe_autograd_threads import _Identity  # noqa: E402  (a Function whose backward does nothing)


@triton.jit
def _empty3(a_ptr, b_ptr, n):
    pass


@triton.jit
def _empty24(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, f0, f1, f2, n0, n1, n2, n3, n4, n5, n6,
             A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
    pass


_empty3_tuned = triton.autotune(configs=[triton.Config({}, num_warps=4)], key=["n"])(_empty3)


class _TenOps(_Identity):
    """A Python backward of ten small torch ops: what moving a backward onto autograd's worker thread costs."""
    @staticmethod
    def backward(ctx, dy):
        for _ in range(10):
            dy = torch.mm(dy, dy.t()[:, :dy.shape[1]]) if dy.shape[0] >= dy.shape[1] else dy * 1.0
        return dy


def host_us(fn, calls: int, rounds: int = 5) -> float:
    """Best over rounds of the mean host time per call, no synchronisation inside a round. Each round starts
    behind a GPU sleep longer than the round, so the GPU never makes the host wait: at large T, where a step's
    GPU work outlasts its host work, this still measures the host. (Keep calls x launches per call under the
    driver's queue of ~1000 pending launches: past it, a launch blocks until the GPU drains some.)"""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda._sleep(int(calls * 4e6))  # ~2 ms of GPU clock per call
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, nargs="+", default=[16, 512, 2048, 8192])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--adapter-dtype", choices=["base", "auto"], default="base",
                    help="MoLLinear's adapter_dtype: 'auto' gives the bf16 layer float32 adapters, as mol.inject does")
    args = ap.parse_args()
    dev, dt, n = "cuda", torch.bfloat16, 4096
    torch.manual_seed(0)
    base = torch.nn.Linear(n, n, bias=False, device=dev, dtype=dt).requires_grad_(False)
    m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend="triton",
                      adapter_dtype=args.adapter_dtype).to(dev)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.01)
    params = [m.lora_A, m.lora_B, m.router.weight]
    lora_a = torch.randn(16, n, device=dev, dtype=dt, requires_grad=True)
    lora_b = torch.zeros(n, 16, device=dev, dtype=dt, requires_grad=True)
    one = torch.ones((), device=dev)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{os.cpu_count()} CPUs, {m.lora_A.dtype} adapters; host us per call (best of 5 rounds of {args.calls})")

    for t in args.t:
        x = torch.randn(t, n, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(t, n, device=dev, dtype=dt)

        def bare():
            torch.autograd.grad(torch.nn.functional.linear(x, base.weight), [x], dy)

        def peft():
            y = base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b) * 2.0
            torch.autograd.grad(y, [x, lora_a, lora_b], dy)

        def mol_step():
            y = m(x)
            torch.autograd.grad([y, m.aux_loss()], [x] + params, [dy, one])

        def mol_fwd():
            with torch.no_grad():
                m(x)

        rows = {"bare nn.Linear fwd+bwd": bare, "PEFT-style LoRA r=16 fwd+bwd": peft,
                "MoLLinear fwd+bwd (worker-thread backward)": mol_step}
        out = {k: host_us(f, args.calls) for k, f in rows.items()}
        torch.autograd.set_multithreading_enabled(False)
        out["MoLLinear fwd+bwd (calling-thread backward)"] = host_us(mol_step, args.calls)
        torch.autograd.set_multithreading_enabled(True)
        out["MoLLinear no-grad forward"] = host_us(mol_fwd, args.calls)
        print(f"\nT={t}: whole steps")
        for k, v in out.items():
            print(f"   {k:48s} {v:8.1f}")

    # pieces, at T=512 (the large-T sequence; SMALL_T_MAX covers T <= 16)
    t = 512
    x = torch.randn(t, n, device=dev, dtype=dt)
    dy = torch.randn(t, n, device=dev, dtype=dt)
    a_cat = m.lora_A.detach().to(dt).reshape(128, n)
    wr = m.router.weight.detach()
    lb = m.lora_B.detach().to(dt)
    hl, stats, _ = rl.route_shrink_impl(x, None, a_cat, wr)
    gates, ids, u, aux = rl.gate_fwd_impl(hl, stats, None, 128, 16, 0, 2, 2.0, dt, 0.01, 0.001)
    du = rl.lora_du_impl(dy, lb)
    small = torch.empty(16, device=dev)
    pieces = {
        "triton empty kernel, 3 args": lambda: _empty3[(1,)](small, small, 16),
        "triton empty kernel, 20 args + 4 constexpr": lambda: _empty24[(1,)](
            *([small] * 10), 1.0, 2.0, 3.0, *range(7), A=1, B=2, C=3, D=4),
        "triton empty kernel via autotune (1 config)": lambda: _empty3_tuned[(1,)](small, small, 16),
        "torch.empty((512, 224))": lambda: torch.empty((512, 224), device=dev),
        "torch.zeros(18)": lambda: torch.zeros(18, device=dev),
        "torch.mm(u, b_cat)": lambda: torch.mm(u, gl._b_cat(lb)),
        "torch.mm(out_dtype=float32)": lambda: torch.mm(x, a_cat.t(), out_dtype=torch.float32),
        "torch.cat([a_cat, wr.to(bf16)])": lambda: torch.cat([a_cat, wr.to(dt)]),
        "route_shrink_impl (parts kernel + GEMM)": lambda: rl.route_shrink_impl(x, None, a_cat, wr),
        "gate_fwd_impl": lambda: rl.gate_fwd_impl(hl, stats, None, 128, 16, 0, 2, 2.0, dt, 0.01, 0.001),
        "lora_du_impl": lambda: rl.lora_du_impl(dy, lb),
        "gate_bwd_impl": lambda: rl.gate_bwd_impl(du, hl, None, gates, ids, stats, aux, 16, 0, 2.0, 0.01, 0.001,
                                                  dt),
        "gl._grad_b": lambda: gl._grad_b(dy, u, lb),
        "bg.triton_base_mm x W^T + u B_cat (five TMA descriptors)": lambda: bg.triton_base_mm(
            x, base.weight, True, u, gl._b_cat(lb), False, None, bg.CONFIGS[0]),
        "bg._cublas x W^T + u B_cat (mm + addmm_)": lambda: bg._cublas(x, base.weight, True, u, gl._b_cat(lb),
                                                                      False, None),
        "rl._check": lambda: rl._check(x, None, m.lora_A, m.lora_B, base.weight, None, None, n),
    }
    sq = torch.randn(16, 16, device=dev, requires_grad=True)
    print("\nautograd.Function apply + grad, host us per call: worker-thread / calling-thread backward")
    for name, fn in (("trivial backward", lambda: torch.autograd.grad(_Identity.apply(sq), [sq], sq)),
                     ("backward of ten 16x16 mm", lambda: torch.autograd.grad(_TenOps.apply(sq), [sq], sq)),
                     ("no Python backward: F.linear 16x16", lambda: torch.autograd.grad(
                         torch.nn.functional.linear(sq, sq.detach()), [sq], sq))):
        worker = host_us(fn, args.calls)
        torch.autograd.set_multithreading_enabled(False)
        calling = host_us(fn, args.calls)
        torch.autograd.set_multithreading_enabled(True)
        print(f"   {name:48s} {worker:8.1f} / {calling:8.1f}")
    print(f"\npieces (T={t}), host us per call")
    with torch.no_grad():
        for name, fn in pieces.items():
            try:
                print(f"   {name:48s} {host_us(fn, args.calls):8.1f}")
            except Exception as exc:  # a piece whose signature moved: say so, keep the rest
                print(f"   {name:48s} failed: {type(exc).__name__}: {exc}")

    if not args.no_cprofile:
        x = torch.randn(512, n, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(512, n, device=dev, dtype=dt)

        def step():
            y = m(x)
            torch.autograd.grad([y, m.aux_loss()], [x] + params, [dy, one])
        torch.autograd.set_multithreading_enabled(False)
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            step()
        prof.disable()
        torch.cuda.synchronize()
        print(f"\ncProfile of {args.calls} fwd+bwd steps at T=512 (calling-thread backward)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
