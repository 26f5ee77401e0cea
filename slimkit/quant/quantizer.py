"""Uniform affine quantization of weights and activations.

Codes are unsigned integers with an integer zero point (exporters convert to signed codes):

    q = clamp(round(x / s) + z, 0, 2^b - 1),    x_hat = s * (q - z)

- asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s), with the range widened to
  include 0 (GPTQ reference convention; an all-zero row maps to [-1, 1]);
- symmetric: z = 2^(b-1) fixed and s = 2 max|x| / (2^b - 1) (GPTQ convention).

Weights are (out_features, in_features); one (s, z) per tensor, per output row (``group_size=-1``)
or per ``group_size`` consecutive input columns of a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.errors import SlimkitError

CLIP_METHODS = ("minmax", "mse", "llama.cpp")  # llama.cpp: GGUF K-quant grids only


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized.

    Args:
        bits: code width, 2..8.
        group_size: -1 = one scale per output channel, 0 = per tensor, g > 0 = groups of g
            consecutive input columns (must divide the input width).
        sym: symmetric grid (fixed zero point 2^(b-1)) instead of asymmetric min-max.
        clip: ``minmax`` (full range) or ``mse`` (shrink the range to minimise the error
            sum |w - w_hat|^2.4, GPTQ's grid of 100 steps down to 0.2).
        grid: "" for the uniform grid above, or a GGUF block type (``q4_k``, ``q3_k``, ...,
            ``q4_0``; see :mod:`slimkit.quant.gguf_grids`): bits, group size (the sub-block) and
            symmetry then follow the type, and scales are stored the way llama.cpp stores them.
    """

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    clip: str = "minmax"
    grid: str = ""

    def __post_init__(self) -> None:
        validate_bits(self.bits, "weight bits")
        if self.grid:
            t = self.ggml
            if (self.bits, self.group_size, self.sym) != (t.bits, t.sub, not t.offset):
                raise SlimkitError(
                    f"grid {self.grid}: bits {self.bits}, group size {self.group_size}, sym "
                    f"{self.sym} do not match the type ({t.bits}, {t.sub}, {not t.offset})"
                )
        if self.group_size < -1:
            raise SlimkitError(
                f"group size {self.group_size} is invalid; use -1 (per channel), 0 (per tensor) or g > 0"
            )
        if self.clip not in CLIP_METHODS:
            raise SlimkitError(
                f"unknown clip method {self.clip!r}; choose one of: {', '.join(CLIP_METHODS)}"
            )

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def ggml(self):
        """The GGUF block type of a ``grid`` spec (see :mod:`slimkit.quant.gguf_grids`)."""
        from slimkit.quant.gguf_grids import ggml_type

        return ggml_type(self.grid)

    @property
    def offset_form(self) -> bool:
        """Dequantization is ``scale * q - zero`` (``zero`` holds the offset M of a GGUF type
        with minimums) instead of ``scale * (q - zero)``."""
        return bool(self.grid) and self.ggml.offset

    @staticmethod
    def for_ggml(name: str, clip: str = "minmax") -> QuantSpec:
        from slimkit.quant.gguf_grids import ggml_type

        t = ggml_type(name)
        return QuantSpec(bits=t.bits, group_size=t.sub, sym=not t.offset, clip=clip, grid=t.name)

    def check_width(self, in_features: int, name: str = "layer") -> None:
        if self.grid and in_features % self.ggml.block:
            raise SlimkitError(
                f"GGUF {self.ggml.ggml} stores blocks of {self.ggml.block} weights; the input width "
                f"{in_features} of {name} is not a multiple (llama.cpp's file types fall back to "
                "a 32-block type there: use --grid llama.cpp:FTYPE)"
            )
        if self.group_size > 0 and in_features % self.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise SlimkitError(
                f"group size {self.group_size} does not divide the input width {in_features} of {name}; "
                f"use one of {divisors or 'none of 32/64/128/256'} or -1 (per channel)"
            )


def validate_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise SlimkitError(
            f"{what} must be an integer in 2..8 (got {bits!r}); 16 means 'not quantized' for activations"
        )


def _range_params(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        xmin, xmax = -amax, amax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / spec.qmax
    if spec.sym:
        zero = torch.full_like(scale, (spec.qmax + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View (out, in) as (rows, groups, g) according to the granularity."""
    out, inp = w.shape
    if spec.group_size == 0:
        return w.reshape(1, 1, -1)
    if spec.group_size == -1:
        return w.reshape(out, 1, inp)
    spec.check_width(inp)
    return w.reshape(out, inp // spec.group_size, spec.group_size)


def fit_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (rows, groups): rows = out (or 1 per tensor), groups = in / g (or 1)."""
    x = _grouped(w.float(), spec)
    xmin, xmax = x.amin(dim=-1), x.amax(dim=-1)
    scale, zero = _range_params(xmin, xmax, spec)
    if spec.clip == "mse":
        best = torch.full_like(scale, float("inf"))
        for i in range(int(0.8 * 100)):  # shrink p = 1, 0.99, ..., 0.21 (GPTQ maxshrink 0.8)
            p = 1 - i / 100
            s, z = _range_params(p * xmin, p * xmax, spec)
            q = torch.clamp(torch.round(x / s[..., None]) + z[..., None], 0, spec.qmax)
            err = ((s[..., None] * (q - z[..., None]) - x).abs() ** 2.4).sum(-1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def expand_params(
    p: torch.Tensor, in_features: int, group_size: int, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-group parameters (rows, groups) -> per-column (rows, in)."""
    if g_idx is not None:
        return p[:, g_idx.long()]
    if p.shape[1] == 1:
        return p.expand(p.shape[0], in_features)
    return p.repeat_interleave(group_size, dim=1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (same shape as x; scale/zero broadcast against it)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def quantize_on(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    """Nearest codes on ``spec``'s grid (uniform, or a GGUF type's, whose steps may be 0)."""
    if not spec.grid:
        return quantize(x, scale, zero, spec.bits)
    from slimkit.quant.gguf_grids import quantize_codes

    return quantize_codes(x, scale, zero, spec.ggml)


def dequantize_on(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    return scale * q - zero if spec.offset_form else scale * (q - zero)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient for x (and for scale, as in LSQ)."""
    q = torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


@dataclass
class QuantizedWeight:
    """The exact integer form of a quantized linear weight (what exporters pack).

    ``weight = scale[:, g_idx] * (codes - zero[:, g_idx])`` with codes in [0, 2^bits - 1]; on a
    GGUF grid with minimums (``spec.offset_form``) ``weight = scale * codes - zero`` instead
    (``zero`` is the offset M), and ``super_scale`` (out, in / 256, 2) holds a K-quant's fp16
    super-block scales d and dmin (scale = d * sub-block scale code, exactly).
    """

    codes: torch.Tensor  # uint8 (out, in)
    scale: torch.Tensor  # float32 (out, groups)
    zero: torch.Tensor  # float32 (out, groups), integer-valued
    g_idx: torch.Tensor  # int32 (in,), group of each input column
    spec: QuantSpec
    super_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        idx = self.g_idx.long()  # per tensor: (1, in) broadcasts over the rows
        return dequantize_on(self.codes.float(), self.scale[:, idx], self.zero[:, idx], self.spec)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.codes": self.codes,
            f"{prefix}.scale": self.scale,
            f"{prefix}.zero": self.zero,
            f"{prefix}.g_idx": self.g_idx,
        }
        if self.super_scale is not None:
            out[f"{prefix}.super_scale"] = self.super_scale
        return out

    @staticmethod
    def from_tensors(state: dict, prefix: str, spec: QuantSpec) -> QuantizedWeight:
        """The inverse of :meth:`tensors` (``state``: a safetensors dict)."""
        return QuantizedWeight(
            codes=state[f"{prefix}.codes"],
            scale=state[f"{prefix}.scale"].float(),
            zero=state[f"{prefix}.zero"].float(),
            g_idx=state[f"{prefix}.g_idx"].to(torch.int32),
            spec=spec,
            super_scale=state.get(f"{prefix}.super_scale"),
        )


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    if group_size <= 0:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def fit_grid(w: torch.Tensor, spec: QuantSpec):
    """GGUF grid parameters of ``w`` (see :func:`slimkit.quant.gguf_grids.fit`)."""
    from slimkit.quant.gguf_grids import fit

    return fit(w, spec.ggml, spec.clip)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a whole (out, in) weight."""
    out, inp = w.shape
    spec.check_width(inp)
    if spec.grid:
        p = fit_grid(w, spec)
        g_idx = trivial_g_idx(inp, spec.group_size)
        idx = g_idx.long()
        codes = quantize_on(w.float(), p.scale[:, idx], p.zero[:, idx], spec)
        return QuantizedWeight(codes.to(torch.uint8), p.scale, p.zero, g_idx, spec, p.super)
    scale, zero = fit_params(w, spec)
    g_idx = trivial_g_idx(inp, spec.group_size)
    if spec.group_size == 0:
        s, z = scale.expand(out, inp), zero.expand(out, inp)
        scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    else:
        s, z = scale[:, g_idx.long()], zero[:, g_idx.long()]
    codes = quantize(w.float(), s, z, spec.bits).to(torch.uint8)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, g_idx=g_idx, spec=spec)
