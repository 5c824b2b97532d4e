"""Where the host time of one Triton launch goes: the routed layer's gate-forward kernel, piece by piece.

    python benchmarks/probe_launch_cost.py

Times (host µs per call, GPU held busy so the host never waits, best of 5 rounds of 200) the launch as the layer
makes it (`kernel[grid](...)`), then its parts inside triton's JITFunction.run (triton 3.6: the binder that
specializes the arguments, the cache key, launch_metadata, the C launcher `kernel.run`, the stream lookup), a
launch that skips the binder's cache path, and a few small torch ops for scale. RESULTS run 44: a warm launch is
~28 µs, of which the C launcher is 7.5-14 and the binder 6.3, so a launch path of our own would save ~10 µs of a
step's ~1 ms.
"""
import cProfile
import io
import os
import pstats
import sys
import time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch, triton
import mol
from mol.kernels import routed_lora as rl, grouped_lora as gl

dev, dt, n = "cuda", torch.bfloat16, 4096

def host_us(fn, calls=200, rounds=5):
    for _ in range(20): fn()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(rounds):
        torch.cuda._sleep(int(2e8))  # keep the GPU busy so the host never waits
        t0 = time.perf_counter()
        for _ in range(calls): fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best

t = 512
x = torch.randn(t, n, device=dev, dtype=dt)
base = torch.nn.Linear(n, n, bias=False, device=dev, dtype=dt).requires_grad_(False)
m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend="triton").to(dev)
a_cat = m.lora_A.detach().reshape(128, n)
wr = m.router.weight.detach()
hl, stats, _ = rl.route_shrink_impl(x, None, a_cat, wr)
gates, ids, u, aux = rl.gate_fwd_impl(hl, stats, None, 128, 16, 0, 2, 2.0, dt, 0.01, 0.001)

# capture the exact launch gate_fwd_impl makes
captured = {}
fn = rl._gate_fwd_kernel
orig_run = fn.run
def spy(*args, grid, warmup, **kwargs):
    captured.update(args=args, grid=grid, kwargs=kwargs)
    return orig_run(*args, grid=grid, warmup=warmup, **kwargs)
fn.run = spy
rl.gate_fwd_impl(hl, stats, None, 128, 16, 0, 2, 2.0, dt, 0.01, 0.001)
fn.run = orig_run
args, grid, kwargs = captured["args"], captured["grid"], captured["kwargs"]
print(f"triton {triton.__version__}; gate_fwd launch: {len(args)} args, {len(kwargs)} kwargs, grid {grid}")

res = {}
res["gate_fwd_impl (4 allocs + launch)"] = host_us(
    lambda: rl.gate_fwd_impl(hl, stats, None, 128, 16, 0, 2, 2.0, dt, 0.01, 0.001))
res["fn[grid](*args, **kw)"] = host_us(lambda: fn[grid](*args, **kwargs))
dc = fn.device_caches[torch.cuda.current_device()]
print("device_caches entry:", [type(v).__name__ for v in dc])
binder = dc[-1]
kernel_cache = dc[0]
res["binder(*args, **kw)"] = host_us(lambda: binder(*args, **kwargs))
bound_args, spec, options = binder(*args, **kwargs)
res["str(options)"] = host_us(lambda: str(options))
res["tuple(specialization)"] = host_us(lambda: tuple(spec))
key_fn = getattr(triton.runtime.jit, "compute_cache_key", None)
if key_fn is not None and len(dc) == 5:
    res["compute_cache_key"] = host_us(lambda: key_fn(dc[1], spec, options))
    key = key_fn(dc[1], spec, options)
else:
    key = None
kernel = fn.run(*args, grid=grid, warmup=True, **kwargs)
stream = torch.cuda.current_stream().cuda_stream
vals = list(bound_args.values())
res["kernel.launch_metadata"] = host_us(lambda: kernel.launch_metadata(grid, stream, *vals))
from triton import knobs
lm = kernel.launch_metadata(grid, stream, *vals)
enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
g3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
res["kernel.run (C launcher)"] = host_us(
    lambda: kernel.run(*g3, stream, kernel.function, kernel.packed_metadata, lm, enter, exit_, *vals))
drv = triton.runtime.driver.active
res["get_current_device+stream"] = host_us(lambda: drv.get_current_stream(drv.get_current_device()))
res["torch.cuda.current_stream().cuda_stream"] = host_us(lambda: torch.cuda.current_stream().cuda_stream)
cache = {}
def fast():
    b, s, o = binder(*args, **kwargs)
    k = cache.get(tuple(s[:]) if not isinstance(s, tuple) else s)
    if k is None:
        k = cache[tuple(s)] = kernel
    v = b.values()
    k.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
          torch.cuda.current_stream().cuda_stream, k.function, k.packed_metadata, None, None, None, *v)
try:
    res["fast: binder + dict + run"] = host_us(fast)
except Exception as e:
    print("fast failed", type(e).__name__, e)
def fastest():
    kernel.run(grid[0], 1, 1, torch.cuda.current_stream().cuda_stream, kernel.function, kernel.packed_metadata,
               None, None, None, *vals)
try:
    res["fastest: run only, no hooks"] = host_us(fastest)
except Exception as e:
    print("fastest failed", type(e).__name__, e)
for k, v in res.items():
    print(f"  {k:45s} {v:7.1f} us")
pr = cProfile.Profile(); pr.enable()
for _ in range(100): fn[grid](*args, **kwargs)
pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14); print(s.getvalue()[:3500])
la = m.lora_A.detach()
ops = {
    "lora_A.reshape(128, n)": lambda: la.reshape(128, n),
    "lora_A.view(128, n)": lambda: la.view(128, n),
    "x.t()": lambda: x.t(),
    "x[:64]": lambda: x[:64],
    "gl._b_cat (permute+reshape)": lambda: gl._b_cat(m.lora_B),
    "torch.empty((512,16))": lambda: torch.empty((512, 16), device=dev),
    "gl._alloc((512,16), x)": lambda: gl._alloc((512, 16), x),
    "python call of a no-op function x10": lambda: [(lambda: None)() for _ in range(10)],
    "FusedRouterOutput(...)": lambda: mol.routers.FusedRouterOutput(gates, ids, hl, 8, stats, aux),
    "m.__setattr__('_last', None)": lambda: setattr(m, "_last", None),
    "object.__setattr__": lambda: object.__setattr__(m, "_last", None),
}
for k, f in ops.items():
    print(f"  {k:45s} {host_us(f):7.2f} us")
