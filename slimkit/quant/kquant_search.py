"""llama.cpp's K-quant scale search (its reference quantizer, no importance matrix), vectorised.

llama.cpp's ``llama_model_quantize`` without an importance matrix quantizes each K-quant tensor
with ``quantize_row_qN_K_ref`` (ggml-quants.c). Those functions do not take a sub-block's range
as its scale: they search it.

- Q2_K, Q4_K and Q5_K (scale and min per sub-block): ``make_qkx2_quants`` tries ``nstep + 1``
  candidate steps ``(nmax + rmin + rdelta * is) / (max - min)``. For each candidate it fits the
  scale and min by weighted least squares on the codes that step gives. It keeps the best fit by
  weighted squared (Q4_K / Q5_K) or absolute (Q2_K) error. The weights are ``|x|`` for Q2_K and
  ``rms(x) + |x|`` for the others. A search that moves the min also moves later candidates,
  exactly as in the C loop.
- Q3_K: ``make_q3_quants`` rounds at the step that puts the largest magnitude on code -4. It then
  moves single codes for up to five passes while the weighted (x^2) least-squares fit improves.
- Q6_K: ``make_qx_quants`` (rmse type 1) tries 19 steps ``-(32 + 0.1 is) / max`` and keeps the
  least-squares scale of the best one.

Each super-block then quantizes the float sub-block scales (and mins) against the largest one,
stores d (and dmin) in fp16, and rounds the weights to the resulting grid. The last step is
:func:`slimkit.quant.gguf_grids.quantize_codes`. This module returns the grid, so every method
(RTN, GPTQ, AWQ, CBQ) starts from the grid llama.cpp would store.

Every sum is accumulated element by element in fp32, in the C loop's order, and the constants are
rounded to fp32 where the C code rounds them. So on the same fp32 input the grid is llama.cpp's
except where its compiler fuses a multiply-add (FMA) and a candidate's error ties to the last bit.
``tests/test_kquant_search.py`` measures how often that happens against llama.cpp's own file.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32


def _seq_sum(terms) -> torch.Tensor:
    """Sum of the (N,) tensors of ``terms`` in order (the C loop's fp32 accumulation)."""
    it = iter(terms)
    acc = next(it).clone()
    for t in it:
        acc = acc + t
    return acc


def _err(d: torch.Tensor, use_mad: bool) -> torch.Tensor:
    return d.abs() if use_mad else d * d


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The first element of largest magnitude per row, sign kept (C: ``if (ax > amax)``)."""
    return x.gather(1, x.abs().argmax(1, keepdim=True)).squeeze(1)


def make_qkx2(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` on every row of ``x`` (N, n) with weights ``w``: (scale, -min)."""
    n = x.shape[1]
    mx = x.max(1).values
    mn = torch.clamp(x.min(1).values, max=0.0)
    sum_w = _seq_sum(w[:, i] for i in range(n))
    sum_x = _seq_sum(w[:, i] * x[:, i] for i in range(n))
    flat = mx == mn
    iscale = torch.tensor(F32(nmax)) / torch.where(flat, torch.ones_like(mx), mx - mn)
    scale = 1 / iscale
    L = torch.clamp(torch.round(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = _seq_sum(w[:, i] * _err(scale * L[:, i] + mn - x[:, i], use_mad) for i in range(n))
    for step in range(nstep + 1):
        c = F32(F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)
        iscale = torch.tensor(c) / (mx - mn)
        La = torch.clamp(torch.round(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        wl = [w[:, i] * La[:, i] for i in range(n)]
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl[i] * La[:, i] for i in range(n))
        sum_xl = _seq_sum(wl[i] * x[:, i] for i in range(n))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = _seq_sum(
            w[:, i] * _err(this_scale * La[:, i] + this_min - x[:, i], use_mad) for i in range(n)
        )
        upd = (D > 0) & (cur < best) & ~flat
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
        best = torch.where(upd, cur, best)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn


def make_q3(x: torch.Tensor, nmax: int = 4) -> torch.Tensor:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every row of ``x``: the scale."""
    n = x.shape[1]
    mx = _signed_absmax(x)
    live = mx.abs() >= 1e-15
    iscale = torch.where(
        live, torch.tensor(F32(-nmax)) / torch.where(live, mx, torch.ones_like(mx)), 0
    )
    L = torch.clamp(torch.round(iscale[:, None] * x), -nmax, nmax - 1)
    wx = x * x
    sumlx = _seq_sum(wx[:, i] * x[:, i] * L[:, i] for i in range(n))
    suml2 = _seq_sum(wx[:, i] * L[:, i] * L[:, i] for i in range(n))
    for _ in range(5):
        changed = torch.zeros_like(live)
        for i in range(n):
            xi, wi, li = x[:, i], wx[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = torch.clamp(torch.round(xi * sl2 / slx), -nmax, nmax - 1)
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            take = (
                (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            )
            L[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), 0)
    return torch.where(live, scale, torch.zeros_like(scale))


def make_qx_rmse1(x: torch.Tensor, nmax: int = 32) -> torch.Tensor:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on every row of ``x``: the scale."""
    n = x.shape[1]
    mx = _signed_absmax(x)
    live = mx.abs() >= 1e-15
    safe = torch.where(live, mx, torch.ones_like(mx))
    wx = x * x

    def sums(iscale):
        L = torch.clamp(torch.round(iscale[:, None] * x), -nmax, nmax - 1)
        slx = _seq_sum(wx[:, i] * x[:, i] * L[:, i] for i in range(n))
        sl2 = _seq_sum(wx[:, i] * L[:, i] * L[:, i] for i in range(n))
        return slx, sl2

    sumlx, suml2 = sums(torch.tensor(F32(-nmax)) / safe)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1), 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = -(F32(nmax) + F32(F32(0.1) * F32(step)))
        slx, sl2 = sums(torch.tensor(F32(c)) / safe)
        upd = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / torch.where(sl2 > 0, sl2, 1)
        scale = torch.where(upd, new_scale, scale)
        best = torch.where(upd, new_scale * slx, best)
    return torch.where(live, scale, torch.zeros_like(scale))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def fit_reference(w: torch.Tensor, name: str):
    """llama.cpp's reference grid of ``w`` (out, in) on K-quant type ``name``: (S, Z-or-M,
    super) in :class:`slimkit.quant.gguf_grids.GridParams` form."""
    from slimkit.quant.gguf_grids import QK_K, GridParams, ggml_type

    t = ggml_type(name)
    out, inp = w.shape
    x = w.float().reshape(-1, t.sub)  # one row per sub-block
    n_sub = QK_K // t.sub
    if t.offset:
        if t.name == "q2_k":
            scales, mins = make_qkx2(x, x.abs(), 3, -0.5, 0.1, 15, True)
        else:
            sum_x2 = _seq_sum(x[:, i] * x[:, i] for i in range(t.sub))
            av = torch.sqrt(sum_x2 / torch.tensor(F32(t.sub)))
            nmax, rmin, nstep = (15, -1.0, 20) if t.name == "q4_k" else (31, -0.5, 15)
            scales, mins = make_qkx2(x, av[:, None] + x.abs(), nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(-1, n_sub), mins.reshape(-1, n_sub)
        max_scale = torch.clamp(scales.max(1).values, min=0.0)
        max_min = torch.clamp(mins.max(1).values, min=0.0)
        top = torch.tensor(F32(t.sc_max))
        inv_s = torch.where(max_scale > 0, top / torch.where(max_scale > 0, max_scale, 1), 0)
        inv_m = torch.where(max_min > 0, top / torch.where(max_min > 0, max_min, 1), 0)
        sc = torch.clamp(torch.round(inv_s[:, None] * scales), 0, t.sc_max)
        m = torch.clamp(torch.round(inv_m[:, None] * mins), 0, t.sc_max)
        d, dmin = _fp16(max_scale / top), _fp16(max_min / top)
        S = (d[:, None] * sc).reshape(out, -1)
        M = (dmin[:, None] * m).reshape(out, -1)
        sup = torch.stack([d, dmin], -1).reshape(out, -1, 2)
        return GridParams(S, M, sup)
    scales = (make_q3(x) if t.name == "q3_k" else make_qx_rmse1(x)).reshape(-1, n_sub)
    max_scale = _signed_absmax(scales)
    # Q6_K: a block whose scales are all below GROUP_MAX_EPS is stored as zeros; Q3_K: if (max_scale)
    live = max_scale.abs() >= 1e-15 if t.name == "q6_k" else max_scale != 0
    iscale = torch.where(
        live,
        torch.tensor(F32(-t.sc_max)) / torch.where(live, max_scale, torch.ones_like(max_scale)),
        0,
    )
    sc = torch.clamp(torch.round(iscale[:, None] * scales), -t.sc_max, t.sc_max - 1)
    d = torch.where(live, _fp16(1 / torch.where(live, iscale, 1)), 0)
    S = (d[:, None] * sc).reshape(out, -1)
    sup = torch.stack([d, torch.zeros_like(d)], -1).reshape(out, -1, 2)
    return GridParams(S, torch.full_like(S, float(t.zero)), sup)
