"""The CPU-runnable benchmark scripts still run against the current code (their stubs follow the kernels'
launcher signatures, so a change there must change them too)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [[], ["--graph"]])
def test_host_overhead_runs_and_prints_its_table(flags):
    env = dict(os.environ, MOL_HOST_OVERHEAD_CALLS="5")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), *flags], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = out.stdout.strip().splitlines()[-1].split("|")
    times = [float(v) for v in row[2:5]]
    assert all(t > 0 for t in times), out.stdout
    if not flags:  # eager: a forward plus backward launches ~3x the no-grad forward's kernels (420 vs 120 µs here)
        assert times[1] > times[2], out.stdout
    # --graph: both are one faked replay plus glue, within a few µs of each other (CI saw 115.1 vs 115.2), so
    # only the script's own checks (one captured training signature, the decode call captured) apply


def test_bench_generate_tiny_runs_and_prints_its_table():
    pytest.importorskip("peft")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # three rounds, a median: one round's difference (N new tokens - 1 new) went below 0 on a busy CPU
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--tiny", "--batch", "2",
                          "--rounds", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r.split("|") for r in out.stdout.splitlines() if r.startswith("| 2 |")]
    assert len(rows) == 4 and all(float(r[3]) > 0 for r in rows), out.stdout
    assert rows[-1][2].strip().endswith("graph_inference_tokens=2") and rows[-1][6].strip() == "100%"


# each GPU script's main run in one child process (imports shared), as `python SCRIPT` would
_NO_GPU_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
out = {}
for path in sys.argv[1:]:
    sys.argv = [path]
    sys.path[0] = os.path.dirname(path)  # as `python SCRIPT` puts its folder first (bench_layer imports bench_model)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(path, run_name="__main__")
        out[path] = ("returned", "")
    except SystemExit as e:
        out[path] = ("exit", str(e.code))
    except BaseException as e:
        out[path] = ("raised", "".join(traceback.format_exception_only(e)).strip())
print("RESULT" + json.dumps(out))
"""


def test_gpu_scripts_say_they_need_cuda_instead_of_a_traceback():
    """Every bench_*.py and gpu_check_*.py (and profile_layer.py) on a machine without a GPU stops at once with one
    line saying it needs a CUDA GPU, never a traceback from inside torch (gpu_check_kernels.py, _routed.py,
    _compile.py and five more raised one: 'Cannot get CUDA generator', 'Torch not compiled with CUDA')."""
    bench = ROOT / "benchmarks"
    scripts = sorted(map(str, [*bench.glob("bench_*.py"), *bench.glob("gpu_check_*.py"), bench / "profile_layer.py"]))
    assert len(scripts) >= 17
    # no GPU visible to the child even where there is one: the check is of what a CPU-only machine prints
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _NO_GPU_DRIVER, *scripts], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.split("RESULT", 1)[1])
    bad = {Path(p).name: r for p, r in results.items() if r[0] != "exit" or "CUDA GPU" not in r[1] or "\n" in r[1]}
    assert not bad, f"scripts that do not stop with a one-line 'needs a CUDA GPU' message: {bad}"


def test_host_overhead_refuses_a_path_that_is_not_a_checkout():
    # the child imported whatever mol was installed and printed a row labelled with the wrong path
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "/nonexistent/checkout"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "is not a mol checkout" in out.stderr, out.stderr[-2000:]


def test_bench_moe_check_holds_mol_and_peft_to_its_float64_reference_on_a_cpu():
    """bench_moe.py's correctness table runs on the CPU at its tiny shapes: both libraries' bf16 output and
    gradients (and mol's on NF4 experts, against the reference on their dequantized values) within bf16's error of
    the script's own float64 loop over the experts (a wrong reference, or a library's adapter read in the wrong
    layout, gives errors near 1), and mol's at token counts no tile divides."""
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_moe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = bench_moe.check(bench_moe.TINY["qwen3"], 64, "cpu")
    assert [lib for lib, _, _ in rows] == ["mol", "PEFT", "mol QLoRA"]
    for lib, errs, finite in rows:
        assert finite and len(errs) == 6 and all(0 < e < 2e-2 for e in errs.values()), (lib, errs)
    assert all(0 < e < 2e-2 for _, e in bench_moe.odd_sizes(bench_moe.TINY["qwen3"], "cpu"))
