"""README.md's examples, run or checked against the code, so that a change to an API the README names fails here.

- Every ```python block runs as written, with two stand-ins: the model folder the block loads ("path/to/model")
  is a tiny Llama saved to a temporary folder, and `batch`, the reader's own batch, is a few random tokens. On a
  machine without CUDA, `Module.cuda()` leaves the model where it is. A block that is not a complete example
  belongs in another fence (```text, or indented), not ```python.
- Every `mol.X.Y` the README names resolves, as do the kernel switches it lists with their environment variables.
- The keyword arguments of the mol calls the README shows (`MoLConfig(aux_loss_in_output=True)`,
  `mol.load_adapter(bf16_model, dir, quantize_base=False)`, ...) are parameters of those calls, and an argument
  named after a parameter stands where that parameter is (`mol.LoRAConfig(rank, alpha, target_modules, ...)`).
- The Hydra overrides of every `bash scripts/train.sh ...`, `mol-train ...` and `python -m mol.evaluate ...`
  command compose (mol.train's own check), sweeps value by value, `--config-dir` with the README's `mymol.yaml`;
  so do the choices a command's comment lists (`# mol | lora | ...`) and the overrides the prose names alone
  (`experiment=lora_same_budget`).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

import mol
from mol.train.app import GROUPS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
# The placeholders a ```python block may load a model from, each replaced by a tiny model built offline.
MODEL_PLACEHOLDERS = ("path/to/model",)
# The training config's top-level keys: its config groups and its own keys (seed, resume, optim, ...)
TRAIN_KEYS = set(GROUPS) | set(yaml.safe_load((REPO / "conf" / "config.yaml").read_text()))


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of ``text``."""
    return re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def inline_code(text: str) -> list[str]:
    """Inline code spans, every ```python block whole (its calls span lines) and the lines of indented blocks."""
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)
    indented = re.findall(r"^ {4}(\S.*)$", text, flags=re.MULTILINE)
    return spans + python_blocks(text) + indented


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    from conftest import make_tiny_llama

    blocks = python_blocks(README)
    assert blocks, "README.md has no ```python block: the examples this test runs are gone or lost their fence"
    tiny = tmp_path / "tiny-llama"
    make_tiny_llama(vocab=101).save_pretrained(tiny)
    monkeypatch.chdir(tmp_path)  # the examples write relative paths ("adapter/")
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
    ids = torch.randint(0, 101, (2, 9))
    checked = False
    for i, block in enumerate(blocks):
        used = [p for p in MODEL_PLACEHOLDERS if p in block]
        assert used or "from_pretrained" not in block, (
            f"README ```python block {i} loads a model by a name this test cannot build offline; add the name to "
            f"MODEL_PLACEHOLDERS (or load from \"path/to/model\")")
        for placeholder in used:
            block = block.replace(placeholder, str(tiny))
        ns: dict = {"batch": {"input_ids": ids, "labels": ids}}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, f"README.md python block {i}", "exec"), ns)
        if "model" in ns and "fresh" in ns:
            _check_use_it_in_your_own_model(ns, block, printed.getvalue(), tmp_path)
            checked = True
    assert checked, "no README ```python block defines `model` and `fresh`: the checks of the results were skipped"


def _check_use_it_in_your_own_model(ns: dict, block: str, printed: str, tmp_path: Path) -> None:
    """What the "Use it in your own model" block's comments say of its results."""
    model, fresh = ns["model"], ns["fresh"]
    trainable, total = ast.literal_eval(printed.splitlines()[0])  # "# (trainable, total)"
    assert 0 < trainable < total == sum(p.numel() for p in model.parameters()), \
        f"trainable_parameters printed {(trainable, total)}, not (trainable, total)"
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), "loss.backward() reached no lora_B"
    stats = mol.routing_stats(model)  # "per layer: load per expert, router entropy"
    experts = {n: m.num_experts for n, m in model.named_modules() if isinstance(m, mol.MoLLinear)}
    assert stats.keys() == experts.keys() and all(
        s["load"].shape == (experts[n],) and s["entropy"].dim() == 0 for n, s in stats.items()), \
        "routing_stats does not give each layer's load per expert and router entropy"
    saved = sorted(p.suffix for p in (tmp_path / "adapter").iterdir())
    assert ".safetensors" in saved and ".json" in saved  # "trainable tensors (safetensors) + JSON config"
    # lora_B is still zero (no optimizer step), so outputs cannot tell a loaded adapter from a new one: the tensors can
    fresh_params = dict(fresh.named_parameters())
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(fresh_params[n], p) for n, p in trained.items()), \
        "load_adapter did not restore the saved tensors"
    tokens = int(re.search(r"set_graphs\(.*graph_inference_tokens=(\d+)", block).group(1))
    layers = [m for m in fresh.modules() if isinstance(m, mol.MoLLinear)]
    assert layers and all(m.graph_inference_tokens == tokens for m in layers), "set_graphs did not reach the layers"


def _resolve(dotted: str) -> object:
    """The object a dotted name ``mol.a.b.C`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_named_apis_exist():
    names = set(re.findall(r"(?<![\w./-])mol(?:\.[A-Za-z_]\w*)+", README))
    # The kernel switches the README names by their module's last name only
    names |= {f"mol.kernels.{m}" for m in re.findall(r"(?<![\w.])((?:routed|grouped)_lora|base_gemm)\.\w+", README)}
    names |= {f"mol.kernels.{m}.{a}" for m, a in re.findall(r"(?<![\w.])((?:routed|grouped)_lora|base_gemm)\.(\w+)",
                                                              README)}
    assert "mol.inject" in names and "mol.kernels.routed_lora.DHL_TOKEN_MINOR" in names, sorted(names)
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name} ({type(e).__name__}: {e})")
    assert not missing, f"README.md names APIs that do not exist: {missing}"


def test_kernel_switches_and_their_environment_variables():
    """"`SHRINK` / `MOL_SHRINK` ...": each switch of mol.kernels.routed_lora, and the variable that sets it."""
    import mol.kernels.routed_lora as routed_lora

    pairs = re.findall(r"`([A-Z][A-Z_]+)` / `(MOL_[A-Z_]+)`", README)
    assert len(pairs) >= 4, pairs
    source = "\n".join(p.read_text() for p in (REPO / "mol" / "kernels").glob("*.py"))
    for switch, variable in pairs:
        assert hasattr(routed_lora, switch), f"README.md names mol.kernels.routed_lora.{switch}, which is gone"
        assert f'"{variable}"' in source, f"README.md names the variable {variable}, which no kernel reads"


def _calls(code: str) -> Iterator[tuple[str, list[str]]]:
    """(name, [argument texts]) for each call of a mol function or class in ``code``, nested calls included."""
    public = set(mol.__all__)
    for m in re.finditer(r"(?<![\w.])(?:mol\.)?([A-Za-z_]\w*)\(", code):
        if m.group(1) not in public:
            continue
        depth, args, start = 1, [], m.end()
        for i in range(m.end(), len(code)):
            ch = code[i]
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth == 0:
                    args.append(code[start:i])
                    break
            elif ch == "," and depth == 1:
                args.append(code[start:i])
                start = i + 1
        else:
            continue  # a call the span cuts off ("MoLConfig(...") says nothing checkable
        yield m.group(1), [a.strip() for a in args if a.strip()]


def test_call_arguments_match_the_signatures():
    checked, wrong = 0, []
    for code in inline_code(README):
        for name, args in _calls(code):
            params = list(inspect.signature(getattr(mol, name)).parameters)
            for pos, arg in enumerate(args):
                key = re.match(r"([A-Za-z_]\w*)\s*=(?!=)", arg)
                if key and key.group(1) not in params:
                    wrong.append(f"{name}({arg}): {name} takes no {key.group(1)!r} (it takes {params})")
                elif not key and arg in params and params.index(arg) != pos:
                    wrong.append(f"{name}(... {arg} ...) as argument {pos}: {name}'s {arg} is argument "
                                 f"{params.index(arg)}")
                checked += 1
    assert checked >= 20, f"only {checked} arguments of mol calls found in README.md: the extraction broke"
    assert not wrong, "README.md's calls do not match the code:\n" + "\n".join(wrong)


def _is_override(word: str) -> bool:
    """Whether ``word``, alone in the prose, is a Hydra override of mol.train: a key=value whose key starts with a
    key of the training config, or whose value no Python keyword argument could have (`precision=16-mixed`); not
    a Python keyword argument (`graph_tokens=N`) or an environment variable (`MOL_DB_FIRST=0`)."""
    key, eq, value = word.partition("=")
    if not eq or not re.fullmatch(r"[a-z_][\w.]*", key):
        return False
    if key.split(".")[0] in TRAIN_KEYS:
        return True
    if not value or value.isidentifier():  # `graph_tokens=`, `graph_tokens=N`
        return False
    try:
        ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return True
    return False


def _commands(text: str) -> list[list[str]]:
    """The training and evaluation commands in ``text`` as [app, *arguments]; "`... router=switch`" (the Quick
    start's shorthand for train.sh) included. A comment listing a group's choices after `group=value`
    ("`method=lora  # mol | lora | adapter`") adds one command per choice, with the overrides that choice names."""
    out = []
    for code in inline_code(text):
        line, _, comment = code.partition("#")
        line = line.strip()
        for prefix in ("bash scripts/train.sh", "mol-train", "python -m mol.train", "python -m mol.evaluate", "... "):
            if not line.startswith(prefix):
                continue
            app = "evaluate" if "evaluate" in prefix else "train"
            args = shlex.split(line[len(prefix):])
            out.append([app] + args)
            group = re.fullmatch(r"(\w+)=\S+", args[0]) if len(args) == 1 else None
            if group and "|" in comment:
                for choice in comment.split("|"):
                    words = choice.split()
                    out.append([app, f"{group.group(1)}={words[0]}"] + [w for w in words[1:] if "=" in w])
            break
        else:
            # a bare override in the prose (`experiment=lora_same_budget`, `method.rank_pattern={value:16}`)
            words = line.split()
            if words and all(_is_override(w) for w in words):
                out.append(["train"] + words)
    return out


def test_shell_commands_compose(tmp_path):
    from mol.train.app import check_overrides

    commands = _commands(README)
    assert len(commands) >= 30 and any(c[0] == "evaluate" for c in commands), commands
    # the README's own-config example: `mymol.yaml` in DIR/method/, starting from a shipped one
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "mymol.yaml").write_text("defaults: [mol, _self_]\nrank: 4\n")
    problems = []
    for app, *args in dict.fromkeys(map(tuple, commands)):  # each distinct command once
        extra: tuple[str, ...] = ()
        if "--config-dir" in args:
            at = args.index("--config-dir")
            extra, args = (str(tmp_path),), [*args[:at], *args[at + 2:]]
        overrides = [a for a in args if a not in ("-m", "--multirun")]
        # a sweep (router=topk,switch) is one job per value
        jobs = [[]]
        for ov in overrides:
            key, _, value = ov.partition("=")
            values = value.split(",") if "-m" in args and "," in value and "[" not in value else [value]
            jobs = [job + [f"{key}={v}"] for job in jobs for v in values]
        for job in jobs:
            msg = check_overrides(job, REPO / "conf", config_name="evaluate" if app == "evaluate" else "config",
                                  extra_dirs=extra)
            if msg:
                problems.append(f"{app} {' '.join(job)}: {msg}")
    assert not problems, "README.md's commands do not compose:\n" + "\n".join(problems)
