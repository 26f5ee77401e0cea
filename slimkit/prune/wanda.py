"""Wanda (Sun et al., arXiv 2306.11695), following locuslab/wanda ``lib/prune.py``.

Score S_ij = |W_ij| * ||X_j||_2 over the calibration tokens entering the linear, compared per
output row; no weight update. Blocks are pruned in order, so block i+1 sees the inputs produced
by the already-pruned block i.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimkit.llm.block_maps import weight_of
from slimkit.llm.pipeline import Window
from slimkit.prune.base import PruneConfig, PruneMethod, register_pruner
from slimkit.prune.magnitude import prune_by_score
from slimkit.prune.masks import COMPARISON_GROUPS
from slimkit.quant.obs import Sparsity


@dataclass
class WandaConfig(PruneConfig):
    """Example:
    >>> model, report = slimkit.prune(model, WandaConfig(sparsity="0.5"), calib)  # doctest: +SKIP
    """

    comparison_group: str = field(
        default="row",
        metadata={
            "help": "rank scores per output row (the paper's) or per layer",
            "choices": list(COMPARISON_GROUPS),
        },
    )


def wanda_prune_weight(
    w: torch.Tensor, sq_norms: torch.Tensor, sparsity: Sparsity, group: str = "row"
) -> torch.Tensor:
    """``sq_norms[j]`` = sum over tokens of x_j^2 (any positive scaling gives the same mask)."""
    return prune_by_score(w, w.abs() * sq_norms.float().sqrt().unsqueeze(0), sparsity, group)


@register_pruner("wanda", WandaConfig, help="Wanda: |W| x input norm, per output row")
class Wanda(PruneMethod):
    config: WandaConfig

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        for b in win.block_ids:
            src = win.inputs_of(b)
            linears = win.named_linears(b)
            norms = {
                n: torch.zeros(
                    weight_of(m, pipe.bmap.transposed).shape[1],
                    dtype=torch.float64,
                    device=pipe.device,
                )
                for n, m in linears.items()
            }

            def add(name: str, x: torch.Tensor, norms=norms) -> None:
                norms[name] += x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)

            pipe.collect([pipe.blocks[b]], src, linears, add)
            for name, m in linears.items():
                a = pipe.all_reduce_sum(norms[name])
                w = weight_of(m, pipe.bmap.transposed).detach().clone().float()
                self.apply(
                    pipe,
                    win.index,
                    name,
                    m,
                    wanda_prune_weight(w, a, self.sparsity, self.config.comparison_group),
                )
