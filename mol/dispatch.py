"""Chooses how the routed LoRA delta is computed: the Triton grouped kernels (CUDA) or the PyTorch reference.

The reference computes every expert densely and weights it by a (T, E) gate matrix that is zero for the
experts a token did not choose. That is E times the LoRA FLOPs, but it has no data-dependent shapes and no
host sync, so it runs anywhere, compiles with ``fullgraph=True``, and is the oracle the kernels are tested
against.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mol.kernels import autocast_enabled, autocast_off

if TYPE_CHECKING:
    from mol.kernels.layer_graphs import LayerGraphs

BACKENDS = ("auto", "torch", "triton")


def dense_gates(gates: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """(T, K) gates at (T, K) expert ids -> (T, E) matrix, zero where an expert was not chosen."""
    dense = torch.zeros(gates.shape[0], num_experts, device=gates.device, dtype=gates.dtype)
    return dense.scatter_add(1, expert_ids, gates)


def lora_delta_torch(x: Tensor, lora_A: Tensor, lora_B: Tensor, gates: Tensor, expert_ids: Tensor, scale: float) -> Tensor:
    """delta[t] = scale * sum_k gates[t, k] * B[e] @ A[e] @ x[t], with e = expert_ids[t, k]. x: (T, in) -> (T, out)."""
    num_experts, rank, in_features = lora_A.shape
    # plain permutes and reshapes, the ops einops' rearrange ran here: einops caches its backend in a global dict at
    # its first call, a write that torch.compile refuses inside an activation checkpoint
    h = x @ lora_A.permute(2, 0, 1).reshape(in_features, num_experts * rank)  # (T, E*r): all shrinks in one GEMM
    g = dense_gates(gates, expert_ids, num_experts).to(h.dtype)
    tokens = h.shape[0]
    h = (h.reshape(tokens, num_experts, rank) * g[:, :, None]).reshape(tokens, num_experts * rank)
    return (h @ lora_B.permute(0, 2, 1).reshape(num_experts * rank, lora_B.shape[1])) * scale


# The oldest Triton the kernels are tested on (TRITON_INTERPRET=1 suite, torch 2.7.1 + triton 3.3.1). 3.2's
# autotuner drops our timer and its interpreter needs a GPU driver, so it cannot be tested on a CPU.
MIN_TRITON = (3, 3)
_TRITON_OK: bool | None = None
_TRITON_WHY = ""


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# constant for a process: torch.compile calls it and takes the answer instead of tracing the imports
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether a Triton new enough for mol.kernels is installed and they import (checked once per process)."""
    global _TRITON_OK, _TRITON_WHY
    if _TRITON_OK is None:
        try:
            import triton

            if _version(triton.__version__) < MIN_TRITON:
                raise ImportError(f"triton {triton.__version__} is older than the {MIN_TRITON[0]}.{MIN_TRITON[1]} "
                                  f"the kernels need (upgrade torch, which pins it, or pip install "
                                  f"'triton>={MIN_TRITON[0]}.{MIN_TRITON[1]}')")
            from mol.kernels import grouped_lora  # noqa: F401
            _TRITON_OK = True
        except ImportError as err:
            _TRITON_OK, _TRITON_WHY = False, str(err)
            if "triton" in sys.modules:  # installed but unusable: say so once, not on every auto choice
                warnings.warn(f"mol: the Triton kernels are off ({err}); CUDA layers run the PyTorch reference path",
                              stacklevel=2)
    return _TRITON_OK


def auto_uses_triton(x: Tensor) -> bool:
    """backend='auto' on x: the Triton kernels for CUDA tensors when they can run, else the reference."""
    return x.is_cuda and triton_available()


# The oldest GPUs whose tensor cores Triton's tl.dot uses: below sm_80 Triton (3.x) lowers every tl.dot to scalar
# FMAs (its tensor-core path for sm_75 was dropped), so the MoL kernels, GEMMs in tl.dot, would run several times
# slower than the reference path's cuBLAS GEMMs there; sm_75 has no bfloat16 arithmetic at all.
MIN_DOT_CAPABILITY = (8, 0)
_CAPABILITY: dict = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, looked up once per device (the query costs ~10 µs of
    host time, and this runs every layer call)."""
    cap = _CAPABILITY.get(device)
    if cap is None:
        p = torch.cuda.get_device_properties(device)
        cap = _CAPABILITY[device] = (p.major, p.minor)
    return cap


# a constant of the device: torch.compile calls it while tracing and keeps the answer, as for triton_available. It
# returns the comparison, not the capability: torch 2.11's Dynamo failed to compare the (major, minor) tuple inside a
# traced forward (InternalTorchDynamoError in its tuple >= polyfill; RESULTS run 55), which no compiled MoL or NF4
# layer on a GPU survived
@torch.compiler.assume_constant_result
def dots_on_tensor_cores(device: torch.device) -> bool:
    """Whether Triton's tl.dot runs on tensor cores on this CUDA device (sm_80+; see MIN_DOT_CAPABILITY)."""
    return device_capability(device) >= MIN_DOT_CAPABILITY


def tensor_core_dots(x: Tensor) -> bool:
    """Whether Triton's tl.dot runs on tensor cores for CUDA tensor x (sm_80+; see MIN_DOT_CAPABILITY)."""
    return dots_on_tensor_cores(x.device)


def check_dot_capability(x: Tensor, where: str) -> None:
    """For a forced backend='triton' on a CUDA x: raise where the dot kernels cannot run x's dtype (bfloat16 below
    sm_80), warn once where they run but slower than backend='torch' (float16 / float32 below sm_80)."""
    if dots_on_tensor_cores(x.device):
        return
    if x.dtype != torch.bfloat16:
        _warn_slow_dots(where, x.device)
        return
    cap = device_capability(x.device)
    raise RuntimeError(f"{where}: backend='triton' with bfloat16 on a compute capability {cap[0]}.{cap[1]} GPU "
                       f"(sm_{cap[0]}{cap[1]}): it has no bfloat16 arithmetic, and Triton runs its matrix products "
                       "without tensor cores below sm_80; use float16 (model.half()) or backend='torch'")


_WARNED: set = set()


# a constant for torch.compile, which runs it while tracing: a warnings.warn in a traced forward is a graph break,
# and fullgraph=True then failed to compile the model at all
@torch.compiler.assume_constant_result
def _warn_slow_dots(where: str, device: torch.device) -> bool:
    """Warn once per (where, capability) that a forced backend='triton' runs its dots without tensor cores."""
    cap = device_capability(device)
    if (where, cap) not in _WARNED:
        _WARNED.add((where, cap))
        warnings.warn(f"{where}: backend='triton' on a compute capability {cap[0]}.{cap[1]} GPU "
                      f"(sm_{cap[0]}{cap[1]}): Triton runs its matrix products without tensor cores below sm_80, so "
                      "the kernels are slower than backend='torch' (cuBLAS), which backend='auto' picks there",
                      stacklevel=4)
    return True


def require_triton(where: str) -> None:
    """Raise, naming the cause, when backend='triton' is forced but the kernels cannot run."""
    if not triton_available():
        raise RuntimeError(f"{where}: backend='triton' was forced but the Triton kernels cannot run "
                           f"({_TRITON_WHY or 'triton is not installed'}); install a supported triton or use "
                           f"backend='torch'")


def resolve_backend(backend: str, x: Tensor) -> str:
    """'auto' picks Triton for CUDA tensors of a kernel dtype when Triton is installed and the GPU is sm_80+ (below,
    Triton's matrix products have no tensor cores: see MIN_DOT_CAPABILITY), else the reference.

    A forced backend that cannot run raises instead of quietly computing with the other one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
    kernel_dtype = x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if backend == "auto":
        return "triton" if kernel_dtype and auto_uses_triton(x) and tensor_core_dots(x) else "torch"
    if backend == "triton":
        require_triton("MoLLinear")
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for testing); "
                               "move the model to a GPU or use backend='torch'")
        if not kernel_dtype:
            raise RuntimeError(f"backend='triton' supports float16/bfloat16/float32, got {x.dtype}; use backend='torch'")
        if x.is_cuda:
            check_dot_capability(x, "MoLLinear")
    return backend


FUSED_ROUTERS = ("topk", "switch", "soft")


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the fused path computes in: autocast's where it is on (as nn.Linear would), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if autocast_enabled(dev) else x.dtype


def fused_routing_available(router: torch.nn.Module, backend: str, x: Tensor) -> bool:
    """True when the whole routed layer (router included) runs on the fused Triton path."""
    return getattr(router, "kind", None) in FUSED_ROUTERS and resolve_backend(backend, x) == "triton"


def fused_mol_linear(base_layer: torch.nn.Module, x: Tensor, x_lora: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                     router: torch.nn.Module, scale: float, lb_coef: float, z_coef: float,
                     graphs: LayerGraphs | None = None, token_weights: Tensor | None = None):
    """base_layer(x) + routed experts, router and auxiliary losses in one fused Triton pass (see
    mol.kernels.routed_lora). x: (..., in), at least 2-D; x_lora: the experts' input when it differs from x
    (dropout), of x's shape. Returns (out (..., out), FusedRouterOutput, whose tensors have one row per token).

    Under autocast everything runs in the autocast dtype, as nn.Linear would. A frozen nn.Linear base of that
    dtype, or an NF4Linear (dequantized on the fly), is computed inside the fused function: the base GEMMs
    accumulate into the adapters' output and dx buffers. Any other base runs first and its output is added to.
    ``graphs``: the layer's mol.kernels.layer_graphs.LayerGraphs (small training calls replay CUDA graphs).
    ``token_weights`` (T,): 0 for padding, which the router losses and statistics then leave out.
    """
    from mol.kernels.routed_lora import routed_lora_linear
    from mol.routers import FusedRouterOutput

    dev = x.device.type
    dt = compute_dtype(x)
    weight = getattr(base_layer, "weight", None)
    bias = getattr(base_layer, "bias", None)
    frozen_bias = bias is None or not bias.requires_grad
    use_weight = (type(base_layer) is torch.nn.Linear and not weight.requires_grad and weight.dtype == dt
                  and (bias is None or (frozen_bias and bias.dtype == dt)))
    # A quantized base (NF4Linear) is dequantized inside the fused function, in forward and again in backward,
    # so its GEMMs accumulate into the adapters' buffers like a plain weight's -- unless it has its own kernel
    # for this input (NF4's fused small-T matmul), which then runs first as a base output.
    weight_fn = None
    # (an FSDP unit of its own forwards attributes to the NF4Linear inside, whose codes are whole only in its forward)
    wrapped = "_fsdp_wrapped_module" in base_layer._modules
    if not use_weight and frozen_bias and not wrapped and getattr(base_layer, "is_quantized_linear", False):
        own_kernel = getattr(base_layer, "uses_own_kernel", None)
        if hasattr(base_layer, "dequantize") and not (own_kernel is not None and own_kernel(x)):
            weight_fn = base_layer.dequantize
    base_out = None if use_weight or weight_fn is not None else base_layer(x)
    noise = None
    if router.training and router.noise_std > 0:
        noise = torch.randn(math.prod(x.shape[:-1]), router.num_experts, device=x.device) * router.noise_std
    w_r = router.weight if router.weight.dtype == torch.float32 else router.weight.float()
    with autocast_off(dev):
        y, aux, hl, gates, ids, stats = routed_lora_linear(
            _as(x, dt), lora_A, lora_B, w_r, router.kind, router.top_k, scale,
            weight=weight if use_weight else None, weight_fn=weight_fn,
            bias=None if base_out is not None or bias is None else _as(bias, dt),
            base_out=None if base_out is None else base_out.to(dt), x_lora=None if x_lora is None else _as(x_lora, dt),
            noise=noise, lb_coef=lb_coef, z_coef=z_coef, token_weights=token_weights, graphs=graphs)
    if torch.compiler.is_compiling():
        # views, free in the graph: Dynamo (seen in torch 2.13) fails with "... does not belong to this Graph" when a
        # layer inside an activation checkpoint keeps (MoLLinear._last) the very tensors an autograd.Function returned
        aux, hl, gates, ids, stats = (t.view_as(t) for t in (aux, hl, gates, ids, stats))
    return y, FusedRouterOutput(gates, ids, hl, lora_A.shape[0], stats, aux, noise, token_weights)


def routed_linear(base_layer: torch.nn.Module, x: Tensor, x_lora: Tensor, lora_A: Tensor, lora_B: Tensor,
                  gates: Tensor, expert_ids: Tensor, scale: float, backend: str = "auto") -> Tensor:
    """base_layer(x) + routed LoRA delta of x_lora (x after dropout). x, x_lora: (T, in) -> (T, out).

    On the Triton path a frozen full-precision nn.Linear is fused with the experts (one output buffer in
    forward, the LoRA dx accumulated into the base dx in backward) when nothing changes x between the two
    (no dropout) and no autocast re-types the base GEMM.
    """
    if resolve_backend(backend, x_lora) == "triton":
        from mol.kernels.grouped_lora import grouped_lora_add, grouped_lora_linear

        weight = getattr(base_layer, "weight", None)
        fusable = (type(base_layer) is torch.nn.Linear and not weight.requires_grad
                   and (base_layer.bias is None or (not base_layer.bias.requires_grad
                                                    and base_layer.bias.dtype == x.dtype))
                   and x_lora is x and weight.dtype == x.dtype and not autocast_enabled(x.device.type))
        if fusable:
            return grouped_lora_linear(x, weight, base_layer.bias, lora_A, lora_B, gates, expert_ids, scale)
        base_out = base_layer(x)
        return grouped_lora_add(base_out, x_lora.to(base_out.dtype), lora_A, lora_B, gates, expert_ids, scale)
    base_out = base_layer(x)
    return base_out + lora_delta_torch(x_lora.to(lora_A.dtype), lora_A, lora_B, gates, expert_ids, scale).to(base_out.dtype)
