"""Adapters on the Hugging Face Hub: load_adapter / import_peft given a repo id, and push_to_hub.

No network: repos are laid out in a Hugging Face cache of our own (refs/<revision> naming a snapshot folder, as
huggingface_hub writes it) and read with HF_HUB_OFFLINE, which is how huggingface_hub serves a downloaded repo; the
upload goes to a stand-in HfApi that commits the folder into that cache. The reference is always the same adapter
loaded from its local directory, or PEFT's own loader for the PEFT format."""

import copy
import hashlib
import importlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch

import mol
from conftest import make_tiny_llama
from mol.io import _hub_repo_id


def _trained(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _commit(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Put ``folder``'s files into ``cache`` as the snapshot of ``repo_id`` at branch ``revision``; its commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    taken = len(list(repo.glob("snapshots/*")))
    sha = hashlib.sha1(f"{repo_id}{revision}{taken}".encode()).hexdigest()
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return sha


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def base():
    torch.manual_seed(0)
    return make_tiny_llama()


IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))


def test_a_repo_id_loads_the_adapter_as_its_local_directory_does_at_each_revision_and_subfolder(tmp_path, hub_cache,
                                                                                               base):
    config = mol.MoLConfig(rank=4, num_experts=4, top_k=2, target_modules="all-linear")
    first, second = (_trained(mol.inject(copy.deepcopy(base), config)) for _ in range(2))
    mol.save_adapter(first, tmp_path / "v1")
    mol.save_adapter(second, tmp_path / "v2" / "checkpoint-2")
    _commit(hub_cache, "someone/tiny-mol", tmp_path / "v1")
    sha = _commit(hub_cache, "someone/tiny-mol", tmp_path / "v2", revision="later")

    with torch.no_grad():
        want1, want2 = first(input_ids=IDS).logits, second(input_ids=IDS).logits
        local = mol.load_adapter(copy.deepcopy(base), tmp_path / "v1")(input_ids=IDS).logits
        main = mol.load_adapter(copy.deepcopy(base), "someone/tiny-mol")(input_ids=IDS).logits
        later = mol.load_adapter(copy.deepcopy(base), "someone/tiny-mol", revision="later",
                                 subfolder="checkpoint-2")(input_ids=IDS).logits
        by_hash = mol.load_adapter(copy.deepcopy(base), "someone/tiny-mol", revision=sha,
                                   subfolder="checkpoint-2/")(input_ids=IDS).logits
    assert torch.equal(local, want1) and torch.equal(main, want1)
    assert torch.equal(later, want2) and torch.equal(by_hash, want2)
    assert not torch.equal(want1, want2)


def test_a_peft_adapter_on_the_hub_imports_as_peft_loads_it(tmp_path, hub_cache, base):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                          target_modules=["q_proj", "v_proj"]))
    _trained(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    _commit(hub_cache, "someone/tiny-peft", tmp_path / "peft")
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
        got = mol.import_peft(copy.deepcopy(base), "someone/tiny-peft")(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_hub_errors_name_the_repo_and_the_fix_and_leave_the_model_as_it_was(tmp_path, hub_cache, base, monkeypatch):
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"'nobody/nothing' is no local directory.*not in the local Hugging "
                                                r"Face cache.*HF_HUB_OFFLINE.*hf download nobody/nothing"):
        mol.load_adapter(model, "nobody/nothing")
    with pytest.raises(FileNotFoundError, match="import_peft: 'nobody/nothing' is no local directory"):
        mol.import_peft(model, "nobody/nothing")
    # a repo that holds something else
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    _commit(hub_cache, "someone/a-model", tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"'someone/a-model' holds no adapter_config.json.*pass subfolder="):
        mol.load_adapter(model, "someone/a-model")
    with pytest.raises(FileNotFoundError, match=r"holds no ckpt/adapter_config.json, so it is no adapter$"):
        mol.load_adapter(model, "someone/a-model", subfolder="ckpt")
    # Hub options on a local path; a subfolder that climbs out
    mol.save_adapter(_trained(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2))), tmp_path / "local")
    with pytest.raises(ValueError, match=r"revision= and token= .* is a local path"):
        mol.load_adapter(model, tmp_path / "local", revision="main")
    with pytest.raises(ValueError, match=r"subfolder='\.\./x' must name a folder inside"):
        mol.load_adapter(model, "someone/a-model", subfolder="../x")
    # a local path that does not exist and reads as no repo id keeps the local error
    with pytest.raises(FileNotFoundError, match=r"does not exist; point load_adapter at a directory"):
        mol.load_adapter(model, str(tmp_path / "missing"))
    assert not getattr(model, "mol_configs", None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # online failures are told apart (stand-ins for what huggingface_hub raises)
    from huggingface_hub import errors

    def raising(exc):
        def download(*args, **kwargs):
            raise exc
        return download

    response = type("Response", (), {"status_code": 404, "headers": {}, "request": None, "url": "u"})()
    for exc, match in [(errors.RepositoryNotFoundError("x", response=response), "neither a local directory nor a "
                        "repo on the Hugging Face Hub"),
                       (errors.RevisionNotFoundError("x", response=response), "at revision 'v9' has no such "
                        "revision"),
                       (errors.GatedRepoError("x", response=response), "is gated: accept its terms")]:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(exc))
        with pytest.raises((FileNotFoundError, PermissionError), match=match):
            mol.load_adapter(model, "someone/private", revision="v9")


@pytest.mark.parametrize("source, repo", [
    ("owner/name", "owner/name"), ("Org-1/model.v2_x", "Org-1/model.v2_x"),
    (Path("owner/name"), None), ("./owner/name", None), ("/abs/dir", None), ("a/b/c", None), ("dir/", None),
    ("name", None), ("owner/../x", None), ("owner/adapter_config.json", None),
])
def test_which_sources_are_hub_repo_ids(source, repo):
    assert _hub_repo_id(source) == repo


def test_an_existing_local_directory_is_never_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "runs" / "adapter").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _hub_repo_id("runs/adapter") is None and _hub_repo_id("runs/other") == "runs/other"


class _FakeHub:
    """huggingface_hub.HfApi's calls that push_to_hub makes, committing each upload into a local cache."""

    def __init__(self, cache: Path, readme: bool = False):
        self.cache, self.readme, self.calls = cache, readme, []

    def __call__(self, token=None):
        self.calls.append(("HfApi", token))
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def file_exists(self, repo_id, filename, revision=None):
        return self.readme

    def create_commit(self, repo_id, operations, commit_message=None, revision=None):
        files = {}
        for op in operations:
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        self.calls.append(("create_commit", repo_id, revision, commit_message, sorted(files)))
        self.card = files["README.md"].decode() if "README.md" in files else None
        folder = self.cache / "upload"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        _commit(self.cache, repo_id, folder, revision or "main")
        return "commit-info"


def test_push_to_hub_uploads_what_load_adapter_reads_back(hub_cache, base, monkeypatch):
    model = _trained(mol.inject(copy.deepcopy(base), mol.MoLConfig(rank=4, num_experts=4, top_k=2)))
    model.config._name_or_path = "org/tiny-llama"
    hub = _FakeHub(hub_cache)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    assert mol.push_to_hub(model, "me/tiny-mol", private=True, token="tok") == "commit-info"
    assert hub.calls == [("HfApi", "tok"), ("create_repo", "me/tiny-mol", True, True),
                         ("create_commit", "me/tiny-mol", None, "Upload mol adapter",
                          ["README.md", "adapter_config.json", "adapter_model.safetensors"])]
    assert "library_name: mol" in hub.card and "base_model: org/tiny-llama" in hub.card
    assert "mol.load_adapter(base_model, 'me/tiny-mol')" in hub.card
    with torch.no_grad():
        got = mol.load_adapter(copy.deepcopy(base), "me/tiny-mol")(input_ids=IDS).logits
        assert torch.equal(got, model(input_ids=IDS).logits)

    # to a branch, where the repo already has a card: the owner's card is left alone
    hub2 = _FakeHub(hub_cache, readme=True)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub2)
    mol.push_to_hub(model, "me/tiny-mol", revision="exp", commit_message="step 100")
    assert hub2.calls[2] == ("create_branch", "me/tiny-mol", "exp")
    assert hub2.calls[3][1:] == ("me/tiny-mol", "exp", "step 100", ["adapter_config.json",
                                                                     "adapter_model.safetensors"])


@pytest.mark.parametrize("name_or_path", ["models/tiny-llama", "./tiny", "tiny: v2", "C:\\models\\tiny",
                                          "../models/x"])
def test_the_model_card_names_no_local_path_as_base_model(hub_cache, base, monkeypatch, tmp_path, name_or_path):
    """The Hub rejects a commit whose card has a base_model that is no model id (400 Bad Request: the whole upload
    fails): a base model loaded from a relative local folder, or a name YAML cannot hold, is left out of the
    metadata. A local folder named like a repo id (models/tiny-llama, existing here) is a path, not a repo."""
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    model = _trained(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=2)))
    model.config._name_or_path = name_or_path
    hub = _FakeHub(hub_cache)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    mol.push_to_hub(model, "me/tiny")
    header = hub.card.split("---")[1]
    assert "base_model" not in header and "library_name: mol" in header
    import yaml

    assert yaml.safe_load(header)["library_name"] == "mol"


def test_push_to_hub_in_peft_format_is_read_by_peft(hub_cache, base, monkeypatch, tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained(mol.inject(copy.deepcopy(base), mol.LoRAConfig(rank=4, alpha=8,
                                                                    target_modules=["q_proj", "v_proj"])))
    hub = _FakeHub(hub_cache)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    mol.push_to_hub(model, "me/tiny-lora", peft_format=True)
    assert "library_name: peft" in hub.card and "PeftModel.from_pretrained(base_model, 'me/tiny-lora')" in hub.card
    snapshot = next((hub_cache / "models--me--tiny-lora" / "snapshots").iterdir())
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(snapshot))(input_ids=IDS).logits
        torch.testing.assert_close(theirs, model(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_push_to_hub_refuses_before_touching_the_hub(base, monkeypatch):
    hub = _FakeHub(Path("/nonexistent"))
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    routed = mol.inject(copy.deepcopy(base), mol.MoLConfig(rank=2, num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="routed"):
        mol.push_to_hub(routed, "me/x", peft_format=True)
    with pytest.raises(ValueError, match="repo_id must be a Hugging Face Hub repo id 'owner/name', got 'x'"):
        mol.push_to_hub(routed, "x")
    with pytest.raises(ValueError, match="carries no mol adapter"):
        mol.push_to_hub(copy.deepcopy(base), "me/x")
    assert hub.calls == []


# ------------------------------------------------------------------ mol.train's hub.* settings

def _train_cfg(tmp_path, *extra):
    from test_train_utils import compose, make_causal_data, make_tiny_llama as tiny_llama_dir, quiet_trainer_overrides

    model, data = tiny_llama_dir(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    return compose(["model=hf_causal", f"model.path={model}", "data=jsonl", f"data.train={data['train']}",
                    "data.batch_size=4", "data.max_length=24", f"data.cache_dir={tmp_path / 'cache'}",
                    f"output_dir={tmp_path / 'run'}", "trainer.max_epochs=-1", "trainer.max_steps=2",
                    *quiet_trainer_overrides(), *extra])


@pytest.fixture
def online(monkeypatch):
    """What check_hub asks before training: not offline, and a token."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "tok")


@pytest.mark.parametrize("method, peft_format", [("mol", False), ("lora", True)])
def test_a_training_run_uploads_its_saved_adapter(tmp_path, hub_cache, online, monkeypatch, method, peft_format):
    from transformers import AutoModelForCausalLM

    from mol.train.app import run

    hub = _FakeHub(hub_cache)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    cfg = _train_cfg(tmp_path, f"method={method}", "hub.repo_id=me/run", f"hub.peft_format={str(peft_format).lower()}")
    results = run(cfg)
    assert results["run"]["hub"] == "commit-info"
    assert hub.calls[1] == ("create_repo", "me/run", True, True)
    local = tmp_path / "run" / "adapter"
    snapshot = max((hub_cache / "models--me--run" / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
    if not peft_format:  # the run's own files, training_meta.json (mol.evaluate's) with them
        assert hub.calls[2][4] == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                   "training_meta.json"]
        for name in ("adapter_config.json", "adapter_model.safetensors", "training_meta.json"):
            assert (snapshot / name).read_bytes() == (local / name).read_bytes()
    else:  # PEFT's format: PEFT loads it, and computes what the run's own adapter computes
        peft = pytest.importorskip("peft")
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
        ids = torch.randint(0, base.config.vocab_size, (2, 9))
        with torch.no_grad():
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(snapshot))(input_ids=ids).logits
            ours = mol.load_adapter(copy.deepcopy(base), local)(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["run"]["hub"] == "commit-info"


def test_a_failed_upload_keeps_the_run_and_says_how_to_upload_it(tmp_path, hub_cache, online, monkeypatch):
    importlib.import_module("transformers")  # before HfApi is replaced: its hints use the real class

    from mol.train.app import ConfigError, run

    hub = _FakeHub(hub_cache)

    def down(*args, **kwargs):
        raise OSError("connection reset")

    hub.create_commit = down
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    with pytest.raises(ConfigError, match=r"the run finished and is saved in .*run, but uploading its adapter to "
                                          r"me/run failed \(OSError: connection reset\); upload it with `hf upload "
                                          r"me/run .*adapter --private`"):
        run(_train_cfg(tmp_path, "hub.repo_id=me/run"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["run"]["hub_error"] == "OSError: connection reset"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_upload_commands_a_run_suggests_keep_the_repo_private(tmp_path, hub_cache, online, monkeypatch):
    """hub.private=true (the default) asks for a private repo; `hf upload` creates a public one unless told
    --private, so the commands suggested for a failed or skipped upload say it. A PEFT-format upload is no `hf
    upload` of the run's adapter folder (mol's format): mol.push_to_hub(..., peft_format=True) is suggested."""
    importlib.import_module("transformers")  # before HfApi is replaced: its hints use the real class

    from mol.train.app import ConfigError, check_hub, run

    hub = _FakeHub(hub_cache)

    def down(*args, **kwargs):
        raise OSError("connection reset")

    hub.create_repo = down
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    with pytest.raises(ConfigError, match=r"upload it with `hf upload me/run \S*adapter --private`"):
        run(_train_cfg(tmp_path, "hub.repo_id=me/run"))
    with pytest.raises(ConfigError, match=r"mol.push_to_hub\(mol.load_adapter\(base_model, '\S*adapter'\), 'me/run', "
                                          r"peft_format=True, private=True\)"):
        run(_train_cfg(tmp_path, "hub.repo_id=me/run", "method=lora", "hub.peft_format=true", "overwrite=true"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for private, flag in (("true", " --private`"), ("false", "`")):
        with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set") as err:
            check_hub(_train_cfg(tmp_path, "hub.repo_id=me/x", f"hub.private={private}"), None)
        assert f"`hf upload me/x <output_dir>/adapter{flag}" in str(err.value)


def test_an_upload_that_cannot_happen_is_refused_before_training(tmp_path, online, monkeypatch):
    from mol.train.app import ConfigError, prepare

    for extra, match in [(["hub.repo_id=not-a-repo"], "hub.repo_id=not-a-repo is not a Hugging Face Hub repo id"),
                         (["hub.repo_id=me/x", "hub.private=maybe"], "hub.private=maybe is not true or false"),
                         (["hub.repo_id=me/x", "hub.peft_format=true"],
                          "PEFT's format holds a LoRA adapter, and this run trains MoLConfig; use method=lora")]:
        with pytest.raises(ConfigError, match=match):
            prepare(_train_cfg(tmp_path, *extra))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token is set: log in with `hf auth login` or set HF_TOKEN"):
        prepare(_train_cfg(tmp_path, "hub.repo_id=me/x"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        prepare(_train_cfg(tmp_path, "hub.repo_id=me/x"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ Hub repo ids as mol.train's and mol.evaluate's models

def test_a_run_trains_a_hub_model_from_the_cache_and_evaluates_from_hub_repos(tmp_path, hub_cache):
    """model.path=org/tiny-llama is read from the Hugging Face cache (offline), as a local folder of the same files
    is; the run records the repo id, and mol.evaluate, given the adapter as a repo id too, reproduces the run's
    validation loss."""
    from test_train_utils import compose, make_causal_data, make_tiny_llama as tiny_llama_dir, quiet_trainer_overrides

    from mol.evaluate import evaluate
    from mol.train.app import run

    _commit(hub_cache, "org/tiny-llama", tiny_llama_dir(tmp_path / "llama"))
    data = make_causal_data(tmp_path / "data")

    def train(model_path, out):
        return run(compose(["model=hf_causal", f"model.path={model_path}", "data=jsonl", f"data.train={data['train']}",
                            f"data.val={data['val']}", "data.batch_size=4", "data.max_length=24",
                            f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={out}", "trainer.max_epochs=-1",
                            "trainer.max_steps=3", "optim.lr=1e-2", *quiet_trainer_overrides()]))

    from_hub = train("org/tiny-llama", tmp_path / "hub-run")
    from_folder = train(tmp_path / "llama", tmp_path / "folder-run")
    assert from_hub["run"]["val/loss"] == from_folder["run"]["val/loss"]
    meta = json.loads((tmp_path / "hub-run" / "adapter" / "training_meta.json").read_text())
    assert meta["model_path"] == "org/tiny-llama"

    _commit(hub_cache, "me/run", tmp_path / "hub-run" / "adapter")
    got = evaluate(compose(["adapter=me/run", "split=val", f"data.val={data['val']}",
                            "trainer.enable_progress_bar=false"], config_name="evaluate"))
    assert got["val/loss"] == pytest.approx(from_hub["run"]["val/loss"], rel=1e-6, abs=0)


def test_a_hub_model_that_cannot_be_had_is_one_config_error(tmp_path, hub_cache):
    from test_train_utils import compose, make_causal_data

    from mol.train.app import ConfigError, prepare

    data = make_causal_data(tmp_path / "data")

    def cfg(path):
        return compose(["model=hf_causal", f"model.path={path}", "data=jsonl", f"data.train={data['train']}",
                        f"output_dir={tmp_path / 'run'}"])

    with pytest.raises(ConfigError, match=r"model.path: 'org/absent' is no local directory, and the Hugging Face "
                                          r"Hub repo 'org/absent' is not in the local Hugging Face cache and cannot "
                                          r"be downloaded \(offline: HF_HUB_OFFLINE=1.*hf download org/absent"):
        prepare(cfg("org/absent"))
    with pytest.raises(ConfigError, match=r"model.path=a/b/c is not a Hugging Face model folder \(no config.json "
                                          r"there\) nor a Hub repo id; set model.path to a local folder"):
        prepare(cfg("a/b/c"))
    (tmp_path / "cfgless").mkdir()
    (tmp_path / "cfgless" / "README.md").write_text("no model here")
    _commit(hub_cache, "org/cfgless", tmp_path / "cfgless")
    with pytest.raises(ConfigError, match=r"model.path: the Hugging Face Hub repo 'org/cfgless' holds no "
                                          r"config.json, so it is no Hugging Face model$"):
        prepare(cfg("org/cfgless"))
    assert not (tmp_path / "run").exists()


def _train_and_evaluate(tmp_path, model_path, *extra):
    from test_train_utils import compose, make_causal_data, quiet_trainer_overrides

    from mol.train.app import run

    data = make_causal_data(tmp_path / "data")
    result = run(compose(["model=hf_causal", f"model.path={model_path}", "data=jsonl", f"data.train={data['train']}",
                          f"data.val={data['val']}", "data.batch_size=4", "data.max_length=24",
                          f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
                          "trainer.max_epochs=-1", "trainer.max_steps=2", *quiet_trainer_overrides(), *extra]))
    return result, lambda: _evaluate(tmp_path / "run" / "adapter")


def _evaluate(adapter):
    from test_train_utils import compose

    from mol.evaluate import evaluate

    return evaluate(compose([f"adapter={adapter}", "split=val", "trainer.enable_progress_bar=false"],
                            config_name="evaluate"))


def test_a_run_with_a_hub_tokenizer_evaluates_with_it(tmp_path, hub_cache):
    """model.tokenizer=org/name is recorded as the repo id; mol.evaluate loads it from there (it refused it as a
    tokenizer folder that had moved)."""
    from test_train_utils import make_tiny_llama as tiny_llama_dir

    _commit(hub_cache, "org/tiny-tok", tiny_llama_dir(tmp_path / "llama"))
    result, evaluate = _train_and_evaluate(tmp_path, tmp_path / "llama", "model.tokenizer=org/tiny-tok")
    meta = json.loads((tmp_path / "run" / "adapter" / "training_meta.json").read_text())
    assert meta["tokenizer"] == "org/tiny-tok"
    assert evaluate()["val/loss"] == pytest.approx(result["run"]["val/loss"], rel=1e-6, abs=0)


def test_a_run_from_a_relative_model_folder_evaluates_from_another_directory(tmp_path, hub_cache, monkeypatch):
    """model.path=models/llama (relative to where the run started) is recorded as the absolute folder, as the
    tokenizer and data are: mol.evaluate run from elsewhere finds it rather than asking the Hub for a repo
    'models/llama'."""
    from test_train_utils import make_tiny_llama as tiny_llama_dir

    tiny_llama_dir(tmp_path / "start" / "models" / "llama")
    monkeypatch.chdir(tmp_path / "start")
    result, evaluate = _train_and_evaluate(tmp_path, "models/llama")
    meta = json.loads((tmp_path / "run" / "adapter" / "training_meta.json").read_text())
    assert meta["model_path"] == str(tmp_path / "start" / "models" / "llama")
    monkeypatch.chdir(tmp_path)
    assert evaluate()["val/loss"] == pytest.approx(result["run"]["val/loss"], rel=1e-6, abs=0)


@pytest.mark.parametrize("overrides, clash", [
    (["router=topk,switch", "hub.repo_id=me/x"], True),
    (["optim.lr=1e-3,1e-4", "router=topk,switch", "hub.repo_id=me/a,me/b"], True),  # 4 jobs, 2 repos
    (["router=topk,switch", "hub.repo_id=me/a,me/b"], True),  # Hydra's product: each repo gets two jobs
    (["hub.repo_id=me/a,me/b"], False),
    (["router=topk", "hub.repo_id=me/x"], False), (["router=topk,switch"], False), (["hub.repo_id=null"], False),
])
def test_a_sweep_that_would_upload_several_jobs_to_one_repo_is_refused(overrides, clash, capsys):
    """-m router=topk,switch hub.repo_id=me/x: every job uploaded its adapter over the previous job's, in the same
    repo (the last to finish won, silently); refused before anything trains."""
    from mol.train.app import _sweep_hub_clash, main

    msg = _sweep_hub_clash(overrides)
    assert (msg is not None) == clash
    if clash:
        assert "upload their adapters to the same repo, each over the one before" in msg
        with pytest.raises(SystemExit):
            main(["-m", *overrides, "output_dir=/nonexistent/sweep"])
        assert "upload their adapters to the same repo, each over the one before" in capsys.readouterr().err
