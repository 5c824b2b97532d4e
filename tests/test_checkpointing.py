"""Activation checkpointing: a MoL model trains the same with it as without.

Reentrant checkpointing (``use_reentrant=True``, transformers 4's default and PEFT's QLoRA recipe) runs each
block's forward without autograd and recomputes it inside the backward, so the router loss that MoLLinear keeps
from its forward would be a constant; MoLLinear routes its gradient through the recomputed block instead
(mol.layers._DeferredAuxLoss). Non-reentrant checkpointing drops and recomputes saved tensors. Each test compares
every gradient with a run without checkpointing, on the same fresh random inputs, and checks that the router
loss really contributes (the comparison would pass trivially if it contributed nothing either way).
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_train_utils import REPO, compose
from torch import nn
from torch.utils.checkpoint import checkpoint

import mol
from mol.kernels import layer_graphs


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class _Net(nn.Module):
    """Blocks each wrapped in torch.utils.checkpoint when ``reentrant`` is True or False (None: no checkpoint)."""

    def __init__(self, dim: int = 24, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(blocks))
        self.reentrant: bool | None = None

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if self.reentrant is None else checkpoint(b, x, use_reentrant=self.reentrant)
        return x


def _net(dtype, backend="torch", router="topk", seed=0, **kw):
    torch.manual_seed(seed)
    net = _Net().to(dtype)
    mol.inject(net, mol.MoLConfig(num_experts=4, top_k=1 if router == "switch" else 2, rank=4, router=router,
                                  target_modules=["up", "down"], backend=backend, aux_loss_coef=0.5,
                                  z_loss_coef=0.05, **kw))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            if "router" in n:
                p.normal_(0, 0.5)  # scores far from uniform: the router loss has a gradient worth comparing
    return net.train()


def _grads(net, x, reentrant, aux_weights=(1.0,), scale=0.5):
    """Gradients (x and every trainable tensor) of scale * (task + sum_i w_i * mol.aux_loss(net)), each aux term
    from its own mol.aux_loss call, under the given checkpoint mode. The RNG is reset so router noise and dropout
    draw the same numbers in every mode."""
    net.reentrant = reentrant
    net.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)  # reentrant checkpoints need an input that requires grad
    torch.manual_seed(1234)
    y = net(x)
    loss = y.square().mean() + sum(w * mol.aux_loss(net) for w in aux_weights)
    (scale * loss).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.clone()
    return grads


def _assert_same(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_router_loss_matters(net, x, want):
    """The router's gradient without the aux terms differs from ``want``: the comparison above tests them."""
    without = _grads(net, x, None, aux_weights=())
    for name in want:
        if "router" in name:
            assert (without[name] - want[name]).abs().max() > 1e-3 * want[name].abs().max(), name


@pytest.mark.parametrize("router", ["topk", "soft", "switch", "sequence"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_reference_path_checkpointed_equals_plain(router, reentrant):
    net = _net(torch.float64, router=router, router_noise=0.3, dropout=0.1)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    want = _grads(net, x, None)
    _assert_same(_grads(net, x, reentrant), want, rtol=1e-12, atol=1e-14)
    _assert_router_loss_matters(net, x, want)


@pytest.mark.parametrize("reentrant", [True, False])
def test_router_loss_used_twice_and_scaled(reentrant):
    """Two mol.aux_loss calls in one loss (each with its own weight) and a scaled loss (gradient accumulation):
    the recomputed forward applies the sum of what both received. (Without checkpointing each call builds its
    own float32 router-loss graph, so the two sides differ by float32 rounding.)"""
    net = _net(torch.float64)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    want = _grads(net, x, None, aux_weights=(1.0, 2.5), scale=0.25)
    _assert_same(_grads(net, x, reentrant, aux_weights=(1.0, 2.5), scale=0.25), want, rtol=1e-5, atol=1e-8)
    _assert_router_loss_matters(net, x, want)


@pytest.mark.parametrize("router", ["topk", "soft"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_triton_path_checkpointed_equals_plain(router, reentrant):
    """The fused kernels (under TRITON_INTERPRET=1 here) recomputed inside the backward."""
    net = _net(torch.float32, backend="triton", router=router)
    x = torch.randn(2, 9, 24)
    want = _grads(net, x, None)
    _assert_same(_grads(net, x, reentrant), want, rtol=1e-5, atol=1e-6)
    _assert_router_loss_matters(net, x, want)


def _enable_hf_checkpointing(model, reentrant: bool) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("backend,router", [("torch", "topk"), ("torch", "sequence"), ("triton", "topk")])
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_llama_gradient_checkpointing(reentrant, backend, router):
    """A Llama's own checkpointing switch (what users and HF's Trainer turn on) with MoL on every linear, on a
    padded batch: the recomputed blocks run after the model call returned, and must still see its attention mask
    (padding left out of the router losses, the sequence router's pool) as the first pass did."""
    torch.manual_seed(0)
    model = make_tiny_llama(layers=2).double().train() if backend == "torch" else make_tiny_llama(layers=2).train()
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules="all-linear", backend=backend,
                                    router=router, aux_loss_coef=0.5, z_loss_coef=0.05))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "router" in n:
                p.normal_(0, 0.2)
    ids = torch.randint(0, 101, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        (out.loss + mol.aux_loss(model)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = grads()
    _enable_hf_checkpointing(model, reentrant)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    if backend == "torch":
        _assert_same(grads(), want, rtol=1e-10, atol=1e-12)
    else:  # float32, recomputed kernels: summation order
        _assert_same(grads(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_falcon_adding_in_place_to_a_mol_output_checkpoints_with_the_router_loss(reentrant):
    """Falcon's parallel attention adds the attention output to the MLP's in place (``mlp_output += ...``). Under
    reentrant checkpointing the recomputed MoL layer's output carries the router loss's gradient, and must be a
    tensor that in-place op may write (it was a view a custom Function made, which autograd refuses)."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           hidden_dropout=0.0, attention_dropout=0.0)).double().train()
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, aux_loss_coef=0.5, z_loss_coef=0.05))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "router" in n:
                p.normal_(0, 0.2)
    ids = torch.randint(0, 101, (2, 9))

    def grads():
        model.zero_grad(set_to_none=True)
        (model(input_ids=ids, labels=ids).loss + mol.aux_loss(model)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = grads()
    _enable_hf_checkpointing(model, reentrant)
    _assert_same(grads(), want, rtol=1e-10, atol=1e-12)


def test_router_loss_of_a_no_grad_forward_is_not_dropped_silently():
    """A forward under no_grad, then its router loss backpropagated: nothing recomputes that forward, so the
    gradient cannot reach the router. The layer says so at its next forward instead of training without it."""
    net = _net(torch.float64)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    with torch.no_grad():
        net(x)
    mol.aux_loss(net).backward()
    with pytest.raises(RuntimeError, match="never reached the router"):
        net(x)


def test_router_loss_of_a_no_grad_forward_without_backward_is_fine():
    """Evaluation that computes the router loss for logging (no backward) leaves nothing pending."""
    net = _net(torch.float64)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    with torch.no_grad():
        net(x)
    value = float(mol.aux_loss(net).detach())
    assert value > 0
    net(x)


def test_layer_graphs_stay_off_inside_checkpoints():
    """graph_tokens' replays save nothing through autograd, which a non-reentrant checkpoint's recompute could
    not match, and their static buffers keep what checkpointing frees: inside any checkpoint (its forward or its
    recompute in the backward) the layer runs the ordinary kernels."""
    seen = []

    def fn(x):
        seen.append(layer_graphs._checkpointed())
        return x.sin()

    assert not layer_graphs._checkpointed()
    for reentrant in (False, True):
        seen.clear()
        x = torch.randn(4, requires_grad=True)
        checkpoint(fn, x, use_reentrant=reentrant).sum().backward()
        # non-reentrant: its forward runs under saved-tensor hooks; both kinds recompute inside the backward
        assert seen == [not reentrant, True], (reentrant, seen)
    with torch.autograd.graph.save_on_cpu():
        assert layer_graphs._checkpointed()


METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_under_the_training_cli_checkpointing(method):
    """What ``model.gradient_checkpointing=true`` turns on (mol.train.app.enable_activation_checkpointing), for
    every conf/method: the same gradients as without, or (prefix tuning, whose KV-cache prefix transformers drops
    from checkpointed layers) an error that says so and names the fixes."""
    from mol.train.app import build_method_config, enable_activation_checkpointing

    method_cfg = build_method_config(compose([f"method={method}", "model=hf_causal", "model.path=unused"]))
    ids = torch.randint(0, 101, (2, 11))

    def grads(checkpointed: bool):
        torch.manual_seed(0)
        model = make_tiny_llama(layers=2).train()
        mol.inject(model, method_cfg)
        with torch.no_grad():  # move every trainable tensor off its init (B = 0, IA3 = 1): all gradients nonzero
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        if checkpointed:
            enable_activation_checkpointing(model)
            assert not model.config.use_cache
        torch.manual_seed(5)
        out = model(input_ids=ids, labels=ids)
        (out.loss + mol.aux_loss(model)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want = grads(False)
    if method == "prefix":
        with pytest.raises(ValueError, match="turn activation checkpointing off"):
            grads(True)
        return
    assert want and all(g is not None for g in want.values())
    _assert_same(grads(True), want, rtol=1e-5, atol=1e-7)


def _tiny_llama_mol(router: str, checkpointing: bool | None = None, reentrant: bool = False):
    """A float64 tiny Llama with MoL on every linear, adapters and routers off their init; ``checkpointing``:
    enabled before inject (True), after it (False), or not at all (None)."""
    model = make_tiny_llama(layers=2).double().train()
    if checkpointing:
        _enable_hf_checkpointing(model, reentrant)
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules="all-linear", router=router,
                                    aux_loss_coef=0.5, z_loss_coef=0.05))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "router" in n:
                p.normal_(0, 0.2)
    if checkpointing is False:
        _enable_hf_checkpointing(model, reentrant)
    return model


def _two_padded_batches(width: int = 9):
    """Two batches of random tokens whose padding differs: the first right-padded, the second left-padded."""
    batches = []
    for left in (False, True):
        ids = torch.randint(0, 101, (2, width))
        mask = torch.ones_like(ids)
        for row, real in enumerate(torch.randint(3, width - 1, (2,)).tolist()):
            if left:
                mask[row, : width - real] = 0
            else:
                mask[row, real:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _log_probs(model, batch):
    logits = model(**batch).logits[:, :-1]
    lp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (lp * batch["attention_mask"][:, 1:]).sum(-1)


def _step_grads(model, scenario: str, first: dict, second: dict) -> dict:
    """The gradients of one training step with two model calls before its backward."""
    model.zero_grad(set_to_none=True)

    def loss_of(batch):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss + mol.aux_loss(model)

    if scenario == "accumulate":  # micro-batch losses summed, one backward
        loss = loss_of(first) + loss_of(second)
    elif scenario == "eval_between":  # an evaluation forward between a training forward and its backward
        loss = loss_of(first)
        model.eval()
        with torch.no_grad():
            model(**second)
        model.train()
    else:  # DPO: policy forwards on chosen and rejected, the reference (adapters off) under no_grad
        chosen, aux_chosen = _log_probs(model, first), mol.aux_loss(model)
        rejected, aux_rejected = _log_probs(model, second), mol.aux_loss(model)
        with torch.no_grad(), mol.disable_adapters(model):
            ref_chosen, ref_rejected = _log_probs(model, first), _log_probs(model, second)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean() + aux_chosen + aux_rejected
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scenario", ["accumulate", "eval_between", "dpo"])
@pytest.mark.parametrize("router", ["topk", "sequence"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_checkpointing_with_a_second_call_before_backward(reentrant, router, scenario):
    """Two model calls before one backward (summed micro-batches, an evaluation in between, DPO's chosen and
    rejected halves): each checkpointed block recomputes with the padding of the call it ran in, not the last
    call's, so the step's gradients are those without checkpointing. (The routing snapshot used to be one per
    router, overwritten by the later call: relative gradient errors up to 2.) DPO's model had checkpointing
    enabled before inject."""
    first, second = _two_padded_batches()
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    want = _step_grads(_tiny_llama_mol(router), scenario, first, second)
    torch.manual_seed(seed)
    model = _tiny_llama_mol(router, checkpointing=scenario != "dpo", reentrant=reentrant)
    assert model.is_gradient_checkpointing
    _assert_same(_step_grads(model, scenario, first, second), want, rtol=1e-10, atol=1e-12)


def test_unload_puts_back_the_checkpoint_function():
    model = _tiny_llama_mol("topk", checkpointing=False)
    layer = model.model.layers[0]
    model(**_two_padded_batches()[0])
    assert type(layer._gradient_checkpointing_func).__name__ == "_CheckpointRouting"
    mol.unload(model)
    assert type(layer._gradient_checkpointing_func).__name__ == "partial"


def _stats(model) -> dict:
    return {(n, k): v.clone() for n, s in mol.routing_stats(model).items() for k, v in s.items()}


@pytest.mark.parametrize("model_kind", ["hf", "own_checkpoint"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_routing_read_after_backward_is_the_last_forwards(reentrant, model_kind):
    """Two micro-batches, then one backward: mol.routing_stats and mol.aux_loss read after it report the last
    forward, as without checkpointing, not the earlier micro-batch that the checkpoint recomputed in the backward
    (which the layers used to keep)."""
    if model_kind == "hf":
        model = _tiny_llama_mol("topk", checkpointing=False, reentrant=reentrant)
        first, second = _two_padded_batches()

        def loss_of(batch):
            return model(**batch, labels=batch["input_ids"]).loss + mol.aux_loss(model)
    else:  # torch.utils.checkpoint in the model's own forward
        model = _net(torch.float64)
        model.reentrant = reentrant
        first, second = (torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True) for _ in range(2))

        def loss_of(x):
            return model(x).square().mean() + mol.aux_loss(model)

    loss = loss_of(first)
    first_stats = _stats(model)
    loss = loss + loss_of(second)
    want, want_aux = _stats(model), mol.aux_loss(model).item()
    assert any(not torch.equal(first_stats[k], want[k]) for k in want)  # the two micro-batches route differently
    loss.backward()
    got = _stats(model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=str(k))
    assert mol.aux_loss(model).item() == want_aux
