"""GPTQ (Frantar et al., arXiv 2210.17323), following IST-DASLab/gptq ``gptq.py``.

Per linear: H = 2/n sum x x^T over the calibration tokens entering it; dead inputs zeroed;
optional act-order (descending diag H); dampening lambda * mean(diag H); upper Cholesky factor
of H^-1; a column sweep in blocks of B columns that quantizes one column at a time and spreads
its error onto the not-yet-quantized columns. Group parameters are fit on the current, already
updated columns of the group (or, with ``static_groups``, on the original weight beforehand).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import get_module, weight_of
from slimkit.llm.pipeline import Window
from slimkit.quant.methods.base import QuantConfig, WeightQuantMethod, output_error, register_method
from slimkit.quant.obs import collect_hessians, inverse_factor, obs_sweep
from slimkit.quant.quantizer import (
    QuantizedWeight,
    QuantSpec,
    fit_grid,
    fit_params,
    quantize_weight,
)


@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ options on top of the shared quantization fields.

    Example:
        >>> cfg = GPTQConfig(wbits=4, group_size=64, act_order=True)
        >>> model, report = slimkit.quantize(model, cfg, calib)  # doctest: +SKIP
    """

    damp: float = field(default=0.01, metadata={"help": "dampening, as a fraction of mean(diag H)"})
    block_size: int = field(default=128, metadata={"help": "columns per lazy-update block"})
    act_order: bool = field(
        default=True, metadata={"help": "quantize columns by descending diag(H)"}
    )
    static_groups: bool = field(
        default=True,
        metadata={
            "help": "fit group scales on the original weight before the sweep, so groups stay consecutive "
            "columns (exportable to every format); --no-static-groups gives GPTQ's dynamic act-order "
            "groups (a g_idx: GPTQ export only)"
        },
    )
    keep_zeros: bool = field(
        default=False,
        metadata={"help": "weights that are exactly zero stay zero (quantizing a pruned model)"},
    )
    true_sequential: bool = field(
        default=True,
        metadata={"help": "quantize q/k/v, then o, then gate/up, then down, re-running the block"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise SlimkitError(f"--damp must be > 0 (got {self.damp})")
        if self.block_size < 1:
            raise SlimkitError(f"--block-size must be >= 1 (got {self.block_size})")


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = False,
    keep_zero: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given the input Hessian ``H`` (in, in); returns the integer form.

    ``keep_zero``: bool (out, in) of entries that must stay exactly zero (a pruning mask).

    On a GGUF grid (``spec.grid``) every scale is fixed before the sweep: the super-block and
    sub-block scales (and mins) are fit on the original weight, as static groups, because a
    K-quant's super-block scale depends on all 256 columns of the block while the sweep changes
    them one at a time; the sweep then chooses the codes on that fixed, stored grid.
    """
    cols = w.shape[1]
    g = spec.group_size
    if g == 0:
        raise SlimkitError("GPTQ needs per-channel (-1) or grouped weights, not per-tensor (0)")
    spec.check_width(cols)
    if not bool(torch.diagonal(H).any()):  # no input reached it (an expert no token was routed
        return quantize_weight(w.float(), spec)  # to): nothing to weigh, round to nearest
    groups, sup = None, None
    w0 = w.float() * ~keep_zero if keep_zero is not None else w.float()
    if spec.grid:
        p = fit_grid(w0, spec)
        groups, sup = (p.scale, p.zero), p.super
    elif g > 0 and static_groups:  # (rows, cols // g) each, on the original columns
        groups = fit_params(w0, spec)
    W, Hinv, perm = inverse_factor(w, H, damp=damp, act_order=act_order)
    if keep_zero is not None and perm is not None:
        keep_zero = keep_zero[:, perm]
    res = obs_sweep(
        W, Hinv, block_size=block_size, spec=spec, groups=groups, perm=perm, keep_zero=keep_zero
    )
    codes = res.codes
    # group of each column: by original position with static groups, else by sweep position
    g_idx = (
        torch.zeros(cols, dtype=torch.int32)
        if g == -1
        else (torch.arange(cols) // g).to(torch.int32)
    )
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if groups is None and g > 0:
            g_idx = g_idx[inv.cpu()]
    return QuantizedWeight(
        codes=codes.to(torch.uint8).cpu(),
        scale=res.scale.cpu(),
        zero=res.zero.cpu(),
        g_idx=g_idx.cpu(),
        spec=spec,
        super_scale=None if sup is None else sup.cpu(),
    )


@register_method("gptq", GPTQConfig, help="GPTQ: Hessian-aware column-wise quantization")
class GPTQ(WeightQuantMethod):
    config: GPTQConfig

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        for b in win.block_ids:
            self.attach_activation_quantizers(win, b)
            block = pipe.blocks[b]
            src = win.inputs_of(b)
            linears = win.named_linears(b)
            prefix = f"{pipe.bmap.blocks}.{b}."
            shared = [
                {prefix + rel: get_module(block, rel) for rel in group if prefix + rel in linears}
                for group in pipe.bmap.sequential
            ]
            # true-sequential: one group of shared-input linears at a time, each calibrated on
            # inputs produced by the already-quantized earlier groups; otherwise all at once
            passes = [[g] for g in shared] if self.config.true_sequential else [shared]
            for groups in passes:
                hessians = collect_hessians(pipe, block, src, groups)
                mods = {n: m for g in groups for n, m in g.items()}
                for n, m in mods.items():
                    H = hessians[n]
                    w = (
                        weight_of(m, pipe.bmap.transposed).detach().clone().float()
                    )  # the write below is in place
                    qw = gptq_quantize(
                        w,
                        H,
                        self.spec_of(m),
                        damp=self.config.damp,
                        block_size=self.config.block_size,
                        act_order=self.config.act_order,
                        static_groups=self.config.static_groups,
                        keep_zero=(w == 0) if self.config.keep_zeros else None,
                    )
                    extra = () if qw.super_scale is None else (qw.super_scale,)
                    for t in (qw.codes, qw.scale, qw.zero, qw.g_idx, *extra):
                        dist.broadcast(t)  # every rank keeps rank 0's result, bit for bit
                    self.write(pipe, n, m, qw)
                    entry = {
                        "window": win.index,
                        "layer": n,
                        "out_err": output_error(w, qw.dequantize().to(w.device), H),
                    }
                    if not bool(torch.diagonal(H).any()):
                        entry["rtn_fallback"] = "no calibration token reached it"
                    pipe.log.append(entry)
