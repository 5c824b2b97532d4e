"""One dataclass per method. Each is plain data: JSON round-trips it, Hydra builds it with ``_target_``.

``LoRAConfig`` is not a second implementation: ``to_mol()`` turns it into the one-expert, router-free
``MoLConfig`` that the same ``MoLLinear`` runs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

TargetModules = Union[str, list[str]]

ROUTERS = ("topk", "soft", "switch", "sequence")
INITS = ("kaiming", "gaussian")
BACKENDS = ("auto", "torch", "triton")
QUANT_TYPES = (None, "nf4")
ADAPTER_DTYPES = ("auto", "base", "float32", "bfloat16", "float16")


def default_top_k(router: str) -> int:
    """The top_k a router takes when none is given: 1 for ``switch`` (top-1 by definition), else 2. One place for
    MoLConfig, MoLLinear and Router, which each default it."""
    return 1 if router == "switch" else 2


@dataclass
class MethodConfig:
    """Base of every method config: ``method`` names it in saved JSON."""

    method: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and the fix."""

    def names_as_lists(self) -> None:
        """Turn every field given as a set of module names (as PEFT's configs take ``target_modules`` and
        ``modules_to_save``) into a sorted list: the matching ignores order, and saved JSON holds no set. Every
        method's fields, in one place: inject calls it before ``validate``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                setattr(self, f.name, sorted(value))

    # how the layers run, not what they compute: two configs that differ only here make the same adapter
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("backend", "graph_tokens", "graph_inference_tokens")

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``method``, as saved JSON holds them (tuples as lists): ``config_from_dict`` rebuilds it."""
        return {"method": self.method, **_as_json(dataclasses.asdict(self))}

    def adapter_dict(self) -> dict[str, Any]:
        """to_dict() without RUNTIME_FIELDS: what load_adapter compares between a model's adapter and a saved one
        (a model injected with graph_inference_tokens, or backend="torch", loads an adapter trained without)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}


def _as_json(value: Any) -> Any:
    """``value`` with its tuples as lists, as JSON reads them back: a config given a tuple of target_modules then
    compares equal to its saved copy (load_adapter into the model it was saved from refused it)."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    return value


def _check_common(cfg: Any, targets_required: bool = True) -> None:
    name = type(cfg).__name__
    if not is_whole(cfg.rank) or cfg.rank <= 0:
        raise ValueError(f"{name}.rank must be a positive integer, got {cfg.rank!r}; use e.g. rank=8")
    # "not > 0" rather than "<= 0": a NaN alpha (NaN compares false) would make every adapter output NaN
    if not is_number(cfg.alpha) or not 0 < cfg.alpha < math.inf:
        raise ValueError(f"{name}.alpha must be > 0, got {cfg.alpha!r}; the usual choice is alpha = 2 * rank")
    if not is_number(cfg.dropout) or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"{name}.dropout must be in [0, 1), got {cfg.dropout!r}")
    # a string such as "false" from a command line is truthy: it would silently turn rsLoRA's scaling on
    if not isinstance(cfg.use_rslora, bool):
        raise ValueError(f"{name}.use_rslora must be true or false, got {cfg.use_rslora!r}")
    if cfg.init not in INITS:
        raise ValueError(f"{name}.init={cfg.init!r} is unknown; choose one of {INITS}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"{name}.backend={cfg.backend!r} is unknown; choose one of {BACKENDS}")
    if cfg.quantize_base not in QUANT_TYPES:
        raise ValueError(f"{name}.quantize_base={cfg.quantize_base!r} is unknown; use None or 'nf4'")
    if targets_required or cfg.target_modules:
        if not cfg.target_modules:
            raise ValueError(f"{name}.target_modules is empty; give names, suffixes, a regex or 'all-linear'")
        check_targets(name, "target_modules", cfg.target_modules, allow_none=False)
    check_modules_to_save(cfg)
    check_adapter_dtype(cfg)
    for field_name, integral in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = getattr(cfg, field_name)
        if not isinstance(patterns, dict):
            raise ValueError(f"{name}.{field_name} must be a mapping of layer-name patterns to values, got "
                             f"{type(patterns).__name__}")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except (re.error, TypeError) as e:
                raise ValueError(f"{name}.{field_name} key {key!r} is not a regex ({e}); use a layer name or suffix "
                                 "such as 'v_proj', or a pattern such as 'layers\\.0\\..*'") from None
            if (integral and not is_whole(value)) or not value > 0:
                kind = "a positive integer" if integral else "> 0"
                raise ValueError(f"{name}.{field_name}[{key!r}] must be {kind}, got {value!r}")


def is_number(value: Any) -> bool:
    """A real number, bool excluded (a config's ``True`` is a typo, not 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_whole(value: Any) -> bool:
    """A Python int, bool excluded (``True`` is an int to Python, and a typo in a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_modules_to_save(cfg: Any) -> None:
    """Raise, naming the fix, unless ``cfg.modules_to_save`` is a list of module names; None (PEFT's default, and
    Hydra's ``model.modules_to_save=null``) becomes the empty list."""
    name, value = type(cfg).__name__, cfg.modules_to_save
    if value is None:
        cfg.modules_to_save = []
        return
    if isinstance(value, str):  # iterated, each letter would be taken for a module name
        raise ValueError(f"{name}.modules_to_save must be a list of module names, got the string {value!r}; use "
                         f"modules_to_save=[{value!r}]")
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
        raise ValueError(f"{name}.modules_to_save must be a list of module names, got {value!r}")


def check_targets(name: str, field: str, value: Any, allow_none: bool = True) -> None:
    """Raise, naming the fix, unless ``value`` is a regex string or a list of names (or None if ``allow_none``)."""
    if value is None and allow_none:
        return
    ok = (isinstance(value, str) and value) or (isinstance(value, (list, tuple)) and value
                                                and all(isinstance(v, str) and v for v in value))
    if not ok:
        raise ValueError(f"{name}.{field}={value!r} is invalid; give a list of module names/suffixes, one regex string"
                         + (", or None for the model's defaults" if allow_none else ""))


def nonnegative_number_problem(value: Any) -> Optional[str]:
    """None if ``value`` is a finite number >= 0 (a router loss coefficient or noise std), else what is wrong with it,
    the fix included. NaN is caught too ("< 0" is false for it): it would make every router loss, and so the whole
    training loss, NaN."""
    if not is_number(value) or not 0 <= value < math.inf:
        return f"must be a finite number >= 0 (0 turns it off), got {value!r}"
    return None


def pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """The value of the first pattern (in order) that matches ``name`` as PEFT's rank_pattern / alpha_pattern do:
    the pattern as a regex that must end the name at a dot boundary (``"v_proj"`` matches
    ``model.layers.0.self_attn.v_proj``); ``default`` where none matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def without_quantize_base(configs: list) -> list:
    """The configs with ``quantize_base`` off where it was on (the adapter on a full-precision base)."""
    return [dataclasses.replace(c, quantize_base=None) if getattr(c, "quantize_base", None) else c for c in configs]


def _patterns_or_empty(cfg: Any) -> None:
    """None (how Hydra's configs leave them, so that an override can set a whole mapping) means no pattern; sets of
    names become sorted lists (MethodConfig.names_as_lists)."""
    for name in ("rank_pattern", "alpha_pattern"):
        if getattr(cfg, name) is None:
            setattr(cfg, name, {})
    cfg.names_as_lists()


def check_adapter_dtype(cfg: Any) -> None:
    """Every method's ``adapter_dtype`` (the dtype of the tensors it trains; see MoLConfig)."""
    if cfg.adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"{type(cfg).__name__}.adapter_dtype={cfg.adapter_dtype!r} is unknown; choose one of "
                         f"{ADAPTER_DTYPES}")


@dataclass
class MoLConfig(MethodConfig):
    """Mixture of LoRA experts on every matched ``nn.Linear``.

    Each adapted layer computes ``base(x) + scaling * sum over the chosen experts e of gate_e * B_e A_e x``.
    ``rank``: r of each expert; ``alpha``: ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``,
    rank-stabilised LoRA). ``num_experts``: E, the LoRA experts per layer (1: plain LoRA, no router); ``top_k``: the
    experts each token uses (default: 1 for ``switch``, which takes one, else 2; ignored by ``soft``).
    ``dropout``: on the experts' input, in training. ``init``: ``"kaiming"`` (A uniform as nn.Linear's init,
    PEFT's default) or ``"gaussian"`` (A normal with std 1/r); B starts at zero, so a fresh adapter changes nothing.
    ``aux_loss_coef`` / ``z_loss_coef``: the weights of each routed layer's load-balance loss and router z-loss in
    ``mol.aux_loss(model)`` (0 turns one off). ``quantize_base="nf4"``: QLoRA, the model's linears quantized to
    frozen NF4 before the experts wrap them (but ``modules_to_save`` and what ``mol.quantize`` keeps, such as the
    output head); None (default) keeps them.
    ``backend``: ``"auto"`` (the Triton kernels on CUDA, else PyTorch), ``"torch"`` or ``"triton"`` (raises where it
    cannot run).
    ``modules_to_save``: modules (names or suffixes) trained in full and saved with the adapter, such as a new
    classification head.
    ``target_modules``: ``"all-linear"`` (every linear but the output head), a list of exact names or
    name suffixes (``["q_proj", "v_proj"]``), or one regex string matched against the full name.
    ``router``: ``topk`` (softmax, top-k, gates renormalised), ``soft`` (every expert, softmax weights),
    ``switch`` (top-1, gate = its probability), ``sequence`` (one top-k choice per sequence from the
    mean-pooled hidden states). ``router_noise``: std of Gaussian noise added to router logits in training.
    ``graph_tokens``: on CUDA, training calls of at most this many tokens replay per-layer CUDA graphs of the
    routed forward and backward (cuts the host cost that bounds small steps; costs static buffers per layer and
    token count, see mol.kernels.layer_graphs); 0 (default) never captures.
    ``graph_inference_tokens``: likewise for calls without gradients in eval mode, forward only: set it to the
    generation batch size, and each decode step's layer call is one copy, one replay and a clone instead of the
    forward's Python and launches (eager generation on MoL layers is otherwise bound by the host); 0 (default) off.
    ``adapter_dtype``: the dtype of ``lora_A`` / ``lora_B`` (the router's weight is float32 always). ``"auto"``
    (default): float32 on a 16-bit base (bf16/fp16 weights, or NF4 computing in them), else the base's dtype, as
    PEFT's ``get_peft_model`` makes them: in a bf16 weight, an AdamW step smaller than ~1/256 of the weight rounds
    away. The layer still computes in the base's dtype (the adapters are cast inside it; without gradients the cast
    copies are kept). ``"base"``: the base's dtype (16-bit optimizer states, two casts fewer a forward). Or one of
    ``"float32"``, ``"bfloat16"``, ``"float16"``.
    ``rank_pattern`` / ``alpha_pattern``: per-layer ``rank`` / ``alpha`` where a pattern matches the layer's name
    (PEFT's semantics: the first matching key; a name, a suffix or a regex ending at a dot boundary).
    ``aux_loss_in_output``: the model's training forward adds ``mol.aux_loss(model)`` to the ``loss`` it returns
    (as Hugging Face's MoE models add their router loss), so a loop that backpropagates ``outputs.loss`` alone,
    such as transformers' Trainer, trains the router losses too; False (default): add them yourself.
    """

    method: ClassVar[str] = "mol"

    rank: int = 8
    alpha: float = 16.0
    num_experts: int = 8
    top_k: Optional[int] = None
    router: str = "topk"
    target_modules: TargetModules = "all-linear"
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    router_noise: float = 0.0
    quantize_base: Optional[str] = None
    backend: str = "auto"
    graph_tokens: int = 0
    graph_inference_tokens: int = 0
    aux_loss_in_output: bool = False
    adapter_dtype: str = "auto"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _patterns_or_empty(self)
        if self.top_k is None:  # MoLConfig(router="switch") is top-1 by definition: it must not need top_k=1 too
            self.top_k = default_top_k(self.router)
            if is_whole(self.num_experts) and 1 <= self.num_experts < self.top_k:  # num_experts=1 (LoRA) needs none
                self.top_k = self.num_experts

    def validate(self) -> None:
        _check_common(self)
        if not isinstance(self.aux_loss_in_output, bool):
            raise ValueError(f"MoLConfig.aux_loss_in_output must be true or false, got {self.aux_loss_in_output!r}")
        for name in ("graph_tokens", "graph_inference_tokens"):
            tokens = getattr(self, name)
            if not is_whole(tokens) or tokens < 0:
                raise ValueError(f"MoLConfig.{name} must be an integer >= 0 (0: no captured graphs), got {tokens!r}")
        if not is_whole(self.num_experts) or self.num_experts < 1:
            raise ValueError(f"MoLConfig.num_experts must be an integer >= 1, got {self.num_experts!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoLConfig.router={self.router!r} is unknown; choose one of {ROUTERS}")
        if self.router != "soft" and not is_whole(self.top_k):
            raise ValueError(f"MoLConfig.top_k must be an integer, got {self.top_k!r}; use e.g. top_k=2")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"MoLConfig.top_k={self.top_k!r}, but router='switch' takes one expert per token; set "
                             "top_k=1 or leave it out (or use router='topk' for top-k)")
        k_max = 1 if self.router == "switch" else self.num_experts
        if self.router != "soft" and not 1 <= self.top_k <= k_max:
            raise ValueError(
                f"MoLConfig.top_k={self.top_k} is outside 1..{k_max} for router={self.router!r} "
                f"with num_experts={self.num_experts}; set top_k between 1 and {k_max}"
            )
        for field_name in ("aux_loss_coef", "z_loss_coef", "router_noise"):
            problem = nonnegative_number_problem(getattr(self, field_name))
            if problem:
                raise ValueError(f"MoLConfig.{field_name} {problem}")


@dataclass
class LoRAConfig(MethodConfig):
    """Standard LoRA (Hu et al. 2021), as Hugging Face PEFT computes it: the one-expert MoL layer,
    ``base(x) + scaling * B A dropout(x)``. Every field means what MoLConfig's of the same name does (``rank``,
    ``alpha``, ``target_modules``, ``dropout``, ``use_rslora``, ``init``, ``quantize_base``, ``backend``,
    ``adapter_dtype``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``: PEFT's LoraConfig fields
    ``r``, ``lora_alpha``, ``lora_dropout``, ... of the same meaning).

    ``target_parameters``: the fused expert tensors of mixture-of-experts layers to put LoRA on, one pair per expert
    (PEFT's field of that name): full names or dotted suffixes such as ``["experts.gate_up_proj",
    "experts.down_proj"]`` (transformers 5's Mixtral, Qwen3-MoE, GPT-OSS, ... keep each MoE layer's experts as 3-D
    tensors, with no nn.Linear per expert); see mol.experts. With it ``target_modules`` may be empty (``[]``) to adapt
    the experts alone; ``rank_pattern`` / ``alpha_pattern`` keys match the tensors' names as they match layers'."""

    method: ClassVar[str] = "lora"

    rank: int = 8
    alpha: float = 16.0
    target_modules: TargetModules = "all-linear"
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    quantize_base: Optional[str] = None
    backend: str = "auto"
    adapter_dtype: str = "auto"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _patterns_or_empty(self)
        if self.target_parameters is None:  # PEFT's default, and Hydra's method.target_parameters=null
            self.target_parameters = []
        if self.target_modules is None and self.target_parameters:  # PEFT's target_modules=None: the experts alone
            self.target_modules = []

    def validate(self) -> None:
        value = self.target_parameters
        if isinstance(value, str):  # iterated, each letter would be taken for a tensor name
            raise ValueError(f"LoRAConfig.target_parameters must be a list of tensor names, got the string {value!r}; "
                             f"use target_parameters=[{value!r}]")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"LoRAConfig.target_parameters must be a list of tensor names or suffixes such as "
                             f"['experts.gate_up_proj', 'experts.down_proj'], got {value!r}")
        if not self.target_modules and not value:
            raise ValueError("LoRAConfig.target_modules is empty and so is target_parameters: give the layers to "
                             "adapt (names, suffixes, a regex or 'all-linear') or the expert tensors "
                             "(target_parameters=['experts.gate_up_proj', 'experts.down_proj'])")
        _check_common(self, targets_required=not value)

    def to_mol(self) -> MoLConfig:
        """The same adapter on the linear layers (``target_modules``) as a one-expert MoL config (no router, gate
        1); ``target_parameters`` has no MoL counterpart (mol.experts adapts those)."""
        return MoLConfig(
            rank=self.rank, alpha=self.alpha, num_experts=1, top_k=1, router="topk",
            target_modules=self.target_modules, dropout=self.dropout, use_rslora=self.use_rslora,
            init=self.init, aux_loss_coef=0.0, z_loss_coef=0.0, quantize_base=self.quantize_base,
            backend=self.backend, adapter_dtype=self.adapter_dtype, rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern), modules_to_save=list(self.modules_to_save),
        )


CONFIG_CLASSES: dict[str, type] = {"mol": MoLConfig, "lora": LoRAConfig}


def register_config(cls: type) -> type:
    """Make a method config loadable from saved JSON by its ``method`` name; returns ``cls`` (a decorator)."""
    if not isinstance(cls, type) or not isinstance(getattr(cls, "method", None), str) or not cls.method:
        raise TypeError(f"register_config takes a config class with a non-empty class attribute `method` (the name "
                        f"saved JSON gives it), got {cls!r}")
    CONFIG_CLASSES[cls.method] = cls
    return cls


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """Rebuild a config saved with ``to_dict``; unknown methods or fields raise with the fix."""
    if not isinstance(d, dict):
        raise TypeError(f"config_from_dict takes a dict as to_dict() gives it, got {type(d).__name__}")
    d = dict(d)
    method = d.pop("method", None)
    if method not in CONFIG_CLASSES:
        raise ValueError(
            f"adapter config names method {method!r}, which this version of mol does not know "
            f"(known: {sorted(CONFIG_CLASSES)}); upgrade mol or fix adapter_config.json"
        )
    cls = CONFIG_CLASSES[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"adapter config for method {method!r} has unknown fields {unknown}; fix adapter_config.json")
    return cls(**d)
