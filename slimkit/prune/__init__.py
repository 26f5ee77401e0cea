"""One-shot LLM pruning on the block-wise pipeline: magnitude, Wanda, SparseGPT; ratios and N:M."""

from slimkit.prune.api import prune
from slimkit.prune.base import PRUNE_METHODS, PruneConfig
from slimkit.prune.magnitude import MagnitudeConfig
from slimkit.prune.sparsegpt import SparseGPTConfig
from slimkit.prune.structured import StructuredConfig
from slimkit.prune.wanda import WandaConfig

__all__ = [
    "PRUNE_METHODS",
    "MagnitudeConfig",
    "PruneConfig",
    "SparseGPTConfig",
    "StructuredConfig",
    "WandaConfig",
    "prune",
]
