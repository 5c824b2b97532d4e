"""MoE benchmark: LoRA on the fused experts of a mixture-of-experts layer, mol against PEFT, bf16 (random weights).

    python benchmarks/bench_moe.py [--out results.md] [--tiny] [--only check layer decode model]

transformers 5 keeps a MoE layer's experts as 3-D tensors; LoRA on them is PEFT's
LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"]) and mol's LoRAConfig of the same field
(mol.experts.ExpertsLoRA). Both compute the same function; PEFT adds scaling * B_e A_e to every expert's weight
before each forward (a new (experts, out, in) tensor per targeted tensor, kept for the backward), mol adds the delta
to the activations of each (token, expert) pair.

check: one experts module of the "qwen3" shape below at T=2048, bf16, against a float64 reference (a loop over the
experts, written here): relative error of the output and of every gradient (dx, dA, dB of both tensors), for mol,
for scale PEFT, and mol QLoRA (against the reference on its dequantized NF4 values).

layer: one experts module, forward + backward with x requiring grad (the weights frozen), T=8192 tokens routed by
random logits (top-k, softmax weights), r=16 alpha=32 on gate_up_proj and down_proj; time is triton's do_bench
median, peak is the memory allocated over what the inputs and the module hold. Shapes: "qwen3" is Qwen3-30B-A3B's
(hidden 2048, 128 experts of intermediate 768, top-8), "mixtral" Mixtral-8x7B's (hidden 4096, 8 experts of 14336,
top-2). Rows: the bare frozen experts (transformers' grouped_mm implementation, the floor), mol, PEFT, and mol
QLoRA (the expert tensors in NF4, mol.NF4Experts, with the same LoRA: PEFT has no 4-bit expert tensors).

decode: the "qwen3" experts' forward at T = 1 and 4 tokens (8 and 32 pairs of 128 experts), each call replayed from a
CUDA graph: bare experts, mol, mol QLoRA (dequantizing only the pairs' expert slices), and mol QLoRA dequantizing
whole tensors (forced), µs.

model: a Qwen3-MoE-shaped model (hidden 2048, 4 layers, 16/4 heads of 128, 64 experts of 768, top-8, vocab 32000),
one AdamW step at batch x seq = 8 x 1024; LoRA r=16 on q/k/v/o and on the experts; median step time (CUDA events)
and peak memory. Rows: no adapter (frozen, backward to the embeddings), PEFT, mol, mol QLoRA (quantize_base="nf4":
the attention linears and the experts in NF4).
"""
import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
SHAPES = {  # hidden, intermediate per expert, experts, top-k
    "qwen3": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
}
TINY = {"qwen3": (64, 32, 8, 2), "mixtral": (64, 96, 4, 2)}


class Holder(torch.nn.Module):
    """One experts module, as a model holds it (PEFT and mol.inject walk a model to find the tensors)."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, top_k_index, top_k_weights):
        return self.experts(x, top_k_index, top_k_weights)


def make_experts(shape, dev):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    hidden, inter, experts, _ = shape
    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    module = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return Holder(module).to(dev, torch.bfloat16).requires_grad_(False)


def routing(tokens, shape, dev, seed=1):
    """Each token's top-k experts and their softmax weights, from random router logits."""
    g = torch.Generator(device=dev).manual_seed(seed)
    logits = torch.randn(tokens, shape[2], device=dev, generator=g)
    weights, index = torch.topk(logits.softmax(-1), shape[3], dim=-1)
    return index, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)


def with_lora(holder, lib):
    """``holder`` copied, with LoRA r=16 alpha=32 on both expert tensors, B random: lib "mol", "PEFT", or "mol
    QLoRA" (the expert tensors in NF4 first, quantize_base="nf4")."""
    holder = copy.deepcopy(holder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if lib == "PEFT":
            from peft import LoraConfig, inject_adapter_in_model

            holder = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=[],
                                                        target_parameters=EXPERTS), holder)
        else:
            holder = mol.inject(holder, mol.LoRAConfig(rank=16, alpha=32, target_modules=[], target_parameters=EXPERTS,
                                                       quantize_base="nf4" if "QLoRA" in lib else None))
    with torch.no_grad():
        for n, p in holder.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return holder


def lora_factors(holder, lib):
    """{tensor: (A (E, r, in), B (E, out, r))} of either library's adapter, as float64 views in mol's layout."""
    out = {}
    if lib.startswith("mol"):
        layer = holder.experts
        for name in layer.lora_A:
            out[name] = (layer.lora_A[name], layer.lora_B[name])
        return out
    wrapper = holder.experts
    while hasattr(wrapper, "parameter_name"):
        a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        e = wrapper.num_experts
        out[wrapper.parameter_name] = (a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 0, 1))
        wrapper = wrapper.base_layer
    return out


def base_tensors(holder):
    """(gate_up_proj, down_proj) the holder's experts compute with: the dense ones, or NF4's dequantized values."""
    experts = holder.experts
    experts = getattr(experts, "base_layer", experts)
    if isinstance(experts, mol.NF4Experts):
        return experts.nf4["gate_up_proj"].dequantize(), experts.nf4["down_proj"].dequantize()
    return experts.gate_up_proj, experts.down_proj


def reference(tensors, x, index, weights, factors, scaling):
    """The float64 forward of Qwen3-MoE experts plus LoRA, one expert at a time (independent of both libraries)."""
    w_up, w_down = (t.double() for t in tensors)
    x = x.double()
    y = torch.zeros_like(x)
    a_up, b_up = (t.double() for t in factors["gate_up_proj"])
    a_dn, b_dn = (t.double() for t in factors["down_proj"])
    for e in range(w_up.shape[0]):
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        xe = x[token]
        up = xe @ w_up[e].T + scaling * (xe @ a_up[e].T) @ b_up[e].T
        gate, val = up.chunk(2, dim=-1)
        mid = torch.nn.functional.silu(gate) * val
        down = mid @ w_down[e].T + scaling * (mid @ a_dn[e].T) @ b_dn[e].T
        y.index_add_(0, token, down * weights[token, slot, None].double())
    return y


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(shape, tokens, dev):
    base = make_experts(shape, dev)
    index, weights = routing(tokens, shape, dev)
    x = (torch.randn(tokens, shape[0], device=dev) * 0.5).to(torch.bfloat16)
    dy = torch.randn(tokens, shape[0], device=dev, dtype=torch.bfloat16)
    rows = []
    for lib in ("mol", "PEFT", "mol QLoRA"):
        holder = with_lora(base, lib)
        xg = x.clone().requires_grad_(True)
        y = holder(xg, index, weights)
        y.backward(dy)
        factors = lora_factors(holder, lib)
        # the reference's gradients: its own autograd in float64, from leaves holding the same values
        x64 = x.double().requires_grad_(True)
        f64 = {n: tuple(t.detach().double().requires_grad_(True) for t in ab) for n, ab in factors.items()}
        y64 = reference(base_tensors(holder if "QLoRA" in lib else base), x64, index, weights, f64, 2.0)
        y64.backward(dy.double())
        errs = {"y": rel(y, y64), "dx": rel(xg.grad, x64.grad)}
        for n, (a, b) in factors.items():
            da, db = (a.grad, b.grad) if lib != "PEFT" else (_peft_grad(holder, n, "A"), _peft_grad(holder, n, "B"))
            errs[f"dA {n}"], errs[f"dB {n}"] = rel(da, f64[n][0].grad), rel(db, f64[n][1].grad)
        rows.append((lib, errs, bool(torch.isfinite(y).all())))
        del holder
    return rows


def odd_sizes(shape, dev, sizes=(1, 7, 4097)):
    """mol's relative error against the float64 reference at token counts no tile divides (at T=1 and 7 most
    experts have no token)."""
    base = make_experts(shape, dev)
    holder = with_lora(base, "mol")
    out = []
    for tokens in sizes:
        index, weights = routing(tokens, shape, dev, seed=tokens)
        x = (torch.randn(tokens, shape[0], device=dev) * 0.5).to(torch.bfloat16)
        factors = {n: tuple(t.detach() for t in ab) for n, ab in lora_factors(holder, "mol").items()}
        with torch.no_grad():
            y = holder(x, index, weights)
        out.append((tokens, rel(y, reference(base_tensors(base), x, index, weights, factors, 2.0))))
    return out


def graph_and_compile(shape, tokens, dev, lib="mol"):
    """mol's forward captured in a CUDA graph (a host sync inside would make the capture fail) and replayed on new
    inputs, and fwd + bwd under torch.compile(fullgraph=True), each against the same eager calls."""
    base = make_experts(shape, dev)
    holder = with_lora(base, lib).eval()
    x = (torch.randn(tokens, shape[0], device=dev) * 0.5).to(torch.bfloat16)
    index, weights = routing(tokens, shape, dev)
    static = (x.clone(), index.clone(), weights.clone())
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                holder(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = holder(*static)
        index2, weights2 = routing(tokens, shape, dev, seed=5)  # new routing, new tokens: the same graph
        x2 = (torch.randn(tokens, shape[0], device=dev) * 0.5).to(torch.bfloat16)
        for t, v in zip(static, (x2, index2, weights2)):
            t.copy_(v)
        graph.replay()
        graph_diff = (y_static - holder(x2, index2, weights2)).abs().max().item()
    torch._dynamo.reset()
    compiled = torch.compile(holder, fullgraph=True)
    dy = torch.randn(tokens, shape[0], device=dev, dtype=torch.bfloat16)
    grads = []
    for fn in (holder, compiled):
        xg = x2.clone().requires_grad_(True)
        y = fn(xg, index2, weights2)
        y.backward(dy)
        grads.append([y, xg.grad] + [p.grad.clone() for p in holder.parameters() if p.requires_grad])
        for p in holder.parameters():
            p.grad = None
    compile_err = max(rel(c, e) for e, c in zip(*grads))
    return graph_diff, compile_err


def _peft_grad(holder, name, which):
    """PEFT's gradient of one expert tensor's A or B, in mol's layout (its views above have no .grad)."""
    wrapper = holder.experts
    while wrapper.parameter_name != name:
        wrapper = wrapper.base_layer
    e = wrapper.num_experts
    if which == "A":
        g = wrapper.lora_A["default"].weight.grad
        return g.reshape(e, -1, g.shape[-1])
    g = wrapper.lora_B["default"].weight.grad
    return g.reshape(g.shape[0], -1, e).permute(2, 0, 1)


def bench_layer(shape, tokens, dev, rounds=3):
    from triton.testing import do_bench

    base = make_experts(shape, dev)
    index, weights = routing(tokens, shape, dev)
    x = (torch.randn(tokens, shape[0], device=dev) * 0.5).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(tokens, shape[0], device=dev, dtype=torch.bfloat16)
    names = ("bare experts", "mol", "PEFT", "mol QLoRA")
    times = {n: [] for n in names}
    peaks, sizes = {}, {}
    for _ in range(rounds):  # interleaved, so that a clock or neighbour drift lands on every row alike
        for name in names:
            holder = base if name == "bare experts" else with_lora(base, name)
            params = [p for p in holder.parameters() if p.requires_grad]

            def step():
                holder(x, index, weights).backward(dy)

            step()
            torch.cuda.synchronize()
            times[name].append(do_bench(step, warmup=100, rep=500, grad_to_none=[x, *params], return_mode="median"))
            x.grad = None
            for p in params:
                p.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - held) / 2**20
            sizes[name] = sum(t.numel() * t.element_size() for t in [*holder.parameters(), *holder.buffers()]) / 2**20
            x.grad = None
            if holder is not base:
                del holder, params
            torch.cuda.empty_cache()
    return [(n, sorted(times[n])[len(times[n]) // 2], min(times[n]), max(times[n]), peaks[n], sizes[n])
            for n in names]


def bench_decode(shape, dev, token_counts=(1, 4)):
    """Forward only, as a decode step calls the experts: T tokens (T * k pairs, fewer than the experts), each row's
    call captured in a CUDA graph and replayed (do_bench median). Rows: bare experts, mol (LoRA on bf16 experts), mol
    QLoRA (NF4 experts: the pairs' slices dequantized), and mol QLoRA dequantizing whole tensors (its path for
    many pairs, forced here) to show what the slices save."""
    from triton.testing import do_bench

    from mol.quant import experts as nf4_experts

    base = make_experts(shape, dev)
    holders = {"bare experts": base, "mol": with_lora(base, "mol").eval(), "mol QLoRA": with_lora(base, "mol QLoRA")}
    holders["mol QLoRA"].eval()
    rows, outputs = [], {}
    for tokens in token_counts:
        index, weights = routing(tokens, shape, dev, seed=tokens)
        x = (torch.randn(tokens, shape[0], device=dev) * 0.5).to(torch.bfloat16)
        for name in (*holders, "mol QLoRA, whole tensors"):
            holder = holders[name.split(",")[0]]
            real = nf4_experts._selected
            if name.endswith("whole tensors"):
                nf4_experts._selected = lambda packed, ids: None
            try:
                with torch.no_grad():
                    outputs[name] = holder(x, index, weights)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        holder(x, index, weights)
                us = do_bench(graph.replay, warmup=50, rep=300, return_mode="median") * 1000
            finally:
                nf4_experts._selected = real
            rows.append((tokens, name, us))
            del graph
        # the two QLoRA paths compute the same function: their difference is the GEMMs' rounding
        rows.append((tokens, "QLoRA paths, |slices - whole| / |whole|",
                     rel(outputs["mol QLoRA"], outputs["mol QLoRA, whole tensors"])))
    return rows


def build_model(tiny, dev):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    if tiny:
        cfg = Qwen3MoeConfig(vocab_size=101, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             num_experts=8, num_experts_per_tok=2)
    else:
        cfg = Qwen3MoeConfig(vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                             num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                             num_experts=64, num_experts_per_tok=8, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    model = AutoModelForCausalLM.from_config(cfg).to(dev, torch.bfloat16)
    with torch.no_grad():  # from_config's init leaves the fused expert tensors as torch.empty left them
        for n, p in model.named_parameters():
            if p.dim() == 3:
                p.normal_(0, 0.02)
    return model.requires_grad_(False)


def bench_model(tiny, dev, batch, seq, steps=10):
    from bench_model import cuda_step_times  # the timing loop bench_model.py uses

    rows = []
    for name in ("no adapter", "PEFT", "mol", "mol QLoRA"):
        model = build_model(tiny, dev)
        if name == "no adapter":
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
                if name == "PEFT":
                    from peft import LoraConfig, get_peft_model

                    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=attn,
                                                             target_parameters=EXPERTS))
                else:
                    model = mol.inject(model, mol.LoRAConfig(rank=16, alpha=32, target_modules=attn,
                                                             target_parameters=EXPERTS,
                                                             quantize_base="nf4" if "QLoRA" in name else None))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad and "lora_B" in n:
                        p.normal_(0, 0.02)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), device=dev, generator=torch.Generator(dev).manual_seed(2))
        model.train()

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        times, peak = cuda_step_times(step, steps)
        trainable = sum(p.numel() for p in params)
        rows.append((name, sorted(times)[len(times) // 2], peak, trainable))
        model = opt = params = step = None  # free them before the next row builds its model
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the tables to this markdown file")
    ap.add_argument("--tiny", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--only", nargs="*", default=["check", "layer", "decode", "model"],
                    choices=["check", "layer", "decode", "model"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py times CUDA kernels: it needs a CUDA GPU")
    dev = "cuda"
    shapes = TINY if args.tiny else SHAPES
    tokens = 64 if args.tiny else args.tokens
    batch, seq = (2, 32) if args.tiny else (args.batch, args.seq)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", ""]
    if "check" in args.only:
        lines += ["check (qwen3 shape, T=2048, bf16 against float64; mol QLoRA against the float64 forward of "
                  "its dequantized NF4 values): relative error", "",
                  "| library | y | dx | dA gate_up | dB gate_up | dA down | dB down | finite |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for lib, errs, finite in check(shapes["qwen3"], 64 if args.tiny else 2048, dev):
            vals = [errs[k] for k in ("y", "dx", "dA gate_up_proj", "dB gate_up_proj", "dA down_proj",
                                      "dB down_proj")]
            lines.append(f"| {lib} | " + " | ".join(f"{v:.2e}" for v in vals) + f" | {finite} |")
        sizes = odd_sizes(shapes["qwen3"], dev)
        lines += ["", "mol at token counts no tile divides (forward, bf16 against float64): "
                  + ", ".join(f"T={t}: {e:.2e}" for t, e in sizes)]
        for lib in ("mol", "mol QLoRA"):
            graph_diff, compile_err = graph_and_compile(shapes["qwen3"], 64 if args.tiny else 2048, dev, lib)
            lines += [f"{lib} forward captured in a CUDA graph, replayed on new tokens and routing: max |replay - "
                      f"eager| = {graph_diff:.3g}; torch.compile(fullgraph=True) fwd+bwd against eager, largest "
                      f"relative difference of y, dx and every dA/dB: {compile_err:.2e}"]
        lines.append("")
    if "layer" in args.only:
        lines += [f"layer: experts forward + backward, T={tokens}, bf16, r=16 on gate_up_proj and down_proj", "",
                  "| shape (hidden, intermediate, experts, top-k) | row | ms, median of 3 rounds (range) | × bare | "
                  "weights + adapter MiB | peak extra MiB |", "| --- | --- | --- | --- | --- | --- |"]
        for key, shape in shapes.items():
            rows = bench_layer(shape, tokens, dev)
            bare = rows[0][1]
            for name, ms, lo, hi, peak, held in rows:
                lines.append(f"| {key} {shape} | {name} | {ms:.3f} ({lo:.3f}-{hi:.3f}) | {ms / bare:.2f}× | "
                             f"{held:.0f} | {peak:.0f} |")
        lines.append("")
    if "decode" in args.only:
        lines += ["decode: experts forward at T = 1 and 4 (fewer pairs than experts), CUDA graph replay, qwen3 shape",
                  "", "| T | row | µs | × bare |", "| --- | --- | --- | --- |"]
        rows = bench_decode(shapes["qwen3"], dev)
        bare = {t: us for t, name, us in rows if name == "bare experts"}
        for tokens, name, us in rows:
            lines.append(f"| {tokens} | {name} | {us:.3g} | |" if name.startswith("QLoRA paths") else
                         f"| {tokens} | {name} | {us:.1f} | {us / bare[tokens]:.2f}× |")
        lines.append("")
    if "model" in args.only:
        lines += [f"model: Qwen3-MoE-shaped, one AdamW step at {batch}x{seq}, bf16, LoRA r=16 on q/k/v/o + experts",
                  "", "| row | step ms | × no adapter | peak GiB | trainable |", "| --- | --- | --- | --- | --- |"]
        rows = bench_model(args.tiny, dev, batch, seq)
        for name, ms, peak, trainable in rows:
            lines.append(f"| {name} | {ms:.1f} | {ms / rows[0][1]:.2f}× | {peak:.2f} | {trainable:,} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
