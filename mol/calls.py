"""How a Hugging Face model's calls reach its routers: a call's arguments by name, and the forward hooks that hand
the routers each call's attention mask, token shape and KV-cache state (``RoutingContext``).

A sequence router's choice for a batch of sequences is kept with the KV cache of the call that started them (an
attribute of the Cache object, or of the first key tensor of the legacy per-layer tuples), so a call that continues
a cache reuses that cache's choice, whatever other sequences the model served in between."""

from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from mol.routers import RoutingContext, in_backward

_POSITIONAL: dict[Any, list[str]] = {}  # forward function -> its positional parameter names
_CHOICES = "_mol_sequence_choices"  # the attribute a KV cache keeps its sequence routers' choices under
# inputs whose first dim is the call's batch, where it has no tokens of its layers' length (vision, audio and
# encoder-decoder models): a (batch, in) input is then read as one vector per sequence (a classification head's)
_BATCHED = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "pixel_values",
            "input_features", "input_values", "pixel_values_videos")


def call_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A call's arguments as keywords (positional ones named from ``model.forward``'s signature)."""
    kw = dict(kwargs)
    if args:
        fn = getattr(model.forward, "__func__", model.forward)
        names = _POSITIONAL.get(fn)
        if names is None:  # inspect.signature costs tens of microseconds: once per forward function
            names = _POSITIONAL[fn] = [p.name for p in inspect.signature(model.forward).parameters.values()
                                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(names):
            raise TypeError(f"{type(model).__name__} got {len(args)} positional arguments; pass them by name")
        for name, value in zip(names, args):
            if name in kw:
                raise TypeError(f"{type(model).__name__} got {name!r} both by position and by name")
            kw[name] = value
    return kw


def _continues_cache(kw: dict) -> bool:
    """Whether a call carries a non-empty KV cache (a Hugging Face Cache, or the legacy per-layer tuples)."""
    for key in ("cache", "past_key_values"):
        cache = kw.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return cache.get_seq_length() > 0
        if isinstance(cache, (tuple, list)):
            return len(cache) > 0 and cache[0] is not None and len(cache[0]) > 0 and cache[0][0].shape[-2] > 0
    return False


def _cache_in(kw: dict) -> Any:
    """The KV cache a call carries (``cache`` from transformers 5.24, ``past_key_values`` before), or None."""
    for key in ("cache", "past_key_values"):
        if kw.get(key) is not None:
            return kw[key]
    return None


def _output_cache(output: Any) -> Any:
    """The KV cache a model call returned: a ModelOutput's, or the Cache in a tuple output (return_dict=False)."""
    for key in ("cache", "past_key_values"):
        cache = getattr(output, key, None)
        if cache is not None:
            return cache
    if isinstance(output, tuple):
        return next((o for o in output if hasattr(o, "get_seq_length")), None)
    return None


def _carrier(cache: Any) -> Any:
    """The object a cache's choices are kept on: a Cache itself; for the legacy per-layer tuples, which are new
    tuples at each call but whose tensors the next call passes back, the first layer's key tensor."""
    if isinstance(cache, (tuple, list)):
        layer = cache[0] if len(cache) > 0 else None
        key = layer[0] if isinstance(layer, (tuple, list)) and len(layer) > 0 else None
        return key if isinstance(key, Tensor) else None
    return cache


def sequence_choices(cache: Any) -> dict | None:
    """The sequence routers' choices (``id(router)`` -> RouterOutput) kept with a KV cache, or None."""
    carrier = _carrier(cache)
    return None if carrier is None else getattr(carrier, _CHOICES, None)


def _keep_choices(cache: Any, choices: dict) -> None:
    carrier = _carrier(cache)
    if carrier is not None:
        try:
            setattr(carrier, _CHOICES, choices)
        except (AttributeError, TypeError):  # takes no attributes: a continuation of it raises, naming the problem
            pass


def _drafts_error(kw: dict, continuation: bool) -> str | None:
    """Why a sequence router cannot route this call, if it is assisted decoding's first: a call that starts a KV
    cache and keeps the logits of more than its last position scores the prompt followed by draft tokens."""
    keep = kw.get("logits_to_keep", kw.get("num_logits_to_keep"))  # num_: transformers < 4.50
    if continuation or _cache_in(kw) is None or not isinstance(keep, int) or keep <= 1:
        return None
    return (f"this call starts a KV cache and keeps the logits of its last {keep} positions, as assisted decoding "
            "(generate(assistant_model=...) or prompt_lookup_num_tokens) does with the prompt followed by the "
            "assistant's draft tokens; the router would choose each sequence's experts from the drafts too, and "
            "greedy output would change with the assistant. Generate without assisted decoding (or call the model "
            "with logits_to_keep=1, or without a cache)")


def _padding_mask(mask: Any, tokens: Tensor | None, continuation: bool) -> tuple[Tensor | None, str | None]:
    """The call's (batch, positions) padding mask, 1 for a real token, and where a sequence router cannot get it,
    why. A 2-D mask is one. generate with a static cache (cache_implementation="static", or any compilable cache)
    passes a 4-D (batch, 1, queries, keys) mask, boolean or additive (0 where a query sees a key), with keys beyond
    the prompt for the cache's empty slots: in a call that starts the sequences, a position is real where its query
    sees its own key, which holds for causal, sliding-window and bidirectional masks alike. A call that continues a
    cache needs none (its sequence routers reuse their choice, and the mask covers the cache, not the new tokens)."""
    if isinstance(mask, dict):  # per layer type (transformers' models with sliding-window layers)
        mask = mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask, None
    if mask is None or continuation or (isinstance(mask, Tensor) and mask.dim() != 4):
        return None, None
    if isinstance(mask, Tensor) and tokens is not None:
        batch, n = tokens.shape[0], tokens.shape[1]
        if mask.shape[0] in (1, batch) and mask.shape[-2] == n and mask.shape[-1] >= n:
            own = mask[:, 0, :, :n].diagonal(dim1=-2, dim2=-1)  # (batch, n): each query and its own key
            if own.dtype == torch.bool:
                real = own
            elif own.is_floating_point():
                real = own > torch.finfo(own.dtype).min / 2
            else:
                real = own != 0
            return real.expand(batch, n), None
    what = f"a {type(mask).__name__}" if not isinstance(mask, Tensor) else f"of shape {tuple(mask.shape)}"
    return None, (f"the call's attention mask ({what}) is not one the routers can read the padding from, so the "
                  "router would pool padding into each sequence's choice. Pass a 2-D attention_mask (batch, "
                  "tokens), or generate with the default dynamic cache (a static cache under flex attention "
                  "passes a BlockMask)")


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


class _RecomputeIn:
    """A function a checkpoint runs, bound to the routing of the model call it ran in: when the checkpoint
    recomputes it inside the backward, the routers inside read that call's snapshot (``context.recompute``), not
    the context of whichever call ran last (the next micro-batch, DPO's rejected half, an evaluation)."""

    def __init__(self, function: Any, context: RoutingContext, call: RoutingContext):
        self.function, self.context, self.call = function, context, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not in_backward():  # the first pass (a reentrant checkpoint's runs in a no-grad forward, not a backward)
            return self.function(*args, **kwargs)
        context = self.context
        outer, context.recompute = context.recompute, self.call
        try:
            return self.function(*args, **kwargs)
        finally:  # also when a non-reentrant recompute stops early, once it has what the backward needs
            context.recompute = outer


class _CheckpointRouting:
    """A module's ``_gradient_checkpointing_func`` (what transformers' checkpointed layers, and older models' layer
    loops, checkpoint through) that binds each checkpointed function to the call in progress (_RecomputeIn). The
    model's call hooks put it in place of whatever function checkpointing was enabled with, before or after
    ``inject``. A class, so a deep copy of the model binds to the copy's context."""

    def __init__(self, checkpoint: Any, context: RoutingContext):
        self.checkpoint, self.context = checkpoint, context

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        context = self.context
        # compiled: the recompute is part of the compiled backward, which runs no Python forward
        if context.in_call and not torch.compiler.is_compiling():
            function = _RecomputeIn(function, context, context.snapshot())
        return self.checkpoint(function, *args, **kwargs)


_CHECKPOINT_FUNC = "_gradient_checkpointing_func"


def _checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that transformers gives a checkpoint function (``gradient_checkpointing_enable``
    sets one on every module with a ``gradient_checkpointing`` flag)."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def _bind_checkpoints(modules: list[nn.Module], context: RoutingContext) -> None:
    """Wrap each module's checkpoint function in _CheckpointRouting, where checkpointing put a new one."""
    for module in modules:
        function = module.__dict__.get(_CHECKPOINT_FUNC)
        if function is not None and type(function) is not _CheckpointRouting:
            module.__dict__[_CHECKPOINT_FUNC] = _CheckpointRouting(function, context)


def unbind_checkpoints(model: nn.Module) -> None:
    """Put back the checkpoint functions _CheckpointRouting wraps (mol.unload)."""
    for module in model.modules():
        function = module.__dict__.get(_CHECKPOINT_FUNC)
        if type(function) is _CheckpointRouting:
            module.__dict__[_CHECKPOINT_FUNC] = function.checkpoint


class _RoutingCallHooks:
    """Forward hooks on a model that keep its routers' RoutingContext up to date with each call: the
    attention mask the caller passed, and whether the call continues a KV cache. A class with bound methods, not
    closures, so a deep copy of the model gets hooks that update the copy's context.

    The model's own hooks, and those of its inner model (``base_model``, ``get_decoder()``: ``model.model(...)``
    is a common call for embeddings or a reward head), start a call only when none is in progress: the first of
    them to run owns the call, and ends it. An outer call whose arguments say nothing the routers can read (a
    wrapper of the user's own, ``forward(self, batch)``, around a Hugging Face model) leaves the description to
    each model call inside it: the first hook to run in that one describes it, and ends its part. ``wrapper=True``
    (the hooks of such a module): the wrapper's own layers that run outside those parts (a head on the model's
    output) route each example on its own, with the padding of the part whose shape their input has
    (``RoutingContext.outside_masks``), not the batch as one sequence.

    ``encoder=True``: the hooks of an encoder-decoder model's encoder. While the encoder runs, its routers see the
    encoder's own tokens and padding mask, and the decoder's view comes back after it; an encoder called on its own
    (``generate`` runs it before the decode loop) is a call of its own. An encoder that runs inside a call that
    continues a cache (a decode loop that passes the encoder's input at every step) routes that input afresh, as
    in the call that started the cache: the continuation, and the choices reused, are the decoder's."""

    # class defaults (read only): hooks pickled before these existed have them
    _checkpointing: list[nn.Module] = []
    _wrapper = False
    _outside: tuple[Tensor, ...] | None = None  # the wrapper's outside_masks, while a part of its call runs
    _outside_states: tuple = ()  # and its outside_states
    _part_masks: tuple[Tensor, ...] = ()  # the padding masks the caller gave the part in progress

    def __init__(self, context: RoutingContext, encoder: bool = False, checkpointing: list[nn.Module] = (),
                 wrapper: bool = False):
        self.context, self.encoder, self._wrapper = context, encoder, wrapper
        # the modules of the hooked model whose checkpoint function its calls bind (_CheckpointRouting)
        self._checkpointing = list(checkpointing)
        self._cache: Any = None  # the KV cache the call in progress came with
        self._resume: tuple | None = None  # encoder: (the continued call's choices,) while the encoder runs
        self._outer: tuple | None = None  # encoder: the model call's view of its tokens, while the encoder runs
        self._encoder_mask: Tensor | None = None  # encoder: the padding mask of its tokens, while it runs
        self._owns = False  # these hooks started the call in progress
        self._inside = False  # ... or describe the part of one that an outer call left undescribed

    def before(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self.context
        if self.encoder:
            self._encoder_before(model, args, kwargs)
            return
        # an inner model inside the model's call: the call is already described (by the caller's own arguments)
        self._owns, self._inside = not context.in_call, False
        if not self._owns:
            if not _undescribed(context):
                return
            # the outer call's arguments described nothing (a wrapper's forward(batch)): this call describes its part
            self._owns = self._inside = True
            self._outside, self._outside_states = context.outside_masks, context.outside_states
            context.in_call = False
        if self._checkpointing and model.training and not torch.compiler.is_compiling():
            # a dict lookup per checkpointable layer: checkpointing may have been enabled since the last call
            _bind_checkpoints(self._checkpointing, context)
        kw = call_kwargs(model, args, kwargs)
        self._cache = _cache_in(kw)
        # from the real arguments: an encoder-decoder's cache (EncoderDecoderCache) gives its decoder
        # self-attention's length, so its decode steps continue the sequences the first decoder call started
        continuation = _continues_cache(kw)
        # an encoder-decoder's call describes its decoder's tokens: the encoder's hooks swap in the encoder's own
        encoder_decoder = _is_encoder_decoder(model)
        tokens, mask, mask_error = _tokens_and_mask(kw, continuation, "decoder_" if encoder_decoder else "")
        if encoder_decoder and tokens is None and isinstance(kw.get("labels"), Tensor) and kw["labels"].dim() == 2:
            tokens = kw["labels"]  # the decoder's inputs are the labels shifted right: their shape, the decoder's
        batch = next((kw[k] for k in _BATCHED if isinstance(kw.get(k), Tensor) and kw[k].dim() >= 2), None)
        choices = sequence_choices(self._cache) if continuation else None
        context.begin_call(tokens, mask, continuation, batch=batch, choices=choices,
                           sequence_error=mask_error or _drafts_error(kw, continuation))
        if self._inside:  # the caller's mask: a head of the wrapper's on this call's output has its positions
            self._part_masks = () if mask is None else (mask,)
        elif self._wrapper and _undescribed(context):
            context.outside_masks = ()  # its own layers run outside any model call, until one starts
        if encoder_decoder:  # the encoder's states given (generate's decoder calls), or none yet
            encoded = kw.get("encoder_outputs")
            memory = encoded[0] if isinstance(encoded, (tuple, list)) or hasattr(encoded, "last_hidden_state") \
                else None
            context.memory = memory if isinstance(memory, Tensor) else None
            encoder_mask = kw.get("attention_mask")
            context.memory_mask = encoder_mask if isinstance(encoder_mask, Tensor) and encoder_mask.dim() == 2 else None

    def after(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.encoder:
            self._encoder_after(output)
            return
        if not self._owns:
            return
        context, cache, self._cache, self._owns = self.context, self._cache, None, False
        try:
            if context.in_call and context.choices is not None:
                # the choices go with the cache the call came with and the one it returned (the same Cache object,
                # or new legacy tuples): a call that starts sequences replaces whatever the cache kept before
                for c in (cache, _output_cache(output)):
                    if c is not None:
                        _keep_choices(c, context.choices)
        finally:
            inside, outside, masks, states = self._inside, self._outside, self._part_masks, self._outside_states
            layers_mask = context.attention_mask
            # the caller's mask given before (a second pass over one batch): its layers' mask, which prompt tuning
            # builds afresh each call, is the padding the first pass added, not another one
            again = bool(masks) and outside is not None and any(masks[0] is o for o in outside)
            if inside and layers_mask is not None and not again:  # its layers' (prompt tuning's: with virtual
                masks += (layers_mask,)                             # tokens)
            self._inside, self._outside, self._part_masks = False, None, ()
            context.end_call()
            if inside:  # the outer call goes on, as undescribed as it came
                context.in_call = True
                _leave_part(context, outside, masks, states, output, layers_mask)


    def _encoder_before(self, encoder: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self.context
        tokens, mask, mask_error = _tokens_and_mask(call_kwargs(encoder, args, kwargs), False, "")
        self._encoder_mask = mask
        # called by a wrapper's forward outside the model's own call: it describes its part, as a model call would
        self._outside = context.outside_masks if context.in_call else None
        self._outside_states = context.outside_states
        self._owns = not context.in_call or self._outside is not None
        if self._owns:
            context.in_call = False
            context.begin_call(tokens, mask, False, batch=tokens, sequence_error=mask_error)
            return
        self._outer = (context._batch_shape, context._shape_of, context._batch_of, context.attention_mask,
                       context._weights, context.sequence_error)
        if context.continuation:
            self._resume, context.continuation, context.choices = (context.choices,), False, {}
        context.begin_call(tokens, mask, False, batch=tokens)
        context.sequence_error = mask_error

    def _encoder_after(self, output: Any) -> None:
        context, mask, self._encoder_mask = self.context, self._encoder_mask, None
        if self._owns:
            self._owns, outside, self._outside = False, self._outside, None
            context.end_call()
            if outside is not None:
                context.in_call = True
                masks = () if mask is None else (mask,)
                _leave_part(context, outside, masks, self._outside_states, output, mask)
            return
        if self._outer is not None:
            (context._batch_shape, context._shape_of, context._batch_of, context.attention_mask,
             context._weights, context.sequence_error), self._outer = self._outer, None
        # what the decoder's cross-attention reads, and its padding (with prompt tuning's virtual tokens in front)
        states = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
        context.memory = states if isinstance(states, Tensor) else None
        context.memory_mask = mask
        if self._resume is not None:
            context.continuation, context.choices, self._resume = True, self._resume[0], None


def _leave_part(context: RoutingContext, outside: tuple[Tensor, ...] | None, masks: tuple[Tensor, ...],
                states: tuple, output: Any, layers_mask: Tensor | None) -> None:
    """A model call inside a wrapper's call returned: the wrapper's layers after it get its padding masks, and its
    returned (batch, positions, hidden) states keep the mask of their shape (for a head on them after several
    calls padded to one width)."""
    if outside is None:
        return
    # by identity: the same mask given to two calls (a wrapper calling the model twice) is one padding
    context.outside_masks = outside + tuple(m for i, m in enumerate(masks)
                                            if all(m is not o for o in (*outside, *masks[:i])))
    if torch.compiler.is_compiling():  # no weak references in a traced graph: several calls' masks of one
        return                          # shape then stay unknown, as for any new tensor
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    found = [t for v in values for t in (v if isinstance(v, (tuple, list)) else (v,))
             if isinstance(t, Tensor) and t.dim() == 3]
    candidates = (*(() if layers_mask is None else (layers_mask,)), *masks)  # its layers' first: they saw them
    pairs = ((t, next((m for m in candidates if tuple(m.shape) == tuple(t.shape[:2])), None)) for t in found)
    context.outside_states = states + tuple((weakref.ref(t), m) for t, m in pairs if m is not None)


def _undescribed(context: RoutingContext) -> bool:
    """Whether the call in progress told the routers nothing: no tokens, batch, mask, cache or encoder states."""
    return (context._shape_of is None and context._batch_of is None and context._batch_shape is None
            and context.attention_mask is None and not context.continuation and context.sequence_error is None
            and context.memory is None and context.memory_mask is None)


def _tokens_and_mask(kw: dict, continuation: bool, prefix: str) -> tuple[Tensor | None, Tensor | None, str | None]:
    """A call's tokens (``input_ids`` or ``inputs_embeds``, or the decoder's with ``prefix="decoder_"``), its
    padding mask, and why a sequence router cannot read one (see _padding_mask)."""
    tokens = next((kw[prefix + k] for k in ("input_ids", "inputs_embeds") if isinstance(kw.get(prefix + k), Tensor)),
                  None)
    mask, mask_error = _padding_mask(kw.get(prefix + "attention_mask"), tokens, continuation)
    return (mask if tokens is None else tokens), mask, mask_error


def routing_context(model: nn.Module) -> RoutingContext:
    """The model's RoutingContext, made and hooked to its forward (and its inner model's) on first use. Every
    module whose calls it hooks keeps it as ``mol_routing_context``, as the model does."""
    context = getattr(model, "mol_routing_context", None)
    if context is None:
        # An inject on a model inside this one (before this inject, which takes its adapter over) hooked that model
        # to a context of its own: one context for all, or the model's calls would be hooked twice, to two
        # contexts, and prompt tuning's hook would tell only one of them of its virtual tokens.
        found: list[RoutingContext] = []
        for module in model.modules():
            other = module.__dict__.get("mol_routing_context")
            if other is not None and all(other is not c for c in found):
                found.append(other)
        context = found[0] if found else RoutingContext()
        for other in found[1:]:
            _rebind(model, other, context)
        hooked: list[nn.Module] = []
        # and the Hugging Face models inside a wrapper of the user's own, whose forward may take its inputs in any
        # form (forward(self, batch)): their calls carry the mask by name
        inner = [m for m in hf_models(model) if m is not model]  # empty for a Hugging Face model itself
        for outer in [model, *inner]:
            if "mol_routing_context" in outer.__dict__:  # hooked already, with its inner models and encoder
                continue
            for module in [outer, *_inner_models(outer)]:
                if any(module is m for m in hooked) or "mol_routing_context" in module.__dict__:
                    continue
                hooked.append(module)
                hooks = _RoutingCallHooks(context, checkpointing=_checkpointing_modules(module),
                                          wrapper=module is model and bool(inner))
                # first among pre-hooks: the caller's own mask and cache, before prefix / prompt tuning extend them
                module.register_forward_pre_hook(hooks.before, with_kwargs=True, prepend=True)
                module.register_forward_hook(hooks.after, with_kwargs=True, always_call=True)
            encoder = _encoder_of(outer)
            if encoder is not None:
                hooks = _RoutingCallHooks(context, encoder=True)
                # last among pre-hooks: the encoder's tokens and mask as its layers get them, after prompt tuning's
                # hook (prepended) put its virtual tokens in front
                encoder.register_forward_pre_hook(hooks.before, with_kwargs=True)
                encoder.register_forward_hook(hooks.after, with_kwargs=True, always_call=True)
        # prompt tuning's hook on a hooked model (mol.methods.prefix) tells the context of its virtual tokens: it
        # finds it there, also on a Hugging Face model inside a wrapper and on a model's inner model
        for module in [model, *hooked]:
            module.mol_routing_context = context
    return context


def _rebind(model: nn.Module, old: RoutingContext, new: RoutingContext) -> None:
    """Point everything in ``model`` that uses ``old`` (the routers, the call and checkpoint hooks, the modules'
    ``mol_routing_context``) at ``new``. Between calls a context holds no state of its own worth keeping."""
    for module in model.modules():
        if module.__dict__.get("mol_routing_context") is old:
            module.mol_routing_context = new
        router = getattr(module, "router", None)
        if getattr(router, "context", None) is old:
            router.context = new
        function = module.__dict__.get(_CHECKPOINT_FUNC)
        if type(function) is _CheckpointRouting and function.context is old:
            function.context = new
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, _RoutingCallHooks) and owner.context is old:
                    owner.context = new


def hf_models(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models (``PreTrainedModel``) in ``model``: the model itself if it is one, else
    those a module of the user's own holds."""
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported already
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None:
        return []
    found: list[nn.Module] = []
    stack = [model]
    while stack:
        module = stack.pop()
        if isinstance(module, pretrained):
            if all(module is not m for m in found):
                found.append(module)
        else:
            stack.extend(reversed(list(module.children())))
    return found


def _inner_models(model: nn.Module) -> list[nn.Module]:
    """The modules a caller may call instead of the model: its base model and, in a decoder-only model, its
    decoder (a multimodal model's language model)."""
    found: list[nn.Module] = []
    candidates = [getattr(model, "base_model", None)]
    get = getattr(model, "get_decoder", None)
    if callable(get) and not _is_encoder_decoder(model):
        try:
            candidates.append(get())
        except (AttributeError, NotImplementedError, ValueError, TypeError):
            pass
    for module in candidates:
        if isinstance(module, nn.Module) and module is not model and all(module is not m for m in found):
            found.append(module)
    return found


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """An encoder-decoder model's encoder (``get_encoder()``), or None."""
    get = getattr(model, "get_encoder", None)
    if not _is_encoder_decoder(model) or not callable(get):
        return None
    try:
        encoder = get()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None

