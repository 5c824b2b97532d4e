"""Per-layer CUDA graphs (MoLLinear(graph_tokens=N), mol.kernels.layer_graphs) on the GPU: correctness, host cost.

    python benchmarks/gpu_check_layer_graphs.py [--out results.md] [--skip-timing | --skip-check] [--modes M ...]
                                                [--decode-only]

1. Correctness, real captures: a graphed MoLLinear against the same layer without graphs, over three training
   steps with fresh inputs, the gradients accumulated into .grad over two micro-batches per step (so a gradient
   aliasing a graph buffer would show): y, aux and the gradients of x, lora_A, lora_B and the router weight.
   The graphed layer replays the kernels the ungraphed one launches (whose float64 accuracy
   gpu_check_routed.py checks), so the two must agree up to the kernels' own run-to-run summation order
   (the small-T forward's split-K atomics, which move bf16 outputs by one rounding here and there: 1.4e-5 to
   9.2e-5 measured at T=7); pass: relative difference < 1e-6 in float32, < 1e-3 in bf16 (a quarter of one bf16
   rounding; a stale or unwritten buffer is off by O(1)). bf16 and float32; T = 7, 512, 2048 (T=7 is the one-launch small-T forward);
   a plain frozen base, dropout (x_lora), router noise, an NF4 base (dequantized inside the graph), float32
   layers under bf16 autocast, and bf16 layers with float32 adapters (adapter_dtype="auto", mol.inject's default
   on a bf16 model); in both of the last, lora_A/B are cast inside the captured graph, read in place; and a layer
   given its graphs after construction (MoLLinear.set_graphs, what mol.set_graphs does on a loaded adapter). Also
   checks that the graphs were replayed (not silently skipped), and that the calls after each signature's first
   replayed through the layer's shortcut exactly where it applies (LayerGraphs.replay_hit: a plain or
   float32-adapter layer; not with dropout, noise, an NF4 base or autocast). Exit code 1 on any failure.
2. Time per fwd+bwd at T = 512 and 2048, eager loop, backward on the calling thread, 4096→4096 E=8 top-2 r=16 bf16, the
   four rows interleaved over rounds: the bare frozen base, MoLLinear, MoLLinear with graph_tokens, with bf16 and
   with float32 adapters; host µs per
   call (no synchronisation in the loop) and wall ms per call with one synchronisation; and the memory each
   capture keeps (memory_allocated before and after the first graphed call).
3. graph_inference_tokens (calls without gradients, eval mode): correctness as in 1, four calls under no_grad and
   inference_mode with every y and aux kept to the end, at T = 1 and 16 (the one-launch small-T forward), an NF4
   base (its own GEMV kernel), float32 adapters, autocast, T = 512, and T = 8 given by set_graphs; then the eager
   decode forward per call at B = 1 and 8 tokens, rows interleaved: the bare base, a LoRA (PEFT's ops), MoLLinear
   eager and graphed with bf16 and float32 adapters, and the memory each capture keeps. --decode-only runs only
   this part.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
from mol.kernels import base_gemm as bg  # noqa: E402
from mol.kernels import layer_graphs as lg  # noqa: E402
from mol.quant import NF4Linear  # noqa: E402

DEV = "cuda"
# calls that replayed through the layer's shortcut (LayerGraphs.replay_hit: a call like an earlier replayed one)
SHORTCUTS = [0]
_replay_hit = lg.LayerGraphs.replay_hit


def _counted_replay_hit(self, *args):
    out = _replay_hit(self, *args)
    SHORTCUTS[0] += out is not None
    return out


lg.LayerGraphs.replay_hit = _counted_replay_hit


def shortcuts_expected(mode: str, calls: int, signatures: int) -> int:
    """Calls that should take the shortcut: every call after each signature's first, where the layer passes only
    its parameters after x (a plain nn.Linear base, adapters of either dtype); none with dropout or noise (new
    tensors each call), an NF4 base (dequantized through weight_fn) or autocast (the ordinary kernels)."""
    return calls - signatures if mode in ("plain", "f32adapters", "set_graphs") else 0


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_pair(n_in, n_out, dtype, mode, graph_tokens, gen, inference=False):
    kw = dict(num_experts=8, top_k=2, rank=16, alpha=32.0, aux_loss_coef=0.01, z_loss_coef=0.001,
              dropout=0.1 if mode == "dropout" else 0.0, router_noise=0.5 if mode == "noise" else 0.0,
              adapter_dtype="auto" if mode == "f32adapters" else None)
    weight = torch.randn(n_out, n_in, device=DEV, generator=gen, dtype=torch.float32) / n_in**0.5
    layers = []
    for tokens in (0, graph_tokens):
        base = torch.nn.Linear(n_in, n_out, bias=True, device=DEV, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(weight)
            base.bias.fill_(0.1)
        if mode == "nf4":
            base = NF4Linear.from_linear(base)
        graphs = {"graph_inference_tokens" if inference else "graph_tokens": tokens}
        layers.append(mol.MoLLinear(base, **({} if mode == "set_graphs" else graphs), **kw).to(DEV))
    plain, graphed = layers
    if mode == "set_graphs":  # given its graphs after construction, as mol.set_graphs does on a loaded adapter
        graphed.set_graphs(**graphs)
    with torch.no_grad():
        plain.lora_B.normal_(0, 0.02, generator=gen)
    graphed.load_state_dict(plain.state_dict())
    return plain, graphed


def check(T, n_in, n_out, dtype, mode, gen):
    plain, graphed = make_pair(n_in, n_out, dtype, mode, T, gen)
    worst = 0.0
    SHORTCUTS[0] = 0
    for step in range(3):
        for layer in (plain, graphed):
            layer.zero_grad(set_to_none=True)
        xs, outs = [], {}
        for micro in range(2):
            x = torch.randn(T, n_in, device=DEV, dtype=dtype, generator=gen)
            w_y = torch.randn(T, n_out, device=DEV, dtype=dtype, generator=gen)
            seed = 1000 * step + micro
            for name, layer in (("plain", plain), ("graphed", graphed)):
                torch.manual_seed(seed)  # the same dropout mask and router noise for both
                xi = x.clone().requires_grad_()
                # autocast: float32 parameters, bf16 compute (mol.train's bf16-mixed); lora_A/B reach the routed
                # layer as float32 parameters and are cast inside it (inside the graph when graphed)
                with torch.autocast("cuda", torch.bfloat16, enabled=mode == "autocast"):
                    y = layer(xi)
                    aux = layer.aux_loss()
                ((y.float() * w_y.float()).sum() + aux).backward()
                outs.setdefault(name, []).append((y, aux, xi.grad))
            xs.append(x)
        for (yp, ap, dxp), (yg, ag, dxg) in zip(outs["plain"], outs["graphed"]):
            worst = max(worst, rel(yg, yp), rel(ag, ap), rel(dxg, dxp))
        for (n, p), (_, q) in zip(plain.named_parameters(), graphed.named_parameters()):
            if p.requires_grad:
                worst = max(worst, rel(q.grad, p.grad))
    caps = list(graphed._graphs.captured.values())
    replays = len(caps) == 1 and caps[0].generation == 6
    return worst, replays, SHORTCUTS[0], shortcuts_expected(mode, 6, 1)


def check_inference(T, n_in, n_out, dtype, mode, gen):
    """graph_inference_tokens: eval-mode calls without gradients, under no_grad and inference_mode, against the
    same layer without graphs: y and aux of four calls with fresh x each, kept until the end (a later replay
    overwriting one would show). Returns (worst relative difference, every call replayed)."""
    plain, graphed = make_pair(n_in, n_out, dtype, mode, T, gen, inference=True)
    plain.eval(), graphed.eval()
    outs = {"plain": [], "graphed": []}
    SHORTCUTS[0] = 0
    for grad_mode in (torch.no_grad, torch.no_grad, torch.inference_mode, torch.inference_mode):
        x = torch.randn(1, T, n_in, device=DEV, dtype=dtype, generator=gen)
        with grad_mode(), torch.autocast("cuda", torch.bfloat16, enabled=mode == "autocast"):
            for name, layer in (("plain", plain), ("graphed", graphed)):
                outs[name].append((layer(x), layer.aux_loss()))
    worst = max(rel(g, p) for pair in zip(outs["graphed"], outs["plain"]) for g, p in zip(*pair))
    caps = list(graphed._graphs.inference.values())
    return (worst, len(caps) == 2 and all(c.replays == 2 for c in caps), SHORTCUTS[0],
            shortcuts_expected(mode, 4, 2))  # no_grad and inference_mode: a signature each


def host_and_wall(fns: dict, calls=100, rounds=5):
    """Per row: median over rounds of host µs per call (no sync inside the loop) and wall ms per call."""
    res = {k: ([], []) for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            res[k][0].append((t1 - t0) / calls * 1e6)
            res[k][1].append((t2 - t0) / calls * 1e3)
    return {k: (statistics.median(h), statistics.median(w)) for k, (h, w) in res.items()}


def timing(lines, gen):
    n = 4096
    lines += ["", "Eager fwd+bwd per call (backward on the calling thread), 4096→4096 E=8 top-2 r=16 bf16, rows "
              "interleaved, medians of 5 rounds of 100 calls:", "",
              "| T | row | host µs / call | wall ms / call | × base (wall) | capture keeps MiB |",
              "| --- | --- | --- | --- | --- | --- |"]
    for T in (512, 2048):
        plain, graphed = make_pair(n, n, torch.bfloat16, "plain", T, gen)
        graphed32 = make_pair(n, n, torch.bfloat16, "f32adapters", T, gen)[1]  # mol.inject's default adapters
        base = plain.base_layer
        x = torch.randn(T, n, device=DEV, dtype=torch.bfloat16, generator=gen, requires_grad=True)
        dy = torch.randn(T, n, device=DEV, dtype=torch.bfloat16, generator=gen)
        one = torch.ones((), device=DEV)

        def base_step():
            torch.autograd.grad(base(x), [x], dy)

        def layer_step(m):
            params = [m.lora_A, m.lora_B, m.router.weight]

            def step():
                y = m(x)
                torch.autograd.grad([y, m.aux_loss()], [x] + params, [dy, one])
            return step
        plain_step, graphed_step, graphed32_step = layer_step(plain), layer_step(graphed), layer_step(graphed32)
        with torch.autograd.set_multithreading_enabled(False):
            plain_step()
            kept = []
            for step in (graphed_step, graphed32_step):
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                kept.append((torch.cuda.memory_allocated() - before) / 2**20)
            for fn in (base_step, plain_step, graphed_step, graphed32_step):
                for _ in range(10):
                    fn()
            res = host_and_wall({"bare frozen base": base_step, "MoLLinear": plain_step,
                                 f"MoLLinear, graph_tokens={T}": graphed_step,
                                 f"MoLLinear, float32 adapters, graph_tokens={T}": graphed32_step})
        wb = res["bare frozen base"][1]
        for k, (h, w) in res.items():
            mem = f"{kept[1 if 'float32' in k else 0]:.1f}" if "graph_tokens" in k else ""
            lines.append(f"| {T} | {k} | {h:.0f} | {w:.3f} | {w / wb:.2f}× | {mem} |")
            print(lines[-1], flush=True)
        del plain, graphed, graphed32
        torch.cuda.empty_cache()


def timing_decode(lines, gen, n=4096):
    lines += ["", f"Eager decode forward per call (no_grad, eval mode), {n}→{n} E=8 top-2 r=16 bf16, x (B, 1, {n}), "
              "rows interleaved, medians of 5 rounds of 100 calls:", "",
              "| B | row | host µs / call | wall µs / call | × base (wall) | capture keeps MiB, allocated / reserved |",
              "| --- | --- | --- | --- | --- | --- |"]
    for B in (1, 8):
        rows = {}
        x = torch.randn(B, 1, n, device=DEV, dtype=torch.bfloat16, generator=gen)
        for adapters in ("bf16", "float32"):
            mode = "f32adapters" if adapters == "float32" else "plain"
            plain, graphed = make_pair(n, n, torch.bfloat16, mode, B, gen, inference=True)
            plain.eval(), graphed.eval()
            if adapters == "bf16":
                base = plain.base_layer
                lora = mol.MoLLinear(base, num_experts=1, rank=16, alpha=32.0).to(DEV).eval()
                rows["bare frozen base"] = lambda: base(x)
                rows["LoRA r=16 (PEFT's ops: base + B(A x))"] = lambda lora=lora: lora(x)
            rows[f"MoLLinear, {adapters} adapters"] = lambda m=plain: m(x)
            rows[f"MoLLinear, {adapters} adapters, graph_inference_tokens={B}"] = lambda m=graphed: m(x)
        kept = {}
        with torch.no_grad():
            for k, fn in rows.items():
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
                fn()  # a graphed row captures here: what its pool keeps
                torch.cuda.synchronize()
                kept[k] = [(a - b) / 2**20 for a, b in zip((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()),
                                                           before)]
                for _ in range(10):
                    fn()
            res = host_and_wall(rows)
        wb = res["bare frozen base"][1]
        for k, (h, w) in res.items():
            mem = "{:.2f} / {:.2f}".format(*kept[k]) if "graph_" in k else ""
            lines.append(f"| {B} | {k} | {h:.1f} | {w * 1e3:.1f} | {w / wb:.2f}× | {mem} |")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--modes", nargs="+", default=None, help="only the correctness cases of these modes "
                    "(plain, dropout, noise, nf4, autocast, f32adapters, set_graphs)")
    ap.add_argument("--decode-only", action="store_true", help="only graph_inference_tokens: its check and the "
                    "eager decode timing")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_layer_graphs.py needs a CUDA GPU and none is visible here")
    # the graphed and the plain layer must run the same kernels for the comparison to hold to 1e-3: eager base
    # GEMMs run cuBLAS, captured ones the tuned Triton kernel (bf16 rounding apart)
    bg.EAGER_CUBLAS = False
    gen = torch.Generator(device=DEV).manual_seed(0)
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}", "",
             "| case | worst relative difference, graphed vs not | graphs replayed | calls through the shortcut "
             "(expected) | ok |", "| --- | --- | --- | --- | --- |"]
    failed = False
    cases = [(T, 4096, 4096, dt, "plain") for T in (7, 512, 2048) for dt in (torch.bfloat16, torch.float32)]
    cases += [(512, 4096, 11008, torch.bfloat16, m) for m in ("dropout", "noise", "nf4")]
    cases += [(7, 4096, 4096, torch.bfloat16, "nf4")]
    cases += [(T, 4096, 4096, torch.float32, "autocast") for T in (7, 512)]
    cases += [(T, 4096, 4096, torch.bfloat16, "f32adapters") for T in (7, 512)]
    cases += [(512, 4096, 4096, torch.bfloat16, "set_graphs")]
    if args.modes:
        cases = [c for c in cases if c[4] in args.modes]
    # graph_inference_tokens: decode-sized calls (the one-launch small-T forward; NF4's own GEMV kernel as the base)
    # and an evaluation-sized one (the multi-kernel forward)
    inference = [(T, 4096, 4096, dt, "plain") for T in (1, 16) for dt in (torch.bfloat16, torch.float32)]
    inference += [(1, 4096, 11008, torch.bfloat16, m) for m in ("nf4", "f32adapters")]
    inference += [(7, 4096, 4096, torch.float32, "autocast"), (512, 4096, 4096, torch.bfloat16, "f32adapters")]
    inference += [(8, 4096, 4096, torch.bfloat16, "set_graphs")]
    if args.modes:
        inference = [c for c in inference if c[4] in args.modes]
    if args.decode_only:
        cases = []
    todo = [(c, check) for c in cases] + [(c, check_inference) for c in inference]
    for (T, n_in, n_out, dt, mode), fn in ([] if args.skip_check else todo):
        worst, replayed, shortcuts, expected = fn(T, n_in, n_out, dt, mode, gen)
        ok = worst < (1e-6 if dt == torch.float32 and mode != "autocast" else 1e-3) and replayed
        ok &= shortcuts == expected
        failed |= not ok
        what = "no-grad (graph_inference_tokens)" if fn is check_inference else "fwd+bwd"
        lines.append(f"| T={T} {n_in}→{n_out} {str(dt)[6:]} {mode}, {what} | {worst:.1e} | {replayed} | "
                     f"{shortcuts} ({expected}) | {'yes' if ok else 'NO'} |")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    if not args.skip_timing:
        if not args.decode_only:
            timing(lines, gen)
        timing_decode(lines, gen)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
