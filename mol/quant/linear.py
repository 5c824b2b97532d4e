"""NF4Linear: a frozen 4-bit NF4 base layer (QLoRA), and `quantize(model, "nf4")`."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mol import dispatch
from mol.kernels import env_flag
from mol.inject import _under_any, check_model, name_matches, replace_module, tied_parameter_names
from mol.layers import AdapterLayer, is_conv1d, linear_forward_problem, not_full_precision

from .nf4 import (NF4Weight, SUPPORTED_DTYPES, check_blocksize, check_finite, dequantize_nf4, from_bnb_tensors,
                  quantize_nf4, to_bnb_tensors, _QS_PREFIX)


def _use_small_kernel(x2d: torch.Tensor, packed: NF4Weight, fused_decode: bool, backend: str) -> bool:
    """Whether the forward of x2d runs the fused small-T NF4 kernel instead of dequantize + dense GEMM."""
    if not (backend != "torch" and x2d.is_cuda and fused_decode
            and env_flag("MOL_NF4_FUSED_DECODE", True)):
        return False
    if backend == "triton":
        dispatch.require_triton("NF4Linear")
    elif not dispatch.triton_available():
        return False
    from mol.kernels.nf4 import SMALL_FMA_MAX_T, small_matmul_supported
    if not small_matmul_supported(packed, x2d.shape[0]):
        return False
    # below sm_80 the kernel's bfloat16 pair arithmetic (fma.rn.bf16x2) does not exist, and its dot path (T > 2)
    # runs tl.dot without tensor cores: there "auto" dequantizes for cuBLAS instead
    if not dispatch.dots_on_tensor_cores(x2d.device):
        fma_path = x2d.shape[0] <= SMALL_FMA_MAX_T and x2d.dtype != torch.bfloat16
        if backend == "triton" and not fma_path:
            dispatch.check_dot_capability(x2d, "NF4Linear")  # bfloat16 raises, the dot path warns once
        return backend == "triton" or fma_path
    return True


def _nf4_linear_forward(x2d: torch.Tensor, packed: NF4Weight, bias: torch.Tensor | None, backend: str,
                        fused_decode: bool) -> torch.Tensor:
    """y = x W^T + b: _NF4LinearFn's forward, and NF4Linear's whole forward when nothing needs a gradient."""
    dev = x2d.device.type
    if torch.is_autocast_enabled(dev):
        # compute in the autocast dtype: dequantizing to float32 only for F.linear to cast it down would
        # double the scratch weight
        x2d = x2d.to(torch.get_autocast_dtype(dev))
    if bias is not None and bias.dtype != x2d.dtype:
        bias = bias.to(x2d.dtype)
    if _use_small_kernel(x2d, packed, fused_decode, backend):
        from mol.kernels import nf4_mma
        if (x2d.shape[0] >= nf4_mma.MIN_T and env_flag("MOL_NF4_MMA_DECODE", True)
                and nf4_mma.supported(packed, x2d)):
            return nf4_mma.nf4_matmul_decode(x2d, packed, bias)  # tensor cores fed from registers (Gluon)
        from mol.kernels.nf4 import nf4_matmul_small
        return nf4_matmul_small(x2d, packed, bias)
    w = dequantize_nf4(packed, x2d.dtype, backend=backend)  # scratch, freed on return
    return F.linear(x2d, w, bias)


class _NF4LinearFn(torch.autograd.Function):
    """y = x W^T + b with W stored in NF4. Saves no dense weight: backward dequantizes W again."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, packed: NF4Weight, bias: torch.Tensor | None, backend: str,
                fused_decode: bool = False):
        ctx.packed, ctx.backend, ctx.x_dtype = packed, backend, x2d.dtype
        ctx.has_bias = bias is not None
        return _nf4_linear_forward(x2d, packed, bias, backend, fused_decode)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_nf4(ctx.packed, grad_out.dtype, backend=ctx.backend)
            grad_x = (grad_out @ w).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0)
        return grad_x, None, grad_bias, None, None


def _codes_to_state_dict(module: "NF4Tensor", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    codes = state_dict.get(prefix + "qweight")
    if codes is not None and codes.dtype != torch.uint8:
        state_dict[prefix + "qweight"] = codes.view(torch.uint8)


def _codes_from_state_dict(module: "NF4Tensor", state_dict: dict, prefix: str, *args) -> None:
    param = module._parameters.get("qweight")
    codes = state_dict.get(prefix + "qweight")
    if param is not None and codes is not None and codes.dtype == torch.uint8 and codes.dim() == 1 \
            and codes.numel() % param.dtype.itemsize == 0:
        state_dict[prefix + "qweight"] = codes.view(param.dtype)  # a size that does not fit fails load's shape check


class NF4Tensor(nn.Module):
    """A frozen tensor of any shape stored in NF4 with double quantization (~4.127 bits/param), as buffers named as
    bitsandbytes names them (``qweight``, ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``,
    ``offset``), so that ``.to()``, ``state_dict()`` and devices work as for a parameter. ``.to(dtype)`` /
    ``.half()`` move the quantization state between devices but never change its dtype (a bf16 codebook would
    silently change every weight); they change ``weight_dtype``, the dtype of the dense tensor it stands for.
    NF4Linear's weight, and each fused expert tensor of an NF4Experts."""

    def __init__(self, packed: NF4Weight, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton'; got {backend!r}")
        self.weight_shape = tuple(packed.shape)
        self.weight_dtype = packed.dtype
        self.blocksize = packed.blocksize
        self.nested_blocksize = packed.nested_blocksize
        self.backend = backend
        self.register_buffer("qweight", packed.codes)
        self.register_buffer("absmax", packed.absmax)
        self.register_buffer("quant_map", packed.code)
        if packed.nested:
            self.register_buffer("nested_absmax", packed.nested_absmax)
            self.register_buffer("nested_quant_map", packed.nested_code)
            self.register_buffer("offset", packed.offset.reshape(()))
        else:
            self.nested_absmax = self.nested_quant_map = self.offset = None
        # the checkpoint holds uint8 codes whether they are a buffer or a parameter (store_codes_as)
        self._register_state_dict_hook(_codes_to_state_dict)
        self._register_load_state_dict_pre_hook(_codes_from_state_dict, with_module=True)

    def _apply(self, fn, recurse=True):
        state = {n: b for n, b in self._buffers.items() if b is not None}
        param = self._parameters.get("qweight")
        param_data = None if param is None else param.data
        super()._apply(fn, recurse)
        for n, old in state.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:  # keep the quant state's dtype, take only the device change
                self._buffers[n] = old.to(new.device)
        param = self._parameters.get("qweight")
        if param is not None and param.dtype != param_data.dtype:  # codes held in another dtype are bytes, not values
            param.data = param_data.to(param.device)
        # the dense tensor this stands for follows .to(dtype) / .half() as a bias does: what dequantize() returns,
        # the dtype NF4Experts computes in (torch's bf16 grouped GEMM on a model cast to bf16), the dtype adapters
        # beside it take (adapter_dtype="base"), and the compute dtype save_bnb_4bit records
        # (the code table's device: FSDP's _apply deregisters the codes when they are its parameters)
        cast = fn(torch.empty(0, dtype=self.weight_dtype, device=self._buffers["quant_map"].device))
        if cast.is_floating_point():
            self.weight_dtype = cast.dtype
        return self

    def _codes(self) -> torch.Tensor:
        codes = self._buffers.get("qweight")
        if codes is None:
            # held as a parameter of another dtype (store_codes_as); inside FSDP's forward a plain tensor attribute,
            # a view of the gathered flat parameter (use_orig_params)
            held = self.qweight
            stored = self.__dict__.get("_codes_dtype", held.dtype)
            if held.dtype != stored:  # FSDP cast the values the bytes spell, not the bytes: garbage codes
                raise RuntimeError(f"NF4: the codes arrive as {held.dtype}, stored as {stored}: FSDP's "
                                   f"MixedPrecision(param_dtype={held.dtype}) cast their bytes' values. Wrap with "
                                   f"param_dtype={stored} or None (the dtype nf4_codes_as_parameters returns), or "
                                   f"cast the model to {held.dtype} and store the codes again before wrapping")
            codes = held.view(torch.uint8)
        return codes

    def store_codes_as(self, dtype: torch.dtype) -> bool:
        """Hold the 4-bit codes as a frozen ``nn.Parameter`` of the floating ``dtype`` (the same bytes reinterpreted,
        as bitsandbytes' ``quant_storage``), for FSDP, which shards parameters but not buffers, and flattens only
        floating tensors of one dtype per unit. The state dict still holds uint8 codes, and ``.to(dtype)`` does not
        cast them. Returns False, leaving a buffer, where the code bytes do not fill whole ``dtype`` elements. Call it
        before wrapping in FSDP: once FSDP holds the codes, only their own dtype is accepted (a no-op)."""
        if not dtype.is_floating_point:
            raise TypeError(f"store_codes_as needs a floating dtype (FSDP flattens no integer tensors); got {dtype}")
        param = self._parameters.get("qweight")
        if param is not None and param.dtype == dtype:
            return True  # the same Parameter kept: FSDP (and an optimizer) hold it by identity
        if param is not None and getattr(param, "_fsdp_flattened", False):
            # a new Parameter in its place would be one FSDP does not manage, and its next forward fails inside FSDP
            raise ValueError(f"store_codes_as({dtype}): FullyShardedDataParallel holds these codes as {param.dtype} "
                             "(this layer is wrapped already); store them before wrapping (mol.train.fsdp."
                             "nf4_codes_as_parameters(model), then FullyShardedDataParallel(model, ...))")
        codes = self._codes()
        if codes.numel() % dtype.itemsize:
            if param is not None:  # held in another dtype before: a buffer again, not a parameter of a third dtype
                del self._parameters["qweight"]
                self.register_buffer("qweight", codes)
            return False
        if "qweight" in self._buffers:
            del self._buffers["qweight"]
        else:
            del self._parameters["qweight"]
        self.qweight = nn.Parameter(codes.view(dtype), requires_grad=False)
        self._codes_dtype = dtype  # what _codes checks the forward's codes against (FSDP's param_dtype)
        return True

    @property
    def packed(self) -> NF4Weight:
        """The packed weight as an NF4Weight (views of this module's buffers)."""
        b = self._buffers  # read directly: each forward builds this, and Module.__getattr__ costs a frame per buffer
        if b["quant_map"].dtype != torch.float32:
            # .to() keeps it float32 (_apply); only a cast past it rounds the tables and scales, every weight with them
            raise RuntimeError(f"NF4: quant_map is {b['quant_map'].dtype}, not float32: something cast the NF4 "
                               "quantization state past .to() (FSDP's MixedPrecision(buffer_dtype=...) casts every "
                               "floating buffer), rounding the code tables and scales and so every weight. Wrap with "
                               "MixedPrecision(buffer_dtype=None), as mol.train's trainer=fsdp does, on a model "
                               "quantized again or reloaded")
        return NF4Weight(self._codes(), b["absmax"], b["quant_map"], self.weight_shape, self.weight_dtype,
                         self.blocksize, b.get("nested_absmax"), b.get("nested_quant_map"), b.get("offset"),
                         self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor, in ``dtype`` (default: the one it was quantized from); allocates a full-precision copy."""
        return dequantize_nf4(self.packed, dtype, backend=self.backend)


def code_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the NF4 codes ``model`` holds as parameters (store_codes_as): bytes, not values, which parameter counts
    and FSDP's dtype vote leave out."""
    return {id(p) for m in model.modules()
            if isinstance(m, NF4Tensor) and (p := m._parameters.get("qweight")) is not None}


class NF4Linear(NF4Tensor):
    """A frozen linear layer whose weight is stored in NF4 with double quantization (QLoRA, ~4.127 bits/param).

    Forward computes in the activation dtype: on CUDA it dequantizes into a scratch weight (one Triton pass, freed
    right after) and calls cuBLAS, except that T <= 16 tokens (decode) use a fused kernel that reads the 4-bit
    codes directly (2.5-4x faster there; `fused_decode = False` or MOL_NF4_FUSED_DECODE=0 turns it off): the Triton
    FMA kernel for T <= 2 (mol/kernels/nf4.py), the Gluon kernel that feeds the tensor cores from registers for
    3 <= T <= 16 where Triton has Gluon and the GPU is sm_80+ (mol/kernels/nf4_mma.py; MOL_NF4_MMA_DECODE=0 keeps
    the Triton one). Below sm_80 (T4) only float16 / float32 x at T <= 2 take a fused kernel. On other devices the
    PyTorch reference dequantizes. Backward gives dx (and the bias gradient if the bias requires
    grad); the weight itself is frozen and has no gradient.
    Buffers follow bitsandbytes' names so `.to()`, `state_dict()` and devices work as for nn.Linear;
    `.to(dtype)` / `.half()` move the quantization state between devices but never change its dtype (a bf16
    codebook would silently change every weight), only the bias's.
    """

    is_quantized_linear = True  # mol.inject treats it as a linear target
    fused_decode = True  # class default; set per instance, or MOL_NF4_FUSED_DECODE=0 for all

    def __init__(self, packed: NF4Weight, bias: torch.Tensor | None = None, backend: str = "auto"):
        if not isinstance(packed, NF4Weight):
            raise TypeError(f"NF4Linear takes an NF4Weight (quantize_nf4(weight)), got {type(packed).__name__}; to "
                            "quantize an nn.Linear use NF4Linear.from_linear(linear)")
        if len(packed.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight (out_features, in_features); got shape {packed.shape}")
        super().__init__(packed, backend)
        self.out_features, self.in_features = packed.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "weight_shape" not in self.__dict__:  # pickled before NF4Tensor held the shape
            self.weight_shape = (self.out_features, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, nested_blocksize: int = 256,
                    double_quant: bool = True, backend: str = "auto") -> "NF4Linear":
        """Quantize an nn.Linear (its weight on its own device) into an NF4Linear."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear expects nn.Linear, got {type(linear).__name__}")
        _check_quantizable(linear)
        packed = quantize_nf4(linear.weight.data, blocksize, nested_blocksize, double_quant)
        return cls(packed, linear.bias.data if linear.bias is not None else None, backend)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        # model code that reads `.weight` (T5's dtype check, nn.MultiheadAttention's F.linear) would otherwise get
        # "'NF4Linear' object has no attribute 'weight'", which does not say why
        raise AttributeError(f"{type(self).__name__} ({self.out_features}x{self.in_features}) has no dense `weight`: "
                             "its weight is stored 4-bit (NF4 codes in `qweight`); call `dequantize()` for a "
                             "full-precision copy, or keep this layer out of quantize (skip=[its name])")

    def uses_own_kernel(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs the fused small-T NF4 matmul rather than dequantize + dense GEMM."""
        return _use_small_kernel(x.reshape(-1, self.in_features), self.packed, self.fused_decode, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear expects inputs with last dim {self.in_features}, got {tuple(x.shape)}")
        if not x.is_floating_point():  # the kernels would compute in x's dtype: an int x gave all zeros
            raise TypeError(f"NF4Linear expects a floating-point input, as nn.Linear does; got {x.dtype}. Cast it "
                            "first (e.g. x.float()), or embed token ids before the linear layers")
        lead = x.shape[:-1]
        codes = self._codes()
        if x.is_meta or codes.is_meta:  # shape inference (e.g. a model built on the meta device), as nn.Linear
            if x.device != codes.device:
                raise RuntimeError(f"NF4Linear: the input is on {x.device} but the layer on {codes.device}; move "
                                   "them to one device")
            return x.new_empty(*lead, self.out_features)
        bias = self.bias
        fn = _NF4LinearFn.apply
        if not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))):
            fn = _nf4_linear_forward  # inference (decode): no autograd node to build and keep
        y = fn(x.reshape(-1, self.in_features), self.packed, bias, self.backend, self.fused_decode)
        return y.reshape(*lead, self.out_features)

    # ---- bitsandbytes / Hugging Face interop
    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The state dict bitsandbytes' Linear4bit would save: '{prefix}weight', '{prefix}weight.absmax',
        '.quant_map', '.nested_absmax', '.nested_quant_map', '.quant_state.bitsandbytes__nf4', and '{prefix}bias'."""
        sd = {f"{prefix}weight{k}": v for k, v in to_bnb_tensors(self.packed).items()}
        if self.bias is not None:
            sd[f"{prefix}bias"] = self.bias.detach()
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "", backend: str = "auto") -> "NF4Linear":
        """Build an NF4Linear from a bitsandbytes 4-bit layer's tensors under `prefix` (no bitsandbytes needed).
        Raises ValueError for fp4 checkpoints, for weights that are not 4-bit, and for a bias that does not fit."""
        packed = from_bnb_tensors(sd, f"{prefix}weight")
        bias = sd.get(f"{prefix}bias")
        # checked here, naming the key: else the layer takes any tensor and fails at its first forward
        if bias is not None and (tuple(bias.shape) != (packed.shape[0],) or not bias.is_floating_point()):
            raise ValueError(f"{prefix + 'bias'!r} is {str(bias.dtype).removeprefix('torch.')} of shape "
                             f"{tuple(bias.shape)}, but the layer's bias is {packed.shape[0]} floats (out_features): "
                             "the checkpoint is damaged or mixes two models; re-save or re-download it")
        return cls(packed, bias, backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}")


def _skip_match(name: str, patterns: list[str]) -> bool:
    """quantize's skip rule: a pattern equals the name, ends it at a dot, or fully matches it as a regex. A pattern
    that is no valid regex counts as a name only: `skip` is checked to compile (_checked_skip), and the patterns a
    model gives (_keep_in_fp32_modules) are names."""
    if name_matches(name, patterns):
        return True
    for p in patterns:
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            pass
    return False


@torch.no_grad()
def quantize(model: nn.Module, method: str = "nf4", skip: list[str] | None = None, blocksize: int = 64,
             nested_blocksize: int = 256, backend: str = "auto") -> nn.Module:
    """Replace the model's nn.Linear layers (and transformers' Conv1D layers, GPT-2's, whose (in, out) weight is
    transposed into NF4Linear's (out, in) as transformers' bitsandbytes loading does) by frozen NF4Linear in place
    and return the model. The fused experts of a mixture-of-experts model (transformers 5's Mixtral, Qwen3-MoE,
    GPT-OSS, ...: 3-D expert tensors, no linear per expert) become NF4Experts, their expert tensors in NF4.

    Kept in full precision, as transformers' bitsandbytes loading keeps them:
    - the output head (``model.get_output_embeddings()``) and every linear holding a tied tensor;
    - in a transformers model, the module holding its last parameter: the task head (a sequence classifier's
      ``score`` / ``classifier``, with or without a bias);
    - the modules the model's (or a sub-model's) ``_keep_in_fp32_modules`` / ``_keep_in_fp32_modules_strict`` name
      (T5's ``wo``, whose dtype its feed-forward reads);
    - the linears torch's attention modules read the weight of: all of an nn.MultiheadAttention's (``out_proj``),
      an nn.TransformerEncoderLayer's ``linear1`` / ``linear2`` (its inference fast path).
    - the nn.Linear subclasses whose forward is not the linear map (Llama 4's and PhiMoE's routers return a tuple):
      transformers' bitsandbytes loading converts only layers of type nn.Linear itself.
    Also kept: every module whose name, or a parent's, equals an entry of `skip`, ends with '.' + entry, or fully
    matches it as a regex; and every layer whose tensors an adapter trains (``model.mol_trainable``:
    modules_to_save, earlier adapters) or that belongs to a mol adapter (a bottleneck adapter's or prefix encoder's
    own linears; an adapter layer's base_layer is quantized).
    Raises if the model would hold no NF4 layer at all: a model believed 4-bit that is not would be a silent no-op.
    """
    check_model(model, "quantize")
    if method != "nf4":
        raise ValueError(f"quantize: unknown method {method!r}; the only supported method is 'nf4'")
    check_blocksize("blocksize", blocksize, 64, "quantize")
    check_blocksize("nested_blocksize", nested_blocksize, 256, "quantize")
    skip = _checked_skip(model, skip)
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        head = get_head()
    trained = set(getattr(model, "mol_trainable", ()))
    kept = _kept_full_precision(model) | _heads_and_tied(model)
    targets = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or is_conv1d(m)) or m is head or name in kept:
            continue
        if _under_any(name, skip, _skip_match):
            continue
        if any(f"{name}.{p}" in trained for p, _ in m.named_parameters()) or _adapter_part(model, name):
            continue
        if linear_forward_problem(m) is not None:  # NF4Linear's plain x @ W.T in its place would drop its forward
            continue
        targets.append((name, _linear_of_conv1d(m) if is_conv1d(m) else m))
    from .experts import NF4Experts  # it builds on NF4Tensor, defined here

    experts = _experts_to_quantize(model, kept, skip, trained)
    if not targets and not experts and not any(isinstance(m, (NF4Linear, NF4Experts)) for m in model.modules()):
        raise ValueError(f"quantize: {type(model).__name__} has no linear layer to quantize (left out: the output "
                         "and task heads, tied layers, the model's _keep_in_fp32_modules, the linears "
                         "nn.MultiheadAttention / nn.TransformerEncoderLayer read the weight of, `skip` and trained "
                         "layers): check `skip`, or drop quantize_base for this model")
    for name, lin in targets:  # every layer checked before any changes: an error leaves the model as it was
        _naming_layer(name, _check_quantizable, lin)
    for name, module in experts:
        _naming_layer(name, NF4Experts.check, module)
    for name, lin in targets:
        replace_module(model, name, _naming_layer(name, NF4Linear.from_linear, lin, blocksize, nested_blocksize,
                                                  backend=backend))
    for name, module in experts:
        replace_module(model, name, NF4Experts(module, blocksize, nested_blocksize, backend))
    return model


def _experts_to_quantize(model: nn.Module, kept: set[str], skip: list[str], trained: set[str]
                         ) -> list[tuple[str, nn.Module]]:
    """The fused experts modules of a mixture-of-experts model (mol.experts) that quantize turns into NF4Experts:
    by the rules it keeps linears by (skip, the model's full-precision modules, trained tensors)."""
    from mol.experts import expert_tensors, experts_problem

    from .experts import NF4Experts

    found = []
    for name, m in model.named_modules():
        if isinstance(m, NF4Experts) or name in kept or _under_any(name, skip, _skip_match):
            continue
        if not expert_tensors(m) or experts_problem(m) is not None:
            continue
        if any(f"{name}.{p}" in trained for p, _ in m.named_parameters()) or _adapter_part(model, name):
            continue
        found.append((name, m))
    return found


def _checked_skip(model: nn.Module, skip) -> list[str]:
    """`skip` as a list of patterns, each a valid regex that matches some module (a typo would silently quantize
    the layer it meant to keep)."""
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip or [])
    bad = [p for p in skip if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"quantize: skip entries must be non-empty module names or regexes; got {bad[0]!r}")
    for p in skip:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"quantize: skip entry {p!r} is neither a module name nor a valid regex ({e}); give a "
                             "name or suffix such as 'q_proj', or a Python regex matched against the full name such "
                             r"as r'.*\.q_proj' (not a glob like '*.q_proj')") from e
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in skip if not any(_skip_match(n, [p]) for n in names)]
    if unmatched:
        offered = sorted({n.rpartition(".")[2] for n in names if not n.rpartition(".")[2].isdigit()})
        raise ValueError(f"quantize: skip entr{'ies' if len(unmatched) > 1 else 'y'} {unmatched} match"
                         f"{'' if len(unmatched) > 1 else 'es'} no module of {type(model).__name__}; module names on "
                         f"offer: {offered[:30]}{' ...' if len(offered) > 30 else ''}. Fix skip (through inject: "
                         "modules_to_save, which QLoRA keeps out of NF4): exact names, suffixes such as 'q_proj', or "
                         "regexes matched against the full name")
    return skip


def _kept_full_precision(model: nn.Module) -> set[str]:
    """Names of the modules the model itself needs in full precision, and their submodules: those its (or a
    sub-model's) ``_keep_in_fp32_modules`` / ``_keep_in_fp32_modules_strict`` name, as transformers' bitsandbytes
    loading keeps them (T5's feed-forward reads ``wo.weight.dtype``; MoE routers list their gate), and the linears
    that torch's own modules read the weight of: an nn.MultiheadAttention's (it computes ``F.linear(...,
    self.out_proj.weight, ...)`` itself) and an nn.TransformerEncoderLayer's ``linear1`` / ``linear2`` (its
    inference fast path hands their weights to one fused op)."""
    kept: set[str] = set()
    for prefix, sub in model.named_modules():
        if isinstance(sub, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
            read = None if isinstance(sub, nn.MultiheadAttention) else ("linear1", "linear2")  # None: all of them
            kept.update(f"{prefix}.{rel}" if prefix else rel for rel, _ in sub.named_modules()
                        if rel and (read is None or rel.split(".")[0] in read))
        patterns = []
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            value = getattr(sub, attr, None)
            if isinstance(value, (list, tuple, set, frozenset)):
                # entries name modules or their tensors ("mlp.gate.weight"): the module is what stays unquantized
                patterns += [p.removesuffix(".weight").removesuffix(".bias") for p in value if isinstance(p, str) and p]
        if not patterns:
            continue
        for rel, _ in sub.named_modules():
            if rel and _under_any(rel, patterns, _skip_match):
                kept.add(f"{prefix}.{rel}" if prefix else rel)
    return kept


def _heads_and_tied(model: nn.Module) -> set[str]:
    """The modules transformers' bitsandbytes loading keeps in full precision besides the output embeddings
    (transformers' get_keys_to_not_convert): those holding a tied tensor (a layer sharing its weight with another
    module; quantizing one would silently untie them) and, in a transformers model, the one holding the last
    parameter: its task head (a sequence classifier's `score` / `classifier`). transformers 5 strips only
    '.weight' from that last name and so quantizes a head with a bias (BERT's `classifier`); a head is small and
    is what fine-tuning trains, so it is kept here with or without one, as transformers 4 kept it."""
    kept: set[str] = set()
    for names in tied_parameter_names(model).values():
        owners = {n.rpartition(".")[0] for n in names}
        if len(owners) > 1:  # two modules share the tensor (one module holding it twice unties nothing)
            kept |= owners
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported already
    if transformers is not None and isinstance(model, getattr(transformers, "PreTrainedModel", ())):
        # the base's last parameter, not an adapter's (a LoRA's lora_B, a prefix encoder attached as mol_prefix)
        owner = [name.rpartition(".")[0] for name, _ in model.named_parameters()]
        base = [n for n in owner if not n.startswith("mol_") and not (n and _adapter_part(model, n))]
        if base and base[-1]:  # a parameter of the model itself (CLIP's logit_scale) names no module to keep
            kept.add(base[-1])
    return kept


def _adapter_part(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` belongs to a mol adapter (a bottleneck adapter's or a prefix encoder's linears)
    rather than to the frozen base an adapter layer wraps (its ``base_layer``)."""
    module = model
    for part in name.split("."):
        if isinstance(module, AdapterLayer) and part != "base_layer":
            return True
        module = getattr(module, part)
    return False


def _linear_of_conv1d(conv: nn.Module) -> nn.Linear:
    """An nn.Linear computing what transformers' Conv1D (weight (in, out)) computes, its weight a transposed view
    (quantize_nf4 reads it; nothing is copied here)."""
    n_in, n_out = conv.weight.shape
    lin = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
    lin.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
    if conv.bias is not None:
        lin.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return lin


def _naming_layer(name: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its ValueError / TypeError prefixed with the layer's name."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise type(e)(f"quantize: layer {name!r}: {e}") from e


def _check_quantizable(linear: nn.Linear) -> None:
    """Raise TypeError, naming the way out, where NF4Linear.from_linear cannot quantize this layer's weight."""
    what = not_full_precision(linear)
    if what is not None:
        raise TypeError(f"{what}, so it is quantized already; load the model in full precision to put it in NF4, or "
                        "keep its own quantization: inject without quantize_base (mol.load_adapter(..., "
                        "quantize_base=False))")
    if linear.weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"NF4 quantizes float16, bfloat16 or float32 weights; got {linear.weight.dtype}: cast the "
                        "model first, e.g. model.float()")
    check_finite(linear.weight.detach())  # here too: quantize checks every layer before it replaces the first


def load_bnb_4bit(model: nn.Module, state_dict: dict[str, torch.Tensor], backend: str = "auto") -> list[str]:
    """Replace each nn.Linear (or Conv1D) whose '<name>.weight' is a bitsandbytes 4-bit entry of `state_dict` by an
    NF4Linear read from it (no bitsandbytes needed). Returns the names replaced; load the other keys yourself
    (e.g. model.load_state_dict(rest, strict=False)); a layer's bias that `state_dict` lacks (in another shard) stays
    the layer's own, for that call to fill.
    Raises, leaving the model as it was, when an entry is inconsistent, when a layer's shape differs from its
    entry's, when it holds a bias for a layer without one, when an entry names a module that is not a linear layer,
    when the state dict holds 4-bit entries but none names a module of the model (a prefix that differs: a
    LlamaForCausalLM checkpoint into a LlamaModel), and when it holds bitsandbytes 8-bit entries (not supported). A
    state dict without 4-bit entries (a shard holding only the embeddings) replaces nothing and returns []."""
    check_model(model, "load_bnb_4bit")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_bnb_4bit takes a state dict (name -> tensor), got {type(state_dict).__name__}; read "
                        "the checkpoint first, e.g. safetensors.torch.load_file(path)")
    eight = sorted(k for k in state_dict if k == "SCB" or k.endswith(".SCB"))
    if eight:
        raise ValueError(f"load_bnb_4bit: the state dict holds bitsandbytes 8-bit (LLM.int8) entries ({eight[:3]}"
                         f"{' ...' if len(eight) > 3 else ''}); mol reads 4-bit NF4 checkpoints only, 8-bit is not "
                         "supported. Load it with transformers and bitsandbytes (BitsAndBytesConfig(load_in_8bit="
                         "True)), or load the full-precision model and call mol.quantize(model, 'nf4')")
    marker = "weight." + _QS_PREFIX
    entries: dict[str, str] = {}  # module name -> its quant_state key
    for k in state_dict:
        if k.startswith(marker):
            entries.setdefault("", k)
        elif "." + marker in k:
            entries.setdefault(k[:k.index("." + marker)], k)
    if not entries:
        return []
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if n and _bnb_target(m)]
    if not any(n in modules for n in entries):
        raise ValueError(f"load_bnb_4bit: none of the state dict's {len(entries)} 4-bit entries names a module of "
                         f"{type(model).__name__}: e.g. {[f'{n}.weight' for n in list(entries)[:3]]}, while its linear "
                         f"layers are named e.g. {linears[:3]}. {_prefix_hint(list(entries), linears)}")
    built = []
    for name, qs_key in entries.items():
        if name not in modules:
            continue  # a layer this model lacks (the list returned says which were replaced)
        mod = modules[name]
        if not name:
            raise ValueError(f"load_bnb_4bit: {qs_key!r} is the model's own weight; it replaces submodules: build the "
                             "layer with NF4Linear.from_bnb_state_dict(state_dict) instead")
        if not _bnb_target(mod):
            raise ValueError(f"load_bnb_4bit: {qs_key!r} is for {name!r}, a {type(mod).__name__}, not an nn.Linear "
                             "or Conv1D; load the 4-bit base into the plain model (before mol.inject), or load this "
                             "checkpoint into the model class it was saved from")
        new = NF4Linear.from_bnb_state_dict(state_dict, f"{name}.", backend)
        shape = tuple(mod.weight.shape[::-1]) if is_conv1d(mod) else (mod.out_features, mod.in_features)
        if (new.out_features, new.in_features) != shape:
            raise ValueError(f"load_bnb_4bit: {name!r} is {shape[0]}x{shape[1]} (out x in) in the model but "
                             f"{new.out_features}x{new.in_features} in the checkpoint; load the checkpoint into "
                             "the model it was saved from")
        own_bias = getattr(mod, "bias", None)
        if new.bias is not None and own_bias is None:
            raise ValueError(f"load_bnb_4bit: the state dict holds {name + '.bias'!r}, but {name!r} has no bias in "
                             "the model; load the checkpoint into the model (config) it was saved from")
        if new.bias is None and own_bias is not None:
            # not in this state dict (another shard, or loaded after): keep the layer's own for load_state_dict to
            # fill (it would ignore the key of a layer without one, the bias silently lost)
            new.bias = nn.Parameter(own_bias.detach(), requires_grad=False)
        built.append((name, new))
    for name, new in built:  # every entry checked and read: nothing below can fail half-way
        replace_module(model, name, new)
    return [name for name, _ in built]


def _bnb_target(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


def _prefix_hint(entries: list[str], linears: list[str]) -> str:
    """How the checkpoint's names differ from the model's, where one is a dotted prefix longer than the other."""
    for e in entries:
        for n in linears:
            if e.endswith("." + n):
                return (f"The checkpoint's names carry the prefix {e[:-len(n)]!r} that the model's lack: strip it "
                        "from the keys, or load into the model class the checkpoint was saved from.")
            if n.endswith("." + e):
                return (f"The model's names carry the prefix {n[:-len(e)]!r} that the checkpoint's lack: add it to "
                        "the keys, or load into the model's sub-module the checkpoint was saved from.")
    return "Load the checkpoint into the model class it was saved from."
