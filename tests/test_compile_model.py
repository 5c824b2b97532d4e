"""A Hugging Face model carrying MoL adapters under torch.compile: loss (task + router auxiliary losses) and every
adapter gradient equal eager mode's, on both backends (the Triton one through its custom ops, on CPU under
TRITON_INTERPRET=1). Not fullgraph: the HF model may break graphs of its own; the layer-level fullgraph tests are
in test_no_sync.py and test_routed_kernels.py."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mol  # noqa: E402


@pytest.mark.parametrize("backend,router", [("torch", "topk"), ("triton", "topk"), ("torch", "sequence")])
def test_hf_model_with_mol_compiles_and_matches_eager(backend, router, tiny_llama):
    """(The sequence router reads the call's attention mask through hooks on the model's forward.)"""
    torch._dynamo.reset()
    model = tiny_llama
    mol.inject(model, mol.MoLConfig(rank=4, alpha=8, num_experts=4, top_k=2, router=router,
                                    target_modules=["q_proj", "v_proj", "up_proj"], backend=backend))
    with torch.no_grad():  # lora_B starts at zero: give the experts (and so the routing gradient) something to do
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(m):
        return m(input_ids=ids, attention_mask=mask, labels=ids).loss + mol.aux_loss(model)
    eager = loss_of(model)
    g_eager = torch.autograd.grad(eager, params)
    got = loss_of(torch.compile(model, backend="aot_eager"))
    g = torch.autograd.grad(got, params)
    assert mol.aux_loss(model).item() > 0  # the compiled forward left its routing losses on the layers
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-6), (got.item(), eager.item())
    for a, b in zip(g, g_eager):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_model_with_float32_adapters_compiles_and_matches_eager():
    """adapter_dtype="auto" on a bf16 model: float32 adapters, cast inside the routed layer's autograd node; the
    compiled model (the kernels through their custom ops) gives eager mode's loss and float32 gradients, in one
    graph (the layer's cache of cast adapters, kept for no-grad calls, used to break it in every layer)."""
    from conftest import make_tiny_llama

    torch._dynamo.reset()
    model = make_tiny_llama(dtype=torch.bfloat16)
    mol.inject(model, mol.MoLConfig(rank=4, alpha=8, num_experts=4, top_k=2, target_modules=["q_proj", "up_proj"],
                                    backend="triton"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))

    def loss_of(m):
        return m(input_ids=ids, labels=ids).loss + mol.aux_loss(model)
    eager = loss_of(model)
    g_eager = torch.autograd.grad(eager, params)
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = loss_of(torch.compile(model, backend="aot_eager"))
    g = torch.autograd.grad(got, params)
    assert torch.allclose(got.float(), eager.float(), rtol=1e-3, atol=1e-4), (got.item(), eager.item())
    for a, b in zip(g, g_eager):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=2e-2, atol=1e-3)


def _inject_three(model, router: str, backend: str) -> None:
    """MoL E=4 top-2 r=4 on q/v/up projections, lora_B drawn so the experts' deltas show."""
    mol.inject(model, mol.MoLConfig(rank=4, alpha=8, num_experts=4, top_k=2, router=router,
                                    target_modules=["q_proj", "v_proj", "up_proj"], backend=backend))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("backend,router", [("torch", "topk"), ("triton", "topk"), ("torch", "sequence")])
def test_one_graph_for_every_sequence_length(backend, router, tiny_llama):
    """A compiled model with MoL adapters is one graph (no break at any layer) and, over four sequence lengths,
    compiles twice: for the first length, then once with dynamic shapes. The routers' call context used to break
    the graph in every layer (autograd's task id, an int) and to pin the call's shape as constants (its batch shape
    as ints, the last call's cached mask), so every length compiled every layer again, up to torch's recompile
    limit, after which they ran eagerly. Each step's loss equals eager mode's."""
    torch._dynamo.reset()
    model = tiny_llama
    _inject_three(model, router, backend)

    def batch(length):
        ids = torch.randint(0, model.config.vocab_size, (3, length))
        mask = torch.ones_like(ids)
        mask[0, length - 2:] = 0
        return dict(input_ids=ids, attention_mask=mask, labels=ids)

    explained = torch._dynamo.explain(model)(**batch(7))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    for length in (5, 6, 9, 12):
        b = batch(length)
        got = compiled(**b).loss + mol.aux_loss(model)
        got.backward()
        want = model(**b).loss + mol.aux_loss(model)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (length, got.item(), want.item())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2, dict(torch._dynamo.utils.counters["stats"])
    torch._dynamo.reset()


def test_qlora_mol_compiles_in_one_graph_and_matches_eager(tiny_llama):
    """QLoRA-MoL: NF4 bases under MoL adapters on the fused Triton path, whose autograd node dequantizes the base
    weight (forward and again in backward): compiled, one graph, and eager mode's loss and adapter gradients."""
    torch._dynamo.reset()
    model = tiny_llama
    mol.inject(model, mol.MoLConfig(rank=4, alpha=8, num_experts=4, top_k=2, target_modules=["q_proj", "up_proj"],
                                    backend="triton", quantize_base="nf4"))
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "NF4Linear"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0

    def loss_of(m):
        return m(input_ids=ids, attention_mask=mask, labels=ids).loss + mol.aux_loss(model)
    eager = loss_of(model)
    g_eager = torch.autograd.grad(eager, params)
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = loss_of(torch.compile(model, backend="aot_eager"))
    g = torch.autograd.grad(got, params)
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-6), (got.item(), eager.item())
    for a, b in zip(g, g_eager):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("backend,router", [("torch", "topk"), ("torch", "sequence"), ("triton", "topk")])
def test_checkpointed_model_compiles_in_one_graph_and_matches_eager(backend, router, reentrant, monkeypatch):
    """Activation checkpointing on (transformers' switch, either use_reentrant) and the model compiled with
    fullgraph=True: one graph, and the loss (task + router losses), every gradient, and the routing the layers keep
    for mol.aux_loss / routing_stats equal the eager checkpointed run's and the run's without checkpointing. Dynamo
    used to refuse the routers' writes to their own state inside the checkpointed function ("HOP: Unsafe side
    effect"), which a recompute must not repeat anyway: they are made once, in the forward (mol.routers.keep_state).
    The same with einops' cache of its backends empty, as in a process whose first einops call is the compiled
    forward (mol.train compiles before any step): mol's layers used einops, whose first call writes that cache.
    Needs torch >= 2.10 (older Dynamo drops such writes: mol leaves them refused there)."""
    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        pytest.skip("this torch's Dynamo refuses writes inside an activation checkpoint (torch >= 2.10 keeps them)")
    from conftest import make_tiny_llama

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make_tiny_llama()
    _inject_three(model, router, backend)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n:
                p.normal_(0, 0.5)  # scores far from uniform: the router losses' gradients are worth comparing
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    params = [p for p in model.parameters() if p.requires_grad]

    def step(m):
        model.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss + mol.aux_loss(model)
        stats = {n: {k: v.clone() for k, v in s.items()} for n, s in mol.routing_stats(model).items()}
        loss.backward()  # (reentrant checkpoints take no torch.autograd.grad)
        return loss.detach(), [p.grad for p in params], mol.aux_loss(model).detach(), stats

    plain = step(model)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    eager = step(model)
    # transformers' hook that makes the embeddings' output require grad (reentrant checkpointing's need, eager):
    # Dynamo refuses that requires_grad_() in a fullgraph compile, mol or not
    model.disable_input_require_grads()
    mol.clear_routing(model)
    try:
        import einops._backends
    except ImportError:
        pass
    else:
        monkeypatch.setattr(einops._backends, "_type2backend", {}, raising=False)
    compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    for want in (eager, plain):
        assert torch.allclose(compiled[0], want[0], rtol=1e-5, atol=1e-6), (compiled[0].item(), want[0].item())
        for a, b in zip(compiled[1], want[1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        assert torch.allclose(compiled[2], want[2], rtol=1e-5, atol=1e-7)
        assert compiled[3].keys() == want[3].keys() and len(want[3]) == 6
        for name, stats in want[3].items():
            for key, value in stats.items():
                assert torch.allclose(compiled[3][name][key], value, rtol=1e-5, atol=1e-6), (name, key)
    torch._dynamo.reset()


def test_save_adapter_of_a_compiled_model_writes_the_model_s_adapter(tiny_llama, tmp_path):
    """mol.save_adapter(torch.compile(model)) writes what saving the model itself writes (it raised, naming the
    compiled wrapper's '_orig_mod' as an adapter injected later)."""
    mol.inject(tiny_llama, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules=["q_proj", "v_proj"]))
    mol.save_adapter(torch.compile(tiny_llama, backend="eager"), tmp_path / "compiled")
    mol.save_adapter(tiny_llama, tmp_path / "plain")
    from safetensors.torch import load_file

    got, want = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("compiled", "plain"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "compiled" / "adapter_config.json").read_text() == \
        (tmp_path / "plain" / "adapter_config.json").read_text()


def test_inject_load_and_export_through_a_compiled_wrapper_act_on_the_model(tmp_path):
    """mol.inject(torch.compile(model), ...) kept the trainable names with the wrapper's '_orig_mod.' prefix, so
    save_adapter then raised a KeyError; load_adapter / import_peft into a compiled model raised one too, and
    export_peft would have written every PEFT key with the prefix. Each now acts on the model inside and returns
    what it was given."""
    import copy

    from conftest import make_tiny_llama

    base = make_tiny_llama()
    cfg = mol.LoRAConfig(rank=2, target_modules=["q_proj"])
    compiled = torch.compile(copy.deepcopy(base), backend="eager")
    assert mol.inject(compiled, cfg) is compiled
    assert compiled._orig_mod.mol_trainable[0] == "model.layers.0.self_attn.q_proj.lora_A"
    with torch.no_grad():
        compiled._orig_mod.model.layers[0].self_attn.q_proj.lora_B.normal_()
    mol.save_adapter(compiled, tmp_path / "a")
    mol.export_peft(compiled, tmp_path / "peft")
    from safetensors.torch import load_file

    assert all(k.startswith("base_model.model.model.layers.")
               for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    ids = torch.randint(0, 101, (1, 5))
    want = compiled._orig_mod(input_ids=ids).logits
    for load, directory in ((mol.load_adapter, "a"), (mol.import_peft, "peft")):
        fresh = torch.compile(copy.deepcopy(base), backend="eager")
        assert load(fresh, tmp_path / directory) is fresh
        assert torch.equal(fresh._orig_mod(input_ids=ids).logits, want)
