"""Why the decode row moves between processes: which small-T config each process's autotuner picks, and how fast.

    python benchmarks/probe_decode_tuning.py [--processes 4] [--t 1]

RESULTS run 23: the same MoLLinear (4096->4096 E=8 top-2 r=16, bf16) took 17.7 us at T=1 in one process and 16.3 in
two others. Each of `--processes` fresh processes builds that layer, runs its forward once (the small-T kernel's
autotuner picks a config), and prints the config it chose and the forward's CUDA-graph time (median of 3
do_bench_cudagraph rounds). The last process then times every config of the autotune list itself, each forced in
turn, so a slow process can be told apart as a worse pick (its config is slow here too) or as the same config
running slower in that process (placement, clocks).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def one(T: int, every: bool) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch
    from triton.testing import do_bench_cudagraph

    import mol
    import mol.kernels.grouped_lora as gl
    import mol.kernels.routed_lora as rl

    g = torch.Generator(device="cuda").manual_seed(0)
    n = 4096
    base = torch.nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16)
    m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32.0, backend="triton").to("cuda")
    x = torch.randn(T, n, device="cuda", generator=g).bfloat16()

    def fwd():
        m(x)

    def timed():
        with torch.no_grad():
            return statistics.median(do_bench_cudagraph(fwd, rep=100) * 1e3 for _ in range(3))
    with torch.no_grad():
        fwd()
    key = next(k for k in gl._CHOSEN if k[0] == "small_t")
    out = {"chosen": gl._CHOSEN[key][0], "num_warps": gl._CHOSEN[key][1].get("num_warps"), "us": timed()}
    if every:
        tuner = rl._small_t_fma if key[1] else rl._small_t_dot
        out["every"] = []
        for cfg in tuner.configs:
            gl._CHOSEN[key] = (cfg.kwargs, cfg.all_kwargs())
            out["every"].append((str(cfg), timed()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--t", type=int, default=1)
    ap.add_argument("--child", choices=["pick", "every"], default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.t, args.child == "every")))
        return
    for i in range(args.processes):
        kind = "every" if i == args.processes - 1 else "pick"
        res = subprocess.run([sys.executable, __file__, "--t", str(args.t), "--child", kind], capture_output=True,
                             text=True)
        if res.returncode:
            print(res.stderr[-2000:])
            sys.exit(1)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"process {i}: T={args.t} picked {r['chosen']} (num_warps {r['num_warps']}): {r['us']:.2f} us", flush=True)
        for cfg, us in r.get("every", []):
            print(f"    forced {cfg}: {us:.2f} us")


if __name__ == "__main__":
    main()
