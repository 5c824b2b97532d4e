"""The large-T routed layer's memory-bound pieces, each alone, and the whole layer with each alternative.

    python benchmarks/probe_pieces.py [--quick] [--case T E K R ...] [--gates-only]

For T = 8192 / 2048, 4096->4096, E=8 top-2 r=16 and E=32 top-4 r=8, bf16, `do_bench` medians:
- the shrink + router scores as one cuBLAS GEMM against Wr's 16-bit parts (SHRINK="gemm") and as the fused Triton
  kernel (router at tf32x3 and at tf32x2, ROUTER_PRECISION) next to cuBLAS's `x @ A_cat^T` alone
  (the same bytes, no router), and the router logits' worst error against float64;
- du = dy @ B_cat^T (float32 out) from the Triton kernel and from cuBLAS (`torch.mm(..., out_dtype=float32)`);
- the gate kernels at the layer's row block and at other row blocks / warp counts, and with GATE_COLUMNS="select";
- the weight-gradient GEMMs dA|dWr = dhl^T x and dB = dy^T u as the layer runs them, and dA with the operands swapped;
- the whole MoLLinear fwd+bwd under CUDA-graph replay with each shrink, du and router form, against the bare base
  (one after another: probe_ab.py compares settings interleaved).
Bytes are what each must move (inputs read once, outputs written once); the copy bandwidth is measured here.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.grouped_lora as gl  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402
from bench_layer import copy_bandwidth, graph_time, mol_layer, mol_step  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def us(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T=8192 E=8 only")
    ap.add_argument("--case", type=int, nargs=4, action="append", metavar=("T", "E", "K", "R"),
                    help="only this case (repeatable): tokens, experts, top-k, rank")
    ap.add_argument("--gates-only", action="store_true", help="only the gate kernels' rows")
    args = ap.parse_args()
    # the module switches each section sets, restored to the library's defaults after it
    switches = ((rl, "SHRINK"), (gl, "DU_CUBLAS"), (rl, "ROUTER_PRECISION"), (rl, "GATE_COLUMNS"))
    defaults = [getattr(mod, name) for mod, name in switches]

    def restore_defaults():
        for (mod, name), value in zip(switches, defaults):
            setattr(mod, name, value)
    g = torch.Generator(device=DEV).manual_seed(0)
    bw = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s; "
          "µs (do_bench median), fraction of copy bandwidth for the bytes moved")
    cases = [(8192, 8, 2, 16), (8192, 32, 4, 8), (2048, 8, 2, 16)]
    if args.quick:
        cases = cases[:1]
    if args.case:
        cases = [tuple(c) for c in args.case]
    n = 4096
    print("| T E top-k r | piece | variant | µs | GB moved | × copy bw | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for T, E, K, r in cases:
        R = E * r
        case = f"{T} E={E} top-{K} r={r}"
        x = torch.randn(T, n, device=DEV, generator=g).to(DT)
        W = (torch.randn(n, n, device=DEV, generator=g) / n ** 0.5).to(DT)
        A = (torch.randn(E, r, n, device=DEV, generator=g) / n ** 0.5).to(DT)
        B = (torch.randn(E, n, r, device=DEV, generator=g) * 0.1).to(DT)
        Wr = torch.randn(E, n, device=DEV, generator=g) / n ** 0.5
        dy = torch.randn(T, n, device=DEV, generator=g).to(DT)
        a_cat = A.reshape(R, n)
        ref = x.double() @ Wr.double().t()

        def row(piece, variant, t, gb, note=""):
            print(f"| {case} | {piece} | {variant} | {t:.1f} | {gb:.3f} | {gb * 1e9 / (t * 1e-6) / bw:.0%} | {note} |",
                  flush=True)

        if args.gates_only:
            rl.SHRINK = "triton"
            hl, _, _ = rl.route_shrink_impl(x, None, a_cat, Wr)
            restore_defaults()
            gate_rows(row, case, hl, R, E, K, r, T, dy.dtype)
            continue
        gb_shrink = (T * n * 2 + R * n * 2 + E * n * 4 + T * (R + E) * 4) / 1e9
        rl.SHRINK = "gemm"
        hl_g, _, _ = rl.route_shrink_impl(x, None, a_cat, Wr)
        parts = hl_g[:, R:].view(T, rl.ROUTER_PARTS, E)
        lg = sum(parts[:, j] / rl._part_scale(x.dtype) ** j for j in range(rl.ROUTER_PARTS))
        err = ((lg.double() - ref).abs().max() / ref.abs().max()).item()
        row("shrink + router", f"one cuBLAS GEMM, Wr as {rl.ROUTER_PARTS} bf16 parts (SHRINK=gemm)",
            us(lambda: rl.route_shrink_impl(x, None, a_cat, Wr)), gb_shrink, f"router logits max err {err:.1e}")
        rl.SHRINK = "triton"
        for prec in ("tf32x2", "tf32x3"):  # the Triton kernel's default last: hl below is its
            rl.ROUTER_PRECISION = prec
            hl, _, _ = rl.route_shrink_impl(x, None, a_cat, Wr)
            err = ((hl[:, R:].double() - ref).abs().max() / ref.abs().max()).item()
            t = us(lambda: rl.route_shrink_impl(x, None, a_cat, Wr))
            row("shrink + router", f"fused Triton, router {prec}", t, gb_shrink, f"router logits max err {err:.1e}")
        row("shrink only", "cuBLAS x @ A_cat^T (bf16 out)", us(lambda: torch.mm(x, a_cat.t())),
            (T * n * 2 + R * n * 2 + T * R * 2) / 1e9)

        gb_du = (T * n * 2 + R * n * 2 + T * R * 4) / 1e9
        du_ref = dy.double() @ B.permute(1, 0, 2).reshape(n, R).double()
        for du_cublas in (False, True):
            gl.DU_CUBLAS = du_cublas
            du_err = ((gl._du(dy, B).double() - du_ref).norm() / du_ref.norm()).item()
            row("du", "cuBLAS out_dtype=float32 (+ B copy)" if du_cublas else "Triton _du_kernel",
                us(lambda: gl._du(dy, B)), gb_du, f"rel err vs fp64 {du_err:.1e}")

        dhl = torch.randn(T, R + E, device=DEV, generator=g).to(DT)
        u = torch.randn(T, R, device=DEV, generator=g).to(DT)
        row("dA|dWr", "mm(dhl^T, x) (as the layer)", us(lambda: torch.mm(dhl.t(), x)),
            (T * n * 2 + T * (R + E) * 2 + (R + E) * n * 2) / 1e9)
        row("dA|dWr", "mm(x^T, dhl) (swapped)", us(lambda: torch.mm(x.t(), dhl)),
            (T * n * 2 + T * (R + E) * 2 + (R + E) * n * 2) / 1e9)
        row("dB", "mm(dy^T, u) (as the layer)", us(lambda: torch.mm(dy.t(), u)),
            (T * n * 2 + T * R * 2 + R * n * 2) / 1e9)

        gate_rows(row, case, hl, R, E, K, r, T, dy.dtype)

        xg = x.clone().requires_grad_()
        base_t = graph_time(lambda: torch.autograd.grad(F.linear(xg, W), [xg], dy), n=10)
        m = mol_layer(W, A, B, E, K, r, "triton")
        whole = mol_step(m, xg, dy)
        # the defaults first, then one switch away from them at a time (the Triton shrink with each du and router)
        for shrink, du_cublas, prec, cols in (("gemm", True, "tf32x3", "select"), ("triton", True, "tf32x3", "select"),
                                              ("triton", False, "tf32x3", "select"), ("triton", True, "tf32x2", "select"),
                                              ("gemm", True, "tf32x3", "onehot")):
            rl.SHRINK = shrink
            gl.DU_CUBLAS = du_cublas
            rl.ROUTER_PRECISION = prec
            rl.GATE_COLUMNS = cols
            t = graph_time(whole, n=10)
            what = "one GEMM" if shrink == "gemm" else f"Triton, router {prec}"
            print(f"| {case} | whole MoLLinear fwd+bwd, CUDA graph | shrink {what}, du "
                  f"{'cuBLAS' if du_cublas else 'Triton'}, gate columns {cols} | {t * 1e3:.1f} | | | "
                  f"{t / base_t:.3f}× the base ({base_t * 1e3:.1f} µs) |", flush=True)
        restore_defaults()
        del x, W, A, B, dy, dhl, u, m, xg
        torch.cuda.empty_cache()


def gate_rows(row, case, hl, R, E, K, r, T, dt):
    """The gate kernels (routing + u, and their backward) at the layer's tiles (forward: _row_block, 4 warps;
    backward: _gate_bwd_tile) and at other row blocks, column steps and warp counts, launched as gate_fwd_impl /
    gate_bwd_impl launch them. hl: the Triton shrink's (T, R+E), logits already summed (NPARTS=1)."""
    ep = rl._ep(E)
    bt0, br = rl._row_block(R, ep)
    sel0 = rl._gate_select()
    stats = torch.zeros(2 * E + 2, device=DEV)
    gates, ids, u, aux = rl.gate_fwd_impl(hl, stats, None, R, r, 0, K, 2.0, dt, 0.01, 0.001)
    du = torch.randn(T, R, device=DEV)
    daux = torch.ones((), device=DEV)
    dhl = gl._token_minor(T, R + E, hl, dt)  # as the layer stores it
    c_lb, c_z = rl._aux_coefs(0.01, 0.001, E, T, K)
    gb_f = (T * (R + E) * 4 + T * R * 2 + T * K * 12) / 1e9
    gb_b = (T * R * 4 + T * (R + E) * 4 + T * K * 12 + T * (R + E) * 2) / 1e9
    btb, brb, wb0 = rl._gate_bwd_tile(R, ep, sel0)
    # (BT, BR, warps, gate columns by select); select at the layer's row block, with 4 and with 2 warps, and at
    # 64 and 32 columns a step (the backward's tile: (16, 64) since run 29)
    tiles = [(bt0, br, 4, False), (16, br, 2, False), (32, br, 4, False), (64, br, 4, False), (64, br, 8, False),
             (128, br, 8, False), (bt0, br, 4, True), (bt0, br, 2, True), (16, min(br, 64), 4, True),
             (16, min(br, 32), 4, True), (32, min(br, 64), 8, True)]
    for bt, bc, w, sel in tiles:
        tag = f"BT={bt} BR={bc} warps={w}" + (", select" if sel else "")
        tag_f = tag + (" (the layer's)" if (bt, bc, w, sel) == (bt0, br, 4, sel0) else "")
        tag_b = tag + (" (the layer's)" if (bt, bc, w, sel) == (btb, brb, wb0, sel0) else "")

        def fwd(bt=bt, bc=bc, w=w, sel=sel):
            rl._gate_fwd_kernel[(gl._cdiv(T, bt),)](hl, hl, hl, hl, gates, ids, u, stats, aux, 2.0, c_lb, c_z, T, R,
                                                    E, hl.shape[1], 1.0, RANK=r, K=K, KIND=0, EP=ep, BT=bt, BR=bc,
                                                    HAS_NOISE=False, HAS_W=False, SELECT=sel, NPARTS=1, num_warps=w)

        def bwd(bt=bt, bc=bc, w=w, sel=sel):
            rl._gate_bwd_kernel[(gl._cdiv(T, bt),)](du, hl, hl, hl, hl, gates, ids, stats, daux, dhl, 2.0, c_lb,
                                                    2.0 * c_z, T, R, E, hl.shape[1], dhl.stride(0), dhl.stride(1), RANK=r, K=K, KIND=0, EP=ep, BT=bt, BR=bc,
                                                    HAS_NOISE=False, HAS_AUX=True, HAS_W=False, SELECT=sel, num_warps=w)
        try:
            row("gate fwd", tag_f, us(fwd), gb_f)
            row("gate bwd", tag_b, us(bwd), gb_b)
        except Exception as e:  # noqa: BLE001  (a tile that does not fit is a finding, not a crash)
            print(f"| {case} | gate | {tag} | failed: {type(e).__name__}: {str(e)[:120]} | | | |")


if __name__ == "__main__":
    main()
