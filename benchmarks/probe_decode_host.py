"""Where an eager MoLLinear decode call spends the host's time, on a CUDA GPU.

    python benchmarks/probe_decode_host.py

One token, no grad, eval mode, 4096→4096 E=8 top-2 r=16, bf16 layer with float32 adapters (mol.inject's default;
the layer casts them once and reuses the copies). Host µs per call (best / median of 7 rounds of back-to-back
calls, no synchronisation inside a round) of: the whole layer call; the bare F.linear; the one-launch forward
(routed_lora.small_t_fwd_impl) with and without its Triton launch; the layer call without that launch (the rest
is our Python and ATen glue); and its seven output allocations as seven torch.empty against one float32 buffer
split into views (plus the two 16-bit outputs), the form a packed allocation would take.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
import mol.kernels.grouped_lora as gl  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402

DEV = "cuda"


def host_us(fn, calls: int = 500) -> str:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return f"{min(rounds):.1f} / {statistics.median(rounds):.1f}"


def main():
    n, e, rank, top_k, t = 4096, 8, 16, 2, 1
    r_tot = e * rank

    def seven_empties():
        torch.empty((t, n), device=DEV, dtype=torch.bfloat16)  # y
        torch.empty((t, r_tot + e), device=DEV, dtype=torch.float32)  # hl
        torch.empty((t, top_k), device=DEV, dtype=torch.float32)  # gates
        torch.empty((t, top_k), device=DEV, dtype=torch.int64)  # ids
        torch.empty((t, r_tot), device=DEV, dtype=torch.bfloat16)  # u
        torch.empty((2 * e + 2,), device=DEV, dtype=torch.float32)  # stats
        torch.empty((), device=DEV, dtype=torch.float32)  # aux

    sizes = [t * (r_tot + e), 2 * t * top_k + 4 * t * top_k, 2 * e + 2, 1]

    def one_buffer():
        torch.empty((t, n), device=DEV, dtype=torch.bfloat16)
        torch.empty((t, r_tot), device=DEV, dtype=torch.bfloat16)
        hl, small, stats, aux = torch.empty(sum(sizes), device=DEV, dtype=torch.float32).split_with_sizes(sizes)
        hl.view(t, r_tot + e), small[:t * top_k].view(t, top_k), aux.view(())
        small[4 * t * top_k:].view(torch.int64).view(t, top_k)

    base = torch.nn.Linear(n, n, bias=False, device=DEV, dtype=torch.bfloat16)
    layer = mol.MoLLinear(base, num_experts=e, top_k=top_k, rank=rank, alpha=2 * rank,
                          adapter_dtype="float32").to(DEV).eval()
    x = torch.randn(1, 1, n, device=DEV, dtype=torch.bfloat16)
    rows = {}
    with torch.no_grad():
        lora_A, lora_B = layer._adapters_in(torch.bfloat16)
        args = (x.view(1, n), None, lora_A.reshape(r_tot, n), layer.router.weight, base.weight, None, None, lora_B,
                None, rank, 0, top_k, layer.scaling, layer.aux_loss_coef, layer.z_loss_coef)
        rows["MoLLinear decode call"] = host_us(lambda: layer(x))
        rows["bare F.linear"] = host_us(lambda: torch.nn.functional.linear(x, base.weight))
        rows["small_t_fwd_impl"] = host_us(lambda: rl.small_t_fwd_impl(*args))
        launch = gl._launch
        gl._launch = lambda *a, **k: None
        try:
            rows["small_t_fwd_impl, launch stubbed"] = host_us(lambda: rl.small_t_fwd_impl(*args))
            rows["MoLLinear decode call, launch stubbed"] = host_us(lambda: layer(x))
        finally:
            gl._launch = launch
        rows["its outputs: seven torch.empty"] = host_us(seven_empties, 2000)
        rows["its outputs: two torch.empty + one float32 buffer split into views"] = host_us(one_buffer, 2000)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| what | host µs per call, best / median of 7 rounds |")
    print("| --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
