"""CFP, CBQ's coarse-to-fine preprocessing, as applied to a block of a window: detect activation-
outlier channels on the full-precision stream and fold their scales into norm -> linear (and,
with ``--cfp-linear``, linear -> linear) pairs, function-preserving, in the block and its FP copy;
and, with ``--learn-smooth``, make the learned migration scales permanent at finalization.
The detection and truncation rules themselves are in :mod:`slimkit.quant.cfp`."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.llm.block_maps import get_module
from slimkit.llm.pipeline import BlockwisePipeline
from slimkit.quant.cfp import activation_scales
from slimkit.quant.methods.smoothquant import (
    fold_linear_scales,
    fold_scales,
    foldable_linear_pairs,
    reduce_repeated,
)


class CFPSteps:
    """The CFP steps of :class:`~slimkit.quant.methods.cbq.CBQ` (a mixin: they read the
    method's config and state)."""

    def _cfp_fold(
        self, pipe: BlockwisePipeline, block, fp_block, fp_in, index: int | None = None
    ) -> None:
        firsts = {}
        for norm_name, consumers in pipe.bmap.smooth:
            m = get_module(fp_block, consumers[0])
            if m is not None and get_module(fp_block, norm_name) is not None:
                firsts[norm_name] = m
        stats: dict[str, list[torch.Tensor]] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1]).float()
            mx, mn = x.amax(0), x.amin(0)
            if name in stats:
                mx, mn = torch.maximum(stats[name][0], mx), torch.minimum(stats[name][1], mn)
            stats[name] = [mx, mn]

        pairs = foldable_linear_pairs(pipe, fp_block) if self.config.cfp_linear else []
        for _, consumer, _ in pairs:
            firsts[consumer] = get_module(fp_block, consumer)
        pipe.collect([fp_block], fp_in, firsts, observe)
        for producer, consumer, layout in pairs:
            mx = reduce_repeated(stats[consumer][0], layout, "max")
            mn = reduce_repeated(stats[consumer][1], layout, "min")
            s = activation_scales(mx, mn, self.config.cfp_params())
            if bool((s == 1).all()):
                continue
            for blk in (block, fp_block):
                fold_linear_scales(
                    get_module(blk, producer),
                    get_module(blk, consumer),
                    s,
                    layout,
                    pipe.bmap.transposed,
                )
            pipe.log.append(
                {
                    "block": index,
                    "block_pair": f"{producer}->{consumer}",
                    "cfp_channels": int((s > 1).sum()),
                    "cfp_max_scale": float(s.max()),
                }
            )
        for norm_name, consumers in pipe.bmap.smooth:
            if norm_name not in stats:
                continue
            s = activation_scales(*stats[norm_name], self.config.cfp_params())
            if bool((s == 1).all()):
                continue
            for blk in (block, fp_block):
                mods = [get_module(blk, c) for c in consumers]
                fold_scales(
                    get_module(blk, norm_name),
                    [m for m in mods if m is not None],
                    s,
                    pipe.bmap.transposed,
                )
            pipe.log.append(
                {
                    "block": index,
                    "block_norm": norm_name,
                    "cfp_channels": int((s > 1).sum()),
                    "cfp_max_scale": float(s.max()),
                }
            )

    def _fold_migration(self, pipe: BlockwisePipeline, b: int, block: nn.Module) -> None:
        """Make the learned migration scales permanent: norm /= s, consumer columns *= s."""
        for h in self._norm_hooks.pop(b, []):
            h.remove()
        for norm_name, log_s in self.mig.get(b, {}).items():
            s = torch.exp(log_s.detach())
            mods = [get_module(block, c) for c in dict(pipe.bmap.smooth)[norm_name]]
            fold_scales(
                get_module(block, norm_name),
                [m for m in mods if m is not None],
                s,
                pipe.bmap.transposed,
            )
