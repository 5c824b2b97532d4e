"""Does the Triton base GEMM with the experts' product as extra K (mol/kernels/base_gemm.py) beat cuBLAS's two GEMMs?

    python benchmarks/probe_fused_base.py [--shapes 8192x4096x4096x128x8 ...] [--rounds 3] [--extra-configs]

Per shape T x in x out x R x E (bf16): the forward y = x W^T + u B_cat and the backward dx = dy W + dhl [A_cat; Wr]
(R + E columns), each timed as cuBLAS's base GEMM alone, cuBLAS's two GEMMs (the small one, then the base
accumulated into it: what the layer ran before base_gemm) and the Triton kernel at each config, alone and fused,
all interleaved over `--rounds` rounds (do_bench medians, µs); then what base_mm's "auto" picks. Each fused result
is checked against float32 torch. `--extra-configs` adds tile shapes that are not in base_gemm.CONFIGS.
"""
import argparse
import os
import statistics
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import base_gemm as bg  # noqa: E402

EXTRA = [(128, 256, 64, 4, 8, 3, 1), (128, 256, 64, 8, 8, 3, 2), (128, 128, 64, 8, 8, 4, 1), (64, 256, 64, 8, 4, 4, 1),
         (128, 128, 128, 8, 8, 3, 1), (128, 256, 32, 8, 8, 5, 2)]


def probe(T, n_in, n_out, R, E, configs, rounds, g):
    dt = torch.bfloat16

    def rnd(*s, sc=1.0):
        return (torch.randn(*s, device="cuda", generator=g) * sc).to(dt)
    x, W, dy = rnd(T, n_in), rnd(n_out, n_in, sc=0.02), rnd(T, n_out)
    u, b_t = rnd(T, R), rnd(n_out, R, sc=0.02)          # b_t = B_cat^T, (out, R) as MoLLinear stores lora_B
    dhl, w_dx = rnd(T, R + E), rnd(R + E, n_in, sc=0.02)
    fwd = dict(a=x, b=W, b_t=True, u=u, v=b_t, v_t=True)
    bwd = dict(a=dy, b=W, b_t=False, u=dhl, v=w_dx, v_t=False)
    fns, errs = {}, {}
    for d, kw in (("fwd", fwd), ("bwd", bwd)):
        ref = kw["a"].float() @ bg._op(kw["b"].float(), kw["b_t"]) + kw["u"].float() @ bg._op(kw["v"].float(), kw["v_t"])
        fns[f"{d} cuBLAS base"] = lambda kw=kw: bg._cublas(kw["a"], kw["b"], kw["b_t"], None, None, False, None)
        fns[f"{d} cuBLAS two GEMMs"] = lambda kw=kw: bg._cublas(bias=None, **kw)
        for cfg in configs:
            try:
                c = bg.triton_base_mm(config=cfg, **kw)
            except Exception as e:  # noqa: BLE001
                print(f"{d} {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            errs[f"{d} triton fused {cfg}"] = ((c.float() - ref).norm() / ref.norm()).item()
            fns[f"{d} triton base {cfg}"] = lambda kw=kw, cfg=cfg: bg.triton_base_mm(
                kw["a"], kw["b"], kw["b_t"], config=cfg)
            fns[f"{d} triton fused {cfg}"] = lambda kw=kw, cfg=cfg: bg.triton_base_mm(config=cfg, **kw)
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n## T={T} {n_in}->{n_out} R={R} E={E}")
    print("| what | µs | × cuBLAS base | × two cuBLAS GEMMs | rel err vs fp32 |\n| --- | --- | --- | --- | --- |")
    for k in fns:
        d = k[:3]
        print(f"| {k} | {med[k]:.1f} | {med[k] / med[f'{d} cuBLAS base']:.3f} | "
              f"{med[k] / med[f'{d} cuBLAS two GEMMs']:.3f} | {errs.get(k, float('nan')):.1e} |")
    for d, kw in (("fwd", fwd), ("bwd", bwd)):
        bg.base_mm(kw["a"], kw["b"], kw["b_t"], kw["u"], kw["v"], kw["v_t"])
        key = [k for k in bg._CHOSEN if k[5] == tuple(kw["b"].shape) and k[6] == kw["b_t"] and k[4] == bg.gl._t_bucket(T)]
        print(f"auto picks for {d}: {bg._CHOSEN[key[-1]] or 'cuBLAS'}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["8192x4096x4096x128x8", "2048x4096x4096x128x8"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--extra-configs", action="store_true")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    configs = bg.CONFIGS + (EXTRA if args.extra_configs else [])
    for s in args.shapes:
        probe(*map(int, s.split("x")), configs, args.rounds, g)


if __name__ == "__main__":
    main()
