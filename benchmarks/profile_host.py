"""Python-level host profile (cProfile) of one MoLLinear forward+backward at T=16 on the GPU, where the GPU
work is tiny and every microsecond is host time.   python benchmarks/profile_host.py [backend]"""
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "triton"
    base = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend=backend).cuda()
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    params = [m.lora_A, m.lora_B, m.router.weight]
    one = torch.ones((), device="cuda")

    def step():
        y = m(x)
        torch.autograd.grad([y, m.aux_loss()], [x] + params, [dy, one])

    def fwd():
        with torch.no_grad():
            m(x)
    for fn, name in ((step, "fwd+bwd"), (fwd, "fwd no_grad")):
        for _ in range(30):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"{name}: {(t1 - t0) / 200 * 1e6:.0f} us host per call ({(time.perf_counter() - t0) / 200 * 1e6:.0f} with sync)")
    from mol.kernels import routed_lora as rl
    xd = x.detach()
    a_cat = m.lora_A.detach().reshape(128, 4096)
    wr = m.router.weight.detach()
    hl = rl.route_shrink_impl(xd, None, a_cat, wr)
    gates, ids, u, stats, aux = rl.gate_fwd_impl(hl, None, 128, 16, 0, 2, 2.0, torch.bfloat16, 0.01, 0.001)
    du = rl.lora_du_impl(dy, m.lora_B.detach())
    pieces = {
        "torch.zeros(33)": lambda: torch.zeros(33, device="cuda"),
        "torch.empty((16,2))": lambda: torch.empty((16, 2), device="cuda"),
        "F.linear T=16": lambda: torch.nn.functional.linear(xd, base.weight),
        "torch.mm T=16 (16x4096 @ 4096x128)": lambda: torch.mm(xd, a_cat.t()),
        "route_shrink_impl": lambda: rl.route_shrink_impl(xd, None, a_cat, wr),
        "gate_fwd_impl (+aux kernel, 5 allocs)": lambda: rl.gate_fwd_impl(hl, None, 128, 16, 0, 2, 2.0, torch.bfloat16, 0.01, 0.001),
        "lora_du_impl": lambda: rl.lora_du_impl(dy, m.lora_B.detach()),
        "gate_bwd_impl": lambda: rl.gate_bwd_impl(du, hl, None, gates, ids, stats, aux, 16, 0, 2.0, 0.01, 0.001, torch.bfloat16),
        "MoLLinear forward, no_grad": lambda: m(xd),
    }
    with torch.no_grad():
        for name, fn in pieces.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(300):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            print(f"   host {name}: {(t1 - t0) / 300 * 1e6:.1f} us")
    from torch.profiler import ProfilerActivity, profile
    for T in (16, 8192):
        x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        ev = [e for e in p.key_averages() if e.device_time_total > 0 or e.self_device_time_total > 0]
        tot = sum(e.self_device_time_total for e in ev) / 10
        print(f"T={T}: GPU busy {tot:.0f} us per fwd+bwd; kernels:")
        for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:14]:
            if e.self_device_time_total > 0:
                print(f"   {e.key[:70]:70s} {e.self_device_time_total / 10:8.1f} us  x{e.count // 10}")
        cpu = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        print("   top self-CPU:", ", ".join(f"{e.key[:30]} {e.self_cpu_time_total / 10:.0f}us" for e in cpu))
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
