"""LoRA on the fused experts of a mixture-of-experts layer (PEFT's ``LoraConfig(target_parameters=[...])``).

transformers 5 keeps all the experts of a MoE layer in one module, as 3-D tensors (Mixtral's and Qwen3-MoE's
``experts.gate_up_proj`` (experts, 2 * intermediate, hidden) and ``experts.down_proj``), with no nn.Linear per
expert to wrap. ``ExpertsLoRA`` wraps that module and gives each targeted tensor one LoRA pair per expert,
``lora_A[name]`` (experts, r, in) and ``lora_B[name]`` (experts, out, r), the layout of MoLLinear's expert pool.
The model's own router still picks each token's experts; for every (token t, expert e) pair p:

    up_p   = W_up[e] x_t   + scaling * B_up[e] A_up[e] dropout(x_t)          (gate_up_proj, or up_proj)
    mid_p  = gate(up_p)                                                     (the experts module's own _apply_gate)
    down_p = W_down[e] mid_p + scaling * B_down[e] A_down[e] dropout(mid_p)   (down_proj)
    y_t    = sum over t's pairs of routing_weight_p * down_p

which is what PEFT computes: it adds ``scaling * B_e A_e`` to every expert's weight before each forward and runs the
model's code. Here the delta goes on the activations instead, so no (experts, out, in) tensor is ever made (PEFT
makes one per targeted tensor and keeps it for the backward) and an expert no token chose costs nothing.

The forward is transformers' grouped one (``integrations.moe.grouped_mm_experts_forward``), read off the experts
module's own flags (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``, ``_apply_gate``), which
every experts class decorated with ``use_experts_implementation`` carries: the pairs sorted by expert, one grouped
GEMM per projection (``torch.nn.functional.grouped_mm``, device-side offsets, no host sync) where torch has one for
the device and dtype, else a loop over the experts that reads the offsets once (one sync per projection).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mol.config import INITS, is_number, is_whole
from mol.dispatch import _version, autocast_enabled
from mol.layers import AdapterLayer, adapter_dtype_for

# the 3-D tensors the grouped forward multiplies by: an experts module's other parameters (biases, norms) take none
EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj")
# the flags transformers' use_experts_implementation sets on an experts module, which the forward reads
_FLAGS = ("has_gate", "has_bias", "is_transposed")


def experts_problem(module: nn.Module) -> Optional[str]:
    """None if ``module`` is an experts module ExpertsLoRA can wrap, else why not (shown to the user)."""
    missing = [f for f in (*_FLAGS, "num_experts") if not hasattr(module, f)]
    if missing:
        return (f"{type(module).__name__} lacks {missing}, the flags transformers' use_experts_implementation "
                "sets on the experts classes whose forward mol knows (transformers 5's Mixtral, Qwen2/3-MoE, OLMoE, "
                "DeepSeek-V3, GPT-OSS, ...)")
    if getattr(module, "_is_expert_parallel", False):
        return f"{type(module).__name__} is sharded by expert parallelism, which ExpertsLoRA does not support"
    return None


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_TORCH = _version(torch.__version__)  # read once: grouped_mm_runs asks on every projection


def _aligned(*tensors: Tensor) -> bool:
    """The 16-byte alignment of pointers and of every stride but the unit one that grouped GEMM kernels need."""
    strides = all((s * t.element_size()) % 16 == 0 for t in tensors for s in t.stride() if s != 1)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace data_ptr(); what reaches here is a parameter, a fresh gather or cast (the caching
        # allocator aligns them to 512 bytes), and inductor lays out the operands of the grouped GEMM it emits
        return strides
    return strides and all(t.data_ptr() % 16 == 0 for t in tensors)


def grouped_mm_runs(x: Tensor, weight: Tensor) -> bool:
    """Whether torch's grouped GEMM computes ``x`` (pairs, in) by ``weight`` (groups, in, out) here: bfloat16 on
    a CUDA GPU of sm_80+ (sm_90 only before torch 2.9); float32 / 16-bit on the CPU from torch 2.11 (none before
    2.9, and 2.9-2.10's needed aligned pointers that memory-mapped checkpoints do not give); aligned strides.
    Under torch.compile bfloat16 alone, as transformers' own grouped forward (other dtypes take the loop, whose
    read of the offsets breaks the graph)."""
    if _GROUPED_MM is None or x.dtype != weight.dtype or not _aligned(x, weight):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch's meta function of grouped_mm, which tracing runs, takes bf16 alone (torch 2.9-2.13)
    if x.device.type == "cuda":
        from mol.dispatch import device_capability

        cap = device_capability(x.device)
        new = hasattr(F, "grouped_mm") or _TORCH >= (2, 9)
        return x.dtype == torch.bfloat16 and (cap >= (8, 0) if new else cap[0] == 9)
    if x.device.type == "cpu":
        return _TORCH >= (2, 11) and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return False


def grouped_mm(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows of ``x`` (pairs, in), sorted by group, times their group's ``weight`` (groups, in, out): (pairs, out).
    ``offsets`` (groups,) int32: where each group's rows end. Every row belongs to a group (offsets[-1] = pairs)."""
    if grouped_mm_runs(x, weight):
        return _GROUPED_MM(x, weight, offs=offsets)
    # no grouped GEMM for this device or dtype (float64, float16 on a GPU, older torch): one matrix product per
    # expert that has rows, after one read of the offsets
    ends = offsets.tolist()
    parts = [x[start:end] @ weight[g] for g, (start, end) in enumerate(zip([0, *ends[:-1]], ends)) if end > start]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[-1])


def expert_tensors(module: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype, torch.device]]:
    """The 3-D expert tensors (EXPERT_TENSORS) an experts module multiplies by, in the order it holds them: name ->
    (shape, dtype, device). A quantized one (mol.quant.NF4Experts) reports the tensors it keeps in NF4, with the
    dtype it computes in."""
    quantized = getattr(module, "quantized_expert_tensors", None)
    if quantized is not None:
        return quantized()
    return {n: (p.shape, p.dtype, p.device) for n, p in module.named_parameters(recurse=False)
            if n in EXPERT_TENSORS and p.dim() == 3}


def routing_inputs(module: nn.Module) -> tuple[inspect.Signature, list[str]]:
    """The signature of an experts module's forward and the names it gives its three inputs (hidden states, expert
    ids, routing weights: GPT-OSS calls the last two router_indices and routing_weights)."""
    signature = getattr(module, "routing_signature", None) or inspect.signature(module.forward)
    return signature, list(signature.parameters)[:3]


def bind_inputs(signature: inspect.Signature, names: list[str], args: tuple, kwargs: dict) -> tuple:
    """(hidden_states, top_k_index, top_k_weights) of one call of an experts module."""
    if len(args) == 3 and not kwargs:  # as the MoE blocks call it
        return args
    bound = signature.bind(*args, **kwargs)
    return tuple(bound.arguments.get(n) for n in names)


def grouped_experts(experts: nn.Module, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    project: Callable[[str, Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """transformers' grouped experts forward, read off the experts module's flags, with ``project(name, x_pairs,
    offsets, expert_ids)`` computing each projection of the (token, expert) pairs (bias included).
    x: (tokens, hidden); top_k_index, top_k_weights: (tokens, k) -> (tokens, hidden)."""
    tokens, k = top_k_index.shape
    # one row per (token, expert) pair, sorted by expert: each expert's pairs are one contiguous group
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    # where each expert's group ends, on the device (no host sync): the number of pairs with ids <= e
    offsets = torch.searchsorted(expert_ids, torch.arange(experts.num_experts, device=x.device), right=True)
    offsets = offsets.to(torch.int32)
    x_pairs = x[order // k]                                                         # (pairs, hidden)

    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    h = project(up_name, x_pairs, offsets, expert_ids)                              # (pairs, [2 *] intermediate)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)          # (pairs, intermediate)
    out = project("down_proj", h, offsets, expert_ids)                             # (pairs, hidden)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    # as transformers weighs: float32 routing weights (Mixtral's router) on bf16 experts sum in float32
    out = out * top_k_weights.reshape(-1)[order, None]
    # back to (token, k) order, then each token's k outputs summed
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=order.device)
    y = out[unsort].view(tokens, k, out.shape[-1]).sum(dim=1)                      # (t k) d -> t d
    return y.to(x.dtype)


def projection_dtype(x: Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype an expert projection computes in: autocast's where it is on, as nn.Linear's matmul would (so float32
    experts under bf16-mixed take the bf16 grouped GEMM, not the per-expert loop), else the expert tensor's (the
    model's activations may be float32 on a 16-bit base: a float32 norm)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if autocast_enabled(dev) and weight_dtype != torch.float64 else weight_dtype


def base_projection(experts: nn.Module, name: str, x: Tensor, offsets: Tensor, expert_ids: Tensor) -> Tensor:
    """Each pair's row of ``x`` times its expert's slice of the frozen expert tensor ``name``, plus its bias:
    (pairs, in) -> (pairs, out), in ``projection_dtype``. A quantized experts module (NF4Experts) computes it from
    its NF4 codes."""
    quantized = getattr(experts, "project_quantized", None)
    if quantized is not None:
        y = quantized(name, x, offsets, expert_ids)
    else:
        w = getattr(experts, name)
        w = w.to(projection_dtype(x, w.dtype))
        y = grouped_mm(x.to(w.dtype), w if experts.is_transposed else w.transpose(-2, -1), offsets)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[expert_ids].to(y.dtype)  # as F.linear's bias under autocast
    return y


def _padded_rank(rank: int) -> int:
    """The rank the grouped GEMMs run at: a multiple of 8, so that a (pairs, rank) operand's rows are 16-byte
    aligned in 16-bit dtypes, as their kernels need. The padding is zeros in A and B, so it changes nothing."""
    return -(-rank // 8) * 8


class ExpertsLoRA(AdapterLayer):
    """A frozen experts module (transformers 5's fused MoE experts) plus one LoRA pair per expert on each tensor
    named in ``parameters`` (a subset of ``gate_up_proj`` / ``up_proj`` / ``down_proj``). Called as the experts
    module is, ``(hidden_states (tokens, hidden), top_k_index (tokens, k), top_k_weights (tokens, k))``; see the
    module docstring for what it computes. ``rank`` / ``alpha`` may be one value or one per tensor name;
    ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``). The other arguments mean what
    LoRAConfig's fields of the same name do."""

    def __init__(self, base: nn.Module, parameters: Sequence[str], rank: Union[int, dict[str, int]] = 8,
                 alpha: Union[float, dict[str, float]] = 16.0, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", adapter_dtype: Union[None, str, torch.dtype] = None):
        super().__init__()
        problem = experts_problem(base)
        if problem:
            raise ValueError(f"ExpertsLoRA cannot wrap this module: {problem}")
        parameters = list(dict.fromkeys(parameters))
        if not parameters:
            raise ValueError("ExpertsLoRA needs at least one expert tensor to adapt, e.g. parameters=['gate_up_proj']")
        held = expert_tensors(base)
        for name in parameters:
            if name not in held:
                raise ValueError(f"ExpertsLoRA adapts the 3-D expert tensors {EXPERT_TENSORS} its forward multiplies "
                                 f"by; {type(base).__name__} has no such tensor {name!r} (its expert tensors: "
                                 f"{list(held)})")
        if not is_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {use_rslora!r}")
        if init not in INITS:
            raise ValueError(f"init={init!r} is unknown; choose one of {INITS}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self._signature, self._inputs = routing_inputs(base)
        self._tensors = held
        self.num_experts = held[parameters[0]][0][0]
        self.use_rslora, self.init = use_rslora, init
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in parameters:
            r = rank[name] if isinstance(rank, dict) else rank
            a = alpha[name] if isinstance(alpha, dict) else alpha
            if not is_whole(r) or r <= 0:
                raise ValueError(f"rank of {name} must be a positive integer, got {r!r}")
            if not is_number(a) or not 0 < a < math.inf:
                raise ValueError(f"alpha of {name} must be > 0, got {a!r}")
            _, base_dtype, device = held[name]
            experts, in_features, out_features = self.shape(name)
            dtype = adapter_dtype_for(adapter_dtype, base_dtype)
            self.rank[name], self.alpha[name] = r, a
            self.scaling[name] = a / math.sqrt(r) if use_rslora else a / r
            self.lora_A[name] = nn.Parameter(torch.empty(experts, r, in_features, dtype=dtype, device=device))
            self.lora_B[name] = nn.Parameter(torch.zeros(experts, out_features, r, dtype=dtype, device=device))
        self.reset_lora(init)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def shape(self, name: str) -> tuple[int, int, int]:
        """(experts, in_features, out_features) of expert tensor ``name``: (E, out, in) as stored, or (E, in, out)
        where the module says ``is_transposed`` (GPT-OSS)."""
        experts, d1, d2 = self._tensors[name][0]
        return (experts, d1, d2) if self.base_layer.is_transposed else (experts, d2, d1)

    @torch.no_grad()
    def reset_lora(self, init: str = "kaiming") -> None:
        """A random (uniform(+-1/sqrt(in)) as PEFT's, or normal(0, 1/r) for 'gaussian'), B zero."""
        for name, a in self.lora_A.items():
            if init == "kaiming":
                bound = 1.0 / math.sqrt(a.shape[-1])
                a.uniform_(-bound, bound)
            else:
                a.normal_(0.0, 1.0 / self.rank[name])
            self.lora_B[name].zero_()

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: rank={self.rank[n]}, scaling={self.scaling[n]:g}" for n in self.lora_A)
        return f"num_experts={self.num_experts}, {ranks}"

    # -- the forward, top to bottom --------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.merged or self.disabled:
            return self.base_layer(*args, **kwargs)
        x, top_k_index, top_k_weights = bind_inputs(self._signature, self._inputs, args, kwargs)
        return grouped_experts(self.base_layer, x, top_k_index, top_k_weights, self._project)

    def _project(self, name: str, x: Tensor, offsets: Tensor, expert_ids: Tensor) -> Tensor:
        """The base projection of the pairs (base_projection) plus, where ``name`` is adapted, each pair's expert's
        LoRA delta: (pairs, in) -> (pairs, out)."""
        y = base_projection(self.base_layer, name, x, offsets, expert_ids)  # in projection_dtype
        if name in self.lora_A:
            x = self.dropout(x.to(y.dtype))
            if x.shape[0] < self.num_experts:
                # a decode step (fewer pairs than experts; the shapes, not the data, decide): each pair's own
                # factors, gathered, where the grouped GEMMs would cast and pad every expert's for a few rows
                a = self.lora_A[name][expert_ids].to(y.dtype)                        # (pairs, rank, in)
                b = self.lora_B[name][expert_ids].to(y.dtype)                        # (pairs, out, rank)
                delta = torch.bmm(b, torch.bmm(a, x.unsqueeze(-1))).squeeze(-1)     # (pairs, out)
            else:
                a, b = self._factors(name, y.dtype)
                delta = grouped_mm(grouped_mm(x, a, offsets), b, offsets)          # via (pairs, rank)
            y = y + delta * self.scaling[name]
        return y

    def _factors(self, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """A as (experts, in, rank) and B as (experts, rank, out) in ``dtype``, the rank zero-padded (_padded_rank)."""
        a, b = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
        pad = _padded_rank(a.shape[1]) - a.shape[1]
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        return a.transpose(-2, -1), b.transpose(-2, -1)

    # -- merging -----------------------------------------------------------------------------------------------------

    def delta_weight(self, name: str) -> Tensor:
        """``scaling * B_e A_e`` for every expert, laid out as the base tensor ``name`` is (float32 or wider)."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        delta = torch.bmm(b.to(dtype), a.to(dtype)) * self.scaling[name]            # (experts, out, in)
        return delta.transpose(-2, -1) if self.base_layer.is_transposed else delta

    def merge_blocker(self) -> Optional[str]:
        if getattr(self.base_layer, "project_quantized", None) is not None:
            return ("the expert tensors are stored in NF4 (QLoRA), where a merged delta would be rounded to 4 bits; "
                    "load the adapter onto the full-precision model to merge it")
        for name in self.lora_A:
            w = getattr(self.base_layer, name)
            if not w.is_floating_point() or type(w) not in (Tensor, nn.Parameter):
                return f"the expert tensor {name} is a {type(w).__name__} of {w.dtype}, not a full-precision one"
        return None

    @torch.no_grad()
    def merge(self) -> None:
        """Add every expert's delta to its slice of the base tensors (the layer then computes the base alone)."""
        why = self.merge_blocker()
        if why:
            raise RuntimeError(f"cannot merge: {why}")
        if self.merged:
            return
        for name in self.lora_A:
            w = getattr(self.base_layer, name)
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight(name)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract a merged delta again."""
        if not self.merged:
            return
        for name in self.lora_A:
            w = getattr(self.base_layer, name)
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta_weight(name)).to(w.dtype))
        self.merged = False
