"""MoLLinear: a frozen base linear plus a pool of routed LoRA experts. One expert and no router is LoRA.

Forward, top to bottom (T tokens, in-features k, out-features d, E experts, rank r, K chosen per token):

    out   = base_layer(x)                               # frozen; nn.Linear or NF4Linear
    gates, expert_ids = router(x)                       # (T, K) each, float32 scores
    out  += scale * sum_k gates[:, k] * B[e] @ A[e] @ dropout(x)     (dispatch.routed_linear)

with ``lora_A``: "e r k", ``lora_B``: "e d r", ``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mol import dispatch
from mol.config import ROUTERS, default_top_k, is_number, is_whole, nonnegative_number_problem
from mol.routers import FusedRouterOutput, Router, RouterOutput, in_backward, keep_state


class AdapterLayer(nn.Module):
    """Base of every module that wraps a frozen ``base_layer`` with a trainable delta.

    Subclasses implement ``merge``/``unmerge`` where the delta folds into the frozen weight, and
    ``merge_blocker`` to say why it cannot.
    """

    base_layer: nn.Module
    merged: bool = False
    # set by mol.disable_adapters: the layer computes as if it were not there (its adapter tensors untouched)
    disabled: bool = False

    # Model code reads ``weight`` / ``bias`` of the linears it built (T5 compares its activations' dtype with
    # ``wo.weight``'s): a wrapped layer answers with its frozen base's, as PEFT's tuner layers do.
    @property
    def weight(self) -> Tensor:
        """The frozen base layer's weight."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The frozen base layer's bias (None if it has none)."""
        return getattr(self.base_layer, "bias", None)

    def merge_blocker(self) -> Optional[str]:
        """None if ``merge`` can run, else the reason it cannot (shown to the user)."""
        return f"{type(self).__name__} does not support merging"

    def merge(self) -> None:
        """Fold the delta into the base weight (the layer then computes the base alone); raises if it cannot."""
        raise NotImplementedError(self.merge_blocker())

    def unmerge(self) -> None:
        """Subtract a merged delta from the base weight again."""
        raise NotImplementedError(self.merge_blocker())


class _DeferredAuxLoss(torch.autograd.Function):
    """The router loss of a forward that ran without autograd, as a leaf of the caller's loss: its backward
    records the gradient it receives on the layer, for the recomputed forward to apply (_AuxLossThroughOutput).

    Reentrant activation checkpointing (``use_reentrant=True``: transformers 4's default, PEFT's
    prepare_model_for_kbit_training) runs a layer's forward under no_grad and recomputes it with autograd inside
    the backward, from the checkpointed block's outputs only. A loss stashed on the module (``aux_loss``) is then
    a constant, and ``task_loss + mol.aux_loss(model)`` would silently leave the router untrained by it. Recording
    the gradient here costs nothing: these nodes are created after the forward, so the engine runs them before
    the checkpointed blocks that recompute."""

    @staticmethod
    def forward(ctx, aux: Tensor, anchor: Tensor, layer: "MoLLinear") -> Tensor:
        ctx.layer = layer  # anchor: a trainable router parameter, so that autograd makes this node at all
        return aux.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        layer = ctx.layer
        layer._aux_grad = grad if layer._aux_grad is None else layer._aux_grad + grad
        return None, None, None


class _AuxLossThroughOutput(torch.autograd.Function):
    """Identity on a layer's output whose backward also sends ``grad`` into the router loss ``aux``: how a
    forward recomputed by a reentrant checkpoint applies the gradient its _DeferredAuxLoss received (the
    checkpoint backpropagates from the block's outputs only, so the loss must hang off one). It returns a copy, not
    a view: autograd forbids in-place ops on a custom Function's view output, and models add to a layer's output in
    place (Falcon's parallel attention: ``mlp_output += attention_output``)."""

    @staticmethod
    def forward(ctx, out: Tensor, aux: Tensor, grad: Tensor) -> Tensor:
        ctx.aux_dtype, ctx.grad = aux.dtype, grad
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, ctx.grad.to(ctx.aux_dtype), None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its family): a linear layer that stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _linear_shape(base: nn.Module) -> tuple[int, int]:
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.nf)
    try:
        return int(base.in_features), int(base.out_features)
    except AttributeError:
        raise TypeError(f"MoLLinear wraps a linear layer with in_features/out_features (nn.Linear, NF4Linear or "
                        f"transformers' Conv1D), got {type(base).__name__}") from None


_PLAIN = (Tensor, nn.Parameter)


def not_full_precision(base: nn.Module) -> Optional[str]:
    """None if ``base`` holds its weight as a plain floating tensor of the layer's own shape, (out, in) or (in, out)
    for Conv1D, else what it holds instead. A quantized base holds something else there (NF4Linear packed codes;
    bitsandbytes' Linear4bit, an nn.Linear subclass, packed uint8 codes; its Linear8bitLt int8 codes of the
    weight's shape; torchao a tensor subclass), which neither a merged delta nor NF4 quantization may be written
    over."""
    w = getattr(base, "weight", None)
    if isinstance(base, nn.Linear) or is_conv1d(base):
        n_in, n_out = _linear_shape(base)
        if (type(w) in _PLAIN and w.is_floating_point()
                and tuple(w.shape) == ((n_in, n_out) if is_conv1d(base) else (n_out, n_in))):
            return None
    if isinstance(w, Tensor):
        return (f"the base {type(base).__name__} holds a {type(w).__name__} of {w.dtype} {tuple(w.shape)} as its "
                "weight, not a full-precision one")
    return f"the base {type(base).__name__} is not a full-precision linear layer"


def linear_forward_problem(module: nn.Module, compare_values: bool = True) -> Optional[str]:
    """None if ``module`` computes ``x @ weight.T + bias`` as an nn.Linear does, else how its forward differs.
    ``compare_values=False`` asks only for one output tensor of the linear's shape, what an adapter added to the
    output needs: inject asks that, so a subclass whose values differ (torchao's QAT ``FakeQuantizedLinear``, which
    fake-quantizes its weight) is adapted as PEFT adapts it; ``mol.quantize`` compares the values too, since an
    NF4Linear in the layer's place computes the plain product.

    Only an nn.Linear subclass with a forward of its own, holding a full-precision weight, is looked at: Llama 4's
    and PhiMoE's routers subclass nn.Linear and return a tuple (scores, logits): an adapter added to their output
    fails. DeepSeek-V4's grouped projection computes a block-diagonal product: an NF4Linear in its place would drop
    its forward. The class's forward is run once on a (2, in_features) input in eval mode (a router's input jitter
    is a training-only noise); a layer accelerate offloads is brought in by its hook for that call, as for a
    forward; on a model built on the meta device with no weights anywhere only the output's shape can be compared
    (a subclass of the right shape is then taken as linear); a quantized subclass (bitsandbytes' Linear4bit) holds
    codes, not the weight the comparison needs, and is taken at its word."""
    if (not isinstance(module, nn.Linear) or type(module).forward is nn.Linear.forward
            or not_full_precision(module) is not None):
        return None
    w = module.weight
    # accelerate's offload (device_map with "cpu" / "disk") keeps the weights on meta and brings them in around each
    # forward through the layer's hook: do as that forward does, else only the shape could be compared there, and
    # "all-linear" would pick other layers on an offloaded model than on the same model in memory
    hook = getattr(module, "_hf_hook", None)
    onload = w.device.type == "meta" and callable(getattr(hook, "pre_forward", None))
    x = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(w.dtype) if onload else x.to(w.device, w.dtype)  # the hook moves x to its execution device
    training = module.training
    try:
        module.eval()
        with torch.no_grad():  # the class's own forward: no hooks of the model's (output recorders) see this call
            if onload:
                (x,), _ = hook.pre_forward(module, x)
            out = type(module).forward(module, x)
            # the reference, while an offloaded weight is in (no_grad: else a graph through the trainable weight)
            want = None if module.weight.device.type == "meta" else F.linear(x, module.weight, module.bias)
    except Exception as e:  # a forward that needs other inputs or shapes is no plain linear map either
        return f"its forward fails on a (2, in_features) input ({type(e).__name__}: {str(e)[:80]})"
    finally:
        if onload:
            hook.post_forward(module, torch.empty(0))  # offloads the weights again
        module.train(training)
    if not isinstance(out, Tensor):
        return f"its forward returns a {type(out).__name__}, not one output tensor"
    if tuple(out.shape) != (2, module.out_features):
        return (f"its forward maps a (2, {module.in_features}) input to {tuple(out.shape)}, not "
                f"(2, {module.out_features})")
    if want is not None and compare_values:
        if not torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-6):
            return "its forward computes something other than x @ weight.T + bias"
    return None


def dense_weight_blocker(base: nn.Module) -> Optional[str]:
    """None if a delta can be folded into ``base``'s weight in place, else why not (see not_full_precision):
    a float delta written into a quantized weight would re-quantize it or corrupt its codes."""
    what = not_full_precision(base)
    return None if what is None else (f"{what}; merging into a quantized weight would re-quantize it (or write into "
                                      "its codes) and lose the adapter's precision: keep the adapter unmerged, or "
                                      "merge it into the full-precision model")


_HALF = (torch.float16, torch.bfloat16)


def _tensor_key(t: Optional[Tensor]) -> Optional[tuple]:
    return None if t is None else (id(t), t.data_ptr(), t.dtype, t.shape, t.stride(), t.requires_grad)


def _detached(obj: Any) -> Any:
    """A shallow copy of obj whose tensor attributes are detached from autograd."""
    out = copy.copy(obj)
    for name, value in vars(out).items():
        if isinstance(value, Tensor) and (value.requires_grad or value.grad_fn is not None):
            setattr(out, name, value.detach())
    return out


def adapter_dtype_for(choice: Union[None, str, torch.dtype], base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a layer's adapter tensors: ``None`` / ``"base"`` the base's, ``"auto"`` float32 on a 16-bit
    base (PEFT's default: a 16-bit weight drops AdamW steps below ~1/256 of itself) and the base's otherwise,
    or a dtype (object or name) as given."""
    if choice is None or choice == "base":
        return base_dtype
    if choice == "auto":
        return torch.float32 if base_dtype in _HALF else base_dtype
    dtype = getattr(torch, choice, None) if isinstance(choice, str) else choice
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"adapter_dtype={choice!r} is not a floating dtype; use 'auto', 'base', 'float32', "
                         f"'bfloat16' or 'float16'")
    return dtype


def base_compute_dtype(base: nn.Module) -> torch.dtype:
    """The float dtype a base layer computes in, for tensors trained beside it: a float weight's dtype; for a
    quantized base, whose weight holds codes, the dtype it dequantizes to (NF4Linear's ``weight_dtype``;
    bitsandbytes' Linear4bit ``compute_dtype``, else the dtype its ``quant_state`` was quantized from), else its
    bias's; float32 if nothing says."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    bias = getattr(base, "bias", None)
    for dtype in (getattr(base, "weight_dtype", None), getattr(base, "compute_dtype", None),
                  getattr(getattr(weight, "quant_state", None), "dtype", None),
                  bias.dtype if isinstance(bias, Tensor) else None):
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return torch.float32


def base_dtype_device(base: nn.Module) -> tuple[torch.dtype, Optional[torch.device]]:
    """The compute dtype (base_compute_dtype) and device tensors trained beside ``base`` should take: the device
    its parameters or buffers live on (None if it has neither)."""
    tensor = next(iter([*base.parameters(), *base.buffers()]), None)
    return base_compute_dtype(base), (tensor.device if tensor is not None else None)


def _check_graph_tokens(graph_tokens: int, graph_inference_tokens: int, num_experts: int, backend: str,
                       router: Optional[str]) -> None:
    """MoLLinear's graph_tokens / graph_inference_tokens, checked against the path the layer runs."""
    for name, tokens in (("graph_tokens", graph_tokens), ("graph_inference_tokens", graph_inference_tokens)):
        if not is_whole(tokens) or tokens < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: no captured graphs), got {tokens!r}")
        if tokens and num_experts > 1 and (backend == "torch" or router not in dispatch.FUSED_ROUTERS):
            raise ValueError(f"{name}={tokens} captures the fused Triton path, which backend={backend!r} "
                             f"with router={router!r} never runs (it needs backend 'auto' or 'triton' and a router "
                             f"in {dispatch.FUSED_ROUTERS}); set {name}=0")


class MoLLinear(AdapterLayer):
    """A frozen linear layer plus ``num_experts`` LoRA experts chosen per token by a router.

    With ``num_experts=1`` there is no router and the layer is exactly PEFT's LoRA:
    ``base(x) + lora_B(lora_A(dropout(x))) * scaling``.
    ``adapter_dtype``: dtype of lora_A / lora_B; None (default here) or "base": the base's; "auto": float32 on a
    16-bit base (what ``mol.inject`` uses by default, as PEFT's get_peft_model); or a dtype. See adapter_dtype_for.
    ``graph_tokens`` / ``graph_inference_tokens``: on CUDA, training calls / calls without gradients in eval mode
    (generation's decode steps, evaluation) of at most this many tokens replay per-layer CUDA graphs; see
    mol.kernels.layer_graphs. 0 (default): never captured.
    The other arguments mean what MoLConfig's fields of the same name do (``router`` its ``router``), with the same
    defaults but ``adapter_dtype``'s; ``base`` is the frozen layer (nn.Linear, NF4Linear or transformers' Conv1D).
    """

    # the gradient a deferred router loss received, for a reentrant checkpoint's recompute to apply
    # (_DeferredAuxLoss); a class default, so layers pickled before it existed load
    _aux_grad: Optional[Tensor] = None
    graph_inference_tokens: int = 0  # likewise

    def __init__(
        self,
        base: nn.Module,
        num_experts: int = 8,
        top_k: Optional[int] = None,
        rank: int = 8,
        alpha: float = 16.0,
        router: str = "topk",
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        router_noise: float = 0.0,
        backend: str = "auto",
        graph_tokens: int = 0,
        adapter_dtype: Union[None, str, torch.dtype] = None,
        graph_inference_tokens: int = 0,
    ):
        super().__init__()
        in_features, out_features = _linear_shape(base)
        # the checks MoLConfig.validate makes, for layers built by hand: a zero alpha or a dropout of 1 would
        # silently never train, a float top_k fail only at the first forward
        if not is_whole(rank) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}; use e.g. rank=8")
        if not is_whole(num_experts) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if top_k is None:  # as MoLConfig: 1 for the switch router, which takes one, else 2
            top_k = default_top_k(router)
        if not is_whole(top_k):
            raise ValueError(f"top_k must be an integer, got {top_k!r}")
        if router not in ROUTERS:
            raise ValueError(f"router={router!r} is unknown; choose one of {ROUTERS}")
        if not is_number(alpha) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be > 0, got {alpha!r}; the usual choice is alpha = 2 * rank")
        if not is_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):  # "false" is truthy: rsLoRA's scaling would be on
            raise ValueError(f"use_rslora must be true or false, got {use_rslora!r}")
        for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef),
                            ("router_noise", router_noise)):
            problem = nonnegative_number_problem(value)
            if problem:
                raise ValueError(f"{name} {problem}")
        if num_experts > 1 and router != "soft" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} is outside 1..num_experts={num_experts}; set top_k between 1 and {num_experts}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; choose one of {dispatch.BACKENDS}")
        _check_graph_tokens(graph_tokens, graph_inference_tokens, num_experts, backend, router)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.alpha = num_experts, rank, alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.backend = backend
        self.merged = False

        base_dtype, device = base_dtype_device(base)
        dtype = adapter_dtype_for(adapter_dtype, base_dtype)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, dtype=dtype, device=device))
        # lora_B is (E, out, r) but stored expert-interleaved, in (out, E, r) memory order: then the experts'
        # concatenated B_cat (E*r, out) the kernels multiply by, and dB, are views, not copies, every step
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts, rank, dtype=dtype, device=device)
                                   .permute(1, 0, 2))
        self.reset_lora(init)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router: Optional[Router] = None
        if num_experts > 1:
            self.router = Router(in_features, num_experts, top_k, router, router_noise).to(device)
        self._last: Optional[RouterOutput] = None
        # routed training calls of <= graph_tokens tokens, and calls without gradients of <= graph_inference_tokens
        # (decode steps), replay per-layer CUDA graphs (mol.kernels.layer_graphs): small calls are bound by the
        # host's launch and autograd cost, which a replay cuts to one launch
        self._graphs = None
        self._set_graphs(graph_tokens, graph_inference_tokens)

    def set_graphs(self, graph_tokens: Optional[int] = None, graph_inference_tokens: Optional[int] = None) -> None:
        """Change ``graph_tokens`` / ``graph_inference_tokens`` (see the class docstring) after construction, e.g.
        on a layer that ``mol.load_adapter`` built, before generation (``mol.set_graphs`` does it for a model).
        None keeps a setting, 0 turns it off. The graphs captured so far and their buffers are freed either way;
        the next call of a size still captured captures again."""
        self._set_graphs(*self._checked_graph_tokens(graph_tokens, graph_inference_tokens))

    def _checked_graph_tokens(self, graph_tokens: Optional[int], graph_inference_tokens: Optional[int]
                              ) -> tuple[int, int]:
        """The (graph_tokens, graph_inference_tokens) set_graphs would give the layer, checked."""
        tokens = (self.graph_tokens if graph_tokens is None else graph_tokens,
                  self.graph_inference_tokens if graph_inference_tokens is None else graph_inference_tokens)
        _check_graph_tokens(*tokens, self.num_experts, self.backend, None if self.router is None else self.router.kind)
        return tokens

    def _set_graphs(self, graph_tokens: int, graph_inference_tokens: int) -> None:
        if self._graphs is not None:
            self._graphs.clear()
        self.graph_tokens = graph_tokens
        self.graph_inference_tokens = graph_inference_tokens
        self._graphs = None
        if (graph_tokens or graph_inference_tokens) and self.num_experts > 1:
            from mol.kernels.layer_graphs import LayerGraphs

            self._graphs = LayerGraphs(graph_tokens, graph_inference_tokens)

    @torch.no_grad()
    def reset_lora(self, init: str = "kaiming") -> None:
        """A random, B zero (a fresh adapter changes nothing). 'kaiming' is nn.Linear's (and PEFT's) default
        uniform(+-1/sqrt(in)); 'gaussian' is PEFT's normal(0, 1/r)."""
        if init == "kaiming":
            bound = 1.0 / math.sqrt(self.in_features)
            self.lora_A.uniform_(-bound, bound)
        elif init == "gaussian":
            self.lora_A.normal_(0.0, 1.0 / self.rank)
        else:
            raise ValueError(f"init={init!r} is unknown; choose 'kaiming' or 'gaussian'")
        self.lora_B.zero_()

    def extra_repr(self) -> str:
        graphs = f", graph_tokens={self.graph_tokens}" if self.graph_tokens else ""
        if self.graph_inference_tokens:
            graphs += f", graph_inference_tokens={self.graph_inference_tokens}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"rank={self.rank}, scaling={self.scaling:g}, backend={self.backend}{graphs}")

    def forward(self, x: Tensor) -> Tensor:
        """``base(x)`` plus the gated low-rank updates of the experts routed to each token, shaped as ``base(x)``;
        the routing is kept for ``aux_loss()`` and ``last_stats``."""
        if x.shape[-1] != self.in_features:  # else a reshape below fails with a message naming neither
            raise ValueError(f"MoLLinear: the input's last dimension is {x.shape[-1]}, the layer takes "
                             f"in_features={self.in_features} (input shape {tuple(x.shape)})")
        graphs, key, rest = self._graphs, None, None
        # (a call without gradients in training mode is never replayed: see below; nor is one torch.compile traces)
        if graphs is not None and self._aux_grad is None and x.dim() >= 2 and not torch.compiler.is_compiling() and (
                graphs.max_tokens if torch.is_grad_enabled() else graphs.inference_tokens and not self.training):
            # a call like an earlier one that replayed a captured graph replays it again, skipping the way there
            key, rest = self._graph_key(x)
            out = None if key is None else graphs.replay_hit(key, x, rest)
            if out is not None:
                y, aux, hl, gates, ids, stats = out
                self._last = FusedRouterOutput(gates, ids, hl, self.num_experts, stats, aux, token_weights=rest[-1])
                return y
        if self.merged or self.disabled:
            return self.base_layer(x)
        # an nn.Identity call is a module call of host time per layer and step: skip it (same result)
        x_lora = x if type(self.dropout) is nn.Identity else self.dropout(x)
        if self.router is None:
            # Same ops in the same order as PEFT's LoRA, so the one-expert case matches it to the last bit.
            out = self.base_layer(x)
            x_lora = x_lora.to(self.lora_A.dtype)
            delta = F.linear(F.linear(x_lora, self.lora_A[0]), self.lora_B[0]) * self.scaling
            # added before the cast back, as PEFT does: float32 adapters on a bf16 base round the sum once
            return (out + delta).to(out.dtype)

        if dispatch.fused_routing_available(self.router, self.backend, x):
            # Triton: router, experts and auxiliary losses in one fused function (few launches, one pass over x).
            # x keeps its leading dims: a call replayed from graph_tokens' graphs then makes no view of x or y
            # (each an autograd node: host time every call, forward and backward)
            lead_x, lead_x_lora = (x, x_lora) if x.dim() >= 2 else (x.reshape(1, -1), x_lora.reshape(1, -1))
            context = self.router.call_context()
            graphs = self._graphs
            if graphs is not None and self.training and not torch.is_grad_enabled():
                # a no-grad call in training mode is a reentrant checkpoint's first pass: static buffers would
                # keep on the GPU what checkpointing frees
                graphs = None
            if (graphs is not None and not torch.is_grad_enabled()
                    and math.prod(x.shape[:-1]) <= graphs.inference_tokens):
                # a captured no-grad forward casts the adapters itself: it reads them in place, and parameters keep
                # their addresses where the cast copies kept between calls are made anew whenever the adapters change
                lora_A, lora_B = self.lora_A, self.lora_B
            else:
                lora_A, lora_B = self._adapters_in(dispatch.compute_dtype(x))
            out, routed = dispatch.fused_mol_linear(
                self.base_layer, lead_x, None if x_lora is x else lead_x_lora, lora_A, lora_B,
                self.router, self.scaling, self.aux_loss_coef, self.z_loss_coef, graphs=graphs,
                token_weights=None if context is None else context.token_weights(x))
        else:
            routed = self.router(x)
            flat_x = x.reshape(-1, self.in_features)
            flat_x_lora = flat_x if x_lora is x else x_lora.reshape(-1, self.in_features)
            out = dispatch.routed_linear(self.base_layer, flat_x, flat_x_lora, self.lora_A, self.lora_B,
                                         routed.gates, routed.expert_ids, self.scaling, self.backend)
        if not self._recomputing():
            # what aux_loss() and routing_stats report: the last forward, not one a checkpoint recomputes in the
            # backward (an earlier micro-batch's)
            keep_state(setattr, self, "_last", routed)
        if self._graphs is not None and not torch.compiler.is_compiling():
            # a call that replayed with the arguments _graph_key gives (no dropout, noise or cast copies) is one
            # that a call of the same key may take the shortcut to; every call hands back what apply kept of it.
            # A compiled call replays none, and this write would be refused inside an activation checkpoint
            self._graphs.remember(key, rest)
        if self._aux_grad is not None:
            out = self._apply_deferred_aux(out, routed)
        return out if out.dim() == x.dim() else out.view(*x.shape[:-1], self.out_features)

    def _graph_key(self, x: Tensor) -> tuple[Optional[tuple], Optional[tuple]]:
        """(key, rest): everything besides global modes that decides which captured graph, if any, a call of x
        replays (tensors by identity and layout), and the arguments after x the fused path passes for an
        nn.Linear base without dropout, noise or cast copies (mol.kernels.layer_graphs.LayerGraphs.remember);
        (None, None) for other bases."""
        # the module and parameter dicts directly: nn.Module.__getattr__ costs ~0.6 us a lookup, and this runs
        # on every call of a graphed layer
        modules, params = self._modules, self._parameters
        base, router, dropout = modules["base_layer"], modules["router"], modules["dropout"]
        if type(base) is not nn.Linear:
            # another base reaches the graph through what its tensors (an NF4 weight's codes and scales, read by
            # weight_fn) or its own output hold, which these items do not say: no shortcut
            return None, None
        lora_A, lora_B = params.get("lora_A"), params.get("lora_B")
        weight, bias = base._parameters.get("weight"), base._parameters.get("bias")
        router_w = router._parameters.get("weight")
        if any(type(t) not in _PLAIN for t in (x, weight, lora_A, lora_B, router_w, bias if bias is not None else x)):
            # tensor subclasses (FSDP2's DTensors, a parametrization's output) take the fused path's ordinary
            # kernels; some have no address to key by
            return None, None
        # per call, as the fused path takes them (padding in the call's attention mask): the same tensor object
        token_weights = None if router.context is None else router.context.token_weights(x)
        key = (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, type(x), torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), self.training, self.merged, self.disabled, self.backend,
               type(dropout) is nn.Identity or not dropout.training, self.scaling, self.aux_loss_coef,
               self.z_loss_coef, type(base), id(base), id(router), router.training, router.noise_std, router.kind,
               router.top_k, token_weights is None, _tensor_key(weight), _tensor_key(bias), _tensor_key(lora_A),
               _tensor_key(lora_B), _tensor_key(router_w))
        return key, (None, weight, bias, None, lora_A, lora_B, router_w, None, token_weights)

    def _adapters_in(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """lora_A, lora_B for a fused call computing in ``dtype``. Adapters of another dtype (float32 on a bf16
        model, adapter_dtype="auto") are cast inside the routed layer's autograd node when they need a gradient;
        without one (generation, evaluation) their cast copies are kept and reused until the adapters change (their
        version counters or storage; writes through ``.data``, which move neither, are seen after the next
        ``train()`` / ``eval()``), so a decode step does not cast them again on every layer. A forward with
        gradients drops the copies. A CUDA-graph capture reads the adapters themselves (cast inside the graph, or at
        decode sizes rounded by the one-launch kernel as it loads them), and torch.compile casts them."""
        a, b = self.lora_A, self.lora_B
        if a.dtype == dtype and b.dtype == dtype:
            return a, b
        if torch.compiler.is_compiling():
            # the cache is left as it is: a dict pop is a graph break for dynamo, in every layer of a compiled model
            return a, b
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            self.__dict__.pop("_cast_adapters", None)
            return a, b
        if a.is_cuda and torch.cuda.is_current_stream_capturing():
            # a captured graph would keep reading copies that a later training forward frees: let it cast
            return a, b
        key = (dtype, a._version, b._version, a.data_ptr(), b.data_ptr(), a.device)
        cached = self.__dict__.get("_cast_adapters")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_cast_adapters"] = (key, a.detach().to(dtype), b.detach().to(dtype))
        return cached[1], cached[2]

    def train(self, mode: bool = True) -> "MoLLinear":
        # Writes through .data (an EMA's copy_to, then eval()) bump no version counter; a mode switch is where
        # such swaps happen, so the cast copies are dropped there
        self.__dict__.pop("_cast_adapters", None)
        return super().train(mode)

    # the cast copies are a cache: a copied or pickled layer starts without them. The routing kept from the last
    # forward holds tensors of that forward's graph, which deepcopy refuses (only graph leaves copy) and a pickle
    # has no use for: the copy keeps it detached (its aux_loss() is then a value, not part of the original's graph)
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_cast_adapters", None)
        if state.get("_last") is not None:
            state["_last"] = _detached(state["_last"])
        return state

    def _recomputing(self) -> bool:
        """Whether this forward is an activation checkpoint's recompute inside the backward."""
        context = self.router.context
        if context is not None:
            if context.recompute is not None:  # a checkpoint bound to its call (mol.calls)
                return True
            if context.in_call:  # no recompute runs inside the model's call; spares the engine query below
                return False
        # a compiled graph replays no Python forward in its backward, and the engine's task id would break it
        return not torch.compiler.is_compiling() and in_backward()

    def _apply_deferred_aux(self, out: Tensor, routed: RouterOutput) -> Tensor:
        grad, self._aux_grad = self._aux_grad, None
        if not (in_backward() and torch.is_grad_enabled()):
            raise RuntimeError(
                "MoLLinear: the router loss of this layer's previous forward received a gradient that never reached "
                "the router: that forward ran without autograd (under torch.no_grad or inference_mode) and no "
                "reentrant activation checkpoint recomputed it. Run the forward with gradients enabled when its "
                "aux_loss() is part of a loss you backpropagate.")
        # the recompute's own routing, with autograd (the layer's kept routing is the first pass's, a constant)
        return _AuxLossThroughOutput.apply(out, self._aux_value(routed), grad)

    def clear_routing(self) -> None:
        """Forget the routing kept from the last forward (aux loss, stats). Call it (or ``mol.clear_routing``)
        after the warm-up and before capturing a training step in a CUDA graph: the capture's first forward
        would otherwise free the warm-up's tensors inside the capture, which CUDA refuses for a tensor that was
        used on another stream."""
        self._last = None

    def aux_loss(self) -> Optional[Tensor]:
        """Coefficient-weighted load-balance + z-loss of the last forward (None before any routed forward).

        Its gradient reaches the router also when that forward ran under a reentrant activation checkpoint
        (without autograd, recomputed in the backward): see _DeferredAuxLoss."""
        aux = self._aux_value()
        if aux is None or aux.requires_grad or not torch.is_grad_enabled():
            return aux
        anchor = next((p for p in self.router.parameters() if p.requires_grad), None)
        return aux if anchor is None else _DeferredAuxLoss.apply(aux, anchor, self)

    def _aux_value(self, routed: Optional[RouterOutput] = None) -> Optional[Tensor]:
        """The coefficient-weighted router loss of ``routed``, by default the last forward's."""
        routed = self._last if routed is None else routed
        if routed is None:
            return None
        if isinstance(routed, FusedRouterOutput):  # already weighted and summed by the kernels
            return routed.aux
        return self.aux_loss_coef * routed.load_balance_loss + self.z_loss_coef * routed.z_loss

    @property
    def last_stats(self) -> dict[str, Tensor]:
        """Detached utilisation stats of the last forward: load (E,) fraction, counts (E,), entropy, losses."""
        if self._last is None:
            return {}
        with torch.no_grad():
            r = self._last
            counts = r.counts
            return {"load": counts / counts.sum().clamp_min(1), "counts": counts, "entropy": r.entropy,
                    "load_balance_loss": r.load_balance_loss, "z_loss": r.z_loss}

    # Merging folds B @ A into the frozen weight; only input-independent deltas (one expert, no router) fold.
    def merge_blocker(self) -> Optional[str]:
        if self.router is not None:
            return (f"a token-routed MoL layer (num_experts={self.num_experts}, router={self.router.kind}) applies "
                    "a different mix of experts to every token, so its delta is not one matrix and cannot be merged; "
                    "merge only LoRA (num_experts=1) adapters, or keep this adapter unmerged")
        return dense_weight_blocker(self.base_layer)

    def _delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """B A * scaling in the base weight's own layout: (out, in), or (in, out) for a Conv1D base, in ``dtype``."""
        delta = (self.lora_B[0].to(dtype) @ self.lora_A[0].to(dtype)) * self.scaling
        return delta.t() if is_conv1d(self.base_layer) else delta

    def _merge_dtype(self) -> torch.dtype:
        # float32 or wider: a float64 weight (or adapter) must not pass through float32, which would round it
        return torch.promote_types(torch.promote_types(self.base_layer.weight.dtype, self.lora_A.dtype), torch.float32)

    @torch.no_grad()
    def merge(self) -> None:
        reason = self.merge_blocker()
        if reason:
            raise ValueError(reason)
        if not self.merged:
            w, dtype = self.base_layer.weight, self._merge_dtype()
            w.copy_((w.to(dtype) + self._delta_weight(dtype)).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w, dtype = self.base_layer.weight, self._merge_dtype()
            w.copy_((w.to(dtype) - self._delta_weight(dtype)).to(w.dtype))
            self.merged = False
