"""NF4 (4-bit NormalFloat) with double quantization, bit-compatible with bitsandbytes.

Format (QLoRA, Dettmers et al. 2023, as bitsandbytes stores it):
- the weight is flattened row-major and cut into blocks of `blocksize` (64) values, the last one partial where
  the blocksize does not divide the weight's size;
- each block keeps absmax = max|w|; every value w/absmax is rounded to the nearest of 16 NF4 levels;
- two 4-bit codes per byte, the even element in the high nibble (bitsandbytes' order);
- double quantization: offset = mean(absmax); (absmax - offset) is quantized again in blocks of
  `nested_blocksize` (256) with bitsandbytes' signed dynamic 8-bit map, keeping one float32 absmax
  per nested block.
Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.

This file is the PyTorch reference (any device). mol.kernels.nf4 holds the Triton kernels for CUDA.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from mol import dispatch

# The 16 NF4 levels, exactly as bitsandbytes hard-codes them (float32).
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 levels as a float32 tensor."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (create_dynamic_map): 256 sorted float32 values in [-1, 1].

    Used for the second-level (nested) quantization of the absmax values.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        b = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        b = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass
class NF4Weight:
    """A packed NF4 weight (bitsandbytes layout).

    codes:          uint8 (ceil(numel/2),), two 4-bit level indices per byte, even element in the high nibble.
    absmax:         uint8 (n_blocks,) when nested (double quantized), else float32 (n_blocks,); n_blocks =
                    ceil(numel/blocksize), the last block partial where blocksize does not divide numel (as
                    bitsandbytes quantizes any weight).
    code:           float32 (16,), the NF4 levels.
    nested_absmax:  float32 (ceil(n_blocks/nested_blocksize),) or None.
    nested_code:    float32 (256,) bitsandbytes' dynamic map, or None.
    offset:         float32 0-d tensor, mean of the first-level absmax (kept as a tensor: no host sync).
    shape:          the dense weight's shape, (out_features, in_features) for a linear layer.
    dtype:          the dtype the weight was quantized from (what dequantize returns by default).
    blocksize / nested_blocksize: values per absmax block of the first / second (double) quantization.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        """Whether the absmax is itself quantized (double quantization)."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of weights (the product of ``shape``)."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def device(self) -> torch.device:
        """The device of the codes (every tensor is on it)."""
        return self.codes.device

    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(mv(self.codes), mv(self.absmax), mv(self.code), self.shape, self.dtype, self.blocksize,
                         mv(self.nested_absmax), mv(self.nested_code), mv(self.offset), self.nested_blocksize)

    def storage_bits(self) -> int:
        """Bits stored per weight matrix, excluding the two constant codebooks (16 + 256 floats shared by all
        layers) but including codes, absmax, nested absmax and offset."""
        bits = self.codes.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.nested:
            bits += self.nested_absmax.numel() * 32 + 32
        return bits

    def bits_per_param(self) -> float:
        """``storage_bits()`` per weight (~4.127 with double quantization at the default blocksizes)."""
        return self.storage_bits() / self.numel


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit / quantize_blockwise set


def check_blocksize(what: str, value, default: int, where: str = "NF4", fix: str | None = None) -> int:
    """`value` as an int if it is one of bitsandbytes' blocksizes, else a ValueError naming `what` and the way out
    (`fix`; by default: use the QLoRA default)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in BLOCKSIZES:
        raise ValueError(f"{where}: {what} must be an int power of two in 32..4096 (bitsandbytes' set); got "
                         f"{value!r}. {fix or f'Use the QLoRA default {what}={default}.'}")
    return int(value)


def n_blocks(numel: int, blocksize: int) -> int:
    """Absmax blocks of a weight of `numel` values: the last one partial where `blocksize` does not divide it."""
    return -(-numel // blocksize)


def check_finite(weight: torch.Tensor) -> None:
    """Raise ValueError if `weight` holds inf or nan: one such value makes its block's absmax inf/nan, and through
    the double quantization's mean every block's, so the whole layer would dequantize to nan without a word."""
    if weight.is_meta:
        return
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"NF4 cannot quantize a weight holding inf or nan ({int(bad.sum())} of {weight.numel()} "
                         f"values, the first at index {first}): its block's scale, and through the double "
                         "quantization every block's, would be inf/nan. Fix the weight (an overflow in float16? load "
                         "it in bfloat16 or float32), or keep this layer unquantized")


def _nearest(x: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level; a value exactly on a midpoint goes to the lower level (as bitsandbytes)."""
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(x, bounds)


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, nested_blocksize: int = 256,
                 double_quant: bool = True) -> NF4Weight:
    """Quantize a float16/bfloat16/float32 tensor to NF4 (QLoRA), with double quantization by default.

    Runs on the tensor's device with plain PyTorch ops; produces bitsandbytes' exact layout and arithmetic
    (scale by the reciprocal of absmax in float32, nearest level with ties to the lower one).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"NF4 can quantize float16, bfloat16 or float32 weights; got {weight.dtype}. "
                        "Convert first, e.g. weight.float().")
    check_blocksize("blocksize", blocksize, 64)
    check_blocksize("nested_blocksize", nested_blocksize, 256)
    numel = weight.numel()
    if numel == 0:
        raise ValueError(f"NF4 cannot quantize an empty weight (shape {tuple(weight.shape)})")
    device = weight.device
    code = nf4_code(device)
    w = weight.detach().reshape(-1).float()
    nb = n_blocks(numel, blocksize)
    if nb * blocksize != numel:
        # a partial last block, as bitsandbytes quantizes it: zeros never raise its absmax, and the codes of the
        # padding past the last byte are dropped (an odd numel's last low nibble is the code of 0.0, as bnb's)
        w = torch.cat([w, w.new_zeros(nb * blocksize - numel)])
    w = w.view(nb, blocksize)
    absmax = w.abs().amax(dim=1)
    if not absmax.is_meta and not bool(torch.isfinite(absmax).all()):  # amax keeps a nan: one check per block
        check_finite(weight)
    scaled = (w * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    q = _nearest(scaled, code).to(torch.uint8)[:2 * -(-numel // 2)]
    codes = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Weight(codes, absmax, code, tuple(weight.shape), weight.dtype, blocksize)

    offset = absmax.mean()
    centered = absmax - offset
    nb = centered.numel()
    nblocks2 = (nb + nested_blocksize - 1) // nested_blocksize
    padded = torch.zeros(nblocks2 * nested_blocksize, dtype=torch.float32, device=device)
    padded[:nb] = centered
    padded = padded.view(nblocks2, nested_blocksize)
    # the zero padding never raises a block's absmax, so this equals bitsandbytes' partial last block
    nested_absmax = padded.abs().amax(dim=1)
    scaled2 = (padded * (1.0 / nested_absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:nb]
    nested_code = dynamic_map().to(device)
    qabsmax = _nearest(scaled2, nested_code).to(torch.uint8)
    return NF4Weight(codes, qabsmax, code, tuple(weight.shape), weight.dtype, blocksize,
                     nested_absmax, nested_code, offset.reshape(()), nested_blocksize)


def dequantize_absmax(packed: NF4Weight) -> torch.Tensor:
    """First-level absmax values as float32 (n_blocks,), undoing the double quantization."""
    if not packed.nested:
        return packed.absmax.float()
    idx = torch.arange(packed.absmax.numel(), device=packed.absmax.device) // packed.nested_blocksize
    return packed.nested_code[packed.absmax.long()] * packed.nested_absmax[idx] + packed.offset


def dequantize_nf4_reference(packed: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """PyTorch reference dequantization (any device); float32 math, cast to `dtype` (default: the original)."""
    q = torch.stack([packed.codes >> 4, packed.codes & 0xF], dim=1).reshape(-1).long()
    numel, absmax = packed.numel, dequantize_absmax(packed)
    padded = absmax.numel() * packed.blocksize
    if q.numel() != padded:  # a partial last block: pad to whole blocks, drop the padding after scaling
        q = torch.cat([q, q.new_zeros(padded - q.numel())])
    vals = packed.code[q].view(-1, packed.blocksize) * absmax.unsqueeze(1)
    return vals.reshape(-1)[:numel].reshape(packed.shape).to(dtype or packed.dtype)


def dequantize_nf4(packed: NF4Weight, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """Dequantize to `dtype` (default: the original dtype). backend: "auto" (Triton on CUDA), "torch", "triton"."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton'; got {backend!r}")
    if backend == "triton":
        dispatch.require_triton("dequantize_nf4")
        if not (packed.codes.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):  # else Triton's "0 active drivers"
            raise RuntimeError(f"NF4: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for testing); the "
                               f"NF4 weight is on {packed.codes.device}: move the model to a GPU or use "
                               "backend='torch' (or 'auto')")
    if backend == "triton" or (backend == "auto" and dispatch.auto_uses_triton(packed.codes)):
        from mol.kernels.nf4 import nf4_dequantize
        return nf4_dequantize(packed, dtype or packed.dtype)
    return dequantize_nf4_reference(packed, dtype)


# ---------------------------------------------------------------- bitsandbytes / Hugging Face checkpoint format

_QS_PREFIX = "quant_state.bitsandbytes__"
_DAMAGED = "The checkpoint is damaged or was not written by bitsandbytes."


def to_bnb_tensors(packed: NF4Weight) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' Linear4bit writes for its `weight` (keys relative to 'weight')."""
    meta = {"quant_type": "nf4", "blocksize": packed.blocksize,
            "dtype": str(packed.dtype).replace("torch.", ""), "shape": list(packed.shape)}
    out = {"": packed.codes.reshape(-1, 1), ".absmax": packed.absmax, ".quant_map": packed.code}
    if packed.nested:
        out[".nested_absmax"] = packed.nested_absmax
        out[".nested_quant_map"] = packed.nested_code
        meta.update({"nested_blocksize": packed.nested_blocksize, "nested_dtype": "float32",
                     "nested_offset": float(packed.offset.item())})  # save path: a sync here is fine
    blob = json.dumps(meta).encode("utf-8")
    out["." + _QS_PREFIX + "nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


def from_bnb_tensors(sd: dict[str, torch.Tensor], key: str) -> NF4Weight:
    """Read a bitsandbytes 4-bit weight stored under `key` (e.g. 'model.layers.0.q_proj.weight')."""
    qs_keys = [k for k in sd if k.startswith(key + "." + _QS_PREFIX)]
    if not qs_keys:
        if key in sd:
            raise ValueError(f"{key!r} has no '{key}.{_QS_PREFIX}<type>' entry: it is not a bitsandbytes 4-bit "
                             "weight (an 8-bit or unquantized checkpoint?). Load it as nn.Linear and call "
                             "mol.quantize(model, 'nf4') instead.")
        raise KeyError(f"no bitsandbytes 4-bit weight under {key!r} in the state dict")
    if len(qs_keys) > 1:
        raise ValueError(f"{key!r} has {len(qs_keys)} quant_state entries ({sorted(qs_keys)}); a bitsandbytes 4-bit "
                         "weight has one: the state dict mixes two checkpoints")
    qs_key = qs_keys[0]
    meta = _read_quant_state(sd[qs_key], qs_key)
    quant_type = meta.get("quant_type", qs_key[len(key + "." + _QS_PREFIX):])
    if quant_type != "nf4":
        raise ValueError(f"{key!r} was saved with bitsandbytes quant_type={quant_type!r}; mol reads only 'nf4' "
                         "checkpoints. Re-quantize the original model with bnb_4bit_quant_type='nf4', or load it "
                         "with bitsandbytes.")
    dtype_name = meta.get("dtype")
    if dtype_name not in _DTYPE_NAMES:
        raise ValueError(f"{qs_key!r}: unsupported original dtype {dtype_name!r} (expected one of "
                         f"{list(_DTYPE_NAMES)})")
    shape = meta.get("shape")
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ValueError(f"{qs_key!r}: the quant_state has no valid 'shape' (got {shape!r}, expected a list of "
                         "positive ints): the checkpoint is damaged or was not written by bitsandbytes")
    shape = tuple(shape)
    blocksize = check_blocksize("blocksize", meta.get("blocksize"), 64, f"{qs_key!r}", _DAMAGED)
    numel = 1
    for d in shape:
        numel *= d
    nested = key + ".nested_absmax" in sd
    missing = [key + k + what for k, what in (("", " (the packed 4-bit codes)"), (".absmax", "")) if key + k not in sd]
    if key + ".absmax" in sd and sd[key + ".absmax"].dtype == torch.uint8 and not nested:
        missing.append(key + ".nested_absmax (its absmax holds uint8 codes of a double quantization)")
    if nested:
        missing += [key + k for k in (".nested_quant_map",) if key + k not in sd]
        missing += [f"{k} in {qs_key}" for k in ("nested_offset", "nested_blocksize") if k not in meta]
    if missing:
        raise KeyError(f"incomplete bitsandbytes 4-bit entry for {key!r}: missing {missing}")
    data = sd[key]
    if data.dtype != torch.uint8:  # bnb allows another quant_storage dtype: the bytes are the same
        data = data.contiguous().view(torch.uint8)
    codes = data.reshape(-1)
    if codes.numel() != -(-numel // 2):
        raise ValueError(f"{key!r}: {codes.numel()} packed bytes but shape {shape} needs {-(-numel // 2)}")
    absmax = sd[key + ".absmax"].reshape(-1)
    blocks = n_blocks(numel, blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"{key + '.absmax'!r} has {absmax.numel()} entries, but shape {shape} in blocks of "
                         f"{blocksize} has {blocks}: the absmax does not belong to this weight or blocksize")
    if nested and absmax.dtype != torch.uint8:
        raise ValueError(f"{key + '.absmax'!r} is {absmax.dtype} beside a nested_absmax: a double-quantized absmax "
                         "holds uint8 codes")
    if not nested and not absmax.is_floating_point():
        raise ValueError(f"{key + '.absmax'!r} is {absmax.dtype}: without a nested_absmax it must hold the float "
                         "block scales")
    code = _table(sd, key + ".quant_map", 16).to(codes.device) if key + ".quant_map" in sd else nf4_code(codes.device)
    if not nested:
        return NF4Weight(codes, absmax.float(), code, shape, _DTYPE_NAMES[dtype_name], blocksize)
    nested_blocksize = check_blocksize("nested_blocksize", meta["nested_blocksize"], 256, f"{qs_key!r}", _DAMAGED)
    nested_absmax = sd[key + ".nested_absmax"].reshape(-1)
    if nested_absmax.numel() != n_blocks(blocks, nested_blocksize) or not nested_absmax.is_floating_point():
        raise ValueError(f"{key + '.nested_absmax'!r} is {nested_absmax.dtype} of {nested_absmax.numel()} entries, "
                         f"but {blocks} absmax blocks in nested blocks of {nested_blocksize} need "
                         f"{n_blocks(blocks, nested_blocksize)} float values")
    offset = meta["nested_offset"]
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"{qs_key!r}: nested_offset must be a finite number; got {offset!r}")
    return NF4Weight(codes, absmax, code, shape, _DTYPE_NAMES[dtype_name], blocksize, nested_absmax.float(),
                     _table(sd, key + ".nested_quant_map", 256),
                     torch.tensor(float(offset), dtype=torch.float32, device=codes.device), nested_blocksize)


def _read_quant_state(blob: torch.Tensor, qs_key: str) -> dict:
    """The JSON metadata bitsandbytes packs as a uint8 tensor, or a ValueError naming the key."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
        raise ValueError(f"{qs_key!r} must be a uint8 tensor of UTF-8 JSON bytes; got "
                         f"{getattr(blob, 'dtype', type(blob).__name__)}")
    try:
        meta = json.loads(bytes(blob.reshape(-1).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{qs_key!r} is not bitsandbytes' quant_state JSON ({e}): the checkpoint is damaged or "
                         "truncated; re-save or re-download it") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{qs_key!r} holds JSON {type(meta).__name__}, not bitsandbytes' quant_state object")
    return meta


def _table(sd: dict[str, torch.Tensor], key: str, size: int) -> torch.Tensor:
    """A codebook entry (quant_map: the 16 NF4 levels; nested_quant_map: the 256-value dynamic map) as float32."""
    t = sd[key]
    if t.numel() != size or not t.is_floating_point():
        raise ValueError(f"{key!r} is {t.dtype} of {t.numel()} entries; bitsandbytes writes {size} float32 values "
                         "there: the checkpoint is damaged or not an NF4 one")
    return t.reshape(-1).float()
