"""optim.fused: when mol.train builds AdamW(fused=True), and that a fused run clips and trains as the foreach one.

Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside step() (a fused AdamW) even
under bf16-mixed, where there is no GradScaler; MoLModule clips such an optimizer itself. The runs here are on the
CPU, where torch's fused AdamW runs too, so the clipping path is the one a CUDA run takes.
"""

from __future__ import annotations

import pytest
import torch
from test_train_utils import compose, make_causal_data, make_tiny_llama, quiet_trainer_overrides

from mol.train.module import fused_adamw


@pytest.mark.parametrize("on_cuda, scaler, clipping, sharded, expect", [
    (True, False, True, False, True),     # bf16-mixed or 32-true on one GPU or DDP
    (False, False, True, False, False),   # CPU: torch's own default (foreach / for-loop)
    (True, True, True, False, False),     # 16-mixed: the GradScaler must unscale before clipping
    (True, True, False, False, False),
    (True, False, True, True, False),     # FSDP / DeepSpeed: no flat parameter list to clip
])
def test_auto_picks_fused_only_where_it_can_clip(on_cuda, scaler, clipping, sharded, expect):
    assert fused_adamw("auto", on_cuda, scaler, clipping, sharded) is expect
    assert fused_adamw(False, on_cuda, scaler, clipping, sharded) is False


def test_forced_fused_is_refused_where_it_cannot_clip():
    with pytest.raises(ValueError, match="GradScaler.*optim.fused=auto"):
        fused_adamw(True, True, grad_scaler=True, clipping=True, sharded=False)
    with pytest.raises(ValueError, match="sharded strategy.*gradient_clip_val=null"):
        fused_adamw(True, True, grad_scaler=False, clipping=True, sharded=True)
    assert fused_adamw(True, True, grad_scaler=True, clipping=False, sharded=False) is True  # scaler.step unscales
    assert fused_adamw(True, False, grad_scaler=False, clipping=True, sharded=False) is True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": make_tiny_llama(root / "llama"), "causal": make_causal_data(root / "causal")}


def _run(tiny, tmp_path, name, overrides, monkeypatch):
    """Train one epoch of MoL on the tiny Llama; return (losses by step, the AdamW's fused flag)."""
    from mol.train.app import run
    from mol.train.callbacks import read_loss_history
    from mol.train.module import MoLModule

    built = []
    configure = MoLModule.configure_optimizers

    def recording(self):
        out = configure(self)
        built.append(out["optimizer"].defaults["fused"])
        return out

    out = tmp_path / name
    cfg = compose(["method=mol", "model=hf_causal", f"model.path={tiny['llama']}", "data=jsonl",
                   f"data.train={tiny['causal']['train']}", f"data.val={tiny['causal']['val']}",
                   "data.batch_size=8", "data.max_length=32", f"data.cache_dir={tmp_path / 'cache'}",
                   "trainer.max_epochs=1", "optim.lr=1e-2", f"output_dir={out}", *quiet_trainer_overrides(),
                   *overrides])
    with monkeypatch.context() as patch:
        patch.setattr(MoLModule, "configure_optimizers", recording)
        run(cfg)
    return read_loss_history(str(out / "train_loss.jsonl")), built


def test_fused_run_clips_and_trains_as_the_foreach_run(tiny, tmp_path, monkeypatch):
    """With a clip value that binds, the fused run's gradients are clipped to it at every step (by MoLModule, not
    Lightning) and its losses follow the foreach run's step by step."""
    clip_calls = []
    clip_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        params = list(params)
        before = clip_norm(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        clip_calls.append((float(before), float(after), max_norm))
        return before

    clip = ["trainer.gradient_clip_val=0.05"]
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        fused, f_built = _run(tiny, tmp_path, "fused", ["optim.fused=true", *clip], monkeypatch)
    foreach, e_built = _run(tiny, tmp_path, "foreach", ["optim.fused=false", *clip], monkeypatch)
    assert f_built == [True] and e_built == [None]
    assert len(clip_calls) == len(fused) >= 3, (clip_calls, fused)
    for before, after, max_norm in clip_calls:
        assert max_norm == 0.05 and before > 0.05 and after <= 0.05 * (1 + 1e-4), clip_calls
    assert fused.keys() == foreach.keys()
    for step in fused:
        assert abs(fused[step] - foreach[step]) < 1e-4 * abs(foreach[step]), (step, fused, foreach)


def test_fused_run_under_bf16_mixed_with_clipping(tiny, tmp_path, monkeypatch):
    """Lightning alone raises here ("does not allow for gradient clipping ... 'fused' optimizer?")."""
    losses, built = _run(tiny, tmp_path, "bf16", ["optim.fused=true", "trainer.precision=bf16-mixed",
                                                  "trainer.gradient_clip_val=0.05"], monkeypatch)
    assert built == [True]
    steps = sorted(losses)
    assert len(steps) >= 3 and all(torch.isfinite(torch.tensor(losses[s])) for s in steps)
    assert losses[steps[-1]] < losses[steps[0]], losses


def test_unknown_fused_value_is_a_config_error(tiny, tmp_path, monkeypatch):
    from mol.train.app import ConfigError

    with pytest.raises(ConfigError, match="optim.fused='yes' is unknown; use auto, true or false"):
        _run(tiny, tmp_path, "bad", ["optim.fused=yes"], monkeypatch)
