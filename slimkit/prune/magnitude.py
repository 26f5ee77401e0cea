"""Magnitude pruning: remove the smallest |W| (per layer by default, as in locuslab/wanda)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimkit.llm.block_maps import weight_of
from slimkit.llm.pipeline import Window
from slimkit.prune.base import PruneConfig, PruneMethod, register_pruner
from slimkit.prune.masks import COMPARISON_GROUPS, nm_mask, unstructured_mask
from slimkit.quant.obs import Sparsity


@dataclass
class MagnitudeConfig(PruneConfig):
    """Example:
    >>> model, report = slimkit.prune(model, MagnitudeConfig(sparsity="2:4"))  # doctest: +SKIP
    """

    comparison_group: str = field(
        default="layer",
        metadata={
            "help": "rank |W| over the whole layer or per output row",
            "choices": list(COMPARISON_GROUPS),
        },
    )

    def needs_data(self) -> bool:
        return False


def prune_by_score(
    w: torch.Tensor, score: torch.Tensor, sparsity: Sparsity, group: str
) -> torch.Tensor:
    """w with the lowest-scoring entries zeroed (N:M along the input dimension, or a ratio)."""
    if sparsity.is_nm:
        mask = nm_mask(score, sparsity.n, sparsity.m)
    else:
        mask = unstructured_mask(score, sparsity.ratio, group)
    return w.masked_fill(mask, 0.0)


def magnitude_prune_weight(
    w: torch.Tensor, sparsity: Sparsity, group: str = "layer"
) -> torch.Tensor:
    return prune_by_score(w, w.abs(), sparsity, group)


@register_pruner("magnitude", MagnitudeConfig, help="remove the smallest |W| (no data)")
class Magnitude(PruneMethod):
    config: MagnitudeConfig

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        for b in win.block_ids:
            for name, m in win.named_linears(b).items():
                w = weight_of(m, pipe.bmap.transposed).detach().clone().float()
                self.apply(
                    pipe,
                    win.index,
                    name,
                    m,
                    magnitude_prune_weight(w, self.sparsity, self.config.comparison_group),
                )
