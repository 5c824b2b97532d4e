"""GPU correctness of the fused routed-layer path (mol.kernels.routed_lora) at real sizes against float64.

    python benchmarks/gpu_check_routed.py [--small-t [--small-t-tiles x-as-a|w-as-a] | --quick] [--router tf32x2]
                                          [--gate-columns select] [--shrink triton] [--base triton] [--padding]
                                          [--adapter-dtype float32]

Router + experts + auxiliary losses: output, aux loss and the gradients of x, x_lora (dropout mode), base_out,
lora_A, lora_B (contiguous, and in MoLLinear's expert-interleaved layout) and the router weight, against
tests/reference.py's float64 formula on upcast inputs; outputs poisoned with NaN so an unwritten element fails.
Shapes not multiples of any block (T = 1, 7, 16, 4097; 4095 and 11008 features), E up to 64, top-k 1/2/4, soft and
switch routers; at T = 4097 also 4096 -> 11008, whose 16-byte aligned rows let the base GEMM run as the Triton
kernel with the experts' product as extra K (mol.kernels.base_gemm; `--base triton` forces it where it can run,
`--base gluon` its Gluon form on Hopper GPUs,
the default "auto" takes whichever of it and cuBLAS timed faster). Pass: bf16 < 1e-2, float32 < 1e-4, and the router logits (hl's last E columns) within 5e-5 of
the largest logit: float32-class scores (the one-GEMM shrink's tensor-core sums measured 4.7e-6 at 4096 features
and 1.2e-5 at 11008, tf32x3 ~4e-7), where Wr rounded to bf16 would be ~1e-3 off.
`--padding` marks about 30% of the tokens as padding (token_weights = 0): the router losses, their gradients and the
statistics then count the real tokens only (the reference computes them on those rows alone).
`--adapter-dtype float32` passes lora_A and lora_B in float32 to the 16-bit layer (MoLConfig's default adapter_dtype):
at large T the shrink GEMM's operand kernel rounds A itself, and without gradients the small-T kernel rounds A and B
as it loads them (routed_lora._compute_dtype), so each case also runs a no-grad forward (but dropout's, whose x_lora
only training passes); the reference reads the float32 values, so the bf16 tolerance covers that rounding.
Exit code 1 on any failure.
"""
import os
import sys

os.environ.setdefault("MOL_TRITON_AUTOTUNE", "0")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.base_gemm as bg  # noqa: E402
import mol.kernels.grouped_lora as gl  # noqa: E402
from mol.kernels import routed_lora as rl  # noqa: E402
from tests.reference import interleaved, routed_layer_float64  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def check(T, n_in, n_out, E, r, K, kind, mode, dtype, gen, pad=False, adapter_dtype=None):
    dev = "cuda"
    adt = adapter_dtype or dtype  # float32 adapters on a 16-bit layer: MoLConfig's default adapter_dtype
    f64 = dict(device=dev, dtype=torch.float64)
    x = torch.randn(T, n_in, generator=gen, **f64).to(dtype).double()
    x_lora = torch.randn(T, n_in, generator=gen, **f64).to(dtype).double() if mode == "dropout" else None
    W = (torch.randn(n_out, n_in, generator=gen, **f64) / n_in**0.5).to(dtype).double()
    base_out = torch.randn(T, n_out, generator=gen, **f64).to(dtype).double() if mode == "base_out" else None
    A = (torch.randn(E, r, n_in, generator=gen, **f64) / n_in**0.5).to(adt).double()
    B = (torch.randn(E, n_out, r, generator=gen, **f64) / r).to(adt).double()
    Wr = (torch.randn(E, n_in, generator=gen, **f64) / n_in**0.5).float().double()
    w_y = torch.randn(T, n_out, generator=gen, **f64).to(dtype).double()
    scale, lb, zc = 2.0, 0.01, 0.001
    real = (torch.rand(T, generator=gen, device=dev) < 0.7) if pad else None
    leaves = {"x": x, "A": A, "B": B, "Wr": Wr}
    if x_lora is not None:
        leaves["x_lora"] = x_lora
    if base_out is not None:
        leaves["base_out"] = base_out
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    y_ref, aux_ref, ids_ref = routed_layer_float64(
        ref["x"], ref.get("x_lora", ref["x"]), None if base_out is not None else W, None, ref.get("base_out"),
        ref["A"], ref["B"], ref["Wr"], None, kind, K, scale, lb, zc, real)
    ((y_ref * w_y).sum() + 1e3 * aux_ref).backward()
    got = {k: v.to(torch.float32 if k == "Wr" else adt if k in ("A", "B") else dtype).clone().requires_grad_()
           for k, v in leaves.items()}
    if mode in ("weight", "dropout"):  # lora_B in MoLLinear's expert-interleaved layout (B_cat and dB are views)
        got["B"] = interleaved(B.to(adt)).requires_grad_()

    def layer():
        return rl.routed_lora_linear(
            got["x"], got["A"], got["B"], got["Wr"], kind, K, scale,
            weight=W.to(dtype) if mode in ("weight", "dropout") else None,
            weight_fn=(lambda dt: W.to(dt)) if mode == "weight_fn" else None, base_out=got.get("base_out"),
            x_lora=got.get("x_lora"), lb_coef=lb, z_coef=zc, token_weights=None if real is None else real.float())
    gl.POISON = True
    y, aux, hl, gates, ids, stats = layer()
    ((y.double() * w_y).sum() + 1e3 * aux.double()).backward()
    y_nograd = None
    if adt != dtype and mode != "dropout":  # without gradients (decode): small T reads the float32 adapters as they are
        with torch.no_grad():
            y_nograd = layer()[0]
    gl.POISON = False
    torch.cuda.synchronize()
    errs = {"y": rel(y, y_ref), "aux": rel(aux, aux_ref) if aux_ref.abs() > 0 else aux.abs().item()}
    if y_nograd is not None:
        errs["y (no grad)"] = rel(y_nograd, y_ref)
    errs.update({f"d{k}": rel(got[k].grad, ref[k].grad) for k in leaves})
    mism = int((ids != ids_ref).any(-1).sum())
    logits_ref = x @ Wr.t()
    logit_err = ((hl[:, -E:].double() - logits_ref).abs().max() / logits_ref.abs().max()).item()
    return errs, mism, logit_err


def main():
    import argparse
    import time

    ap = argparse.ArgumentParser()
    ap.add_argument("--small-t", action="store_true",
                    help="only T = 1, 7, 16 (the one-launch small-T forward), each also with the W-as-A dot tile")
    ap.add_argument("--small-t-tiles", choices=["x-as-a", "w-as-a"], default=None,
                    help="with --small-t: only the dot path with x (BN=32) or with the W tile (BN=64) as the A operand")
    ap.add_argument("--quick", action="store_true", help="bf16 only, T = 7 and 4097 (both forward paths)")
    ap.add_argument("--router", choices=list(rl._ROUTER_PRECISIONS), default=None,
                    help="the router block's precision (mol.kernels.routed_lora.ROUTER_PRECISION; default: its default)")
    ap.add_argument("--gate-columns", choices=list(rl._GATE_COLUMN_CHOICES), default=None,
                    help="how the gate kernels map experts to columns (mol.kernels.routed_lora.GATE_COLUMNS)")
    ap.add_argument("--shrink", choices=list(rl._SHRINK_CHOICES), default=None,
                    help="the large-T shrink + router scores: one cuBLAS GEMM or the Triton kernel (routed_lora.SHRINK)")
    ap.add_argument("--base", choices=list(bg._CHOICES), default=None,
                    help="the base GEMM with the experts' product as extra K: Triton, cuBLAS or the faster (auto)")
    ap.add_argument("--padding", action="store_true",
                    help="~30%% of the tokens are padding (token_weights): losses and statistics of the real ones")
    ap.add_argument("--adapter-dtype", choices=["float32"], default=None,
                    help="lora_A and lora_B in float32 on the 16-bit layer (default: the layer's dtype)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_routed.py needs a CUDA GPU and none is visible here")
    if args.base:
        bg.BASE_GEMM = args.base
    if args.shrink:
        rl.SHRINK = args.shrink
    if args.router:
        rl.ROUTER_PRECISION = args.router
    if args.gate_columns:
        rl.GATE_COLUMNS = args.gate_columns
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, shrink {rl.SHRINK}, router {rl.ROUTER_PRECISION}, "
          f"gate columns {rl.GATE_COLUMNS}, base GEMM {bg.BASE_GEMM}", flush=True)
    t_start = time.time()
    tile_variants = [None]
    if args.small_t:  # one config each (no autotuning): the FMA path (T = 1) capped at 168 registers a thread,
        # and the dot path with x as its A operand (BN=32), then with the W tile as A (BN=64)
        import triton
        fma = [triton.Config({"BN": 16, "BK": 512}, num_warps=4, num_stages=3, maxnreg=168)]
        tile_variants = [("FMA capped at 168 registers, dot with x as A (BN=32)", fma,
                          [triton.Config({"BN": 32, "BK": 256}, num_warps=4, num_stages=3)]),
                         ("dot with the W tile as A (BN=64)", fma,
                          [triton.Config({"BN": 64, "BK": 256}, num_warps=4, num_stages=3)])]
        if args.small_t_tiles:
            tile_variants = tile_variants[:1] if args.small_t_tiles == "x-as-a" else tile_variants[1:]
    for tiles in tile_variants:
        if tiles is not None:
            name, rl._small_t_fma.configs, rl._small_t_dot.configs = tiles
            gl._CHOSEN.clear()
            print(f"small-T kernel, {name}:", flush=True)
        t_values = (1, 7, 16) if args.small_t else (7, 4097) if args.quick else (1, 7, 16, 4097)
        n, fails, worst, worst_logit = run_cases(t_values, gen,
                                                 (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float32),
                                                 args.padding, torch.float32 if args.adapter_dtype else None)
        print(f"fused routed layer: {n - fails}/{n} cases pass; worst relative error among cases with identical "
              f"routing: bf16 {worst[torch.bfloat16]:.2e}, fp32 {worst[torch.float32]:.2e}; worst router logit "
              f"error {worst_logit:.1e} of the largest ({time.time() - t_start:.0f} s)", flush=True)
        if args.adapter_dtype:  # the path under test: large T passes float32 A uncast to the shrink GEMM
            for T in t_values:
                x = torch.empty(T, 4096, device="cuda", dtype=torch.bfloat16)
                a, b = (torch.empty(8, 16, 4096, device="cuda") for _ in range(2))
                kept = rl._compute_dtype(a, b, x, None, None, True)[0].dtype == torch.float32
                print(f"T={T}: float32 lora_A {'read by the shrink GEMM as it is' if kept else 'cast to bf16 first'}")
        if fails:
            sys.exit(1)


def run_cases(t_values, gen, dtypes, pad=False, adapter_dtype=None):
    routes = [(8, 2, "topk"), (64, 4, "topk"), (2, 2, "topk"), (8, 1, "switch"), (4, 4, "soft")]
    modes = ["weight", "base_out", "dropout", "weight_fn"]
    fails = n = 0
    worst = {torch.bfloat16: 0.0, torch.float32: 0.0}
    worst_logit = 0.0
    for dtype in dtypes:
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        i = 0
        for T in t_values:
            for n_in, n_out in ((4095, 11008), (11008, 4095)) + (((4096, 11008),) if T > rl.SMALL_T_MAX else ()):
                for E, K, kind in routes:
                    mode = modes[i % len(modes)]
                    i += 1
                    r = 8 if E == 64 else 16
                    errs, mism, logit_err = check(T, n_in, n_out, E, r, K, kind, mode, dtype, gen, pad,
                                                    adapter_dtype)
                    bad = {k: v for k, v in errs.items() if not v < tol}
                    worst_logit = max(worst_logit, logit_err)
                    if not logit_err < 5e-5:
                        bad["logits"] = logit_err
                    n += 1
                    if mism == 0:
                        worst[dtype] = max(worst[dtype], max(errs.values()))
                    if bad or mism:
                        fails += bool(bad) and not mism
                        print(f"{'FAIL' if bad and not mism else 'note'} {dtype} T={T} {n_in}->{n_out} E={E} K={K} "
                              f"{kind} {mode}: {mism} tokens routed differently from float64; errors above "
                              f"{tol}: {bad}", flush=True)
    return n, fails, worst, worst_logit


if __name__ == "__main__":
    main()
