"""Where the host time of one Triton launch goes: the routed layer's gate-forward kernel, piece by piece.

    python benchmarks/probe_launch_cost.py

Times (host µs per call, the GPU held busy so the host never waits: profile_host.host_us, 200 calls a round) the
launch as the layer makes it (`kernel[grid](...)`), then its parts inside triton's JITFunction.run (triton 3.6:
the binder that specializes the arguments, the cache key, launch_metadata, the C launcher `kernel.run`, the stream
lookup), a launch that skips the cache key, the C launcher alone, and a few small torch ops for scale; then a
cProfile of 100 launches. RESULTS run 44: a warm launch is ~28 µs, of which the C launcher is 7.5-14 and the binder
6.3, so a launch path of our own would save ~4 µs of a layer step's ~1 ms. Leans on triton's internals: a part a
later triton moved is reported as failed, the rest still timed.
"""
import cProfile
import io
import os
import pstats
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mol  # noqa: E402
import profile_host  # noqa: E402
from mol.kernels import grouped_lora as gl  # noqa: E402
from mol.kernels import routed_lora as rl  # noqa: E402

DEV, DT, N, T = "cuda", torch.bfloat16, 4096, 512


def host_us(fn) -> float:
    """profile_host's timer (the GPU held busy by a sleep, best of 5 rounds) over 200 calls a round."""
    return profile_host.host_us(fn, 200)


def captured_launch(gate_fwd):
    """(args, grid, kwargs) of the launch gate_fwd() makes, caught at JITFunction.run."""
    fn, seen = rl._gate_fwd_kernel, {}
    run = fn.run

    def spy(*args, grid, warmup, **kwargs):
        seen.update(args=args, grid=grid, kwargs=kwargs)
        return run(*args, grid=grid, warmup=warmup, **kwargs)
    fn.run = spy
    try:
        gate_fwd()
    finally:
        fn.run = run
    return seen["args"], seen["grid"], seen["kwargs"]


def main():
    x = torch.randn(T, N, device=DEV, dtype=DT)
    base = torch.nn.Linear(N, N, bias=False, device=DEV, dtype=DT).requires_grad_(False)
    m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend="triton").to(DEV)
    a_cat, wr = m.lora_A.detach().reshape(128, N), m.router.weight.detach()
    hl, stats, _ = rl.route_shrink_impl(x, None, a_cat, wr)

    def gate_fwd():
        return rl.gate_fwd_impl(hl, stats, None, 128, 16, 0, 2, 2.0, DT, 0.01, 0.001)
    gates, ids, u, aux = gate_fwd()
    fn = rl._gate_fwd_kernel
    args, grid, kwargs = captured_launch(gate_fwd)
    grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    print(f"{torch.cuda.get_device_name()}; triton {triton.__version__}; the gate-forward launch: {len(args)} "
          f"arguments, {len(kwargs)} keywords, grid {grid}")

    pieces = {"gate_fwd_impl (4 allocations + the launch)": gate_fwd,
              "fn[grid](*args, **kwargs)": lambda: fn[grid](*args, **kwargs)}
    try:
        binder = fn.device_caches[torch.cuda.current_device()][-1]
        bound, spec, options = binder(*args, **kwargs)
        kernel = fn.run(*args, grid=grid, warmup=True, **kwargs)
        vals = list(bound.values())
        stream = torch.cuda.current_stream().cuda_stream
        meta = kernel.launch_metadata(grid, stream, *vals)
        hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
        drv = triton.runtime.driver.active
        pieces.update({
            "binder(*args, **kwargs)": lambda: binder(*args, **kwargs),
            "compute_cache_key": lambda: triton.runtime.jit.compute_cache_key(
                fn.device_caches[torch.cuda.current_device()][1], spec, options),
            "kernel.launch_metadata": lambda: kernel.launch_metadata(grid, stream, *vals),
            "kernel.run (the C launcher)": lambda: kernel.run(*grid3, stream, kernel.function,
                                                               kernel.packed_metadata, meta, *hooks, *vals),
            "driver: current device + stream": lambda: drv.get_current_stream(drv.get_current_device()),
            "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
            "binder + kernel.run (no cache key, no hooks)": lambda: kernel.run(
                *grid3, torch.cuda.current_stream().cuda_stream, kernel.function, kernel.packed_metadata, None,
                None, None, *binder(*args, **kwargs)[0].values()),
        })
    except Exception as exc:  # another triton's internals: time what still works
        print(f"triton internals not as in 3.6 ({type(exc).__name__}: {exc}); timing the launch only")
    la = m.lora_A.detach()
    pieces.update({
        "lora_A.reshape(128, in)": lambda: la.reshape(128, N),
        "x.t()": lambda: x.t(),
        "gl._b_cat (permute + reshape)": lambda: gl._b_cat(m.lora_B),
        "torch.empty((512, 16))": lambda: torch.empty((512, 16), device=DEV),
        "ten calls of a no-op Python function": lambda: [(lambda: None)() for _ in range(10)],
        "FusedRouterOutput(...)": lambda: mol.routers.FusedRouterOutput(gates, ids, hl, 8, stats, aux),
        "nn.Module.__setattr__ of a plain attribute": lambda: setattr(m, "_last", None),
        "object.__setattr__ of it": lambda: object.__setattr__(m, "_last", None),
    })
    for name, piece in pieces.items():
        try:
            print(f"  {name:48s} {host_us(piece):7.2f} us")
        except Exception as exc:
            print(f"  {name:48s} failed: {type(exc).__name__}: {exc}")

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        fn[grid](*args, **kwargs)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    print(f"\ncProfile of 100 launches\n{out.getvalue()[:3500]}")


if __name__ == "__main__":
    main()
