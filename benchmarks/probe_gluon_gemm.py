"""The Gluon base GEMM (mol/kernels/base_gemm_gluon.py) against base_gemm's Triton kernel and cuBLAS, on a GPU.

    python benchmarks/probe_gluon_gemm.py [--skip-check] [--skip-timing] [--rounds 5]

Check: every Gluon config on the routed layer's two forms (forward y = x W^T + u B_cat^T (+ bias), b and v stored
(N, K); backward dx = dy W + dhl [A_cat; Wr], dhl stored token-minor) at sizes no block divides, against the same
function in float64, outputs poisoned (NaN) first so an unwritten element fails. Bound: 1e-2 of the largest |c|
(bf16 rounding of the output is ~4e-3).
Timing: the GEMMs alone at the issue's layer sizes (T=8192: 4096², 4096->14336, E=32 r=8; T=2048), each captured
in a CUDA graph and replayed interleaved with the others over `--rounds` rounds (bench_layer's timer); µs medians.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.base_gemm as bg  # noqa: E402
import mol.kernels.base_gemm_gluon as bgg  # noqa: E402
from bench_layer import interleaved_graph_times  # noqa: E402

DEV = "cuda"


def operands(form, T, n_in, n_out, kr, dt, bias, gen):
    """(a, b, b_t, u, u_t, v, v_t, bias) of one form, u as the kernels take it: stored (kr, T8) and read transposed
    (u_t) in the backward form, token-minor as gate_bwd_impl writes dhl.
    Forms "fwdT" / "bwdR": the forward with a token-minor u, the backward with a row-major one."""
    r = lambda *s: (torch.randn(*s, generator=gen, device=DEV) / 8).to(dt)  # noqa: E731
    t8 = -(-T // 8) * 8
    u_tok = r(kr, t8)[:, :T]  # token-minor storage, as gate_bwd_impl writes dhl
    if form.startswith("fwd"):
        u, u_t = (u_tok, True) if form == "fwdT" else (r(T, kr), False)
        return r(T, n_in), r(n_out, n_in), True, u, u_t, r(n_out, kr), True, (r(n_out) if bias else None)
    u, u_t = (r(T, kr), False) if form == "bwdR" else (u_tok, True)
    return r(T, n_out), r(n_out, n_in), False, u, u_t, r(kr, n_in), False, None


def reference(a, b, b_t, u, u_t, v, v_t, bias):
    f = lambda m: m.double()  # noqa: E731
    c = f(a) @ (f(b).t() if b_t else f(b))
    if u is not None:
        c = c + (f(u).t() if u_t else f(u)) @ (f(v).t() if v_t else f(v))
    return c if bias is None else c + f(bias)


def check(quiet=False):
    gen = torch.Generator(device=DEV).manual_seed(0)
    cases = [("fwd", 8192, 4096, 4096, 128, torch.bfloat16, True), ("bwd", 8192, 4096, 4096, 136, torch.bfloat16, False),
             ("fwdT", 2048, 4096, 4096, 136, torch.bfloat16, False), ("bwdR", 2048, 4096, 4096, 136, torch.bfloat16, False),
             ("fwd", 4097, 4096, 11008, 256, torch.bfloat16, False), ("bwd", 4097, 11008, 4096, 288, torch.bfloat16, False),
             ("fwd", 300, 4088, 4104, 16, torch.float16, True), ("bwd", 7, 4104, 4088, 24, torch.float16, False),
             ("fwd", 1, 256, 512, 8, torch.bfloat16, False), ("bwd", 130, 512, 200, 40, torch.bfloat16, False)]
    fails = 0
    for form, T, n_in, n_out, kr, dt, bias in cases:
        a, b, b_t, u, u_t, v, v_t, bi = operands(form, T, n_in, n_out, kr, dt, bias, gen)
        ref = reference(a, b, b_t, u, u_t, v, v_t, bi)
        scale = ref.abs().max().item()
        for cfg, u_reg in [(c, False) for c in bgg.CONFIGS] + [(bgg.CONFIGS[0], True)]:
            bgg.U_REG = u_reg
            for with_u in (True, False):
                out = torch.full((a.shape[0], ref.shape[1]), float("nan"), device=DEV, dtype=dt)
                uu, vv = (u, v) if with_u else (None, None)
                bgg.gluon_base_mm(a, b, b_t, uu, vv, v_t, bi, cfg, u_t=u_t, out=out)
                want = ref if with_u else reference(a, b, b_t, None, u_t, None, v_t, bi)
                err = ((out.double() - want).abs().max() / scale).item()
                ok = err < 1e-2  # NaN fails
                fails += not ok
                if ok and quiet:
                    continue
                print(f"{'ok  ' if ok else 'FAIL'} {form} T={T} {n_in}->{n_out} kr={kr if with_u else 0} {dt} "
                      f"bias={bias} {cfg[1:]} u_reg={u_reg}: {err:.2e}", flush=True)
    bgg.U_REG = False
    print(f"check: {fails} failures", flush=True)
    return fails


CASES = {"4096": (8192, 4096, 4096, 128, 8), "14336": (8192, 4096, 14336, 128, 8), "e32": (8192, 4096, 4096, 256, 32),
         "t2048": (2048, 4096, 4096, 128, 8)}


def timing(rounds, cases):
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    for T, n_in, n_out, r_tot, e in (CASES[c] for c in cases):
        for form in ("fwd", "bwd"):
            kr = r_tot if form == "fwd" else r_tot + e
            a, b, b_t, u, u_t, v, v_t, bi = operands(form, T, n_in, n_out, kr, torch.bfloat16, False, gen)
            fns = {"cuBLAS base alone": lambda: torch.mm(a, b.t() if b_t else b),
                   "cuBLAS two GEMMs (u v, then base with beta=1)": lambda: bg._cublas(a, b, b_t, u, v, v_t, None, u_t)}
            for cfg in bg.CONFIGS[:3]:
                fns[f"Triton extra K {cfg[3:6]}"] = lambda cfg=cfg: bg.triton_base_mm(a, b, b_t, u, v, v_t, None, cfg, u_t=u_t)
            fns["Triton alone"] = lambda: bg.triton_base_mm(a, b, b_t, None, None, v_t, None, bg.CONFIGS[0])
            for cfg in bgg.CONFIGS:
                fns[f"Gluon extra K {cfg[4:]}"] = lambda cfg=cfg: bgg.gluon_base_mm(a, b, b_t, u, v, v_t, None, cfg, u_t=u_t)
            fns["Gluon alone"] = lambda: bgg.gluon_base_mm(a, b, b_t, None, None, v_t, None, bgg.CONFIGS[0])
            for f in fns.values():
                f()
            torch.cuda.synchronize()
            times = interleaved_graph_times(fns, n=5, rounds=rounds)
            flops = 2 * T * n_in * n_out
            head = f"T={T} {n_in}->{n_out} {form} (extra K {kr})"
            for name, (med, lo, hi) in times.items():
                rows.append(f"| {head} | {name} | {med * 1e3:.1f} | {flops / (med * 1e-3) / 1e12:.0f} |")
                head = ""
    print("\n| case | GEMM | µs (median) | TFLOP/s of the base's FLOPs |\n| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--quiet", action="store_true", help="print only failing checks")
    ap.add_argument("--u-reg", action="store_true", help="time with base_gemm_gluon.U_REG")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    fails = 0 if args.skip_check else check(args.quiet)
    if not args.skip_timing:
        bgg.U_REG = args.u_reg
        timing(args.rounds, args.cases)
    sys.exit(1 if fails else 0)
