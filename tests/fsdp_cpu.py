"""``python tests/fsdp_cpu.py [hydra overrides]``: ``python -m mol.train`` under Lightning's FSDPStrategy on CPU
processes (gloo), so that tests/test_train_fsdp.py can run real FSDP sharding (FULL_SHARD over 2 processes) on a
machine without GPUs. Not a test file itself; Lightning starts the other ranks by running this script again.

Lightning accepts FSDP with a CPU accelerator only for a subclass of its strategy, as trainer=fsdp's
(mol.train.fsdp.FSDPStrategy) is. Two things differ from a GPU run, each only where torch or Lightning refuse the CPU
outright:
- FSDP needs ``device_id=cpu`` to run on the CPU (Lightning passes the GPU's index, None here);
- Lightning's full-state-dict context offloads to the CPU, which on tensors already there hands back views of
  storage FSDP frees (a segfault): offloading is turned off.
mol.train's refusal of trainer=fsdp without GPUs is bypassed likewise. Set ``MOL_FSDP_UNITS=<file>`` to have rank 0
write the number of FSDP units the model was wrapped in (and how many mix frozen and trainable tensors), the
gradient elements and NF4 code bytes each process holds, and
``MOL_FSDP_HUB=<dir>`` to have ``hub.repo_id=...`` "upload" into that directory (no token, no network).
"""
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed.fsdp as fsdp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_fsdp_init = fsdp.FullyShardedDataParallel.__init__


def _cpu_init(self, *args, device_id=None, **kwargs):
    _fsdp_init(self, *args, device_id=torch.device("cpu"), **kwargs)


def _full_state_dict_context(module, world_size, rank0_only=True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    return fsdp.FullyShardedDataParallel.state_dict_type(
        module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


def _fake_hub(app, hub_dir: Path) -> None:
    """hub.*'s checks pass without a token or network, and push_folder copies the files it would upload."""
    import shutil

    import huggingface_hub

    import mol.io

    check_hub = app.check_hub

    def check_hub_offline(cfg, method_cfg):
        offline, get_token = huggingface_hub.constants.HF_HUB_OFFLINE, huggingface_hub.get_token
        huggingface_hub.constants.HF_HUB_OFFLINE, huggingface_hub.get_token = False, lambda: "token"
        try:
            check_hub(cfg, method_cfg)
        finally:
            huggingface_hub.constants.HF_HUB_OFFLINE, huggingface_hub.get_token = offline, get_token

    def copy_folder(folder, repo_id, card, **kwargs):
        shutil.copytree(folder, hub_dir, dirs_exist_ok=True)
        return "commit"

    app.check_hub = check_hub_offline
    mol.io.push_folder = copy_folder


def main() -> None:
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    import mol.train.app as app
    import mol.train.module as module
    from mol.quant.linear import NF4Tensor

    fsdp.FullyShardedDataParallel.__init__ = _cpu_init
    lightning_fsdp._get_full_state_dict_context = _full_state_dict_context
    app.check_accelerator = lambda trainer_cfg, check_devices=True: None
    hub_dir = os.environ.get("MOL_FSDP_HUB")
    if hub_dir:
        _fake_hub(app, Path(hub_dir))
    report = os.environ.get("MOL_FSDP_UNITS")
    if report:
        configure = module.MoLModule.configure_model

        def configure_and_count(self):
            if module.fsdp_root(self) is not None:  # a later stage's call: wrapped already, nothing to count
                return configure(self)
            configure(self)
            FSDP = fsdp.FullyShardedDataParallel
            units = [m for m in self.modules() if isinstance(m, FSDP)]
            # units whose own tensors (those of no unit inside) are part frozen, part trainable; and the elements
            # of this process's flat parameters that take gradients (FSDP keeps and reduce-scatters a gradient for
            # the whole of a flat parameter that holds any trainable tensor)
            mixed = 0
            for unit in units:
                nested = {p for sub in FSDP.fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
                mixed += len({p.requires_grad for p in unit.parameters() if p not in nested}) == 2
            flat = [u._handle.flat_param for u in units if u._handle is not None]
            grads = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(grads, sum(f.numel() for f in flat if f.requires_grad))
            # the NF4 code bytes each process holds (its shards of them, under FSDP), and the model's
            nf4 = [m for m in self.modules() if isinstance(m, NF4Tensor)]
            held = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(held, sum(m.qweight.numel() * m.qweight.element_size() for m in nf4))
            if self.global_rank == 0:
                total = sum((math.prod(m.weight_shape) + 1) // 2 for m in nf4)
                Path(report).write_text(json.dumps({"units": len(units), "nf4_code_bytes": held, "nf4_total": total,
                                                    "mixed_units": mixed, "grad_elements": grads}))

        module.MoLModule.configure_model = configure_and_count
    app.main()


if __name__ == "__main__":
    main()
