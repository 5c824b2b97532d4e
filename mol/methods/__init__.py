"""The other parameter-efficient methods, each a config + a module-level delta registered with ``mol.inject``.

Importing this package registers them (``mol`` imports it), so ``mol.inject``, ``save_adapter`` and
``load_adapter`` handle every method the same way as MoL/LoRA.
"""

from mol.methods.adapters import AdapterConfig, BottleneckAdapter
from mol.methods.bitfit import BitFitConfig
from mol.methods.ia3 import IA3Config, IA3Linear
from mol.methods.prefix import PrefixEncoder, PrefixTuningConfig, PromptEmbedding, PromptTuningConfig

__all__ = ["AdapterConfig", "BitFitConfig", "BottleneckAdapter", "IA3Config", "IA3Linear", "PrefixEncoder",
           "PrefixTuningConfig", "PromptEmbedding", "PromptTuningConfig"]
