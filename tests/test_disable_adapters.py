"""mol.disable_adapters: inside the block the model computes what it did before inject (PEFT's disable_adapter,
e.g. a DPO reference model from the policy's own weights), and everything comes back after it."""

import copy
import warnings

import pytest
import torch

import mol
from conftest import make_tiny_llama


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def _adapted(base):
    model = mol.inject(copy.deepcopy(base), [
        mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q_proj", "gate_proj"], aux_loss_in_output=True),
        mol.LoRAConfig(rank=4, target_modules=["v_proj"]),
        mol.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        mol.AdapterConfig(placement="pfeiffer", reduction_factor=4),
        mol.PromptTuningConfig(num_virtual_tokens=3)])
    _randomise(model)
    return model


def test_inside_the_block_the_model_is_the_base_and_after_it_the_adapted_one():
    base = make_tiny_llama()
    model = _adapted(base)
    ids = torch.randint(0, 101, (2, 7))
    model.train()
    base.train()
    out = model(input_ids=ids, labels=ids)
    aux = mol.aux_loss(model).detach().clone()
    assert aux > 0 and (out.logits - base(input_ids=ids).logits).abs().max() > 1e-3
    with mol.disable_adapters(model):
        ref = model(input_ids=ids, labels=ids)
    want = base(input_ids=ids, labels=ids)
    assert torch.equal(ref.logits, want.logits)
    assert torch.equal(ref.loss, want.loss)  # no router loss added to the output either
    assert torch.equal(mol.aux_loss(model), aux)  # the adapted forward's routing is kept
    again = model(input_ids=ids, labels=ids)
    assert torch.equal(again.logits, out.logits)


def test_a_dpo_style_step_trains_the_policy_against_its_own_base():
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q_proj"]))
    _randomise(model)
    ids = torch.randint(0, 101, (2, 7))
    policy = model(input_ids=ids).logits.log_softmax(-1)
    with torch.no_grad(), mol.disable_adapters(model):
        reference = model(input_ids=ids).logits.log_softmax(-1)
    assert torch.equal(reference, base(input_ids=ids).logits.log_softmax(-1))
    ((policy - reference).sum() + mol.aux_loss(model)).backward()
    layer = next(m for m in model.modules() if isinstance(m, mol.MoLLinear))
    assert layer.lora_A.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_flags_come_back_after_an_exception_and_in_nested_blocks():
    model = _adapted(make_tiny_llama())
    layers = [m for m in model.modules() if isinstance(m, mol.AdapterLayer)]
    with pytest.raises(RuntimeError, match="boom"):
        with mol.disable_adapters(model):
            raise RuntimeError("boom")
    assert not any(m.disabled for m in layers) and not model.mol_adapters_disabled
    with mol.disable_adapters(model):
        with mol.disable_adapters(model):
            pass
        assert all(m.disabled for m in layers)
    assert not any(m.disabled for m in layers)


def test_what_has_no_base_to_switch_to_is_refused():
    base = make_tiny_llama()
    with pytest.raises(ValueError, match="BitFit trains the base's own biases"):
        with mol.disable_adapters(mol.inject(copy.deepcopy(base), mol.BitFitConfig())):
            pass
    merged = mol.merge(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["v_proj"])))
    with pytest.raises(ValueError, match="is merged into its base weights; call mol.unmerge"):
        with mol.disable_adapters(merged):
            pass
    with pytest.raises(ValueError, match="carries no mol adapter"):
        with mol.disable_adapters(base):
            pass
    kept = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["v_proj"],
                                                           modules_to_save=["lm_head"]))
    with pytest.warns(UserWarning, match="modules_to_save are trained in place"):
        with mol.disable_adapters(kept):
            pass


def test_a_call_outside_a_with_block_warns_that_it_changed_nothing():
    """``mol.disable_adapters(model)`` as a statement (no ``with``) used to return a context manager nobody entered,
    and the model kept its adapters without a word; it now warns, and the model's outputs are indeed the adapted
    ones. A call that was refused (BitFit) raises alone, and a ``with`` block warns nothing."""
    base = make_tiny_llama()
    model = mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, target_modules=["v_proj"]))
    _randomise(model)
    ids = torch.randint(0, 101, (2, 7))
    adapted = model(input_ids=ids).logits
    with pytest.warns(RuntimeWarning, match="outside a `with` block, which changes nothing"):
        mol.disable_adapters(model)
    assert torch.equal(model(input_ids=ids).logits, adapted)
    assert (adapted - base(input_ids=ids).logits).abs().max() > 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mol.disable_adapters(model):
            assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
        with pytest.raises(ValueError, match="BitFit"):
            mol.disable_adapters(mol.inject(copy.deepcopy(base), mol.BitFitConfig()))
