"""Where the small-T (decode) forward of the fused routed layer spends its time, under CUDA-graph replay.

    python benchmarks/probe_small_t.py [--timeline]

For T = 1 and 16 and three layer shapes: the bare base GEMV (cuBLAS), the one-launch forward with the base GEMV
inside it (weight=) and with it left to cuBLAS (base_out=), the shrink's split-K at 8 and 32 (default 16), and
the large-T launch sequence for comparison.
Relative error of y against float64 is printed for each variant.

--timeline: instead, the kernel's own timeline (rl.TIMELINE: every program stamps the GPU's nanosecond timer at
its start, when its work is done, when the routing flag is seen or the routing starts, and at its end), median
over repeated single calls, for T = 1 and 16 on each shape: when the last shrink producer finished, how long the
routing program took, when the consumers finished streaming W and saw the flag, and when the last one ended.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.grouped_lora as gl  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402
from bench_layer import graph_time  # noqa: E402
from tests.reference import routed_layer_float64  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def _chosen_bn(profiled: bool) -> int:
    key = next(k for k in reversed(gl._CHOSEN) if k[0] == "small_t" and k[-2] == profiled)  # key[-2]: TIMELINE set
    return gl._CHOSEN[key][0]["BN"]


def timeline(fn, n_shrink: int, n_out: int, reps: int = 30) -> tuple[dict, int]:
    """Median (over reps calls) of the timeline events, µs after the first program started; and the BN used."""
    buf = torch.zeros(4 * (n_shrink + gl._cdiv(n_out, 8)), dtype=torch.int64, device=DEV)  # room for any BN
    rl.TIMELINE = buf
    ev = []
    try:
        fn()  # the stamped kernel is a variant of its own: autotuned (and compiled) here
        n_prog = n_shrink + gl._cdiv(n_out, _chosen_bn(True))
        for _ in range(reps):
            buf.zero_()
            fn()
            torch.cuda.synchronize()
            st = buf[:4 * n_prog].view(n_prog, 4).double().cpu()
            st = (st - st[:, 0].min()) / 1e3
            prod, cons = st[:n_shrink], st[n_shrink:]
            router = int(prod[:, 2].argmax())  # the one producer that stamped 2 and 3 routed the tokens
            ev.append(torch.tensor([prod[:, 0].max(), prod[:, 1].max(), prod[router, 2], prod[router, 3],
                                    cons[:, 0].median(), cons[:, 0].max(), cons[:, 1].median(), cons[:, 1].max(),
                                    cons[:, 2].median(), cons[:, 2].max(), cons[:, 3].max()]))
    finally:
        rl.TIMELINE = None
    med = torch.stack(ev).median(0).values.tolist()
    names = ["last producer start", "shrink done (last)", "routing start", "routing end + flag",
             "consumer start (median)", "consumer start (last)", "W streamed (median)", "W streamed (last)",
             "flag seen (median)", "flag seen (last)", "last program end"]
    return dict(zip(names, med)), _chosen_bn(True)


def main_timeline():
    g = torch.Generator(device=DEV).manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; small-T kernel timeline, µs after the "
          "first program started, median of 30 calls")
    for n_in, n_out, E, K, r in ((4096, 4096, 8, 2, 16), (4096, 14336, 8, 2, 16), (4096, 4096, 32, 4, 8)):
        W = torch.randn(n_out, n_in, device=DEV, generator=g).div_(n_in ** 0.5).to(DT)
        A = torch.randn(E, r, n_in, device=DEV, generator=g).div_(n_in ** 0.5).to(DT)
        B = torch.randn(E, n_out, r, device=DEV, generator=g).mul_(0.1).to(DT)
        Wr = torch.randn(E, n_in, device=DEV, generator=g).div_(n_in ** 0.5)
        for T in (1, 16):
            x = torch.randn(T, n_in, device=DEV, generator=g).to(DT)
            base = F.linear(x, W)
            for mode in ("weight=", "base_out="):
                def fn():
                    if mode == "weight=":
                        return rl.routed_lora_linear(x, A, B, Wr, "topk", K, 2.0, weight=W)
                    return rl.routed_lora_linear(x, A, B, Wr, "topk", K, 2.0, base_out=base)
                with torch.no_grad():
                    fn()
                    t_graph = graph_time(fn)  # the kernel as it runs normally (no stamps)
                    n_shrink = (gl._cdiv(E * r, 32) + 1) * rl._small_t_split(n_in)
                    ev, bn = timeline(fn, n_shrink, n_out)
                print(f"\nT={T} {n_in}→{n_out} E={E} top-{K} r={r}, {mode} BN={bn} (unstamped BN={_chosen_bn(False)}), "
                      f"{n_shrink} producers, {gl._cdiv(n_out, bn)} consumers; unstamped graph replay "
                      f"{t_graph * 1e3:.1f} µs per call")
                print(" | ".join(f"{k} {v:.2f}" for k, v in ev.items()), flush=True)


def main():
    g = torch.Generator(device=DEV).manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call, CUDA-graph replay of 20 calls")
    print("| T | in→out E top-k r | variant | µs | × base | rel err vs fp64 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n_in, n_out, E, K, r in ((4096, 4096, 8, 2, 16), (4096, 14336, 8, 2, 16), (4096, 4096, 32, 4, 8)):
        W = torch.randn(n_out, n_in, device=DEV, generator=g).div_(n_in ** 0.5).to(DT)
        A = torch.randn(E, r, n_in, device=DEV, generator=g).div_(n_in ** 0.5).to(DT)
        B = torch.randn(E, n_out, r, device=DEV, generator=g).mul_(0.1).to(DT)
        Wr = torch.randn(E, n_in, device=DEV, generator=g).div_(n_in ** 0.5)
        for T in (1, 16):
            x = torch.randn(T, n_in, device=DEV, generator=g).to(DT)
            xd = x.double()
            ref = routed_layer_float64(xd, xd, W.double(), None, None, A.double(), B.double(), Wr.double(), None,
                                       "topk", K, 2.0, 0.0, 0.0)[0]
            tb = graph_time(lambda: F.linear(x, W))
            shape = f"{n_in}→{n_out} E={E} top-{K} r={r}"

            def row(name, fn, y=None):
                t = graph_time(fn)
                err = "" if y is None else f"{((y.double() - ref).norm() / ref.norm()).item():.1e}"
                print(f"| {T} | {shape} | {name} | {t * 1e3:.1f} | {t / tb:.2f}× | {err} |", flush=True)
            print(f"| {T} | {shape} | bare base (cuBLAS) | {tb * 1e3:.1f} | 1.00× | |", flush=True)
            with torch.no_grad():
                def whole():
                    return rl.routed_lora_linear(x, A, B, Wr, "topk", K, 2.0, weight=W)[0]
                row("one launch, base GEMV in Triton (weight=)", whole, whole())

                def cublas_base():
                    return rl.routed_lora_linear(x, A, B, Wr, "topk", K, 2.0, base_out=F.linear(x, W))[0]
                row("cuBLAS base + one launch (base_out=)", cublas_base, cublas_base())
                saved = rl._small_t_split
                for n_part in (8, 32):
                    rl._small_t_split = lambda n, n_part=n_part: n_part
                    try:
                        row(f"weight=, shrink split {n_part}", whole, whole())
                    finally:
                        rl._small_t_split = saved
                small, rl.SMALL_T_MAX = rl.SMALL_T_MAX, 0
                try:
                    row("large-T sequence (shrink, gate, mm, addmm)", whole, whole())
                finally:
                    rl.SMALL_T_MAX = small
        for k, v in gl._CHOSEN.items():
            if k[0] == "small_t" and k[2:4] == (n_in, n_out):
                print(f"  chosen {k[:6]}: {v[0]}, warps {v[1].get('num_warps')}, stages {v[1].get('num_stages')}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeline", action="store_true")
    main_timeline() if ap.parse_args().timeline else main()
