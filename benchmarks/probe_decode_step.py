"""The routed layer's decode step (MoLLinear 4096→4096 E=8 top-2 r=16, eval, forward only) under CUDA-graph replay.

    python benchmarks/probe_decode_step.py [tag] [--parts]

Prints, for T = 1 and 16, the bare F.linear and the whole MoLLinear forward, each captured 20 times back to back
in a CUDA graph and replayed interleaved over 7 rounds (bench_layer.py's helpers), and their ratio. `tag` labels
the lines, for A/B runs of two checkouts in alternating processes (RESULTS run 25 swapped
mol/kernels/routed_lora.py between runs). --parts adds the kernels one eager forward launches (profiler) and what
one more zero-fill node of the small-T workspace's size costs in sequence with the layer.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import bench_layer as bl  # noqa: E402


def main():
    tag = next((a for a in sys.argv[1:] if not a.startswith("--")), "")
    parts = "--parts" in sys.argv
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
            for name, (t, lo, hi) in r.items():
                print(f"{tag} T={T}: {name} {t * 1e3:.2f} µs ({lo * 1e3:.2f}-{hi * 1e3:.2f}), {t / b:.3f}× base",
                      flush=True)


if __name__ == "__main__":
    main()
