"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021) for Hugging Face models.

Both add ``num_virtual_tokens`` trainable positions in front of every sequence, computed as Hugging Face PEFT does:

- prefix tuning: trainable keys and values for every attention layer, pre-filled into the KV cache (a
  ``transformers`` ``Cache``), optionally produced by a reparameterisation MLP;
- prompt tuning: trainable embeddings prepended to the input embeddings.

The trainable tensors live in a small module attached to the model (``model.mol_prefix`` / ``model.mol_prompt``), so
``inject``/``save_adapter``/``load_adapter`` treat them like any other adapter tensor. Injected on a module of the
user's own that holds one Hugging Face model, they go on that model (``wrapper.lm.mol_prompt``). A forward pre-hook
on the model rewrites each call: it prepends the virtual positions to the attention mask, fills a fresh cache with the
prefix (or prepends the prompt embeddings) and shifts positions. Callers keep counting only their own tokens
(attention masks, position ids, labels, generation), so ``model.generate`` works with and without the KV cache.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from mol.config import MethodConfig, check_adapter_dtype, check_modules_to_save, register_config
from mol.calls import call_kwargs, hf_models
from mol.inject import register_method, tuple_loss_index
from mol.layers import AdapterLayer, adapter_dtype_for
from mol.methods._util import config_int, text_config

PROMPT_INITS = ("vocab", "random")


def _check_tokens(name: str, n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}.num_virtual_tokens must be a positive integer, got {n!r}; e.g. 20")


@register_config
@dataclass
class PrefixTuningConfig(MethodConfig):
    """Trainable key/value prefixes of ``num_virtual_tokens`` positions for every attention layer.

    ``prefix_projection``: produce the prefixes from ``num_virtual_tokens`` embeddings through a two-layer tanh MLP
    of width ``encoder_hidden_size`` (None: the key/value width), as in the paper and PEFT. ``adapter_dtype``: as
    MoLConfig's ("auto": float32 on a 16-bit model, as PEFT; the prefixes are cast to the model's dtype per call).
    ``modules_to_save``: as MoLConfig's (trained in full, saved along).
    """

    method: ClassVar[str] = "prefix"

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    adapter_dtype: str = "auto"
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _check_tokens("PrefixTuningConfig", self.num_virtual_tokens)
        check_adapter_dtype(self)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"PrefixTuningConfig.prefix_projection must be true or false, "
                             f"got {self.prefix_projection!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"PrefixTuningConfig.encoder_hidden_size must be a positive integer or None, got "
                             f"{self.encoder_hidden_size!r}")
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("PrefixTuningConfig.encoder_hidden_size only applies with prefix_projection=True; "
                             "set prefix_projection=True or leave encoder_hidden_size=None")
        check_modules_to_save(self)


@register_config
@dataclass
class PromptTuningConfig(MethodConfig):
    """``num_virtual_tokens`` trainable input embeddings prepended to every sequence.

    ``init``: ``"vocab"`` copies embeddings of random vocabulary tokens (PEFT's SAMPLE_VOCAB), ``"random"`` draws
    from N(0, 1) (PEFT's RANDOM). As in PEFT, the loss covers the virtual positions (labels -100) and given
    ``position_ids`` are ignored (the model numbers positions itself, virtual tokens first); unlike PEFT, token
    logits come back for the caller's tokens only, so they line up with ``input_ids`` and ``labels`` (a question-
    answering head's span logits too, and its ``start_positions`` / ``end_positions`` count the caller's tokens); on a
    sequence classifier the call keeps ``input_ids`` (placeholders for the virtual tokens), from which Hugging Face's
    decoder classifiers find each sequence's last real token to pool (PEFT's pool the last position, padding or not).
    ``adapter_dtype``: as MoLConfig's ("auto": float32 embeddings on a 16-bit model, as PEFT).
    ``modules_to_save``: as MoLConfig's (trained in full, saved along).
    """

    method: ClassVar[str] = "prompt"

    num_virtual_tokens: int = 20
    init: str = "vocab"
    adapter_dtype: str = "auto"
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _check_tokens("PromptTuningConfig", self.num_virtual_tokens)
        check_adapter_dtype(self)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptTuningConfig.init={self.init!r} is unknown; choose one of {PROMPT_INITS}")
        check_modules_to_save(self)


class _VirtualTokens(AdapterLayer):
    """Shared plumbing of prefix and prompt tuning: the hooks that add virtual positions to every call."""

    num_virtual_tokens: int
    holder_attr: str = ""  # its name in the model it is attached to (_attach)

    def attach(self, model: nn.Module) -> None:
        # Bound methods (not closures), so copy.deepcopy(model) gives hooks that point at the copy.
        model.register_forward_pre_hook(self._on_call, with_kwargs=True)
        model.register_forward_hook(self._on_return, with_kwargs=True)

    def _unit(self, holder: nn.Module) -> nn.Module:
        """What the hooks call for the virtual tokens: this module, or what took its place in ``holder`` (an FSDP
        unit of its own, mol.train.fsdp.adapter_units, whose tensors are whole only inside its forward)."""
        unit = holder._modules.get(self.holder_attr)
        return self if unit is None else unit

    # the hooks as registered: nothing while mol.disable_adapters holds the layer, else the method's own
    def _on_call(self, model: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        return None if self.disabled else self._pre_hook(model, args, kwargs)

    def _on_return(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output if self.disabled else self._post_hook(model, args, kwargs, output)

    def merge_blocker(self) -> Optional[str]:
        return f"{type(self).__name__} adds virtual tokens, which no weight can absorb"

    @staticmethod
    def _use_cache(model: nn.Module, kw: dict) -> bool:
        use = kw.get("use_cache")
        return bool(getattr(getattr(model, "config", None), "use_cache", True) if use is None else use)

    def _common(self, model: nn.Module, kw: dict) -> tuple[int, bool]:
        """Batch size and whether this call starts a sequence (no cache, or an empty one); extends the mask."""
        from transformers import Cache

        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            raise ValueError(f"{type(self).__name__} needs input_ids or inputs_embeds in the call")
        batch = x.shape[0]
        key = _cache_key_in(model, kw)
        cache = kw.get(key)
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"{type(self).__name__} needs {key} as a transformers Cache (e.g. DynamicCache), "
                            f"got {type(cache).__name__}")
        fresh = cache is None or not self._use_cache(model, kw) or cache.get_seq_length() == 0
        mask = kw.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                why = (" (generate() builds a 4-D one for a static or sliding-window cache, "
                       "cache_implementation=...: generate with the default dynamic cache)"
                       if isinstance(mask, Tensor) and mask.dim() == 4 else "")
                raise ValueError(f"{type(self).__name__} needs a 2-D attention_mask (batch, tokens) counting only the "
                                 f"real tokens, to add the virtual tokens to; got {_shape_of(mask)}{why}")
            kw["attention_mask"] = _real_in_front(mask, self.num_virtual_tokens)
        return batch, fresh

    def _post_hook(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        key = cache_kwarg(model) or "past_key_values"
        if not self._use_cache(model, kwargs) and getattr(output, key, None) is not None:
            # the cache we built only carried the virtual tokens through this call. A ModelOutput keeps its dict
            # entry when the attribute is set to None (and refuses `del`): drop the entry, or out[key],
            # to_tuple() and generate(use_cache=False) beam search would still meet it
            if isinstance(output, OrderedDict) and key in output:
                OrderedDict.__delitem__(output, key)
            setattr(output, key, None)
        return output


class PrefixEncoder(_VirtualTokens):
    """Keys and values of ``num_virtual_tokens`` positions for ``num_layers`` attention layers.

    Tensor layout as PEFT's ``PrefixEncoder``: ``embedding.weight`` is (tokens, layers * 2 * kv_dim) without the
    projection, or (tokens, kv_dim) fed through ``transform`` (Linear, Tanh, Linear) with it.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 projection: bool = False, encoder_hidden_size: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        kv_dim = num_kv_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        if projection:
            hidden = encoder_hidden_size or kv_dim
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, num_layers * 2 * kv_dim, **kw))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, num_layers * 2 * kv_dim, **kw)
            self.transform = None

    def forward(self, batch: int, dtype: torch.dtype) -> Tensor:
        """(2 * layers, batch, kv_heads, tokens, head_dim): layer i's keys at 2i, values at 2i + 1."""
        p = self.embedding.weight
        # a tensor of its own, never a view of the weight: an FSDP unit frees its gathered weights after forward,
        # and the keys and values are read later, in the attention layers (setStorage: ... storage of size 0)
        p = self.transform(p) if self.transform is not None else p.clone()
        n = self.num_virtual_tokens
        p = p.to(dtype).view(n, 2 * self.num_layers, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return p.unsqueeze(1).expand(-1, batch, -1, -1, -1)

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from transformers import DynamicCache

        kw = call_kwargs(model, args, kwargs)
        if model.training and _checkpointing(model):
            raise ValueError(CHECKPOINTING_BLOCKER)
        batch, fresh = self._common(model, kw)
        key = _cache_key_in(model, kw)
        if fresh:
            cache = kw.get(key)
            if cache is None or not self._use_cache(model, kw):
                try:
                    cache = DynamicCache(config=model.config)
                except TypeError:  # transformers < 4.56 builds its layers lazily
                    cache = DynamicCache()
            kv = self._unit(model)(batch, model.get_input_embeddings().weight.dtype)
            for i in range(self.num_layers):
                cache.update(kv[2 * i], kv[2 * i + 1], i)
            kw[key] = cache
        for key in ("position_ids", "cache_position"):  # cache_position: transformers < 5 passes it
            if kw.get(key) is not None:
                kw[key] = kw[key] + self.num_virtual_tokens  # the prefix holds positions 0..n-1
        return (), kw


class PromptEmbedding(_VirtualTokens):
    """``num_virtual_tokens`` trainable input embeddings (``embedding.weight``: tokens x hidden)."""

    # a sequence classifier (not encoder-decoder): its call keeps input_ids, placeholders in front of the caller's,
    # from which the head finds each sequence's last real token (Llama's, GPT-2's ... pool it); the prompted
    # embeddings go to its base model instead (_pending: that call's ids and embeddings, until the base model runs)
    _seq_cls = False
    _pending: Optional[tuple[Tensor, Tensor]] = None

    def __init__(self, num_virtual_tokens: int, word_embeddings: nn.Embedding, init: str = "vocab",
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        w = word_embeddings.weight
        self.embedding = nn.Embedding(num_virtual_tokens, w.shape[1], device=w.device, dtype=dtype or w.dtype)
        if init == "vocab":
            ids = torch.randint(0, w.shape[0], (num_virtual_tokens,), device=w.device)
            with torch.no_grad():
                # through the module, as PEFT's SAMPLE_VOCAB: an embedding that scales its output (Gemma 3's
                # sqrt(hidden)) gives the prompt the scale of the token embeddings it sits beside
                self.embedding.weight.copy_(word_embeddings(ids))
        self._strip = False
        self._encoder_decoder = False

    def forward(self, embeds: Tensor) -> Tensor:
        """The prompt's embeddings in front of each sequence's: (batch, n + S, hidden)."""
        prompts = self.embedding.weight.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompts, embeds], dim=1)

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        # An encoder-decoder model takes the prompt on its encoder's input (Lester et al.'s T5 setting; PEFT's
        # num_transformer_submodules=1): a hook on the encoder itself, which generate() calls on its own
        self._encoder_decoder = bool(getattr(text_config(model), "is_encoder_decoder", False))
        inner = getattr(model, "base_model", None)
        if not self._encoder_decoder and type(model).__name__.endswith("ForSequenceClassification") \
                and isinstance(inner, nn.Module) and inner is not model:
            self._seq_cls = True
            # first among the base model's pre-hooks, so the routers' hook there sees the prompted embeddings
            inner.register_forward_pre_hook(self._on_base_model_call, with_kwargs=True, prepend=True)
        if self._encoder_decoder:
            # first among the encoder's pre-hooks: the routers' hook (mol.calls) reads the prompted tokens and mask
            # (the model bound too: the prompt is called through it, _unit; a partial of a bound method, which
            # copy.deepcopy(model) points at the copy as it does the bound method)
            hook = functools.partial(self._on_encoder_call, model)
            model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True, prepend=True)

    def _on_base_model_call(self, inner: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        """A sequence classifier's base model, called by its head's forward: the prompted embeddings replace the
        ids (placeholders in front) that the classifier's own call kept."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        kw = call_kwargs(inner, args, kwargs)
        ids, kept = kw.get("input_ids"), pending[0]
        if ids is not kept and not (isinstance(ids, Tensor) and ids.shape == kept.shape
                                    and torch.equal(ids.to(kept.device), kept)):
            # the placeholders would reach the embeddings in the prompt's place: say so rather than compute that
            raise ValueError(f"prompt tuning: {type(inner).__name__} got other input_ids from its classifier than "
                             "the classifier's call had, so the prompt cannot replace their placeholders; pass "
                             "inputs_embeds instead of input_ids to this model")
        kw["inputs_embeds"], kw["input_ids"] = pending[1], None
        return (), kw

    def _on_encoder_call(self, model: nn.Module, encoder: nn.Module, args: tuple,
                         kwargs: dict) -> Optional[tuple[tuple, dict]]:
        return None if self.disabled else self._encoder_pre_hook(model, encoder, args, kwargs)

    def _encoder_pre_hook(self, model: nn.Module, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The prompt in front of the encoder's input; its mask extended unless the model's own hook did."""
        kw = call_kwargs(encoder, args, kwargs)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            if kw.get("input_ids") is None:
                raise ValueError(f"{type(self).__name__} needs input_ids or inputs_embeds in the encoder's call")
            embeds = encoder.get_input_embeddings()(kw["input_ids"])
        kw["inputs_embeds"], kw["input_ids"] = self._unit(model)(embeds), None
        mask = kw.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == embeds.shape[1]:
            kw["attention_mask"] = _real_in_front(mask, self.num_virtual_tokens)
        return (), kw

    def _encoder_decoder_pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """An encoder-decoder model's call: the encoder's hook adds the prompt; here only the caller's encoder mask
        (which the decoder's cross-attention reads too) gains the virtual positions. Labels, decoder inputs and
        logits are the decoder's and stay as they are."""
        kw = call_kwargs(model, args, kwargs)
        mask = kw.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            n, encoded = self.num_virtual_tokens, kw.get("encoder_outputs")
            if encoded is not None:  # generate()'s decode steps: the encoder ran with the prompt already
                extend = mask.shape[1] + n == encoded[0].shape[1]
            else:
                x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
                extend = x is not None and mask.shape[1] == x.shape[1]
            if extend:
                kw["attention_mask"] = _real_in_front(mask, n)
                # the routers' mask of the encoder states (set by mol.inject's first pre-hook from the caller's)
                context = getattr(model, "mol_routing_context", None)
                if context is not None and context.in_call and context.memory_mask is mask:
                    context.memory_mask = kw["attention_mask"]
        return (), kw

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._encoder_decoder:
            return self._encoder_decoder_pre_hook(model, args, kwargs)
        kw = call_kwargs(model, args, kwargs)
        batch, fresh = self._common(model, kw)
        n = self.num_virtual_tokens
        # As PEFT: the model numbers positions itself (virtual tokens first), so given position ids are dropped.
        kw.pop("position_ids", None)
        kw.pop("cache_position", None)  # transformers < 5: let the model count from the cache, as PEFT does
        self._strip, self._pending = fresh, None
        if not fresh:
            return (), kw
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        prompted = self._unit(model)(embeds)
        if self._seq_cls and ids is not None and kw.get("inputs_embeds") is None:
            # HF's decoder classifiers pool each sequence's last token that is not pad_token_id, read from input_ids
            # (given embeddings alone, the last position, padding or not): the ids stay, the virtual tokens as
            # placeholders that are no padding, and the base model gets the embeddings (_on_base_model_call)
            fill = 1 if getattr(getattr(model, "config", None), "pad_token_id", None) == 0 else 0
            kw["input_ids"] = torch.cat([ids.new_full((batch, n), fill), ids], dim=1)
            self._pending = (kw["input_ids"], prompted)
        else:
            kw["inputs_embeds"], kw["input_ids"] = prompted, None
        self._length = embeds.shape[1]
        if (tt := kw.get("token_type_ids")) is not None:
            kw["token_type_ids"] = torch.cat([tt.new_zeros(batch, n), tt], dim=1)
        labels = kw.get("labels")
        if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[1] == embeds.shape[1]:
            kw["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)  # virtual tokens: no loss
        for key in _SPAN_POSITIONS:  # question answering: the answer span's token indices, now past the prompt
            if isinstance(kw.get(key), Tensor):
                kw[key] = kw[key] + n
        # The routers' view of the call (set by mol.inject's first pre-hook, from the caller's tokens and mask) must
        # cover what the layers now see: the virtual tokens, as real ones, before the caller's. Without this a
        # routed layer's (batch, n + S) input met a (batch, S) mask and counted the padding (prefix tuning adds
        # keys and values only, so its layers keep the caller's S positions and view).
        context = getattr(model, "mol_routing_context", None)
        if context is not None and context.in_call:
            context.begin_call(prompted, kw.get("attention_mask"), context.continuation)
        return (), kw

    def _post_hook(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        output = super()._post_hook(model, args, kwargs, output)
        strip, self._strip, self._pending = self._strip, False, None
        n = self.num_virtual_tokens
        if isinstance(output, tuple):  # return_dict=False: the logits follow the loss when the call had labels
            i = 1 if tuple_loss_index(model, args, kwargs, output) == 0 else 0
            logits = output[i] if len(output) > i else None
        else:
            logits = getattr(output, "logits", None)
        if strip and isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[1] == n + self._length:
            # Token logits line up with the caller's tokens again (the loss above already saw the full sequence).
            if isinstance(output, tuple):
                return output[:i] + (logits[:, n:],) + output[i + 1:]
            output.logits = logits[:, n:]
        if strip and type(model).__name__.endswith("ForQuestionAnswering"):
            # the span logits (batch, n + S) likewise: (start_logits, end_logits), after the loss where there is one
            def caller_s(t: Any) -> Any:
                return t[:, n:] if isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == n + self._length else t

            if isinstance(output, tuple):
                kw = call_kwargs(model, args, kwargs)
                j = 1 if all(kw.get(k) is not None for k in _SPAN_POSITIONS) and output and output[0].dim() == 0 else 0
                return output[:j] + tuple(caller_s(t) for t in output[j:j + 2]) + output[j + 2:]
            for name in ("start_logits", "end_logits"):
                if getattr(output, name, None) is not None:
                    setattr(output, name, caller_s(getattr(output, name)))
        return output


# a question-answering model's labels: the answer span's first and last token
_SPAN_POSITIONS = ("start_positions", "end_positions")


def _real_in_front(mask: Tensor, n: int) -> Tensor:
    """A (batch, S) attention mask with n real positions (the virtual tokens) in front: (batch, n + S)."""
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _shape_of(x: Any) -> str:
    return f"a {x.dim()}-D tensor {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


CHECKPOINTING_BLOCKER = (
    "prefix tuning reaches the attention layers through the KV cache, which transformers drops from checkpointed "
    "layers in training (it sets past_key_values=None): turn activation checkpointing off "
    "(model.gradient_checkpointing_disable(), or model.gradient_checkpointing=false in mol.train), or use prompt "
    "tuning, which works with it")


def _checkpointing(model: nn.Module) -> bool:
    # what transformers' is_activation_checkpointing (4.x: is_gradient_checkpointing) looks at, in any version
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def cache_kwarg(model: nn.Module) -> Optional[str]:
    """The name a Hugging Face model's forward takes its KV cache under: ``past_key_values``, or ``cache`` from
    transformers 5.24 on (its outputs use the same name); None when it takes neither."""
    params = inspect.signature(model.forward).parameters
    for name in ("past_key_values", "cache"):
        if name in params:
            return name
    return None


def _cache_key_in(model: nn.Module, kw: dict) -> str:
    # the name this call carries its cache under (generate() may still pass the deprecated past_key_values)
    for name in ("cache", "past_key_values"):
        if kw.get(name) is not None:
            return name
    return cache_kwarg(model) or "past_key_values"


def _attach(model: nn.Module, attr: str, module: _VirtualTokens) -> str:
    for other in ("mol_prefix", "mol_prompt"):
        if hasattr(model, other):
            raise ValueError(f"{type(model).__name__} already carries {other}; use one of prefix or prompt tuning "
                             "per model (inject on a fresh model)")
    model.add_module(attr, module)
    module.holder_attr = attr
    module.attach(model)
    return attr


def _hf_model_in(model: nn.Module, cfg: MethodConfig) -> tuple[nn.Module, str]:
    """The Hugging Face model prefix / prompt tuning goes on and its name in ``model`` plus a dot ("" for ``model``
    itself): a wrapper of the user's own that holds exactly one has it applied to that one, whose config,
    embeddings and calls the method needs (the wrapper's forward may take anything, e.g. a batch dict)."""
    found = hf_models(model)
    if not found and getattr(model, "config", None) is None:
        raise ValueError(f"{type(cfg).__name__} needs a Hugging Face (transformers) model, whose config and input "
                         f"embeddings it uses; {type(model).__name__} is none and holds none: inject it on a "
                         "transformers model, or on a module of your own that holds one")
    # a Hugging Face model itself, or a module with a config of its own that passes the model's inputs through (a
    # value-head wrapper exposing config and get_input_embeddings): the method goes on it, as before wrappers
    # were resolved, so adapters saved from it keep their names
    if not found or any(m is model for m in found) or getattr(model, "config", None) is not None:
        return model, ""
    names = {id(m): n for n, m in model.named_modules() if n}
    if len(found) > 1:
        held = [names[id(m)] for m in found]
        raise ValueError(f"{type(cfg).__name__} on {type(model).__name__}, which holds {len(found)} Hugging Face "
                         f"models ({held}): the virtual tokens go in front of one model's input, and which one is "
                         f"unknown. Inject it on the one you mean, with any other configs for that model, before "
                         f"injecting the wrapper: mol.inject(wrapper.{held[0]}, {type(cfg).__name__}(...)), then "
                         "mol.inject(wrapper, [...]) for the rest")
    return found[0], names[id(found[0])] + "."


@register_method(PrefixTuningConfig)
def _inject_prefix(wrapper: nn.Module, cfg: PrefixTuningConfig) -> list[str]:
    model, where = _hf_model_in(wrapper, cfg)
    hf = text_config(model)
    if getattr(hf, "is_encoder_decoder", False) or cache_kwarg(model) is None:
        raise ValueError(f"prefix tuning supports decoder-only Hugging Face models whose forward takes a "
                         f"past_key_values Cache (Llama, GPT-2, Mistral, Qwen ...); {type(model).__name__} does not: "
                         "use prompt tuning, adapters, IA3, BitFit or LoRA/MoL for it")
    layers = config_int(hf, "num_hidden_layers", "n_layer", "num_layers")
    heads = config_int(hf, "num_attention_heads", "n_head")
    hidden = config_int(hf, "hidden_size", "n_embd", "d_model")
    if None in (layers, heads, hidden):
        raise ValueError(f"cannot read num_hidden_layers/num_attention_heads/hidden_size from "
                         f"{type(model).__name__}.config; prefix tuning needs them")
    kv_heads = config_int(hf, "num_key_value_heads") or heads  # Falcon-40B's cache holds every head: its count
    if getattr(hf, "multi_query", False) is True and not getattr(hf, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B / GPTBigCode multi-query attention: one key-value head in the cache
    head_dim = config_int(hf, "head_dim") or hidden // heads
    w = model.get_input_embeddings().weight
    enc = PrefixEncoder(cfg.num_virtual_tokens, layers, kv_heads, head_dim, cfg.prefix_projection,
                        cfg.encoder_hidden_size, device=w.device, dtype=adapter_dtype_for(cfg.adapter_dtype, w.dtype))
    attr = _attach(model, "mol_prefix", enc)
    return [f"{where}{attr}.{n}" for n, _ in enc.named_parameters()]


@register_method(PromptTuningConfig)
def _inject_prompt(wrapper: nn.Module, cfg: PromptTuningConfig) -> list[str]:
    model, where = _hf_model_in(wrapper, cfg)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(text_config(model), "is_encoder_decoder", False):  # the prompt goes on the encoder's tokens
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
        emb = encoder.get_input_embeddings() if hasattr(encoder, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"prompt tuning needs a model whose input (its encoder's, for an encoder-decoder model) is "
                         f"token ids embedded by an nn.Embedding; {type(model).__name__} has none")
    enc = PromptEmbedding(cfg.num_virtual_tokens, emb, cfg.init,
                          dtype=adapter_dtype_for(cfg.adapter_dtype, emb.weight.dtype))
    attr = _attach(model, "mol_prompt", enc)
    return [f"{where}{attr}.{n}" for n, _ in enc.named_parameters()]
