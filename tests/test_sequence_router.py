"""The sequence router inside Hugging Face models: one choice per sequence, whatever else is in the batch.

mol.inject hooks the model's forward so the routers see the call's attention mask and token shape
(mol.routers.RoutingContext). Checked here against the same sequence run alone: padding (right or left) and
the other sequences of a batch change nothing, a pooler's per-sequence vectors are routed one by one, and cached
generation keeps the choice the prompt made (compared with full forwards routed by that choice).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from conftest import make_tiny_llama

import mol
from mol.inject import adapter_layers

calls_module = importlib.import_module("mol.calls")


def _inject(model, router="sequence", **kw):
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, router=router, target_modules="all-linear",
                                    **kw))
    with torch.no_grad():  # adapters and scores far from their init: routing changes outputs visibly
        for n, p in model.named_parameters():
            if "lora_B" in n or "router" in n:
                p.normal_(0, 0.5)
    return model.eval()


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_labels=3, pad_token_id=0)
    return BertForSequenceClassification(cfg)


def _padded(seqs: list[torch.Tensor], left: bool = False):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1
    return ids, mask


def test_classifier_routes_each_sequence_as_if_alone():
    """A BERT classifier, MoL on every linear including the pooler (which sees one vector per sequence): each
    sequence's logits in a padded batch equal its logits alone."""
    torch.manual_seed(0)
    model = _inject(_tiny_bert())
    seqs = [torch.randint(1, 50, (n,)) for n in (5, 12, 1, 8)]
    ids, mask = _padded(seqs)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = torch.cat([model(input_ids=s[None]).logits for s in seqs])
        swapped = model(input_ids=ids.flip(0), attention_mask=mask.flip(0)).logits.flip(0)  # other neighbours
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["vit", "bart"])
def test_heads_of_calls_without_tokens_route_each_example_as_if_alone(arch):
    """A ViT (its call has pixel_values, no tokens) and a BART classifier (an encoder-decoder: its call's tokens are
    not its layers' length) feed their classification heads one (batch, hidden) vector per example. The hooks take
    the batch size from any batched input, so each vector is routed on its own and an example's logits in a batch
    equal its logits alone; the head used to route the batch as one sequence of `batch` tokens, one choice for all."""
    import transformers

    if arch == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=3))
        head, inputs = "classifier", {"pixel_values": torch.randn(4, 3, 16, 16)}
    else:
        model = transformers.BartForSequenceClassification(transformers.BartConfig(
            vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=3))
        ids = torch.randint(3, 50, (4, 7))
        ids[:, -1] = 2  # the head reads the hidden state at the end-of-sequence token
        head, inputs = "classification_head.dense", {"input_ids": ids}
    model = _inject(model)
    layer = model.get_submodule(head)
    assert isinstance(layer, mol.MoLLinear)
    with torch.no_grad():
        batched = model(**inputs).logits
        choices = layer._last.chosen.shape[0]
        alone = torch.cat([model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits for i in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert choices == 4  # a choice per example


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_causal_lm_routes_each_sequence_as_if_alone(left):
    torch.manual_seed(0)
    model = _inject(make_tiny_llama())
    seqs = [torch.randint(1, 101, (n,)) for n in (4, 9, 6)]
    ids, mask = _padded(seqs, left)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None]).logits[0]
            rows = batched[i, -len(s):] if left else batched[i, :len(s)]
            torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_generation_routes_each_sequence_as_if_alone(attn):
    """generate(cache_implementation="static") hands the model a 4-D mask (batch, 1, queries, cache slots), boolean
    under sdpa and additive under eager attention, not the caller's 2-D one: each row of a left-padded batch must
    still generate as the sequence alone does (the logits of every step). The routers read the padding from the
    4-D mask; they used to see none and pool the padding."""
    model = _inject(make_tiny_llama())
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:  # transformers < 4.56
        model.config._attn_implementation = attn
    seqs = [torch.randint(1, 101, (n,)) for n in (3, 8, 5)]
    ids, mask = _padded(seqs, left=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kw)
        for i, s in enumerate(seqs):
            alone = model.generate(input_ids=s[None], **kw)
            torch.testing.assert_close(torch.stack(batched.logits)[:, i], torch.stack(alone.logits)[:, 0],
                                       rtol=1e-4, atol=1e-5)


def test_a_mask_without_readable_padding_is_refused():
    """A mask the hooks cannot read the padding from (a flex-attention BlockMask, an odd shape) reaches a sequence
    router as the reason it cannot route the call, and it raises with it; token routers run."""
    from mol.routers import Router, RoutingContext

    tokens = torch.zeros(2, 5, dtype=torch.long)
    for mask in (object(), torch.ones(2, 1, 4, 5, dtype=torch.bool)):
        derived, error = calls_module._padding_mask(mask, tokens, continuation=False)
        assert derived is None and "not one the routers can read the padding from" in error
    context = RoutingContext()
    context.begin_call(tokens, None, False, sequence_error=error)
    for kind in ("topk", "sequence"):
        router = Router(16, 4, 2, kind)
        router.context = context
        if kind == "sequence":
            with pytest.raises(ValueError, match="sequence router: the call's attention mask"):
                router(torch.randn(2, 5, 16))
        else:
            router(torch.randn(2, 5, 16))


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_inner_model_called_directly_routes_each_sequence_as_if_alone(left):
    """model.model(...), the decoder without its head (embeddings, a reward head), is hooked too: each row's last
    hidden states in a padded batch equal the sequence's alone, and the head on them gives the outer call's logits
    (inside model(...) the inner hooks leave the call to the outer ones). Called directly it used to pool the
    padding."""
    model = _inject(make_tiny_llama())
    seqs = [torch.randint(1, 101, (n,)) for n in (4, 9, 6)]
    ids, mask = _padded(seqs, left)
    with torch.no_grad():
        inner = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.lm_head(inner), model(input_ids=ids, attention_mask=mask).logits)
        for i, s in enumerate(seqs):
            alone = model.model(input_ids=s[None]).last_hidden_state[0]
            rows = slice(ids.shape[1] - len(s), None) if left else slice(0, len(s))
            torch.testing.assert_close(inner[i, rows], alone, rtol=1e-4, atol=1e-5)


def test_the_mask_changes_routing_where_padding_would():
    """The check above can fail: pooled over every position (the mask taken away), the padded sequence's
    logits move."""
    torch.manual_seed(0)
    model = _inject(make_tiny_llama())
    s, other = torch.randint(1, 101, (4,)), torch.randint(1, 101, (9,))
    ids, mask = _padded([s, other])
    with torch.no_grad():
        alone = model(input_ids=s[None]).logits[0]
        unmasked = model(input_ids=ids).logits[0, :4]
    assert (unmasked - alone).abs().max() > 1e-2


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _routed_by(monkeypatch, choices):
    """From now on every sequence router that ``choices`` (id(router) -> RouterOutput) holds a per-sequence choice
    for routes whatever it is given by it: a full forward without a cache, routed as the cached steps were."""
    from mol.routers import Router

    route = Router.forward

    def forward(self, x):
        if id(self) not in choices:
            return route(self, x)
        return Router._per_token(choices[id(self)], Router._sequences(x, self.call_context()).shape[1])
    monkeypatch.setattr(Router, "forward", forward)


def test_cached_generation_keeps_the_prompts_choice(monkeypatch):
    """Greedy generation with the KV cache: every decode step reuses each sequence's choice from the prompt, so
    each step's scores equal a full forward of the sequence so far routed by that choice (no cache), and the
    per-sequence expert ids the cache keeps are the prompt's."""
    model = _inject(make_tiny_llama())
    prompt = torch.randint(1, 101, (2, 6))
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        kept = calls_module.sequence_choices(out.past_key_values)
        prompt_only = calls_module.sequence_choices(model(input_ids=prompt, use_cache=True).past_key_values)
        assert kept.keys() == prompt_only.keys() and len(kept) == 2 * 7  # every MoL layer's router
        assert all(torch.equal(kept[k].chosen, prompt_only[k].chosen) for k in kept)
        _routed_by(monkeypatch, kept)
        for step, scores in enumerate(out.scores):
            full = model(input_ids=out.sequences[:, :prompt.shape[1] + step]).logits[:, -1]
            torch.testing.assert_close(scores, full, rtol=1e-4, atol=1e-5)


def test_encoder_decoder_decode_steps_keep_the_first_calls_choice(monkeypatch):
    """T5 (an EncoderDecoderCache): generate's decode steps reuse the choice of its first decoder call, as a
    decoder-only model's reuse the prompt's: each step's scores equal a full forward of the decoder sequence so far
    routed by that choice. So does a decode loop that passes the encoder's input at every step (the encoder, run
    afresh, routes it afresh). Every decode step used to route its one new token on its own."""
    from mol.routers import RouterOutput

    model = _inject(_tiny_t5())
    decoder = [m for n, m in model.named_modules() if isinstance(m, mol.MoLLinear) and n.startswith("decoder.")]
    first = {}
    def keep_first(layer, args, out):  # the first decoder call's choice per sequence
        r = layer._last
        gates = r.gates.reshape(r.chosen.shape[0], -1, r.gates.shape[-1])[:, 0]
        first.setdefault(id(layer.router), RouterOutput(gates, r.chosen, r.logits, r.probs, r.chosen))
    for layer in decoder:
        layer.register_forward_hook(keep_first)
    ids = torch.randint(2, 50, (2, 7))
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        assert len(first) == len(decoder) > 0
        cache = None
        for step, scores in enumerate(out.logits):
            dec = out.sequences[:, step:step + 1] if cache is not None else out.sequences[:, :1]
            o = model(input_ids=ids, decoder_input_ids=dec, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(o.logits[:, -1], scores, rtol=1e-4, atol=1e-5)
            cache = o.past_key_values
        _routed_by(monkeypatch, first)
        for step, scores in enumerate(out.logits):
            full = model(input_ids=ids, decoder_input_ids=out.sequences[:, :step + 1]).logits[:, -1]
            torch.testing.assert_close(scores, full, rtol=1e-4, atol=1e-5)


def test_each_cache_keeps_its_own_choice():
    """Two batches served alternately, each continuing its own KV cache (a server's sessions): A's prompt, B's
    prompt, then A's cache continued token by token. A's continuation equals A generated in one go: each cache
    keeps the choice of the call that started it. (The choice was one per router, shared by every cache: A's
    continuation took B's, silently, the batch sizes being equal.)"""
    model = _inject(make_tiny_llama())
    a, b = torch.randint(1, 101, (2, 5)), torch.randint(1, 101, (2, 7))
    kw = dict(do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(input_ids=a, max_new_tokens=8, **kw)
        first = model.generate(input_ids=a, max_new_tokens=4, **kw)
        model.generate(input_ids=b, max_new_tokens=4, **kw)
        # the cache holds all but the last generated token: each continuation call carries one new token
        second = model.generate(input_ids=first.sequences, past_key_values=first.past_key_values,
                                max_new_tokens=4, **kw)
    assert torch.equal(second.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(first.scores + second.scores), torch.stack(whole.scores),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_a_cache_without_a_kept_choice_is_refused(arch):
    """A cache that no call of this model started (filled by the model without its adapters) carries no choice:
    continuing it raises rather than reuse the choice the router made for other sequences. (T5: with the encoder
    run again in the continuing call, whose own routers route afresh.)"""
    import copy

    plain = make_tiny_llama() if arch == "llama" else _tiny_t5()
    model = _inject(copy.deepcopy(plain))

    def inputs(new):
        ids = torch.randint(2, 50, (2, 5))
        return dict(input_ids=ids) if arch == "llama" else dict(input_ids=ids, decoder_input_ids=ids[:, :new])
    with torch.no_grad():
        cache = plain(**inputs(3), use_cache=True).past_key_values
        model(**inputs(3))  # the routers made a choice for two other sequences
        with pytest.raises(ValueError, match="kept no expert choice"):
            step = inputs(1)
            if arch == "llama":
                step["input_ids"] = step["input_ids"][:, :1]
            model(**step, past_key_values=cache, use_cache=True)


def test_a_cache_continued_with_another_batch_is_refused():
    with torch.no_grad():
        model = _inject(make_tiny_llama())
        cache = model(input_ids=torch.randint(1, 101, (2, 5)), use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)
        with pytest.raises(ValueError, match="continues 4 sequences from a KV cache whose first call routed 2"):
            model(input_ids=torch.randint(1, 101, (4, 1)), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("option", ["assistant_model", "prefill_chunk_size", "new turn"])
def test_calls_that_add_several_tokens_to_a_cache_are_refused(option):
    """The choice is made once per sequence, in the call that starts the cache. Assisted decoding (its first call
    scores the prompt with draft tokens, later ones several drafts on the cache), chunked prefill (the first chunk
    would choose) and a new turn appended to a reused cache would each route by a choice made without some of the
    sequence's tokens: greedy output changed with the assistant or the chunk size. They raise, naming the option;
    with the topk router the generate options give plain greedy's tokens, and so do chunks as long as the prompt."""
    prompt = torch.randint(1, 101, (1, 8))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

    def run(model):
        if option == "new turn":
            first = model.generate(input_ids=prompt, return_dict_in_generate=True, **kw)
            turn = torch.cat([first.sequences, torch.randint(1, 101, (1, 3))], 1)
            return model.generate(input_ids=turn, past_key_values=first.past_key_values, **kw)
        extra = dict(assistant_model=make_tiny_llama(layers=1)) if option == "assistant_model" else \
            dict(prefill_chunk_size=3)
        return model.generate(input_ids=prompt, **kw, **extra)

    with torch.no_grad():
        topk = _inject(make_tiny_llama(), router="topk")
        if option != "new turn":
            assert torch.equal(run(topk), topk.generate(input_ids=prompt, **kw))  # the check below can pass
        model = _inject(make_tiny_llama())
        with pytest.raises(ValueError, match=option):
            run(model)
        greedy = model.generate(input_ids=prompt, **kw)
        assert torch.equal(model.generate(input_ids=prompt, prefill_chunk_size=8, **kw), greedy)


def test_flattened_tokens_are_read_as_the_calls_sequences():
    """A layer that sees the batch's tokens flattened to (batch * positions, in) routes them per sequence."""
    from mol.routers import Router, RoutingContext

    router = Router(16, 4, 2, "sequence")
    router.context = RoutingContext()
    x = torch.randn(3, 5, 16)
    router.context.batch_shape = (3, 5)
    flat, nested = router(x.reshape(15, 16)), router(x)
    assert torch.equal(flat.expert_ids, nested.expert_ids) and torch.equal(flat.gates, nested.gates)
    router.context.batch_shape = (3, 7)  # a shape the input does not fit: one sequence of 15 tokens
    assert router(x.reshape(15, 16)).logits.shape == (1, 4)


def test_masked_pool_gradient():
    """The masked mean pool against autograd's derivative of the masked mean, in float64, to second order."""
    from mol.routers import _MeanPool

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda t: _MeanPool.apply(t, mask), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _MeanPool.apply(t, mask), (x,))
    want = torch.stack([x[0, :3].mean(0), x[1].mean(0), torch.zeros(7, dtype=torch.float64)])
    torch.testing.assert_close(_MeanPool.apply(x, mask), want)


def test_a_sequence_of_padding_only_is_left_out_of_the_losses():
    """A batch filler (a row whose mask is all zeros) is routed, but the router losses, their gradients and the
    statistics equal those of the batch without it; counted as a row, it moved them."""
    torch.manual_seed(0)
    model = _inject(make_tiny_llama()).train()
    seqs = [torch.randint(1, 101, (n,)) for n in (4, 9)]
    ids, mask = _padded(seqs)
    filler_ids = torch.cat([ids, torch.zeros(1, ids.shape[1], dtype=torch.long)])
    filler_mask = torch.cat([mask, torch.zeros(1, mask.shape[1], dtype=torch.long)])

    def run(i, m):
        model.zero_grad()
        model(input_ids=i, attention_mask=m)
        aux = mol.aux_loss(model)
        aux.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}
        stats = {n: s["counts"].clone() for n, s in mol.routing_stats(model).items()}
        return aux.detach(), grads, stats

    aux, grads, stats = run(ids, mask)
    aux_f, grads_f, stats_f = run(filler_ids, filler_mask)
    torch.testing.assert_close(aux_f, aux, rtol=1e-5, atol=1e-7)
    for n in grads:
        torch.testing.assert_close(grads_f[n], grads[n], rtol=1e-4, atol=1e-7)
    for n in stats:
        torch.testing.assert_close(stats_f[n], stats[n])
    # and it can fail: with the filler's mask marking its positions, the losses move
    aux_real, _, _ = run(filler_ids, torch.cat([mask, torch.ones(1, mask.shape[1], dtype=torch.long)]))
    assert (aux_real - aux).abs() > 1e-6


def _padded_t5_batch():
    seqs = [torch.randint(2, 50, (n,)) for n in (4, 9, 6)]
    ids, mask = _padded(seqs)
    return seqs, ids, mask


@pytest.mark.parametrize("prompt,wrapped", [(False, False), (True, False), (True, True)],
                         ids=["mol", "mol_with_prompt_tuning", "mol_on_a_wrapper_with_prompt_tuning"])
def test_encoder_decoder_routes_each_sequence_as_if_alone(prompt, wrapped):
    """T5, the sequence router on every linear, a right-padded batch of encoder inputs: each example's logits equal
    its logits alone, in a model call and in generate (which runs the encoder on its own, before the decode loop);
    with prompt tuning the encoder's routers also see the virtual tokens as real. The encoder's routers used to
    pool the padding into each sequence's choice (the call's hooks described the decoder's tokens only). On a
    wrapper (the routers injected on it, the prompt on the T5 inside): generate's decoder calls, given the
    encoder's states, used to give the cross-attention's routers the caller's mask, without the virtual tokens."""
    torch.manual_seed(0)
    model = _tiny_t5()
    if prompt:
        mol.inject(model, mol.PromptTuningConfig(num_virtual_tokens=3))
    wrapper = _inject(_BatchWrapper(model) if wrapped else model)
    seqs, ids, mask = _padded_t5_batch()
    dec = torch.randint(2, 50, (3, 4))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
        batched = wrapper(batch) if wrapped else model(**batch).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, **kw)
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None], decoder_input_ids=dec[i:i + 1]).logits[0]
            torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-4)
            one = model.generate(input_ids=s[None], **kw)
            assert torch.equal(generated.sequences[i], one.sequences[0])
            torch.testing.assert_close(torch.stack(generated.logits)[:, i], torch.stack(one.logits)[:, 0],
                                       rtol=1e-4, atol=1e-4)


def test_encoder_decoder_token_router_losses_leave_encoder_padding_out():
    """T5 with top-k routers: what stands at the encoder's padded positions changes neither the outputs (attention
    masks it) nor the routers' losses and statistics, which count the real tokens only. The encoder's layers used
    to count every position, padding included."""
    torch.manual_seed(0)
    model = _inject(_tiny_t5(), router="topk")
    _, ids, mask = _padded_t5_batch()
    other = torch.where(mask.bool(), ids, torch.randint(2, 50, ids.shape))
    dec = torch.randint(2, 50, (3, 4))
    results = []
    with torch.no_grad():
        for i in (ids, other):
            logits = model(input_ids=i, attention_mask=mask, decoder_input_ids=dec).logits
            stats = mol.routing_stats(model)
            results.append((logits, mol.aux_loss(model), stats))
    (l0, a0, s0), (l1, a1, s1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a0, a1, rtol=1e-5, atol=1e-7)
    assert s0.keys() == s1.keys() and any(k.startswith("encoder.") for k in s0)
    for name in s0:
        for key in s0[name]:
            torch.testing.assert_close(s0[name][key], s1[name][key], rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


class _PairWrapper(torch.nn.Module):
    """A module of the user's own around a Hugging Face model: one call per half of a batch dict (a reward
    model's chosen and rejected), then a routed head of its own."""

    def __init__(self, lm, derived=False, interleaved=False):
        super().__init__()
        self.lm = lm
        self.head = torch.nn.Linear(lm.config.vocab_size, 3)
        self.derived, self.interleaved = derived, interleaved  # the head on a new tensor; after each call

    def forward(self, batch):
        halves, heads = [], []
        for k in ("chosen", "rejected"):
            halves.append(self.lm(input_ids=batch[f"{k}_ids"], attention_mask=batch[f"{k}_mask"]).logits)
            if self.interleaved:
                heads.append(self.head(halves[-1]))
        if not self.interleaved:
            heads = [self.head(h.clone() if self.derived else h) for h in halves]
        return halves, heads


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_wrapper_of_a_hf_model_routes_each_sequence_as_if_alone(left):
    """inject on a wrapper whose forward takes a batch dict and calls the inner model twice: each inner call pools
    its own sequences' real tokens, as the model injected directly does (the hooks used to read the wrapper's
    arguments only, and pooled padding)."""
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    direct = _inject(make_tiny_llama())
    torch.manual_seed(seed)
    wrapped = _inject(_PairWrapper(make_tiny_llama()))
    wrapped.lm.load_state_dict(direct.state_dict())
    assert "lm.lm_head" not in dict(adapter_layers(wrapped))  # all-linear: the inner model's head left out
    assert "head" in dict(adapter_layers(wrapped))
    batch = {}
    for k, lengths in (("chosen", (4, 9, 6)), ("rejected", (7, 3, 5))):
        batch[f"{k}_ids"], batch[f"{k}_mask"] = _padded([torch.randint(1, 101, (n,)) for n in lengths], left)
    with torch.no_grad():
        halves, _ = wrapped(batch)
        for k, got in zip(("chosen", "rejected"), halves):
            want = direct(input_ids=batch[f"{k}_ids"], attention_mask=batch[f"{k}_mask"]).logits
            real = batch[f"{k}_mask"].bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)


class _HeadWrapper(torch.nn.Module):
    """A module of the user's own around a Hugging Face model's backbone, with a head of its own applied to the
    states the backbone returned: per example (the last position's vector, under left padding) or per token."""

    def __init__(self, lm, per_token: bool):
        super().__init__()
        self.backbone, self.per_token = lm.model, per_token
        self.head = torch.nn.Linear(lm.config.hidden_size, 3)

    def forward(self, batch):
        states = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(states if self.per_token else states[:, -1])


@pytest.mark.parametrize("per_token", [False, True], ids=["per_example", "per_token"])
def test_wrapper_head_after_the_model_call_routes_each_example_as_if_alone(per_token):
    """inject on a wrapper whose forward takes a batch dict, with a routed head of its own run after the backbone's
    call returned: each example's head output in a left-padded batch equals its output alone and stays as it is
    when the other examples change. The head used to run in the wrapper's call with nothing described (the
    backbone's part ended when it returned): its (batch, hidden) input was routed as one sequence of `batch`
    tokens, one choice for all, and its (batch, positions, hidden) input pooled the padding."""
    torch.manual_seed(0)
    model = _inject(_HeadWrapper(make_tiny_llama(), per_token))
    assert isinstance(model.head, mol.MoLLinear)
    seqs = [torch.randint(1, 101, (n,)) for n in (5, 9, 3, 7)]
    others = [seqs[0], *(torch.randint(1, 101, (n,)) for n in (8, 2, 6))]

    def run(batch_seqs):
        ids, mask = _padded(batch_seqs, left=True)
        out = model({"input_ids": ids, "attention_mask": mask})
        return [out[i, -len(s):] if per_token else out[i] for i, s in enumerate(batch_seqs)]

    with torch.no_grad():
        batched = run(seqs)
        assert model.head._last.chosen.shape[0] == len(seqs)  # a choice per example
        neighbours = run(others)[0]
        alone = [run([s])[0] for s in seqs]
    for got, want in zip(batched, alone):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(neighbours, alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("interleaved", [False, True], ids=["heads_after_both_calls", "head_after_each_call"])
def test_wrapper_head_on_a_call_s_returned_states_takes_that_call_s_padding(interleaved):
    """Two calls padded to one width (a reward model's chosen and rejected), the wrapper's routed head on each
    call's returned logits, after both calls or after each: each example's head output equals its own alone (the
    returned states carry their call's mask, where the shape fits both)."""
    torch.manual_seed(0)
    wrapped = _inject(_PairWrapper(make_tiny_llama(), interleaved=interleaved))
    seqs = {"chosen": [torch.randint(1, 101, (n,)) for n in (4, 9, 6)],
            "rejected": [torch.randint(1, 101, (n,)) for n in (7, 3, 9)]}
    batch = {}
    for k, ss in seqs.items():
        batch[f"{k}_ids"], batch[f"{k}_mask"] = _padded(ss)
    with torch.no_grad():
        _, heads = wrapped(batch)
        for i in range(3):
            alone = {}
            for k, ss in seqs.items():
                alone[f"{k}_ids"], alone[f"{k}_mask"] = _padded([ss[i]])
            _, heads_alone = wrapped(alone)
            for half, k in enumerate(seqs):
                n = len(seqs[k][i])
                torch.testing.assert_close(heads[half][i, :n], heads_alone[half][0], rtol=1e-4, atol=1e-4)
    kept = wrapped.head.router._call.outside_states  # the head's snapshot of the call outlives it
    del heads, heads_alone, _
    assert kept and all(ref() is None for ref, _ in kept)  # it keeps no call's logits alive


def test_wrapper_head_on_positions_of_two_calls_of_one_width_is_refused():
    """The pair wrapper's head on a new tensor of the first call's per-token logits' shape, both calls padded to
    one width: which call's padding those positions have is unknown, so the sequence router raises rather than
    pool either."""
    torch.manual_seed(0)
    wrapped = _inject(_PairWrapper(make_tiny_llama(), derived=True))
    batch = {}
    for k, lengths in (("chosen", (4, 9, 6)), ("rejected", (7, 3, 9))):
        batch[f"{k}_ids"], batch[f"{k}_mask"] = _padded([torch.randint(1, 101, (n,)) for n in lengths])
    with torch.no_grad(), pytest.raises(ValueError, match="cannot tell which call.s padding"):
        wrapped(batch)


class _BatchWrapper(torch.nn.Module):
    """A module of the user's own around a Hugging Face model, called with a batch dict: a causal LM's logits,
    or a backbone's last hidden states (the prompt's positions in front)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        out = self.model(**batch)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _prompted(model, wrapped: bool):
    """Prompt tuning on the Hugging Face model and the sequence router on every linear: of the model itself, or of
    a wrapper around it (a second inject, which takes the model's adapter over)."""
    mol.inject(model, mol.PromptTuningConfig(num_virtual_tokens=3))
    return _inject(_BatchWrapper(model) if wrapped else model)


@pytest.mark.parametrize("inner", ["causal_lm", "backbone"])
def test_prompt_tuning_inside_a_wrapper_routes_each_sequence_as_if_alone(inner):
    """Prompt tuning on a Hugging Face model inside a wrapper, the sequence router injected on the wrapper: in a
    right-padded batch each sequence's outputs equal its outputs alone and the model's injected directly, in the
    wrapper's call and in generate. The prompt's hook looked for the routing context on the model it is on, but
    only the module given to mol.inject kept it: the routers got the caller's mask, which no longer fitted their
    inputs (the virtual tokens in front), and pooled the padding."""
    torch.manual_seed(0)
    make = make_tiny_llama if inner == "causal_lm" else (lambda: make_tiny_llama().model)
    direct = _prompted(make(), wrapped=False)
    wrapped = _prompted(make(), wrapped=True)
    wrapped.model.load_state_dict(direct.state_dict())
    seqs = [torch.randint(1, 101, (n,)) for n in (5, 9, 3, 7)]
    # right-padded: left padding would stand between the prompt and the tokens, moving them apart (positions)
    ids, mask = _padded(seqs)
    with torch.no_grad():
        got = wrapped({"input_ids": ids, "attention_mask": mask})
        want = _BatchWrapper(direct)({"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        extra = got.shape[1] - ids.shape[1]  # the prompt's positions of a backbone's hidden states
        for i, s in enumerate(seqs):
            alone = wrapped({"input_ids": s[None]})[0]
            torch.testing.assert_close(got[i, :extra + len(s)], alone, rtol=1e-4, atol=1e-4)
        if inner == "causal_lm":  # generate calls the model itself, outside the wrapper's forward
            left, left_mask = _padded(seqs, left=True)
            kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                      return_dict_in_generate=True)
            generated = wrapped.model.generate(input_ids=left, attention_mask=left_mask, **kw)
            reference = direct.generate(input_ids=left, attention_mask=left_mask, **kw)
            assert torch.equal(generated.sequences, reference.sequences)
            torch.testing.assert_close(torch.stack(generated.logits), torch.stack(reference.logits),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["sequence", "topk"])
def test_encoder_decoder_called_with_labels_only_routes_as_with_its_decoder_inputs(router):
    """T5 given labels only (the usual seq2seq training call; the model shifts them right into its decoder inputs),
    encoder and labels of one length, a padded encoder batch: logits and router losses equal the same call with
    the shifted decoder inputs passed. The decoder's hidden states, of the encoder's length, took the encoder's
    padding mask when the call named no decoder tokens."""
    torch.manual_seed(0)
    model = _inject(_tiny_t5(), router=router)
    _, ids, mask = _padded_t5_batch()
    labels = torch.randint(2, 50, ids.shape)
    with torch.no_grad():
        by_labels = model(input_ids=ids, attention_mask=mask, labels=labels)
        aux_labels = mol.aux_loss(model)
        given = model(input_ids=ids, attention_mask=mask, labels=labels,
                      decoder_input_ids=model._shift_right(labels))
        aux_given = mol.aux_loss(model)
    torch.testing.assert_close(by_labels.logits, given.logits, rtol=0, atol=0)
    torch.testing.assert_close(aux_labels, aux_given, rtol=0, atol=0)
