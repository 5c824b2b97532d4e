"""The routed layer's decode step (MoLLinear 4096→4096 E=8 top-2 r=16, eval, forward only) under CUDA-graph replay.

    python benchmarks/probe_decode_step.py [tag] [--parts] [--configs]

Prints, for T = 1 and 16, the bare F.linear and the whole MoLLinear forward, each captured 20 times back to back
in a CUDA graph and replayed interleaved over 7 rounds (bench_layer.py's helpers), and their ratio. `tag` labels
the lines, for A/B runs of two checkouts in alternating processes (RESULTS run 25 swapped
mol/kernels/routed_lora.py between runs). --parts adds the kernels one eager forward launches (profiler) and what
one more zero-fill node of the small-T workspace's size costs in sequence with the layer. --configs adds the
layer with each of the one-launch kernel's autotune configs forced (rows of the same interleaved replay), each
first checked against float64.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_layer as bl  # noqa: E402
import mol.kernels.grouped_lora as gl  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402
from tests.reference import routed_layer_float64  # noqa: E402


def forced(fn, key: tuple, cfg):
    """fn with the small-T kernel's config for `key` forced to cfg (read at launch, so a graph keeps it)."""
    def run():
        saved = gl._CHOSEN[key]
        gl._CHOSEN[key] = (cfg.kwargs, cfg.all_kwargs())
        try:
            return fn()
        finally:
            gl._CHOSEN[key] = saved
    return run


def config_name(all_kwargs: dict) -> str:
    return (f"BN={all_kwargs['BN']} BK={all_kwargs['BK']} w{all_kwargs['num_warps']} s{all_kwargs['num_stages']}"
            + (f" maxnreg={all_kwargs['maxnreg']}" if all_kwargs.get("maxnreg") else ""))


def main():
    tag = next((a for a in sys.argv[1:] if not a.startswith("--")), "")
    parts = "--parts" in sys.argv
    configs = "--configs" in sys.argv
    gen = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for T in (1, 16):
            c = bl.make_case(T, 4096, 4096, 8, 2, 16, gen)
            x, W, A, B = c["x"].detach(), c["W"], c["A"].detach(), c["B"].detach()
            m = bl.mol_layer(W, A, B, 8, 2, 16, "triton").eval()
            ref = m(x).float()
            for _ in range(3):  # repeated calls agree (to rounding: the split-K shrink adds with float32 atomics)
                torch.testing.assert_close(m(x).float(), ref, rtol=1e-2, atol=1e-2)
            fns = {"base": lambda: F.linear(x, W), "mol": lambda: m(x)}
            if configs:
                key = next(k for k in reversed(gl._CHOSEN) if k[0] == "small_t")
                xd = x.double()
                ref64 = routed_layer_float64(xd, xd, W.double(), None, None, m.lora_A.double(), m.lora_B.double(),
                                             m.router.weight.double(), None, "topk", 2, m.scaling, 0.0, 0.0)[0]
                print(f"{tag} T={T}: autotuned {config_name(gl._CHOSEN[key][1])}", flush=True)
                for cfg in (rl._small_t_fma if key[1] else rl._small_t_dot).configs:
                    fn = forced(lambda: m(x), key, cfg)
                    err = ((fn().double() - ref64).norm() / ref64.norm()).item()
                    assert err < 1e-2, f"{config_name(cfg.all_kwargs())}: relative error {err:.2e} against float64"
                    fns[config_name(cfg.all_kwargs())] = fn
                    print(f"{tag} T={T}: {config_name(cfg.all_kwargs())} relative error {err:.2e} against float64")
            if parts:
                n = 4 + 16 * (8 * 16 + 8)  # _small_t_work's size for E=8 r=16: sync words + 16 rows of R+E
                fns["mol + one zero-fill"] = lambda: (m(x), torch.zeros(n, device="cuda", dtype=torch.int32))
                fns["zero-fill alone"] = lambda: torch.zeros(n, device="cuda", dtype=torch.int32)
                with profile(activities=[ProfilerActivity.CUDA]) as p:
                    m(x)
                    torch.cuda.synchronize()
                print(f"{tag} T={T} kernels:", [(e.name[:60], round(e.device_time, 2)) for e in p.events()
                                                if e.device_time > 0])
            r = bl.interleaved_graph_times(fns, n=20, rounds=7)
            b = r["base"][0]
            for name, (t, lo, hi) in sorted(r.items(), key=lambda kv: kv[1][0]):
                print(f"{tag} T={T}: {name} {t * 1e3:.2f} µs ({lo * 1e3:.2f}-{hi * 1e3:.2f}), {t / b:.3f}× base",
                      flush=True)


if __name__ == "__main__":
    main()
