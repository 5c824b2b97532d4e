"""mol.train's fused AdamW on a GPU: MoLModule under Lightning, bf16-mixed, gradient clipping on.

    python benchmarks/gpu_check_fused_adamw.py [--device cuda|cpu] [--steps 12]

The setting mol.train's GPU trainer runs (trainer=gpu: bf16-mixed, gradient_clip_val 1.0; here a clip value that
binds). Lightning alone raises there for a fused optimizer; MoLModule clips it itself. Checks: optim.fused=auto
builds AdamW(fused=True) on CUDA; every step's clipped gradient norm is at most the clip value; the losses follow
the foreach run's (optim.fused=false) and go down; one step from the same start moves the adapters as foreach's
step does, to 1e-3 of the update. Prints PASS/FAIL lines and exits 1 on any failure. No Hydra needed: the module is
built directly (mol.train's package still imports omegaconf; on an image without it, put it on PYTHONPATH).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lightning.pytorch as pl  # noqa: E402

import mol  # noqa: E402
from mol.train.module import MoLModule  # noqa: E402


def batches(n: int, dev_batch: int, seq: int, vocab: int):
    # one batch, n times: memorising it makes the loss fall within a few steps
    ids = torch.randint(0, vocab, (dev_batch, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "num_tokens": ids.numel()} for _ in range(n)]


def train(fused, device: str, steps: int, clip: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    mol.inject(model, mol.MoLConfig(rank=16, alpha=32, num_experts=8, top_k=2,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    module = MoLModule(model, task="causal_lm", lr=3e-3, warmup_ratio=0.0, min_lr_ratio=1.0, fused=fused)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    norms, losses = [], []
    clip_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        params = list(params)
        before = clip_norm(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        norms.append((float(before), float(after)))
        return before

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                             precision="bf16-mixed", gradient_clip_val=clip, max_steps=steps, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[Losses()])
        loader = torch.utils.data.DataLoader(batches(steps, 4, 64, cfg.vocab_size), batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip_norm
    opt = trainer.optimizers[0]
    moved = {n: (p.detach().cpu().float(), start[n].cpu().float()) for n, p in model.named_parameters()
             if p.requires_grad}
    return opt.defaults["fused"], losses, norms, moved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--clip", type=float, default=0.05)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_fused_adamw.py needs a CUDA GPU and none is visible here")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; lightning {pl.__version__}")
    auto_setting = "auto" if args.device == "cuda" else True
    auto, auto_losses, auto_norms, _ = train(auto_setting, args.device, args.steps, args.clip)
    plain, plain_losses, _, _ = train(False, args.device, args.steps, args.clip)
    # one step from the same start: the two optimizers' updates, compared with the update's own size (over many
    # steps the bf16 forward's routing amplifies last-bit differences, so the trajectories are only compared loosely)
    _, _, _, one_fused = train(auto_setting, args.device, 1, args.clip)
    _, _, _, one_plain = train(False, args.device, 1, args.clip)
    failures = 0

    def check(ok, what):
        nonlocal failures
        failures += not ok
        print(("PASS " if ok else "FAIL ") + what, flush=True)

    check(auto is True and plain is None, f"AdamW fused flag: auto -> {auto}, false -> {plain}")
    gap = max(float((one_fused[n][0] - one_plain[n][0]).abs().max()) for n in one_fused)
    size = max(float((one_plain[n][0] - one_plain[n][1]).abs().max()) for n in one_plain)
    check(size > 0 and gap < 1e-3 * size, f"one step: fused and foreach updates differ by {gap:.2e}, "
          f"the update is {size:.2e} (bound 1e-3 of it)")
    check(len(auto_norms) == args.steps and all(b > args.clip and a <= args.clip * (1 + 1e-3)
                                                for b, a in auto_norms),
          f"clipped each step to {args.clip}: norms before/after {[(round(b, 3), round(a, 4)) for b, a in auto_norms]}")
    diffs = [abs(a - b) / abs(b) for a, b in zip(auto_losses, plain_losses)]
    check(len(auto_losses) == len(plain_losses) == args.steps and diffs[0] == 0 and max(diffs) < 5e-2,
          f"fused losses follow foreach's (first step equal, every step within 5e-2): relative differences "
          f"{' '.join(f'{d:.1e}' for d in diffs)}")
    check(auto_losses[-1] < auto_losses[0], f"loss went down: {auto_losses[0]:.4f} -> {auto_losses[-1]:.4f}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
