"""Per-layer CUDA graphs (MoLLinear(graph_tokens=N), mol.kernels.layer_graphs) on CPU.

CUDA graphs need a GPU, so the capture is emulated: a "captured" step is run once and remembered, and each
replay runs it again and writes its results into the tensors the capture returned, which is what a replay does
to a graph's static buffers. What is tested is the layer's use of them: static inputs refreshed every call,
fresh y / aux / gradients handed out (nothing a caller keeps is overwritten), a second forward before the
first's backward kept off the graph, stale saved buffers refused, the signature limit. The kernels are the
ordinary ones (Triton under TRITON_INTERPRET=1), so graphed and ungraphed layers must agree to the bit.
"""
import copy
import os
import pickle

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

gl = pytest.importorskip("mol.kernels.grouped_lora")
if not gl._INTERPRET:
    pytest.skip("mol.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
from mol import MoLConfig, MoLLinear  # noqa: E402
from mol.kernels import layer_graphs as lg  # noqa: E402


def _copy_into(old, new):
    if isinstance(old, torch.Tensor):
        old.copy_(new)
    elif isinstance(old, (tuple, list)):
        for o, n in zip(old, new):
            _copy_into(o, n)


class FakeGraph:
    def __init__(self, step, out):
        self.step, self.out, self.replays = step, out, 0

    def replay(self):
        self.replays += 1
        _copy_into(self.out, self.step())


@pytest.fixture
def graphs(monkeypatch):
    """Emulated capture; returns the list of FakeGraphs made."""
    made = []

    def capture(step, pool):
        out = step()
        made.append(FakeGraph(step, out))
        return made[-1], out
    monkeypatch.setattr(lg, "_capturable", lambda x: True)
    monkeypatch.setattr(lg, "_warm_up", lambda step, device: step())
    monkeypatch.setattr(lg, "_new_pool", lambda: None)
    monkeypatch.setattr(lg, "_capture", capture)
    return made


def _pair(graph_tokens=64, n_in=19, n_out=23, graph_inference_tokens=0, dtype=torch.float32, **kw):
    """A graphed layer and an ungraphed one with the same weights."""
    kw = {"num_experts": 4, "top_k": 2, "rank": 3, "backend": "triton", "aux_loss_coef": 0.3, "z_loss_coef": 0.05, **kw}
    plain = MoLLinear(torch.nn.Linear(n_in, n_out, dtype=dtype), **kw)
    with torch.no_grad():
        plain.lora_B.normal_()
    graphed = MoLLinear(torch.nn.Linear(n_in, n_out, dtype=dtype), graph_tokens=graph_tokens,
                        graph_inference_tokens=graph_inference_tokens, **kw)
    graphed.load_state_dict(plain.state_dict())
    return plain, graphed


def _step(layer, x, w_y):
    x = x.clone().requires_grad_()
    y = layer(x)
    loss = (y * w_y).sum() + 3.0 * layer.aux_loss()
    return x, y, loss


def _grads(layer, x):
    return [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


def _steps_agree(plain, graphed, x, w_y, seed=None):
    """One training step of each layer on x (with seed: the same dropout mask and router noise for both): y, the
    aux loss and every gradient bit-equal; .grad cleared after. Returns the graphed step's x."""
    outs = []
    for layer in (plain, graphed):
        if seed is not None:
            torch.manual_seed(seed)
        xi, y, loss = _step(layer, x, w_y)
        loss.backward()
        # the routing kept for the caller too: its losses are normalised by the real (unpadded) tokens
        routing = layer._last
        outs.append((xi, y, layer.aux_loss(), routing.load_balance_loss, routing.z_loss, *_grads(layer, xi)))
        layer.zero_grad(set_to_none=True)
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.equal(a, b)
    return outs[1][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_steps_equal_ungraphed_and_hand_out_fresh_tensors(graphs, dtype):
    """Every gradient a fresh tensor, in the eager gradient's dtype and layout (lora_B's is expert-interleaved), in
    the layer's dtype and in bf16 (whose router keeps float32)."""
    plain, graphed = _pair(dtype=dtype)
    kept = []
    for step in range(3):
        x, w_y = torch.randn(2, 9, 19, dtype=dtype), torch.randn(2, 9, 23, dtype=dtype)
        xp, yp, lp = _step(plain, x, w_y)
        xg, yg, lg_ = _step(graphed, x, w_y)
        assert torch.equal(yg, yp) and torch.equal(graphed.aux_loss(), plain.aux_loss())
        # a replayed call takes (B, S, in) x as it comes: y is the graphed node's own output, with no view node
        # around it (each costs host time forward and backward), and a tensor the caller may modify in place
        assert yg.shape == (2, 9, 23) and not yg._is_view() and type(yg.grad_fn).__name__ == "_GraphedRoutedFnBackward"
        assert xg in [fn.variable for fn, _ in yg.grad_fn.next_functions if hasattr(fn, "variable")]
        lp.backward()
        lg_.backward()
        for a, b in zip(_grads(graphed, xg), _grads(plain, xp)):
            assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype
        kept.append((yg, yp, graphed.aux_loss(), plain.aux_loss(), _grads(graphed, xg), _grads(plain, xp)))
        for layer in (plain, graphed):
            layer.zero_grad(set_to_none=True)
    fwd, bwd = graphs  # one signature: captured once, replayed every step
    assert fwd.replays == 3 and bwd.replays == 3
    # the static inputs carry no autograd history: one that did would keep the caller's first graph (and its
    # leaves' AccumulateGrad nodes, made on another stream) alive, which breaks later captures on a GPU
    cap, = graphed._graphs.captured.values()
    assert cap.copied == (0,)  # x; the weights are parameters, read in place
    assert all(t.grad_fn is None and not t.requires_grad for i, t in enumerate(cap.static_in) if i in cap.copied)
    for yg, yp, ag, ap, dg, dp in kept:  # later replays overwrote none of what the caller kept
        assert torch.equal(yg, yp) and torch.equal(ag, ap) and all(torch.equal(a, b) for a, b in zip(dg, dp))


def test_non_contiguous_x_reaches_the_captured_step(graphs):
    """x as a (B, S, in) view of (S, B, in) activations: no (T, in) view of a buffer in x's own layout exists, so
    the static buffer must be dense for the captured step to read each call's x through its view."""
    plain, graphed = _pair()
    for _ in range(3):  # fresh values every step: a step reading a stale copy of the first x would differ
        x, w_y = torch.randn(9, 2, 19).transpose(0, 1), torch.randn(2, 9, 23)
        assert not _steps_agree(plain, graphed, x, w_y).is_contiguous()  # (_step's clone keeps x's layout)
    assert [g.replays for g in graphs] == [3, 3]


def test_gradient_accumulation_adds_up(graphs):
    plain, graphed = _pair()
    for _ in range(2):  # two micro-batches into the same .grad: no gradient may alias a graph buffer
        x, w_y = torch.randn(7, 19), torch.randn(7, 23)
        for layer in (plain, graphed):
            _step(layer, x, w_y)[2].backward()
    for a, b in zip(graphed.parameters(), plain.parameters()):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad)


def test_second_forward_before_backward_runs_off_the_graph(graphs):
    plain, graphed = _pair()
    x1, x2, w_y = torch.randn(5, 19), torch.randn(5, 19), torch.randn(5, 23)
    losses = {}
    for name, layer in (("plain", plain), ("graphed", graphed)):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        ya = layer(a)
        aux_a = layer.aux_loss()
        yb = layer(b)  # the layer twice in one step: the first call's saved buffers are still needed
        loss = ((ya + 2 * yb) * w_y).sum() + aux_a + layer.aux_loss()
        loss.backward()
        losses[name] = (ya, yb, a.grad, b.grad, [p.grad for p in layer.parameters() if p.requires_grad])
    fwd, bwd = graphs
    assert fwd.replays == 1 and bwd.replays == 1
    for a, b in zip(losses["graphed"][:4], losses["plain"][:4]):
        assert torch.equal(a, b)
    for a, b in zip(losses["graphed"][4], losses["plain"][4]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_backward_after_a_later_replay_is_refused(graphs):
    _, graphed = _pair()
    y1 = graphed(torch.randn(6, 19, requires_grad=True))
    y1.sum().backward(retain_graph=True)
    graphed(torch.randn(6, 19, requires_grad=True)).sum().backward()
    with pytest.raises(RuntimeError, match="graph_tokens=0"):
        y1.sum().backward()


def test_weights_that_are_not_parameters_are_copied_in(graphs):
    # autocast's bf16 copy of an fp32 lora_A is a new tensor every call, at any address: it must be copied into
    # the graph's static input (one capture for every call), never keyed by its address
    from mol.kernels import routed_lora as rl

    plain, graphed = _pair()
    kept = []
    for step in range(3):
        x = torch.randn(5, 19)
        outs = []
        for layer in (plain, graphed):
            xi = x.clone().requires_grad_()
            a = layer.lora_A * (1.0 + step)  # a fresh non-leaf tensor, like a cast
            kept.append(a)  # kept alive: the next call's copy lands elsewhere
            y, aux, *_ = rl.routed_lora_linear(
                xi, a, layer.lora_B, layer.router.weight, "topk", 2, layer.scaling,
                weight=layer.base_layer.weight, bias=layer.base_layer.bias, lb_coef=0.3, z_coef=0.05,
                graphs=layer._graphs)
            (y.sum() + aux).backward()
            outs.append((y, aux, xi.grad, layer.lora_A.grad.clone()))
            layer.zero_grad(set_to_none=True)
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    assert len(graphs) == 2 and graphs[0].replays == 3  # one signature


def test_base_out_path_gets_its_gradient(graphs):
    # a base computed by the caller (NF4 at small T, autocast): its gradient is dy, handed back by the graphed path
    from mol.kernels import routed_lora as rl

    plain, graphed = _pair()
    for step in range(2):  # (B, S, n) inputs: base_out's gradient comes back in its shape
        x, base_out, w_y = torch.randn(1, 5, 19), torch.randn(1, 5, 23), torch.randn(1, 5, 23)
        outs = []
        for layer in (plain, graphed):
            xi, bi = x.clone().requires_grad_(), base_out.clone().requires_grad_()
            y, aux, *_ = rl.routed_lora_linear(xi, layer.lora_A, layer.lora_B, layer.router.weight, "topk", 2,
                                               layer.scaling, base_out=bi, lb_coef=0.3, z_coef=0.05,
                                               graphs=layer._graphs)
            ((y * w_y).sum() + aux).backward()
            outs.append((y, xi.grad, bi.grad))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    assert graphs and graphs[1].replays == 2


def test_dropout_and_router_noise_copied_in_with_leading_dims(graphs):
    """Dropout (the experts' own input x_lora) and router noise are new tensors every call, copied into static
    buffers; with x of shape (B, S, in) both reach the captured step, and dx_lora comes back in x's shape."""
    plain, graphed = _pair(dropout=0.3, router_noise=0.5)
    for layer in (plain, graphed):
        layer.train()
    for step in range(3):
        _steps_agree(plain, graphed, torch.randn(2, 6, 19), torch.randn(2, 6, 23), seed=step)
    cap, = graphed._graphs.captured.values()
    assert cap.copied == (0, 1, 8)  # x, x_lora (dropout), noise
    assert [g.replays for g in graphs] == [3, 3]


def test_backward_after_a_weight_changed_in_place_is_refused(graphs):
    # eager autograd refuses a saved tensor modified in place; the captured backward reads the weights in place
    _, graphed = _pair()
    y = graphed(torch.randn(6, 19, requires_grad=True))
    with torch.no_grad():
        graphed.lora_A.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place or moved"):
        y.sum().backward()


def test_limits_token_count_and_signatures(graphs):
    plain, graphed = _pair(graph_tokens=8)
    graphed(torch.randn(9, 19, requires_grad=True)).sum().backward()  # over graph_tokens: not captured
    graphed(torch.randn(3, 3, 19, requires_grad=True)).sum().backward()  # 9 tokens in (B, S, in) form: neither
    assert not graphs
    with torch.no_grad():  # inference never captures
        graphed(torch.randn(4, 19))
    assert not graphs
    for t in range(1, lg.MAX_SIGNATURES + 1):
        graphed(torch.randn(t, 19, requires_grad=True)).sum().backward()
    assert len(graphs) == 2 * lg.MAX_SIGNATURES
    x = torch.randn(lg.MAX_SIGNATURES + 1, 19)
    with pytest.warns(UserWarning, match="Pad batches"):
        yg = graphed(x.clone().requires_grad_())
    assert len(graphs) == 2 * lg.MAX_SIGNATURES and torch.equal(yg, plain(x))


def test_copies_and_pickles_start_without_graphs(graphs):
    _, graphed = _pair()
    graphed(torch.randn(3, 19, requires_grad=True)).sum().backward()
    assert graphed._graphs.captured
    graphed.clear_routing()  # the last forward's aux loss (a graph node) cannot be deep-copied, with or without graphs
    for clone in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert clone._graphs.max_tokens == 64 and not clone._graphs.captured
        x = torch.randn(3, 19)
        assert torch.equal(clone(x), graphed(x))


def test_clear_graphs_frees_and_the_next_call_captures_again(graphs):
    import mol

    _, graphed = _pair()
    model = torch.nn.Sequential(graphed)
    x = torch.randn(4, 19, requires_grad=True)
    model(x).sum().backward()
    mol.clear_graphs(model)
    assert not graphed._graphs.captured
    model(x).sum().backward()
    assert len(graphed._graphs.captured) == 1 and len(graphs) == 4


@pytest.fixture
def slow_calls(monkeypatch):
    """Counts the calls that reach LayerGraphs.apply / apply_inference (the way to a replay the layer's shortcut
    skips), by kind."""
    calls = {"train": 0, "inference": 0}
    for name, kind in (("apply", "train"), ("apply_inference", "inference")):
        def counted(self, *args, _f=getattr(lg.LayerGraphs, name), _k=kind):
            calls[_k] += 1
            return _f(self, *args)
        monkeypatch.setattr(lg.LayerGraphs, name, counted)
    return calls


def test_repeated_calls_replay_through_the_shortcut(graphs, slow_calls):
    """A call like an earlier replayed one (same key) replays its capture without the fused path's way there;
    outputs and gradients stay equal to the ungraphed layer's, for training steps and no-grad decode calls."""
    plain, graphed = _pair(graph_inference_tokens=2)
    for step in range(4):
        _steps_agree(plain, graphed, torch.randn(2, 5, 19), torch.randn(2, 5, 23))
    assert slow_calls == {"train": 1, "inference": 0}  # the first step captured; the next three took the shortcut
    assert [g.replays for g in graphs] == [4, 4]
    plain.eval(), graphed.eval()
    with torch.no_grad():
        for step in range(3):
            _agree(plain, graphed, torch.randn(1, 1, 19))
    assert slow_calls == {"train": 1, "inference": 1} and graphs[2].replays == 3


def _set(name, value):
    return lambda layer: setattr(layer, name, value)


def _replace_lora_a(layer):
    layer.lora_A = torch.nn.Parameter(layer.lora_A.detach() * 2.0)


def _move_lora_b(layer):  # the same Parameter, its data elsewhere (the graph would read the old address)
    layer.lora_B.data = layer.lora_B.detach().clone().add_(0.5)


def _context(layer):
    from mol.routers import RoutingContext

    layer.router.context = RoutingContext()
    layer.router.context.attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


CHANGES = {
    "scaling": _set("scaling", 0.37),
    "aux coefficients": _set("aux_loss_coef", 0.9),
    "top_k": lambda layer: setattr(layer.router, "top_k", 1),
    "router noise": lambda layer: setattr(layer.router, "noise_std", 0.5),
    "token weights": _context,
    "lora_A replaced": _replace_lora_a,
    "lora_B moved": _move_lora_b,
    "lora_B frozen": lambda layer: layer.lora_B.requires_grad_(False),
    "changed in place": lambda layer: layer.router.weight.data.mul_(-1.0),
    "eval": lambda layer: layer.eval(),
}


@pytest.mark.parametrize("change", CHANGES)
def test_shortcut_follows_what_changes_between_calls(graphs, change):
    """Every state the fused path's choice reads, changed between steps on both layers: the graphed layer (its
    shortcut warm) must still compute exactly what the ungraphed one does. A stale replay would use the old
    settings, parameters or addresses."""
    plain, graphed = _pair()
    x, w_y = torch.randn(2, 5, 19), torch.randn(2, 5, 23)
    for step in range(2):
        _steps_agree(plain, graphed, x, w_y, seed=step)
    for layer in (plain, graphed):
        CHANGES[change](layer)
    for step in range(2):
        _steps_agree(plain, graphed, torch.randn(2, 5, 19), w_y, seed=10 + step)
    # a new signature is a new capture (the emulated replay reads parameters by object, so a graph left reading
    # a moved tensor's old address would not show in the values here); an in-place change or eval mode keeps it
    assert len(graphs) == (2 if change in ("changed in place", "eval") else 4)


def test_shortcut_follows_the_attention_mask(graphs, slow_calls):
    """Token weights come from the call's attention mask (mol.inject's RoutingContext), a per-call input: a
    shortcut taken without a mask must not be taken once one covers x, and with a mask each call's own weights
    reach the graph."""
    from mol.routers import RoutingContext

    plain, graphed = _pair()
    for layer in (plain, graphed):
        layer.router.context = RoutingContext()
    w_y = torch.randn(2, 5, 23)
    masks = [None, None, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
             torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]), None]
    for mask in masks:
        for layer in (plain, graphed):
            layer.router.context.attention_mask = mask
        _steps_agree(plain, graphed, torch.randn(2, 5, 19), w_y)
    # two signatures (without and with token weights), each captured once; the calls after each one's first
    # took the shortcut: without a mask steps 2 and 6, with one steps 4 and 5
    assert len(graphs) == 4 and slow_calls["train"] == 2


def test_no_shortcut_over_an_nf4_base(graphs, slow_calls):
    """An NF4 base reaches the graph through weight_fn (its codes and scales, which the layer's key does not
    hold): each call takes the way through the signature, which does."""
    from mol.quant import NF4Linear

    kw = dict(num_experts=4, top_k=2, rank=3, backend="triton", aux_loss_coef=0.3, z_loss_coef=0.05)
    base = NF4Linear.from_linear(torch.nn.Linear(64, 32))
    plain = MoLLinear(base, **kw)
    with torch.no_grad():
        plain.lora_B.normal_()
    graphed = MoLLinear(copy.deepcopy(base), graph_tokens=64, **kw)
    graphed.load_state_dict(plain.state_dict())
    for step in range(3):
        _steps_agree(plain, graphed, torch.randn(2, 24, 64), torch.randn(2, 24, 32))
    assert slow_calls["train"] == 3 and [g.replays for g in graphs] == [3, 3]
    assert graphed._graphs.replayed is None  # the last call's arguments (its x) are not held past it


def test_no_shortcut_for_a_parametrized_adapter(graphs, slow_calls):
    """A parametrized lora_A (torch.nn.utils.parametrize) is a new tensor every call, not in the layer's parameter
    dict: the key gives up (no KeyError), and each call copies it into the graph as the signature path does."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, a):
            return 2.0 * a

    plain, graphed = _pair()
    for layer in (plain, graphed):
        parametrize.register_parametrization(layer, "lora_A", Doubled())
    for step in range(3):
        _steps_agree(plain, graphed, torch.randn(2, 5, 19), torch.randn(2, 5, 23))
    assert slow_calls["train"] == 3 and [g.replays for g in graphs] == [3, 3]


def test_graphed_layer_compiles_whole_and_leaves_the_shortcut_alone(graphs):
    """torch.compile traces the custom ops, not the graphs (Dynamo's fake tensors have no addresses): a layer with
    graph_tokens compiles with fullgraph=True, matches the ungraphed layer, and remembers nothing."""
    plain, graphed = _pair()
    compiled = torch.compile(graphed, fullgraph=True, backend="eager")
    x, w_y = torch.randn(2, 5, 19), torch.randn(2, 5, 23)
    xp, yp, lp = _step(plain, x, w_y)
    xg, yg, lg_ = _step(compiled, x, w_y)
    lp.backward()
    lg_.backward()
    assert torch.allclose(yg, yp, rtol=1e-5, atol=1e-6) and torch.allclose(xg.grad, xp.grad, rtol=1e-5, atol=1e-6)
    assert not graphs and not graphed._graphs._hits and graphed._graphs.replayed is None


def test_shortcut_steps_aside_for_global_modes(graphs, slow_calls):
    """Modes no key holds: autocast, a pending backward, and a call without gradients in training mode send a
    call past the shortcut to the fused path, which runs the ordinary kernels for them."""
    plain, graphed = _pair()
    x, w_y = torch.randn(6, 19), torch.randn(6, 23)
    for step in range(2):
        _steps_agree(plain, graphed, x, w_y)
    assert slow_calls["train"] == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yp, yg = plain(x), graphed(x)
    assert torch.equal(yp, yg) and yg.dtype == torch.bfloat16 and slow_calls["train"] == 2
    with torch.no_grad():
        assert torch.equal(plain(x), graphed(x))
    assert slow_calls["train"] == 2  # (no-grad calls in training mode do not look for a graph at all)
    gl.EAGER_FAST_PATH = False  # the testing switch that sends eager calls through the custom ops, unreplayed
    try:
        assert torch.equal(plain(x), graphed(x.clone().requires_grad_()))
    finally:
        gl.EAGER_FAST_PATH = True
    assert slow_calls["train"] == 2 and graphs[0].replays == 2
    graphed.disabled = True  # (PEFT's disable_adapters): the base alone
    assert torch.equal(graphed(x.clone().requires_grad_()), graphed.base_layer(x))
    graphed.disabled = False
    x1 = x.clone().requires_grad_()
    graphed(x1)  # its backward pending: the next forward must not overwrite its saved buffers
    graphed(x.clone().requires_grad_())
    assert slow_calls["train"] == 3 and graphs[0].replays == 3


def test_graph_tokens_is_validated():
    with pytest.raises(ValueError, match="graph_tokens"):
        MoLLinear(torch.nn.Linear(4, 4), graph_tokens=-1)
    with pytest.raises(ValueError, match="graph_tokens"):
        MoLConfig(graph_tokens=1.5).validate()
    assert MoLLinear(torch.nn.Linear(4, 4), num_experts=1, graph_tokens=8)._graphs is None  # LoRA: no routed path
    for kw in ({"backend": "torch"}, {"router": "sequence"}):  # paths the graphs never see: said, not ignored
        with pytest.raises(ValueError, match="set graph_tokens=0"):
            MoLLinear(torch.nn.Linear(4, 4), num_experts=4, graph_tokens=8, **kw)


# ----------------------------------------------------------------------------- calls without gradients

def _eval_pair(tokens=4, **kw):
    plain, graphed = _pair(graph_tokens=0, graph_inference_tokens=tokens, **kw)
    return plain.eval(), graphed.eval()


def _agree(plain, graphed, x):
    yp, yg = plain(x), graphed(x)
    assert torch.equal(yg, yp) and torch.equal(graphed.aux_loss(), plain.aux_loss())
    assert torch.equal(graphed._last.expert_ids, plain._last.expert_ids)
    assert torch.equal(graphed._last.gates, plain._last.gates)
    return yg


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_calls_replay_forward_graphs_and_hand_out_fresh_tensors(graphs, mode):
    plain, graphed = _eval_pair()
    kept = []
    with mode():
        for step in range(3):
            x = torch.randn(1, 1, 19)  # a decode step of one sequence
            yg = _agree(plain, graphed, x)
            assert yg.shape == (1, 1, 23)
            kept.append((yg, plain(x), graphed.aux_loss()))
    fwd, = graphs  # one signature, forward only: captured once, replayed every call
    assert fwd.replays == 3 and not graphed._graphs.captured
    for yg, yp, aux in kept[:-1]:  # later replays overwrote none of what the caller kept
        assert torch.equal(yg, yp) and not torch.equal(aux, graphed.aux_loss())
    # an input of another layout reaches the graph through the copy: a (B, S, in) view of (S, B, in) activations
    with mode():
        for _ in range(2):
            x = torch.randn(2, 2, 19).transpose(0, 1)  # 4 tokens, non-contiguous
            _agree(plain, graphed, x)
    assert len(graphs) == 2 and graphs[1].replays == 2 and not x.is_contiguous()


def test_no_grad_graphs_read_weights_in_place(graphs):
    """Parameters are read where they lie, a change in place shows in the next replay; float32 adapters on a bf16
    layer are cast inside the graph (not passed as the cast copies MoLLinear keeps between no-grad calls, which are
    made anew, elsewhere, whenever the adapters change: a new signature each time)."""
    for base_dtype, adapter_dtype in ((torch.float32, None), (torch.bfloat16, "auto")):
        graphs.clear()
        plain, graphed = _eval_pair(dtype=base_dtype, adapter_dtype=adapter_dtype)
        assert graphed.lora_A.dtype == (torch.float32 if adapter_dtype else base_dtype)
        x = torch.randn(2, 19, dtype=base_dtype)
        with torch.no_grad():
            _agree(plain, graphed, x)
            for layer in (plain, graphed):
                layer.lora_B.add_(0.25)
                layer.router.weight.mul_(-1.0)
                layer.base_layer.weight.add_(0.5)
            _agree(plain, graphed, x)
            _agree(plain, graphed, x)
        assert len(graphs) == 1 and graphs[0].replays == 3


def test_no_grad_graphs_limits(graphs):
    plain, graphed = _eval_pair(tokens=2)
    with torch.no_grad():
        _agree(plain, graphed, torch.randn(3, 19))  # over graph_inference_tokens: ordinary kernels
        graphed.train(), plain.train()
        _agree(plain, graphed, torch.randn(2, 19))  # training mode, no grad: a reentrant checkpoint's first pass
    assert not graphs
    x = torch.randn(2, 19, requires_grad=True)  # training calls are graph_tokens' (0 here)
    graphed(x).sum().backward()
    assert not graphs
    graphed.eval(), plain.eval()
    with torch.no_grad():
        for t in (1, 2):
            for dtype in (torch.float32, torch.bfloat16):
                graphed.to(dtype), plain.to(dtype)
                _agree(plain, graphed, torch.randn(t, 19, dtype=dtype))
        assert len(graphs) == lg.MAX_SIGNATURES
        graphed.half(), plain.half()
        with pytest.warns(UserWarning, match="graph_inference_tokens=2"):
            _agree(plain, graphed, torch.randn(1, 19, dtype=torch.float16))
    assert len(graphs) == lg.MAX_SIGNATURES


def test_graph_inference_tokens_is_validated_copied_and_injected(graphs):
    import mol

    with pytest.raises(ValueError, match="graph_inference_tokens"):
        MoLLinear(torch.nn.Linear(4, 4), graph_inference_tokens=-1)
    with pytest.raises(ValueError, match="graph_inference_tokens"):
        MoLConfig(graph_inference_tokens=True).validate()
    with pytest.raises(ValueError, match="set graph_inference_tokens=0"):
        MoLLinear(torch.nn.Linear(4, 4), num_experts=4, graph_inference_tokens=8, backend="torch")
    model = mol.inject(torch.nn.Sequential(torch.nn.Linear(19, 23), torch.nn.ReLU(), torch.nn.Linear(23, 19)),
                       MoLConfig(num_experts=4, rank=3, backend="triton", graph_inference_tokens=2))
    model.eval()
    layer = model[0]
    assert layer.graph_inference_tokens == 2 and "graph_inference_tokens=2" in repr(layer)
    with torch.no_grad():
        model(torch.randn(2, 19))
    assert len(graphs) == 2
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._graphs.inference_tokens == 2 and not clone._graphs.inference
    mol.clear_graphs(model)
    assert not layer._graphs.inference


# an attention and an MLP projection of each of the 2 layers: the interpreted Triton decode of all 14 linear layers
# took 140 s of CI for the same assertions
DECODE_TARGETS = ["q_proj", "down_proj"]


def test_generation_with_decode_graphs_matches_eager(graphs, tiny_llama):
    """The user's case: Hugging Face generate() on a MoL model with graph_inference_tokens = the batch size. The
    decode steps replay the graphs, the prompt runs the ordinary kernels, and the tokens and logits equal the same
    model's without graphs."""
    import mol

    pytest.importorskip("transformers")
    ids = torch.randint(0, 101, (2, 5))
    outs = []
    for tokens in (0, 2):
        model = copy.deepcopy(tiny_llama)
        torch.manual_seed(0)  # the same adapters in both
        mol.inject(model, MoLConfig(num_experts=4, rank=4, backend="triton", graph_inference_tokens=tokens,
                                    target_modules=DECODE_TARGETS))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        model.eval()
        out = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        outs.append((out.sequences, torch.stack(out.logits)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    layers = [m for m in model.modules() if isinstance(m, MoLLinear)]
    # one signature per layer, the decode step's 2 tokens: captured on the first, replayed on the other two
    assert len(graphs) == len(layers) == 4 and all(g.replays == 3 for g in graphs)


def test_set_graphs_turns_decode_graphs_on_for_a_loaded_adapter(graphs, tiny_llama, tmp_path):
    """An adapter trained without graphs, loaded for generation: mol.set_graphs(model, graph_inference_tokens=B)
    makes the decode steps replay graphs with the tokens and logits of eager generation. A model injected with
    graph settings loads an adapter saved without them (they say how the layers run, not what they compute); a bad
    setting is refused before any layer changes."""
    import mol

    pytest.importorskip("transformers")
    torch.manual_seed(0)
    trained = mol.inject(copy.deepcopy(tiny_llama), MoLConfig(num_experts=4, rank=4, backend="triton",
                                                              target_modules=DECODE_TARGETS))
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    mol.save_adapter(trained, tmp_path)
    ids = torch.randint(0, 101, (2, 5))

    def generate(model):
        out = model.eval().generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)
    want = generate(trained)
    assert not graphs

    loaded = mol.load_adapter(copy.deepcopy(tiny_llama), tmp_path)
    layers = [m for m in loaded.modules() if isinstance(m, MoLLinear)]
    for bad, match in (({"graph_inference_tokens": -2}, "graph_inference_tokens must be an integer"),
                       ({"graph_tokens": 1.5}, "graph_tokens must be an integer")):
        with pytest.raises(ValueError, match=match):
            mol.set_graphs(loaded, **bad)
        assert all(m._graphs is None for m in layers)
    assert mol.set_graphs(loaded, graph_inference_tokens=2) is loaded
    assert all(m.graph_inference_tokens == 2 and m.graph_tokens == 0 and m._graphs.inference_tokens == 2
               for m in layers)
    assert loaded.mol_configs[0].graph_inference_tokens == 2
    got = generate(loaded)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(graphs) == len(layers) == 4 and all(g.replays == 3 for g in graphs)
    mol.set_graphs(loaded, graph_inference_tokens=0)  # off again: the captured graphs are dropped
    assert all(m._graphs is None for m in layers)

    # the other way round: a model injected with graphs loads the adapter saved without them, and keeps its settings
    graphs.clear()
    injected = mol.inject(copy.deepcopy(tiny_llama), MoLConfig(num_experts=4, rank=4, backend="triton",
                                                               graph_inference_tokens=2, target_modules=DECODE_TARGETS))
    mol.load_adapter(injected, tmp_path)
    got = generate(injected)
    assert torch.equal(got[0], want[0]) and len(graphs) == 4
    with pytest.raises(ValueError, match="already carries a different adapter"):  # what it computes still counts
        mol.load_adapter(mol.inject(copy.deepcopy(tiny_llama), MoLConfig(num_experts=4, rank=8)), tmp_path)
    with pytest.raises(ValueError, match="no routed MoL layer"):
        mol.set_graphs(mol.inject(copy.deepcopy(tiny_llama), mol.LoRAConfig(rank=4)), graph_inference_tokens=2)
    with pytest.raises(ValueError, match="set graph_inference_tokens=0"):  # the reference path is never captured
        mol.set_graphs(mol.inject(copy.deepcopy(tiny_llama), MoLConfig(num_experts=4, rank=4, backend="torch")),
                       graph_inference_tokens=2)
    # a sequence router's layers (after the attention's in module order) refuse it, and the top-k ones stay as
    # they were: every layer is checked before any changes
    mixed = mol.inject(copy.deepcopy(tiny_llama), [MoLConfig(num_experts=4, rank=4, target_modules=["q_proj"]),
                                                   MoLConfig(num_experts=4, rank=4, router="sequence",
                                                             target_modules=["up_proj"])])
    with pytest.raises(ValueError, match="router='sequence'"):
        mol.set_graphs(mixed, graph_inference_tokens=2)
    assert all(m._graphs is None and m.graph_inference_tokens == 0 for m in mixed.modules()
               if isinstance(m, MoLLinear))
    assert [c.graph_inference_tokens for c in mixed.mol_configs] == [0, 0]
