"""Structured pruning: remove whole FFN channels and attention heads so that the model really
shrinks.

Channel j of a block's FFN (row j of up/gate, column j of down) is scored Wanda-style as
||X_j||_2 * ||W_down[:, j]||_2, with X the calibration inputs of the down projection
[our default]; the same number of lowest-scoring channels is removed from every block, because
Hugging Face configs hold one FFN width for all layers. The result is a smaller dense model
whose config has the new width, loadable by transformers as it is.

Attention heads (``--heads``, Llama family) are removed in whole key/value groups: a KV head
with the query heads that share it (grouped-query attention), so the ratio of query to KV heads,
hence the model code, is unchanged. A group is scored as the sum over its o_proj input columns c
of ||X_c||_2 * ||W_o[:, c]||_2 (the same Wanda-style score, or the column norm alone for
``--score magnitude``); every block keeps the same number of groups, and the config gets the
new head counts with ``head_dim`` written explicitly.
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

    heads: float = field(
        default=0.0,
        metadata={
            "help": "fraction of attention key/value head groups removed from every block "
            "(Llama family; 0 = keep all heads)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.heads < 1:
            raise SlimkitError(f"--heads is a fraction in [0, 1) (got {self.heads})")
        if self.parsed().is_nm:
            raise SlimkitError(
                "structured pruning removes a fraction of FFN channels: give a ratio, not N:M"
            )
        if self.score not in SCORES:
            raise SlimkitError(f"unknown score {self.score!r}; choose one of: {', '.join(SCORES)}")

    def scheme(self) -> str:
        heads = f", {self.heads:.0%} of attention head groups" if self.heads else ""
        return f"{self.parsed().ratio:.0%} of FFN channels removed{heads}"

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
        self.kv_groups: int | None = None
        if self.config.heads:
            c = pipe.model.config
            if pipe.bmap.attn is None:
                raise SlimkitError(
                    f"attention-head pruning is mapped for the Llama family only, not {pipe.bmap.family}"
                )
            self.n_heads = c.num_attention_heads
            self.n_kv = getattr(c, "num_key_value_heads", None) or self.n_heads
            self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.n_heads
            self.keep_groups = self.n_kv - int(self.n_kv * self.config.heads)
            if self.keep_groups == self.n_kv:
                raise SlimkitError(
                    f"--heads {self.config.heads} removes no head group: the model has {self.n_kv} "
                    f"key/value groups, so the smallest step is {1 / self.n_kv:.3f}"
                )

    def _score_columns(self, win: Window, b: int, name: str, w_in: torch.Tensor) -> torch.Tensor:
        """Per input column of ``name``: ||W[:, c]|| (x ||X_c|| for the wanda score)."""
        pipe = win.pipe
        score = w_in.float().norm(dim=0)
        if self.config.score == "wanda":
            block = pipe.blocks[b]
            sq = torch.zeros(w_in.shape[1], dtype=torch.float64, device=pipe.device)

            def add(_: str, x: torch.Tensor, sq=sq) -> None:
                sq.add_(x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0))

            pipe.collect([block], win.inputs_of(b), {name: get_module(block, name)}, add)
            score = score * pipe.all_reduce_sum(sq).sqrt().float().to(score.device)
        return score

    def _prune_heads(self, win: Window, b: int) -> None:
        pipe = win.pipe
        q, k, v, o = pipe.bmap.attn
        block = pipe.blocks[b]
        hd, group = self.head_dim, self.n_heads // self.n_kv
        cols = self._score_columns(win, b, o, get_module(block, o).weight.data)
        score = cols.reshape(self.n_kv, group * hd).sum(1)
        keep = torch.sort(torch.topk(score, self.keep_groups).indices).values
        kv_rows = (keep[:, None] * hd + torch.arange(hd)).reshape(-1)
        q_rows = (keep[:, None] * group * hd + torch.arange(group * hd)).reshape(-1)
        _slice_linear(get_module(block, q), q_rows, dim_out=True, transposed=False)
        for name in (k, v):
            _slice_linear(get_module(block, name), kv_rows, dim_out=True, transposed=False)
        _slice_linear(get_module(block, o), q_rows, dim_out=False, transposed=False)
        pipe.log.append(
            {
                "window": win.index,
                "layer": f"{pipe.bmap.blocks}.{b}.{o}",
                "sparsity": 1 - self.keep_groups / self.n_kv,
                "kept_kv_groups": keep.tolist(),
            }
        )
        self.kv_groups = self.keep_groups

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        producers, consumer, _ = pipe.bmap.ffn
        t = pipe.bmap.transposed
        for b in win.block_ids:
            if self.config.heads:
                self._prune_heads(win, b)
            if not self.sparsity.ratio:
                continue
            block = pipe.blocks[b]
            down = get_module(block, consumer)
            w_down = down.weight.data.t() if t else down.weight.data  # (hidden, ffn)
            width = w_down.shape[1]
            keep_n = width - int(width * self.sparsity.ratio)
            if keep_n < 1:
                raise SlimkitError(f"sparsity {self.sparsity.ratio} would remove every FFN channel")
            score = self._score_columns(win, b, consumer, w_down)
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
        if self.width is not None:
            setattr(pipe.model.config, key, self.width)
        if self.kv_groups is not None:
            c = pipe.model.config
            c.head_dim = self.head_dim
            c.num_attention_heads = self.kv_groups * (self.n_heads // self.n_kv)
            c.num_key_value_heads = self.kv_groups
