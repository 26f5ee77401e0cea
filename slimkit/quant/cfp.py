"""CFP: CBQ's coarse-to-fine outlier detection (arXiv 2312.07950, Algorithm 1).

Coarse stage: values above ``Q_hi + lam1 * (Q_hi - Q_lo)`` are candidates (quantile rule; slimkit
default 20 % / 80 % as in msModelSlim's ``calcu_outlier_mask``, the paper's 25 % / 75 % is
``q_lo=0.25, q_hi=0.75``). Fine stage: sort the candidates in descending order and split them
into outliers (the first k) and the rest where ``gap(k) - lam2 * var(rest)`` is largest. One
candidate alone keeps the coarse threshold.

Uses:
- activations: per-channel max (and min, negated) of the input of each norm -> linear group;
  outlier channels get ``s_c = (max_c / max_non_outlier) ** smooth_rate`` (0.7), folded into the
  norm so the model function is unchanged;
- weights: per-input-channel max |W| decides the outlier columns; their entries are truncated
  at the largest non-outlier column max for the *initial* quantization range only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CFPParams:
    q_lo: float = 0.2
    q_hi: float = 0.8
    lam1: float = 1.5
    lam2: float = 1.0
    smooth_rate: float = 0.7


def detect_outliers(
    v: torch.Tensor, p: CFPParams = CFPParams(), *, intra: str = "rest"
) -> tuple[torch.Tensor, float]:
    """Outliers on the high side of the 1-D statistic ``v``.

    Returns (mask of outliers, threshold = largest non-outlier value; the coarse threshold when
    no value passes the coarse stage). ``intra``: whose variance the fine stage
    penalises, ``rest`` (positive side) or ``top`` (the negative side, as in msModelSlim).
    """
    v = v.detach().double().flatten()
    lo, hi = torch.quantile(v, p.q_lo), torch.quantile(v, p.q_hi)
    coarse = float(hi + p.lam1 * (hi - lo))
    cand = torch.sort(v[v > coarse], descending=True).values
    n = cand.numel()
    if n == 0 or n == v.numel():
        return torch.zeros_like(v, dtype=torch.bool), coarse
    below = float(v[v <= coarse].max())
    # split after k = 1..n candidates; k = n puts the split between the candidates and the bulk
    nxt = torch.cat([cand[1:], cand.new_tensor([below])])
    gap = cand - nxt
    cnt = torch.arange(1, n + 1, dtype=v.dtype)
    if intra == "rest":  # variance of cand[k:] (0 when empty)
        rev = cand.flip(0)
        mean = rev.cumsum(0) / cnt
        var_suffix = (rev.pow(2).cumsum(0) / cnt - mean.pow(2)).clamp(min=0).flip(0)
        var = torch.cat([var_suffix[1:], cand.new_zeros(1)])
    else:  # variance of cand[:k]
        mean = cand.cumsum(0) / cnt
        var = (cand.pow(2).cumsum(0) / cnt - mean.pow(2)).clamp(min=0)
    k = int(torch.argmax(gap - p.lam2 * var)) + 1
    thr = float(nxt[k - 1])
    return v > thr, thr


def activation_scales(
    cmax: torch.Tensor, cmin: torch.Tensor, p: CFPParams = CFPParams()
) -> torch.Tensor:
    """Per-channel divisors s >= 1 for activation outlier channels (1 elsewhere).

    ``cmax`` / ``cmin``: per-channel max and min of the activation over calibration tokens."""
    s = torch.ones_like(cmax, dtype=torch.float32)
    for stat, intra in ((cmax.float(), "rest"), (-cmin.float(), "top")):  # + side, - side
        if (stat > 0).sum() < 4:
            continue
        mask, _ = detect_outliers(stat, p, intra=intra)
        if not mask.any() or mask.all():
            continue
        ref = stat[~mask].max().clamp(min=1e-8)
        side = (stat / ref).clamp(min=1.0).pow(p.smooth_rate)
        s = torch.where(mask, torch.maximum(s, side), s)
    return s


def truncated_weight(w: torch.Tensor, p: CFPParams = CFPParams()) -> torch.Tensor:
    """A copy of ``w`` (out, in) whose outlier input columns are clipped to the largest
    non-outlier column max |W| (only used to initialise the quantization range)."""
    colmax = w.abs().amax(dim=0)
    mask, _ = detect_outliers(colmax, p)
    if not mask.any() or mask.all():
        return w.clone()
    t = float(colmax[~mask].max())
    out = w.clone()
    out[:, mask] = out[:, mask].clamp(-t, t)
    return out
