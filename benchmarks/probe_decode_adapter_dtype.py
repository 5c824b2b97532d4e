"""GPU time of a captured decode forward with float32 against bf16 adapters, for one or more checkouts.

    python benchmarks/probe_decode_adapter_dtype.py [--rounds 2] [repo ...]

What a ``graph_inference_tokens`` replay runs: ``routed_lora_linear`` without gradients at T = 1, 8 and 16 tokens,
4096→4096 E=8 top-2 r=16, bf16 x and base weight, lora_A / lora_B in bf16 or in float32 (mol.inject's default
adapters on a bf16 model). Each row is captured in a CUDA graph of 20 calls and the graphs replayed in turn
(bench_layer.interleaved_graph_times, 7 rounds, medians), beside the bare F.linear: µs per call, so this is the
GPU's time, not the host's. Each repo (a checkout's root, default this one) runs in its own process, the repos
alternating round by round. Also prints each row's output sum (float32 against bf16 adapters differ by their
rounding; one row must agree between checkouts that compute the same function).
"""
import os
import subprocess
import sys

from probe_nf4_eager_host import rounds_and_repos

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import torch
import torch.nn.functional as F
from bench_layer import interleaved_graph_times
import mol.kernels.routed_lora as rl
g = torch.Generator("cuda").manual_seed(0)
n, E, r = 4096, 8, 16
W = torch.randn(n, n, device="cuda", generator=g).div_(n ** 0.5).bfloat16()
A32 = torch.randn(E, r, n, device="cuda", generator=g).div_(n ** 0.5)
B32 = torch.randn(E, n, r, device="cuda", generator=g).div_(r ** 0.5)
Wr = torch.randn(E, n, device="cuda", generator=g).div_(n ** 0.5)
A16, B16 = A32.bfloat16(), B32.bfloat16()
out = []
with torch.no_grad():
    for t in (1, 8, 16):
        x = torch.randn(t, n, device="cuda", generator=g).bfloat16()
        rows = {"bare F.linear": lambda: F.linear(x, W),
                "bf16 adapters": lambda: rl.routed_lora_linear(x, A16, B16, Wr, "topk", 2, 2.0, weight=W)[0],
                "float32 adapters": lambda: rl.routed_lora_linear(x, A32, B32, Wr, "topk", 2, 2.0, weight=W)[0]}
        sums = {k: float(f().float().sum()) for k, f in rows.items()}
        times = interleaved_graph_times(rows, n=20, rounds=7)
        out.append(" ".join(f"{k}={times[k][0] * 1e3:.2f}us(sum {sums[k]:.4f})" for k in rows))
print("RESULT", " | ".join(f"T={t}: {o}" for t, o in zip((1, 8, 16), out)))
"""


def main():
    rounds, repos = rounds_and_repos(sys.argv[1:])
    for i in range(rounds):
        for repo in repos:
            res = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(repo),
                                  os.path.join(os.path.abspath(repo), "benchmarks")], capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
            print(f"round {i} {repo}: " + (line[0][7:] if line else "FAILED " + res.stderr[-2000:]), flush=True)


if __name__ == "__main__":
    main()
