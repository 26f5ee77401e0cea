"""Second-order (OBS-style) weight updates shared by GPTQ and SparseGPT.

Both methods sweep the columns of a linear's weight in the order of the input Hessian's
inverse Cholesky factor: each column is replaced by a target value (its quantized value, its
pruned value, or both) and the error is spread onto the columns not yet visited, in blocks of
B columns with lazy updates (Frantar et al., GPTQ arXiv 2210.17323; SparseGPT arXiv 2301.00774).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from slimkit.core.errors import SlimkitError
from slimkit.quant.quantizer import QuantSpec, dequantize_on, fit_params, quantize_on


class HessianAccumulator:
    """H = 2/n sum x x^T over the n tokens entering a linear.

    Each batch is multiplied in fp32 and added into an fp64 sum, so the sum over batches (and
    over ranks under torchrun) does not depend on the order: sharded runs match one process.
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.H += (x.T @ x).double()
        self.n += x.shape[0]

    def finish(self, pipe=None) -> torch.Tensor:
        if pipe is not None:
            pipe.all_reduce_sum(self.H)
            pipe.all_reduce_sum(self.n)
        return (2 / self.n.clamp(min=1) * self.H).float()


def collect_hessians(pipe, block, src, groups: list[dict]) -> dict:
    """One Hessian per group of linears that read the same input (q/k/v, gate/up), in one
    forward pass over ``src``; returns {linear name: H} (all-reduced across ranks).

    ``groups``: list of {name: module} whose members share their input.
    """
    first = {next(iter(g)): g[next(iter(g))] for g in groups if g}
    acc = {
        n: HessianAccumulator(
            m.weight.shape[1] if not pipe.bmap.transposed else m.weight.shape[0], pipe.device
        )
        for n, m in first.items()
    }
    pipe.collect([block], src, first, lambda n, x: acc[n].add(x))
    out = {}
    for g in groups:
        if g:
            H = acc[next(iter(g))].finish(pipe)
            out.update({n: H for n in g})
    return out


@dataclass(frozen=True)
class Sparsity:
    """Unstructured ratio (``ratio``) or N:M (keep ``n`` of every ``m`` consecutive inputs)."""

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @staticmethod
    def parse(text: str | float) -> Sparsity:
        """``"0.5"`` -> 50 % unstructured; ``"2:4"`` -> keep 2 of every 4 (50 %)."""
        s = str(text).strip()
        if ":" in s:
            try:
                n, m = (int(x) for x in s.split(":"))
            except ValueError:
                raise SlimkitError(f"sparsity {s!r} is not N:M with integers (e.g. 2:4)") from None
            if not 0 < n < m:
                raise SlimkitError(f"N:M sparsity needs 0 < N < M (got {s})")
            return Sparsity(ratio=1 - n / m, n=n, m=m)
        try:
            r = float(s)
        except ValueError:
            raise SlimkitError(
                f"sparsity {s!r} is neither a ratio in [0, 1) nor N:M (e.g. 0.5, 2:4)"
            ) from None
        if not 0 <= r < 1:
            raise SlimkitError(f"sparsity ratio must be in [0, 1) (got {r})")
        return Sparsity(ratio=r)


def inverse_factor(
    W: torch.Tensor, H: torch.Tensor, *, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dead inputs zeroed, optional act-order permutation, dampening, and the upper Cholesky
    factor of H^-1. Returns (W in sweep order, Hinv factor, permutation or None)."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    if not bool(torch.isfinite(H).all()):  # no dampening repairs NaN / Inf inputs
        raise SlimkitError(
            "the calibration inputs of a layer are not finite (NaN/Inf in its Hessian): the "
            "model's weights or its activations on the calibration data overflow; check the "
            "model (slimkit eval --ppl ...) before compressing it"
        )
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        # callers without a --damp flag reach here too (CBQ's GPTQ starting point): name both
        raise SlimkitError(
            f"the Hessian of a layer is not positive definite after dampening by {damp} x its "
            "mean diagonal: raise --damp (gptq, sparsegpt), or for cbq start the rounding from "
            "round-to-nearest (--rounding-init nearest)"
        ) from None
    return W, Hinv, perm


@dataclass
class SweepResult:
    values: torch.Tensor  # (rows, cols) final weight in sweep order
    codes: torch.Tensor | None  # integer codes in sweep order (if quantized)
    scale: torch.Tensor | None  # (rows, groups)
    zero: torch.Tensor | None
    pruned: torch.Tensor  # bool (rows, cols): entries set to zero by the sparsity rule


def obs_sweep(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    *,
    block_size: int = 128,
    spec: QuantSpec | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    perm: torch.Tensor | None = None,
    sparsity: Sparsity | None = None,
    keep_zero: torch.Tensor | None = None,
) -> SweepResult:
    """The column sweep, in place on ``W`` (already in sweep order).

    Args:
        spec: quantize every column on this grid (GPTQ); None = no quantization.
        groups: static group parameters (scale, zero), indexed by the original column's group.
        perm: the act-order permutation (sweep position -> original column), for static groups.
        sparsity: choose a mask adaptively (SparseGPT): per block of columns for a ratio (score
            w^2 / Hinv_jj^2, lowest pruned jointly over the block), per group of M columns for N:M.
        keep_zero: bool (rows, cols) in sweep order: entries forced to zero (a mask from an
            earlier pruning step that quantization must keep).
    """
    rows, cols = W.shape
    g = spec.group_size if spec is not None else None
    if spec is not None:
        n_groups = 1 if g == -1 else cols // g
        scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)
        zero = torch.zeros_like(scale)
        codes = torch.zeros_like(W)
        if g == -1:
            s, z = fit_params(W * ~keep_zero if keep_zero is not None else W, spec)
            scale[:, :1], zero[:, :1] = s, z
        if groups is not None:
            scale, zero = groups[0].clone(), groups[1].clone()
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    if sparsity is not None and sparsity.is_nm and cols % sparsity.m:
        raise SlimkitError(f"N:M sparsity needs M={sparsity.m} to divide the input width {cols}")
    masking = sparsity is not None or keep_zero is not None
    with (
        _single_thread()
    ):  # tiny per-column ops: extra threads only spin (50x slower if cores are busy)
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if keep_zero is not None:
                mask1 |= keep_zero[:, i1:i2]
            if sparsity is not None and not sparsity.is_nm and sparsity.ratio > 0:
                score = W1**2 / d.unsqueeze(0) ** 2
                k = int(score.numel() * sparsity.ratio)
                if k > 0:
                    thresh = torch.kthvalue(score.flatten(), k).values
                    mask1 |= score <= thresh
            for i in range(i2 - i1):
                c = i1 + i
                if sparsity is not None and sparsity.is_nm and c % sparsity.m == 0:
                    score = W1[:, i : i + sparsity.m] ** 2 / d[i : i + sparsity.m].unsqueeze(0) ** 2
                    drop = torch.topk(score, sparsity.m - sparsity.n, dim=1, largest=False).indices
                    mask1.scatter_(1, i + drop, True)
                col = W1[:, i]
                q = col.masked_fill(mask1[:, i], 0.0) if masking else col
                if spec is not None:
                    if g > 0 and groups is None and c % g == 0:
                        # fit on the current, already updated columns of the group (masked as known)
                        cur = W1[:, i : i + g]
                        if masking:
                            cur = cur.masked_fill(mask1[:, i : i + g], 0.0)
                        if c + g > i2:
                            cur = torch.cat([cur, W[:, i2 : c + g]], dim=1)
                        s_, z_ = fit_params(cur, QuantSpec(spec.bits, -1, spec.sym, spec.clip))
                        scale[:, c // g], zero[:, c // g] = s_[:, 0], z_[:, 0]
                    if g == -1:
                        s, z = scale[:, 0], zero[:, 0]
                    elif groups is not None:
                        orig = int(perm[c]) if perm is not None else c
                        s, z = scale[:, orig // g], zero[:, orig // g]
                    else:
                        s, z = scale[:, c // g], zero[:, c // g]
                    qc = quantize_on(q, s, z, spec)
                    codes[:, c] = qc
                    # pruned entries stay exactly 0: 0 is on every uniform grid (a GGUF grid
                    # with minimums may lack it, keep_zero then gets the nearest value)
                    q = dequantize_on(qc, s, z, spec)
                err = (col - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err
            pruned[:, i1:i2] = mask1 if keep_zero is None else mask1 & ~keep_zero[:, i1:i2]
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if spec is None:
        return SweepResult(W, None, None, None, pruned)
    return SweepResult(W, codes, scale, zero, pruned)


@contextlib.contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
