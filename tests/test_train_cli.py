"""``python -m mol.train`` with a bad override ends with one line naming the fix (no Hydra stack trace)."""

from __future__ import annotations

import pytest
from test_train_utils import REPO, run_cli


@pytest.mark.parametrize("override, must_mention", [
    (["method=nosuchmethod"], ["method", "nosuchmethod", "mol", "lora"]),
    (["router.top_k=0"], ["top_k", "between 1 and"]),
    (["model.path=/definitely/not/here"], ["model.path", "/definitely/not/here"]),
    (["model=hf_causal"], ["model.path"]),                                   # mandatory value left unset
    (["trainer.no_such_key=3"], ["no_such_key"]),
])
def test_bad_override_is_one_line(override, must_mention, tmp_path):
    p = run_cli([*override, f"output_dir={tmp_path / 'out'}"], cwd=REPO, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    for word in must_mention:
        assert word in err[0], (word, err[0])
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained, nothing half-written
