"""Our Triton kernels ship inside the package (mol.kernels): a top-level ``kernels`` module would shadow
Hugging Face's ``kernels`` package, which transformers probes for with ``import kernels``."""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_distribution_installs_no_top_level_kernels():
    dist = importlib.metadata.distribution("mol-lora")
    files = [str(f) for f in (dist.files or [])]
    assert not any(f.startswith("kernels/") or f == "kernels.py" for f in files), files


def test_import_kernels_does_not_find_ours_from_repo_root_or_elsewhere(tmp_path):
    for cwd in (ROOT, tmp_path):
        code = ("import importlib.util, mol; s = importlib.util.find_spec('kernels'); "
                "print(s.origin if s else None, list(s.submodule_search_locations or []) if s else [])")
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout
        assert str(ROOT) not in out, f"`import kernels` resolves into our repo from {cwd}: {out}"
    assert importlib.util.find_spec("mol.kernels") is not None


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.6", True), ("3.3.1", "2.3.0", True), ("3.6.0", "2.2.6", False), ("3.7.0", "2.4.6", False),
    ("3.10.0+git1a2b", "2.4.6", False), ("3.9.0", "2.10.1", False)])
def test_interpreter_numpy_rule(triton_version, numpy_version, refused):
    """The suite stops at once, naming the fix, where Triton's interpreter cannot run with this numpy (conftest);
    versions compare as numbers ("3.10" is after "3.7")."""
    from conftest import interpreter_numpy_problem

    problem = interpreter_numpy_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert "numpy < 2.3" in problem and triton_version in problem and numpy_version in problem
