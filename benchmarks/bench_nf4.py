"""NF4 (QLoRA) base layer on a GPU: correctness at real sizes, then speed and memory vs the bf16 frozen base.

    python benchmarks/bench_nf4.py [--quick]

bf16 activations. fwd+bwd = forward then torch.autograd.grad w.r.t. x (and the adapter parameters where there
are any); the frozen weight has no gradient. Median of CUDA-event timings (triton.testing.do_bench), each case
timed in three interleaved rounds; the table gives the median round and the spread (max-min)/median.
Decode (T=1, 2, 16) forward is timed both eagerly and under CUDA-graph replay (how decode loops run); the fused
small-T kernel's rows give the NF4 bytes read per second. Those replay one layer back to back, so its weight stays
(partly) in the L2 cache; the "stack" rows replay a stack of distinct layers, as a model's decode step reads them.
If bitsandbytes imports, its Linear4bit (NF4, double quant) is timed in the same run and its dequantization
of our packed tensors is compared bit for bit.
"""

import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import grouped_lora as gl, nf4_mma  # noqa: E402
from mol.kernels.nf4 import DOT_CONFIGS, FMA_CONFIGS, nf4_dequantize, nf4_matmul_small  # noqa: E402
from mol.quant import NF4Linear, dequantize_nf4_reference, quantize_nf4  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
SHAPES = [(4096, 4096), (14336, 4096)]  # (out, in)
T_TRAIN = 8192
try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception as e:  # noqa: BLE001
    bnb = None
    print(f"bitsandbytes not available: {e}")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bnb_linear(W):
    lin = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=False, compute_dtype=DT, compress_statistics=True,
                            quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(W.detach().cpu(), requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", blocksize=64)
    return lin.to(DEV)


def time_group(cases, graph=False, rounds=3):
    """Median time (ms) of each case in `rounds` interleaved rounds, so clock drift hits all cases alike."""
    b = (lambda f: do_bench_cudagraph(f, rep=100, return_mode="median")) if graph else \
        (lambda f: do_bench(f, warmup=25, rep=150, return_mode="median"))
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            torch.cuda.synchronize()
            out[name] = []
        except Exception as e:  # noqa: BLE001
            print(f"    {name}: failed: {type(e).__name__}: {e}")
    for _ in range(rounds):
        for name in list(out):
            try:
                out[name].append(b(cases[name]))
            except Exception as e:  # noqa: BLE001
                print(f"    {name} (graph={graph}): failed: {type(e).__name__}: {e}")
                del out[name]
    return out


def summarize(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2], (ts[-1] - ts[0]) / ts[len(ts) // 2]


def fwd_bwd(fn, inputs, dy):
    def run():
        y = fn()
        torch.autograd.grad(y, inputs, dy)
    return run


def peak_mib(fn):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def correctness(gen):
    print("== correctness (GPU) ==")
    for n_out, n_in in SHAPES + [(SHAPES[0][1], SHAPES[1][0])]:
        W = torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02
        t0 = time.time()
        p = quantize_nf4(W)
        torch.cuda.synchronize()
        tq = time.time() - t0
        ref = dequantize_nf4_reference(p)
        out = torch.full_like(ref, float("nan"))
        nf4_dequantize(p, DT, out=out, lut=1)
        lut1_ok = torch.equal(out, ref)
        out = torch.full_like(ref, float("nan"))
        nf4_dequantize(p, DT, out=out, lut=0)
        line = (f"{n_out}x{n_in}: quantize {tq * 1e3:.0f} ms, bits/param {p.bits_per_param():.4f}, "
                f"triton dequant == torch ref: {torch.equal(out, ref)} (select-tree LUT: {lut1_ok}) (max diff "
                f"{(out.float() - ref.float()).abs().max().item():.3g}), rel err vs W {rel(out, W):.4f}")
        if bnb is not None:
            qb, sb = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            same_codes = (qb.reshape(-1) == p.codes).float().mean().item()
            same_absmax = (sb.absmax == p.absmax).float().mean().item()
            sd = {k[len("weight."):]: v for k, v in NF4Linear(p).to_bnb_state_dict().items() if k != "weight"}
            qs = bnbF.QuantState.from_dict(sd, device=torch.device(DEV))
            bdeq = bnbF.dequantize_4bit(p.codes.reshape(-1, 1), qs)
            line += (f"\n    bnb CUDA quantize: codes equal {same_codes:.6%}, absmax equal {same_absmax:.6%}; "
                     f"bnb dequantize_4bit(our packed) == our triton dequant: {torch.equal(bdeq, out)} "
                     f"(max diff {(bdeq.float() - out.float()).abs().max().item():.3g})")
        print(line)
        w64 = ref.double()
        # float16 x too: the byte-permute levels in float16 and the f16x2 multiplies of both paths
        for xdt, T in itertools.product((DT, torch.float16), (1, 2, 5, 16)):
            x = torch.randn(T, n_in, device=DEV, dtype=xdt, generator=gen)
            y = nf4_matmul_small(x, p)
            yr = x.double() @ w64.T
            errs = [rel(nf4_matmul_small(x, p, config=c), yr) for c in (FMA_CONFIGS if T <= 2 else DOT_CONFIGS)]
            print(f"    fused small-T kernel T={T}, {xdt}: rel err vs float64 {rel(y, yr):.2e} (autotuned), "
                  f"{max(errs):.2e} (worst of its {len(errs)} configs)")
        lin = NF4Linear(p)
        x = torch.randn(T_TRAIN, n_in, device=DEV, dtype=DT, generator=gen, requires_grad=True)
        dy = torch.randn(T_TRAIN, n_out, device=DEV, dtype=DT, generator=gen)
        y = lin(x)
        (gx,) = torch.autograd.grad(y, x, dy)
        xr = x.detach().float()
        print(f"    NF4Linear T=8192 fwd rel err {rel(y, xr @ ref.float().T):.2e}, "
              f"dx rel err {rel(gx, dy.float() @ ref.float()):.2e}")
        del W, p, ref, out, lin, x, dy, y, gx
        torch.cuda.empty_cache()


def bench_train(gen, rows):
    print("== fwd+bwd, T=8192 ==")
    for n_out, n_in in SHAPES:
        T = T_TRAIN
        W = torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02
        x = torch.randn(T, n_in, device=DEV, dtype=DT, generator=gen, requires_grad=True)
        dy = torch.randn(T, n_out, device=DEV, dtype=DT, generator=gen)
        nf4 = NF4Linear(quantize_nf4(W))
        cases = {"bf16 frozen base": fwd_bwd(lambda: F.linear(x, W), [x], dy),
                 "NF4Linear (mol)": fwd_bwd(lambda: nf4(x), [x], dy)}
        fwd = {"bf16 frozen base": lambda: F.linear(x, W), "NF4Linear (mol)": lambda: nf4(x)}
        if bnb is not None:
            bl = bnb_linear(W)
            cases["bitsandbytes Linear4bit"] = fwd_bwd(lambda: bl(x), [x], dy)
            fwd["bitsandbytes Linear4bit"] = lambda: bl(x)
        p = nf4.packed
        fwd["(mol dequant kernel alone)"] = lambda: nf4_dequantize(p, DT)
        fwd["(mol dequant kernel, select-tree LUT)"] = lambda: nf4_dequantize(p, DT, lut=1)
        for what, group in (("fwd+bwd", cases), ("fwd", fwd)):
            base = None
            for name, ts in time_group(group).items():
                m, spread = summarize(ts)
                base = base or m
                rows.append((f"{what} T={T} {n_in}->{n_out}", name, m, m / base, spread))
                print(f"{what:8s} {n_in}->{n_out} {name:40s} {m * 1e3:9.1f} us  {m / base:5.2f}x  "
                      f"(rounds {'/'.join(f'{t * 1e3:.1f}' for t in ts)})")
        bytes_moved = p.codes.numel() + p.absmax.numel() + 2 * W.numel()
        for lut in (0, 1):
            tdq = summarize(time_group({"dq": lambda: nf4_dequantize(p, DT, lut=lut)})["dq"])[0]
            print(f"    dequant kernel LUT={lut}: {tdq * 1e3:.1f} us, {bytes_moved / tdq / 1e6:.0f} GB/s "
                  "(read 4.13 bits + write 16 bits per value)")
        del W, x, dy, nf4
        torch.cuda.empty_cache()


def bench_decode(gen, rows):
    """Decode forward: the bf16 base, NF4Linear's default (dequantize + cuBLAS), and the fused small-T kernel through
    NF4Linear(fused_decode=True) (autotuned) and through nf4_matmul_small with each of its configs (CUDA graph
    only). TB/s = NF4 bytes (codes + absmax + nested absmax) / time, for the NF4 rows."""
    from mol.kernels.nf4 import _small_dot, _small_fma

    print("== decode forward (no grad) ==")
    with torch.no_grad():
        for n_out, n_in in SHAPES:
            W = torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02
            nf4 = NF4Linear(quantize_nf4(W))
            nf4.fused_decode = False  # the dequantize + cuBLAS path, for comparison
            p = nf4.packed
            fused = NF4Linear(p)
            fused.fused_decode = True
            nbytes = p.storage_bits() // 8
            print(f"  {n_in}->{n_out}: {nbytes / 1e6:.2f} MB of NF4 (bf16 weight {W.numel() * 2 / 1e6:.2f} MB)")
            bl = bnb_linear(W) if bnb is not None else None
            for T in (1, 2, 16):
                x = torch.randn(T, n_in, device=DEV, dtype=DT, generator=gen)
                yr = x.double() @ dequantize_nf4_reference(p, torch.float64).T
                print(f"    T={T}: fused kernel rel err vs float64 {rel(fused(x), yr):.2e}")
                cases = {"bf16 frozen base": lambda: F.linear(x, W),
                         "NF4Linear fused_decode=False (dequant + cuBLAS)": lambda: nf4(x),
                         "NF4Linear default (small-T kernel v4, autotuned)": lambda: fused(x)}
                if bl is not None:
                    cases["bitsandbytes Linear4bit"] = lambda: bl(x)
                for graph in (True, False):
                    base = None
                    mode = "cuda graph" if graph else "eager"
                    for name, ts in time_group(cases, graph=graph).items():
                        m, spread = summarize(ts)
                        base = base or m
                        label = name if name.startswith("bf16") else f"{name} [{nbytes / (m * 1e-3) / 1e12:.2f} TB/s]"
                        rows.append((f"fwd T={T} {n_in}->{n_out} ({mode})", label, m, m / base, spread))
                        print(f"T={T:2d} {n_in}->{n_out} {mode:10s} {label:78s} {m * 1e3:8.2f} us  {m / base:5.2f}x")
                    if graph:
                        t_base = base or float("nan")
                tuner = _small_fma if T <= 2 else _small_dot
                print(f"    autotuned small-T config: {getattr(tuner, 'best_config', None)}")
                configs = FMA_CONFIGS if T <= 2 else DOT_CONFIGS
                sweep = {str(c): (lambda c=c: nf4_matmul_small(x, p, config=c)) for c in configs}
                for name, ts in time_group(sweep, graph=True).items():
                    m, spread = summarize(ts)
                    label = f"small-T kernel, config {name} [{nbytes / (m * 1e-3) / 1e12:.2f} TB/s]"
                    rows.append((f"fwd T={T} {n_in}->{n_out} (cuda graph)", label, m, m / t_base, spread))
                    print(f"T={T:2d} {n_in}->{n_out} cuda graph {label:78s} {m * 1e3:8.2f} us  {m / t_base:5.2f}x")
            del W, nf4, fused
            torch.cuda.empty_cache()


def decode_choices(n_out, n_in):
    """The configs NF4Linear's decode tuners have chosen so far for this weight shape, by T bucket (the Triton dot
    path's bucket is 16). The pick decides a stack row: through a 4096² stack the configs span 7.7-10.4 µs at T=1
    and 10.3-19.3 at T=16 (RESULTS run 49)."""
    fma = {k[4]: v[0] for k, v in gl._CHOSEN.items() if k[0] == "nf4_small" and k[2:4] == (n_out, n_in)}
    mma = {k[-1]: v for k, v in nf4_mma._CHOSEN.items() if k[1] == (n_out, n_in)}
    return {**{f"T={t} Triton": c for t, c in fma.items()}, **{f"T<={t} Gluon MMA": c for t, c in mma.items()}}


def bench_decode_stack(gen, rows):
    """Decode forward as a model runs it: a stack of distinct layers, each weight read once per step, so no weight
    is still in the L2 cache from its previous call (as it is when one layer is replayed back to back, the decode
    rows above: a 4096x4096 bf16 weight is 34 MB of an H100's 50 MB L2, its NF4 form 8.7 MB). The stack holds
    enough layers for its NF4 weights to fill the L2 three times over; one CUDA graph runs them all on the same x,
    and a row is the graph's time over the number of layers."""
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    print(f"== decode forward through a stack of distinct layers (L2 {l2 / 2**20:.0f} MiB) ==")
    with torch.no_grad():
        for n_out, n_in in SHAPES:
            Ws = [torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02]
            nf4s = [NF4Linear(quantize_nf4(Ws[0]))]
            n_layers = -(-3 * l2 // (nf4s[0].packed.storage_bits() // 8))
            Ws += [torch.randn(n_out, n_in, device=DEV, dtype=DT, generator=gen) * 0.02 for _ in range(n_layers - 1)]
            nf4s += [NF4Linear(quantize_nf4(W)) for W in Ws[1:]]
            bls = [bnb_linear(W) for W in Ws] if bnb is not None else None
            print(f"  {n_in}->{n_out}: {n_layers} layers, {n_layers * Ws[0].numel() * 2 / 1e6:.0f} MB bf16, "
                  f"{n_layers * (nf4s[0].packed.storage_bits() // 8) / 1e6:.0f} MB NF4")
            for T in (1, 2, 16):
                x = torch.randn(T, n_in, device=DEV, dtype=DT, generator=gen)
                # the stacks, and their first layer alone replayed back to back, timed in the same rounds
                cases = {("stack", "bf16 frozen base"): lambda: [F.linear(x, W) for W in Ws],
                         ("stack", "NF4Linear default"): lambda: [m(x) for m in nf4s],
                         ("one", "bf16 frozen base"): lambda: F.linear(x, Ws[0]),
                         ("one", "NF4Linear default"): lambda: nf4s[0](x)}
                if bls is not None:
                    cases["stack", "bitsandbytes Linear4bit"] = lambda: [m(x) for m in bls]
                    cases["one", "bitsandbytes Linear4bit"] = lambda: bls[0](x)
                times = time_group(cases, graph=True)
                for form, per, what in (("stack", n_layers, f"{n_layers} distinct layers, per layer"),
                                        ("one", 1, "one layer back to back")):
                    base = None
                    for (f, name), ts in times.items():
                        if f != form:
                            continue
                        m, spread = summarize([t / per for t in ts])
                        base = base or m
                        rows.append((f"fwd T={T} {n_in}->{n_out} (cuda graph, {what})", name, m, m / base, spread))
                        print(f"T={T:2d} {n_in}->{n_out} {what:34s} {name:24s} {m * 1e3:8.2f} us  {m / base:5.2f}x",
                              flush=True)
            print(f"  {n_in}->{n_out} decode configs chosen: {decode_choices(n_out, n_in)}", flush=True)
            del Ws, nf4s, bls
            torch.cuda.empty_cache()


def bench_qlora_mol(gen, rows):
    print("== QLoRA-MoL: NF4 base + E=8 top-2 r=16, fwd+bwd, T=8192, 4096->4096 ==")
    try:
        from mol import MoLLinear
    except Exception as e:  # noqa: BLE001
        print(f"mol.MoLLinear not available: {e}")
        return
    T, n = T_TRAIN, SHAPES[0][0]
    W = torch.randn(n, n, device=DEV, dtype=DT, generator=gen) * 0.02
    x = torch.randn(T, n, device=DEV, dtype=DT, generator=gen, requires_grad=True)
    dy = torch.randn(T, n, device=DEV, dtype=DT, generator=gen)
    base = nn.Linear(n, n, bias=False, device=DEV, dtype=DT)
    with torch.no_grad():
        base.weight.copy_(W)
    base.requires_grad_(False)

    def mol_layer(b, E, K):
        torch.manual_seed(0)
        layer = MoLLinear(b, num_experts=E, top_k=K, rank=16, alpha=32).to(DEV)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)  # never time on zeros
        return layer

    mol_bf16 = mol_layer(base, 8, 2)
    nf4 = NF4Linear.from_linear(base)
    mol_nf4 = mol_layer(nf4, 8, 2)
    # NF4Linear has no dense .weight, so MoLLinear picks float32 adapters; put them in bf16 as on the bf16 base
    for name, prm in mol_bf16.named_parameters():
        if prm.requires_grad:
            mol_nf4.get_parameter(name).data = mol_nf4.get_parameter(name).data.to(prm.dtype)
    lora_nf4 = mol_layer(NF4Linear.from_linear(base), 1, 1)
    lora_nf4.lora_A.data, lora_nf4.lora_B.data = lora_nf4.lora_A.data.to(DT), lora_nf4.lora_B.data.to(DT)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731

    def layer_step(m):  # fwd+bwd, then drop the kept routing (a CUDA-graph capture must not free it mid-capture)
        step = fwd_bwd(lambda: m(x), [x] + trainable(m), dy)

        def run():
            step()
            m.clear_routing()
        return run
    cases = {"bf16 frozen base": fwd_bwd(lambda: base(x), [x], dy),
             "MoL on bf16 base (E=8 top-2 r=16)": layer_step(mol_bf16),
             "QLoRA-MoL (mol NF4 + E=8 top-2 r=16)": layer_step(mol_nf4),
             "QLoRA (mol NF4 + LoRA r=16)": layer_step(lora_nf4)}
    if bnb is not None:
        bl = bnb_linear(W)
        A = (torch.randn(16, n, device=DEV, dtype=DT, generator=gen) / n**0.5).requires_grad_()
        B = (torch.randn(n, 16, device=DEV, dtype=DT, generator=gen) * 0.01).requires_grad_()
        # PEFT's LoRA-on-Linear4bit computation: base(x) + lora_B(lora_A(x)) * scaling
        cases["bnb QLoRA (Linear4bit + LoRA r=16, PEFT's ops)"] = fwd_bwd(
            lambda: bl(x) + F.linear(F.linear(x, A), B) * 2.0, [x, A, B], dy)
    for graph in (False, True):  # eager is host-bound on slow hosts; the graph replay is the GPU-side cost
        mode = "cuda graph" if graph else "eager"
        b0 = None
        for name, ts in time_group(cases, graph=graph).items():
            m, spread = summarize(ts)
            b0 = b0 or m
            rows.append((f"fwd+bwd T=8192 4096->4096 (adapters, {mode})", name, m, m / b0, spread))
            line = f"{mode:10s} {name:48s} {m * 1e3:9.1f} us  {m / b0:5.2f}x"
            if not graph:
                pk = peak_mib(cases[name])
                rows.append(("peak extra memory MiB of that fwd+bwd", name, pk, float("nan"), 0.0))
                line += f"   peak +{pk:8.1f} MiB"
            print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--only", choices=["train", "decode", "stack", "qlora"], help="run one benchmark section")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_nf4.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "bnb", getattr(bnb, "__version__", None))
    gen = torch.Generator(device=DEV).manual_seed(int(time.time()))
    rows = []
    if not args.skip_correctness:
        correctness(gen)
    for name, fn in (("train", bench_train), ("decode", bench_decode), ("stack", bench_decode_stack),
                     ("qlora", bench_qlora_mol)):
        if args.only in (None, name):
            fn(gen, rows)
    print("\n| case | variant | time (us) or MiB | ratio to bf16 base | spread of 3 rounds |")
    print("| --- | --- | --- | --- | --- |")
    for case, name, m, r, s in rows:
        val = f"{m * 1e3:.1f}" if "MiB" not in case else f"{m:.1f}"
        print(f"| {case} | {name} | {val} | {r:.2f}x | {s:.1%} |".replace("nanx", "-"))


if __name__ == "__main__":
    main()
