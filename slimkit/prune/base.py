"""What the pruning methods share: the config fields, the registry and the per-layer record."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import set_weight, weight_of
from slimkit.llm.compress import (
    COMPRESSION_METHODS,
    method_for_config,
    register_compression_method,
)
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline, PipelineFields
from slimkit.quant.obs import Sparsity

# the pruning methods of the one compression-method registry
PRUNE_METHODS = COMPRESSION_METHODS.where("pruning method", kind="pruning")


@dataclass
class PruneConfig(PipelineFields):
    """Fields shared by the pruning methods (each method's config extends it)."""

    sparsity: str = field(
        default="0.5",
        metadata={"help": "fraction of weights removed (0.5) or N:M pattern kept (2:4, 4:8)"},
    )

    def __post_init__(self) -> None:
        self.sparsity = str(self.sparsity)
        self.parsed()

    def parsed(self) -> Sparsity:
        return Sparsity.parse(self.sparsity)

    def needs_data(self) -> bool:
        """Whether the method reads calibration activations."""
        return True

    def scheme(self) -> str:
        sp = self.parsed()
        return f"{sp.n}:{sp.m}" if sp.is_nm else f"{sp.ratio:.0%} unstructured"


def register_pruner(name: str, config_cls: type, help: str):
    return register_compression_method(name, config_cls, kind="pruning", help=help)


def pruner_for_config(config: PruneConfig) -> str:
    return method_for_config(config, kind="pruning")


class PruneMethod(BlockwiseMethod):
    def __init__(self, config: PruneConfig):
        self.config = config
        self.sparsity = config.parsed()

    def on_start(self, pipe: BlockwisePipeline) -> None:
        if self.sparsity.is_nm:
            for b in range(len(pipe.blocks)):
                for name, m in pipe.named_linears(b).items():
                    cols = weight_of(m, pipe.bmap.transposed).shape[1]
                    if cols % self.sparsity.m:
                        raise SlimkitError(
                            f"N:M sparsity needs M={self.sparsity.m} to divide the input width {cols} of {name}"
                        )

    def apply(
        self,
        pipe: BlockwisePipeline,
        win_index: int,
        name: str,
        module: nn.Module,
        w_new: torch.Tensor,
        **metrics,
    ) -> None:
        """Write the pruned weight into the model and log its sparsity."""
        if not torch.isfinite(w_new).all():
            raise SlimkitError(
                f"{name}: pruning produced non-finite weights (NaN/Inf in weights or inputs)"
            )
        set_weight(module, w_new.to(module.weight.dtype), pipe.bmap.transposed)
        sparsity = float((w_new == 0).float().mean())
        pipe.log.append({"window": win_index, "layer": name, "sparsity": sparsity, **metrics})
