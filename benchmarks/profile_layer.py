"""Where a MoLLinear forward+backward spends its time: host cost per kind of launch, and GPU time per kernel.

    python benchmarks/profile_layer.py [--out profile.md] [--t 8192 512 16] [--backends triton torch] [--kernels-only]

1. Host (CPU) microseconds per call of the building blocks a layer is made of, on tiny tensors so the
   GPU never waits: an allocation, a small torch.mm, a plain Triton kernel launched three ways
   (``kernel[grid](...)``, ``JITFunction.run`` with the grid, and the compiled kernel's own launcher),
   and whole layers (bare base, PEFT-style LoRA, MoLLinear on each backend) at T=16.
2. torch.profiler's CUDA time per kernel for one MoLLinear forward+backward (E=8, top-2, r=16, router
   included) at T=8192 and T=512, 4096->4096, bf16, on each backend.
"""
import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def host_us(fn, n=300):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def layer(kind, backend, n_in=4096, n_out=4096, experts=(8, 2, 16)):
    base = torch.nn.Linear(n_in, n_out, bias=False, device=DEV, dtype=DT)
    if kind == "base":
        return base
    if kind == "lora":
        m = mol.MoLLinear(base, num_experts=1, rank=16, alpha=32, backend=backend)
    else:
        e, k, r = experts
        m = mol.MoLLinear(base, num_experts=e, top_k=k, rank=r, alpha=2 * r, backend=backend)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.02)
    return m.to(DEV)


def fwd_bwd(m, x, dy, aux=True):
    params = [p for p in m.parameters() if p.requires_grad]

    def run():
        y = m(x)
        loss_extra = m.aux_loss() if aux and getattr(m, "router", None) is not None else None
        if loss_extra is not None:
            torch.autograd.grad([y, loss_extra], [x] + params, [dy, torch.ones_like(loss_extra)])
        else:
            torch.autograd.grad(y, [x] + params, dy)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--t", type=int, nargs="+", default=[8192, 512, 16], help="token counts of the kernel tables")
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"])
    ap.add_argument("--kernels-only", action="store_true", help="skip the host-cost table")
    ap.add_argument("--experts", type=int, nargs=3, default=[8, 2, 16], metavar=("E", "K", "R"),
                    help="the routed layer of the kernel tables: experts, top-k, rank")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_layer.py needs a CUDA GPU and none is visible here")
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", "",
             "| host cost per call | µs |", "| --- | --- |"]
    a = torch.randn(16, 16, device=DEV, dtype=DT)
    xs = torch.randn(4096, device=DEV)
    ys = torch.empty_like(xs)
    grid = (4,)
    compiled = _copy_kernel[grid](xs, ys, xs.numel(), BLOCK=1024)
    stream = torch.cuda.current_stream().cuda_stream
    rows = {
        "torch.empty((16, 16))": lambda: torch.empty((16, 16), device=DEV, dtype=DT),
        "torch.mm 16x16": lambda: torch.mm(a, a),
        "triton kernel[grid](...)": lambda: _copy_kernel[grid](xs, ys, xs.numel(), BLOCK=1024),
        "triton JITFunction.run(grid=, warmup=False)": lambda: _copy_kernel.run(
            xs, ys, xs.numel(), BLOCK=1024, grid=grid, warmup=False),
        "triton CompiledKernel.run(raw launcher)": lambda: compiled.run(
            4, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, xs, ys, xs.numel(), 1024),
    }
    for name, fn in ({} if args.kernels_only else rows).items():
        try:
            lines.append(f"| {name} | {host_us(fn):.1f} |")
        except Exception as ex:
            lines.append(f"| {name} | failed: {type(ex).__name__}: {str(ex)[:80]} |")
        print(lines[-1], flush=True)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for T in () if args.kernels_only else (16,):
        x = torch.randn(T, 4096, device=DEV, dtype=DT, generator=gen).requires_grad_()
        dy = torch.randn(T, 4096, device=DEV, dtype=DT, generator=gen)
        for kind, backend in (("base", "auto"), ("lora", "torch"), ("mol", "torch"), ("mol", "triton")):
            m = layer(kind, backend)
            lines.append(f"| T={T} fwd+bwd {kind} ({backend}) | {host_us(fwd_bwd(m, x, dy), 100):.0f} |")
            print(lines[-1], flush=True)
            if kind == "mol":
                lines.append(f"| T={T} fwd+bwd {kind} ({backend}), no aux loss | "
                             f"{host_us(fwd_bwd(m, x, dy, aux=False), 100):.0f} |")
                print(lines[-1], flush=True)
            with torch.no_grad():
                lines.append(f"| T={T} fwd only {kind} ({backend}) | {host_us(lambda: m(x), 100):.0f} |")
            print(lines[-1], flush=True)

    from torch.profiler import ProfilerActivity, profile
    for T in args.t:
        x = torch.randn(T, 4096, device=DEV, dtype=DT, generator=gen).requires_grad_()
        dy = torch.randn(T, 4096, device=DEV, dtype=DT, generator=gen)
        for backend in args.backends:
            m = layer("mol", backend, experts=args.experts)
            run = fwd_bwd(m, x, dy)
            for _ in range(5):
                run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
            sort = "cpu_time_total" if T == 16 else "self_cuda_time_total"
            e, k, r = args.experts
            lines += ["", f"### T={T} MoLLinear E={e} top-{k} r={r} backend={backend}, 5 fwd+bwd", "", "```",
                      prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=50),
                      "```"]
            print("\n".join(lines[-4:]), flush=True)
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
