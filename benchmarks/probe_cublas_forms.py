"""Does cuBLAS run the routed layer's four skinny GEMMs faster in another form? (CUDA; a probe, no library code)

    python benchmarks/probe_cublas_forms.py [--rounds 5]

RESULTS runs 24-25: at T=8192 the four passes over a T x features activation outside the base GEMMs (hl = x w_ext^T,
du = dy B_cat^T, [dA; dWr] = dhl^T x, dB = dy^T u) take 29-37 us each on cuBLAS, 45-59% of the copy bandwidth for
the bytes they must move, and every Triton kernel tried was slower (probe_skinny.py). This asks the cheaper
question first: the same products through cuBLAS in other forms, each a drop-in for the layer's call:

    transposed   the product computed as its transpose (C^T = B^T A^T), so cuBLAS sees the long dimension as N
    padded       w_ext's rows padded to a multiple of 32 / 64 / 128 (the layer could keep w_ext padded)
    split-T      the reduction over T as a batched GEMM of S chunks, float32 partials, then one sum
    layouts      dhl (of [dA; dWr]) stored transposed and/or padded with zero columns (the gate backward writes it),
                 u (of dB) stored transposed (the gate forward writes it)
    cublasLt     torch.backends.cuda.preferred_blas_library("cublaslt") around the layer's own call

Every form's result is checked against the layer's call (relative error < 1e-2; bf16 outputs round the same sums).
Times: do_bench medians of --rounds interleaved rounds, each form's ratio to the layer's call, and the bytes the
product must move over its time as a fraction of the measured copy bandwidth.
"""
import argparse
import statistics

import torch
from triton.testing import do_bench


def _lt(fn):
    def run():
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return fn()
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
    return run


def _padded(w, mult):
    rows = -(-w.shape[0] // mult) * mult
    out = torch.zeros(rows, w.shape[1], device=w.device, dtype=w.dtype)
    out[: w.shape[0]] = w
    return out


def _split_t(a, b, s, out_dtype):
    """a^T @ b (a (T, P), b (T, Q)) as s chunks of T in float32, summed."""
    t = a.shape[0]
    a3, b3 = a.view(s, t // s, -1), b.view(s, t // s, -1)
    return torch.bmm(a3.transpose(1, 2), b3, out_dtype=torch.float32).sum(0).to(out_dtype)


def cases(T, n_in, n_out, E, r, dt):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, device="cuda", generator=g).to(dt)
    R, P, Q = E * r, E * r + 3 * E, E * r + E
    x, dy, w_ext, bt, dhl, u = rnd(T, n_in), rnd(T, n_out), rnd(P, n_in), rnd(n_out, R), rnd(T, Q), rnd(T, R)
    f32 = torch.float32
    shrink = {
        "layer: mm(x, w_ext^T)": lambda: torch.mm(x, w_ext.t(), out_dtype=f32),
        "transposed": lambda: torch.mm(w_ext, x.t(), out_dtype=f32).t(),
        "cublasLt": _lt(lambda: torch.mm(x, w_ext.t(), out_dtype=f32)),
    }
    for mult in (32, 64, 128):
        wp = _padded(w_ext, mult)
        if wp.shape[0] != P:
            shrink[f"padded to {wp.shape[0]} rows"] = lambda wp=wp: torch.mm(x, wp.t(), out_dtype=f32)[:, :P]
    du = {
        "layer: mm(dy, B_cat^T)": lambda: torch.mm(dy, bt, out_dtype=f32),
        "transposed": lambda: torch.mm(bt.t(), dy.t(), out_dtype=f32).t(),
        "cublasLt": _lt(lambda: torch.mm(dy, bt, out_dtype=f32)),
    }
    d_ext = {
        "layer: mm(dhl^T, x)": lambda: torch.mm(dhl.t(), x),
        "transposed": lambda: torch.mm(x.t(), dhl).t(),
        "float32 out": lambda: torch.mm(dhl.t(), x, out_dtype=f32).to(dt),
        "cublasLt": _lt(lambda: torch.mm(dhl.t(), x)),
    }
    d_b = {
        "layer: mm(dy^T, u)": lambda: torch.mm(dy.t(), u),
        "transposed": lambda: torch.mm(u.t(), dy).t(),
        "float32 out": lambda: torch.mm(dy.t(), u, out_dtype=f32).to(dt),
        "cublasLt": _lt(lambda: torch.mm(dy.t(), u)),
    }
    dhl_t = dhl.t().contiguous()  # the gate backward could write dhl^T: cuBLAS then reads A row-major
    d_ext["dhl stored (Q, T)"] = lambda: torch.mm(dhl_t, x)
    for mult in (16, 32, 64, 128):
        dp = _padded(dhl.t(), mult)  # (rows, T): dhl with zero columns appended, stored transposed
        if dp.shape[0] != Q:
            d_ext[f"dhl padded to {dp.shape[0]} columns, stored (Q, T)"] = lambda dp=dp: torch.mm(dp, x)[:Q]
            d_ext[f"dhl padded to {dp.shape[0]} columns"] = lambda dp=dp.t().contiguous(): torch.mm(dp.t(), x)[:Q]
    u_t = u.t().contiguous()  # the gate forward could write u^T
    d_b["u stored (R, T)"] = lambda: torch.mm(dy.t(), u_t.t())
    d_b["u stored (R, T), transposed"] = lambda: torch.mm(u_t, dy).t()
    d_ext["dA alone (R rows; dWr not computed)"] = lambda: torch.mm(dhl[:, :R].t(), x)
    for s in (2, 4, 8):
        d_ext[f"split-T {s}"] = lambda s=s: _split_t(dhl, x, s, dt)
        d_b[f"split-T {s}"] = lambda s=s: _split_t(dy, u, s, dt)
    return [
        ("shrink hl = x w_ext^T", shrink, 2 * (T * n_in + P * n_in) + 4 * T * P),
        ("du = dy B_cat^T", du, 2 * (T * n_out + R * n_out) + 4 * T * R),
        ("[dA; dWr] = dhl^T x", d_ext, 2 * (T * Q + T * n_in + Q * n_in)),
        ("dB = dy^T u", d_b, 2 * (T * n_out + T * R + n_out * R)),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="only the products whose names start so, e.g. [dA dB")
    args = ap.parse_args()
    a = torch.randn(2 ** 28, device="cuda", dtype=torch.bfloat16)
    bw = 4 * a.numel() / (do_bench(lambda: a.clone()) * 1e-3)
    del a
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16")
    shapes = [(8192, 4096, 4096, 8, 16), (8192, 4096, 14336, 8, 16), (8192, 4096, 4096, 32, 8), (2048, 4096, 4096, 8, 16)]
    for T, n_in, n_out, E, r in shapes:
        for name, forms, nbytes in cases(T, n_in, n_out, E, r, torch.bfloat16):
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            layer_key = next(iter(forms))
            ref = forms[layer_key]().float()
            ok = {}
            for k, fn in forms.items():
                try:
                    got = fn().float()
                except Exception as e:  # noqa: BLE001 - a form this torch/cuBLAS does not take
                    print(f"  {name} / {k}: failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                want = ref[: got.shape[0]]  # "dA alone" computes the first R rows
                err = ((got - want).norm() / want.norm()).item()
                if not err < 1e-2:
                    print(f"  {name} / {k}: WRONG, rel err {err:.1e}")
                    continue
                ok[k] = fn
            times = {k: [] for k in ok}
            for _ in range(args.rounds):
                for k, fn in ok.items():
                    times[k].append(do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3)
            base = statistics.median(times[layer_key])
            print(f"\n## T={T} {n_in}->{n_out} E={E} r={r}: {name} ({nbytes / 1e6:.1f} MB)\n"
                  "| form | µs (median; range over rounds) | × layer's call | fraction of copy bandwidth |\n"
                  "| --- | --- | --- | --- |")
            for k, v in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
                m = statistics.median(v)
                print(f"| {k} | {m:.1f} ({min(v):.1f}-{max(v):.1f}) | {m / base:.3f} | {nbytes / (m * 1e-6) / bw:.0%} |")


if __name__ == "__main__":
    main()
