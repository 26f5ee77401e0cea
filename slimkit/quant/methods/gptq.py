"""GPTQ (Frantar et al., arXiv 2210.17323), following IST-DASLab/gptq ``gptq.py``.

Per linear: H = 2/n sum x x^T over the calibration tokens entering it; dead inputs zeroed;
optional act-order (descending diag H); dampening lambda * mean(diag H); upper Cholesky factor
of H^-1; a column sweep in blocks of B columns that quantizes one column at a time and spreads
its error onto the not-yet-quantized columns. Group parameters are fit on the current, already
updated columns of the group (or, with ``static_groups``, on the original weight beforehand).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import get_module, weight_of
from slimkit.llm.pipeline import Window
from slimkit.quant.methods.base import QuantConfig, WeightQuantMethod, output_error, register_method
from slimkit.quant.quantizer import QuantizedWeight, QuantSpec, fit_params, quantize


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
        default=False, metadata={"help": "fit group scales on the original weight before the sweep"}
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
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given the input Hessian ``H`` (in, in); returns the integer form."""
    W = w.detach().clone().float()
    H = H.detach().clone().float()
    rows, cols = W.shape
    g = spec.group_size
    if g == 0:
        raise SlimkitError("GPTQ needs per-channel (-1) or grouped weights, not per-tensor (0)")
    spec.check_width(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = None
    if g > 0 and static_groups:
        groups = fit_params(W, spec)  # (rows, cols // g) each, on the original columns
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise SlimkitError("GPTQ: the Hessian is not positive definite; increase --damp") from None

    codes = torch.zeros_like(W)
    n_groups = 1 if g == -1 else cols // g
    scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)
    zero = torch.zeros_like(scale)
    if g == -1:
        s, z = fit_params(W, spec)
        scale[:, :1], zero[:, :1] = s, z
    if groups is not None:
        scale, zero = groups[0].clone(), groups[1].clone()

    with (
        _single_thread()
    ):  # tiny per-column ops: extra threads only spin (50x slower if cores are busy)
        _sweep(W, Hinv, codes, scale, zero, spec, groups, perm, block_size)

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
        scale=scale.cpu(),
        zero=zero.cpu(),
        g_idx=g_idx.cpu(),
        spec=spec,
    )


def _sweep(W, Hinv, codes, scale, zero, spec: QuantSpec, groups, perm, block_size: int) -> None:
    """GPTQ's column sweep, in place on W (error feedback) and codes / scale / zero."""
    rows, cols = W.shape
    g = spec.group_size
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if g == -1:
                s, z = scale[:, 0], zero[:, 0]
            elif groups is not None:
                orig = int(perm[c]) if perm is not None else c
                s, z = scale[:, orig // g], zero[:, orig // g]
            else:
                if c % g == 0:  # fit on the current (already updated) columns of the group
                    cur = (
                        torch.cat([W1[:, i : i + g], W[:, i2 : c + g]], dim=1)
                        if c + g > i2
                        else W1[:, i : i + g]
                    )
                    s_, z_ = fit_params(cur, QuantSpec(spec.bits, -1, spec.sym, spec.clip))
                    scale[:, c // g], zero[:, c // g] = s_[:, 0], z_[:, 0]
                s, z = scale[:, c // g], zero[:, c // g]
            col = W1[:, i]
            q = quantize(col, s, z, spec.bits)
            codes[:, c] = q
            deq = s * (q - z)
            err = (col - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


@contextlib.contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class HessianAccumulator:
    """Sum of x x^T: fp32 per batch, accumulated in fp64 so that the sum over batches (and over
    ranks under torchrun) does not depend on the order, and sharded runs match one process."""

    def __init__(self, cols: int, device: torch.device):
        self.H = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.H += (x.T @ x).double()  # fp32 per batch, fp64 across batches and ranks
        self.n += x.shape[0]

    def finish(self, pipe) -> torch.Tensor:
        pipe.all_reduce_sum(self.H)
        pipe.all_reduce_sum(self.n)
        return (2 / self.n.clamp(min=1) * self.H).float()


@register_method("gptq", GPTQConfig, help="GPTQ: Hessian-aware column-wise quantization")
class GPTQ(WeightQuantMethod):
    config: GPTQConfig

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        for b in win.block_ids:
            self.attach_activation_quantizers(win, b)
            block = pipe.blocks[b]
            src = win.inputs_q if b == win.block_ids[0] else self._inputs_of(win, b)
            linears = win.named_linears(b)
            prefix = f"{pipe.bmap.blocks}.{b}."
            groups = (
                pipe.bmap.sequential
                if self.config.true_sequential
                else (tuple(pipe.bmap.linears()),)
            )
            for group in groups:
                mods = {prefix + rel: get_module(block, rel) for rel in group}
                mods = {n: m for n, m in mods.items() if m is not None and n in linears}
                acc = {
                    n: HessianAccumulator(weight_of(m, pipe.bmap.transposed).shape[1], pipe.device)
                    for n, m in mods.items()
                }
                pipe.collect([block], src, mods, lambda n, x, acc=acc: acc[n].add(x))
                for n, m in mods.items():
                    H = acc[n].finish(pipe)
                    w = (
                        weight_of(m, pipe.bmap.transposed).detach().clone().float()
                    )  # the write below is in place
                    qw = gptq_quantize(
                        w,
                        H,
                        self.wspec,
                        damp=self.config.damp,
                        block_size=self.config.block_size,
                        act_order=self.config.act_order,
                        static_groups=self.config.static_groups,
                    )
                    for t in (qw.codes, qw.scale, qw.zero, qw.g_idx):
                        dist.broadcast(t)  # every rank keeps rank 0's result, bit for bit
                    self.write(pipe, n, m, qw)
                    pipe.log.append(
                        {
                            "window": win.index,
                            "layer": n,
                            "out_err": output_error(w, qw.dequantize().to(w.device), H),
                        }
                    )
