"""NF4 (QLoRA) quantization, NF4Linear, bitsandbytes interop and the Triton NF4 kernels (interpreter, CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import json

import pytest
import torch
import torch.nn as nn
import triton
import triton.language as tl

from mol.quant import (NF4_LEVELS, NF4Linear, dequantize_nf4, dequantize_nf4_reference, load_bnb_4bit, quantize,
                       quantize_nf4)
from mol.kernels import nf4 as nf4k
from mol.quant.nf4 import dequantize_absmax, dynamic_map


def _gen(seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    return g


def _weight(out, inp, dtype=torch.float32, g=None):
    # heavy-ish tails and per-row scale spread so blocks differ
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g).add(0.1) * 0.05
    return w.to(dtype)


# ---------------------------------------------------------------- against torchao (independent implementation)

def test_levels_scales_and_codes_match_torchao():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    g = _gen()
    w = _weight(96, 512, torch.float32, g)
    ao = to_nf4(w, 64, 256)
    p = quantize_nf4(w, 64, 256)
    # the 16 levels (torchao keeps them rounded to 4 decimals)
    torch.testing.assert_close(torch.tensor(NF4_LEVELS), ao.nf4.float(), atol=6e-5, rtol=0)
    # first-level scales: ours (through bnb's dynamic 8-bit map) vs torchao's (linear int8) both approximate absmax
    ao_scales = ao.dequantize_scalers(ao.quantized_scalers, ao.quantization_factor, ao.scaler_block_size).float()
    true_absmax = w.reshape(-1, 64).abs().amax(1)
    ours = dequantize_absmax(p)
    assert (ours - true_absmax).abs().max() < 0.02 * true_absmax.max()
    assert (ao_scales - true_absmax).abs().max() < 0.02 * true_absmax.max()
    # the 4-bit codes: same nibble order, same nearest level except where torchao's rounded levels move a midpoint
    ours_q = torch.stack([p.codes >> 4, p.codes & 15], 1).reshape(-1).long()
    ao_q = torch.stack([ao.quantized_data >> 4, ao.quantized_data & 15], 1).reshape(-1).long()
    diff = ours_q != ao_q
    assert diff.float().mean() < 2e-3, f"{diff.float().mean():.4%} of codes differ from torchao"
    assert ((ours_q - ao_q).abs() <= 1).all()
    # dequantized weight: same levels times our scales (with torchao's codes) reproduce ours where codes agree
    ours_deq = dequantize_nf4(p).reshape(-1)
    rebuilt = torch.tensor(NF4_LEVELS)[ao_q] * ours.repeat_interleave(64)
    torch.testing.assert_close(ours_deq[~diff], rebuilt[~diff], rtol=0, atol=0)
    # and both implementations land equally close to the original
    ao_deq = ao.get_original_weight().float().reshape(-1)
    e_ours = (ours_deq - w.reshape(-1)).norm() / w.norm()
    e_ao = (ao_deq - w.reshape(-1)).norm() / w.norm()
    assert abs(e_ours - e_ao) < 0.01 and e_ours < 0.12


def test_dynamic_map_is_bitsandbytes_map():
    m = dynamic_map()
    assert m.numel() == 256 and torch.all(m[1:] >= m[:-1])
    assert m[0] == -m[-2] and m[-1] == 1.0 and (m == 0).sum() == 1
    # the smallest non-zero magnitude is 10^-6 * mean(0.1, 1) / ... per create_dynamic_map's first exponent
    assert abs(m[m > 0].min().item() - 0.55e-6) < 1e-9


# ---------------------------------------------------------------- round trip, storage, errors

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_bounds(dtype):
    g = _gen()
    w = _weight(64, 384, dtype, g)
    p = quantize_nf4(w)
    d = dequantize_nf4(p)
    assert d.dtype == dtype and d.shape == w.shape
    wf, df = w.float().reshape(-1, 64), d.float().reshape(-1, 64)
    absmax = wf.abs().amax(1, keepdim=True)
    # largest half-gap between NF4 levels is (1 - 0.696) / 2 = 0.152 of absmax; plus the 8-bit absmax error
    deq_absmax = dequantize_absmax(p).unsqueeze(1)
    bound = 0.1520 * absmax + (deq_absmax - absmax).abs() + 1e-2 * absmax
    assert ((wf - df).abs() <= bound).all()
    rel = (wf - df).norm() / wf.norm()
    assert 0.02 < rel < 0.12


def test_bits_per_param():
    p = quantize_nf4(torch.randn(1024, 4096))
    assert p.codes.dtype == torch.uint8 and p.absmax.dtype == torch.uint8
    assert p.bits_per_param() <= 4.127
    # non-nested storage costs 4.5 bits
    assert quantize_nf4(torch.randn(64, 64), double_quant=False).bits_per_param() == 4.5


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"empty weight \(shape \(0, 64\)\)"):
        quantize_nf4(torch.randn(0, 64))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantize_nf4(torch.randint(0, 5, (64, 64)))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64, 64), blocksize=48)
    with pytest.raises(ValueError, match="unknown method 'int4'"):
        quantize(nn.Sequential(nn.Linear(64, 64)), "int4")
    bad = nn.Sequential(nn.Linear(7, 3))  # a partial block is fine (test_partial_last_block_*); a nan is not
    with torch.no_grad():
        bad[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="layer '0'"):
        quantize(bad, "nf4")
    # an nn.Linear given to the constructor (as MoLLinear takes one) failed with "no attribute 'shape'"
    with pytest.raises(TypeError, match=r"NF4Linear takes an NF4Weight .*got Linear; .*NF4Linear\.from_linear"):
        NF4Linear(nn.Linear(64, 64))


# ---------------------------------------------------------------- NF4Linear

@pytest.mark.parametrize("bias", [False, True])
def test_nf4linear_forward_backward_vs_float64(bias):
    g = _gen()
    lin = nn.Linear(256, 96, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_weight(96, 256, g=g))
    q = NF4Linear.from_linear(lin)
    assert (q.in_features, q.out_features) == (256, 96)
    assert not any(p.requires_grad for p in q.parameters())
    w64 = dequantize_nf4_reference(q.packed, torch.float64)
    x = torch.randn(3, 5, 256, generator=g, requires_grad=True)
    y = q(x)
    ref = x.detach().double() @ w64.T + (lin.bias.detach().double() if bias else 0)
    assert y.shape == (3, 5, 96)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
    gy = torch.randn(3, 5, 96, generator=g)
    y.backward(gy)
    gref = gy.double() @ w64
    assert ((x.grad.double() - gref).norm() / gref.norm()) < 1e-5
    # inference (no autograd node built) computes the same output; a trainable bias still gets its gradient
    with torch.no_grad():
        y0 = q(x)
    assert y0.grad_fn is None and torch.equal(y0, y.detach())
    if bias:
        q.bias.requires_grad_(True)
        q(x.detach()).sum().backward()
        torch.testing.assert_close(q.bias.grad, torch.full((96,), 15.0))


def test_nf4linear_keeps_no_dense_weight_for_backward():
    q = NF4Linear.from_linear(nn.Linear(128, 64))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert not any(t.is_floating_point() and t.numel() >= 128 * 64 for t in saved)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_stored_as_a_floating_parameter_are_the_same_weight(dtype):
    """store_codes_as (FSDP-QLoRA: FSDP shards floating parameters only): the same bytes as a frozen parameter; the
    forward, the gradient and the uint8 state dict are unchanged, a uint8 state dict loads into it and back, and
    .to(dtype) casts the bias but never the code bytes."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = NF4Linear.from_linear(lin)
    held = NF4Linear.from_linear(lin)
    assert held.store_codes_as(dtype)
    assert isinstance(held.qweight, nn.Parameter) and not held.qweight.requires_grad and held.qweight.dtype == dtype
    assert "qweight" not in dict(held.named_buffers())
    x = torch.randn(5, 96, requires_grad=True)
    torch.testing.assert_close(held(x), q(x), rtol=0, atol=0)
    (gx_held,) = torch.autograd.grad(held(x).square().sum(), x)
    (gx,) = torch.autograd.grad(q(x).square().sum(), x)
    torch.testing.assert_close(gx_held, gx, rtol=0, atol=0)
    sd = held.state_dict()
    assert sd["qweight"].dtype == torch.uint8 and torch.equal(sd["qweight"], q.state_dict()["qweight"])
    other = NF4Linear.from_linear(nn.Linear(96, 40))
    other.store_codes_as(dtype)
    other.load_state_dict(q.state_dict())  # uint8 codes into the parameter
    torch.testing.assert_close(other(x), q(x), rtol=0, atol=0)
    plain = NF4Linear.from_linear(nn.Linear(96, 40))
    plain.load_state_dict(held.state_dict())  # and back into a buffer
    torch.testing.assert_close(plain(x), q(x), rtol=0, atol=0)
    cast = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float16}[dtype]
    held.to(cast)
    assert held.qweight.dtype == dtype and held.bias.dtype == cast
    torch.testing.assert_close(held(x.detach().to(cast)), q.to(cast)(x.detach().to(cast)), rtol=0, atol=0)
    odd = NF4Linear.from_linear(nn.Linear(3, 2))  # 6 weights: 3 code bytes
    assert not odd.store_codes_as(torch.float32) and odd.qweight.dtype == torch.uint8
    # 12 code bytes: whole float32 elements, not whole float64 ones; the float32 parameter went back to a uint8
    # buffer (it stayed, which FSDP refuses beside float64 weights, while nf4_codes_as_parameters said "whole")
    twelve = NF4Linear.from_linear(nn.Linear(6, 4))
    y = twelve(x[:, :6])
    assert twelve.store_codes_as(torch.float32) and not twelve.store_codes_as(torch.float64)
    assert "qweight" in dict(twelve.named_buffers()) and twelve.qweight.dtype == torch.uint8
    assert "qweight" not in dict(twelve.named_parameters())
    torch.testing.assert_close(twelve(x[:, :6]), y, rtol=0, atol=0)
    with pytest.raises(TypeError, match="floating dtype"):
        odd.store_codes_as(torch.int32)


def test_quantize_model_skips_head_and_names():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "v_proj": nn.Linear(64, 128)})
            self.lm_head = nn.Linear(128, 64)

        def get_output_embeddings(self):
            return self.lm_head

    m = Tiny()
    x = torch.randn(2, 64)
    ref = m.block["v_proj"](m.block["q_proj"](x))
    out = quantize(m, "nf4", skip=["q_proj"])
    assert out is m
    assert isinstance(m.block["v_proj"], NF4Linear)
    assert type(m.block["q_proj"]) is nn.Linear and type(m.lm_head) is nn.Linear
    y = m.block["v_proj"](m.block["q_proj"](x))
    assert ((y - ref).norm() / ref.norm()) < 0.15


@pytest.mark.parametrize("odd", ["8bit", "4bit", "float64"])
def test_quantize_refuses_a_layer_it_cannot_quantize_before_changing_any(odd):
    """A layer already quantized by another library (bitsandbytes' nn.Linear subclasses holding codes) or of a dtype
    NF4 does not take fails the whole call, naming the layer and the way out, before any layer is replaced; and
    MoLConfig(quantize_base="nf4") fails the same way and leaves the model as it was."""
    import mol
    from conftest import Bnb4bitLike, Bnb8bitLike, make_tiny_llama
    from mol.inject import replace_module

    base = make_tiny_llama(hidden=64)
    name = "model.layers.1.mlp.up_proj"  # late in module order: the layers before it would be replaced first
    lin = base.get_submodule(name)
    if odd == "float64":
        lin.double()
    else:
        replace_module(base, name, (Bnb8bitLike if odd == "8bit" else Bnb4bitLike)(lin))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    types = {n: type(m) for n, m in base.named_modules()}
    want = (r"quantized already; load the model in full precision" if odd != "float64"
            else r"float16, bfloat16 or float32 weights; got torch.float64: cast the model first")
    for call in (lambda: quantize(base, "nf4"),
                 lambda: mol.inject(base, mol.MoLConfig(num_experts=2, top_k=1, rank=4, quantize_base="nf4"))):
        with pytest.raises(TypeError, match=rf"layer '{name}': .*{want}"):
            call()
        assert {n: type(m) for n, m in base.named_modules()} == types
        assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(TypeError, match=want):  # the layer alone says the same
        NF4Linear.from_linear(base.get_submodule(name))


def test_qlora_keeps_modules_to_save_and_adapters_in_full_precision():
    """quantize_base quantizes the frozen base only: a classifier head in modules_to_save (a container of linears
    here, as RoBERTa's) stays a trainable nn.Linear, and a bottleneck adapter's own linears, injected in the same
    call or earlier, are neither quantized by it nor by a later mol.quantize."""
    import mol
    from conftest import make_tiny_llama

    model = make_tiny_llama(hidden=64)
    model.head = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    mol.inject(model, [mol.AdapterConfig(), mol.MoLConfig(num_experts=2, top_k=1, rank=4, quantize_base="nf4",
                                                           target_modules=["q_proj"], modules_to_save=["head"])])
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
    assert type(model.head[0]) is nn.Linear and model.head[0].weight.requires_grad
    assert "head.2.weight" in model.mol_trainable
    down = model.model.layers[0].mlp.mol_adapter.adapter_down
    assert type(down) is nn.Linear and down.weight.requires_grad

    later = make_tiny_llama(hidden=64)
    mol.inject(later, mol.AdapterConfig())
    trainable = mol.trainable_parameters(later)[0]
    quantize(later, "nf4")
    assert isinstance(later.model.layers[0].mlp.up_proj, NF4Linear)
    assert type(later.model.layers[0].mlp.mol_adapter.adapter_down) is nn.Linear
    assert mol.trainable_parameters(later)[0] == trainable


def test_quantize_gpt2_conv1d_layers():
    """GPT-2's linears are transformers' Conv1D (weight (in, out)): quantize puts them in NF4 too, as transformers'
    bitsandbytes loading does, and QLoRA-MoL then runs on them; the output equals the model with each Conv1D
    weight replaced by its own NF4 rounding."""
    import mol
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_embd=64, n_layer=1, n_head=4, n_positions=32)
    base = GPT2LMHeadModel(cfg).eval()
    ref = GPT2LMHeadModel(cfg).eval()
    ref.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if type(m).__name__ == "Conv1D":
                m.weight.copy_(dequantize_nf4_reference(NF4Linear.from_linear(_as_linear(m)).packed).t())
    quantize(base, "nf4")
    conv = [n for n, m in ref.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv) == 4 and all(isinstance(base.get_submodule(n), NF4Linear) for n in conv)
    ids = torch.randint(0, 50, (2, 9))
    assert torch.allclose(base(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    model = mol.inject(GPT2LMHeadModel(cfg), mol.MoLConfig(num_experts=2, top_k=1, rank=4, quantize_base="nf4",
                                                             target_modules=["c_attn"]))
    assert isinstance(model.transformer.h[0].attn.c_attn.base_layer, NF4Linear)
    model(input_ids=ids).logits.sum().backward()
    assert model.transformer.h[0].attn.c_attn.lora_A.grad is not None


def _as_linear(conv1d):
    lin = nn.Linear(*conv1d.weight.shape, bias=False)
    with torch.no_grad():
        lin.weight.copy_(conv1d.weight.t())
    return lin


def test_quantize_with_nothing_to_quantize_says_so():
    class HeadOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(64, 64)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match="no linear layer to quantize"):
        quantize(HeadOnly(), "nf4")


# ---------------------------------------------------------------- bitsandbytes checkpoint format

def test_bnb_state_dict_round_trip_and_safetensors():
    from safetensors.torch import load, save

    lin = nn.Linear(128, 64, bias=True, dtype=torch.bfloat16)
    q = NF4Linear.from_linear(lin)
    sd = q.to_bnb_state_dict("model.layers.0.mlp.up_proj.")
    keys = {k.split("up_proj.")[1] for k in sd}
    assert keys == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                    "weight.quant_state.bitsandbytes__nf4", "bias"}
    assert sd["model.layers.0.mlp.up_proj.weight"].shape == (128 * 64 // 2, 1)
    meta = json.loads(bytes(sd["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == [64, 128] and meta["dtype"] == "bfloat16"
    assert meta["blocksize"] == 64 and meta["nested_blocksize"] == 256
    sd2 = load(save({k: v.contiguous() for k, v in sd.items()}))
    q2 = NF4Linear.from_bnb_state_dict(sd2, "model.layers.0.mlp.up_proj.")
    assert torch.equal(q2.dequantize(), q.dequantize()) and torch.equal(q2.bias, q.bias)

    model = nn.Sequential(nn.Linear(128, 64))
    sd0 = q.to_bnb_state_dict("0.")
    assert load_bnb_4bit(model, sd0) == ["0"]
    assert torch.equal(model[0].dequantize(), q.dequantize())

    # a checkpoint whose last layer does not fit the model: named, and no layer replaced
    two = nn.Sequential(nn.Linear(128, 64), nn.Linear(128, 32))
    with pytest.raises(ValueError, match=r"'1' is 32x128 \(out x in\) in the model but 64x128 in the checkpoint"):
        load_bnb_4bit(two, {**sd0, **q.to_bnb_state_dict("1.")})
    assert [type(m) for m in two] == [nn.Linear, nn.Linear]


def _fake_bnb_entry(quant_type):
    blob = json.dumps({"quant_type": quant_type, "blocksize": 64, "dtype": "float16", "shape": [4, 64]}).encode()
    return {"w.weight": torch.zeros(128, 1, dtype=torch.uint8), "w.weight.absmax": torch.ones(4),
            "w.weight.quant_map": torch.zeros(16),
            f"w.weight.quant_state.bitsandbytes__{quant_type}": torch.tensor(list(blob), dtype=torch.uint8)}


def test_bnb_fp4_and_non_4bit_checkpoints_raise():
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        NF4Linear.from_bnb_state_dict(_fake_bnb_entry("fp4"), "w.")
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit"):
        NF4Linear.from_bnb_state_dict({"w.weight": torch.randn(4, 64)}, "w.")
    # a non-double-quantized nf4 checkpoint (float32 absmax) loads
    lin = NF4Linear.from_bnb_state_dict(_fake_bnb_entry("nf4"), "w.")
    assert lin.nested_absmax is None and lin.dequantize().shape == (4, 64)


def test_matches_bitsandbytes_when_available():
    """bitsandbytes' own quantize/dequantize (its CPU backend runs without a GPU). Installed in the test extras."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    g = _gen()
    w = _weight(64, 320, torch.bfloat16, g)
    qb, sb = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    p = quantize_nf4(w)
    assert torch.equal(qb.reshape(-1), p.codes)
    assert torch.equal(sb.state2.absmax, p.nested_absmax) and torch.equal(sb.state2.code, p.nested_code)
    assert torch.equal(sb.offset, p.offset)
    # 8-bit absmax codes: bitsandbytes' C++ CPU quantizer rounds a few near-tie values to the neighbouring code;
    # ours follows its CUDA kernel (bit-identical on an H100, benchmarks/RESULTS.md), so allow rare +-1 here
    d = (sb.absmax.int() - p.absmax.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 0.02
    # dequantization is exact both ways: bitsandbytes reading our tensors, and ours reading bitsandbytes'
    assert torch.equal(bnbF.dequantize_4bit(qb, sb), dequantize_nf4_reference(
        type(p)(qb.reshape(-1), sb.absmax, p.code, p.shape, p.dtype, 64, sb.state2.absmax, sb.state2.code,
                sb.offset)))
    # our saved state dict is what bitsandbytes reads, and the reverse
    sd = {k[len("weight."):]: v for k, v in NF4Linear(p).to_bnb_state_dict().items() if k != "weight"}
    qs = bnbF.QuantState.from_dict(sd, device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(p.codes.reshape(-1, 1), qs), dequantize_nf4(p))
    bsd = {"weight": qb, **{"weight." + k: v for k, v in sb.as_dict(packed=True).items()}}
    assert torch.equal(NF4Linear.from_bnb_state_dict(bsd).dequantize(), bnbF.dequantize_4bit(qb, sb))


# ---------------------------------------------------------------- Triton kernels under the interpreter

@pytest.mark.parametrize("nested,lut,dtype", [(True, 0, torch.float32), (False, 1, torch.float32),
                                               (True, 1, torch.float16), (False, 0, torch.float16)])
def test_triton_dequantize_matches_reference(nested, lut, dtype):
    from mol.kernels.nf4 import nf4_dequantize

    w = _weight(40, 448, g=_gen())  # 280 blocks: a partial nested block
    p = quantize_nf4(w, double_quant=nested)
    out = torch.full(p.shape, float("nan"), dtype=dtype)
    nf4_dequantize(p, dtype, out=out, lut=lut)
    ref = dequantize_nf4_reference(p, torch.float64)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    else:  # float16 (packed two per 32-bit store): the reference's own rounding. bf16 is checked on the GPU
           # (bench_nf4.py): the interpreter's bf16 conversion does not round to nearest
        torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


def _small_matmul_check(T, config, cases, dtype=torch.float32, tol=1e-5):
    """nf4_matmul_small against x.double() @ W.double().T + bias, W dequantized by the PyTorch reference."""
    from mol.kernels.nf4 import nf4_matmul_small

    g = _gen()
    for N, K, nested, bias, bs in cases:
        p = quantize_nf4(_weight(N, K, g=g), blocksize=bs, double_quant=nested)
        x = torch.randn(T, K, generator=g).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        y = nf4_matmul_small(x, p, b, config=config)
        ref = x.double() @ dequantize_nf4_reference(p, torch.float64).T + (b.double() if bias else 0)
        what = f"T={T} N={N} K={K} nested={nested} bias={bias} blocksize={bs} {dtype} config={config}"
        assert y.dtype == dtype and y.shape == (T, N), what
        assert torch.isfinite(y).all(), what
        err = (y.double() - ref).abs().max() / ref.abs().max()
        assert err < tol, f"{what}: max error {err:.2e} of max |y|"


# N not a multiple of any BLOCK_N; K a multiple of the blocksize (64) but not of a step's 128 / 256 / 512 bytes
# (K = 64: a single, partial step), a partial nested block (320 / 64 = 5 blocks < 256)
_SMALL_CASES = [(40, 64, True, False, 64), (72, 192, False, True, 64), (40, 320, True, True, 64)]


def _configs(path):
    from mol.kernels import nf4 as nf4k

    return nf4k.FMA_CONFIGS if path == "fma" else nf4k.DOT_CONFIGS


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("ci", range(9))
def test_triton_small_matmul_fma_configs_vs_float64(T, ci):
    configs = _configs("fma")
    assert len(configs) == 8  # keep the parametrization in step with the autotune list
    # the last case: the global-table lookup (LUT=0), not autotuned but still selectable
    cfg = configs[ci] if ci < len(configs) else dict(configs[0], LUT=0)
    _small_matmul_check(T, cfg, _SMALL_CASES)


@pytest.mark.parametrize("T", [3, 16])
@pytest.mark.parametrize("ci", range(6))
def test_triton_small_matmul_dot_configs_vs_float64(T, ci):
    configs = _configs("dot")
    assert len(configs) == 6
    _small_matmul_check(T, configs[ci], _SMALL_CASES)


@pytest.mark.parametrize("T", [1, 2, 3, 16])
def test_triton_small_matmul_autotuned_and_blocksizes(T):
    # the autotuner's path (config=None), and blocksizes 32 / 128 (words per absmax block 4 / 16); twice: the
    # second call launches the config the first one chose directly (grouped_lora._launch)
    for _ in range(2):
        _small_matmul_check(T, None, _SMALL_CASES + [(24, 96, True, True, 32), (40, 384, False, False, 128)])


@pytest.mark.parametrize("T", [1, 2, 3, 16])
@pytest.mark.parametrize("split_k,block_kb", [(2, 64), (3, 128), (4, 64)])
def test_triton_small_matmul_split_k(T, split_k, block_kb):
    # split-K: the partials of 2-4 programs per row block meet in the last one's sum (its ticket). K = 320 / 1024
    # give 5 / 16 (block_kb 64) and 3 / 8 (block_kb 128) steps: runs of unequal length, and a split count the step
    # count caps (3 splits of 3 steps). Twice per case: the tickets must be back at zero after each launch.
    from mol.kernels import nf4 as nf4k

    cfg = dict(BLOCK_N=16, BLOCK_KB=block_kb, LUT=2, num_warps=4, SPLIT_K=split_k)
    cases = [(40, 320, True, True, 64), (72, 1024, False, False, 64)]
    for _ in range(2):
        _small_matmul_check(T, cfg, cases)
    tickets = [t for k, t in nf4k.gl._ZEROED.items() if k[2] == "nf4_tickets"]
    assert tickets and all(int(t.abs().sum()) == 0 for t in tickets)


@pytest.mark.parametrize("T,ci,lut", [(1, 0, 5), (1, 0, 4), (2, 2, 5), (2, 2, 4), (5, 0, 4), (16, 1, 4)])
def test_triton_small_matmul_float16(T, ci, lut):
    # float16 activations (the pair lookups run: LUT=4 byte permutes, LUT=5 the shared pair table, FMA path
    # only), weights rounded to float16 on the dot path: the output's own rounding dominates
    cfg = dict(_configs("fma" if T <= 2 else "dot")[ci], LUT=lut)
    _small_matmul_check(T, cfg, [(72, 192, True, True, 64)], dtype=torch.float16, tol=2e-3)


@pytest.mark.parametrize("T", [1, 2])
def test_triton_small_matmul_copies_an_unaligned_x(T, monkeypatch):
    """The FMA path reads 16-bit x as int32 pairs, which a GPU cannot load from an address 2 bytes off 4 (a view
    such as x[1:] of a half tensor): such an x reaches the kernel copied to an aligned buffer, an aligned one as
    it is, and the results equal float64's either way. (The interpreter would read across the word boundary
    without complaint, so the test records the address the kernel is given.)"""
    from mol.kernels import nf4 as nf4k

    seen = []

    class Recording:  # the kernel as nf4_matmul_small launches it with config=, recording x's address
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(args[0].data_ptr())
                return real[grid](*args, **kwargs)
            return launch

    real = nf4k._nf4_matmul_small_kernel
    monkeypatch.setattr(nf4k, "_nf4_matmul_small_kernel", Recording())
    g = _gen()
    k = 320
    p = quantize_nf4(_weight(24, k, g=g))
    ref_w = dequantize_nf4_reference(p, torch.float64)
    buf = torch.randn(T * k + 1, generator=g).to(torch.float16)
    for lut in (4, 5):
        cfg = dict(nf4k.FMA_CONFIGS[0], LUT=lut)
        for x, aligned in ((buf[:T * k].view(T, k), True), (buf[1:].view(T, k), False)):
            seen.clear()
            y = nf4k.nf4_matmul_small(x, p, config=cfg)
            ref = x.double() @ ref_w.T
            assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-3, (lut, aligned)
            assert len(seen) == 1 and seen[0] % 4 == 0, (lut, aligned, seen)
            assert (seen[0] == x.data_ptr()) == aligned, (lut, aligned)


@triton.jit
def _prmt_tile_kernel(w_ptr, s_ptr, code_ptr, out_ptr, R: tl.constexpr, W: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * W + tl.arange(0, W)[None, :]
    w = tl.load(w_ptr + offs)
    sc = tl.load(s_ptr + offs)
    tabs = nf4k._prmt_tables(code_ptr, tl.float16)
    e = nf4k._nf4_tile_prmt(w, nf4k._pack2(sc, sc), tabs, tl.float16)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * (8 * W) + tl.arange(0, 8 * W)[None, :], e)


def test_triton_prmt_tile_bit_exact():
    # the dot path's byte-permute lookup (LUT=4) against an independent statement of what it computes: each
    # weight is the NF4 level of its nibble rounded to float16, times its word's float16 scale, rounded again;
    # bitsandbytes' order (byte i holds element 2i in its high nibble). Every code at even and odd positions.
    g = _gen()
    R, W = 16, 8
    codes = torch.randint(0, 16, (R, 8 * W), generator=g)
    codes[0, :16] = torch.arange(16)
    codes[1, :16] = torch.arange(16).flip(0)
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
    words = packed.view(torch.int32).reshape(R, W).contiguous()
    scale = (torch.rand(R, W, generator=g) * 0.1 + 1e-3).half()
    out = torch.empty(R, 8 * W, dtype=torch.float16)
    levels = torch.tensor(NF4_LEVELS)
    _prmt_tile_kernel[(1,)](words, scale, levels, out, R=R, W=W)
    ref = levels.half()[codes] * scale.repeat_interleave(8, dim=1)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@triton.jit
def _level_pairs_kernel(w_ptr, code_ptr, out_ptr, N: tl.constexpr, LUT: tl.constexpr):
    w = tl.load(w_ptr + tl.arange(0, N))
    if LUT == 5:
        tab = nf4k._pair_lanes(w)
    else:
        tab = nf4k._prmt_tables(code_ptr, tl.bfloat16)
    p01, p23, p45, p67 = nf4k._level_pairs(w, tab, code_ptr, LUT, tl.bfloat16)
    offs = tl.arange(0, N) * 4
    tl.store(out_ptr + offs, p01)
    tl.store(out_ptr + offs + 1, p23)
    tl.store(out_ptr + offs + 2, p45)
    tl.store(out_ptr + offs + 3, p67)


@pytest.mark.parametrize("lut", [4, 5])
def test_triton_level_pairs_bit_exact(lut):
    # the FMA path's level pairs (LUT=4: byte permutes; LUT=5: the shared pair table, whose entries the interpreter
    # builds from the code table as the GPU's fill does) against levels[codes] in bf16, in element order: pair j of
    # a word holds elements 2j (low half) and 2j + 1, byte j's high and low nibble. Every byte value occurs.
    codes = torch.stack([torch.arange(256) >> 4, torch.arange(256) & 15], dim=1).reshape(64, 8)
    codes = torch.cat([codes, codes.flip(0)])
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
    words = packed.view(torch.int32).reshape(-1).contiguous()
    out = torch.empty(words.numel() * 4, dtype=torch.int32)
    _level_pairs_kernel[(1,)](words, torch.tensor(NF4_LEVELS), out, N=words.numel(), LUT=lut)
    ref = torch.tensor(NF4_LEVELS).bfloat16()[codes].reshape(-1)
    assert torch.equal(out.view(torch.bfloat16), ref)


@triton.jit
def _pair_sum_shr_kernel(p_ptr, sum_ptr, shr_ptr, N: tl.constexpr, DT: tl.constexpr):
    offs = tl.arange(0, N)
    p = tl.load(p_ptr + offs)
    tl.store(sum_ptr + offs, nf4k._pair_sum(p, DT))
    tl.store(shr_ptr + offs, nf4k._shr(p, 1))
    tl.store(shr_ptr + N + offs, nf4k._shr(p, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_pair_sum_and_shift_helpers(dtype):
    # the FMA path's last step (two packed 16-bit partials to one float32 sum; bf16 by mask and multiply) and the
    # selectors' logical right shifts (a multiply-high on the GPU), against torch on every sign and magnitude
    g = _gen()
    halves = (torch.randn(2, 256, generator=g) * 10.0 ** torch.randint(-3, 4, (2, 256), generator=g)).to(dtype)
    p = (halves[0].view(torch.int16).to(torch.int32) & 0xFFFF) | (halves[1].view(torch.int16).to(torch.int32) << 16)
    got_sum = torch.empty(256, dtype=torch.float32)
    got_shr = torch.empty(512, dtype=torch.int32)
    _pair_sum_shr_kernel[(1,)](p, got_sum, got_shr, N=256, DT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)
    assert torch.equal(got_sum, halves[0].float() + halves[1].float())
    unsigned = p.to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got_shr[:256], (unsigned >> 1).to(torch.int32))
    assert torch.equal(got_shr[256:], (unsigned >> 16).to(torch.int32))


def test_triton_small_matmul_supported_and_errors():
    from mol.kernels.nf4 import nf4_matmul_small, small_matmul_supported

    p = quantize_nf4(torch.randn(16, 128))
    assert small_matmul_supported(p, 1) and small_matmul_supported(p, 16)
    assert not small_matmul_supported(p, 0) and not small_matmul_supported(p, 17)
    q = quantize_nf4(torch.randn(16, 128))
    q.codes = torch.empty(q.codes.numel() + 1, dtype=torch.uint8)[1:]  # an odd address: not 4-byte aligned
    assert not small_matmul_supported(q, 1)
    with pytest.raises(ValueError, match="T <= 16"):
        nf4_matmul_small(torch.randn(17, 128), p)
    # the shared pair table is for the FMA path: asking for it on the dot path names the lookup to use instead
    with pytest.raises(ValueError, match="LUT=5 is for T <= 2.*use LUT=4"):
        nf4_matmul_small(torch.randn(3, 128), p, config=dict(BLOCK_N=16, BLOCK_KB=64, LUT=5, num_warps=4))


def test_triton_backend_in_nf4linear():
    g = _gen()
    lin = nn.Linear(128, 64)
    q = NF4Linear.from_linear(lin, backend="triton")
    x = torch.randn(6, 128, generator=g, requires_grad=True)
    y = q(x)
    w64 = dequantize_nf4_reference(q.packed, torch.float64)
    ref = x.detach().double() @ w64.T + lin.bias.detach().double()
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
    y.backward(torch.ones_like(y))
    gref = torch.ones(6, 64, dtype=torch.float64) @ w64
    assert ((x.grad.double() - gref).norm() / gref.norm()) < 1e-5


def test_dtype_casts_keep_quant_state_exact():
    q = NF4Linear.from_linear(nn.Linear(128, 64))
    before = q.dequantize(torch.float32)
    q = q.to(torch.bfloat16)
    assert q.quant_map.dtype == torch.float32 and q.nested_absmax.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16
    assert torch.equal(q.dequantize(torch.float32), before)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    ref = x.double() @ before.double().T + q.bias.double()
    assert ((q(x).double() - ref).norm() / ref.norm()) < 1e-2


def test_qlora_mol_inject_equals_dequantized_base():
    import copy

    import mol

    g = _gen()
    m = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    m = mol.inject(m, mol.MoLConfig(rank=4, num_experts=4, top_k=2, quantize_base="nf4"))
    layers = [mod for mod in m.modules() if isinstance(mod, mol.MoLLinear)]
    assert len(layers) == 2 and all(isinstance(l.base_layer, NF4Linear) for l in layers)
    with torch.no_grad():
        for l in layers:
            l.lora_B.normal_(generator=g)  # a non-trivial adapter
    ref = copy.deepcopy(m)
    for l in (mod for mod in ref.modules() if isinstance(mod, mol.MoLLinear)):
        q = l.base_layer
        dense = nn.Linear(q.in_features, q.out_features)
        with torch.no_grad():
            dense.weight.copy_(q.dequantize(torch.float32))
            dense.bias.copy_(q.bias)
        dense.requires_grad_(False)
        l.base_layer = dense
    x = torch.randn(7, 128, generator=g, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = m(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layers[0].lora_A.grad, ref[0].lora_A.grad, rtol=1e-4, atol=1e-5)


def test_autocast_computes_in_autocast_dtype():
    g = _gen()
    q = NF4Linear.from_linear(nn.Linear(128, 64))
    x = torch.randn(4, 128, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    w64 = dequantize_nf4_reference(q.packed, torch.float64)
    ref = x.detach().double() @ w64.T + q.bias.double()
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    gref = torch.ones(4, 64, dtype=torch.float64) @ w64
    assert ((x.grad.double() - gref).norm() / gref.norm()) < 1e-2


def test_incomplete_bnb_entry_names_missing_keys():
    sd = NF4Linear.from_linear(nn.Linear(128, 64)).to_bnb_state_dict("l.")
    del sd["l.weight.absmax"]
    with pytest.raises(KeyError, match="l.weight.absmax"):
        NF4Linear.from_bnb_state_dict(sd, "l.")


def test_a_bnb_entry_without_its_codes_says_so():
    """The quant_state and scales of a layer without its packed codes ('<layer>.weight' itself) raised a bare
    KeyError('l.weight'), not saying that the 4-bit entry is incomplete."""
    sd = NF4Linear.from_linear(nn.Linear(128, 64)).to_bnb_state_dict("l.")
    del sd["l.weight"]
    with pytest.raises(KeyError, match=r"incomplete bitsandbytes 4-bit entry for 'l.weight': missing "
                                       r"\['l.weight \(the packed 4-bit codes\)'\]"):
        NF4Linear.from_bnb_state_dict(sd, "l.")


@pytest.mark.parametrize("nbs", [0, -5, 1.5, 3, 48, True, "256", 8192])
def test_nested_blocksize_is_validated(nbs):
    """nested_blocksize takes bitsandbytes' blocksizes only, as blocksize does; quantize checks it before changing
    any layer."""
    w = torch.randn(64, 128)
    with pytest.raises(ValueError, match=rf"nested_blocksize must be an int power of two in 32..4096.*got {nbs!r}"):
        quantize_nf4(w, 64, nbs)
    with pytest.raises(ValueError, match=r"nested_blocksize must be"):
        NF4Linear.from_linear(nn.Linear(128, 64), nested_blocksize=nbs)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"quantize: nested_blocksize must be"):
        quantize(model, "nf4", nested_blocksize=nbs)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    # every valid one round-trips (the nested blocks' count follows it)
    for ok in (32, 256, 4096):
        p = quantize_nf4(w, 64, ok)
        assert p.nested_absmax.numel() == -(-p.absmax.numel() // ok)
        torch.testing.assert_close(dequantize_nf4_reference(p), dequantize_nf4_reference(quantize_nf4(w)),
                                   atol=0.02 * w.abs().max().item(), rtol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_weight_raises(bad):
    """One inf / nan would make every block's scale nan through the double quantization's mean: quantize_nf4
    refuses it, naming the problem and where; quantize names the layer and replaces none (the bad layer is the
    second: the first must stay as it was)."""
    g = _gen()
    w = _weight(48, 192, torch.bfloat16, g)
    r, c = int(torch.randint(0, 48, (), generator=g)), int(torch.randint(0, 192, (), generator=g))
    w[r, c] = bad
    with pytest.raises(ValueError, match=rf"inf or nan \(1 of 9216 values, the first at index \({r}, {c}\)\)"):
        quantize_nf4(w)
    with pytest.raises(ValueError, match=r"inf or nan"):
        quantize_nf4(w, double_quant=False)
    model = nn.Sequential(nn.Linear(192, 48), nn.Linear(192, 48))
    with torch.no_grad():
        model[1].weight[r, c] = bad
    with pytest.raises(ValueError, match=r"quantize: layer '1': NF4 cannot quantize a weight holding inf or nan"):
        quantize(model, "nf4")
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]


# ---------------------------------------------------------------- a partial last block (bitsandbytes: any size)

# (out, in, blocksize): 800 values = 12 blocks of 64 + 32; odd sizes (21, 65 values: one padding nibble); a
# partial block of 128; 2100 values (33 blocks of 64, the last of 52)
_PARTIAL = [(20, 40, 64), (3, 7, 64), (5, 13, 64), (33, 100, 128), (21, 100, 64)]


@pytest.mark.parametrize("out,inp,bs", _PARTIAL)
@pytest.mark.parametrize("nested", [True, False])
def test_partial_last_block_quantize_and_reference(out, inp, bs, nested):
    """Against an independent per-element statement of the format: value i is level[nibble i] times the absmax of
    block i // blocksize (the last block holding what is left); each block's absmax is its own max |w|; the round
    trip lands within half the widest level gap of the block's absmax."""
    g = _gen()
    w = _weight(out, inp, torch.float32, g)
    p = quantize_nf4(w, blocksize=bs, double_quant=nested)
    n = out * inp
    nblk = -(-n // bs)
    assert p.codes.numel() == (n + 1) // 2 and p.absmax.numel() == nblk
    if n % 2:
        assert int(p.codes[-1]) & 15 == 7  # the padding nibble: the code of 0.0, as bitsandbytes writes it
    flat = w.reshape(-1).double()
    true_absmax = torch.stack([flat[i * bs:(i + 1) * bs].abs().max() for i in range(nblk)])
    absmax = dequantize_absmax(p).double()
    assert ((absmax - true_absmax).abs() <= 0.01 * true_absmax.max()).all()
    nib = [(int(p.codes[i // 2]) >> 4) if i % 2 == 0 else (int(p.codes[i // 2]) & 15) for i in range(n)]
    expect = torch.tensor([NF4_LEVELS[nib[i]] for i in range(n)], dtype=torch.float64) * absmax[torch.arange(n) // bs]
    got = dequantize_nf4_reference(p, torch.float64).reshape(-1)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=0)
    blk_max = true_absmax[torch.arange(n) // bs]
    assert ((got - flat).abs() <= 0.1520 * blk_max + (absmax - true_absmax).abs()[torch.arange(n) // bs]
            + 1e-6).all()


@pytest.mark.parametrize("out,inp,bs", _PARTIAL)
def test_partial_last_block_matches_bitsandbytes(out, inp, bs):
    """bitsandbytes' own quantize_4bit of a weight its blocksize does not divide: the same codes, nested state and
    offset as ours, and its tensors read by from_bnb_tensors dequantize to exactly what bitsandbytes computes."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from mol.quant import from_bnb_tensors

    w = _weight(out, inp, torch.bfloat16, _gen())
    qb, sb = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
    p = quantize_nf4(w, blocksize=bs)
    assert torch.equal(qb.reshape(-1), p.codes)
    assert torch.equal(sb.state2.absmax, p.nested_absmax) and torch.equal(sb.offset, p.offset)
    # bnb's CPU rounding of near-ties, as above; where a nested block's absmax is 0 (one block: it equals the
    # offset) any code gives the same value, and bnb's 0/0 picks another than ours
    live = p.nested_absmax[torch.arange(p.absmax.numel()) // 256] != 0
    assert ((sb.absmax.int() - p.absmax.int())[live].abs() <= 1).all()
    sd = {"w.weight": qb, **{"w.weight." + k: v for k, v in sb.as_dict(packed=True).items()}}
    assert torch.equal(dequantize_nf4_reference(from_bnb_tensors(sd, "w.weight")), bnbF.dequantize_4bit(qb, sb))


@pytest.mark.parametrize("out,inp,bs", _PARTIAL)
@pytest.mark.parametrize("nested", [True, False])
def test_partial_last_block_triton_dequantize_and_nf4linear(out, inp, bs, nested):
    """The Triton dequantize kernel (interpreter) on partial and odd-sized weights equals the reference, writing
    no value past the weight (an odd size's padding nibble); NF4Linear's forward and backward through it and
    through the reference equal float64 with the reference's weight."""
    g = _gen()
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(_weight(out, inp, g=g))
    ref_w = None
    for backend in ("triton", "torch"):
        q = NF4Linear.from_linear(lin, blocksize=bs, double_quant=nested, backend=backend)
        p = q.packed
        ref_w = dequantize_nf4_reference(p, torch.float64)
        torch.testing.assert_close(dequantize_nf4(p, torch.float32, backend=backend).double(), ref_w,
                                   rtol=1e-6, atol=0)
        x = torch.randn(4, inp, generator=g, requires_grad=True)
        y = q(x)
        ref = x.detach().double() @ ref_w.T + lin.bias.detach().double()
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-5, backend
        y.backward(torch.ones_like(y))
        gref = torch.ones(4, out, dtype=torch.float64) @ ref_w
        assert ((x.grad.double() - gref).norm() / gref.norm()) < 1e-5, backend


def test_partial_last_block_kernel_writes_nothing_past_the_weight():
    """nf4_dequantize on an odd-sized weight, through dequantize_nf4: the element past the weight in a shared
    buffer keeps its value (the kernel stores both nibbles of each byte)."""
    from mol.kernels import nf4 as nf4k

    p = quantize_nf4(_weight(3, 7, g=_gen()))
    real = nf4k.nf4_dequantize
    seen = []

    def recording(packed, dtype, out=None, lut=None):
        buf = torch.full((packed.numel + 8,), 123.0, dtype=dtype)
        out = buf[:packed.numel].view(packed.shape)
        real(packed, dtype, out=out, lut=lut)
        seen.append(buf[packed.numel:].clone())
        return out

    nf4k.nf4_dequantize = recording
    try:
        got = dequantize_nf4(p, torch.float32, backend="triton")
    finally:
        nf4k.nf4_dequantize = real
    assert seen and torch.equal(seen[0], torch.full((8,), 123.0))
    torch.testing.assert_close(got, dequantize_nf4_reference(p, torch.float32), rtol=0, atol=0)


def test_load_bnb_4bit_partial_last_block_checkpoint():
    """A checkpoint bitsandbytes wrote for a 20x40 layer (12 blocks of 64 and one of 32) loads, and the layer
    computes what bitsandbytes' dequantized weight computes."""
    bnbF = pytest.importorskip("bitsandbytes.functional")

    w = _weight(20, 40, torch.float32, _gen())
    qb, sb = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    sd = {"k_proj.weight": qb, **{"k_proj.weight." + k: v for k, v in sb.as_dict(packed=True).items()}}
    model = nn.Sequential()
    model.add_module("k_proj", nn.Linear(40, 20, bias=False))
    assert load_bnb_4bit(model, sd) == ["k_proj"]
    x = torch.randn(3, 40)
    ref = x.double() @ bnbF.dequantize_4bit(qb, sb).double().T
    assert ((model.k_proj(x).double() - ref).norm() / ref.norm()) < 1e-5


# ---------------------------------------------------------------- inconsistent bitsandbytes entries

_QS = "l.weight.quant_state.bitsandbytes__nf4"


def _set_meta(sd, **kw):
    m = json.loads(bytes(sd[_QS].tolist()).decode())
    m.update(kw)
    for k, v in list(m.items()):
        if v is _DROP:
            del m[k]
    sd[_QS] = torch.tensor(list(json.dumps(m).encode()), dtype=torch.uint8)


_DROP = object()

# (what is done to a valid entry, which entries it applies to, error type, a phrase of the message)
_CORRUPT = [
    ("nested_absmax missing", True, lambda sd: sd.pop("l.weight.nested_absmax"), KeyError,
     r"missing \['l.weight.nested_absmax \(its absmax holds uint8 codes"),
    ("absmax one short", None, lambda sd: sd.__setitem__("l.weight.absmax", sd["l.weight.absmax"][:-1]), ValueError,
     r"'l.weight.absmax' has \d+ entries, but shape \(\d+, \d+\) in blocks of 64 has"),
    ("absmax one long", None, lambda sd: sd.__setitem__("l.weight.absmax", torch.cat([sd["l.weight.absmax"]] * 2)),
     ValueError, r"'l.weight.absmax' has \d+ entries"),
    ("float absmax beside nested", True,
     lambda sd: sd.__setitem__("l.weight.absmax", sd["l.weight.absmax"].float()), ValueError,
     r"is torch.float32 beside a nested_absmax"),
    ("uint8 absmax, not nested", False,
     lambda sd: sd.__setitem__("l.weight.absmax", sd["l.weight.absmax"].to(torch.uint8)), KeyError,
     r"l.weight.nested_absmax \(its absmax holds uint8 codes"),
    ("quant_map of 4", None, lambda sd: sd.__setitem__("l.weight.quant_map", sd["l.weight.quant_map"][:4]),
     ValueError, r"'l.weight.quant_map' is torch.float32 of 4 entries; bitsandbytes writes 16"),
    ("nested_quant_map of 255", True,
     lambda sd: sd.__setitem__("l.weight.nested_quant_map", sd["l.weight.nested_quant_map"][:255]), ValueError,
     r"'l.weight.nested_quant_map' is torch.float32 of 255 entries; bitsandbytes writes 256"),
    ("nested_absmax of 2", True,
     lambda sd: sd.__setitem__("l.weight.nested_absmax", sd["l.weight.nested_absmax"].repeat(2)), ValueError,
     r"'l.weight.nested_absmax' is torch.float32 of 4 entries, but 288 absmax blocks in nested blocks of 256 need 2"),
    ("blocksize 128 in the metadata", None, lambda sd: _set_meta(sd, blocksize=128), ValueError,
     r"'l.weight.absmax' has \d+ entries, but shape .* in blocks of 128"),
    ("blocksize 100", None, lambda sd: _set_meta(sd, blocksize=100), ValueError,
     r"quant_state.bitsandbytes__nf4': blocksize must be an int power of two.*got 100. The checkpoint is damaged"),
    ("blocksize missing", None, lambda sd: _set_meta(sd, blocksize=_DROP), ValueError, r"blocksize must be .*got None"),
    ("nested_blocksize 0", True, lambda sd: _set_meta(sd, nested_blocksize=0), ValueError,
     r"nested_blocksize must be an int power of two.*got 0"),
    ("nested_blocksize 3", True, lambda sd: _set_meta(sd, nested_blocksize=3), ValueError, r"got 3"),
    ("nested_blocksize missing", True, lambda sd: _set_meta(sd, nested_blocksize=_DROP), KeyError,
     r"missing \['nested_blocksize in l.weight.quant_state"),
    ("nested_offset nan", True, lambda sd: _set_meta(sd, nested_offset="nan"), ValueError,
     r"nested_offset must be a finite number"),
    ("blob truncated", None, lambda sd: sd.__setitem__(_QS, sd[_QS][:-5]), ValueError,
     r"'l.weight.quant_state.bitsandbytes__nf4' is not bitsandbytes' quant_state JSON"),
    ("blob not UTF-8", None, lambda sd: sd.__setitem__(_QS, torch.tensor([0xFF, 0xFE, 0x7B], dtype=torch.uint8)),
     ValueError, r"is not bitsandbytes' quant_state JSON \('utf-8' codec"),
    ("blob a JSON list", None, lambda sd: sd.__setitem__(_QS, torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
     ValueError, r"holds JSON list, not bitsandbytes' quant_state object"),
    ("shape missing", None, lambda sd: _set_meta(sd, shape=_DROP), ValueError,
     r"'l.weight.quant_state.bitsandbytes__nf4': the quant_state has no valid 'shape' \(got None"),
    ("shape null", None, lambda sd: _set_meta(sd, shape=None), ValueError, r"no valid 'shape'"),
    ("shape with a zero", None, lambda sd: _set_meta(sd, shape=[0, 128]), ValueError, r"no valid 'shape'"),
    ("codes one byte short", None, lambda sd: sd.__setitem__("l.weight", sd["l.weight"][:-1]), ValueError,
     r"'l.weight': \d+ packed bytes but shape"),
]


@pytest.mark.parametrize("case,nested", [(c, n) for c in _CORRUPT for n in (True, False) if c[1] in (None, n)],
                         ids=[f"{c[0]}-{'nested' if n else 'plain'}" for c in _CORRUPT for n in (True, False)
                              if c[1] in (None, n)])
def test_inconsistent_bnb_entries_raise_naming_the_key(case, nested):
    """Each inconsistency of a 4-bit entry fails the load with an error naming the entry, instead of loading
    garbage or failing at the first forward; load_bnb_4bit then leaves the model as it was. (96x192: 288 blocks
    of 64, two nested blocks of 256.)"""
    _, _, mutate, exc, phrase = case
    g = _gen()
    lin = nn.Linear(192, 96)
    with torch.no_grad():
        lin.weight.copy_(_weight(96, 192, g=g))
    good = NF4Linear.from_linear(lin, double_quant=nested).to_bnb_state_dict("l.")
    NF4Linear.from_bnb_state_dict(good, "l.")  # the entry as written loads
    sd = {k: v.clone() for k, v in good.items()}
    mutate(sd)
    with pytest.raises(exc, match=phrase):
        NF4Linear.from_bnb_state_dict(sd, "l.")
    model = nn.Sequential()
    model.add_module("l", nn.Linear(192, 96))
    with pytest.raises(exc, match=phrase):
        load_bnb_4bit(model, sd)
    assert type(model.l) is nn.Linear


def test_bnb_entry_uses_the_checkpoints_nested_blocksize():
    """A valid entry double-quantized in nested blocks of 128 (not bitsandbytes' usual 256) loads with its own
    nested blocksize: the same weight as the layer that wrote it."""
    q = NF4Linear.from_linear(nn.Linear(128, 160), nested_blocksize=128)  # 320 blocks: 3 nested blocks of 128
    sd = q.to_bnb_state_dict("l.")
    assert sd["l.weight.nested_absmax"].numel() == 3
    q2 = NF4Linear.from_bnb_state_dict(sd, "l.")
    assert q2.nested_blocksize == 128 and torch.equal(q2.dequantize(), q.dequantize())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_nf4linear_refuses_a_non_float_input(dtype):
    """nn.Linear fails on an integer input; NF4Linear computed in x's dtype and returned zeros. Now a TypeError
    naming the dtype, with or without autograd."""
    q = NF4Linear.from_linear(nn.Linear(128, 64))
    x = torch.randint(0, 5, (2, 128)).to(dtype)
    with pytest.raises(RuntimeError):
        nn.Linear(128, 64)(x)
    with pytest.raises(TypeError, match=rf"NF4Linear expects a floating-point input, as nn.Linear does; got {dtype}"):
        q(x)
    q.bias.requires_grad_(True)  # the autograd path
    with pytest.raises(TypeError, match="floating-point input"):
        q(x)


def test_nf4linear_on_meta_gives_a_meta_output():
    """On the meta device NF4Linear infers the output shape and dtype as nn.Linear does (it crashed in the autocast
    check); a quantized model moved to meta runs its forward there like the unquantized one."""
    import copy

    from conftest import make_tiny_llama

    q = copy.deepcopy(NF4Linear.from_linear(nn.Linear(128, 64))).to("meta")
    for dtype in (torch.float32, torch.bfloat16):
        y = q(torch.empty(3, 5, 128, device="meta", dtype=dtype))
        assert y.is_meta and y.shape == (3, 5, 64) and y.dtype == dtype
    with pytest.raises(RuntimeError, match="the input is on cpu but the layer on meta"):
        q(torch.randn(2, 128))
    model = quantize(make_tiny_llama(hidden=64), "nf4")
    dense = make_tiny_llama(hidden=64).to("meta")
    ids = torch.randint(0, 101, (2, 7), device="meta")
    out = model.to("meta")(input_ids=ids).logits
    assert out.is_meta and out.shape == dense(input_ids=ids).logits.shape == (2, 7, 101)


def test_a_quantized_model_cast_to_bf16_stands_for_bf16_weights():
    """mol.quantize, then .to(bfloat16): the NF4 weights stand for bf16 tensors, as when the model is cast before it
    is quantized (the reference): dequantize() returns bf16, and LoRA's adapter_dtype="base" trains bf16 tensors.
    They stayed float32 (NF4Linear's weight_dtype did not follow the cast), beside a bf16 model."""
    import copy

    import mol

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    cast_after = mol.quantize(copy.deepcopy(dense), "nf4", skip=[]).to(torch.bfloat16)
    cast_before = mol.quantize(copy.deepcopy(dense).to(torch.bfloat16), "nf4", skip=[])
    for a, b in zip(cast_after, cast_before):
        if isinstance(a, NF4Linear):
            assert a.weight_dtype == b.weight_dtype == torch.bfloat16
            assert a.dequantize().dtype == torch.bfloat16 and a.qweight.dtype == torch.uint8
            assert a.quant_map.dtype == torch.float32
    lora = mol.LoRAConfig(rank=4, target_modules=["0", "2"], adapter_dtype="base")
    after, before = mol.inject(cast_after, lora), mol.inject(cast_before, copy.deepcopy(lora))
    assert {p.dtype for p in after.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in before.parameters() if p.requires_grad} == {torch.bfloat16}
    nf4 = [m for m in after.to(torch.float32).modules() if isinstance(m, NF4Linear)]  # and back
    assert len(nf4) == 2 and all(m.weight_dtype == torch.float32 for m in nf4)


def test_triton_backend_on_cpu_tensors_says_it_needs_cuda(monkeypatch):
    """backend='triton' forced on an NF4 layer whose weight is on the CPU (no TRITON_INTERPRET) launched the Triton
    kernel anyway, which failed with Triton's '0 active drivers ([]). There should only be one.', naming neither
    the device nor the way out; MoLLinear's forced backend says it needs CUDA tensors."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = NF4Linear.from_linear(nn.Linear(64, 32), backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors .* the NF4 weight is on cpu"):
        layer(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors"):
        dequantize_nf4(quantize_nf4(torch.randn(64, 64)), backend="triton")
