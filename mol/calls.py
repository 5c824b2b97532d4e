"""How a Hugging Face model's calls reach its routers: a call's arguments by name, and the forward hooks that hand
the routers each call's attention mask, token shape and KV-cache state (``RoutingContext``)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from mol.routers import RoutingContext

_POSITIONAL: dict[Any, list[str]] = {}  # forward function -> its positional parameter names


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


class _RoutingCallHooks:
    """Forward hooks on a model that keep its routers' RoutingContext up to date with each call: the
    attention mask the caller passed, and whether the call continues a KV cache. A class with bound methods, not
    closures, so a deep copy of the model gets hooks that update the copy's context."""

    def __init__(self, context: RoutingContext):
        self.context = context

    def before(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = call_kwargs(model, args, kwargs)
        mask = kw.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # the mask is the encoder's, and a decoder block of the same length could not tell it is not its own
            kw, mask = {}, None
        tokens = next((kw[k] for k in ("input_ids", "inputs_embeds") if isinstance(kw.get(k), Tensor)), mask)
        self.context.begin_call(tokens, mask, _continues_cache(kw))

    def after(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.context.end_call()


def routing_context(model: nn.Module) -> RoutingContext:
    """The model's RoutingContext, made and hooked to its forward on first use."""
    context = getattr(model, "mol_routing_context", None)
    if context is None:
        context = RoutingContext()
        hooks = _RoutingCallHooks(context)
        # first among pre-hooks: the caller's own mask and cache, before prefix / prompt tuning extend them
        model.register_forward_pre_hook(hooks.before, with_kwargs=True, prepend=True)
        model.register_forward_hook(hooks.after, with_kwargs=True, always_call=True)
        model.mol_routing_context = context
    return context

