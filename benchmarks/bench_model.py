"""Model benchmark: one AdamW step of a Llama-shaped model (random weights, no download), bf16.

    python benchmarks/bench_model.py [--out results.md] [--tiny] [--batch B --seq S] [--only NAME ...]

hidden 2048, 8 layers, batch x seq = 8 x 1024; adapters on every attention and MLP linear
(q, k, v, o, gate, up, down). Rows: no adapter (frozen model, backward to the embeddings,
no optimizer: the floor every adapter pays), PEFT LoRA r=16, MoL E=8 top-2 r=16 (Triton
backend, and the PyTorch reference backend for comparison), and PEFT and MoL again with the backward run on
the calling thread (torch.autograd.set_multithreading_enabled(False)), and PEFT and MoL with the whole step
captured in a CUDA graph and replayed (the GPU's work alone: on hosts as slow as the H200 machines the eager step is
host-bound). With --only, also PEFT and MoL under torch.compile(model) (default mode, and "reduce-overhead": the
compiled graphs replayed as CUDA graphs), and MoL with per-layer
CUDA graphs (MoLConfig.graph_tokens: the step eager, each layer replaying its captured forward and backward), and
PEFT and MoL with AdamW(fused=True) ("fused AdamW", mol.train's default on CUDA; the other rows take torch's
foreach AdamW), and PEFT and MoL with their adapters in bf16 ("bf16 adapters"; the other rows take each library's default, float32
adapters on the bf16 model, since mol's adapter_dtype="auto" follows PEFT's autocast_adapter_dtype; runs 28 and
earlier measured MoL with bf16 adapters against PEFT's float32 ones). Median step time over
timed steps after warm-up (CUDA events), and peak allocated memory over the timed steps.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
import mol.kernels.routed_lora as rl  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cuda_step_times(step, steps: int) -> tuple[list[float], float]:
    """``steps`` calls of ``step`` (warmed up already), each timed with CUDA events (ms), and the peak GiB they
    allocate. Shared by bench_model and bench_moe."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times, torch.cuda.max_memory_allocated() / 2**30


def build(tiny: bool, dev: str, dtype, layers: int = 8):
    """The benchmark's Llama (``layers`` deep; the tiny one has 2), random weights, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if tiny:
        cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=dtype)
    model.requires_grad_(False)
    return model


def add_adapters(model, name: str, **mol_options):
    """PEFT LoRA r=16 (a name starting "PEFT") or MoL E=8 top-2 r=16 (mol_options: more MoLConfig fields) on every
    TARGETS linear, lora_B given values (never time on zeros). Each library's default adapter dtype, float32 on the
    bf16 model (PEFT's autocast_adapter_dtype, mol's adapter_dtype "auto"); names with "bf16 adapters" keep the
    model's dtype. Shared by bench_model and bench_generate."""
    if name.startswith("PEFT"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
                               autocast_adapter_dtype="bf16 adapters" not in name)
    else:
        model = mol.inject(model, mol.MoLConfig(rank=16, alpha=32, num_experts=8, top_k=2, target_modules=TARGETS,
                                               adapter_dtype="base" if "bf16 adapters" in name else "auto",
                                               **mol_options))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def variant(name, model, tokens=0):
    if name == "no adapter":
        # nothing trainable: let the backward run through every layer to the embeddings anyway
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
        return model, []
    mol_options = {}
    if not name.startswith("PEFT"):
        # graph_tokens: every layer call of the step replays its graphs
        mol_options = dict(backend="torch" if "reference" in name else "triton",
                           graph_tokens=tokens if "layer graphs" in name else 0)
    model = add_adapters(model, name, **mol_options)
    params = [p for p in model.parameters() if p.requires_grad]
    if "torch.compile" in name:  # the model's forward and backward compiled (default mode), AdamW eager
        # reduce-overhead: also replayed as CUDA graphs (torch's cudagraph trees), what trainer.compile_options.mode
        # gives mol.train
        model = torch.compile(model, mode="reduce-overhead" if "reduce-overhead" in name else None)
    return model, params


def graphed_step_fn(model, params, ids, name):
    """The whole step (forward, backward, AdamW) captured in one CUDA graph and replayed: the GPU's work without
    the host's (on these machines the eager step is host-bound and its time moves with the host, RESULTS run 18).
    Warm-up and capture follow torch.cuda.graphs' whole-network recipe (side stream, capturable AdamW, grads set
    to None before capture so the captured backward writes them fresh each replay)."""
    opt = torch.optim.AdamW(params, lr=1e-4, capturable=True)
    routed = name.startswith("MoL")

    def eager():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        (loss + mol.aux_loss(model) if routed else loss).backward()
        opt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            eager()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    if routed:
        mol.clear_routing(model)  # the warm-up's routing tensors must not be freed inside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    return graph.replay


def step_fn(model, params, ids, name):
    if "CUDA graph" in name:
        return graphed_step_fn(model, params, ids, name)
    # "fused AdamW": one kernel for the whole update, mol.train's default on CUDA (optim.fused=auto); the other
    # rows keep torch's default (foreach), as a plain training loop gets it
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if "fused AdamW" in name else None) if params else None
    shrink = "triton" if "Triton shrink" in name else rl.SHRINK

    def step():
        rl.SHRINK, before = shrink, rl.SHRINK  # read at each forward call: this variant's setting for its step
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if name.startswith("MoL"):
            loss = loss + mol.aux_loss(model)
        # "threads off": the backward on the calling thread instead of autograd's device thread (RESULTS run 9:
        # 12-46% less host time per layer on the GPU machines; does the step get faster?)
        with torch.autograd.set_multithreading_enabled("threads off" not in name):
            loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        rl.SHRINK = before
    return step


def emit(lines: list[str], out: str | None) -> None:
    """Print the table and, with --out, write it whole: to a temporary file first, so an interrupted run leaves
    no half-written table behind."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(out + ".tmp", out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="smoke test on CPU with a tiny model")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --tiny: 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; --tiny: 16)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="run only these variants, in this order (exact names of the table's rows)")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_model.py needs a CUDA GPU and none is visible here; --tiny runs a smoke test on the CPU")
    dev = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    batch, seq = (2, 16) if args.tiny else (8, 1024)
    batch, seq = args.batch or batch, args.seq or seq
    names = ["no adapter", "PEFT LoRA r=16", "MoL E=8 top-2 r=16 (triton)", "MoL E=8 top-2 r=16 (torch reference)",
             "PEFT LoRA r=16, autograd threads off", "MoL E=8 top-2 r=16 (triton), autograd threads off",
             "PEFT LoRA r=16, CUDA graph", "MoL E=8 top-2 r=16 (triton), CUDA graph"]
    # not in the default table, for --only comparisons: the MoL row with the large-T shrink + router as the Triton
    # kernel instead of one GEMM (routed_lora.SHRINK), and the PEFT and MoL rows under torch.compile(model)
    # (default mode; minutes of compiling each)
    # and MoL with per-layer CUDA graphs (MoLConfig.graph_tokens = batch x seq: every layer call replays its own
    # captured forward and backward; the step stays eager), for small steps where the eager step is host-bound
    extra = ["MoL E=8 top-2 r=16 (triton, Triton shrink)", "PEFT LoRA r=16, torch.compile",
             "MoL E=8 top-2 r=16 (triton), torch.compile", "MoL E=8 top-2 r=16 (triton), layer graphs",
             "PEFT LoRA r=16, torch.compile reduce-overhead",
             "MoL E=8 top-2 r=16 (triton), torch.compile reduce-overhead",
             "MoL E=8 top-2 r=16 (triton), layer graphs, autograd threads off",
             "PEFT LoRA r=16, bf16 adapters", "MoL E=8 top-2 r=16 (triton), bf16 adapters",
             "PEFT LoRA r=16, fused AdamW", "MoL E=8 top-2 r=16 (triton), fused AdamW",
             "PEFT LoRA r=16, autograd threads off, fused AdamW",
             "MoL E=8 top-2 r=16 (triton), autograd threads off, fused AdamW"]
    if args.only:
        unknown = [n for n in args.only if n not in names + extra]
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {unknown}; the variants are {names + extra}")
        names = list(args.only)
    if args.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        names = [n for n in names if "triton" not in n]
    if dev != "cuda":
        names = [n for n in names if "CUDA graph" not in n]
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    shape = ("tiny Llama (hidden 64, 2 layers), float32, a smoke test" if args.tiny
             else "bf16; Llama hidden 2048, 8 layers")
    lines = [f"GPU: {gpu}; torch {torch.__version__}; {shape}, batch x seq = {batch} x {seq}",
             "", "| variant | trainable params | step ms (median) | × PEFT | peak memory GiB | × PEFT |",
             "| --- | --- | --- | --- | --- | --- |"]
    res = []  # (name, result or None) in run order: --only may repeat a name (interleaved comparisons)
    for name in names:
        try:
            model = build(args.tiny, dev, dtype)
            model, params = variant(name, model, batch * seq)
            g = torch.Generator(device=dev).manual_seed(1)
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev, generator=g)
            step = step_fn(model, params, ids, name)
            for _ in range(3):
                step()
            times = []
            if dev == "cuda":
                times, peak = cuda_step_times(step, args.steps)
            else:
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
                peak = float("nan")
            times.sort()
            res.append((name, (sum(p.numel() for p in params), times[len(times) // 2], peak)))
            print(name, res[-1][1], flush=True)
        except Exception as ex:  # keep the other rows; report the failure in the table
            print(f"{name}: FAILED {type(ex).__name__}: {ex}", flush=True)
            res.append((name, None))
        finally:
            model = params = step = None
            if dev == "cuda":
                torch.cuda.empty_cache()
    ref = next((r for n, r in res if n == "PEFT LoRA r=16" and r is not None), None)
    for name, r in res:
        if r is None:
            lines.append(f"| {name} | failed | | | | |")
            continue
        n, t, m = r
        rt = f"{t / ref[1]:.2f}×" if ref else ""
        if "CUDA graph" in name:  # the graph's tensors live in its private pool, which max_memory_allocated omits
            lines.append(f"| {name} | {n / 1e6:.2f} M | {t:.1f} | {rt} | - (graph pool) | |")
            continue
        rm = f"{m / ref[2]:.2f}×" if ref else ""
        lines.append(f"| {name} | {n / 1e6:.2f} M | {t:.1f} | {rt} | {m:.2f} | {rm} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
