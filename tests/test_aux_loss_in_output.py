"""MoLConfig(aux_loss_in_output=True): the model's training loss includes the router losses, as Hugging Face's MoE
models include theirs, so loops that backpropagate ``outputs.loss`` alone (transformers' Trainer) train them."""
from __future__ import annotations

import copy

import torch
from conftest import make_tiny_llama

import mol


def _model(aux_loss_in_output: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = make_tiny_llama()
    mol.inject(model, mol.MoLConfig(num_experts=4, top_k=2, rank=4, target_modules="all-linear", backend="torch",
                                    aux_loss_coef=0.5, z_loss_coef=0.05, aux_loss_in_output=aux_loss_in_output))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "router" in n:
                p.normal_(0, 0.3)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_loss_includes_the_router_losses():
    ids = torch.randint(1, 101, (2, 9))
    plain, included = _model(False).train(), _model(True).train()
    out = plain(input_ids=ids, labels=ids)
    want = out.loss + mol.aux_loss(plain)
    want.backward()
    got = included(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.loss, want)
    assert got["loss"] is got.loss  # the ModelOutput's dict view holds the same tensor
    got.loss.backward()
    g_want, g_got = _grads(plain), _grads(included)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], msg=name)
    assert mol.aux_loss(plain) > 0  # a real difference to the task loss

    included.eval()  # evaluation reports the task's loss alone
    with torch.no_grad():
        torch.testing.assert_close(included(input_ids=ids, labels=ids).loss, plain.eval()(input_ids=ids, labels=ids).loss)
        assert included(input_ids=ids).loss is None  # no labels, no loss
    twin = copy.deepcopy(included).train()  # a copy carries a hook of its own
    torch.testing.assert_close(twin(input_ids=ids, labels=ids).loss, want)


def test_tuple_outputs_get_the_router_losses_and_prompt_logits_line_up():
    # return_dict=False gives (loss, logits, ...): the hooks read and write the tuple as they do the ModelOutput
    ids = torch.randint(1, 101, (2, 9))
    model = _model(True).train()
    as_dict = model(input_ids=ids, labels=ids)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    assert mol.aux_loss(model) > 0
    prompt = mol.inject(make_tiny_llama(), mol.PromptTuningConfig(num_virtual_tokens=3)).eval()
    with torch.no_grad():
        for labels in (None, ids):
            want = prompt(input_ids=ids, labels=labels).logits
            got = prompt(input_ids=ids, labels=labels, return_dict=False)
            torch.testing.assert_close(got[0 if labels is None else 1], want)
            assert want.shape[1] == ids.shape[1]


def test_transformers_trainer_trains_the_router_losses(tmp_path):
    """transformers' Trainer computes the loss as outputs.loss: with the option, its loss is task + router losses."""
    from transformers import Trainer, TrainingArguments

    model = _model(True)
    ids = torch.randint(1, 101, (2, 9))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args)
    model.train()
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    reference = _model(False).train()
    out = reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(loss, out.loss + mol.aux_loss(reference))


def test_transformers_trainer_checkpoints_resume_and_the_adapter_saves(tmp_path):
    """What README says of transformers' Trainer: its checkpoints hold the injected model's own state and resume
    it exactly (max_steps 4: four steps straight equal two, a save, a resumed run of two more); the adapter to
    ship comes from mol.save_adapter, and reloads onto a fresh base to the same outputs."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Data(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(1, 101, (9,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    base = make_tiny_llama()

    def trainer(out, steps):
        model = mol.inject(copy.deepcopy(base), mol.MoLConfig(num_experts=4, top_k=2, rank=4, aux_loss_in_output=True))
        args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                                 max_steps=steps, save_steps=2, seed=0, data_seed=0)
        return model, Trainer(model=model, args=args, train_dataset=Data())

    straight, t1 = trainer(tmp_path / "a", 4)
    t1.train()
    resumed, t2 = trainer(tmp_path / "a", 4)  # the same run, restarted from its step-2 checkpoint
    t2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    mol.save_adapter(straight, tmp_path / "adapter")
    shipped = mol.load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
    ids = torch.randint(1, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(shipped(input_ids=ids).logits, straight.eval()(input_ids=ids).logits)


def test_training_cli_counts_the_router_losses_once(tmp_path):
    """mol.train's module adds the router losses itself unless the model's loss holds them: the same run either way."""
    from test_train_utils import compose, make_causal_data, make_tiny_llama as save_tiny_llama, quiet_trainer_overrides

    from mol.train.app import run
    from mol.train.callbacks import read_loss_history

    llama, data = save_tiny_llama(tmp_path / "llama"), make_causal_data(tmp_path / "data")
    histories = {}
    for included in (False, True):
        out = tmp_path / f"run_{included}"
        cfg = compose(["method=mol", "model=hf_causal", f"model.path={llama}", "data=jsonl",
                       f"data.train={data['train']}", f"data.val={data['val']}", "data.batch_size=8",
                       "data.max_length=32", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1",
                       f"+method.aux_loss_in_output={str(included).lower()}", f"output_dir={out}",
                       *quiet_trainer_overrides()])
        run(cfg)
        histories[included] = read_loss_history(str(out / "train_loss.jsonl"))
    plain, other = histories[False], histories[True]
    assert plain.keys() == other.keys()
    for step in plain:
        assert abs(plain[step] - other[step]) < 1e-5 * abs(plain[step]), (step, plain, other)
