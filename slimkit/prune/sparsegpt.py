"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774), following IST-DASLab/sparsegpt.

OBS-style: the mask is chosen block by block from w^2 / [H^-1]_jj^2 (jointly over each block of
B columns for a ratio, per group of M columns for N:M) and the surviving weights are updated to
compensate, with the same Hessian and column sweep as GPTQ (``slimkit.quant.obs``). With
``wbits`` < 16 the same sweep also quantizes (joint sparsity + quantization in one pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import weight_of
from slimkit.llm.pipeline import Window
from slimkit.prune.base import PruneConfig, PruneMethod, register_pruner
from slimkit.quant.methods.base import output_error
from slimkit.quant.obs import Sparsity, collect_hessians, inverse_factor, obs_sweep
from slimkit.quant.quantizer import QuantizedWeight, QuantSpec, trivial_g_idx, validate_bits


@dataclass
class SparseGPTConfig(PruneConfig):
    """Example:
    >>> cfg = SparseGPTConfig(sparsity="2:4", wbits=4, group_size=64)   # 2:4 + GPTQ W4 in one pass
    >>> model, report = slimkit.prune(model, cfg, calib)  # doctest: +SKIP
    """

    damp: float = field(default=0.01, metadata={"help": "dampening, as a fraction of mean(diag H)"})
    block_size: int = field(
        default=128, metadata={"help": "columns per mask-selection / lazy-update block"}
    )
    wbits: int = field(
        default=16, metadata={"help": "quantize in the same sweep to this many bits (16 = no)"}
    )
    group_size: int = field(
        default=-1, metadata={"help": "quantization group size (-1 = per output channel)"}
    )
    sym: bool = field(default=False, metadata={"help": "symmetric quantization grid"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise SlimkitError(f"--damp must be > 0 (got {self.damp})")
        if self.wbits != 16:
            validate_bits(self.wbits, "--wbits")
            QuantSpec(self.wbits, self.group_size, self.sym)

    def quant_spec(self) -> QuantSpec | None:
        return None if self.wbits == 16 else QuantSpec(self.wbits, self.group_size, self.sym)

    def scheme(self) -> str:
        q = (
            ""
            if self.wbits == 16
            else f" + W{self.wbits}" + ("" if self.group_size == -1 else f"g{self.group_size}")
        )
        return super().scheme() + q


def sparsegpt_prune_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    sparsity: Sparsity,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    spec: QuantSpec | None = None,
):
    """Returns (pruned and updated weight, QuantizedWeight or None)."""
    if spec is not None:
        spec.check_width(w.shape[1])
    W, Hinv, _ = inverse_factor(
        w, H, damp=damp, act_order=False
    )  # N:M groups need the original order
    res = obs_sweep(W, Hinv, block_size=block_size, spec=spec, sparsity=sparsity)
    qw = None
    if spec is not None:
        qw = QuantizedWeight(
            codes=res.codes.to(torch.uint8).cpu(),
            scale=res.scale.cpu(),
            zero=res.zero.cpu(),
            g_idx=trivial_g_idx(w.shape[1], spec.group_size),
            spec=spec,
        )
    return res.values, qw


@register_pruner(
    "sparsegpt",
    SparseGPTConfig,
    help="SparseGPT: OBS pruning with weight update (+ joint quantization)",
)
class SparseGPT(PruneMethod):
    config: SparseGPTConfig

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        spec = self.config.quant_spec()
        for b in win.block_ids:
            src = win.inputs_of(b)
            linears = win.named_linears(b)
            prefix = f"{pipe.bmap.blocks}.{b}."
            groups = [
                {prefix + r: linears[prefix + r] for r in g if prefix + r in linears}
                for g in pipe.bmap.sequential
            ]
            hessians = collect_hessians(
                pipe, pipe.blocks[b], src, groups
            )  # one pass, as the reference
            for name, m in linears.items():
                H = hessians[name]
                w = weight_of(m, pipe.bmap.transposed).detach().clone().float()
                w_new, qw = sparsegpt_prune_weight(
                    w,
                    H,
                    self.sparsity,
                    damp=self.config.damp,
                    block_size=self.config.block_size,
                    spec=spec,
                )
                dist.broadcast(w_new)  # every rank keeps rank 0's result, bit for bit
                if qw is not None:
                    for t in (qw.codes, qw.scale, qw.zero):
                        dist.broadcast(t)
                    pipe.records[name] = qw
                    w_new = qw.dequantize().to(w_new)
                self.apply(pipe, win.index, name, m, w_new, out_err=output_error(w, w_new, H))
