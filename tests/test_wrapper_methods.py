"""Prompt and prefix tuning on a module of the user's own that holds a Hugging Face model, in one mol.inject call
with MoL: as if injected on that model (outputs, trainable tensors, save / load, disable, unload), the wrapper's
parameter names."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mol
from conftest import make_tiny_llama


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


class _Wrapper(nn.Module):
    """A module of the user's own: a Hugging Face model called with a batch dict, then a head of its own."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.vocab_size, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.lm(**batch).logits)


_TARGETS = {"llama": ["q_proj", "v_proj", "up_proj"], "t5": ["q", "v", "wi"]}


def _configs(arch: str, router: str, method: str) -> list:
    virtual = (mol.PromptTuningConfig(num_virtual_tokens=3) if method == "prompt"
               else mol.PrefixTuningConfig(num_virtual_tokens=3))
    return [mol.MoLConfig(num_experts=4, top_k=2, rank=4, router=router, target_modules=_TARGETS[arch]), virtual]


def _base(arch: str) -> nn.Module:
    return make_tiny_llama() if arch == "llama" else _tiny_t5()


def _batch(arch: str) -> dict:
    lengths = (5, 9, 3, 7)
    vocab = 101 if arch == "llama" else 50
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # right-padded: left padding would sit between a prompt and its tokens
        ids[i, :n], mask[i, :n] = torch.randint(2, vocab, (n,)), 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        batch["decoder_input_ids"] = torch.randint(2, vocab, (len(lengths), 4))
    return batch


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():  # adapters and scores far from their init, so a lost one shows
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


CASES = [("llama", "sequence", "prompt"), ("llama", "topk", "prompt"), ("llama", "sequence", "prefix"),
         ("llama", "topk", "prefix"), ("t5", "sequence", "prompt"), ("t5", "topk", "prompt")]


@pytest.mark.parametrize("arch,router,method", CASES, ids=["-".join(c) for c in CASES])
def test_virtual_tokens_on_a_wrapper_act_as_on_the_model_inside(arch, router, method, tmp_path):
    """[MoL, prompt / prefix tuning] on the wrapper equals the same configs on the Hugging Face model inside, the
    wrapper's head on its output; the prompt (or prefix) and every LoRA / router tensor train, under the wrapper's
    names; save_adapter / load_adapter through the wrapper into a fresh one, disable_adapters and unload give the
    same outputs as the model's own (unload: the base, bit for bit). Prompt / prefix tuning on a wrapper used to
    raise (no Hugging Face `config` on the wrapper)."""
    base = _base(arch)
    plain = _Wrapper(copy.deepcopy(base)).eval()
    torch.manual_seed(0)
    direct = mol.inject(copy.deepcopy(base), _configs(arch, router, method))
    _randomise(direct)
    wrapped = _Wrapper(copy.deepcopy(base)).eval()
    wrapped.head.load_state_dict(plain.head.state_dict())
    mol.inject(wrapped, _configs(arch, router, method))
    wrapped.lm.load_state_dict(direct.state_dict())

    assert wrapped.mol_trainable == [f"lm.{n}" for n in direct.mol_trainable]
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == set(wrapped.mol_trainable)
    virtual = f"lm.mol_{method}.embedding.weight"
    assert virtual in wrapped.mol_trainable and any(".lora_A" in n for n in wrapped.mol_trainable)
    assert any(".router." in n for n in wrapped.mol_trainable)

    batch = _batch(arch)
    with torch.no_grad():
        got = wrapped(batch)
        want = wrapped.head(direct(**batch).logits)
        before = plain(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - before).abs().max() > 1e-2  # the adapters act

    wrapped.train()
    wrapped(batch).square().mean().backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
    assert grads[virtual] is not None and grads[virtual].abs().sum() > 0
    assert all(g is not None for g in grads.values())
    wrapped.eval()

    mol.save_adapter(wrapped, tmp_path)
    fresh = _Wrapper(copy.deepcopy(base)).eval()
    fresh.head.load_state_dict(plain.head.state_dict())
    mol.load_adapter(fresh, tmp_path)
    assert fresh.mol_trainable == wrapped.mol_trainable
    with torch.no_grad():
        assert torch.equal(fresh(batch), got)
        with mol.disable_adapters(wrapped):
            torch.testing.assert_close(wrapped(batch), before, rtol=1e-5, atol=1e-6)

    mol.unload(wrapped)
    assert set(wrapped.state_dict()) == set(plain.state_dict()) and _hooks(wrapped) == _hooks(plain)
    assert not any(k.startswith("mol_") for m in wrapped.modules() for k in m.__dict__)
    with torch.no_grad():
        assert torch.equal(wrapped(batch), before)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.policy, self.reference = make_tiny_llama(), make_tiny_llama()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_on_a_wrapper_of_several_models_or_none_is_refused(method):
    """A wrapper holding two Hugging Face models: which one takes the virtual tokens is unknown, so inject raises,
    naming them and the fix, and leaves the wrapper as it was; a module holding none says it needs one."""
    cls = mol.PromptTuningConfig if method == "prompt" else mol.PrefixTuningConfig
    pair = _Pair()
    with pytest.raises(ValueError, match=r"holds 2 Hugging Face models \(\['policy', 'reference'\]\).*"
                                         r"mol\.inject\(wrapper\.policy"):
        mol.inject(pair, [mol.LoRAConfig(target_modules=["q_proj"]), cls(num_virtual_tokens=2)])
    assert not hasattr(pair, "mol_configs") and all(p.requires_grad for p in pair.parameters())
    with pytest.raises(ValueError, match="needs a Hugging Face .transformers. model.*Sequential is none"):
        mol.inject(nn.Sequential(nn.Linear(4, 4)), cls(num_virtual_tokens=2))
