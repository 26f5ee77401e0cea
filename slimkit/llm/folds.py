"""Function-preserving scale folds shared by the methods (SmoothQuant, AWQ, CFP) and by the
block-map inference that tries them: a per-channel scale moved from a norm or a linear's
output rows into the input columns of the linears that read it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import set_weight, weight_of


def _first(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


_OFFSETS: dict[type, float] = {}


def norm_factor_offset(norm: nn.Module) -> float:
    """1.0 for norms that scale by ``(1 + weight)`` (Gemma's RMSNorm), 0.0 for ``weight``.

    Found by running a copy of the norm with all its parameters zeroed: a zero weight gives a
    zero output unless the norm adds one to it."""
    t = type(norm)
    if t not in _OFFSETS:
        c = copy.deepcopy(norm).float().cpu()
        with torch.no_grad():
            for p in c.parameters():
                p.zero_()
            x = torch.randn(3, c.weight.shape[0], generator=torch.Generator().manual_seed(0))
            y = _first(c(x))
        _OFFSETS[t] = 1.0 if y is not None and float(y.abs().max()) > 1e-6 else 0.0
    return _OFFSETS[t]


def fold_scales(
    norm: torch.nn.Module, consumers: list[torch.nn.Module], s: torch.Tensor, transposed: bool
) -> None:
    """norm.weight (and bias) /= s; each consumer's input columns *= s. Function-preserving.

    A norm that scales by ``(1 + weight)`` (Gemma's RMSNorm) gets ``w <- (1 + w) / s - 1``."""
    off = norm_factor_offset(norm)
    if off:
        norm.weight.data.copy_((norm.weight.data + off) / s.to(norm.weight) - off)
    else:
        norm.weight.data.div_(s.to(norm.weight))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.div_(s.to(norm.bias))
    for m in consumers:
        w = weight_of(m, transposed)
        set_weight(m, w * s.to(w).unsqueeze(0), transposed)


def linear_pair_repeat(kind: str, producer_out: int, consumer_in: int, n_heads: int) -> tuple:
    """How the consumer's input columns repeat the producer's output rows: (groups, repeat,
    width) such that column ``(g, r, d)`` reads row ``(g, d)``. ``ffn``: one to one; ``attn``:
    ``groups`` KV heads of ``width = consumer_in / n_heads`` channels, each read by ``repeat``
    query heads."""
    if kind == "ffn":
        if producer_out != consumer_in:
            raise SlimkitError(f"ffn pair: {producer_out} outputs feed {consumer_in} inputs")
        return 1, 1, consumer_in
    if kind != "attn" or consumer_in % n_heads:
        raise SlimkitError(
            f"cannot fold a {kind!r} pair with {consumer_in} inputs, {n_heads} heads"
        )
    width = consumer_in // n_heads
    if producer_out % width or n_heads % (producer_out // width):
        raise SlimkitError(f"attn pair: {producer_out} value channels for {n_heads} heads")
    groups = producer_out // width
    return groups, n_heads // groups, width


def fold_linear_scales(
    producer: torch.nn.Module, consumer: torch.nn.Module, s: torch.Tensor, layout: tuple,
    transposed: bool,
) -> None:  # fmt: skip
    """producer output rows (and bias) /= s; consumer input columns *= s (repeated per
    ``layout``). Function-preserving when the consumer's input is linear in the producer's
    output (attention-weighted values, ``act(gate) * up``)."""
    w = weight_of(producer, transposed)
    set_weight(producer, w / s.to(w).unsqueeze(1), transposed)
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.div_(s.to(producer.bias))
    g, r, d = layout
    cols = s.reshape(g, 1, d).expand(g, r, d).reshape(-1)
    w = weight_of(consumer, transposed)
    set_weight(consumer, w * cols.to(w).unsqueeze(0), transposed)
