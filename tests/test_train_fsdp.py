"""``python -m mol.train trainer=fsdp`` with real sharding: mol.train's FSDPStrategy (Lightning's), FULL_SHARD over 2
CPU processes (gloo), through tests/fsdp_cpu.py (which lets FSDP run without GPUs), on a tiny Llama. FSDP trains what one
process trains with the same global batch (norm clipping included), saves a whole adapter from sharded
parameters, validates after fit with decoder layers wrapped, and resumes to exactly the uninterrupted run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_utils import REPO, cli_env, make_causal_data, make_tiny_llama, quiet_trainer_overrides

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        "+trainer.strategy.process_group_backend=gloo"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": make_tiny_llama(root / "llama"), "data": make_causal_data(root / "data")}


def _train(tiny, out: Path, *extra: str, driver: bool = True, hub: Path | None = None) -> subprocess.CompletedProcess:
    model = next((a for a in extra if a.startswith("model=")), "model=hf_causal")
    extra = tuple(a for a in extra if a != model)
    args = [model, f"model.path={tiny['llama']}", "data=jsonl", f"data.train={tiny['data']['train']}",
            f"data.val={tiny['data']['val']}", "data.max_length=32", f"data.cache_dir={out.parent / 'cache'}",
            "trainer.max_epochs=-1", "optim.lr=1e-2", "optim.warmup_ratio=0", f"output_dir={out}",
            *quiet_trainer_overrides(), *extra]
    cmd = [sys.executable, str(REPO / "tests" / "fsdp_cpu.py")] if driver else [sys.executable, "-m", "mol.train"]
    env = cli_env()
    env["MOL_FSDP_UNITS"] = str(out.parent / f"{out.name}.units.json")
    if hub is not None:  # hub.repo_id's upload copied there (tests/fsdp_cpu.py)
        env["MOL_FSDP_HUB"] = str(hub)
    p = subprocess.run([*cmd, *args], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_loss.jsonl").read_text().splitlines()]


def _assert_units_apart(report_file: Path, adapter: dict[str, torch.Tensor], decoder_layers: int = 2) -> None:
    """The root, each decoder layer (Llama's _no_split_modules, fsdp.yaml's auto_wrap_policy; none when it is null),
    and each adapted layer and its frozen base are FSDP units, none of them part frozen, part trainable: the
    processes' gradients hold the adapter's elements (FSDP pads each unit's to a multiple of the 2 processes), not
    the frozen weights' too (as when each decoder layer's unit held its adapters: 88,192 for LoRA's 69,632)."""
    report = _assert_no_mixed_unit(report_file, adapter)
    layers = sum(k.endswith("lora_A") or k.endswith("lora_A.weight") for k in adapter)
    assert report["units"] == 1 + decoder_layers + 2 * layers, report


def _assert_no_mixed_unit(report_file: Path, adapter: dict[str, torch.Tensor]) -> dict:
    """No FSDP unit holds frozen and trainable tensors together, and the gradients the processes keep hold the
    adapter's elements alone (FSDP pads each unit's to a multiple of the 2 processes). Returns the report."""
    report = json.loads(report_file.read_text())
    trainable = sum(v.numel() for v in adapter.values())
    assert report["mixed_units"] == 0, report
    assert trainable <= sum(report["grad_elements"]) <= trainable + 2 * report["units"], (report, trainable)
    return report


def test_fsdp_trains_saves_and_validates_as_one_process(tiny, tmp_path):
    """LoRA, 3 steps (so the final validation runs after fit, with the decoder layers wrapped: Lightning issue
    #19015), gradients clipped by a norm they exceed: the losses, the saved adapter and the validation loss of 2
    sharded processes with batch 4 are one process's with batch 8, within float32 summation order."""
    common = ["method=lora", "trainer.max_steps=3", "trainer.gradient_clip_val=0.05"]
    _train(tiny, tmp_path / "one", *common, "trainer=cpu", "data.batch_size=8", driver=False)
    unclipped = tmp_path / "unclipped"
    _train(tiny, unclipped, *common[:2], "trainer=cpu", "data.batch_size=8", "trainer.gradient_clip_val=null",
           driver=False)
    # hub.peft_format: PEFT's format is exported from the model, its layers gathered whole for it; activation
    # checkpointing recomputes each decoder layer with the adapter layers' units inside it
    _train(tiny, tmp_path / "fsdp", *common, *FSDP, "data.batch_size=4", "hub.repo_id=me/run", "hub.peft_format=true",
           "model.gradient_checkpointing=true", hub=tmp_path / "hub")
    one, fsdp = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    assert one.keys() == fsdp.keys() and len(one) == 28
    _assert_units_apart(tmp_path / "fsdp.units.json", one)
    for k in one:
        assert fsdp[k].shape == one[k].shape, k  # whole tensors, not this rank's flat shard
        assert torch.allclose(fsdp[k], one[k], rtol=0, atol=2e-5), k
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    # the clipping bound: without it the third step's loss differs
    assert _losses(unclipped)[2] != pytest.approx(_losses(tmp_path / "one")[2], rel=1e-4)
    res_one = json.loads((tmp_path / "one" / "results.json").read_text())["run"]
    res_fsdp = json.loads((tmp_path / "fsdp" / "results.json").read_text())["run"]
    assert res_fsdp["val/loss"] == pytest.approx(res_one["val/loss"], rel=1e-5)
    ckpt = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # the trainable tensors alone, gathered whole unit by unit (mol.train.fsdp), under their plain names
    assert {k.removeprefix("model.") for k in ckpt["state_dict"]} == set(one)
    for k in one:
        assert torch.equal(ckpt["state_dict"][f"model.{k}"], fsdp[k]), k
    assert res_fsdp["hub"] == "commit"
    import copy

    import peft
    from transformers import AutoModelForCausalLM

    import mol

    base = AutoModelForCausalLM.from_pretrained(str(tiny["llama"]))
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hub"))(input_ids=ids).logits
        ours = mol.load_adapter(copy.deepcopy(base), tmp_path / "one" / "adapter")(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(ours, plain, rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["method=adapter method.placement=houlsby", "method=ia3",
                                    "method=prefix", "method=prompt"])
def test_fsdp_trains_adapters_ia3_and_virtual_tokens_in_units_of_their_own(method, tiny, tmp_path):
    """Bottleneck adapters (called from their sub-layers' hooks), IA3 layers (with their bases) and prefix / prompt
    tuning's virtual tokens (called from the model's hooks; they trained in the root unit beside the frozen
    embeddings, which FSDP then kept a gradient for) each in an FSDP unit of their own: 2 sharded processes train
    and save one process's adapter, and no unit is left mixed."""
    common = [*method.split(), "trainer.max_steps=2"]
    _train(tiny, tmp_path / "one", *common, "trainer=cpu", "data.batch_size=8", driver=False)
    _train(tiny, tmp_path / "fsdp", *common, *FSDP, "data.batch_size=4")
    one, fsdp = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    assert one.keys() == fsdp.keys() and one
    for k in one:
        assert fsdp[k].shape == one[k].shape and torch.allclose(fsdp[k], one[k], rtol=0, atol=2e-5), k
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert _assert_no_mixed_unit(tmp_path / "fsdp.units.json", one)["units"] > 3


def test_fsdp_trains_a_classifier_with_its_head_in_a_unit_of_its_own(tiny, tmp_path):
    """LoRA on a Llama classifier with modules_to_save=[score]: the head trains in a unit of its own, not in the
    root's beside the frozen embeddings (whose gradient FSDP would keep and reduce-scatter too), and 2 sharded
    processes train and save one process's adapter and head."""
    from test_train_utils import make_classification_data

    clf = {"llama": tiny["llama"], "data": make_classification_data(tmp_path / "kdata")}
    common = ["model=hf_classifier", "model.modules_to_save=[score]", "method=lora", "trainer.max_steps=2",
              "baseline.enabled=false"]
    _train(clf, tmp_path / "one", *common, "trainer=cpu", "data.batch_size=8", driver=False)
    _train(clf, tmp_path / "fsdp", *common, *FSDP, "data.batch_size=4")
    one, fsdp = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    assert one.keys() == fsdp.keys() and any(k.endswith("score.weight") for k in one)
    for k in one:
        assert fsdp[k].shape == one[k].shape and torch.allclose(fsdp[k], one[k], rtol=0, atol=5e-5), k
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    _assert_no_mixed_unit(tmp_path / "fsdp.units.json", one)


def test_fsdp_trains_lora_on_the_fused_experts_as_one_process(tiny, tmp_path):
    """LoRA on a tiny Qwen3-MoE's 3-D expert tensors (mol.ExpertsLoRA's ParameterDicts) quantized to NF4 (QLoRA:
    mol.NF4Experts, whose codes FSDP shards), decoder layers as units: 2 sharded processes save one process's
    adapter."""
    from test_train_experts import make_tiny_qwen3_moe

    moe = make_tiny_qwen3_moe(tmp_path / "moe")
    common = [f"model.path={moe}", "method=qlora", "method.target_parameters=[experts.gate_up_proj,experts.down_proj]",
              "method.rank=4", "method.alpha=8", "trainer.max_steps=3"]
    _train(tiny, tmp_path / "one", *common, "trainer=cpu", "data.batch_size=8", driver=False)
    _train(tiny, tmp_path / "fsdp", *common, *FSDP, "data.batch_size=4")
    report = json.loads((tmp_path / "fsdp.units.json").read_text())
    # the root, 2 decoder layers, and the 8 attention linears qlora adapts with their frozen bases; the experts' LoRA
    # stays beside the experts in the decoder layers' units (its kernels read the expert tensors directly)
    assert report["units"] == 3 + 2 * 8 and report["mixed_units"] == 2, report
    assert sum(report["nf4_code_bytes"]) == report["nf4_total"] > 0
    assert max(report["nf4_code_bytes"]) < report["nf4_total"], report
    one, fsdp = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    assert one.keys() == fsdp.keys() and any(".experts.lora_B." in k for k in one)
    for k in one:
        assert fsdp[k].shape == one[k].shape and torch.allclose(fsdp[k], one[k], rtol=0, atol=2e-5), k


def test_fsdp_shards_the_nf4_codes_and_trains_qlora_as_one_process(tiny, tmp_path):
    """QLoRA: each NF4 weight's 4-bit codes are a parameter that FSDP shards (as buffers, every process held them
    all). In float32, 2 sharded processes train one process's adapter (the codes read again in the backward from
    the regathered shards). Under bf16-mixed on a float32 model FSDP gathers in float32, since a bf16 cast of the
    flat parameter would scramble the codes' bytes: the first step's loss is the float32 one, the next within bf16's
    gradient reduction of it, resumed included; under bf16-true the codes are stored in bf16."""
    common = ["method=qlora", "trainer.max_steps=3", "optim.min_lr_ratio=1.0"]  # a resumed run's lr schedule too
    _train(tiny, tmp_path / "one", *common, "trainer=cpu", "data.batch_size=8", driver=False)
    _train(tiny, tmp_path / "fsdp", *common, *FSDP, "data.batch_size=4")
    report = json.loads((tmp_path / "fsdp.units.json").read_text())
    held, total = report["nf4_code_bytes"], report["nf4_total"]
    assert total > 0
    # each process holds its part of every unit's flat parameter, codes included (how much of it is codes depends
    # on where they fall in it; FSDP pads the shards, never the codes)
    assert sum(held) == total and 0 < min(held) <= max(held) < total, held
    one, fsdp = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    assert one.keys() == fsdp.keys() and any(".lora_B" in k for k in one)
    _assert_units_apart(tmp_path / "fsdp.units.json", one)  # the NF4 bases' codes in units of their own
    for k in one:
        assert torch.allclose(fsdp[k], one[k], rtol=0, atol=2e-5), k
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    # one process (FSDP's NO_SHARD), stopped after step 2 and resumed: Lightning's own checkpoints numbered the
    # optimizer state's parameters so that this resume looked up the frozen embeddings' name and failed
    bf16 = [*FSDP, "trainer.devices=1", "trainer.precision=bf16-mixed", "data.batch_size=8",
            "trainer.ckpt_every_n_steps=1", "optim.min_lr_ratio=1.0"]
    p = _train(tiny, tmp_path / "bf16", "method=qlora", *bf16, "trainer.max_steps=2")
    assert "shards the NF4 codes as float32 parameters, so FSDP gathers parameters in float32, not bf" in p.stdout
    _train(tiny, tmp_path / "bf16", "method=qlora", *bf16, "trainer.max_steps=3", "resume=auto")
    one = _losses(tmp_path / "one")
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 3 and losses[0] == pytest.approx(one[0], rel=1e-6)
    assert losses == pytest.approx(one, rel=1e-3)
    # bf16-true: Lightning casts the wrapped float32 model to bf16, flat parameters whole, so the model is
    # cast first and the codes' bytes stored in bf16 (scrambled, the first loss was 7.6e-3 off)
    # (against the float32 process: one bf16 process's first loss was 1.2e-5 from it)
    p = _train(tiny, tmp_path / "fsdp_bf16", "method=qlora", *FSDP, "trainer.max_steps=1",
               "trainer.precision=bf16-true", "data.batch_size=4")
    assert "FSDP gathers" not in p.stdout
    report = json.loads((tmp_path / "fsdp_bf16.units.json").read_text())
    assert sum(report["nf4_code_bytes"]) == report["nf4_total"] > max(report["nf4_code_bytes"])
    assert _losses(tmp_path / "fsdp_bf16")[0] == pytest.approx(one[0], rel=1e-3)


def test_routers_take_a_bf16_models_dtype_for_fsdp_and_still_score_in_float32(tiny):
    """A MoL router's weight is float32 in any model, which FSDP refused to flatten beside a bf16 model's weights
    (trainer=fsdp with model.dtype=bfloat16 stopped before the first step; by hand and on a GPU, RESULTS run 61, it
    trains now): routers_to casts them to the model's dtype, and the router still scores in float32."""
    import copy

    from transformers import AutoModelForCausalLM

    import mol
    from mol.train.fsdp import flat_dtype, routers_to

    model = AutoModelForCausalLM.from_pretrained(str(tiny["llama"]), dtype=torch.bfloat16)
    model = mol.inject(model, mol.MoLConfig(rank=4, num_experts=4, top_k=2, target_modules=["q_proj", "up_proj"],
                                            adapter_dtype="base"))
    router = next(m for m in model.modules() if isinstance(m, mol.Router))
    before = copy.deepcopy(router)
    assert flat_dtype(model) == torch.bfloat16 and routers_to(model, torch.bfloat16) == 4
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert routers_to(model, torch.bfloat16) == 0
    x = torch.randn(6, router.weight.shape[1], dtype=torch.bfloat16)
    before.weight.data = router.weight.float()  # the same values, stored in float32
    out, ref = router(x), before(x)
    assert out.logits.dtype == torch.float32 and torch.equal(out.logits, ref.logits)
    assert torch.equal(out.expert_ids, ref.expert_ids) and torch.equal(out.gates, ref.gates)


def test_nf4_codes_stored_again_after_a_cast_take_the_models_new_dtype():
    """Codes stored as float32 parameters, the model then cast to bf16 (.to() never casts the codes' bytes), and
    nf4_codes_as_parameters called again before wrapping: the codes outnumbered the model's other weights (as in any
    large model) and voted flat_dtype to float32, so they stayed float32 beside bf16 weights, which FSDP refuses to
    flatten together. Reference: the same model cast without ever storing its codes."""
    import copy

    from torch import nn

    import mol
    from mol.train.fsdp import flat_dtype, nf4_codes_as_parameters

    torch.manual_seed(0)
    model = mol.quantize(nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256)), "nf4")
    ref = copy.deepcopy(model).to(torch.bfloat16)
    assert nf4_codes_as_parameters(model) == torch.float32
    model.to(torch.bfloat16)
    assert flat_dtype(model) == torch.bfloat16 and nf4_codes_as_parameters(model) == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(model(x), ref(x))


def test_a_resumed_fsdp_run_follows_the_uninterrupted_one(tiny, tmp_path):
    """MoL (whose lora_B is stored in another memory order than its shape's), no decoder-layer units
    (auto_wrap_policy=null): stopped at step 2 and resumed to step 4, the run logs the uninterrupted run's losses
    and saves its adapter; the Adam moments of a resumed FSDP run used to land on permuted elements of lora_B. The
    run equals DDP's."""
    common = ["method=mol", "method.target_modules=[q_proj,v_proj,up_proj]", *FSDP, "data.batch_size=4",
              "trainer.strategy.auto_wrap_policy=null", "optim.min_lr_ratio=1.0", "trainer.ckpt_every_n_steps=1"]
    _train(tiny, tmp_path / "full", *common, "trainer.max_steps=4")
    _train(tiny, tmp_path / "stopped", *common, "trainer.max_steps=2")
    _train(tiny, tmp_path / "stopped", *common, "trainer.max_steps=4", "resume=auto")
    assert len(_losses(tmp_path / "full")) == 4
    assert _losses(tmp_path / "stopped") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6)
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "stopped")
    _assert_units_apart(tmp_path / "full.units.json", full, decoder_layers=0)
    assert full.keys() == resumed.keys()
    assert max(float(v.abs().max()) for k, v in full.items() if ".lora_B" in k) > 1e-2
    for k in full:
        assert torch.allclose(resumed[k], full[k], rtol=0, atol=1e-6), k
    # DDP over the same 2 processes and batches, router losses included (each process computes its own, as DDP
    # does): the same losses and adapter, so the router losses' gradients reach the adapters' units whole too
    ddp = [a for a in common if a not in FSDP and "auto_wrap_policy" not in a]
    _train(tiny, tmp_path / "ddp", *ddp, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_steps=4", driver=False)
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6)
    for k, v in _adapter(tmp_path / "ddp").items():
        assert torch.allclose(v, full[k], rtol=0, atol=1e-6), k


def test_fsdp_wrap_classes_resolves_the_policy_or_names_the_fix(tiny):
    from transformers import AutoModelForCausalLM, BertConfig, BertModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from mol.train.app import ConfigError, fsdp_wrap_classes

    llama = AutoModelForCausalLM.from_pretrained(str(tiny["llama"]))
    assert fsdp_wrap_classes(llama, "no_split_modules") == {LlamaDecoderLayer}
    assert fsdp_wrap_classes(llama, ["LlamaDecoderLayer"]) == {LlamaDecoderLayer}
    assert fsdp_wrap_classes(llama, None) is None
    with pytest.raises(ConfigError, match=r"\['LlamaLayer'\], which LlamaForCausalLM does not contain; its layer "
                                          r"classes: \['LlamaDecoderLayer'\]"):
        fsdp_wrap_classes(llama, ["LlamaLayer"])
    with pytest.raises(ConfigError, match="is not understood: use no_split_modules"):
        fsdp_wrap_classes(llama, "decoder_layers")
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    bert._no_split_modules = None
    with pytest.raises(ConfigError, match=r"names no _no_split_modules: name the classes to wrap \(trainer.strategy"):
        fsdp_wrap_classes(bert, "no_split_modules")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true", "32-true"])
def test_fsdp_mixed_precision_keeps_buffers_in_their_dtype(precision, tmp_path):
    """Under bf16-mixed / 16-mixed FSDP gathers parameters and reduces gradients in 16 bits, as Lightning sets it,
    but leaves buffers alone: Lightning's own setting casts every floating buffer, rounding NF4's float32 code
    table and scales (under bf16-true too, where NF4's are the only buffers the model's own cast leaves float32).
    32-true: Lightning's own (no MixedPrecision of ours). A mixed_precision given in the config wins."""
    from test_train_utils import compose

    from mol.train.app import build_trainer

    base = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.precision={precision}",
            f"output_dir={tmp_path}"]
    strategy = build_trainer(compose(base), tmp_path, [], "logs").strategy
    if precision == "32-true":
        assert strategy.mixed_precision is None
    else:
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        mp = strategy.mixed_precision
        assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (dtype, dtype, None)
        # what Lightning would have used: the buffers cast too
        assert strategy.precision_plugin.mixed_precision_config.buffer_dtype == dtype
    given = build_trainer(compose([*base, "+trainer.strategy.mixed_precision._target_=torch.distributed.fsdp."
                                          "MixedPrecision"]), tmp_path, [], "logs").strategy
    assert given.mixed_precision.param_dtype is None


def _sharded_save(rank: int, out: str, port: int) -> None:
    import copy
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    import mol
    from conftest import make_tiny_llama
    from mol.train.fsdp import gather_trainable, nf4_codes_as_parameters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = mol.inject(copy.deepcopy(make_tiny_llama()), mol.MoLConfig(rank=4, num_experts=4, top_k=2,
                                                                      target_modules=["q_proj"]))
    whole = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.data = p.data.contiguous()
    fsdp = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    try:
        mol.save_adapter(model, f"{out}/shards{rank}")
        refused = "no error"
    except ValueError as e:
        refused = str(e)
    gathered = gather_trainable(fsdp, to_rank0=True)
    # an NF4 layer wrapped with its codes stored: storing them again (in another dtype) or nf4_codes_as_parameters on
    # the wrapped model replaced the parameter FSDP manages, and the next forward failed inside FSDP
    q = mol.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), "nf4")
    nf4_codes_as_parameters(q)
    x = torch.randn(3, 64)
    y = q(x)
    fq = FullyShardedDataParallel(q, device_id=torch.device("cpu"), use_orig_params=True)
    codes = q[0].qweight
    nf4 = {"same dtype": q[0].store_codes_as(torch.float32) and q[0].qweight is codes}
    for name, call in (("store", lambda: q[0].store_codes_as(torch.bfloat16)),
                       ("wrapped", lambda: nf4_codes_as_parameters(fq))):
        try:
            call()
            nf4[name] = "no error"
        except ValueError as e:
            nf4[name] = str(e)
    nf4["forward"] = torch.equal(fq(x), y)
    # FSDP's buffer_dtype casts every floating buffer at the first forward, NF4's float32 code tables and scales
    # too: every weight changed by bf16's rounding, and the forward said nothing
    from torch.distributed.fsdp import MixedPrecision

    q16 = mol.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), "nf4")
    nf4_codes_as_parameters(q16)
    f16 = FullyShardedDataParallel(q16, device_id=torch.device("cpu"), use_orig_params=True,
                                   mixed_precision=MixedPrecision(buffer_dtype=torch.bfloat16))
    try:
        f16(x)
        nf4["buffer_dtype"] = "no error"
    except RuntimeError as e:
        nf4["buffer_dtype"] = str(e)
    # param_dtype other than the codes' dtype casts their bytes' values: the forward computed garbage, silently
    q32 = mol.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), "nf4")
    nf4_codes_as_parameters(q32)
    f32 = FullyShardedDataParallel(q32, device_id=torch.device("cpu"), use_orig_params=True,
                                   mixed_precision=MixedPrecision(param_dtype=torch.bfloat16))
    try:
        f32(x.bfloat16())
        nf4["param_dtype"] = "no error"
    except RuntimeError as e:
        nf4["param_dtype"] = str(e)
    # the FSDP wrapper passed for the model it wraps: refused as "an adapter of its own inside, inject its configs
    # on this model instead", which neither named the problem nor fixed it
    saved_from_root = {}
    for name, tensors in (("shards", None), ("gathered", gathered if rank == 0 else None)):
        try:
            if rank == 0:
                mol.save_adapter(fsdp, f"{out}/root_{name}", tensors=tensors)
            saved_from_root[name] = "saved"
        except ValueError as e:
            saved_from_root[name] = str(e)
    if rank == 0:
        mol.save_adapter(model, f"{out}/gathered", tensors=gathered)
        torch.save({"refused": refused, "whole": whole, "nf4": nf4, "root": saved_from_root}, f"{out}/result.pt")
    dist.destroy_process_group()


def test_save_adapter_refuses_fsdp_shards_and_takes_gathered_tensors(tmp_path):
    """A model FSDP sharded over 2 processes holds flat views of each process's shard between steps: save_adapter
    refuses them by name (it wrote 1-D shards before), and writes the whole tensors gather_trainable returns, given the
    model or its FSDP wrapper. NF4 codes FSDP holds are not stored again, in another dtype,
    nf4_codes_as_parameters refuses a wrapped model, and an NF4 forward refuses the code tables FSDP's buffer_dtype
    rounded and the codes its param_dtype cast."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:  # a free port for the 2 processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_save, args=(str(tmp_path), port), nprocs=2)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert "shard of FSDP's, not the whole tensor" in result["refused"] and "nothing was written" in result["refused"]
    nf4 = result["nf4"]
    assert nf4["same dtype"] is True and nf4["forward"] is True, nf4
    assert "FullyShardedDataParallel holds these codes" in nf4["store"] and "before wrapping" in nf4["store"], nf4
    assert "wrapped in FullyShardedDataParallel already" in nf4["wrapped"] and "before wrapping" in nf4["wrapped"], nf4
    assert "quant_map is torch.bfloat16" in nf4["buffer_dtype"] and "buffer_dtype=None" in nf4["buffer_dtype"], nf4
    assert "torch.bfloat16, stored as torch.float32" in nf4["param_dtype"] and "param_dtype" in nf4["param_dtype"], nf4
    root = result["root"]
    assert "shard of FSDP's, not the whole tensor" in root["shards"] and root["gathered"] == "saved", root
    assert not (tmp_path / "root_shards").exists()
    saved = load_file(str(tmp_path / "gathered" / "adapter_model.safetensors"))
    assert saved.keys() == result["whole"].keys()
    from_root = load_file(str(tmp_path / "root_gathered" / "adapter_model.safetensors"))
    assert from_root.keys() == saved.keys() and all(torch.equal(from_root[k], saved[k]) for k in saved)
    for k, v in result["whole"].items():
        assert torch.equal(saved[k], v), k


def test_adapter_units_part_every_adapted_layer_from_its_frozen_base(tiny_llama):
    """mol.train.fsdp.adapter_units (no process group needed): LoRA and IA3 layers and their frozen bases, and
    bottleneck adapters, each a unit whose own tensors (those of no unit inside) all train or are all frozen; a base
    that trains a tensor itself stays with its layer."""
    import mol
    from mol.methods.adapters import BottleneckAdapter
    from mol.methods.ia3 import IA3Linear
    from mol.train.fsdp import adapter_units, unit_rule

    ia3 = mol.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = mol.inject(tiny_llama, [mol.LoRAConfig(target_modules=["q_proj"]), ia3, mol.AdapterConfig()])
    layers = [m for m in model.modules() if isinstance(m, (mol.MoLLinear, IA3Linear))]
    bottlenecks = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    n = model.config.num_hidden_layers
    assert len(layers) == 3 * n and len(bottlenecks) == n
    units = adapter_units(model)
    assert units == {id(m) for m in [*layers, *(m.base_layer for m in layers), *bottlenecks]}
    modules = {id(m): m for m in model.modules()}
    for i in units:
        inner = {p for sub in modules[i].modules() if sub is not modules[i] and id(sub) in units
                 for p in sub.parameters()}
        own = [p for p in modules[i].parameters() if p not in inner]
        assert own and len({p.requires_grad for p in own}) == 1, modules[i]
    # trainer=fsdp's rule (README's for a model wrapped by hand): those and the decoder layers
    decoder = type(model.model.layers[0])
    rule = unit_rule(model, {decoder})
    assert {id(m) for m in model.modules() if rule(m)} == units | {id(m) for m in model.model.layers}
    layers[0].base_layer.weight.requires_grad_(True)  # as BitFit's bias on an adapted layer
    assert adapter_units(model) == units - {id(layers[0]), id(layers[0].base_layer)}


class _UnitStandIn(torch.nn.Module):
    """What a hook sees of FSDP's wrapper in the module's place: a module whose forward runs the wrapped one."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module, self.calls = inner, 0

    def forward(self, *args):
        self.calls += 1
        return self._fsdp_wrapped_module(*args)


def test_a_bottleneck_adapter_in_an_fsdp_unit_of_its_own_runs_through_it(tiny_llama):
    """adapter_units makes each bottleneck adapter an FSDP unit, which takes its place as its sub-layer's
    ``mol_adapter`` and gathers its weights only inside its own forward: the sub-layer's hook calls that unit (the
    hook called the adapter itself, whose weights outside the unit are this process's flat shard: trainer=fsdp
    method=adapter failed with "mat2 must be a matrix, got 1-D tensor")."""
    import mol
    from mol.methods.adapters import BottleneckAdapter

    model = mol.inject(tiny_llama, mol.AdapterConfig(placement="houlsby"))
    for m in model.modules():
        if isinstance(m, BottleneckAdapter):
            torch.nn.init.normal_(m.adapter_up.weight, std=0.5)  # not the identity it starts as
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        units = []
        for m in list(model.modules()):
            if isinstance(m._modules.get("mol_adapter"), BottleneckAdapter):
                units.append(_UnitStandIn(m.mol_adapter))
                m.mol_adapter = units[-1]
        after = model(input_ids=ids).logits
    assert len(units) == 2 * model.config.num_hidden_layers and all(u.calls == 1 for u in units)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["prefix", "prompt", "prompt-t5"])
def test_virtual_tokens_in_an_fsdp_unit_of_their_own_run_through_it(method, tiny_llama):
    """adapter_units makes prefix / prompt tuning's module an FSDP unit, which takes its place in the model and
    gathers its tensors only inside its own forward: the model's hooks (and the T5 encoder's, for a prompt) call
    that unit, once a forward, and the outputs and gradients are those of the module called directly."""
    import transformers

    import mol
    from mol.methods.prefix import PrefixEncoder, PromptEmbedding
    from mol.train.fsdp import adapter_units

    if method == "prompt-t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
            dropout_rate=0.0))
    else:
        model = tiny_llama
    cfg = mol.PrefixTuningConfig(num_virtual_tokens=3) if method == "prefix" else mol.PromptTuningConfig(
        num_virtual_tokens=3)
    model = mol.inject(model, cfg)
    attr = "mol_prefix" if method == "prefix" else "mol_prompt"
    tokens = getattr(model, attr)
    assert isinstance(tokens, (PrefixEncoder, PromptEmbedding)) and id(tokens) in adapter_units(model)
    ids = torch.randint(0, 101, (2, 7))
    kw = {"decoder_input_ids": torch.randint(0, 101, (2, 4))} if method == "prompt-t5" else {}

    def run():
        model.zero_grad()
        out = model(input_ids=ids, **kw).logits
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in tokens.parameters()]

    before, grads = run()
    unit = _UnitStandIn(tokens)
    setattr(model, attr, unit)
    after, grads_after = run()
    assert unit.calls == 1
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(grads, grads_after))


def test_the_input_embeddings_prompt_tuning_reads_are_no_unit_of_their_own():
    """BERT's _no_split_modules names BertEmbeddings, which trainer=fsdp made a unit; prompt tuning's pre-hook embeds
    the tokens with its word embeddings in the model's forward, outside that unit's, where the weight is this
    process's flat shard (trainer=fsdp method=prompt on a BERT classifier failed: "'weight' must be 2-D").
    mol.train.fsdp.prompt_embedding_holders names the modules that hold them, which configure_model leaves whole."""
    import transformers as T

    import mol
    from mol.train.fsdp import prompt_embedding_holders

    cfg = T.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_labels=3)
    lora = mol.inject(T.BertForSequenceClassification(cfg), mol.LoRAConfig(rank=2, modules_to_save=["classifier"]))
    assert prompt_embedding_holders(lora) == set()
    model = mol.inject(T.BertForSequenceClassification(cfg),
                       mol.PromptTuningConfig(num_virtual_tokens=3, modules_to_save=["classifier"]))
    assert "BertEmbeddings" in model._no_split_modules
    assert prompt_embedding_holders(model) == {id(model), id(model.bert), id(model.bert.embeddings),
                                               id(model.bert.embeddings.word_embeddings)}


def test_modules_to_save_are_units_of_their_own_unless_they_share_a_tensor(tiny_llama):
    """adapter_units takes each modules_to_save module (trained whole) apart from the root's frozen embeddings, but
    not one whose tensor another module shares (a head tied to the input embeddings: FSDP keeps a shared tensor in
    one unit)."""
    import mol
    from mol.train.fsdp import adapter_units

    tiny_llama.lm_head.weight = tiny_llama.model.embed_tokens.weight
    model = mol.inject(tiny_llama, mol.LoRAConfig(target_modules=["q_proj"], modules_to_save=["norm", "lm_head"]))
    units = adapter_units(model)
    assert id(model.model.norm) in units and model.model.norm.weight.requires_grad
    assert id(model.lm_head) not in units and model.lm_head.weight.requires_grad
