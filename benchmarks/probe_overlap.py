"""Can the routed layer's memory-bound expert GEMMs hide under its compute-bound base GEMMs on a second stream?

    python benchmarks/probe_overlap.py [--t 8192 2048] [--rounds 5]

The layer's pieces, as the Triton path runs them (T tokens, 4096 -> 4096, E=8 top-2 r=16, bf16), timed under
CUDA-graph replay, interleaved over rounds (bench_layer.interleaved_graph_times):
- backward tail: dx = dhl [A_cat; Wr], dx += dy W (base), d_ext = dhl^T x (dA | dWr), dB = dy^T u; in sequence, and
  with d_ext and dB on a side stream (forked after dhl, joined at the end), launched before or after the base GEMM;
- forward: hl = x [A_cat; Wr parts]^T, gates, y = u B_cat, y += x W^T (beta=1); in sequence, and with the base GEMM
  on the main stream while the shrink + gates run on the side stream, the experts then added (an extra pass over y);
- the bare base GEMM(s) of each, for the floor.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.grouped_lora as gl  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402
from bench_layer import interleaved_graph_times  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def forked(main_fn, side_fn, side_first: bool):
    """main_fn on the current stream and side_fn on a side stream, both after what is queued so far, joined."""
    side = torch.cuda.Stream()

    def run():
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        if side_first:
            with torch.cuda.stream(side):
                side_fn()
            main_fn()
        else:
            main_fn()
            with torch.cuda.stream(side):
                side_fn()
        cur.wait_stream(side)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, nargs="+", default=[8192, 2048])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator(device=DEV).manual_seed(0)
    n, e, r, k = 4096, 8, 16, 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call, median (min-max) of "
          f"{args.rounds} interleaved rounds of CUDA-graph replays")
    for t in args.t:
        x = torch.randn(t, n, device=DEV, generator=g).to(DT)
        dy = torch.randn(t, n, device=DEV, generator=g).to(DT)
        w = (torch.randn(n, n, device=DEV, generator=g) / n ** 0.5).to(DT)
        a_cat = (torch.randn(e * r, n, device=DEV, generator=g) / n ** 0.5).to(DT)
        wr = torch.randn(e, n, device=DEV, generator=g) / n ** 0.5
        lora_b = (torch.randn(n, e, r, device=DEV, generator=g) * 0.1).to(DT).permute(1, 0, 2)
        u = torch.randn(t, e * r, device=DEV, generator=g).to(DT)
        dhl = torch.randn(t, e * r + e, device=DEV, generator=g).to(DT)
        w_dx = torch.cat([a_cat, wr.to(DT)])
        out = {}

        def dx_main():
            dx = torch.mm(dhl, w_dx)
            dx.addmm_(dy, w)
            out["dx"] = dx

        def grads_side():
            out["d_ext"] = torch.mm(dhl.t(), x)
            out["dB"] = gl._grad_b(dy, u, lora_b)

        def bwd_seq():
            dx_main()
            grads_side()

        def fwd_pieces_side():
            hl, stats, _ = rl.route_shrink_impl(x, None, a_cat, wr)
            out["gates"] = rl.gate_fwd_impl(hl, stats, None, e * r, r, 0, k, 2.0, DT, 0.01, 0.001)

        def fwd_seq():
            fwd_pieces_side()
            y = torch.mm(out["gates"][2], gl._b_cat(lora_b))
            y.addmm_(x, w.t())
            out["y"] = y

        def fwd_base_main():
            out["y0"] = torch.mm(x, w.t())

        def fwd_overlap():
            forked(fwd_base_main, fwd_pieces_side, side_first=True)()
            out["y0"].addmm_(out["gates"][2], gl._b_cat(lora_b))

        fns = {
            "bwd base GEMM alone (dy W)": lambda: torch.mm(dy, w),
            "bwd tail, in sequence": bwd_seq,
            "bwd tail, dA|dWr + dB on a side stream launched first": forked(dx_main, grads_side, True),
            "bwd tail, dA|dWr + dB on a side stream launched after": forked(dx_main, grads_side, False),
            "fwd base GEMM alone (x W^T)": fwd_base_main,
            "fwd, in sequence (beta=1 base)": fwd_seq,
            "fwd, shrink + gates on a side stream, experts added after": fwd_overlap,
        }
        times = interleaved_graph_times(fns, rounds=args.rounds)
        print(f"\nT={t}")
        print("| piece | µs |\n| --- | --- |")
        for name, (med, lo, hi) in times.items():
            print(f"| {name} | {med * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) |")


if __name__ == "__main__":
    main()
