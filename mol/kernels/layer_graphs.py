"""Per-layer CUDA graphs: a routed MoL layer's training forward and backward, captured once per shape.

Why: at a few hundred tokens a step, an eager MoLLinear is bound by the CPU, not the GPU. Its fwd+bwd is about
a dozen launches plus an autograd node, ~0.6-1.3 ms of host time on an H200 host against ~0.1 ms of GPU work
at T=512 (benchmarks/RESULTS.md), so a model of such layers runs at the speed of Python. Replaying a captured
graph costs one launch. ``MoLLinear(graph_tokens=N)`` (``MoLConfig.graph_tokens``) turns this on for training
calls of at most N tokens; the step itself stays eager (optimizer, loss, hooks, DDP all unchanged).

How, as torch.cuda.make_graphed_callables does it, per layer and call signature (shapes, dtypes, which inputs
need a gradient, the addresses of the weights):

    first call   warm up the kernels on a side stream (Triton autotuning and cuBLAS set-up cannot be captured),
                 capture the forward, then the backward, into one private memory pool
    forward      copy x (and x_lora / base_out / noise, and any weight that is not an nn.Parameter, such as
                 autocast's bf16 copy of an fp32 lora_A) into the static inputs, replay, clone y and aux out
    backward     copy dy and daux into the static inputs, replay, clone the gradients out

What the caller gets is always a fresh tensor for y, aux and every gradient, so nothing it keeps is overwritten
by the next replay. The routing tensors (hl, gates, ids, stats) are returned as views of the graph's buffers:
like the layer's ``_last``, they describe the last forward.

One captured pair holds one set of saved activations, so a second forward of the same layer before the first
one's backward (a module called twice in a step, a kept graph) runs the ordinary kernels instead; a backward
whose saved buffers a later replay overwrote (``retain_graph=True`` across another forward) raises, as does one
whose weights were changed in place or moved since its forward (where eager autograd would raise for a saved
tensor modified in place; the graph reads weights at the addresses it was captured with).
Calls without gradients (``MoLLinear(graph_inference_tokens=N)``: generation's decode steps, evaluation; in eval
mode) have graphs of their own, forward only: x copied in, one replay, y and aux cloned out. Every weight is read
in place, at the address the call's signature holds, so nothing but the activations is copied; adapters of
another dtype (float32 on a bf16 layer) are cast inside the graph, from the parameters, as in training (at decode
sizes, T <= routed_lora.SMALL_T_MAX, the one-launch forward rounds them as it reads them: no cast kernels). An eager
decode step of a MoL layer is otherwise bound by the host: its Python and one Triton launch of ~30 arguments
against a GEMV of ~10 µs.
Inside an activation checkpoint (or under saved-tensor offloading) the layer runs the ordinary kernels: see
``_checkpointed``. Memory: each captured signature keeps about (2*in + 2*out) * T elements of static buffers plus the routing
tensors, in its own pool; a layer captures at most ``MAX_SIGNATURES`` and runs the ordinary kernels for others.
"""
from __future__ import annotations

import math
import sys
import warnings
import weakref
from typing import Any, Callable, Optional

import torch

# routed_lora_linear's tensor inputs are (x, x_lora, weight, bias, base_out, lora_A, lora_B, router_w, noise,
# token_weights);
_PER_CALL = (0, 1, 4, 8, 9)  # the activations among them: new every call, copied into static buffers
MAX_SIGNATURES = 4


def _copied(args: tuple) -> tuple[int, ...]:
    """The inputs copied into static buffers every call: the activations, and any weight that is not an
    nn.Parameter (a copy cast for autocast, an FSDP view): made anew each call, it may sit anywhere."""
    return tuple(i for i, t in enumerate(args)
                 if t is not None and (i in _PER_CALL or not isinstance(t, torch.nn.Parameter)))


def _signature(args: tuple, copied: tuple[int, ...], weight_fn: Optional[Callable], meta: tuple) -> Optional[tuple]:
    """What a captured graph depends on, or None where it cannot be captured."""
    key: list[Any] = [meta, copied]
    for i, t in enumerate(args):
        if t is None:
            key.append(None)
            continue
        # parameters are read in place by the graph, so their addresses (and layouts) are part of the signature
        ptr = None if i in copied else t.data_ptr()
        key.append((tuple(t.shape), t.stride(), t.dtype, t.requires_grad, ptr))
    if weight_fn is not None:
        owner = getattr(weight_fn, "__self__", None)
        if not isinstance(owner, torch.nn.Module):
            return None  # an opaque callable: what it reads cannot be checked between calls
        key.append((weight_fn.__func__, tuple(b.data_ptr() for b in owner.buffers()),
                    tuple(p.data_ptr() for p in owner.parameters())))
    return tuple(key)


def _saved_tensor_hooks_set() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    except TypeError:  # torch < 2.5 takes no argument
        return torch._C._autograd._top_saved_tensors_default_hooks() is not None


def _checkpointed() -> bool:
    """Inside an activation checkpoint (or CPU offload of saved tensors): saved-tensor hooks are set (a
    non-reentrant checkpoint's forward), or autograd's engine is running a backward on this thread (either kind's
    recompute). A replay saves nothing through autograd, so a non-reentrant checkpoint's recompute, which runs
    the ordinary kernels while the replayed forward waits for its backward, would not save what the first pass
    did; and the static buffers hold on the GPU what checkpointing and offloading exist to free."""
    return torch._C._current_graph_task_id() != -1 or _saved_tensor_hooks_set()


def _capturable(x: torch.Tensor) -> bool:
    # not inside a capture of the caller's own (a whole step in one graph): captures do not nest
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


_WARM_UP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warm_up(step: Callable[[], Any], device: torch.device) -> None:
    """Run ``step`` once on a side stream: Triton compiles and autotunes, cuBLAS sets up its workspace, and none
    of that can happen under capture. One side stream per device for every layer: cuBLAS keeps a workspace
    (tens of MiB) for each stream it ran on, so a stream per capture would keep one per layer."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _WARM_UP_STREAMS.get(index)
    if side is None:
        side = _WARM_UP_STREAMS[index] = torch.cuda.Stream(device=index)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)


def _new_pool() -> Any:
    return torch.cuda.graph_pool_handle()


def _capture(step: Callable[[], Any], pool: Any) -> tuple[Any, Any]:
    """(graph, step's outputs): step's launches captured into a new CUDA graph whose memory comes from pool."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the capture happens inside a training step, where other threads (a DataLoader's pin-memory
    # thread, a logger) may call CUDA; only this thread's calls can break it
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = step()
    return graph, out


def _static_inputs(args: tuple, copied: tuple[int, ...]) -> list:
    """A captured step's inputs: what is copied in every call gets a buffer of its own, filled from this call;
    parameters are used in place. The activations' buffers are dense, so that the (T, n) views the captured steps
    read exist (a permuted x has none: its reshape would be a copy made once, at capture); a weight's keep its
    layout (lora_B's is expert-interleaved)."""
    static = [(torch.empty(t.shape, dtype=t.dtype, device=t.device) if i in _PER_CALL else torch.empty_like(t))
              if i in copied else t for i, t in enumerate(args)]
    with torch.no_grad():  # a copy under grad mode would tie the static buffer to the caller's autograd graph
        for i in copied:
            static[i].copy_(args[i])
    return static


class _Captured:
    """One signature's forward and backward graphs, their static inputs and outputs."""

    def __init__(self, args: tuple, copied: tuple[int, ...], weight_fn: Optional[Callable], meta: tuple,
                 need: tuple[bool, ...]):
        from mol.kernels.routed_lora import _flat, _routed_backward, _routed_forward_saved

        self.copied = copied
        self.generation = 0
        self.pending: Optional[weakref.ref] = None
        self.static_in = _static_inputs(args, copied)
        x = args[0]
        n_out = args[6].shape[1]
        # x, x_lora, base_out and dy keep the caller's leading dims; the captured steps read (T, n) views of them
        self.static_dy = torch.zeros(*x.shape[:-1], n_out, device=x.device, dtype=x.dtype)
        self.static_daux = torch.zeros((), device=x.device, dtype=torch.float32)
        (sx, sxl, sw, sb, sbo, sa, sbb, swr, sn, stw) = self.static_in
        sx, sxl, sbo, sdy = _flat(sx), _flat(sxl), _flat(sbo), _flat(self.static_dy)

        def forward():
            return _routed_forward_saved(sx, sxl, sw, weight_fn, sb, sbo, sa, sbb, swr, sn, stw, meta, need[0])

        def backward(saved):
            return _routed_backward(sdy, self.static_daux, saved, need, weight_fn, meta)

        with torch.no_grad():  # as inside an autograd.Function: the kernels' tensors record no graph
            _warm_up(lambda: backward(forward()[1]), x.device)
            pool = _new_pool()
            self.fwd_graph, (self.static_out, saved) = _capture(forward, pool)
            self.bwd_graph, self.static_grads = _capture(lambda: backward(saved), pool)
        self.saved = saved  # the forward's saved activations: they live in the pool, read by the backward graph
        # what each call clones out, in the caller's shapes (y: x's leading dims; dx, dx_lora: x's shape)
        y = self.static_out[0]
        self.y_out = y.view(*x.shape[:-1], y.shape[-1])
        self.dx_out = [None if g is None else g.view(x.shape) for g in self.static_grads[:2]]

    def busy(self) -> bool:
        """True while a replayed forward still waits for its backward (its saved buffers are in use)."""
        ctx = self.pending() if self.pending is not None else None
        return ctx is not None and not getattr(ctx, "backward_done", False)


class _CapturedForward:
    """One signature's forward graph for calls without gradients (generation, evaluation): no backward, nothing
    saved. Only the activations are copied in; every weight is read in place, at the address its signature holds
    (adapters of another dtype than x's are cast inside the graph, or at small T rounded by the kernel itself)."""

    def __init__(self, args: tuple, copied: tuple[int, ...], weight_fn: Optional[Callable], meta: tuple):
        from mol.kernels.routed_lora import _compute_dtype, _flat, _routed_forward

        self.copied = copied
        self.static_in = _static_inputs(args, copied)
        (sx, sxl, sw, sb, sbo, sa, sbb, swr, sn, stw) = self.static_in
        sx, sxl, sbo = _flat(sx), _flat(sxl), _flat(sbo)

        def forward():
            a, b = _compute_dtype(sa, sbb, sx, sxl, stw, meta[5], grad=False)
            y, aux, hl, gates, ids, _, stats, _, _ = _routed_forward(sx, sxl, sw, weight_fn, sb, sbo, a, b, swr, sn,
                                                                     stw, meta)
            return y, aux, hl, gates, ids, stats

        x = args[0]
        _warm_up(forward, x.device)
        self.graph, self.static_out = _capture(forward, _new_pool())
        y = self.static_out[0]
        self.y_out = y.view(*x.shape[:-1], y.shape[-1])
        self.replays = 0

    def __call__(self, args: tuple) -> tuple:
        for i in self.copied:
            self.static_in[i].copy_(args[i])
        self.graph.replay()
        self.replays += 1
        _, aux, hl, gates, ids, stats = self.static_out
        # y and aux are the caller's to keep; the routing tensors describe the last forward, as in training
        return self.y_out.clone(), aux.clone(), hl, gates, ids, stats


class _GraphedRoutedFn(torch.autograd.Function):
    """_RoutedLoRAFn's contract, computed by replaying a _Captured pair."""

    @staticmethod
    def forward(ctx, cap: _Captured, *args):
        for i in cap.copied:
            cap.static_in[i].copy_(args[i])
        cap.fwd_graph.replay()
        cap.generation += 1
        ctx.cap, ctx.generation, ctx.backward_done = cap, cap.generation, False
        # the weights the backward graph reads in place: what an eager backward's saved tensors would pin down
        ctx.weights = [t for i, t in enumerate(args) if t is not None and i not in cap.copied]
        ctx.weight_state = [(t.data_ptr(), t._version) for t in ctx.weights]
        cap.pending = weakref.ref(ctx)
        _, aux, hl, gates, ids, stats = cap.static_out
        routing = tuple(t.detach() for t in (hl, gates, ids, stats))
        ctx.mark_non_differentiable(*routing)
        ctx.set_materialize_grads(False)
        return (cap.y_out.clone(), aux.clone(), *routing)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, daux, _dhl, _dgates, _dids, _dstats):
        cap = ctx.cap
        if ctx.generation != cap.generation:
            raise RuntimeError(
                "MoLLinear (graph_tokens): this backward's saved activations were overwritten by a later forward of "
                "the same layer (a backward with retain_graph=True run again after another forward). Run the layer "
                "without captured graphs for this (graph_tokens=0).")
        if [(t.data_ptr(), t._version) for t in ctx.weights] != ctx.weight_state:
            raise RuntimeError(
                "MoLLinear (graph_tokens): a weight of this layer was modified in place or moved (e.g. FSDP "
                "resharding) between its forward and backward; its captured backward would read the new values. "
                "Run the layer without captured graphs for this (graph_tokens=0).")
        ctx.backward_done = True
        if dy is None:
            cap.static_dy.zero_()
        else:
            cap.static_dy.copy_(dy)
        if daux is None:
            cap.static_daux.zero_()
        else:
            cap.static_daux.copy_(daux)
        cap.bwd_graph.replay()
        _, _, d_base, dA, dB, dWr = cap.static_grads
        dx, dx_lora, dA, dB, dWr = (None if g is None else g.clone() for g in (*cap.dx_out, dA, dB, dWr))
        # base_out's gradient is dy itself (the graph's is the static copy of it): no clone needed
        return None, dx, dx_lora, None, None, dy if d_base is not None else None, dA, dB, dWr, None, None


class LayerGraphs:
    """One layer's captured signatures (see the module docstring). ``max_tokens``: the largest T captured for
    training calls; ``inference_tokens``: the largest T captured for calls without gradients (0: none)."""

    def __init__(self, max_tokens: int, inference_tokens: int = 0):
        self.max_tokens = int(max_tokens)
        self.inference_tokens = int(inference_tokens)
        self.captured: dict[tuple, _Captured] = {}
        self.inference: dict[tuple, _CapturedForward] = {}
        self._warned: set[int] = set()  # the tables (by id) whose full-table warning was given
        # the call being made, if it replayed a graph, for the layer's shortcut: (capture, its args), set by apply
        # and apply_inference, cleared by replay_hit before the call's way there and by remember after it (so no
        # call's activations are held past it)
        self.replayed: Optional[tuple] = None
        self._hits: dict[tuple, tuple] = {}

    def _find(self, table: dict, limit: int, args: tuple, copied: tuple[int, ...], weight_fn: Optional[Callable],
              meta: tuple, full: Callable[[], str]) -> Optional[tuple]:
        """(key, its capture or None) for a call that may replay one of ``table``'s graphs; None where it runs the
        ordinary kernels: more than ``limit`` tokens, a capture in progress, activation checkpointing, an opaque
        weight_fn, or a new signature with the table full (then warns once per table, with ``full()``: composed
        only then, not on every call)."""
        x = args[0]
        # x is (..., in): its tokens, not its first dim (as routed_lora_linear counts them)
        if not (0 < math.prod(x.shape[:-1]) <= limit and _capturable(x)) or _checkpointed():
            return None
        key = _signature(args, copied, weight_fn, meta)
        if key is None:
            return None
        # buffers made under inference_mode can only be written under it, and the reverse
        key = (key, torch.is_inference_mode_enabled())
        cap = table.get(key)
        if cap is None and len(table) >= MAX_SIGNATURES:
            if id(table) not in self._warned:
                self._warned.add(id(table))
                warnings.warn(full(), stacklevel=5)
            return None
        return key, cap

    def apply(self, args: tuple, weight_fn: Optional[Callable], meta: tuple, need: tuple[bool, ...]):
        """The graphed forward's outputs (y, aux, hl, gates, ids, stats), or None where this call runs the
        ordinary kernels: see _find, and a pending backward."""
        copied = _copied(args)
        found = self._find(self.captured, self.max_tokens, args, copied, weight_fn, meta, lambda: (
            f"MoLLinear (graph_tokens={self.max_tokens}): this layer has captured {MAX_SIGNATURES} call signatures "
            "(token counts, dtypes, weight addresses) and runs the ordinary kernels for new ones. Pad batches to a "
            "few fixed lengths to keep the graphs in use."))
        if found is None:
            return None
        key, cap = found
        if cap is None:
            cap = self.captured[key] = _Captured(args, copied, weight_fn, meta, need)
        elif cap.busy():
            return None
        self.replayed = (cap, args)
        return _GraphedRoutedFn.apply(cap, *args)

    def apply_inference(self, args: tuple, weight_fn: Optional[Callable], meta: tuple):
        """For a call without gradients: the forward's outputs (y, aux, hl, gates, ids, stats) replayed from a
        captured forward graph, or None where it runs the ordinary kernels (see _find)."""
        copied = tuple(i for i in _PER_CALL if args[i] is not None)
        found = self._find(self.inference, self.inference_tokens, args, copied, weight_fn, meta, lambda: (
            f"MoLLinear (graph_inference_tokens={self.inference_tokens}): this layer has captured {MAX_SIGNATURES} "
            "no-grad call signatures (token counts, dtypes, weight addresses) and runs the ordinary kernels for new "
            "ones. Set graph_inference_tokens to the decode batch size, below the prompt lengths, so that only "
            "decode steps are captured."))
        if found is None:
            return None
        key, cap = found
        if cap is None:
            cap = self.inference[key] = _CapturedForward(args, copied, weight_fn, meta)
        self.replayed = (cap, args)
        return cap(args)

    # The shortcut. A replayed call spends most of its host time on the way to the replay: the layer's branches,
    # the fused function's checks, the signature above (~40 of ~145 us a training step on a 2-core CPU,
    # benchmarks/host_overhead.py --graph). A layer that can say in one tuple everything that choice depends on
    # (its key: x's layout, the grad / inference / training modes, its tensors by identity, address, dtype,
    # layout and requires_grad, its settings) remembers the capture a call replayed under that call's key, if the
    # call passed the arguments the layer says it would (its parameters, and token weights or None). A later call
    # with an equal key replays that capture with its own arguments directly, after the checks that no key holds:
    # the global modes that send a call to the ordinary kernels, and a pending backward.

    def remember(self, key: Optional[tuple], rest: Optional[tuple]) -> None:
        """After a layer's call: if it replayed a capture, passing x and then exactly ``rest`` (object for object),
        keep that capture for calls with an equal ``key`` (None: keep nothing)."""
        replayed, self.replayed = self.replayed, None
        if replayed is None or key is None or len(rest) != len(replayed[1]) - 1 or not all(
                a is b for a, b in zip(rest, replayed[1][1:])):
            return
        if len(self._hits) >= 4 * MAX_SIGNATURES:  # keys of replaced parameters: drop them, and what they hold
            self._hits.clear()
        self._hits[key] = replayed[0]

    def replay_hit(self, key: tuple, x: torch.Tensor, rest: tuple) -> Optional[tuple]:
        """The outputs (y, aux, hl, gates, ids, stats) of the capture remembered under ``key``, replayed with
        arguments (x, *rest); None where there is none, or where a global mode or a pending backward sends this
        call elsewhere."""
        self.replayed = None  # (what a call that raised before its remember left)
        cap = self._hits.get(key)
        if cap is None:
            return None
        # the conditions routed_lora_linear's own way checks (grouped_lora._use_fast_path, _find) on every call;
        # grouped_lora is loaded by now (a capture ran its kernels), and is read here without an import statement's
        # cost on every call
        if (not sys.modules["mol.kernels.grouped_lora"].EAGER_FAST_PATH or torch.compiler.is_compiling()
                or not _capturable(x) or _checkpointed()
                or torch.is_autocast_enabled(x.device.type) or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active()):
            return None
        if isinstance(cap, _CapturedForward):
            return cap((x, *rest))
        if cap.busy():
            return None
        return _GraphedRoutedFn.apply(cap, x, *rest)

    def clear(self) -> None:
        """Drop every captured graph and its memory pool."""
        self.captured.clear()
        self.inference.clear()
        self.replayed = None
        self._hits.clear()

    # A copied or pickled layer (EMA copies, torch.save(model)) starts with no graphs: they hold addresses
    # of the original's buffers and cannot be copied.
    def __deepcopy__(self, memo: dict) -> "LayerGraphs":
        return LayerGraphs(self.max_tokens, self.inference_tokens)

    def __getstate__(self) -> dict:
        return {"max_tokens": self.max_tokens, "inference_tokens": self.inference_tokens}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_tokens"], state.get("inference_tokens", 0))
