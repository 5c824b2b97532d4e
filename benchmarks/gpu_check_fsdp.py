"""``python -m mol.train trainer=fsdp`` on one GPU: the FSDP code paths that the CPU tests (tests/test_train_fsdp.py,
2 gloo processes) cannot reach: NCCL, Lightning's bf16-mixed FSDP precision, and the Triton kernels on FSDP's
parameters.

    python benchmarks/gpu_check_fsdp.py [--devices N] [--methods mol lora qlora-mol qlora qlora-mol-bf16
                                                  qlora-mol-bf16-true prefix prompt]

A tiny Llama and JSONL task built locally (tests/test_train_utils.py's helpers; needs hydra-core and pytest), MoL
E=4 top-2 and LoRA on q/v/up, on the float32 model and on its NF4 quantization (QLoRA: the codes FSDP parameters),
bf16-mixed. For each method: trainer=gpu, and trainer=fsdp (decoder layers as units) run to 4 steps, then FSDP
stopped at 2 and resumed to 4. Checks: FSDP's step losses within 2e-2 (bf16) of the
one-GPU run's, the resumed run's within 1e-3 of the uninterrupted FSDP run's, each adapter of whole tensors with
the one-GPU run's names. One GPU is one FSDP process, which FSDP runs unsharded (NO_SHARD); with ``--devices 2`` (a
machine with 2 GPUs) the FULL_SHARD run against the one-GPU run. Exits 1 on a failure.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the QLoRA methods: each NF4 weight's codes are a parameter FSDP holds (in float32 here, the model's dtype)
METHODS = {"mol": "method=mol method.num_experts=4", "lora": "method=lora",
           "qlora-mol": "method=qlora-mol method.num_experts=4", "qlora": "method=qlora",
           # a bf16 model: FSDP flattens in bf16 (adapters, routers and codes too; trainer=gpu keeps float32 adapters)
           "qlora-mol-bf16": "method=qlora-mol method.num_experts=4 model.dtype=bfloat16",
           # bf16-true: Lightning casts the model to bf16 (codes stored in bf16 first); FSDP leaves buffers alone
           "qlora-mol-bf16-true": "method=qlora-mol method.num_experts=4 trainer.precision=bf16-true",
           # the virtual tokens in FSDP units of their own, called from the model's hooks
           "prefix": "method=prefix", "prompt": "method=prompt"}
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()
    import torch  # only to look for a GPU: the runs are subprocesses
    if not torch.cuda.is_available():
        sys.exit("gpu_check_fsdp.py needs a CUDA GPU and none is visible here; tests/fsdp_cpu.py runs FSDP on the CPU")
    from safetensors.torch import load_file
    from test_train_utils import cli_env, make_causal_data, make_tiny_llama, quiet_trainer_overrides

    tmp = Path(tempfile.mkdtemp(prefix="mol-fsdp-"))
    llama, data = make_tiny_llama(tmp / "llama"), make_causal_data(tmp / "data")
    print(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}; torch {torch.__version__}")

    def train(out, *extra):
        cmd = [sys.executable, "-m", "mol.train", "model=hf_causal", f"model.path={llama}", "data=jsonl",
               f"data.train={data['train']}", f"data.val={data['val']}", "data.max_length=32",
               f"data.cache_dir={tmp / 'cache'}", "trainer.max_epochs=-1", "optim.lr=1e-2", "optim.warmup_ratio=0",
               "optim.min_lr_ratio=1.0", "trainer.ckpt_every_n_steps=1", "model.target_modules=[q_proj,v_proj,up_proj]",
               f"output_dir={out}", *quiet_trainer_overrides(), *extra]
        p = subprocess.run(cmd, cwd=str(ROOT), env=cli_env(), capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-6000:])
            raise SystemExit(f"FAIL: {' '.join(extra)} exited {p.returncode}")
        return [json.loads(line)["loss"] for line in (out / "train_loss.jsonl").read_text().splitlines()]

    failed = False
    print("| method | one GPU losses | FSDP losses | worst diff | resumed worst diff | adapter whole, same names | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    batch = 8
    for tag in args.methods:
        m = METHODS[tag].split()
        fsdp = ["trainer=fsdp", f"trainer.devices={args.devices}", f"data.batch_size={batch // args.devices}"]
        one = train(tmp / f"{tag}_one", *m, "trainer=gpu", f"data.batch_size={batch}", "trainer.max_steps=4")
        full = train(tmp / f"{tag}_fsdp", *m, *fsdp, "trainer.max_steps=4")
        train(tmp / f"{tag}_resumed", *m, *fsdp, "trainer.max_steps=2")
        resumed = train(tmp / f"{tag}_resumed", *m, *fsdp, "trainer.max_steps=4", "resume=auto")
        a = load_file(str(tmp / f"{tag}_one" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp / f"{tag}_fsdp" / "adapter" / "adapter_model.safetensors"))
        whole = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        worst = max(abs(x - y) for x, y in zip(one, full)) if len(one) == len(full) == 4 else float("inf")
        worst_r = max(abs(x - y) for x, y in zip(full, resumed)) if len(resumed) == 4 else float("inf")
        ok = whole and worst <= 2e-2 * max(one) and worst_r <= 1e-3 * max(full)
        failed |= not ok
        print(f"| {tag} | {[round(x, 4) for x in one]} | {[round(x, 4) for x in full]} | {worst:.2e} | {worst_r:.2e} "
              f"| {whole} | {'yes' if ok else 'NO'} |", flush=True)
    print("FAIL" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
