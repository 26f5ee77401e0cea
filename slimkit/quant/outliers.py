"""Function-preserving activation outliers for testing outlier-aware quantization on small models.

Small models rarely grow the massive activation channels of 7B+ LLMs. Multiplying a few entries
of each foldable norm's weight by ``k`` and dividing the matching input columns of its consumer
linears by ``k`` creates them without changing the model's function (exactly in real arithmetic;
to fp32 round-off in practice).
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import block_map_for, get_blocks, get_module, weight_of


@torch.no_grad()
def inject_outliers(
    model: nn.Module, fraction: float = 0.02, k: float = 50.0, seed: int = 0, linear: bool = False
) -> int:
    """Scale ``fraction`` of the channels of every norm -> linear pair by ``k`` (with ``linear``,
    also of the family's linear -> linear pairs: value -> output, up -> down); returns the
    number of channels changed."""
    from slimkit.quant.methods.smoothquant import (
        fold_linear_scales,
        fold_scales,
        linear_pair_repeat,
    )

    bm = block_map_for(model)
    if not bm.smooth or not bm.smooth_ok(model.config):
        raise SlimkitError(f"{bm.family} models have no foldable norm -> linear pairs")
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for block in get_blocks(model, bm):
        for norm_name, consumers in bm.smooth:
            norm = get_module(block, norm_name)
            mods = [m for m in (get_module(block, c) for c in consumers) if m is not None]
            n = norm.weight.numel()
            idx = torch.randperm(n, generator=g)[: max(1, round(fraction * n))]
            s = torch.ones(n)
            s[idx] = 1.0 / k
            fold_scales(norm, mods, s, bm.transposed)
            changed += idx.numel()
        for producer, consumer, kind in bm.smooth_linear if linear else ():
            p, c = get_module(block, producer), get_module(block, consumer)
            layout = linear_pair_repeat(
                kind,
                weight_of(p, bm.transposed).shape[0],
                weight_of(c, bm.transposed).shape[1],
                model.config.num_attention_heads,
            )
            n = layout[0] * layout[2]
            idx = torch.randperm(n, generator=g)[: max(1, round(fraction * n))]
            s = torch.ones(n)
            s[idx] = 1.0 / k
            fold_linear_scales(p, c, s, layout, bm.transposed)
            changed += idx.numel()
    return changed
