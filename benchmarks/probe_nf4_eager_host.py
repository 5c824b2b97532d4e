"""Host time of an eager NF4Linear decode call (no CUDA graph), for one or more checkouts, on a CUDA GPU.

    python benchmarks/probe_nf4_eager_host.py [--rounds 2] [repo ...]

Each repo (a checkout's root, default this one) runs in its own process, the repos alternating round by round
so that the host's drift hits them alike. A process quantizes one 4096->4096 bf16 nn.Linear (fixed seed) and, at
T = 1, 3, 8 and 16 tokens (T <= 2: the Triton FMA kernel; 3..16: the Gluon MMA kernel where Triton has Gluon),
times 5 x 200 no-grad calls with one synchronisation each, after 10 warm-up calls (the first call of a shape
autotunes). Prints host µs per call (median of the 5) and each output's sum, which must agree between checkouts
that compute the same function. RESULTS run 46 (calls 7 and 8) measured 1414e32 and 717faf3 this way.
"""
import os
import subprocess
import sys

CHILD = r"""
import statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from mol.quant import NF4Linear
torch.manual_seed(0)
q = NF4Linear.from_linear(torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16))
row = []
with torch.no_grad():
    for t in (1, 3, 8, 16):
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(t))
        for _ in range(10):
            q(x)
        host = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                q(x)
            host.append((time.perf_counter() - t0) / 200 * 1e6)
        torch.cuda.synchronize()
        row.append(f"{statistics.median(host):.1f} ({q(x).double().sum().item():.6e})")
print(" | ".join(row))
"""


def rounds_and_repos(argv: list[str]) -> tuple[int, list[str]]:
    """``[--rounds N] [repo ...]``: N (default 2) and the checkouts to alternate (default this one)."""
    rounds = 2
    if argv[:1] == ["--rounds"]:
        rounds, argv = int(argv[1]), argv[2:]
    return rounds, argv or [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]


def main():
    rounds, repos = rounds_and_repos(sys.argv[1:])
    print("| round | repo | T=1 µs (y sum) | T=3 | T=8 | T=16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in range(rounds):
        for repo in repos:
            out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(repo)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{repo}: {out.stderr[-2000:]}")
            print(f"| {r + 1} | {repo} | {out.stdout.strip()} |", flush=True)


if __name__ == "__main__":
    main()
