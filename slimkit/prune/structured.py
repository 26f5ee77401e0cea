"""Structured FFN pruning: remove whole FFN channels so that the model really shrinks.

Channel j of a block's FFN (row j of up/gate, column j of down) is scored Wanda-style as
||X_j||_2 * ||W_down[:, j]||_2, with X the calibration inputs of the down projection
[our default]; the same number of lowest-scoring channels is removed from every block, because
Hugging Face configs hold one FFN width for all layers. The result is a smaller dense model
whose config has the new width, loadable by transformers as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import get_module
from slimkit.llm.pipeline import BlockwisePipeline, Window
from slimkit.prune.base import PruneConfig, PruneMethod, register_pruner

SCORES = ("wanda", "magnitude")


@dataclass
class StructuredConfig(PruneConfig):
    """``sparsity`` is the fraction of FFN channels removed from every block.

    Example:
        >>> model, report = slimkit.prune(model, StructuredConfig(sparsity="0.25"), calib)  # doctest: +SKIP
    """

    score: str = field(
        default="wanda",
        metadata={
            "help": "channel importance: wanda (|W| x input norm) or magnitude",
            "choices": list(SCORES),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parsed().is_nm:
            raise SlimkitError(
                "structured pruning removes a fraction of FFN channels: give a ratio, not N:M"
            )
        if self.score not in SCORES:
            raise SlimkitError(f"unknown score {self.score!r}; choose one of: {', '.join(SCORES)}")

    def scheme(self) -> str:
        return f"{self.parsed().ratio:.0%} of FFN channels removed"

    def needs_data(self) -> bool:
        return self.score == "wanda"


def _slice_linear(m: nn.Module, keep: torch.Tensor, *, dim_out: bool, transposed: bool) -> None:
    """Keep only ``keep`` output features (dim_out) or input features of a Linear / Conv1D."""
    w = m.weight.data
    axis = (1 if transposed else 0) if dim_out else (0 if transposed else 1)
    m.weight = nn.Parameter(
        w.index_select(axis, keep.to(w.device)).contiguous(), requires_grad=m.weight.requires_grad
    )
    if dim_out and getattr(m, "bias", None) is not None:
        m.bias = nn.Parameter(m.bias.data.index_select(0, keep.to(w.device)).contiguous())
    if isinstance(m, nn.Linear):
        if dim_out:
            m.out_features = len(keep)
        else:
            m.in_features = len(keep)
    elif hasattr(m, "nf") and dim_out:  # transformers' Conv1D
        m.nf = len(keep)


@register_pruner(
    "structured", StructuredConfig, help="remove whole FFN channels: a smaller dense model"
)
class StructuredFFN(PruneMethod):
    config: StructuredConfig

    def on_start(self, pipe: BlockwisePipeline) -> None:
        if pipe.bmap.ffn is None:
            raise SlimkitError(
                f"structured pruning is not mapped for the {pipe.bmap.family} family"
            )
        self.width: int | None = None

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        producers, consumer, _ = pipe.bmap.ffn
        t = pipe.bmap.transposed
        for b in win.block_ids:
            block = pipe.blocks[b]
            down = get_module(block, consumer)
            w_down = down.weight.data.t() if t else down.weight.data  # (hidden, ffn)
            width = w_down.shape[1]
            keep_n = width - int(width * self.sparsity.ratio)
            if keep_n < 1:
                raise SlimkitError(f"sparsity {self.sparsity.ratio} would remove every FFN channel")
            score = w_down.float().norm(dim=0)
            if self.config.score == "wanda":
                src = win.inputs_of(b)
                sq = torch.zeros(width, dtype=torch.float64, device=pipe.device)

                def add(name: str, x: torch.Tensor, sq=sq) -> None:
                    sq.add_(x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0))

                pipe.collect([block], src, {consumer: down}, add)
                score = score * pipe.all_reduce_sum(sq).sqrt().float().to(score.device)
            keep = torch.sort(torch.topk(score, keep_n).indices).values
            for name in producers:
                _slice_linear(get_module(block, name), keep, dim_out=True, transposed=t)
            _slice_linear(down, keep, dim_out=False, transposed=t)
            prefix = f"{pipe.bmap.blocks}.{b}."
            pipe.log.append(
                {
                    "window": win.index,
                    "layer": prefix + consumer,
                    "sparsity": 1 - keep_n / width,
                    "kept_channels": keep_n,
                }
            )
            self.width = keep_n

    def on_end(self, pipe: BlockwisePipeline) -> None:
        _, _, key = pipe.bmap.ffn
        setattr(pipe.model.config, key, self.width)
