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
ACT_KEYS = ("act_absmax", "act_clip")  # what a saved activation quantizer may carry


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
    x: torch.Tensor,
    spec: ActSpec,
    static_absmax: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize x (..., features) with a straight-through gradient.

    ``clip`` (a scalar in (0, 1], may require grad) shrinks the range: the static range, or each
    token's range for dynamic quantization (values outside are clamped)."""
    xf = x.float()
    c = 1.0 if clip is None else clip.to(xf.device)
    if spec.granularity == "per-tensor":
        if static_absmax is None:
            raise SlimkitError("per-tensor activation quantization needs a calibrated range")
        amax = (static_absmax.to(xf.device) * c).clamp(min=1e-8)
        qmax = 2 ** (spec.bits - 1) - 1
        s = amax / qmax
        return (torch.clamp(round_ste(xf / s), -qmax - 1, qmax) * s).to(x.dtype)
    if spec.sym:
        qmax = 2 ** (spec.bits - 1) - 1
        s = (xf.abs().amax(dim=-1, keepdim=True) * c).clamp(min=1e-8) / qmax
        return (torch.clamp(round_ste(xf / s), -qmax - 1, qmax) * s).to(x.dtype)
    qmax = 2**spec.bits - 1
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0) * c
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0) * c
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    z = torch.round(-lo / s)
    return ((torch.clamp(round_ste(xf / s) + z, 0, qmax) - z) * s).to(x.dtype)


class ActQuantHook:
    """Forward pre-hook that fake-quantizes a module's first input.

    In ``observe`` mode it records max|X| (for static per-tensor ranges) and passes X through.
    ``clip``: optional range shrink factor in (0, 1] (learned by CBQ).
    """

    def __init__(
        self, spec: ActSpec, absmax: torch.Tensor | None = None, clip: torch.Tensor | None = None
    ):
        self.spec = spec
        self.absmax = absmax
        self.clip = clip
        self.observe = False

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.observe:
            m = x.detach().abs().amax().float().cpu()
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
            return args
        return (quantize_activation(x, self.spec, self.absmax, self.clip), *args[1:])


def attach(
    module: nn.Module,
    spec: ActSpec,
    absmax: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
    *,
    hook: ActQuantHook | None = None,
) -> ActQuantHook:
    """Attach (or replace) an activation quantizer on ``module``'s input (``hook``: a ready-made
    one, e.g. with learnable parameters)."""
    detach(module)
    hook = hook if hook is not None else ActQuantHook(spec, absmax, clip)
    module._slimkit_act = (hook, module.register_forward_pre_hook(hook))  # type: ignore[attr-defined]
    return hook


def saved_params(hook: ActQuantHook) -> dict[str, torch.Tensor]:
    """The calibrated numbers of an activation quantizer, as plain tensors (for saving)."""
    out = {}
    if hook.absmax is not None:
        out["act_absmax"] = hook.absmax.detach().float().reshape(1).cpu()
    if hook.clip is not None:
        out["act_clip"] = hook.clip.detach().float().reshape(1).cpu()
    return out


def attach_saved(module: nn.Module, spec: ActSpec, params: dict[str, torch.Tensor]) -> ActQuantHook:
    """Re-attach a quantizer from :func:`saved_params` output."""
    a, c = params.get("act_absmax"), params.get("act_clip")
    return attach(
        module, spec, None if a is None else a.reshape(()), None if c is None else c.reshape(())
    )


def detach(module: nn.Module) -> None:
    old = getattr(module, "_slimkit_act", None)
    if old is not None:
        old[1].remove()
        del module._slimkit_act


def strip(root: nn.Module) -> None:
    """Remove every activation quantizer from ``root`` and its submodules (also from a deep
    copy, whose hook handles still point at the original)."""
    for m in root.modules():
        for k, h in list(m._forward_pre_hooks.items()):
            if isinstance(h, ActQuantHook):
                del m._forward_pre_hooks[k]
        m.__dict__.pop("_slimkit_act", None)


def hook_of(module: nn.Module) -> ActQuantHook | None:
    old = getattr(module, "_slimkit_act", None)
    return old[0] if old is not None else None
