"""Generation benchmark: eager greedy decoding with Hugging Face generate() on a Llama-shaped model, bf16.

    python benchmarks/bench_generate.py [--out results.md] [--tiny] [--batch B ...] [--prompt P] [--new N]

The model of bench_model.py (hidden 2048, 8 layers, random weights, no download), adapters on every attention
and MLP linear. Rows: no adapter, PEFT LoRA r=16, MoL E=8 top-2 r=16 (Triton backend), and MoL with
``graph_inference_tokens`` = the batch size (each decode step's layer calls replay captured forward graphs). Each
library's default adapter dtype (float32 adapters on the bf16 model). Eager generation is bound by the host on
small models: every layer call is Python and launches against a few µs of GPU work, which is what the graphed
row cuts. Time per decode step: the median over --rounds of (generate N new tokens - generate 1) / (N - 1), so
the prompt's forward cancels. The last column: the graphed row's greedy tokens against the eager MoL
row's, as a fraction of the new tokens, beside the eager row run twice (the kernels are the same; the small-T
forward's split-K atomics may round a logit differently from run to run, and on random weights a near-tie then
flips a greedy token, after which the sequences part).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_model import add_adapters, build, emit  # noqa: E402

ROWS = ["no adapter", "PEFT LoRA r=16", "MoL E=8 top-2 r=16", "MoL E=8 top-2 r=16, graph_inference_tokens"]


def with_adapters(model, name: str, batch: int):
    if name.startswith("PEFT"):
        model = add_adapters(model, name)
    elif name.startswith("MoL"):
        model = add_adapters(model, name, graph_inference_tokens=batch if "graph_inference_tokens" in name else 0)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="smoke test on CPU with a tiny model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence (default 64; --tiny: 8)")
    ap.add_argument("--new", type=int, default=None, help="tokens generated per sequence (default 64; --tiny: 4)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_generate.py needs a CUDA GPU and none is visible here; --tiny runs a smoke test on the CPU")
    args.prompt = args.prompt or (8 if args.tiny else 64)
    args.new = args.new or (4 if args.tiny else 64)
    if args.new < 2:
        raise SystemExit(f"--new {args.new}: at least 2 (the time per step is (N new - 1 new) / (N - 1))")
    dev = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    shape = "tiny Llama (hidden 64, 2 layers), float32, a smoke test" if args.tiny else "bf16; Llama hidden 2048, 8 layers"
    lines = [f"GPU: {gpu}; torch {torch.__version__}; {shape}; prompt {args.prompt} tokens, {args.new} new, greedy, "
             "eager generate()", "",
             "| batch | variant | ms per decode step (median) | × no adapter | × PEFT | new tokens equal to eager MoL's "
             "first run |",
             "| --- | --- | --- | --- | --- | --- |"]

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for batch in args.batch:
        g = torch.Generator(device=dev).manual_seed(1)
        ids = torch.randint(0, 101 if args.tiny else 32000, (batch, args.prompt), device=dev, generator=g)
        res, tokens = {}, {}
        for name in ROWS:
            model = with_adapters(build(args.tiny, dev, dtype), name, batch)

            def generate(n):
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)
            with torch.no_grad():
                tokens[name] = generate(args.new)  # warm-up: Triton compiles, autotunes, graphs captured
                if name == "MoL E=8 top-2 r=16":  # the same model again: how far run-to-run rounding moves greedy tokens
                    tokens["again"] = generate(args.new)
                steps = []
                for _ in range(args.rounds):
                    sync()
                    t0 = time.perf_counter()
                    generate(1)
                    sync()
                    t1 = time.perf_counter()
                    generate(args.new)
                    sync()
                    t2 = time.perf_counter()
                    steps.append(((t2 - t1) - (t1 - t0)) / (args.new - 1) * 1e3)
            res[name] = statistics.median(steps)
            print(batch, name, f"{res[name]:.2f} ms", flush=True)
            del model
            if dev == "cuda":
                torch.cuda.empty_cache()
        for name in ROWS:
            same = ""
            if name.startswith("MoL"):  # the eager row: its second run; the graphed row: its own
                ours = tokens["again" if name == "MoL E=8 top-2 r=16" else name][:, args.prompt:]
                same = f"{(ours == tokens['MoL E=8 top-2 r=16'][:, args.prompt:]).float().mean().item():.0%}"
            shown = name.replace("graph_inference_tokens", f"graph_inference_tokens={batch}")
            lines.append(f"| {batch} | {shown} | {res[name]:.2f} | {res[name] / res['no adapter']:.2f}× | "
                         f"{res[name] / res['PEFT LoRA r=16']:.2f}× | {same} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
