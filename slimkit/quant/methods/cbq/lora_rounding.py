"""CBQ's learnable weight quantizer: clipping factors that set the step size and zero point, and
the rounding parameterisation (LoRA-Rounding: rounding logits ``V0 + A1 A2``; AdaRound's full
logits; or round-to-nearest with a straight-through gradient), hardened to integer codes when a
block is finalized."""

from __future__ import annotations

import math

import torch
from torch import nn

from slimkit.quant.quantizer import (
    QuantizedWeight,
    QuantSpec,
    _grouped,
    dequantize_on,
    fit_grid,
    trivial_g_idx,
)

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def _group_range(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per row group, widened to include 0; all-zero groups get [-1, 1]."""
    x = _grouped(w.float(), spec)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    dead = (lo == 0) & (hi == 0)
    return torch.where(dead, -torch.ones_like(lo), lo), torch.where(dead, torch.ones_like(hi), hi)


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.floor(x) - x).detach() + x


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rounding_logits(frac: torch.Tensor) -> torch.Tensor:
    """V* with h(V*) = frac (clipped to +-6), AdaRound's initialisation."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p)).clamp(-6, 6)


class LinearQuantizer(nn.Module):
    """Learnable weight quantizer of one linear (fp32): clipping factors per output channel or
    group, and rounding logits (LoRA pair, full matrix, or none).

    ``weight(w, hard)`` returns the fake-quantized weight (out, in); ``hard=True`` uses hardened
    rounding and equals ``harden(w).dequantize()`` exactly.

    On a GGUF grid (``spec.grid``) the scales are llama.cpp's (fp16 super-block scales, integer
    sub-block scales and mins), fit on the current weight as RTN fits them; the clipping factors
    are not used (the grid has no free float range) and only the rounding (and the migration
    scales upstream) are learned.
    """

    def __init__(
        self,
        w: torch.Tensor,
        spec: QuantSpec,
        rounding: str,
        rank: int,
        lora_init: str = "residual",
        range_w: torch.Tensor | None = None,
        init: bool = True,
        soft: bool = False,
        start: QuantizedWeight | None = None,
        generator: torch.Generator | None = None,
        exact_range: bool = False,
    ):
        super().__init__()
        self.spec, self.rounding = spec, rounding
        self.soft = soft
        out, inp = w.shape
        # clipping factors: hi = sigmoid(up) * max, lo = sigmoid(low) * min of the current weight
        # (ranges follow the weight, so migration scales can change it). Start: the range of
        # ``range_w`` (CFP's truncated or AWQ's clipped copy) capped at OmniQuant's sigmoid(4) =
        # 0.982, or at sigmoid(8) = 0.9997 (trainable, nearly exact) with GPTQ's codes (computed
        # on the min-max grid of ``range_w``, else of ``w``) or an ``exact_range``.
        lo, hi = _group_range(w, spec)
        logit0 = 8.0 if start is not None or exact_range else 4.0
        up0 = torch.full_like(hi, logit0)
        low0 = torch.full_like(lo, logit0)
        if range_w is not None:
            rlo, rhi = _group_range(range_w, spec)
            cap = torch.sigmoid(torch.tensor(logit0))
            ratio_hi = torch.where(hi > 0, rhi / hi.clamp(min=1e-30), torch.ones_like(hi))
            ratio_lo = torch.where(lo < 0, rlo / lo.clamp(max=-1e-30), torch.ones_like(lo))
            up0 = torch.logit(ratio_hi.clamp(1e-3, cap))
            low0 = torch.logit(ratio_lo.clamp(1e-3, cap))
        self.up = nn.Parameter(up0)
        self.low = nn.Parameter(low0)
        r = min(rank, out, inp)
        if rounding == "lora":
            self.a1 = nn.Parameter(torch.zeros(out, r, device=w.device))
            self.a2 = nn.Parameter(torch.zeros(r, inp, device=w.device))
            self.register_buffer("v0", torch.zeros(out, inp, device=w.device))
        elif rounding == "full":
            self.v = nn.Parameter(torch.zeros(out, inp, device=w.device))
        if not init or rounding == "nearest":
            return
        with torch.no_grad():
            x, _, _, _ = self._scaled(w)
            frac = x.reshape(out, inp)
            v_star = rounding_logits(frac - torch.floor(frac))
            self.start_mismatch = 0.0
            if start is not None:  # h = 1 where GPTQ rounded up; margin = distance from 1/2
                x, _, _, shift = self._scaled(w)
                codes = _grouped(start.codes.to(w.device).float(), spec)
                d = (codes - shift - torch.floor(x)).reshape(out, inp)
                self.start_mismatch = float(((d < 0) | (d > 1)).float().mean())
                v_star = torch.where(d >= 1, 1.0, -1.0) * v_star.abs().clamp(min=0.5)
            if rounding == "full":
                self.v.copy_(v_star)
            elif lora_init == "residual":
                self.v0.copy_(v_star)
            elif lora_init == "svd":
                u, sv, vh = torch.linalg.svd(v_star, full_matrices=False)
                root = sv[:r].sqrt()
                self.a1.copy_(u[:, :r] * root)
                self.a2.copy_(root[:, None] * vh[:r])
            if lora_init != "svd" and rounding == "lora":  # A1 small random, A2 = 0: V = V0
                a1 = torch.randn(out, r, generator=generator) / math.sqrt(r)
                self.a1.copy_(a1.to(self.a1.device))

    def n_round_params(self) -> int:
        if self.rounding == "lora":
            return self.a1.numel() + self.a2.numel()
        return self.v.numel() if self.rounding == "full" else 0

    def _grid(self, w: torch.Tensor):
        with torch.no_grad():
            return fit_grid(w.detach().float(), self.spec)

    def _super(self, w: torch.Tensor) -> torch.Tensor | None:
        sup = self._grid(w).super if self.spec.grid else None
        return None if sup is None else sup.cpu()

    def scale_zero(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.grid:  # (out, groups, 1): S and Z (or the offset M) of the stored grid
            p = self._grid(w)
            return p.scale[..., None], p.zero[..., None]
        qmax = self.spec.qmax
        lo, hi = _group_range(w, self.spec)
        hi = torch.sigmoid(self.up) * hi
        lo = torch.sigmoid(self.low) * lo
        if self.spec.sym:
            amax = torch.maximum(hi, -lo)
            s = (2 * amax / qmax).clamp(min=1e-8)
            return s, torch.full_like(s, (qmax + 1) / 2)
        s = ((hi - lo) / qmax).clamp(min=1e-8)
        z = torch.clamp(_round_ste(-lo / s), 0, qmax)
        return s, z

    def h(self) -> torch.Tensor | None:
        if self.rounding == "lora":
            return rectified_sigmoid(self.v0 + self.a1 @ self.a2)
        if self.rounding == "full":
            return rectified_sigmoid(self.v)
        return None

    def _scaled(self, w: torch.Tensor):
        """(w on the code axis before the shift, scale, zero, shift): codes = round(x) + shift."""
        s, z = self.scale_zero(w)
        wg = _grouped(w.float(), self.spec)
        if not self.spec.grid:
            return wg / s, s, z, z
        safe = torch.where(s != 0, s, torch.ones_like(s))  # a dead sub-block: any code, same value
        if self.spec.offset_form:  # w = S q - M
            return (wg + z) / safe, s, z, torch.zeros_like(z)
        return wg / safe, s, z, z

    def codes(self, w: torch.Tensor, hard: bool) -> tuple[torch.Tensor, ...]:
        """(codes (grouped, float, soft unless hard), scale, zero)."""
        x, s, z, shift = self._scaled(w)
        h = self.h()
        if h is None:
            q = torch.round(x) if hard else _round_ste(x)
        else:
            h = h.reshape(x.shape)
            hard_h = (h >= 0.5).to(x.dtype)
            if hard:
                q = torch.floor(x) + hard_h
            elif self.soft:
                q = _floor_ste(x) + h
            else:  # hardened forward, gradient into h (straight-through)
                q = _floor_ste(x) + (hard_h - h).detach() + h
        return torch.clamp(q + shift, 0, self.spec.qmax), s, z

    def weight(self, w: torch.Tensor, hard: bool = False) -> torch.Tensor:
        q, s, z = self.codes(w, hard)
        return dequantize_on(q, s, z, self.spec).reshape(w.shape)

    def reg(self, beta: float) -> torch.Tensor:
        """Mean of AdaRound's 1 - |2h - 1|^beta over the weights (0 once h is binary)."""
        h = self.h()
        if h is None:
            return torch.zeros((), device=self.up.device)
        return (1 - (2 * h - 1).abs().pow(beta)).mean()

    @torch.no_grad()
    def harden(self, w: torch.Tensor) -> QuantizedWeight:
        q, s, z = self.codes(w, hard=True)
        out, inp = w.shape
        g = self.spec.group_size
        return QuantizedWeight(
            codes=q.reshape(out, inp).to(torch.uint8).cpu(),
            scale=s.reshape(s.shape[0], -1).cpu(),
            zero=z.reshape(z.shape[0], -1).cpu(),
            g_idx=trivial_g_idx(inp, g),
            spec=self.spec,
            super_scale=self._super(w),
        )

    @torch.no_grad()
    def soft_fraction(self) -> float:
        """Share of rounding values not yet binary (|h - 0.5| < 0.49)."""
        h = self.h()
        return 0.0 if h is None else float(((h - 0.5).abs() < 0.49).float().mean())
