"""Token routers in a Hugging Face model leave padding out of their losses and statistics.

mol.inject's hooks hand the routers the call's attention mask (mol.routers.RoutingContext). Every token is still
routed; the load-balance loss, z-loss, counts and entropy are those of the real tokens, as Hugging Face's MoE models
compute them (load_balancing_loss_func with an attention mask). Checked against the paper's formulas on the real
tokens alone, and end to end: the same sequences padded to different widths give the same router losses.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402

import mol  # noqa: E402
from mol.inject import adapter_layers  # noqa: E402
from mol.routers import Router, RoutingContext  # noqa: E402


@pytest.mark.parametrize("kind,k", [("topk", 2), ("switch", 1), ("soft", 4)])
def test_reference_router_losses_count_real_tokens_only(kind, k):
    """Router (the reference path) on a padded (B, S, in) batch: losses, counts and entropy equal the same router on
    the real tokens alone, gradients included, and the padded tokens are still routed. (The router scores in
    float32: the two sides differ by its summation order.)"""
    torch.manual_seed(0)
    router = Router(16, 4, k, kind).double()
    torch.nn.init.normal_(router.weight, std=0.5)
    router.context = RoutingContext()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    router.context.attention_mask = mask
    padded = router(x)
    router.context.attention_mask = None
    alone = router(x[mask.bool()])
    assert padded.gates.shape == (18, k)  # every position routed
    for name in ("load_balance_loss", "z_loss", "counts", "entropy"):
        torch.testing.assert_close(getattr(padded, name), getattr(alone, name), rtol=1e-6, atol=1e-7, msg=name)
    g_padded = torch.autograd.grad(padded.load_balance_loss + padded.z_loss, router.weight)[0]
    g_alone = torch.autograd.grad(alone.load_balance_loss + alone.z_loss, router.weight)[0]
    torch.testing.assert_close(g_padded, g_alone, rtol=1e-5, atol=1e-7)


def _padded_batch(seqs, width):
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_router_losses_do_not_depend_on_padding(backend):
    """A Llama with MoL on every linear: the same sequences right-padded to 9 and to 14 positions give the same
    router losses, statistics and router gradients; without the mask (padding counted) they would not."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules="all-linear", backend=backend,
                                    aux_loss_coef=0.5, z_loss_coef=0.05))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n:
                p.normal_(0, 0.5)
    seqs = [torch.randint(1, 101, (n,)) for n in (5, 9, 3)]
    routers = [m.router.weight for m in model.modules() if isinstance(m, mol.MoLLinear)]

    def losses(width, use_mask=True):
        ids, mask = _padded_batch(seqs, width)
        model(input_ids=ids, attention_mask=mask if use_mask else None)
        aux = mol.aux_loss(model)
        stats = mol.routing_stats(model)
        return aux, torch.autograd.grad(aux, routers), {n: s["counts"] for n, s in stats.items()}

    aux9, g9, counts9 = losses(9)
    aux14, g14, counts14 = losses(14)
    torch.testing.assert_close(aux14, aux9, rtol=1e-5, atol=1e-7)
    for a, b in zip(g14, g9):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for name in counts9:
        assert torch.equal(counts14[name], counts9[name]), name
        assert counts9[name].sum() == 2 * 17  # top-2 of the 17 real tokens
    unmasked, _, _ = losses(14, use_mask=False)
    assert (unmasked - aux9).abs() > 1e-3 * aux9.abs()  # the check above can fail


@pytest.mark.parametrize("router", ["topk", "sequence"])
def test_prompt_tuning_keeps_padding_out_of_the_routers(router):
    """MoL with prompt tuning: the layers see the virtual tokens before the caller's, so the routers' mask must
    cover them too. MoL on layer 0's q_proj only (its input does not depend on positions): one sequence alone and
    left-padded by 3 gives the same router loss, counts and (sequence router) choice, as without prompt tuning."""
    torch.manual_seed(0)
    model = make_tiny_llama().double()
    mol.inject(model, [mol.MoLConfig(num_experts=4, top_k=1, rank=4, router=router,
                                     target_modules=["model.layers.0.self_attn.q_proj"]),
                       mol.PromptTuningConfig(num_virtual_tokens=3)])
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.router.weight.normal_()
    model.train()
    ids = torch.randint(1, 101, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    alone, counts, chosen = mol.aux_loss(model), layer.last_stats["counts"], layer._last.expert_ids.flatten()[0]
    model(input_ids=padded, attention_mask=(padded != 0).long())
    torch.testing.assert_close(mol.aux_loss(model), alone, rtol=1e-9, atol=0)
    assert torch.equal(layer.last_stats["counts"], counts)
    assert counts.sum() == (1 if router == "sequence" else 3 + 5)  # a choice per sequence; per real token
    assert layer._last.expert_ids.flatten()[0] == chosen


def test_encoder_decoder_layers_each_read_their_own_mask():
    """An encoder-decoder call, encoder and decoder of the same length: the encoder's layers and the decoder's
    cross-attention keys and values (which read the encoder's states) leave the encoder's padding out, the
    decoder's other layers the decoder's (decoder_attention_mask), or count every position where it has none.
    Every layer used to count every position: the call's hooks could not tell one mask from the other."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                num_heads=4, decoder_start_token_id=0))
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules="all-linear", backend="torch"))
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    dec_mask = torch.ones_like(ids)
    dec_mask[1, 3:] = 0
    layers = {n: m for n, m in model.named_modules() if isinstance(m, mol.MoLLinear)}

    def reads_encoder(name):
        return name.startswith("encoder.") or name.endswith(("EncDecAttention.k", "EncDecAttention.v"))
    for decoder_mask in (None, dec_mask):
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=decoder_mask,
                    labels=ids)
        for name, layer in layers.items():
            want = mask if reads_encoder(name) else decoder_mask
            got = layer._last.token_weights
            if want is None:
                assert got is None, name
            else:
                assert got is not None and torch.equal(got, want.reshape(-1).float()), name
    # (T5 reads its linears' weight dtype: the adapted layers answer with their base's, so it runs and trains)
    (out.loss + mol.aux_loss(model)).backward()
    assert all(m.router.weight.grad is not None and m.lora_A.grad is not None for m in layers.values())


def test_mask_passed_by_position_counts_too():
    """model(input_ids, attention_mask) positionally: the hooks name the arguments from forward's signature."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules="all-linear", backend="torch"))
    ids, mask = _padded_batch([torch.randint(1, 101, (n,)) for n in (3, 8)], 8)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        by_name = mol.aux_loss(model)
        for _ in range(2):  # (the second call takes the cached parameter names)
            model(ids, mask)
            torch.testing.assert_close(mol.aux_loss(model), by_name)
        model(ids)  # no mask: every position counts, a different loss
        assert (mol.aux_loss(model) - by_name).abs() > 1e-6


def test_hand_made_context_masks_a_flattened_input():
    """A RoutingContext made by hand with only its attention_mask covers a (batch * positions, in) input too, as its
    docstring says: the same losses and counts as the (batch, positions, in) form (padding was counted before)."""
    torch.manual_seed(0)
    layer = mol.MoLLinear(torch.nn.Linear(16, 8), num_experts=4, top_k=2, rank=2, backend="torch")
    ctx = RoutingContext()
    ctx.attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    layer.router.context = ctx
    x = torch.randn(2, 5, 16)
    layer(x)
    aux3, counts3 = layer.aux_loss(), layer.last_stats["counts"]
    layer(x.reshape(10, 16))
    assert counts3.sum() == 2 * 9 and torch.equal(layer.last_stats["counts"], counts3)
    torch.testing.assert_close(layer.aux_loss(), aux3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["topk", "switch", "soft", "sequence"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_padding_reaches_neither_real_tokens_nor_losses(backend, kind, bad):
    """Hidden states that are NaN or inf at padding (some attention implementations leave fully masked, e.g.
    left-padded, rows NaN): the real tokens' outputs and input gradients, the losses and the statistics are those of
    the same batch with finite values there. (Padding is selected out, not multiplied by its weight 0.)"""
    layer = mol.MoLLinear(torch.nn.Linear(12, 10), num_experts=4, top_k=1 if kind == "switch" else 2, rank=3,
                          router=kind, backend=backend, aux_loss_coef=0.3, z_loss_coef=0.05)
    with torch.no_grad():
        layer.lora_B.normal_()
    ctx = RoutingContext()
    ctx.attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    layer.router.context = ctx
    real = ctx.attention_mask.bool()
    clean = torch.randn(3, 5, 12)
    garbage = clean.clone()
    garbage[~real] = bad

    def run(x):
        x = x.clone().requires_grad_()
        y = layer(x)
        aux = layer.aux_loss()
        (y[real].square().sum() + aux).backward()
        return y.detach()[real], aux.detach(), dict(layer.last_stats), x.grad[real]

    want, got = run(clean), run(garbage)
    for name, a, b in zip(("y", "aux", "stats", "dx"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


class _Wrapper(torch.nn.Module):
    """A module of the user's own around a Hugging Face model (a LightningModule's ``forward(batch)``)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch):
        return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_wrapper_of_a_hf_model_routes_as_the_model_itself(target_modules):
    """inject on a wrapper whose forward takes a batch dict: the router losses, statistics and gradients leave the
    padding out as with the Hugging Face model injected directly (the hooks used to read the wrapper's arguments
    only, and counted padding), and "all-linear" leaves the inner model's output head out as it does there."""
    config = mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=target_modules, backend="torch",
                           aux_loss_coef=0.5, z_loss_coef=0.05)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    direct = mol.inject(make_tiny_llama(), config)
    torch.manual_seed(seed)
    wrapped = mol.inject(_Wrapper(make_tiny_llama()), config)
    with torch.no_grad():
        for n, p in direct.named_parameters():
            if "lora_B" in n or "router" in n:
                p.normal_(0, 0.5)
    wrapped.lm.load_state_dict(direct.state_dict())
    assert sorted(n for n, _ in adapter_layers(direct)) == sorted(
        n.removeprefix("lm.") for n, _ in adapter_layers(wrapped))
    ids, mask = _padded_batch([torch.randint(1, 101, (n,)) for n in (4, 9, 6)], 9)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def run(model, call):
        model.train().zero_grad(set_to_none=True)
        out = call()
        loss = out.loss + mol.aux_loss(model)
        loss.backward()
        stats = {n.removeprefix("lm."): s for n, s in mol.routing_stats(model).items()}
        grads = {n.removeprefix("lm."): p.grad for n, p in model.named_parameters() if p.requires_grad}
        return mol.aux_loss(model).detach(), stats, grads

    want_aux, want_stats, want_grads = run(direct, lambda: direct(**batch))
    got_aux, got_stats, got_grads = run(wrapped, lambda: wrapped(batch))
    torch.testing.assert_close(got_aux, want_aux, rtol=0, atol=0)
    assert got_stats.keys() == want_stats.keys() and got_grads.keys() == want_grads.keys()
    for name in want_stats:
        for key in want_stats[name]:
            torch.testing.assert_close(got_stats[name][key], want_stats[name][key], rtol=0, atol=0)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():  # the padding counted would change the losses
        direct(input_ids=ids, labels=batch["labels"])
    assert (mol.aux_loss(direct) - want_aux).abs() > 1e-6


class _TokenHeadWrapper(torch.nn.Module):
    """A module of the user's own: a Llama backbone, then a per-token head of its own on the states it returned."""

    def __init__(self, lm):
        super().__init__()
        self.backbone = lm.model
        self.head = torch.nn.Linear(lm.config.hidden_size, 5)

    def forward(self, batch):
        return self.head(self.backbone(**batch).last_hidden_state)


def test_wrapper_head_after_the_model_call_leaves_padding_out():
    """A wrapper's own per-token head, top-2 routers, run after the backbone's call returned: the same sequences
    right-padded to 9 and to 14 positions give the head the same router losses and counts, those of the real
    tokens. The backbone's mask ended with its call, so the head counted the padding."""
    torch.manual_seed(0)
    model = mol.inject(_TokenHeadWrapper(make_tiny_llama()), mol.MoLConfig(
        num_experts=4, top_k=2, rank=4, target_modules=["q_proj", "head"], backend="torch"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n:
                p.normal_(0, 0.5)
    seqs = [torch.randint(1, 101, (n,)) for n in (5, 9, 3)]

    def head_routing(width):
        ids, mask = _padded_batch(seqs, width)
        with torch.no_grad():
            model({"input_ids": ids, "attention_mask": mask})
        return model.head.aux_loss(), mol.routing_stats(model)["head"]["counts"]

    (aux9, counts9), (aux14, counts14) = head_routing(9), head_routing(14)
    assert counts9.sum() == 2 * 17 and torch.equal(counts14, counts9)  # top-2 of the 17 real tokens
    torch.testing.assert_close(aux14, aux9, rtol=1e-5, atol=1e-7)
