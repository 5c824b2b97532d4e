"""Walk a model, match target modules, swap in adapter layers, freeze the rest.

Every method registers one function ``(model, config) -> list of trainable parameter names`` with
``@register_method(ConfigClass)``. ``inject`` validates the configs, freezes the model, runs each method,
then unfreezes exactly the adapter tensors (of this call and of earlier ones) plus ``modules_to_save``.
The configs and the trainable names are kept on the model (``model.mol_configs``,
``model.mol_trainable``) so ``save_adapter`` knows what to write and ``load_adapter`` what to expect.

An inject on a module that holds an injected one (a wrapper of the user's own around a Hugging Face model
injected first) takes the inner one's adapter over: its trainable names join the outer list, its configs are
kept with its path (``model.mol_nested``), and save / load / unload / disable_adapters of the outer module cover
both. The modules inside an injected one are marked (``mol_inside_inject``): an inject on one of them later would
freeze the outer inject's tensors in it and stay out of its save, so it is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mol.config import LoRAConfig, MethodConfig, MoLConfig, check_targets, pattern_value
from mol.layers import AdapterLayer, MoLLinear, is_conv1d, linear_forward_problem, not_full_precision
from mol.calls import call_kwargs, hf_models, routing_context

MethodFn = Callable[[nn.Module, MethodConfig], list[str]]
_METHODS: dict[type, MethodFn] = {}


def register_method(config_cls: type) -> Callable[[MethodFn], MethodFn]:
    """Register the function that applies ``config_cls`` to a model (see module docstring)."""
    if not isinstance(config_cls, type):  # inject looks methods up by their config's class
        raise TypeError(f"register_method takes a config class, got {type(config_cls).__name__}; use "
                        "@register_method(MyConfig)")

    def deco(fn: MethodFn) -> MethodFn:
        _METHODS[config_cls] = fn
        return fn

    return deco


def is_linear(module: nn.Module) -> bool:
    """A layer the linear methods adapt: nn.Linear, transformers' Conv1D (GPT-2), or a frozen quantized linear
    (anything marked ``is_quantized_linear``)."""
    return isinstance(module, nn.Linear) or getattr(module, "is_quantized_linear", False) or is_conv1d(module)


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` equals a pattern or ends with it as a dotted suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _under_any(name: str, patterns: Iterable[str], match: Callable[[str, Any], bool] = name_matches) -> bool:
    """The module or one of its parents matches a pattern (by ``match``: name_matches, or quantize's skip rule)."""
    parts = name.split(".")
    return any(match(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def _inside_adapter(name: str, adapters: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in adapters)


def _output_head_names(model: nn.Module) -> set[str]:
    """The names of the output heads of ``model`` and of the Hugging Face models a wrapper of the user's own
    holds (their ``get_output_embeddings()``)."""
    heads = []
    for owner in [model, *hf_models(model)]:
        get = getattr(owner, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Module):
            heads.append(head)
    return {n for n, m in model.named_modules() if any(m is h for h in heads)}


# the attributes Hugging Face's task models keep their new, randomly initialised heads under
_TASK_HEADS = ("classifier", "score", "classification_head", "qa_outputs")
_TASK_MODELS = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification",
                "ForAudioClassification", "ForQuestionAnswering", "ForMultipleChoice")


def _warn_task_heads(model: nn.Module, names: list[str]) -> None:
    """Warn where "all-linear" picked a task model's head: a head fresh from its init needs its own weights
    trained (modules_to_save, as PEFT's task_type="SEQ_CLS" does), not a low-rank update of random weights."""
    modules = list(model.named_modules())
    for owner in [model, *(m for m in hf_models(model) if m is not model)]:
        if not type(owner).__name__.endswith(_TASK_MODELS):
            continue
        heads = [getattr(owner, attr, None) for attr in _TASK_HEADS]
        found = [n for n, m in modules if any(m is h for h in heads if isinstance(h, nn.Module))]
        hits = [n for n in names if any(n == h or n.startswith(h + ".") for h in found)]
        if hits:
            warnings.warn(f"target_modules='all-linear' adapts {hits}, the task head of {type(owner).__name__}, "
                          f"which starts from random weights: train it in full with modules_to_save={found} "
                          "(all-linear then leaves it out), or name the layers to adapt", stacklevel=2)


def fused_experts(candidates: list[tuple[str, nn.Module]]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The modules that hold weights of three or more dimensions themselves, name -> [(tensor, shape)]: in
    transformers 5 a mixture-of-experts layer keeps all its experts in one module (Mixtral's and Qwen3-MoE's
    ``experts.gate_up_proj`` (experts, 2 * intermediate, hidden), ``experts.down_proj``), with no nn.Linear per
    expert for a linear method to wrap. A tensor counts if it has one slice per expert (its first dimension is the
    module's ``num_experts``) or its module is named for experts: ViT's 3-D position embeddings and convolution
    kernels are no experts."""
    found = {}
    for name, m in candidates:
        if isinstance(m, nn.modules.conv._ConvNd):
            continue
        count = getattr(m, "num_experts", None)
        named = "expert" in type(m).__name__.lower()
        tensors = [(t, tuple(p.shape)) for t, p in m.named_parameters(recurse=False)
                   if p.dim() >= 3 and (named or p.shape[0] == count)]
        if tensors:
            found[name] = tensors
    return found


def _describe_experts(fused: dict[str, list[tuple[str, tuple[int, ...]]]], modules: dict[str, nn.Module]) -> str:
    name, tensors = next(iter(fused.items()))
    shapes = ", ".join(f"{t} {shape}" for t, shape in tensors)
    more = f"; {len(fused)} such modules" if len(fused) > 1 else ""
    return f"{name!r}, a {type(modules[name]).__name__} holding {shapes}{more}"


# said wherever mol meets fused experts: what it cannot do, and what PEFT offers instead
_NO_FUSED = ("target_modules selects linear layers; LoRA on such 3-D expert tensors is LoRAConfig(target_parameters="
             "['experts.gate_up_proj', 'experts.down_proj']), as in PEFT")


def _warn_fused_experts(model: nn.Module, candidates: list[tuple[str, nn.Module]], names: list[str],
                        predicate: Callable[[nn.Module], bool]) -> None:
    """Warn that "all-linear" leaves a fused mixture-of-experts MLP, and the router beside it, without adapters:
    PEFT's all-linear adapts both on Mixtral and Qwen3-MoE (through target_parameters), and a user reading
    "all-linear" expects the MLP, where most of such a model's weights are, to be among the adapted layers."""
    fused = fused_experts(candidates)
    if not fused:
        return
    modules = dict(candidates)
    parents = {n.rpartition(".")[0] for n in fused}
    # the router: a module beside the experts that holds a 2-D weight but is no linear layer (Qwen3MoeTopKRouter
    # computes F.linear(x, self.weight) itself)
    routers = [n for n, m in candidates if n.rpartition(".")[0] in parents and n not in fused and n not in names
               and not predicate(m) and isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2]
    router_text = f" and the routers beside them ({routers[:2]}{' ...' if len(routers) > 2 else ''})" if routers else ""
    warnings.warn(f"target_modules='all-linear' on {type(model).__name__} leaves its fused mixture-of-experts "
                  f"layers ({_describe_experts(fused, modules)}){router_text} frozen, with no adapter: only the "
                  f"{len(names)} linear layers (attention, dense or shared-expert MLPs) are adapted. {_NO_FUSED}. "
                  "Name the layers to adapt (target_modules=['q_proj', ...]) to say this is what you want",
                  stacklevel=2)


# BitFit trains a layer in place and the wrapping methods keep what it did, not the other way round
_ORDER_HINT = " (BitFitConfig before LoRAConfig / MoLConfig / IA3Config, in one list or an earlier inject)"


def match_modules(model: nn.Module, target_modules: Union[str, Sequence[str], set[str]],
                  predicate: Callable[[nn.Module], bool] = is_linear,
                  exclude: Iterable[str] = ()) -> list[str]:
    """Names of modules that ``target_modules`` selects, checked to satisfy ``predicate``.

    ``"all-linear"``: every linear but the output head; a string: a regex matched against the full name
    (``re.fullmatch``, as PEFT does); a list: exact names or name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``). A pattern that matches nothing raises with the names on offer.
    Modules under an ``exclude`` entry (a name or suffix) and inside adapter layers are never selected.
    """
    check_model(model, "match_modules")
    if isinstance(target_modules, (set, frozenset)):  # as PEFT's configs take them; the matching ignores order
        target_modules = sorted(target_modules)
    check_targets("match_modules", "target_modules", target_modules, allow_none=False)
    exclude = list(exclude)
    adapters = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and not _inside_adapter(n, adapters) and not _under_any(n, exclude)]
    # nn.MultiheadAttention passes out_proj.weight to its functional form and never calls the layer: an adapter
    # there would compute nothing
    mha_owned = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
                 if isinstance(m, nn.MultiheadAttention)}
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        names = [n for n, m in candidates if predicate(m) and n not in heads and n not in mha_owned]
        modules = dict(candidates)
        odd = {n: why for n in names if (why := linear_forward_problem(modules[n], False))}
        if odd:
            first = next(iter(odd))
            shown = f"{sorted(odd)[:4]}{' ...' if len(odd) > 4 else ''}"
            warnings.warn(f"target_modules='all-linear' leaves out {shown}: "
                          f"{type(modules[first]).__name__} subclasses nn.Linear but is no linear layer "
                          f"({odd[first]}), "
                          "so an adapter on its output would fail or compute something else (PEFT's all-linear adapts "
                          "it anyway and fails at the first forward); it stays frozen", stacklevel=2)
            names = [n for n in names if n not in odd]
        _warn_task_heads(model, names)
        _warn_fused_experts(model, candidates, names, predicate)
        if not names and adapters:  # an earlier inject took them all
            raise ValueError(f"target_modules='all-linear' matched no linear layer: every one in this model already "
                             f"carries an adapter ({len(adapters)} adapted layers); give each method its own layers, "
                             f"or put this config before the one that wrapped them{_ORDER_HINT}")
        if not names:
            raise ValueError("target_modules='all-linear' matched no linear layer in this model; "
                             "name the layers to adapt explicitly")
        return names
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n, _ in candidates if pattern.fullmatch(n)]
        what = f"regex {target_modules!r}"
        unmatched: list[str] = [] if names else [target_modules]
    else:
        names, unmatched = [], []
        for pat in target_modules:
            hits = [n for n, _ in candidates if name_matches(n, [pat])]
            if not hits:
                unmatched.append(pat)
            names.extend(h for h in hits if h not in names)
        what = f"pattern(s) {unmatched!r}"
    if unmatched and any(name_matches(a, unmatched) for a in adapters):
        raise ValueError(f"target_modules {what} selects layers that already carry an adapter; give each method "
                         f"its own layers, or put this config before the one that wrapped them{_ORDER_HINT}")
    fused = fused_experts(candidates)
    tensors = [f"{n}.{t}" for n, ts in fused.items() for t, _ in ts]
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    hit = {p: [t for t in tensors if (re.fullmatch(p, t) if isinstance(target_modules, str) else name_matches(t, [p]))]
           for p in patterns}
    in_experts = [t for p in patterns for t in hit[p]]
    if in_experts:
        experts = {t.rpartition(".")[0] for t in in_experts}
        what_experts = _describe_experts({n: fused[n] for n in fused if n in experts}, dict(candidates))
        if any(hit[p] for p in unmatched):  # a pattern that names expert tensors only: nothing of it is adapted
            raise ValueError(f"target_modules {what} names the fused expert tensors of a mixture-of-experts layer "
                             f"({what_experts}), not linear layers: {_NO_FUSED}. Move those names to "
                             "target_parameters, and keep the attention, dense or shared-expert layers in "
                             "target_modules (target_modules='all-linear' picks them all)")
        warnings.warn(f"target_modules {target_modules!r} also names the fused expert tensors of "
                      f"{type(model).__name__}'s mixture-of-experts layers ({what_experts}), which stay frozen with "
                      f"no adapter: only the {len(names)} linear layers so named are adapted. {_NO_FUSED}",
                      stacklevel=2)
    if unmatched:
        # the pattern names modules, but only ones modules_to_save trains whole: say so, not that the model has none.
        # Only the entries that do name such modules: a typo beside them names nothing there either
        saved = {p: [n for n, _ in model.named_modules()
                     if n and _under_any(n, exclude) and not _inside_adapter(n, adapters)
                     and (pattern.fullmatch(n) if isinstance(target_modules, str) else name_matches(n, [p]))]
                 for p in unmatched}
        in_saved = [p for p in unmatched if saved[p]]
        if in_saved:
            shown = what if isinstance(target_modules, str) else f"pattern(s) {in_saved!r}"
            raise ValueError(f"target_modules {shown} select only modules of modules_to_save {exclude!r} (e.g. "
                             f"{saved[in_saved[0]][0]!r}), which train whole and take no adapter; narrow "
                             "modules_to_save, or drop those entries from target_modules")
        offered = sorted({n.split(".")[-1] for n, m in candidates if predicate(m)})
        # a bare layer name given as a string is a regex that must match the whole name, so it matches no layer
        hint = (f"; a string is one regex matched against the full name (as in PEFT): for every layer named so, pass "
                f"a list, target_modules=[{target_modules!r}]"
                if isinstance(target_modules, str) and any(name_matches(n, [target_modules]) for n, _ in candidates)
                else "")
        raise ValueError(f"target_modules {what} matched no module of {type(model).__name__}{hint}; "
                         f"layer names on offer: {offered[:20]}. Fix target_modules (exact names, suffixes such "
                         f"as 'q_proj', one regex string, or 'all-linear')")
    owned = [n for n in names if n in mha_owned]
    if owned:
        raise ValueError(f"target_modules selected {owned[0]!r}, the output projection of an nn.MultiheadAttention, "
                         "which reads its weight directly and never calls the layer, so an adapter there would change "
                         "nothing; narrow target_modules to leave it out")
    modules = dict(model.named_modules())
    wrong = [n for n in names if not predicate(modules[n])]
    if wrong:
        holds = (f" (it holds its experts' weights as 3-D tensors: {_NO_FUSED})" if wrong[0] in fused else "")
        raise ValueError(f"target_modules selected {wrong[0]!r}, a {type(modules[wrong[0]]).__name__}, which this "
                         f"method cannot adapt{holds}; narrow the pattern to the layers it supports")
    odd = [(n, why) for n in names if (why := linear_forward_problem(modules[n], False))]
    if odd:
        n, why = odd[0]
        raise ValueError(f"target_modules selected {n!r}, a {type(modules[n]).__name__}, which subclasses nn.Linear "
                         f"but is no linear layer ({why}): an adapter on its output would fail or compute something "
                         "else; narrow target_modules to leave it out")
    return names


def tied_parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """For each parameter known by several names (tied weights), its first name -> all of its names."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {ns[0]: ns for ns in names.values() if len(ns) > 1}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _quantize_base(model: nn.Module, configs: list[MethodConfig]) -> None:
    """QLoRA: the model's linears to NF4 before any method of the call runs (so each method wraps the layer it
    will compute with), but for the modules a config of this call (or of an earlier inject) trains whole."""
    if any(getattr(c, "quantize_base", None) == "nf4" for c in configs):
        from mol.quant import quantize  # deferred: the NF4 code is only needed for QLoRA

        keep = [n for c in [*getattr(model, "mol_configs", []), *configs] for n in getattr(c, "modules_to_save", [])]
        quantize(model, "nf4", skip=keep)


def _quantized_in(module: nn.Module) -> Optional[str]:
    """The name (relative to ``module``) of a quantized linear inside it, whose codes no optimizer can train."""
    for name, sub in module.named_modules():
        if getattr(sub, "is_quantized_linear", False) or (
                (isinstance(sub, nn.Linear) or is_conv1d(sub)) and not_full_precision(sub) is not None):
            return name or "."
    return None


class _AuxLossInOutput:
    """A forward hook that adds the router losses to the ``loss`` a training forward returns (MoLConfig.
    aux_loss_in_output). A class with a bound method, so a deep copy of the model gets a hook of its own."""

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not model.training or getattr(model, "mol_adapters_disabled", False):
            return output
        if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...) when the call had labels
            if tuple_loss_index(model, args, kwargs, output) is not None:
                return (output[0] + aux_loss(model, device=output[0].device).to(output[0].dtype),) + output[1:]
            return output
        loss = getattr(output, "loss", None)
        if isinstance(loss, Tensor):
            output.loss = loss + aux_loss(model, device=loss.device).to(loss.dtype)
        return output


def tuple_loss_index(model: nn.Module, args: tuple, kwargs: dict, output: tuple) -> Optional[int]:
    """0 if a Hugging Face model's tuple output (return_dict=False) starts with the loss, as it does when the call
    passed labels, else None."""
    has_labels = call_kwargs(model, args, kwargs).get("labels") is not None
    first = output[0] if output else None
    return 0 if has_labels and isinstance(first, Tensor) and first.dim() == 0 else None


class _InputsRequireGrad:
    """A forward hook on a model's input embeddings (ViT's patch embedding, Whisper's convolutions) that makes
    their output require grad: under reentrant activation checkpointing a checkpointed block whose inputs do not
    require grad gives its adapters none. transformers does this itself only for models that take input_ids
    (``enable_input_require_grads`` when checkpointing is enabled). A class, so deep copies get their own."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        # Not under torch.compile: AOTAutograd refuses a requires_grad_() on an intermediate (a fullgraph compile
        # of the model failed); a compiled model's checkpoints are not reentrant. Swin's patch embedding returns
        # (embeddings, dimensions): the first tensor is the one the blocks take.
        first = output[0] if isinstance(output, tuple) and output else output
        if (isinstance(first, Tensor) and torch.is_grad_enabled() and not first.requires_grad
                and first.is_floating_point() and not torch.compiler.is_compiling()):
            first.requires_grad_(True)
        return output


def _hook_inputs_require_grad(model: nn.Module) -> None:
    """_InputsRequireGrad on the input embeddings of every Hugging Face (sub)model of a model whose main input is
    not input_ids (pixel_values, input_features), or of such models that a wrapper of the user's own holds: once
    per embedding module."""
    seen: set[int] = set()
    for owner in [model, *(m for m in hf_models(model) if m is not model)]:
        if getattr(owner, "main_input_name", "input_ids") != "input_ids" and hasattr(owner, "get_input_embeddings"):
            _hook_embeddings(owner, seen)


def _hook_embeddings(model: nn.Module, seen: set[int]) -> None:
    for sub in model.modules():
        get = getattr(sub, "get_input_embeddings", None)
        if not callable(get) or not hasattr(sub, "main_input_name"):
            continue
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            continue
        if not isinstance(emb, nn.Module) or id(emb) in seen:
            continue
        seen.add(id(emb))
        if not any(isinstance(getattr(h, "__self__", h), _InputsRequireGrad) for h in emb._forward_hooks.values()):
            emb.register_forward_hook(_InputsRequireGrad())


_INSIDE = "mol_inside_inject"  # set on every module inside an injected one: that one's adapter covers it


def nested_configs(model: nn.Module) -> list[tuple[str, list[MethodConfig]]]:
    """The configs of the injects on modules inside ``model`` that an inject on ``model`` took over, each with the
    module's name in ``model``, in the order they were injected (all before ``model.mol_configs``)."""
    return [(path, list(configs)) for path, configs in getattr(model, "mol_nested", [])]


def all_configs(model: nn.Module) -> list[MethodConfig]:
    """Every method config whose adapter ``model`` carries: those taken over from inner injects, then its own."""
    return [c for _, configs in nested_configs(model) for c in configs] + list(getattr(model, "mol_configs", []))


def injected_inside(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules inside ``model`` (not itself) that carry an adapter of their own (``mol_configs``)."""
    return [(n, m) for n, m in model.named_modules() if n and "mol_configs" in m.__dict__]


def check_model(model: Any, who: str, then_directory: bool = False) -> None:
    """Raise TypeError, naming the fix, unless ``model`` is an ``nn.Module``: a path or a tuple (as
    ``from_pretrained(..., output_loading_info=True)`` returns) in its place failed deep inside with an
    AttributeError. ``then_directory``: ``who`` takes a directory after the model, which a path may be swapped with."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, (str, os.PathLike)):
        fix = ("; load the model first (e.g. AutoModelForCausalLM.from_pretrained(path)) and pass it"
               + (f": mol.{who}(model, directory)" if then_directory else ""))
    elif isinstance(model, tuple):
        fix = "; from_pretrained(..., output_loading_info=True) returns (model, info): pass the model alone"
    else:
        fix = "; pass the model"
    shown = f" {str(model)!r:.80}" if isinstance(model, (str, os.PathLike)) else ""
    raise TypeError(f"mol.{who} takes a model (a torch.nn.Module), got {type(model).__name__}{shown}{fix}")


def require_adapter(model: nn.Module) -> None:
    """Raise, naming the fix, unless ``model`` carries an adapter (``mol.inject`` or ``load_adapter`` ran on it)."""
    if getattr(model, "mol_configs", None):
        return
    if model.__dict__.get(_INSIDE):
        raise ValueError(f"this {type(model).__name__} sits inside a module that mol.inject adapted, whose adapter "
                         "covers this one's (and took over any inject made on it before): call this on that outer "
                         "module")
    raise ValueError("this model carries no mol adapter; call mol.inject(model, config) first")


def _take_over_inner(model: nn.Module) -> None:
    """Make the adapters of the injected modules inside ``model`` part of ``model``'s: their trainable tensors stay
    trainable (inject freezes everything else) and are saved, loaded and unloaded with ``model``'s, their configs
    kept under their paths. Without this each inject froze the other's tensors, silently."""
    nested, trainable = nested_configs(model), list(getattr(model, "mol_trainable", []))
    for name, inner in injected_inside(model):
        nested += [(f"{name}.{path}", configs) for path, configs in nested_configs(inner)]
        nested.append((name, list(inner.mol_configs)))
        trainable += [f"{name}.{n}" for n in inner.mol_trainable]
        for attr in ("mol_configs", "mol_trainable", "mol_nested"):
            inner.__dict__.pop(attr, None)
    if nested:
        model.mol_nested, model.mol_trainable = nested, trainable


def _warn_idle_patterns(config: MethodConfig, names: list[str]) -> None:
    """Warn about rank_pattern / alpha_pattern keys that match none of the adapted ``names``: such a key would
    silently change nothing."""
    for field in ("rank_pattern", "alpha_pattern"):
        idle = [k for k in getattr(config, field) if not any(pattern_value({k: 1}, n, None) for n in names)]
        if idle:
            warnings.warn(f"{field} keys {idle} match none of the {len(names)} adapted "
                          f"layers (e.g. {names[0]!r}), so they change nothing; a key must end a layer's name at a "
                          "dot, as a name, suffix or regex", stacklevel=5)


@register_method(MoLConfig)
def _inject_mol(model: nn.Module, config: MoLConfig, names: Optional[list[str]] = None) -> list[str]:
    """MoLConfig's method; ``names``: the layers to wrap, matched and checked already (LoRAConfig's method, which
    also checks the patterns against its expert tensors), else matched here from ``config.target_modules``."""
    if config.aux_loss_in_output and not getattr(model, "mol_aux_loss_in_output", False):
        model.register_forward_hook(_AuxLossInOutput(), with_kwargs=True)
        model.mol_aux_loss_in_output = True  # mol.train's module then adds nothing itself
    trainable = []
    # routers read the call: its padding (left out of the losses and statistics, and of a sequence router's pool)
    # and, for a sequence router, its token shape and whether it continues a KV cache (RoutingContext)
    context = routing_context(model) if config.num_experts > 1 else None
    # nn.Linear, NF4Linear, and transformers' Conv1D (GPT-2), whose (in, out) weight the layer knows to transpose
    if names is None:
        names = match_modules(model, config.target_modules, exclude=config.modules_to_save)
        _warn_idle_patterns(config, names)
    for name in names:
        layer = MoLLinear(
            model.get_submodule(name), num_experts=config.num_experts, top_k=config.top_k,
            rank=pattern_value(config.rank_pattern, name, config.rank),
            alpha=pattern_value(config.alpha_pattern, name, config.alpha), router=config.router, dropout=config.dropout, use_rslora=config.use_rslora,
            init=config.init, aux_loss_coef=config.aux_loss_coef, z_loss_coef=config.z_loss_coef,
            router_noise=config.router_noise, backend=config.backend, graph_tokens=config.graph_tokens,
            adapter_dtype=config.adapter_dtype, graph_inference_tokens=config.graph_inference_tokens,
        )
        if context is not None:
            layer.router.context = context
        replace_module(model, name, layer)
        trainable += [f"{name}.{p}" for p, _ in layer.named_parameters() if not p.startswith("base_layer.")]
    return trainable


@register_method(LoRAConfig)
def _inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    trainable, names = [], []
    if config.target_parameters:
        # first: the wrapped experts then sit inside an adapter, which "all-linear" no longer warns is left out
        experts = match_parameters(model, config.target_parameters, exclude=config.modules_to_save)
        names += [f"{m}.{t}" for m, tensors in experts.items() for t in tensors]
        trainable += _inject_experts(model, config, experts)
    if config.target_modules:
        linear = match_modules(model, config.target_modules, exclude=config.modules_to_save)
        names += linear
        trainable += _inject_mol(model, config.to_mol(), linear)
    _warn_idle_patterns(config, names)
    return trainable


def match_parameters(model: nn.Module, target_parameters: Sequence[str], exclude: Iterable[str] = ()
                     ) -> dict[str, list[str]]:
    """The expert tensors ``target_parameters`` selects, module name -> [tensor name]: each entry is a tensor's full
    name or a dotted suffix of it (``"experts.gate_up_proj"`` matches ``model.layers.0.mlp.experts.gate_up_proj``),
    as PEFT matches its ``target_parameters``. Each tensor must be one an ExpertsLoRA adapts (mol.experts); an entry
    that matches nothing raises with the 3-D tensors on offer."""
    from mol.experts import EXPERT_TENSORS, expert_tensors, experts_problem

    exclude = list(exclude)
    adapters = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    modules = [(n, m) for n, m in model.named_modules() if n and not _under_any(n, exclude)]
    # a module's own parameters, and the expert tensors an NF4Experts holds quantized (as buffers of its children)
    held = {n: {**{t: tuple(p.shape) for t, p in m.named_parameters(recurse=False)},
                **{t: tuple(info[0]) for t, info in expert_tensors(m).items()}} for n, m in modules}
    found: dict[str, list[str]] = {}
    unmatched, wrapped = [], []
    for pattern in target_parameters:
        hits = [(n, t) for n, _ in modules for t in held[n] if name_matches(f"{n}.{t}", [pattern])]
        if not hits:
            unmatched.append(pattern)
        for n, t in hits:
            if _inside_adapter(n, adapters):
                wrapped.append(f"{n}.{t}")
            elif t not in found.setdefault(n, []):
                found[n].append(t)
    found = {n: ts for n, ts in found.items() if ts}
    if wrapped:
        raise ValueError(f"target_parameters {list(target_parameters)!r} selects {wrapped[0]!r}, inside a module that "
                         f"already carries an adapter; give each method its own tensors{_ORDER_HINT}")
    # a tensor an earlier inject wrapped is named <adapter>.base_layer.<tensor> now, which its old suffix no longer
    # matches: say that, not that the model has no such tensor
    taken = [f"{n}.{t}" for n, _ in modules if _inside_adapter(n, adapters) for t in held[n]
             if name_matches(f"{n}.{t}".replace(".base_layer.", "."), unmatched)]
    if taken:
        raise ValueError(f"target_parameters {unmatched!r} selects {taken[0]!r}, an expert tensor that already carries "
                         "an adapter (an earlier inject's); give each method its own tensors, or inject on a fresh "
                         "model to start over")
    # the model holds such tensors, but in modules_to_save: say so, not that it holds no mixture-of-experts layer.
    # Only the entries that do name such tensors: a typo beside them names nothing there either
    saved = {p: [f"{n}.{t}" for n, m in model.named_modules() if n and _under_any(n, exclude)
                 for t in expert_tensors(m) if name_matches(f"{n}.{t}", [p])] for p in unmatched}
    in_saved = [p for p in unmatched if saved[p]]
    if in_saved:
        raise ValueError(f"target_parameters {in_saved!r} select only tensors of modules_to_save {exclude!r} (e.g. "
                         f"{saved[in_saved[0]][0]!r}), which train whole and take no LoRA; narrow modules_to_save, or "
                         "drop those entries from target_parameters")
    if unmatched:
        free = [(n, m) for n, m in modules if not _inside_adapter(n, adapters)]
        fused = fused_experts(free)
        offered = sorted({f"{n.rpartition('.')[2]}.{t}" for n, ts in fused.items() for t, _ in ts}
                         # an NF4Experts (quantize_base="nf4" ran first) holds its expert tensors as NF4 buffers
                         | {f"{n.rpartition('.')[2]}.{t}" for n, m in free
                            if getattr(m, "quantized_expert_tensors", None) is not None for t in expert_tensors(m)})
        raise ValueError(f"target_parameters {unmatched!r} matched no tensor of {type(model).__name__}; "
                         + (f"expert tensors on offer: {offered}. " if offered else
                            "it holds no mixture-of-experts layer with fused 3-D expert tensors (adapt its linear "
                            "layers with target_modules). ")
                         + "Give full names or dotted suffixes such as 'experts.gate_up_proj'")
    owned = dict(modules)
    for n, tensors in found.items():
        module = owned[n]
        bad = [t for t in tensors if t not in EXPERT_TENSORS or len(held[n][t]) != 3]
        if bad:
            raise ValueError(f"target_parameters selected {n}.{bad[0]}, a {held[n][bad[0]]} "
                             f"tensor of {type(module).__name__}: mol puts LoRA on the 3-D expert tensors "
                             f"{EXPERT_TENSORS} of mixture-of-experts layers only (adapt linear layers with "
                             "target_modules); narrow target_parameters")
        problem = experts_problem(module)
        if problem:
            raise ValueError(f"target_parameters selected {n}.{tensors[0]}, but {problem}; narrow "
                             "target_parameters to the experts of a supported model")
    return found


def _inject_experts(model: nn.Module, config: LoRAConfig, experts: dict[str, list[str]]) -> list[str]:
    from mol.experts import ExpertsLoRA

    trainable = []
    for name, tensors in experts.items():
        keys = {t: f"{name}.{t}" for t in tensors}
        layer = ExpertsLoRA(model.get_submodule(name), tensors,
                            rank={t: pattern_value(config.rank_pattern, k, config.rank) for t, k in keys.items()},
                            alpha={t: pattern_value(config.alpha_pattern, k, config.alpha) for t, k in keys.items()},
                            dropout=config.dropout, use_rslora=config.use_rslora, init=config.init,
                            adapter_dtype=config.adapter_dtype)
        replace_module(model, name, layer)
        trainable += [f"{name}.{p}" for p, _ in layer.named_parameters() if not p.startswith("base_layer.")]
    return trainable


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[nn.Module]:
    """A block that changes ``model``'s structure (inject, load_adapter, import_peft, load_bnb_4bit): if it raises,
    every module of the model as it was is put back as it was (its children, parameters, buffers, hooks and other
    attributes) and every parameter's ``requires_grad``, so a failed call leaves the model as it found it and a
    corrected call can follow. Tensor values written in place are not undone: such writes come after the checks.
    The original modules stay referenced until the block ends (a quantized base frees its full-precision layers
    then, not layer by layer)."""
    saved = []
    for module in model.modules():
        state = dict(module.__dict__)
        # the inner dicts (_modules, _parameters, _buffers, hooks) are changed in place: keep their contents too
        saved.append((module, state, {k: dict(v) for k, v in state.items() if isinstance(v, dict)}))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    except BaseException:
        for module, state, inner in saved:
            module.__dict__.clear()
            module.__dict__.update(state)
            for key, contents in inner.items():
                state[key].clear()
                state[key].update(contents)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (its OptimizedModule names every parameter ``_orig_mod.``...), else model:
    the adapter lives on, and is named after, the model itself, so that it saves and loads either way."""
    inner = model._modules.get("_orig_mod") if type(model).__name__ == "OptimizedModule" else None
    return model if inner is None else inner


def inject(model: nn.Module, config: Union[MethodConfig, Sequence[MethodConfig]]) -> nn.Module:
    """Apply one method config (or several, e.g. MoL on the MLP plus prefix tuning) to ``model`` in place.

    Everything that is not an adapter tensor or in ``modules_to_save`` is frozen. Returns ``model``.
    """
    check_model(model, "inject")
    given, model = model, _uncompiled(model)
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if not configs:
        raise ValueError("inject got an empty list of configs; pass at least one method config")
    for cfg in configs:
        if type(cfg) not in _METHODS:
            raise TypeError(f"{type(cfg).__name__} is not a registered method config; "
                            f"known: {sorted(c.__name__ for c in _METHODS)}")
        cfg.names_as_lists()
        cfg.validate()
    # BitFit's inject of an equal config ran again without a word (the other methods refuse wrapped layers): the model
    # then recorded the adapter twice, and no longer took load_adapter of the adapter it was given once
    seen = list(getattr(model, "mol_configs", []))
    for cfg in configs:
        if any(type(cfg) is type(c) and cfg == c for c in seen):
            raise ValueError(f"inject got {cfg} twice: the model carries this adapter already (or the list repeats "
                             "it); inject each config once, on a fresh model to start over")
        seen.append(cfg)
    _refuse_peft_modules(model)
    if model.__dict__.get(_INSIDE):
        raise ValueError(f"this {type(model).__name__} sits inside a module that mol.inject adapted already: an "
                         "inject here would freeze that module's trainable tensors inside it, and its own would be "
                         "left out of that module's save_adapter. Inject these configs on the outer module (prompt "
                         "and prefix tuning given a wrapper go on the one Hugging Face model it holds), or inject "
                         "this module before the outer one, whose inject then takes this one's adapter over")

    with all_or_nothing(model):
        _apply(model, configs)
    return given


def _refuse_peft_modules(model: nn.Module) -> None:
    """Raise, naming the fix, where ``model`` holds Hugging Face PEFT's modules (a ``PeftModel``, its LoRA layers):
    inject would wrap PEFT's own ``lora_A`` / ``lora_B`` linears as layers of the model and freeze PEFT's adapter."""
    found = [(n, type(m).__name__) for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"]
    if found:
        name, kind = found[0]
        where = f" at {name!r}" if name else ""
        raise ValueError(f"mol.inject got a model holding Hugging Face PEFT modules ({kind}{where}, "
                         f"{len(found)} in all): mol would adapt PEFT's own layers (its lora_A / lora_B linears) and "
                         "freeze PEFT's adapter. Fold PEFT's adapter into the base first (model = "
                         "model.merge_and_unload()), or load it as a mol adapter instead (mol.import_peft(base_model, "
                         "peft_dir)), and inject on the plain model")


def _apply(model: nn.Module, configs: list[MethodConfig]) -> None:
    """inject's changes, made inside all_or_nothing: a method or check that fails undoes the methods before it."""

    # Tracked as tensors, not names: a later method may wrap a layer an earlier one adapted (MoL around a BitFit
    # layer moves its bias to ``<layer>.base_layer.bias``); the names are read back once every method has run.
    # Every name of a tied tensor is looked up (modules_to_save=["lm_head"] on a model whose head shares the input
    # embedding's weight trains that one tensor, saved under its first name).
    def tensors(names: list[str]) -> list[Tensor]:
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in params]
        if missing:
            raise RuntimeError(f"internal error: method reported trainable tensor {missing[0]!r} that the model lacks")
        return [params[n] for n in names]

    _take_over_inner(model)
    before = set(model.modules())
    tracked = tensors(list(getattr(model, "mol_trainable", [])))
    # checked before quantize_base, which takes them as its skip list and would blame that instead; the methods
    # below only wrap or add modules, so every entry still matches after them
    module_names = [n for n, _ in model.named_modules()]
    for cfg in configs:
        for mod_name in getattr(cfg, "modules_to_save", []):
            if not any(name_matches(n, [mod_name]) for n in module_names):
                raise ValueError(f"modules_to_save entry {mod_name!r} matches no module; fix modules_to_save")
    _quantize_base(model, configs)
    for cfg in configs:
        names = _METHODS[type(cfg)](model, cfg)
        for mod_name in getattr(cfg, "modules_to_save", []):
            for hit in [n for n, _ in model.named_modules() if name_matches(n, [mod_name])]:
                inner = _quantized_in(model.get_submodule(hit))
                if inner is not None:
                    where = hit if inner == "." else f"{hit}.{inner}"
                    raise ValueError(f"modules_to_save entry {mod_name!r} holds the quantized layer {where!r}, whose "
                                     "4-bit codes cannot train (only its bias would): quantize the model with "
                                     f"mol.quantize(..., skip=[{mod_name!r}]), or give quantize_base='nf4' and "
                                     "every config in one inject call (the base is then quantized but for all "
                                     "their modules_to_save)")
                names += [f"{hit}.{p}" for p, _ in model.get_submodule(hit).named_parameters()]
        tracked += tensors(names)

    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    lost = [p for p in tracked if id(p) not in name_of]
    if lost:
        raise ValueError(f"a later method replaced a {tuple(lost[0].shape)} tensor that an earlier method trains (e.g. "
                         "quantize_base='nf4' rebuilding a layer BitFit gave a bias in an earlier inject); inject the "
                         "configs in one call (quantize_base runs before every method of its call) or the replacing "
                         "method first")
    trainable = list(dict.fromkeys(name_of[id(p)] for p in tracked))  # de-duplicated, order kept
    for p in params.values():
        p.requires_grad_(False)
    for n in trainable:
        params[n].requires_grad_(True)
    # a new module starts in training mode: on a model in eval mode (as from_pretrained gives it) LoRA's and the
    # adapters' dropout would then drop activations in inference. Only the new ones: the model's own keep theirs
    for module in model.modules():
        if module not in before:
            module.training = model.training
    model.mol_configs = list(getattr(model, "mol_configs", [])) + configs
    model.mol_trainable = trainable
    for module in model.modules():
        if module is not model:
            module.__dict__[_INSIDE] = True
    _hook_inputs_require_grad(model)


# the attribute names under which torch's FSDP (auto-wrapping) and activation-checkpoint wrappers nest a module
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's or module's name as it was before FSDP's auto-wrapping (or a checkpoint wrapper) nested its
    module: the name an adapter is saved and loaded under."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name.removesuffix("._fsdp_wrapped_module").removesuffix("._checkpoint_wrapped_module")


def adapter_layers(model: nn.Module) -> Iterable[tuple[str, AdapterLayer]]:
    return ((unwrapped_name(n), m) for n, m in model.named_modules() if isinstance(m, AdapterLayer))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameters, total number of parameters). An NF4 weight counts as the values it stands
    for (out × in), as PEFT counts bitsandbytes' 4-bit weights: its codes are buffers, or a parameter of half or a
    quarter as many elements once ``store_codes_as`` holds them for FSDP."""
    from mol.quant.linear import NF4Tensor, code_parameter_ids  # mol.quant imports this module's layers

    check_model(model, "trainable_parameters")
    codes = code_parameter_ids(model)
    params = [p for p in model.parameters() if id(p) not in codes]
    nf4_values = sum(math.prod(m.weight_shape) for m in model.modules() if isinstance(m, NF4Tensor))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + nf4_values


def aux_loss(model: nn.Module, device: Union[torch.device, str, None] = None) -> Tensor:
    """Sum of the coefficient-weighted router losses of the last forward, over all MoL layers (0 if none), on
    ``device``: by default the last routed layer's, which for a model split over several GPUs (``device_map``)
    is usually where its output and task loss are; pass ``out.loss.device`` to be sure. Each layer contributes its
    last call's loss: a layer called several times in one forward (shared across depth, as ALBERT's) only its last."""
    check_model(model, "aux_loss")
    losses = [loss for _, m in adapter_layers(model) if isinstance(m, MoLLinear) and (loss := m.aux_loss()) is not None]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=device if device is not None else p.device if p is not None else None)
    device = losses[-1].device if device is None else torch.device(device)
    return torch.stack([loss.float().to(device) for loss in losses]).sum()


def clear_routing(model: nn.Module) -> None:
    """Drop every routed layer's kept routing (see MoLLinear.clear_routing): before a CUDA-graph capture."""
    check_model(model, "clear_routing")
    for _, m in adapter_layers(model):
        if isinstance(m, MoLLinear):
            m.clear_routing()


def disable_adapters(model: nn.Module) -> "_AdaptersDisabled":
    """Inside the block the model computes as it did before ``inject``: every adapter layer runs its frozen base
    alone, bottleneck adapters and prefix / prompt tuning add nothing, and ``aux_loss_in_output`` adds no router
    loss; the adapter tensors and the routing kept from the last adapted forward are left as they were (PEFT's
    ``disable_adapter``; e.g. a DPO reference model from the policy's own weights). Use it as
    ``with mol.disable_adapters(model): ...``; a call outside a ``with`` changes nothing and warns so. Raises where
    the original model cannot be had: a merged layer (``mol.unmerge`` first) or BitFit, which trains the base's own
    biases. ``modules_to_save`` are trained in place, so they stay as trained (a warning says so)."""
    return _AdaptersDisabled(model)


class _AdaptersDisabled:
    """The context manager ``disable_adapters`` returns (see there). A class rather than a generator so that a call
    without ``with``, which would silently leave the adapters on, is reported when the object is dropped."""

    _armed = False  # set once __init__ has checked everything: a refused call warns nothing more

    def __init__(self, model: nn.Module) -> None:
        check_model(model, "disable_adapters")
        require_adapter(model)
        configs = all_configs(model)
        if any(c.method == "bitfit" for c in configs):
            raise ValueError("BitFit trains the base's own biases in place, so there is no adapter-free model to "
                             "switch to; keep a copy of the original biases (or model) for reference outputs")
        merged = [n for n, m in adapter_layers(model) if m.merged]
        if merged:
            raise ValueError(f"{merged[0]} is merged into its base weights; call mol.unmerge(model) before "
                             "disabling the adapters")
        self.model, self._modules_to_save = model, any(getattr(c, "modules_to_save", None) for c in configs)
        self._entered, self._armed = False, True

    def __enter__(self) -> nn.Module:
        self._entered = True
        model = self.model
        if self._modules_to_save:
            warnings.warn("mol.disable_adapters: modules_to_save are trained in place (no original copy is kept), so "
                          "they stay as trained inside the block", stacklevel=2)
        self._layers = [m for _, m in adapter_layers(model)]
        self._before = [m.disabled for m in self._layers]
        # the model and any inner model whose inject (taken over) put the router loss in its output
        self._owners = [model, *(m for m in model.modules()
                                 if m is not model and "mol_aux_loss_in_output" in m.__dict__)]
        self._was = [getattr(m, "mol_adapters_disabled", False) for m in self._owners]
        for m in self._layers:
            m.disabled = True
        for m in self._owners:
            m.mol_adapters_disabled = True
        return model

    def __exit__(self, *exc: Any) -> None:
        for m, d in zip(self._layers, self._before):
            m.disabled = d
        for m, w in zip(self._owners, self._was):
            m.mol_adapters_disabled = w

    def __del__(self) -> None:
        if self._armed and not self._entered:
            warnings.warn("mol.disable_adapters(model) was called outside a `with` block, which changes nothing: write "
                          "`with mol.disable_adapters(model): ...` to run the model without its adapters",
                          RuntimeWarning, stacklevel=2)


def clear_graphs(model: nn.Module) -> None:
    """Free every MoL layer's captured CUDA graphs and their static buffers (``graph_tokens``,
    ``graph_inference_tokens``), e.g. after training and before long generation; the next call of a captured size
    captures again."""
    check_model(model, "clear_graphs")
    for _, m in adapter_layers(model):
        if isinstance(m, MoLLinear) and m._graphs is not None:
            m._graphs.clear()


def set_graphs(model: nn.Module, graph_tokens: Optional[int] = None,
               graph_inference_tokens: Optional[int] = None) -> nn.Module:
    """Set ``graph_tokens`` / ``graph_inference_tokens`` (MoLConfig) on every routed MoL layer of ``model`` after
    injection: e.g. on a model ``load_adapter`` built, ``set_graphs(model, graph_inference_tokens=batch_size)``
    before ``generate()`` makes each decode step's layer calls replay captured CUDA graphs. None keeps a setting, 0
    turns it off; the graphs captured so far are freed. Every layer is checked before any changes; the model's
    ``mol_configs`` record the new values, which ``save_adapter`` writes and ``load_adapter`` ignores when it
    compares adapters (they say how the layers run, not what they compute). Returns ``model``."""
    check_model(model, "set_graphs")
    layers = [m for _, m in adapter_layers(model) if isinstance(m, MoLLinear) and m.router is not None]
    if not layers:
        raise ValueError("set_graphs: the model has no routed MoL layer (MoLConfig with num_experts > 1); per-layer "
                         "graphs capture the routed layer's fused path, which plain LoRA layers do not run")
    settings = [m._checked_graph_tokens(graph_tokens, graph_inference_tokens) for m in layers]  # a bad one: no change
    for m, tokens in zip(layers, settings):
        m._set_graphs(*tokens)
    changes = {k: v for k, v in (("graph_tokens", graph_tokens), ("graph_inference_tokens", graph_inference_tokens))
               if v is not None}

    def changed(configs: list[MethodConfig]) -> list[MethodConfig]:
        return [dataclasses.replace(c, **changes) if isinstance(c, MoLConfig) and c.num_experts > 1 else c
                for c in configs]

    model.mol_configs = changed(model.mol_configs)
    if hasattr(model, "mol_nested"):
        model.mol_nested = [(path, changed(configs)) for path, configs in model.mol_nested]
    return model


def routing_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Per routed layer: load (E,), counts (E,), entropy, load_balance_loss, z_loss of the layer's last call (one of
    several where a forward calls it several times, as ALBERT's shared layers)."""
    check_model(model, "routing_stats")
    return {n: m.last_stats for n, m in adapter_layers(model) if isinstance(m, MoLLinear) and m.last_stats}
