"""mol: Mixture-of-LoRA fine-tuning for frozen transformers.

    import mol
    model = mol.inject(hf_model, mol.MoLConfig(num_experts=8, top_k=2, rank=16, target_modules="all-linear"))
    loss = task_loss + mol.aux_loss(model)
    mol.save_adapter(model, "out/adapter")
"""

from mol.config import LoRAConfig, MethodConfig, MoLConfig, config_from_dict, register_config
from mol.inject import (aux_loss, clear_graphs, clear_routing, disable_adapters, inject, match_modules, register_method,
                        routing_stats, set_graphs, trainable_parameters)
from mol.io import (export_peft, import_peft, load_adapter, merge, merge_and_unload, push_to_hub, save_adapter, unload,
                    unmerge)
from mol.experts import ExpertsLoRA
from mol.layers import AdapterLayer, MoLLinear
from mol.quant import (NF4Experts, NF4Linear, bnb_4bit_state_dict, from_bnb_4bit, load_bnb_4bit, quantize,
                       save_bnb_4bit)
from mol.methods import AdapterConfig, BitFitConfig, IA3Config, PrefixTuningConfig, PromptTuningConfig
from mol.routers import Router, RouterOutput

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterLayer", "BitFitConfig", "ExpertsLoRA", "IA3Config", "LoRAConfig", "MethodConfig",
    "MoLConfig", "MoLLinear", "NF4Experts", "NF4Linear", "PrefixTuningConfig", "PromptTuningConfig", "Router",
    "RouterOutput", "aux_loss", "bnb_4bit_state_dict", "clear_graphs", "clear_routing", "config_from_dict",
    "disable_adapters", "export_peft", "from_bnb_4bit", "import_peft", "inject", "load_adapter", "load_bnb_4bit",
    "match_modules", "merge", "merge_and_unload", "push_to_hub", "quantize", "register_config", "register_method",
    "routing_stats", "save_adapter", "save_bnb_4bit", "set_graphs", "trainable_parameters", "unload", "unmerge",
]
