"""SmoothQuant (Xiao et al., arXiv 2211.10438), following mit-han-lab/smoothquant ``smooth.py``.

For each (norm -> consumer linears) pair of the block map: a_j = max |X_j| over calibration
tokens, w_j = max over consumers and rows of |W_.j| (>= 1e-5), s_j = a_j^alpha / w_j^(1-alpha)
(>= 1e-5); the norm's weight (and bias) is divided by s and the consumers' columns multiplied by
s, which leaves the function unchanged. The smoothed block is then quantized by RTN or GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import get_module, weight_of
from slimkit.llm.folds import fold_linear_scales, fold_scales, linear_pair_repeat

__all__ = [
    "fold_linear_scales",
    "fold_scales",
    "linear_pair_repeat",
]  # (moved to slimkit.llm.folds)
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline, Window
from slimkit.quant.methods.base import register_method
from slimkit.quant.methods.gptq import GPTQ, GPTQConfig
from slimkit.quant.methods.rtn import RTN

WEIGHT_METHODS = ("rtn", "gptq")


@dataclass
class SmoothQuantConfig(GPTQConfig):
    """SmoothQuant scales, then ``weight_method`` (rtn or gptq; the GPTQ fields apply to gptq).

    Defaults are W8A8 with int8 symmetric per-channel weights and dynamic per-token activations.

    Example:
        >>> cfg = SmoothQuantConfig(wbits=4, abits=8, alpha=0.5, weight_method="gptq", group_size=-1)
    """

    wbits: int = field(default=8, metadata={"help": "weight bits, 2..8"})
    abits: int = field(
        default=8, metadata={"help": "activation bits, 2..8, or 16 for unquantized activations"}
    )
    group_size: int = field(
        default=-1, metadata={"help": "input columns per weight scale; -1 = per output channel"}
    )
    sym: bool = field(default=True, metadata={"help": "symmetric weight grid"})
    alpha: float = field(
        default=0.5, metadata={"help": "migration strength: 0 = none, 1 = all to the weights"}
    )
    weight_method: str = field(
        default="rtn",
        metadata={"help": "weight quantizer after smoothing", "choices": list(WEIGHT_METHODS)},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise SlimkitError(f"--alpha must be in [0, 1] (got {self.alpha})")
        if self.weight_method not in WEIGHT_METHODS:
            raise SlimkitError(
                f"unknown --weight-method {self.weight_method!r}; choose one of: {', '.join(WEIGHT_METHODS)}"
            )

    def scheme(self) -> str:
        return f"SmoothQuant(a={self.alpha})+{self.weight_method.upper()} " + super().scheme()


def smooth_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """s_j = a_j^alpha / w_j^(1-alpha) for consumer weights given as (out, in)."""
    w_max = torch.cat([w.abs() for w in weights], dim=0).amax(dim=0).clamp(min=1e-5)
    a = act_absmax.to(w_max)
    return (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def foldable_linear_pairs(pipe: BlockwisePipeline, block: torch.nn.Module) -> list[tuple]:
    """(producer, consumer, column layout) of the block's foldable linear pairs; a consumer
    whose input is rotated online (``--rotate-down``) has no channel correspondence: skipped."""
    from slimkit.quant.rotation import has_down_rotation

    heads = getattr(pipe.model.config, "num_attention_heads", None)
    out = []
    for producer, consumer, kind in pipe.bmap.smooth_linear:
        p, c = get_module(block, producer), get_module(block, consumer)
        if p is None or c is None or (kind == "attn" and not heads) or has_down_rotation(c):
            continue
        n_out = weight_of(p, pipe.bmap.transposed).shape[0]
        n_in = weight_of(c, pipe.bmap.transposed).shape[1]
        out.append((producer, consumer, linear_pair_repeat(kind, n_out, n_in, heads or 1)))
    return out


def reduce_repeated(stat: torch.Tensor, layout: tuple, how: str) -> torch.Tensor:
    """Per-column statistic of the consumer -> per-row statistic of the producer (max or min
    over the query heads that read one value channel)."""
    g, r, d = layout
    x = stat.reshape(g, r, d)
    return (x.amax(1) if how == "max" else x.amin(1)).reshape(-1)


@register_method(
    "smoothquant", SmoothQuantConfig, help="SmoothQuant scale migration, then RTN or GPTQ"
)
class SmoothQuant(BlockwiseMethod):
    def __init__(self, config: SmoothQuantConfig):
        self.config = config
        self.inner = (GPTQ if config.weight_method == "gptq" else RTN)(config)

    def on_start(self, pipe: BlockwisePipeline) -> None:
        self.enabled = bool(pipe.bmap.smooth) and pipe.bmap.smooth_ok(pipe.model.config)
        if not self.enabled:
            from logging import getLogger

            getLogger("slimkit").warning(
                "%s blocks have no foldable norm -> linear pairs; smoothing skipped",
                pipe.bmap.family,
            )
        self.inner.on_start(pipe)

    def on_window(self, win: Window) -> None:
        if self.enabled:
            for b in win.block_ids:
                self.smooth_block(win, b)
        self.inner.on_window(win)

    def smooth_block(self, win: Window, b: int) -> None:
        pipe = win.pipe
        block = pipe.blocks[b]
        src = win.inputs_of(b)
        firsts = {}
        for norm_name, consumers in pipe.bmap.smooth:
            m = get_module(block, consumers[0])
            if m is not None and get_module(block, norm_name) is not None:
                firsts[norm_name] = m
        amax: dict[str, torch.Tensor] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)

        pipe.collect([block], src, firsts, observe)
        for norm_name, consumers in pipe.bmap.smooth:
            if norm_name not in amax:
                continue
            a = pipe.all_reduce_max(amax[norm_name])
            mods = [get_module(block, c) for c in consumers]
            mods = [m for m in mods if m is not None]
            s = smooth_scales(
                a, [weight_of(m, pipe.bmap.transposed) for m in mods], self.config.alpha
            )
            fold_scales(get_module(block, norm_name), mods, s, pipe.bmap.transposed)
