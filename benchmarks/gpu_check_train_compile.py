"""`python -m mol.train trainer.compile=true` on a GPU, under Lightning's loop: eager, inductor's default mode and
reduce-overhead (CUDA graphs) train the same.

    python benchmarks/gpu_check_train_compile.py [--cpu]

A tiny Llama and JSONL task built locally (tests/test_train_utils.py's helpers; needs hydra-core and pytest), MoL
E=4 top-2 on q/v, float32 throughout (so the three runs may differ only by the compiled kernels' rounding), one
epoch of 4 steps plus validation, each run in process through the real Hydra config. Checks: every mode ran its
steps, its per-step losses (task + router) are within 1e-3 of eager's, its validation loss too, and it saved an
adapter with eager's tensor names. Under reduce-overhead the routing tensors a layer keeps after a step are a CUDA
graph's outputs, which the next replay overwrites; a callback that read them late would fail here. ``--cpu``: eager
against aot_eager on the CPU (the kernels interpreted), as tests/test_train_methods.py does. Exits 1 on a failure.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()
    import torch  # only to look for a GPU: the runs are subprocesses
    if not torch.cuda.is_available():
        sys.exit("gpu_check_train_compile.py needs a CUDA GPU and none is visible here")
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from safetensors.torch import load_file
    from test_train_utils import compose, make_causal_data, make_tiny_llama, quiet_trainer_overrides

    import mol.train.callbacks as callbacks
    from mol.io import WEIGHTS_NAME
    from mol.train.app import run

    if importlib.util.find_spec("matplotlib") is None:  # a GPU image without it: not what this checks
        callbacks.save_heatmap = lambda *args, **kwargs: None
        print("matplotlib is not installed: the routing heatmaps are skipped")

    tmp = Path(tempfile.mkdtemp(prefix="mol-train-compile-"))
    llama, data = make_tiny_llama(tmp / "llama"), make_causal_data(tmp / "data")
    modes = {"eager": []}
    if args.cpu:
        modes["aot_eager"] = ["trainer.compile=true", "trainer.compile_options.backend=aot_eager"]
    else:
        modes["reduce-overhead"] = ["trainer.compile=true", "trainer.compile_options.mode=reduce-overhead"]
        modes["inductor"] = ["trainer.compile=true"]
    print(f"{'cpu' if args.cpu else torch.cuda.get_device_name()}; torch {torch.__version__}")
    failed, eager = False, None
    print("| mode | steps | worst step-loss difference from eager | validation loss | adapter names as eager's | ok |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, extra in modes.items():  # eager first: the others are compared with it as each finishes
        torch._dynamo.reset()
        out = tmp / f"run_{mode}"
        cfg = compose(["method=mol", "router=topk", "method.num_experts=4", "model=hf_causal", f"model.path={llama}",
                       "data=jsonl", f"data.train={data['train']}", f"data.val={data['val']}", "data.batch_size=8",
                       "data.max_length=32", f"data.cache_dir={tmp / 'cache'}", "trainer.max_epochs=1",
                       "optim.lr=1e-2", "model.target_modules=[q_proj,v_proj]",
                       f"trainer={'cpu' if args.cpu else 'gpu'}", "trainer.precision=32-true",
                       f"output_dir={out}", *extra, *quiet_trainer_overrides()])
        val = run(cfg)["run"]["val/loss"]
        losses = callbacks.read_loss_history(str(out / "train_loss.jsonl"))
        adapter = load_file(str(out / "adapter" / WEIGHTS_NAME))
        if eager is None:
            eager = (losses, adapter, val)
        worst = (max(abs(losses[s] - eager[0][s]) for s in eager[0]) if losses.keys() == eager[0].keys()
                 else float("inf"))
        same_names = sorted(adapter) == sorted(eager[1])
        scale = max(1.0, max(abs(v) for v in eager[0].values()))
        ok = len(losses) >= 4 and worst <= 1e-3 * scale and abs(val - eager[2]) <= 1e-3 * scale and same_names
        failed |= not ok
        print(f"| {mode} | {len(losses)} | {worst:.2e} | {val:.5f} | {same_names} | {'yes' if ok else 'NO'} |",
              flush=True)
    print("FAIL" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
