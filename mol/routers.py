"""Routers: hidden states -> (gates, expert_ids), plus their auxiliary losses and utilisation stats.

Every router scores in float32 (float64 for float64 inputs) and returns gates and expert ids of shape (T, K), one
row per token (the sequence router repeats its per-sequence choice over the sequence's tokens). Nothing here reads a
value back to the host, so a forward is CUDA-graph capturable and compiles without graph breaks.

Auxiliary losses (kept on the output, collected by ``MoLLinear.aux_loss``):
- load balance, Switch Transformer (Fedus et al. 2021) form: ``E * sum_e f_e * P_e`` where ``f_e`` is the
  fraction of routed (token, expert) pairs sent to expert e and ``P_e`` the mean router probability of e.
  It is 1 at perfect balance and E when everything goes to one expert (top-1; with top-k, at most E / k, when
  every token picks the same k experts). For the soft router, which sends every token to every expert, it is
  1 whatever the probabilities, with zero gradient (conf/router/soft.yaml sets its coefficient to 0).
- router z-loss (Zoph et al. 2022, ST-MoE): ``mean(logsumexp(logits) ** 2)``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mol.config import default_top_k, is_whole, nonnegative_number_problem
from mol.kernels import autocast_off


@dataclass
class RouterOutput:
    """What one routing decision produced. The losses and stats are computed on demand from the scores,
    so a forward that never asks for them (inference, decode) pays only for scoring and selection."""

    gates: Tensor  # (T, K) float32 (float64 for float64 x, as logits and probs), weight of each chosen expert
    expert_ids: Tensor  # (T, K) int64
    logits: Tensor  # (N, E) float32; N = tokens, or sequences for the sequence router
    probs: Tensor  # (N, E) softmax of logits
    chosen: Tensor  # (N, K) expert ids per scored row (before repeating over a sequence)
    # (N,) float32 or None: each row's weight in the losses and stats, 1 for a real token and 0 for padding
    token_weights: Tensor | None = None

    def _weighted(self, per_row: Tensor) -> Tensor:
        """per_row (N, ...) summed over the rows, each times its weight."""
        w = self.token_weights
        if w is None:
            return per_row.sum(dim=0)
        w = w.reshape(-1, *[1] * (per_row.dim() - 1))
        # padding selected out, not multiplied by 0: its scores may be NaN/inf (attention that leaves fully masked
        # rows NaN), and NaN * 0 would make the losses NaN
        return torch.where(w != 0, per_row * w, 0.0).sum(dim=0)

    def _rows(self) -> Tensor | int:
        # max(rows, 1), and pair fractions over max(pairs, 1): an empty batch (no rows, or padding only) gives zero
        # losses, as the fused kernels do, not NaN that would reach every gradient through the training loss
        w = self.token_weights
        return max(self.probs.shape[0], 1) if w is None else w.sum().clamp_min(1)

    @property
    def counts(self) -> Tensor:
        """(E,) in the scores' dtype: routed (row, expert) pairs per expert; a scatter-add, so no host sync."""
        counts = torch.zeros(self.probs.shape[-1], device=self.probs.device, dtype=self.probs.dtype)
        ones = torch.ones_like(self.chosen, dtype=self.probs.dtype)
        if self.token_weights is not None:
            ones = ones * self.token_weights[:, None]
        return counts.scatter_add(0, self.chosen.reshape(-1), ones.reshape(-1))

    @property
    def load_balance_loss(self) -> Tensor:
        """Switch Transformer's load-balance loss: E * sum_e (fraction routed to e) * (mean probability of e)."""
        counts = self.counts
        return self.probs.shape[-1] * (counts / counts.sum().clamp_min(1) * self._weighted(self.probs) / self._rows()).sum()

    @property
    def z_loss(self) -> Tensor:
        """ST-MoE's router z-loss: the mean squared logsumexp of the logits."""
        return self._weighted(torch.logsumexp(self.logits, dim=-1).square()) / self._rows()

    @property
    def entropy(self) -> Tensor:
        """Mean entropy (nats) of the router distribution."""
        return self._weighted(-(self.probs * torch.log(self.probs.clamp_min(1e-20))).sum(dim=-1)) / self._rows()


class FusedRouterOutput(RouterOutput):
    """The routing of a layer that ran on the fused Triton path (mol.kernels.routed_lora): the kernels already
    reduced the statistics (``stats`` = per-expert counts, per-expert probability sums, sum of logsumexp^2)
    and the coefficient-weighted auxiliary loss ``aux`` (differentiable; its gradient is computed in closed
    form by the backward kernel). ``probs`` is computed from the logits only if something asks for it."""

    def __init__(self, gates: Tensor, expert_ids: Tensor, hl: Tensor, num_experts: int, stats: Tensor, aux: Tensor,
                 noise: Tensor | None = None, token_weights: Tensor | None = None):
        # hl = [expert shrink | router logits] (T, R+E) as the kernels wrote it; the logits are cut out (and the
        # noise added) only when asked for: a forward that never looks pays no slice or add
        self.gates, self.expert_ids, self.chosen = gates, expert_ids, expert_ids
        self.stats, self.aux, self.token_weights = stats, aux, token_weights
        self._hl, self._num_experts, self._noise = hl, num_experts, noise

    @property
    def logits(self) -> Tensor:  # type: ignore[override]
        logits = self._hl[:, self._hl.shape[1] - self._num_experts:]
        return logits if self._noise is None else logits + self._noise

    @property
    def probs(self) -> Tensor:  # type: ignore[override]
        return self.logits.softmax(dim=-1)

    @property
    def counts(self) -> Tensor:
        return self.stats[: self._num_experts]

    # the kernels' statistics are already weighted (token_weights)
    def _rows(self) -> Tensor | int:
        w = self.token_weights
        return max(self._hl.shape[0], 1) if w is None else w.sum().clamp_min(1)

    @property
    def load_balance_loss(self) -> Tensor:
        num_experts = self._num_experts
        counts, prob_sums = self.stats[:num_experts], self.stats[num_experts: 2 * num_experts]
        return num_experts * (counts / counts.sum().clamp_min(1) * prob_sums / self._rows()).sum()

    @property
    def z_loss(self) -> Tensor:
        return self.stats[2 * self._num_experts] / self._rows()


class _MeanPool(torch.autograd.Function):
    """(B, S, in) -> (B, in) in float32 (float64 for float64 x), the mean over S, or with ``mask`` (B, S) over the
    positions it marks nonzero (real tokens, not padding). Forward: float32 accumulation without a float32 copy of x
    (x.float().mean() wrote and re-read one: three times x's bytes). Backward: dx as a broadcast view of the
    (B, in) gradient, which autograd adds into x's other gradient, instead of a materialised float32 (B, S, in)
    and its cast. The sequence router's scores, fwd+bwd at 8x1024 tokens x 4096 (H200, RESULTS run 33): 46.4 us,
    against 286.7 through the float32 copy and 177.4 with autograd's own backward of the float32-accumulated mean.
    (Masked, both directions take one x-sized pass more: a select forward, a product with the mask backward.)"""

    generate_vmap_rule = True  # plain tensor ops: torch.func.vmap runs them batched

    @staticmethod
    def forward(seqs: Tensor, mask: Tensor | None = None) -> Tensor:
        acc = torch.promote_types(seqs.dtype, torch.float32)
        if mask is None:
            # sum / S rather than mean: an empty sequence pools to zeros (uniform scores), not NaN in the aux losses
            return seqs.sum(dim=1, dtype=acc) / max(seqs.shape[1], 1)
        weights, counts = _MeanPool._weights(mask, seqs.dtype)
        # padding selected out, not multiplied by 0: a NaN/inf there (attention that leaves fully masked rows NaN)
        # would reach the pool, and every real token of the sequence through its expert choice
        return torch.where(weights[:, :, None] != 0, seqs, 0).sum(dim=1, dtype=acc) / counts

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        seqs, mask = inputs
        ctx.shape, ctx.dtype = seqs.shape, seqs.dtype
        if mask is None:
            ctx.save_for_backward()
        else:  # the mask's small (B, S) weights and counts again, rather than as outputs of forward
            ctx.save_for_backward(*_MeanPool._weights(mask, seqs.dtype))

    @staticmethod
    def _weights(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(weights (B, S) in dtype, 1 for a real position, 0 for padding; counts (B, 1) of real positions, at
        least 1: a sequence of padding only pools to zeros) in the accumulation dtype."""
        weights = (mask != 0).to(dtype)
        return weights, weights.sum(dim=1, dtype=torch.promote_types(dtype, torch.float32)).clamp_min(1)[:, None]

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = ctx.saved_tensors  # once: under activation checkpointing each saved tensor unpacks once
        if not saved:
            return (grad / max(ctx.shape[1], 1)).to(ctx.dtype)[:, None, :].expand(ctx.shape), None
        weights, counts = saved
        return (grad / counts).to(ctx.dtype)[:, None, :] * weights[:, :, None], None


class RoutingContext:
    """What the routers of one model read about the call in progress. ``mol.inject`` makes one per model and sets
    it from hooks on the model's forward (mol.calls); a MoLLinear used on its own can be given one
    (``layer.router.context = ctx``) and the caller sets its fields.

    - ``attention_mask`` (batch, positions), 1 for a real token and 0 for padding, where it covers a layer's
      input: as (batch, positions, in), or flattened to (batch * positions, in). Token routers then leave padding
      out of their losses and statistics (every token is still routed: its output is the caller's to ignore), as
      Hugging Face's MoE models do, so the losses are those of the batch's real tokens; sequence routers pool
      only the real tokens, so a sequence routes the same alone and padded into a batch. (An input it does not
      cover, e.g. a vision tower's, counts every position.) In an encoder-decoder model's call it is the decoder's
      (``decoder_attention_mask``), and the encoder's while the encoder runs.
    - ``memory`` and ``memory_mask``: the encoder's output that an encoder-decoder's decoder attends to, and its
      padding mask, for the inputs of the decoder's cross-attention keys and values (``memory`` itself, or where
      only ``memory_mask``'s shape fits).
    - ``batch_shape`` (batch, positions) of the call's tokens: a 2-D input (N, in) to a sequence router is read
      with it, as batch * positions flattened tokens when N is their product, and as one vector per sequence (a
      pooler, a classification head) when N is the batch; ``batch_size`` alone (a call of pixel values, audio
      features, or an encoder-decoder's, which has no tokens of its layers' length) reads only the latter; else
      (``outside_masks`` aside), and without a context, (N, in) is one sequence.
    - ``outside_masks``: None, except in the call of a module of the user's own that holds Hugging Face models and
      whose arguments describe nothing (``forward(self, batch)``), outside the model calls inside it, where its own
      layers run (a head on the inner model's output): then the 2-D padding masks of the model calls inside it that
      returned so far. There each row of a 2-D input (N, in) is one sequence (an example's vector), and each row of
      a (batch, positions, in) input is one sequence, its padding that of the one such call whose mask has its
      shape (of several with different masks, which is unknown: a sequence router raises, a token router counts
      every position); where none has, every position is real.
    - ``continuation``: the call continues sequences from a KV cache (generation's decode steps). Each sequence
      router then reuses the choice it made for those sequences in the call that started the cache, so every
      position of a sequence, cached or new, went through the same experts: one choice per sequence.
    - ``choices``: where sequence routers keep those choices, by ``id(router)``. The hooks hand each call that
      starts sequences a new dict and keep it with the call's cache (mol.calls), and a continuation the dict of
      the cache it continues (None if that cache has none). A hand-made context keeps one dict: a continuation
      reuses the last choice.
    - ``sequence_error``: why a sequence router cannot route the call as one choice per sequence of real tokens (a
      mask it cannot read the padding from, the draft tokens of assisted decoding scored with the prompt); a
      sequence router raises it.
    """

    # True between the model's forward hooks (mol.inject's): the forward running now is that call's, not an
    # activation checkpoint's recompute inside a backward (see Router.call_context). Class defaults: contexts made
    # by hand, and pickled before these existed, have them
    in_call = False
    # while a checkpoint recomputes a forward inside the backward: the snapshot of the call that forward belonged
    # to, bound to the checkpoint when it ran (mol.calls._CheckpointRouting), for the routers inside to read
    recompute: "RoutingContext | None" = None
    _batch_shape: tuple[int, int] | None = None
    _shape_of: Tensor | None = None
    _batch_of: Tensor | None = None
    choices: dict | None = None
    sequence_error: str | None = None
    memory: Tensor | None = None
    memory_mask: Tensor | None = None
    outside_masks: tuple[Tensor, ...] | None = None
    # beside outside_masks: the 3-D states those calls returned, each with its call's mask, so that an input that is
    # one of them (a head on one call's last_hidden_state) takes that call's mask where the shape fits several. Weak
    # references: a router's snapshot of the call outlives it, and must not keep a call's logits alive
    outside_states: tuple[tuple[weakref.ref, Tensor], ...] = ()

    def __init__(self) -> None:
        self.attention_mask: Tensor | None = None
        self.continuation = False
        self.choices = {}
        # [(mask, its flat float32 weights)], shared with the snapshots: one cast a call, not one a layer
        self._weights: list[tuple[Tensor, Tensor]] = []

    def __getstate__(self) -> dict:
        # a router keeps a snapshot of its last call (Router._call): a copied or pickled model must not carry that
        # call's autograd graph (deepcopy refuses tensors that are no graph leaves, such as an encoder-decoder's
        # memory, the encoder's output) nor its weak references (pickle refuses them)
        state = {k: v.detach() if isinstance(v, Tensor) and (v.requires_grad or v.grad_fn is not None) else v
                 for k, v in self.__dict__.items()}
        state.pop("outside_states", None)
        return state

    @property
    def batch_shape(self) -> tuple[int, int] | None:
        # read from the call's tokens when the hooks set it, not kept as ints: under torch.compile a tuple of ints
        # in an object is a constant the compiled graph is guarded on, so every new sequence length would compile
        # the model again; a tensor's dims can stay symbolic
        if self._shape_of is not None:
            return (self._shape_of.shape[0], self._shape_of.shape[1])
        return self._batch_shape

    @batch_shape.setter
    def batch_shape(self, shape: tuple[int, int] | None) -> None:
        self._batch_shape, self._shape_of, self._batch_of = shape, None, None

    @property
    def batch_size(self) -> int | None:
        """The call's batch size: from its tokens, or from any batched input (pixel values, audio features)."""
        if self._batch_of is not None:
            return self._batch_of.shape[0]
        shape = self._batch_shape
        return None if shape is None else shape[0]

    def begin_call(self, tokens: Tensor | None, attention_mask: Tensor | None, continuation: bool, *,
                   batch: Tensor | None = None, choices: dict | None = None,
                   sequence_error: str | None = None) -> None:
        """The model's call starts (a forward pre-hook): ``tokens`` (batch, positions, ...) give batch_shape,
        ``batch`` (any input whose first dim is the batch) batch_size where there are no tokens;
        ``attention_mask`` counts only as a 2-D (batch, positions) mask; ``choices``: those the continued cache
        keeps (a call that starts sequences gets a new dict). Called again during a call (prompt tuning's hook,
        once it prepended its virtual tokens), it changes only the tokens, batch and mask: the call's
        continuation, choices and sequence_error stay."""
        tokens = tokens if isinstance(tokens, Tensor) and tokens.dim() >= 2 else None
        batch = batch if isinstance(batch, Tensor) and batch.dim() >= 1 else None
        self._batch_shape, self._shape_of, self._batch_of = None, tokens, tokens if tokens is not None else batch
        self.outside_masks, self.outside_states = None, ()  # the layers of a described call run inside it
        two_d = isinstance(attention_mask, Tensor) and attention_mask.dim() == 2
        self.attention_mask = attention_mask if two_d else None
        # a new list, not cleared in place: the snapshots of earlier calls keep theirs; and a compiled model then
        # finds it empty at each call, not holding the last call's tensors (inputs it would be guarded on)
        self._weights = []
        if self.in_call:
            return
        self.continuation, self.in_call, self.sequence_error = continuation, True, sequence_error
        self.choices = choices if continuation else {}

    def end_call(self) -> None:
        """The model's call is over (a forward hook): a submodule called on its own afterwards sees no call."""
        self._batch_shape, self._shape_of, self._batch_of, self.attention_mask = None, None, None, None
        self.continuation, self.in_call, self._weights, self.sequence_error = False, False, [], None
        self.memory, self.memory_mask, self.outside_masks, self.outside_states = None, None, None, ()
        self.choices = {}  # a layer called on its own now keeps its choice here, out of the call's cache

    def snapshot(self) -> "RoutingContext":
        """A copy of the call's state as it is now. A router keeps one from each forward, for the forward an
        activation checkpoint recomputes inside the backward, when the model call (and its hooks) is over."""
        copy = RoutingContext()
        copy._batch_shape, copy._shape_of, copy._batch_of = self._batch_shape, self._shape_of, self._batch_of
        copy.attention_mask, copy.continuation = self.attention_mask, self.continuation
        copy._weights, copy.choices, copy.sequence_error = self._weights, self.choices, self.sequence_error
        copy.memory, copy.memory_mask, copy.outside_masks = self.memory, self.memory_mask, self.outside_masks
        copy.outside_states = self.outside_states
        return copy

    def mask_for(self, x: Tensor, strict: bool = False) -> Tensor | None:
        """The (batch, positions) padding mask that covers x, (batch, positions, in) or flattened: the call's, or
        for the encoder states a decoder's cross-attention reads, the encoder's, or outside the model calls of a
        wrapper's call, that of the one call with x's shape (``outside_masks``); None where none does. ``strict``:
        raise ValueError where x's shape is that of several such calls' different masks, rather than None."""
        outside = self.outside_masks
        if outside is not None:
            return self._outside_mask(x, outside, self.outside_states, strict)
        memory_mask = self.memory_mask
        if memory_mask is not None and x is self.memory and tuple(x.shape[:-1]) == tuple(memory_mask.shape):
            return memory_mask
        mask = self.attention_mask
        # flattened (batch * positions, in): where the call's batch_shape is the mask's, or unset (a context made by
        # hand with only its mask, as the class docstring allows)
        if mask is not None and x.dim() >= 2 and (
                tuple(x.shape[:-1]) == tuple(mask.shape) or (x.dim() == 2 and x.shape[0] == mask.numel()
                                                             and self.batch_shape in (None, tuple(mask.shape)))):
            return mask
        # the encoder states as a copy (beam search's expanded batch): by shape, where that is known not to be the
        # call's own (the decoder's)
        shape = self.batch_shape
        if memory_mask is not None and shape is not None and x.dim() >= 2 \
                and tuple(x.shape[:-1]) == tuple(memory_mask.shape) and tuple(x.shape[:-1]) != shape:
            return memory_mask
        return None

    @staticmethod
    def _outside_mask(x: Tensor, masks: tuple[Tensor, ...], states: tuple[tuple[weakref.ref, Tensor], ...],
                      strict: bool) -> Tensor | None:
        """The one of ``masks`` (different objects) whose shape is x's leading dims; where several are, that of the
        call x is a returned state of (or a view of one), else which one x's positions are is unknown."""
        found = [m for m in masks if x.dim() >= 2 and tuple(m.shape) == tuple(x.shape[:-1])]
        if len(found) > 1:
            for ref, mask in states:
                state = ref()
                if state is not None and (x is state or x._base is state) and tuple(mask.shape) == tuple(x.shape[:-1]):
                    return mask
        if len(found) > 1 and strict:
            raise ValueError(
                f"sequence router: a layer of the module given to mol.inject, run after Hugging Face model calls "
                f"inside its forward, got an input of shape {tuple(x.shape)}, the shape of the attention masks of "
                f"{len(found)} of those calls; the router cannot tell which call's padding to leave out of each "
                "sequence's pool. Pad those calls to different widths (or run them as one batch), route this "
                "layer per token (a top-k router), or leave it out of target_modules")
        return found[0] if len(found) == 1 else None

    def token_weights(self, x: Tensor) -> Tensor | None:
        """(prod(x.shape[:-1]),) float32: 1 for x's real tokens, 0 for padding; None where the mask does not
        cover x (no mask, another shape)."""
        mask = self.mask_for(x)
        if mask is None:
            return None
        for known, weights in self._weights:
            if known is mask:
                return weights
        weights = mask.reshape(-1).to(torch.float32)
        keep_state(self._weights.append, (mask, weights))
        return weights


def in_backward() -> bool:
    """True while autograd's engine runs a backward on this thread (an activation checkpoint recomputing a
    forward)."""
    return torch._C._current_graph_task_id() != -1


def keep_state(write: Callable[..., Any], *args: Any) -> Any:
    """``write(*args)``: a forward's write to the routing state that mol keeps beside the layers' outputs (the
    routing a layer keeps for aux_loss and routing_stats, a router's snapshot of the call, the call's padding
    weights, a sequence router's choice for the call's KV cache).

    Inside an activation checkpoint, torch.compile's Dynamo refuses writes to objects from outside the checkpointed
    function ("HOP: Unsafe side effect"): eager checkpointing repeats them when the backward recomputes the forward,
    and a compiled backward cannot. A recompute must not repeat these ones: mol keeps no state from it
    (Router.call_context, MoLLinear._recomputing), and what a recompute reads (the padding weights, a sequence
    router's choice) the first pass wrote. So while compiling, the write goes through Dynamo's exemption for the
    function it traces now (torch._dynamo.utils._disable_side_effect_safety_checks_for_current_subtracer), which
    makes it once, with the forward: these writes only, not the rest of the checkpointed function, and no global
    setting (Dynamo's skip_fwd_side_effects_in_bwd_under_checkpoint) for the user to turn on. Only from torch 2.10,
    the first with that setting: torch 2.8 and 2.9 have the exemption but drop the writes it lets through, which
    would leave aux_loss() a previous call's. There, and outside torch.compile, a plain call (which Dynamo refuses
    inside a checkpoint, as before)."""
    if torch.compiler.is_compiling() and hasattr(torch._dynamo.config,
                                                 "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        allow = getattr(torch._dynamo.utils, "_disable_side_effect_safety_checks_for_current_subtracer", None)
        if allow is not None:
            return allow(write, *args)
    return write(*args)


def _repeat_rows(per_seq: Tensor, times: int) -> Tensor:
    """(B, K) -> (B * times, K), each row repeated ``times`` times in a row. The ops einops' repeat ran: einops
    caches its backend in a global dict at its first call, a write torch.compile refuses inside a checkpoint."""
    rows, k = per_seq.shape
    return per_seq.unsqueeze(1).expand(rows, times, k).reshape(rows * times, k)


class Router(nn.Module):
    """Linear scorer ``logits = x @ weight.T`` (weight: (E, in)) followed by a selection rule.

    kind: ``topk`` (renormalised top-k of the softmax), ``soft`` (all experts, softmax weights),
    ``switch`` (top-1, gate = that expert's probability), ``sequence`` (top-k from the mean-pooled
    hidden state of each sequence, one choice for all its tokens). ``top_k``: experts per token (all of them for
    ``soft``, 1 for ``switch``; default 1 for ``switch``, else 2); ``noise_std``: std of the Gaussian noise added
    to the logits in training.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: Optional[int] = None, kind: str = "topk",
                 noise_std: float = 0.0):
        super().__init__()
        if top_k is None:  # 1 for switch, which takes one, else 2
            top_k = default_top_k(kind)
        if kind not in ("topk", "soft", "switch", "sequence"):
            raise ValueError(f"unknown router {kind!r}; choose topk, soft, switch or sequence")
        # else the top_k check below asked for a top_k "between 1 and 0"
        if not is_whole(num_experts) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if kind != "soft" and not is_whole(top_k):  # a float failed only at the first forward, True routed top-1
            raise ValueError(f"top_k must be an integer, got {top_k!r}; use e.g. top_k=2")
        problem = nonnegative_number_problem(noise_std)  # NaN noise made every training forward's logits NaN
        if problem:
            raise ValueError(f"noise_std {problem}")
        if kind == "switch" and top_k != 1:
            raise ValueError(f"the switch router routes each token to one expert; got top_k={top_k}: set top_k=1 "
                             "or leave it out")
        if kind == "soft":
            top_k = num_experts
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} is outside 1..num_experts={num_experts}; set top_k between 1 and {num_experts}")
        self.kind = kind
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))
        # Small logits at start: the first steps route nearly uniformly instead of locking in a random winner.
        nn.init.normal_(self.weight, std=0.02)
        self.context: RoutingContext | None = None  # the router's view of the model call (mol.inject)
        self._call: RoutingContext | None = None  # the context as its last forward outside a backward saw it

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_experts={self.num_experts}, top_k={self.top_k}, noise_std={self.noise_std}"

    def call_context(self) -> RoutingContext | None:
        """The model call this forward belongs to: the context's current one, except inside a backward, where an
        activation checkpoint recomputes a forward after its call returned: then the one that forward saw (so the
        recomputation weighs padding, pools and reuses choices exactly as the first pass did). That is the snapshot
        bound to the checkpoint (``context.recompute``: transformers' checkpointed layers, mol.calls), else the
        one this router kept from its last forward outside a backward (a checkpoint mol cannot see into: right
        while each forward is backpropagated before the next one runs)."""
        context = self.context
        if context is None:
            return None
        bound = context.recompute
        if bound is not None:
            return bound
        # inside the model's call no recompute runs, so autograd's engine is asked only outside one: its task id is
        # an int torch.compile cannot trace, which would break a compiled model's graph at every layer
        if context.in_call or not in_backward():
            keep_state(setattr, self, "_call", context.snapshot())
        return self._call

    def forward(self, x: Tensor) -> RouterOutput:
        """x: (..., in) for token routers; (batch, seq, in) or (seq, in) for the sequence router."""
        context = self.call_context()
        # float32 even under autocast: bf16 logits make near-ties flip expert choices from step to step. float64 x is
        # scored in float64: a float64 layer is float64-accurate (gradcheck), not float32-accurate
        score = torch.float64 if x.dtype == torch.float64 else torch.float32
        with autocast_off(x.device.type):
            if self.kind == "sequence":
                # One decision per sequence, scored on its mean hidden state: "b s k -> b k".
                if context is not None and context.sequence_error is not None:
                    raise ValueError(f"sequence router: {context.sequence_error}")
                seqs = self._sequences(x, context)
                if context is not None and context.continuation:
                    return self._continued(seqs, context)
                mask = None if context is None else context.mask_for(x, strict=True)
                if mask is not None and tuple(mask.shape) != tuple(seqs.shape[:2]):
                    mask = None
                logits = F.linear(_MeanPool.apply(seqs, mask).to(score), self.weight.to(score))  # (B, E)
                # a sequence of padding only (a batch filler) is routed but left out of the losses and statistics
                token_weights = None if mask is None else (mask != 0).any(dim=1).float()
            else:
                logits = F.linear(x.reshape(-1, x.shape[-1]).to(score), self.weight.to(score))  # (T, E)
                token_weights = None if context is None else context.token_weights(x)

        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = logits.softmax(dim=-1)

        if self.kind == "soft":
            gates = probs
            expert_ids = torch.arange(self.num_experts, device=x.device).expand_as(probs)
        else:
            # a stable sort, not topk: equal probabilities (a zero-initialised router) choose the lowest expert ids,
            # as the Triton kernels do; topk leaves ties to the platform (the CPU chose experts 6 and 5 of 8)
            top_probs, expert_ids = probs.sort(dim=-1, descending=True, stable=True)
            top_probs, expert_ids = top_probs[:, : self.top_k], expert_ids[:, : self.top_k]
            gates = top_probs if self.kind == "switch" else top_probs / top_probs.sum(dim=-1, keepdim=True)

        chosen = expert_ids
        if self.kind == "sequence":
            if context is not None and context.choices is not None:
                # kept with the call's KV cache (mol.calls), for the calls that continue these sequences from it
                keep_state(context.choices.__setitem__, id(self),
                           RouterOutput(gates.detach(), expert_ids, logits.detach(), probs.detach(), chosen))
            return self._per_token(RouterOutput(gates, expert_ids, logits, probs, chosen, token_weights),
                                   seqs.shape[1], mask)
        return RouterOutput(gates, expert_ids, logits, probs, chosen, token_weights)

    @staticmethod
    def _sequences(x: Tensor, context: RoutingContext | None) -> Tensor:
        """x as (sequences, positions, in); see RoutingContext for how a 2-D x is read."""
        if x.dim() == 1:  # one token: a sequence of one
            return x[None, None]
        if x.dim() == 2 and context is not None:
            shape = context.batch_shape
            if shape is not None and x.shape[0] == shape[0] * shape[1]:
                return x.reshape(shape[0], shape[1], x.shape[-1])
            if x.shape[0] == context.batch_size or context.outside_masks is not None:
                return x[:, None, :]
        # leading dims by product, not -1, which zero-length sequences leave ambiguous
        return x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])

    @staticmethod
    def _per_token(per_seq: RouterOutput, seq_len: int, mask: Tensor | None = None) -> RouterOutput:
        """A per-sequence choice (B, K) repeated over each sequence's positions: (B * seq_len, K). With the pool's
        ``mask`` (B, seq_len), the choice's gradient comes from the real tokens only, as its scores do: a padding
        position's gate gradient is 0 * its hidden state, NaN where that is NaN (fully masked attention rows)."""
        gates = _repeat_rows(per_seq.gates, seq_len)
        if mask is not None:
            gates = torch.where(mask.reshape(-1, 1) != 0, gates, gates.detach())
        expert_ids = _repeat_rows(per_seq.expert_ids, seq_len)
        return RouterOutput(gates, expert_ids, per_seq.logits, per_seq.probs, per_seq.chosen, per_seq.token_weights)

    def _continued(self, seqs: Tensor, context: RoutingContext) -> RouterOutput:
        """The choice this router made in the call that started the continued cache, for these sequences."""
        kept = None if context.choices is None else context.choices.get(id(self))
        if kept is None:
            raise ValueError(
                f"sequence router: this call continues {seqs.shape[0]} sequences from a KV cache for which the router "
                "kept no expert choice (a cache filled by another model, with the adapters disabled, or outside "
                "the model's call); the router reuses the choice it made in the call that started the cache. Start "
                "the sequences with a fresh cache through this model (model.generate does), or pass the whole "
                "sequence without a cache")
        if kept.gates.shape[0] != seqs.shape[0]:
            raise ValueError(
                f"sequence router: this call continues {seqs.shape[0]} sequences from a KV cache whose first call "
                f"routed {kept.gates.shape[0]}; the router reuses that call's choice per sequence, so the batch "
                "must stay as it was. Continue the cache with the batch that started it, or pass the whole "
                "sequences without a cache")
        if seqs.shape[1] > 1:
            # the choice was made without these tokens: a call adding them all at once (the prompt) would have
            # pooled them, so the result would depend on how the sequence was cut into calls
            raise ValueError(
                f"sequence router: this call continues a KV cache with {seqs.shape[1]} new tokens per sequence; the "
                "router chooses once per sequence, in the call that starts the cache, so only one token at a time "
                "may follow (generation's decode steps). generate(prefill_chunk_size=...) (chunked prefill) and "
                "generate(assistant_model=...) or prompt_lookup_num_tokens (assisted decoding) add several, as "
                "does a new turn appended to a reused cache: generate without those options, or pass the whole "
                "sequence without a cache")
        return self._per_token(kept, seqs.shape[1])
