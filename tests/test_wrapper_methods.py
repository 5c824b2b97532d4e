"""Prompt and prefix tuning on a module of the user's own that holds a Hugging Face model, in one mol.inject call
with MoL: as if injected on that model (outputs, trainable tensors, save / load, disable, unload), the wrapper's
parameter names."""
from __future__ import annotations

import copy
import json

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


def _as_direct(wrapped: nn.Module, direct: nn.Module, plain: nn.Module, batch: dict):
    """The wrapper's output, checked equal to its head on the directly injected model's logits; and the plain
    (adapter-free) wrapper's output."""
    with torch.no_grad():
        got = wrapped(batch)
        want = wrapped.head(direct(**batch).logits)
        before = plain(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return got, before


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
    got, before = _as_direct(wrapped, direct, plain, batch)
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


# ---- injects on nested modules: the outer inject takes the inner one's adapter over ---------------------------


def _two_injects(arch: str, router: str, method: str, base: nn.Module) -> _Wrapper:
    """Prompt / prefix tuning on the Hugging Face model, then MoL on the wrapper around it: two injects."""
    mol_cfg, virtual = _configs(arch, router, method)
    wrapped = _Wrapper(copy.deepcopy(base)).eval()
    mol.inject(wrapped.lm, virtual)
    return mol.inject(wrapped, mol_cfg)


NESTED = CASES[:3] + CASES[4:5]


@pytest.mark.parametrize("arch,router,method", NESTED, ids=["-".join(c) for c in NESTED])
def test_an_inject_around_an_injected_model_takes_its_adapter_over(arch, router, method, tmp_path):
    """Prompt (or prefix) tuning injected on the Hugging Face model, then MoL on the wrapper around it: the prompt
    stays trainable beside every LoRA / router tensor (the second inject used to freeze it, silently), the wrapper's
    calls route through one routing context (the model was hooked to two), save_adapter through the wrapper writes
    both and load_adapter rebuilds both in a fresh wrapper, outputs equal to the same configs on the model itself,
    and unload gives the base back bit for bit."""
    from mol.calls import _RoutingCallHooks

    base = _base(arch)
    plain = _Wrapper(copy.deepcopy(base)).eval()
    mol_cfg, virtual = _configs(arch, router, method)
    direct = mol.inject(copy.deepcopy(base), [virtual, mol_cfg])
    _randomise(direct)
    wrapped = _two_injects(arch, router, method, base)
    wrapped.head.load_state_dict(plain.head.state_dict())
    wrapped.lm.load_state_dict(direct.state_dict())

    assert sorted(wrapped.mol_trainable) == sorted(f"lm.{n}" for n in direct.mol_trainable)
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == set(wrapped.mol_trainable)
    assert f"lm.mol_{method}.embedding.weight" in wrapped.mol_trainable
    assert not hasattr(wrapped.lm, "mol_configs") and not hasattr(wrapped.lm, "mol_trainable")
    assert [(p, [c.method for c in cs]) for p, cs in wrapped.mol_nested] == [("lm", [method])]
    contexts = {id(m.mol_routing_context) for m in wrapped.modules() if "mol_routing_context" in m.__dict__}
    routers = {id(m.router.context) for m in wrapped.modules() if isinstance(m, mol.MoLLinear)}
    assert len(contexts) == 1 and routers == contexts
    assert sum(isinstance(getattr(h, "__self__", None), _RoutingCallHooks)
               for h in wrapped.lm._forward_pre_hooks.values()) == 1  # hooked once

    batch = _batch(arch)
    got, before = _as_direct(wrapped, direct, plain, batch)

    mol.save_adapter(wrapped, tmp_path)
    assert [e["module"] for e in json.loads((tmp_path / "adapter_config.json").read_text())["nested"]] == ["lm"]
    fresh = _Wrapper(copy.deepcopy(base)).eval()
    fresh.head.load_state_dict(plain.head.state_dict())
    mol.load_adapter(fresh, tmp_path)
    assert fresh.mol_trainable == wrapped.mol_trainable and fresh.mol_nested == wrapped.mol_nested
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(fresh.mol_trainable)
    with torch.no_grad():
        assert torch.equal(fresh(batch), got)
        with mol.disable_adapters(fresh):
            torch.testing.assert_close(fresh(batch), before, rtol=1e-5, atol=1e-6)
    mol.load_adapter(fresh, tmp_path)  # into the same adapter again: the nested configs compare equal

    mol.unload(wrapped)
    assert set(wrapped.state_dict()) == set(plain.state_dict()) and _hooks(wrapped) == _hooks(plain)
    assert not any(k.startswith("mol_") for m in wrapped.modules() for k in m.__dict__)
    with torch.no_grad():
        assert torch.equal(wrapped(batch), before)


def test_an_inject_inside_an_injected_module_is_refused():
    """MoL on the wrapper, then prompt tuning on the model inside: the second inject would freeze the wrapper's
    LoRA / router tensors in that model (it used to, silently) and stay out of the wrapper's save, so it raises,
    naming the fix, and changes nothing. The model inside says whose adapter covers it when saved or unloaded."""
    wrapped = _Wrapper(make_tiny_llama())
    mol.inject(wrapped, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="inside a module that mol.inject adapted already.*Inject these configs on "
                                         "the outer module"):
        mol.inject(wrapped.lm, mol.PromptTuningConfig(num_virtual_tokens=3))
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == trainable
    assert not hasattr(wrapped.lm, "mol_prompt") and not hasattr(wrapped.lm, "mol_configs")
    with pytest.raises(ValueError, match="call this on that outer module"):
        mol.save_adapter(wrapped.lm, "unused")
    mol.inject(wrapped, mol.PromptTuningConfig(num_virtual_tokens=3))  # the fix: on the wrapper
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == trainable | {
        "lm.mol_prompt.embedding.weight"}


class _Pair2(nn.Module):
    """Two Hugging Face models (a policy and a reward model) and a head of the user's own."""

    def __init__(self):
        super().__init__()
        self.policy, self.reward = make_tiny_llama(), make_tiny_llama()
        self.head = nn.Linear(101, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.policy(**batch).logits + self.reward(**batch).logits)


def test_two_injected_models_in_a_wrapper_share_one_routing_context(tmp_path):
    """Each model inside injected on its own (prompt tuning on one, routed MoL on both), then routed MoL on the
    wrapper's head: one routing context for all (each model's was made apart), every tensor trainable, and the
    adapter saves and loads through the wrapper; the wrapper's outputs equal the models' injected directly."""
    seqs = (mol.MoLConfig(num_experts=4, top_k=2, rank=4, router="sequence", target_modules=["q_proj"]),
            mol.PromptTuningConfig(num_virtual_tokens=2))
    pair = _Pair2().eval()
    base = copy.deepcopy(pair)
    mol.inject(pair.policy, list(seqs))
    mol.inject(pair.reward, seqs[0])
    mol.inject(pair, mol.MoLConfig(num_experts=4, top_k=2, rank=4, router="sequence", target_modules=["head"]))
    _randomise(pair)
    contexts = {id(m.router.context) for m in pair.modules() if isinstance(m, mol.MoLLinear)}
    assert len(contexts) == 1 and all(id(m.mol_routing_context) in contexts
                                      for m in pair.modules() if "mol_routing_context" in m.__dict__)
    assert {n for n, p in pair.named_parameters() if p.requires_grad} == set(pair.mol_trainable)
    assert "policy.mol_prompt.embedding.weight" in pair.mol_trainable
    assert any(n.startswith("reward.") and ".lora_A" in n for n in pair.mol_trainable)
    batch = _batch("llama")
    policy = mol.inject(copy.deepcopy(base.policy), list(seqs))
    policy.load_state_dict(pair.policy.state_dict())
    reward = mol.inject(copy.deepcopy(base.reward), seqs[0])
    reward.load_state_dict(pair.reward.state_dict())
    with torch.no_grad():
        got = pair(batch)
        per_model = policy(**batch).logits + reward(**batch).logits
        # the head alone on the sum, routed per example (as the wrapper's head outside the models' calls)
        alone = torch.stack([pair.head(per_model[i:i + 1, :int(batch["attention_mask"][i].sum())])[0, -1]
                             for i in range(len(per_model))])
    torch.testing.assert_close(got[torch.arange(len(got)), batch["attention_mask"].sum(1) - 1], alone,
                               rtol=1e-4, atol=1e-4)
    mol.save_adapter(pair, tmp_path)
    fresh = copy.deepcopy(base)
    mol.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(batch), got)


def test_disable_adapters_through_the_wrapper_switches_the_inner_router_loss_off():
    """MoL with aux_loss_in_output injected on the model, LoRA on the wrapper's head after: inside the wrapper's
    disable_adapters the model's training loss is the base's (its own hook, taken over, adds no router loss)."""
    base = make_tiny_llama()
    wrapped = _Wrapper(copy.deepcopy(base))
    mol.inject(wrapped.lm, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q_proj"],
                                         aux_loss_in_output=True))
    mol.inject(wrapped, mol.LoRAConfig(rank=4, target_modules=["head"]))
    ids = torch.randint(0, 101, (2, 7))
    wrapped.train()
    base.train()
    with torch.no_grad():
        assert wrapped.lm(input_ids=ids, labels=ids).loss != base(input_ids=ids, labels=ids).loss
        with mol.disable_adapters(wrapped):
            assert torch.equal(wrapped.lm(input_ids=ids, labels=ids).loss, base(input_ids=ids, labels=ids).loss)
        assert wrapped.lm(input_ids=ids, labels=ids).loss != base(input_ids=ids, labels=ids).loss


def test_a_saved_nested_adapter_that_does_not_fit_is_refused(tmp_path):
    """A wrapper whose model inside was injected first saves that inject under its module's name (format_version
    2, so an older mol refuses it rather than load half); a model without that module, or a damaged entry, is
    refused naming the problem, and the model stays as it was."""
    wrapped = _Wrapper(make_tiny_llama())
    mol.inject(wrapped.lm, mol.PromptTuningConfig(num_virtual_tokens=2))
    mol.inject(wrapped, mol.LoRAConfig(rank=4, target_modules=["head"]))
    mol.save_adapter(wrapped, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["format_version"] == 2 and raw["nested"][0]["module"] == "lm"

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = make_tiny_llama()
            self.head = nn.Linear(101, 3)

    other = Other()
    with pytest.raises(ValueError, match="for the module 'lm' inside the model it was saved from, which Other lacks"):
        mol.load_adapter(other, tmp_path)
    assert not any(k.startswith("mol_") for m in other.modules() for k in m.__dict__)
    raw["nested"] = [{"module": "lm"}]
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'nested' must be a list"):
        mol.load_adapter(_Wrapper(make_tiny_llama()), tmp_path)


class _TwoPasses(nn.Module):
    """Two passes of one batch through the backbone (R-Drop / SimCSE style), a per-token head after each."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.backbone = lm.model
        self.head = nn.Linear(lm.config.hidden_size, 3)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.head(self.backbone(**batch).last_hidden_state)
        return first, self.head(self.backbone(**batch).last_hidden_state)


def test_two_passes_of_one_batch_with_prompt_tuning_are_one_padding():
    """Prompt tuning builds each call's mask with its virtual tokens afresh: two passes of the same batch are still
    one padding, so the wrapper's sequence-routed head takes it (it raised: two masks of one shape) and routes
    each example as alone."""
    torch.manual_seed(0)
    model = _TwoPasses(make_tiny_llama())
    mol.inject(model, [mol.MoLConfig(num_experts=4, top_k=2, rank=4, router="sequence"),
                       mol.PromptTuningConfig(num_virtual_tokens=2)])
    _randomise(model)
    model.eval()
    batch = _batch("llama")
    with torch.no_grad():
        first, second = model(batch)
        assert torch.equal(first, second)
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            alone, _ = model({k: v[i:i + 1, :n] for k, v in batch.items()})
            # float32 rounding of a padded batch's products against one row's (2e-4 on logits near 15 with torch
            # 2.13's CPU kernels); another routing of the example would move them by ~1e-1
            assert (first[i, :2 + n] - alone[0]).abs().max() < 1e-4 * alone[0].abs().max(), i


class _ValueHead(nn.Module):
    """A value-head wrapper that exposes the model's config and input embeddings and passes its inputs through."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.config = lm, lm.config
        self.v_head = nn.Linear(lm.config.hidden_size, 1)

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                      output_hidden_states=True)
        return out.logits, self.v_head(out.hidden_states[-1]).squeeze(-1)


def test_prompt_tuning_on_a_wrapper_with_a_config_of_its_own_stays_on_it(tmp_path):
    """A wrapper with a config of its own took prompt tuning itself before wrappers were resolved to the model
    inside: it still does, so adapters saved from it (mol_prompt.embedding.weight) load as they were written."""
    torch.manual_seed(0)
    model = _ValueHead(make_tiny_llama())
    mol.inject(model, [mol.MoLConfig(num_experts=4, top_k=2, rank=4, router="sequence"),
                       mol.PromptTuningConfig(num_virtual_tokens=2)])
    assert "mol_prompt.embedding.weight" in model.mol_trainable
    _randomise(model)
    batch = _batch("llama")
    with torch.no_grad():
        want = model(**batch)
    mol.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = _ValueHead(make_tiny_llama())
    mol.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        for got, ref in zip(fresh(**batch), want):
            assert torch.equal(got, ref)
