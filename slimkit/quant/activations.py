"""Activation fake-quantization attached to the inputs of linears.

Activations are quantized on the fly (per token, "dynamic") or with one calibrated scale per
tensor ("static"). They are attached as forward pre-hooks, so the model keeps its own module
classes and its ``state_dict`` keys; a saved run re-attaches them from ``quantization.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.quant.quantizer import round_ste, validate_bits

GRANULARITIES = ("per-token", "per-tensor")


@dataclass(frozen=True)
class ActSpec:
    """Args:
    bits: code width 2..8.
    granularity: ``per-token`` (dynamic, one scale per row of X) or ``per-tensor`` (static,
        one scale calibrated as max|X| over the calibration tokens).
    sym: symmetric signed grid (SmoothQuant's int8 convention) or asymmetric min-max.
    """

    bits: int = 8
    granularity: str = "per-token"
    sym: bool = True

    def __post_init__(self) -> None:
        validate_bits(self.bits, "activation bits")
        if self.granularity not in GRANULARITIES:
            raise SlimkitError(
                f"unknown activation granularity {self.granularity!r}; choose one of: {', '.join(GRANULARITIES)}"
            )


def quantize_activation(
    x: torch.Tensor, spec: ActSpec, static_absmax: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize x (..., features) with a straight-through gradient."""
    xf = x.float()
    if spec.granularity == "per-tensor":
        if static_absmax is None:
            raise SlimkitError("per-tensor activation quantization needs a calibrated range")
        amax = static_absmax.to(xf.device).clamp(min=1e-8)
        qmax = 2 ** (spec.bits - 1) - 1
        s = amax / qmax
        return (torch.clamp(round_ste(xf / s), -qmax - 1, qmax) * s).to(x.dtype)
    if spec.sym:
        qmax = 2 ** (spec.bits - 1) - 1
        s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
        return (torch.clamp(round_ste(xf / s), -qmax - 1, qmax) * s).to(x.dtype)
    qmax = 2**spec.bits - 1
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    z = torch.round(-lo / s)
    return ((torch.clamp(round_ste(xf / s) + z, 0, qmax) - z) * s).to(x.dtype)


class ActQuantHook:
    """Forward pre-hook that fake-quantizes a module's first input.

    In ``observe`` mode it records max|X| (for static per-tensor ranges) and passes X through.
    """

    def __init__(self, spec: ActSpec, absmax: torch.Tensor | None = None):
        self.spec = spec
        self.absmax = absmax
        self.observe = False

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.observe:
            m = x.detach().abs().amax().float().cpu()
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
            return args
        return (quantize_activation(x, self.spec, self.absmax), *args[1:])


def attach(module: nn.Module, spec: ActSpec, absmax: torch.Tensor | None = None) -> ActQuantHook:
    """Attach (or replace) an activation quantizer on ``module``'s input."""
    detach(module)
    hook = ActQuantHook(spec, absmax)
    module._slimkit_act = (hook, module.register_forward_pre_hook(hook))  # type: ignore[attr-defined]
    return hook


def detach(module: nn.Module) -> None:
    old = getattr(module, "_slimkit_act", None)
    if old is not None:
        old[1].remove()
        del module._slimkit_act


def hook_of(module: nn.Module) -> ActQuantHook | None:
    old = getattr(module, "_slimkit_act", None)
    return old[0] if old is not None else None
