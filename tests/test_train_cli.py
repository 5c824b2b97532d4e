"""A bad override ends with one line naming the fix (no Hydra stack trace).

The three cases the issue names run the real CLI in a subprocess; more cases run the same code in process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train_utils import REPO, cli_env, compose, run_cli


def _one_error_line(stderr: str) -> str:
    err = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr[-3000:]
    return err[0]


@pytest.mark.parametrize("override, must_mention", [
    (["method=nosuchmethod"], ["method", "nosuchmethod", "choose one of", "lora", "mol"]),
    (["router.top_k=0"], ["top_k=0", "between 1 and 8"]),
    (["model.path=/definitely/not/here"], ["model.path=/definitely/not/here", "set model.path"]),
])
def test_bad_override_is_one_line(override, must_mention, tmp_path):
    p = run_cli([*override, f"output_dir={tmp_path / 'out'}"], cwd=REPO, timeout=180)
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    line = _one_error_line(p.stderr)
    for word in must_mention:
        assert word in line, (word, line)
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained, nothing half-written


@pytest.mark.parametrize("override, must_mention", [
    (["trainer=fsdp", "trainer.accelerator=cpu"], ["trainer=fsdp needs GPUs", "trainer=ddp"]),
    (["trainer.max_steps=abc"], ["trainer.max_steps=abc is not a whole number", "trainer.max_steps=10"]),
    (["trainer.devices=two"], ["trainer.devices=two", "trainer.devices=2"]),
    (["-m", "method.rnak=4"], ["no key 'rnak'", "did you mean method.rank?"]),
    (["--multirun", "router=topk,nosuch"], ["unknown router 'nosuch'", "choose one of"]),
    (["trainer.max_steps=0"], ["trainer.max_steps=0 trains nothing", "N >= 1"]),
])
def test_trainer_value_mistakes_are_one_line(override, must_mention, tmp_path):
    """These used to end in tracebacks (Lightning's "fsdp requires a GPU accelerator", int('abc'), Lightning's
    TypeError), or, under -m, in Hydra's advice to add the mistyped key with '+'."""
    p = run_cli([*override, f"output_dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=180)
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    line = _one_error_line(p.stderr)
    for word in must_mention:
        assert word in line, (word, line)
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "multirun").exists()


def test_evaluate_without_adapter_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mol.evaluate", "adapter=/no/such/adapter"], cwd=str(tmp_path),
                       env=cli_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "adapter" in _one_error_line(p.stderr)


def test_unknown_key_and_missing_value_in_process(tmp_path, capsys):
    from mol.train.app import _task, check_overrides

    msg = check_overrides(["trainer.no_such_key=3"], REPO / "conf")
    assert msg is not None and "no_such_key" in msg and "\n" not in msg
    msg = check_overrides(["router=nosuch"], REPO / "conf")
    assert msg is not None and "choose one of: sequence, soft, switch, topk" in msg
    assert check_overrides(["method=lora", "router.top_k=1"], REPO / "conf") is None

    cfg = compose(["model=hf_causal", f"output_dir={tmp_path}"])  # model.path is ??? (mandatory)
    with pytest.raises(SystemExit) as e:
        _task(cfg)
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "model.path" in line and "pass model.path=" in line


@pytest.mark.parametrize("exp", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_experiments_compose_and_override_the_base_config(exp):
    from hydra.utils import instantiate

    import mol  # noqa: F401

    cfg = compose([f"experiment={exp}", "model.path=/x", "data.train=/y", "output_dir=/z"])
    method = instantiate(cfg.method, _convert_="all")
    method.validate()
    if exp == "tiny_llama":
        assert cfg.model.task == "causal_lm" and cfg.baseline.enabled is False and cfg.trainer.max_epochs == 1
    if exp == "lora_same_budget":
        assert type(method).__name__ == "LoRAConfig" and method.rank == 68


def test_graph_tokens_override_reaches_the_layers():
    # method.graph_tokens is a MoLConfig field; inject hands it to every MoLLinear (on a CPU it never captures)
    from hydra.utils import instantiate

    import mol
    from conftest import make_tiny_llama

    cfg = compose(["method=mol", "method.graph_tokens=64", "method.target_modules=all-linear",
                   "method.modules_to_save=[]", "output_dir=/z"])
    method = instantiate(cfg.method, _convert_="all")
    method.validate()
    model = mol.inject(make_tiny_llama(), method)
    layers = [m for m in model.modules() if isinstance(m, mol.MoLLinear)]
    assert layers and all(m._graphs is not None and m._graphs.max_tokens == 64 for m in layers)


def test_rank_pattern_override_reaches_the_layers():
    # a Hydra dict override (method.rank_pattern={v_proj:6}) becomes MoLConfig.rank_pattern: per-layer ranks
    from hydra.utils import instantiate

    import mol
    from conftest import make_tiny_llama

    cfg = compose(["method=lora", "method.target_modules=[q_proj,v_proj]", "method.modules_to_save=[]",
                   "method.rank_pattern={v_proj:6}", "output_dir=/z"])
    method = instantiate(cfg.method, _convert_="all")
    method.validate()
    ranks = {n.rsplit(".", 1)[1]: m.rank for n, m in mol.inject(make_tiny_llama(), method).named_modules()
             if isinstance(m, mol.MoLLinear)}
    assert ranks == {"q_proj": method.rank, "v_proj": 6}


@pytest.mark.parametrize("model_dtype, choice, expect", [
    ("bfloat16", "auto", "base"), ("float32", "auto", "auto"), ("bfloat16", "base", "base"),
    ("bfloat16", "float32", "error")])
def test_fsdp_keeps_one_dtype_per_flat_parameter(model_dtype, choice, expect, capsys):
    # FSDP refuses to flatten float32 adapters with a bf16 model's frozen weights ("uniform dtype"): the run
    # resolves "auto" to the model's dtype and says so, and stops on an explicit mix before loading anything
    from hydra.utils import instantiate

    import mol  # noqa: F401
    from mol.train.app import ConfigError, fsdp_uniform_dtype

    cfg = compose(["method=mol", "trainer=fsdp", f"model.dtype={model_dtype}", f"method.adapter_dtype={choice}",
                   "output_dir=/z"])
    method = instantiate(cfg.method, _convert_="all")
    if expect == "error":
        with pytest.raises(ConfigError, match="method.adapter_dtype=base or model.dtype=float32"):
            fsdp_uniform_dtype(cfg, method)
        return
    fsdp_uniform_dtype(cfg, method)
    assert method.adapter_dtype == expect
    assert ("adapters take the model's bfloat16" in capsys.readouterr().out) == (expect != choice)
    # the other processes Lightning's launcher starts (LOCAL_RANK=1 at import) run this too, and say nothing
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rank_zero_only, "rank", 1)
        fsdp_uniform_dtype(cfg, instantiate(cfg.method, _convert_="all"))
    assert capsys.readouterr().out == ""
    plain = instantiate(compose(["method=mol", f"model.dtype={model_dtype}", "output_dir=/z"]).method,
                        _convert_="all")
    fsdp_uniform_dtype(compose(["method=mol", f"model.dtype={model_dtype}", "output_dir=/z"]), plain)
    assert plain.adapter_dtype == "auto"  # no FSDP: nothing changes


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_baseline_head_that_matches_nothing_names_the_models_head(family):
    """model=hf_classifier's default modules_to_save=[classifier] is BERT's head; a Llama classifier's is `score`:
    the error named only the miss, so the user had to read the model's code to find the fix."""
    import transformers as T

    from mol.train.app import ConfigError, freeze_except

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = (T.LlamaForSequenceClassification(T.LlamaConfig(**small, num_key_value_heads=1, pad_token_id=0))
             if family == "llama" else T.BertForSequenceClassification(T.BertConfig(**small)))
    head = {"llama": "score", "bert": "classifier"}[family]
    with pytest.raises(ConfigError, match=rf"head is {head}, so pass model.modules_to_save=\[{head}\]"):
        freeze_except(model, ["lm_head"])
    freeze_except(model, [head])  # the named fix works
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in getattr(model, head).named_parameters(prefix=head)}


def test_logger_group_errors_before_any_training(tmp_path, monkeypatch):
    """logger=...: a logger whose package is missing, or a class that does not import, stops the run in
    ``prepare`` (before the baseline's fit) with one line naming the logger and what is missing."""
    import lightning.pytorch.loggers.wandb as lw
    from lightning_utilities.core.imports import RequirementCache

    from mol.train.app import ConfigError, _task, build_logger

    # as on a machine without wandb, whatever this one has
    monkeypatch.setattr(lw, "_WANDB_AVAILABLE", RequirementCache("wandb-not-installed-here>=1"))
    with pytest.raises(ConfigError, match="WandbLogger.*wandb-not-installed-here"):
        build_logger(compose(["logger=wandb", f"output_dir={tmp_path}"]), tmp_path)
    cfg = compose(["logger=csv", "logger._target_=no.such.Logger", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="cannot import 'no.such.Logger'"):
        build_logger(cfg, tmp_path)
    with pytest.raises(SystemExit):  # the CLI path: one line, no training
        _task(cfg)
    assert not any(tmp_path.iterdir())


def test_multirun_writes_to_output_dir_and_resumes_there(tmp_path):
    """`-m ... output_dir=D` puts job n in D/n (it used to go to ./multirun/<time>/n, output_dir ignored), so the
    same sweep re-launched with resume=auto finds each job's checkpoint and continues it."""
    from test_train_utils import make_classification_data, make_tiny_bert

    model, data = make_tiny_bert(tmp_path / "bert"), make_classification_data(tmp_path / "data", n_train=32, n_val=8)
    out = tmp_path / "sweep"
    args = ["-m", "router=topk,switch", "model=hf_classifier", f"model.path={model}", "data=jsonl",
            f"data.train={data['train']}", f"data.val={data['val']}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.batch_size=8", "trainer.max_epochs=-1", "trainer.ckpt_every_n_steps=1", "baseline.enabled=false",
            "trainer.enable_progress_bar=false", f"output_dir={out}"]
    p = run_cli(args + ["trainer.max_steps=1"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "multirun").exists()
    for job in ("0", "1"):
        assert (out / job / "results.json").is_file() and (out / job / "checkpoints" / "last.ckpt").is_file()
    p = run_cli(args + ["trainer.max_steps=2", "resume=auto"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for job in ("0", "1"):  # step 1 from the first launch, step 2 from the resumed one (a restart would log 1 again)
        steps = [json.loads(line)["step"] for line in (out / job / "train_loss.jsonl").read_text().splitlines()]
        assert steps == [1, 2], (job, steps)


@pytest.mark.parametrize("override, match", [
    ("trainer.max_steps=0", "trainer.max_steps=0 trains nothing; pass trainer.max_steps=N with N >= 1, or -1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5 is out of range"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 trains nothing"),
    ("data.max_length=0", "data.max_length=0 is not a whole number >= 1"),
    ("data.batch_size=abc", "data.batch_size=abc is not a whole number"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0 is not"),
    ("data.limit_train_examples=0", r"data.limit_train_examples=0 .*\(null: every example\)"),
    ("seed=abc", "seed=abc is not a whole number"),
    ("seed=-1", "seed=-1 is not a whole number from 0 to 2"),
    ("data.train=[]", r"data.train=\[\] names no training data; pass a file"),
    ("optim.lr=abc", "optim.lr=abc is not a number"),
    ("optim.lr=-1", "optim.lr=-1 is out of range; it must be a finite number >= 0"),
    # AdamW took them: NaN weights from the first step, without a word
    ("optim.lr=inf", "optim.lr=inf is out of range; it must be a finite number >= 0"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan is out of range"),
    ("optim.min_lr_ratio=-1", "optim.min_lr_ratio=-1 is out of range; it must be between 0 and 1"),
    ("optim.warmup_ratio=3", "optim.warmup_ratio=3 is out of range"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0 is out of range.*or null"),
    ("trainer.deterministic=maybe", "trainer.deterministic=maybe is not true, false or warn"),
    ("trainer.ckpt_every_n_steps=-1", "trainer.ckpt_every_n_steps=-1 is out of range.*N >= 0, 0 saving last.ckpt"),
    # null passed the check, then int(None) in mol.train: a TypeError traceback (ckpt_every_n_steps: after the baseline)
    ("trainer.ckpt_every_n_steps=null", r"trainer.ckpt_every_n_steps=null is not a whole number; pass .*N >= 0, 0 "),
    ("trainer.max_steps=null", r"trainer.max_steps=null is not a whole number; pass .*N >= 1, or -1"),
    ("baseline.max_epochs=0", "baseline.max_epochs=0 is not a whole number >= 1"),
    ("model.dtype=bfloat17", "model.dtype=bfloat17 is not a torch floating-point dtype"),
    ("model.tokenizer=/no/such/tok", "model.tokenizer=/no/such/tok is neither a folder nor a Hub repo id"),
    # without a repo to upload to it did nothing: the run saved mol's format alone, without a word
    ("hub.peft_format=true", "hub.peft_format=true picks the format of the upload to hub.repo_id, which is unset"),
])
def test_values_that_cannot_train_stop_before_anything_loads(override, match, tmp_path, monkeypatch):
    """These trained an untrained adapter into results (max_steps/max_epochs 0: Lightning's fit returns at once),
    ignored the limit (limit_train_examples=0), or ended in tracebacks from int(), float(), getattr(torch, ...),
    transformers' hub lookup or inside the model; optim.lr=abc only after the head-only baseline had trained.
    optim.lr=-1 failed in AdamW once fit began, optim.min_lr_ratio=-1 trained with a negative rate late in the run
    (gradient ascent), silently; check_val_every_n_epoch=0 divided by zero inside fit."""
    from mol.train import app
    from test_train_utils import make_tokenizer

    make_tokenizer(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setattr(app, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    cfg = compose(["model=hf_classifier", f"model.path={tmp_path / 'm'}", override, f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(app.ConfigError, match=match):
        app.prepare(cfg)
    assert not (tmp_path / "o").exists()


def test_a_mistyped_top_level_key_names_the_keys_there_are():
    """Hydra's advice for `seeed=3` was to add it with '+seeed=3', which composes and is then never read; for
    mol.evaluate the line pointed at `python -m mol.train --help`."""
    from mol.train.app import check_overrides

    msg = check_overrides(["seeed=3"], REPO / "conf")
    assert msg is not None and "no key 'seeed' (did you mean seed?)" in msg and "+seeed" not in msg, msg
    msg = check_overrides(["adapter=x", "spilt=val"], REPO / "conf", config_name="evaluate")
    assert msg is not None and "did you mean split?" in msg and "mol.train" not in msg, msg


@pytest.mark.parametrize("override, match", [
    ("trainer.precision=bogus", "Precision 'bogus' is invalid"),
    ("trainer.strategy=bogus", "invalid strategy name"),
    ("trainer.devices=0", "devices=0"),
    ("trainer.val_check_interval=-1", "val_check_interval"),
    ("+trainer.gradient_clip_algorithm=bogus", "gradient_clip_algorithm"),
])
def test_trainer_values_lightning_refuses_are_one_config_error(override, match, tmp_path):
    """Lightning's Trainer refuses these when it is built (before any training), with a traceback; now one line."""
    from mol.train import app

    cfg = compose(["model=hf_causal", "model.path=unused", override, f"output_dir={tmp_path}"])
    with pytest.raises(app.ConfigError, match=f"the trainer settings are invalid: .*{match}"):
        app.build_trainer(cfg, tmp_path, [], "logs")


@pytest.mark.parametrize("sub", ["", "run"])
def test_an_output_dir_that_is_a_file_is_one_line(sub, tmp_path, capsys):
    """Hydra makes output_dir before mol.train's own code runs: a file there (or above it) was a FileExistsError /
    NotADirectoryError traceback."""
    from mol.train.app import main

    (tmp_path / "f").write_text("")
    out = tmp_path / "f" / sub if sub else tmp_path / "f"
    with pytest.raises(SystemExit) as e:
        main(["model=hf_causal", "model.path=unused", f"output_dir={out}"])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"output_dir={out}" in line and ("which is a file" if sub else "is a file, not a folder") in line, line


def test_a_multirun_flag_after_the_overrides_reaches_hydra_as_one_sweep(tmp_path, monkeypatch):
    """`... router=topk,switch output_dir=D -m`: mol.train appends the sweep folder's overrides, which then followed
    the flag and Hydra's argparse refused them ("unrecognized arguments: hydra.sweep.dir=..."). Reference: Hydra's
    own argument parser, given what mol.train hands it."""
    import sys

    import hydra
    from hydra._internal.utils import get_args_parser

    from mol.train import app

    seen = {}
    monkeypatch.setattr(hydra, "main", lambda **kw: (lambda task: (lambda: seen.update(argv=list(sys.argv[1:])))))
    monkeypatch.setattr(sys, "argv", ["mol.train"])
    app.main(["model=hf_causal", "model.path=unused", "router=topk,switch", f"output_dir={tmp_path / 'sw'}", "-m"])
    args = get_args_parser().parse_args(seen["argv"])
    assert args.multirun and "router=topk,switch" in args.overrides
    assert f"hydra.sweep.dir={tmp_path / 'sw'}" in args.overrides
