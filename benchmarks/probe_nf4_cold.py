"""Do the NF4 decode kernels' configs rank the same with the weights in L2 as without? (CUDA GPU.)

    python benchmarks/probe_nf4_cold.py [--ts 1 2 16] [--rounds 2] [--shapes 4096x4096 14336x4096] [--no-dot]

The decode autotuners (gl.bench_graphed) replay one call back to back, so the weight they stream is still in the
L2 cache from the call before: a 4096x4096 NF4 weight is 8.7 MB of an H100's 50 MB. In a model's decode step every
layer reads its own weight once, from DRAM. For each config of the path NF4Linear takes at each T (the Triton FMA
kernel at T <= 2, the Gluon MMA kernel and the Triton dot kernel at T = 16), three CUDA-graph timings, per call:

    one    the first weight, back to back (what the tuners time now)
    stack  a stack of distinct weights, three times the L2 in all, one call each (a model's decode step)
    flush  a read of twice the L2 and then the call, minus the read alone (a timer a tuner could use: one weight)

Prints one table per (shape, T), sorted by the stack time, with each timing's rank; each config's output is first
checked against x @ W^T with W dequantized by the PyTorch reference.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import nf4 as nf4k  # noqa: E402
from mol.kernels import nf4_mma  # noqa: E402
from mol.quant import dequantize_nf4_reference, quantize_nf4  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def paths(T, no_dot=False):
    """(name, fn(x, packed)) for every config NF4Linear's decode tuners choose from at this T."""
    out = []
    if T <= nf4k.SMALL_FMA_MAX_T:
        for c in nf4k.FMA_CONFIGS:
            out.append((f"fma {c['BLOCK_N']}/{c['BLOCK_KB']}/w{c['num_warps']}/s{c['num_stages']}/L{c['LUT']}",
                        lambda x, p, c=c: nf4k.nf4_matmul_small(x, p, config=c)))
    else:
        for c in nf4_mma.CONFIGS:
            name = "mma " + "/".join(str(int(c[k])) for k in ("warps_k", "warps_m", "m_rep", "cpl", "split_k",
                                                               "prefetch"))
            name += ("/p" if c.get("pairs") else "") + (f"/r{c['maxnreg']}" if c.get("maxnreg") else "")
            out.append((name, lambda x, p, c=c: nf4_mma.nf4_matmul_mma(x, p, config=c)))
        for c in ([] if no_dot else nf4k.DOT_CONFIGS):
            out.append((f"dot {c['BLOCK_N']}/{c['BLOCK_KB']}/w{c['num_warps']}/k{c['SPLIT_K']}",
                        lambda x, p, c=c: nf4k.nf4_matmul_small(x, p, config=c)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", type=int, nargs="+", default=[1, 2, 16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"], help="out x in")
    ap.add_argument("--no-dot", action="store_true", help="leave out the Triton dot kernel's configs at T > 2")
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    print(torch.cuda.get_device_name(), f"L2 {l2 / 2**20:.0f} MiB")
    gen = torch.Generator(device=DEV).manual_seed(0)
    flush_buf = torch.empty(2 * l2 // 4, dtype=torch.float32, device=DEV).normal_(generator=gen)
    flush_out = torch.empty((), dtype=torch.float32, device=DEV)

    def flush():
        torch.sum(flush_buf, dim=0, out=flush_out)

    def bench(fn):
        return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3

    with torch.no_grad():
        for shape in args.shapes:
            n_out, n_in = map(int, shape.split("x"))
            Ws = [torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02]
            ps = [quantize_nf4(Ws[0])]
            n_layers = -(-3 * l2 // (ps[0].storage_bits() // 8))
            Ws += [torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02 for _ in range(n_layers - 1)]
            ps += [quantize_nf4(W) for W in Ws[1:]]
            for T in args.ts:
                x = torch.randn(T, n_in, device=DEV, dtype=DT, generator=gen)
                ref = x.float() @ dequantize_nf4_reference(ps[0], torch.float32).T
                cases = {"bf16 F.linear": lambda: F.linear(x, Ws[0])}
                stacks = {"bf16 F.linear": lambda: [F.linear(x, W) for W in Ws]}
                for name, fn in paths(T, args.no_dot):
                    y = fn(x, ps[0]).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    if not err < 2e-2:
                        print(f"  {name}: output off by {err:.2e} of the dequantized weight's: skipped")
                        continue
                    cases[name] = lambda fn=fn: fn(x, ps[0])
                    stacks[name] = lambda fn=fn: [fn(x, p) for p in ps]
                times = {name: {"one": [], "stack": [], "flush": []} for name in cases}
                flush_t = []
                for _ in range(args.rounds):
                    flush_t.append(bench(flush))
                    for name in cases:
                        times[name]["one"].append(bench(cases[name]))
                        times[name]["stack"].append(bench(stacks[name]) / n_layers)
                        times[name]["flush"].append(bench(lambda f=cases[name]: (flush(), f())))
                f0 = sorted(flush_t)[len(flush_t) // 2]
                med = {n: {k: sorted(v)[len(v) // 2] - (f0 if k == "flush" else 0.0) for k, v in d.items()}
                       for n, d in times.items()}
                rank = {k: {n: i + 1 for i, n in enumerate(sorted((n for n in med if not n.startswith("bf16")),
                                                                  key=lambda n: med[n][k]))} for k in ("one",
                                                                                                       "stack",
                                                                                                       "flush")}
                print(f"\n{n_in}->{n_out} T={T}: {n_layers} layers in the stack, "
                      f"{ps[0].storage_bits() / 8e6:.2f} MB "
                      f"NF4 each; the read of 2x L2 alone {f0:.2f} us")
                print("| config | one us (rank) | stack us (rank) | flush us (rank) | stack / bf16 stack |")
                print("| --- | --- | --- | --- | --- |")
                b = med["bf16 F.linear"]
                print(f"| bf16 F.linear | {b['one']:.2f} | {b['stack']:.2f} | {b['flush']:.2f} | 1.00x |")
                for n in sorted(rank["stack"], key=rank["stack"].get):
                    m = med[n]
                    print(f"| {n} | {m['one']:.2f} ({rank['one'][n]}) | {m['stack']:.2f} ({rank['stack'][n]}) | "
                          f"{m['flush']:.2f} ({rank['flush'][n]}) | {m['stack'] / b['stack']:.2f}x |", flush=True)
            del Ws, ps
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
