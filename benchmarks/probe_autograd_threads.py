"""Host cost of a backward pass: is it per layer or per backward call, and what does autograd's device thread cost?

    python benchmarks/probe_autograd_threads.py

bench_layer's host table times one MoLLinear per torch.autograd.grad call; with autograd's multithreading on
(the default) the backward of CUDA tensors runs on the engine's device thread, and on the device machines that
cost ~600 us more per call than with it off. This times (T=16, 4096->4096 bf16, GPU work tiny, so the time is
the CPU's) a bare nn.Linear, a Python autograd.Function that does nothing, one MoLLinear, and stacks of 4 and 8
of them in one backward, each with multithreading on and off: a per-call cost shows up as a constant, a
per-layer cost scales with the stack.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def host_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    torch.manual_seed(0)
    n = 4096
    x = torch.randn(16, n, device=DEV, dtype=DT, requires_grad=True)
    dy = torch.randn(16, n, device=DEV, dtype=DT)
    lin = torch.nn.Linear(n, n, bias=False, device=DEV, dtype=DT).requires_grad_(False)

    def stack(depth):
        layers = [mol.MoLLinear(torch.nn.Linear(n, n, bias=False, device=DEV, dtype=DT), num_experts=8, top_k=2,
                                rank=16, alpha=32).to(DEV) for _ in range(depth)]
        for m in layers:
            torch.nn.init.normal_(m.lora_B, std=0.01)
        params = [p for m in layers for p in m.parameters() if p.requires_grad]

        def run():
            h = x
            for m in layers:
                h = m(h)
            aux = sum(m.aux_loss() for m in layers)
            torch.autograd.grad([h, aux], [x] + params, [dy, torch.ones_like(aux)])
        return run

    cases = {
        "bare nn.Linear fwd+bwd": lambda: torch.autograd.grad(F.linear(x, lin.weight), [x], dy),
        "Python autograd.Function (identity) fwd+bwd": lambda: torch.autograd.grad(_Identity.apply(x), [x], dy),
        "1 MoLLinear fwd+bwd (router, aux loss)": stack(1),
        "4 MoLLinear in one backward": stack(4),
        "8 MoLLinear in one backward": stack(8),
    }
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs; host µs per call")
    print("| case | multithreading on (default) | off | on / layer | off / layer |")
    print("| --- | --- | --- | --- | --- |")
    for name, fn in cases.items():
        t = {}
        for mt in (True, False):
            torch.autograd.set_multithreading_enabled(mt)
            try:
                t[mt] = host_us(fn)
            finally:
                torch.autograd.set_multithreading_enabled(True)
        depth = int(name[0]) if name[0].isdigit() else 1
        print(f"| {name} | {t[True]:.0f} | {t[False]:.0f} | {t[True] / depth:.0f} | {t[False] / depth:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
