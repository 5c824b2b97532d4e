"""Check mol.from_bnb_4bit on a CUDA GPU: a bitsandbytes-format NF4 checkpoint loaded onto the GPU computes what
the model it was saved from computes, in eager forward, generate() (the decode kernels at T = 1) and a QLoRA step.

    python benchmarks/gpu_check_bnb_load.py

A Llama of hidden 1024 and 4 layers (random weights, no download) in bf16 is put in NF4 by mol.quantize, written
by mol.save_bnb_4bit, and read back by from_bnb_4bit(device="cuda"). Exits 1 unless: the logits of a 2 x 96
batch are bit-identical to the saved model's, greedy generate() of 24 tokens gives the same tokens, the loaded
model's peak GPU memory while loading stays below the NF4 model's size plus its full-precision tensors plus a
margin (no layer is dequantized whole on the way), and one LoRA step on the loaded model gives the saved model's
loss and LoRA gradients to the bit.
"""
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        sys.exit("gpu_check_bnb_load.py checks from_bnb_4bit on a CUDA GPU and none is visible here")
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False)
    # built in bf16 as from_pretrained(dtype=torch.bfloat16) builds it: the rotary inv_freq stays float32 (a
    # model.to(torch.bfloat16) would round it, and the loaded model, which computes it as transformers does, then
    # differs from the saved one by that rounding)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    mol.quantize(model, "nf4")
    model = model.cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 96), device="cuda")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        mol.save_bnb_4bit(model, tmp)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loaded = mol.from_bnb_4bit(tmp, device="cuda")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    size = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()])
    largest_dense = max(m.out_features * m.in_features * 2 for m in loaded.modules()
                        if isinstance(m, mol.NF4Linear))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: loaded model {size / 2**20:.1f} MiB, peak "
          f"while loading {peak / 2**20:.1f} MiB (one NF4 layer dense in bf16: {largest_dense / 2**20:.1f} MiB)")
    if peak > size + largest_dense:
        print("FAIL: loading held more than the model and one dense layer")
        ok = False
    with torch.no_grad():
        same = torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        prompt = {"input_ids": ids[:, :16], "attention_mask": torch.ones_like(ids[:, :16])}
        gen_a = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
        gen_b = loaded.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    print(f"logits bit-identical: {same}; greedy generate() tokens identical: {torch.equal(gen_a, gen_b)}")
    ok &= same and torch.equal(gen_a, gen_b)

    losses, grads = [], []
    for m in (model, loaded):
        torch.manual_seed(1)
        qlora = mol.inject(copy.deepcopy(m), mol.LoRAConfig(rank=16, alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for n, p in qlora.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator(device="cuda").manual_seed(len(n)))
        qlora.train()
        loss = qlora(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for n, p in sorted(qlora.named_parameters()) if p.requires_grad])
    step_same = torch.equal(losses[0], losses[1]) and all(torch.equal(a, b) for a, b in zip(*grads))
    print(f"QLoRA step: loss {losses[0].item():.6f} / {losses[1].item():.6f}, loss and {len(grads[0])} LoRA "
          f"gradients bit-identical: {step_same}")
    ok &= step_same
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
