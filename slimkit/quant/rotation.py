"""Residual-stream rotation (QuaRot / SpinQuant "R1"), a front end for any quantization method.

An orthogonal Q (hidden x hidden) rotates the residual stream: h -> h Q. RMSNorm commutes with it
once its weight has been folded into the linears that read the norm (||h Q|| = ||h||), so the
model computes exactly the same function (to round-off) with

- token embeddings E -> E Q,
- every linear reading a norm (q/k/v, gate/up, the LM head) W -> diag-folded W, then W Q,
- every linear writing into the residual (o_proj, down_proj) W -> Q^T W (bias b -> Q^T b),
- every norm weight -> 1 (its weight now lives in its consumers; 0 for Gemma's norms, which
  scale by 1 + weight); a tied LM head is untied.

Blocks whose attention / MLP outputs pass through a norm before they reach the residual
(Gemma-2/3, OLMo-2 post-norms) are refused: that norm does not commute with the rotation.

Outlier channels of the residual stream are spread over all channels, which is what makes 4-bit
activations usable (QuaRot, arXiv 2404.00456; SpinQuant, arXiv 2405.16406). The rotated model is
an ordinary checkpoint (every exporter takes it).

``rotate_down`` adds QuaRot's online rotation of the down projection's input ("R4"): the
input is multiplied by an orthogonal H (intermediate x intermediate) in a forward pre-hook that
runs before any activation quantizer, and W_down -> W_down H. The FFN's activations are where
4-bit activation quantization fails worst; the price is a non-standard forward pass: slimkit
saves and re-attaches the hook, but no export format here carries it. The rotations of the
attention heads (R2 / R3) are not done.

Q is a Hadamard matrix with random signs (``hadamard``; power-of-two sizes only) or a random
orthogonal matrix (``random``, QR of a Gaussian, SpinQuant's initialisation), seeded.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import block_map_for, get_blocks, get_module, set_weight, weight_of
from slimkit.llm.folds import norm_factor_offset

ROTATIONS = ("none", "random", "hadamard")


def orthogonal(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """An n x n orthogonal matrix in fp64: ``random`` (QR of a Gaussian, signs fixed so the draw
    is Haar-distributed) or ``hadamard`` (Sylvester Hadamard / sqrt(n) with random column signs)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if kind == "hadamard":
        orthogonal_size_ok(n, kind)
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return h / n**0.5 * signs.unsqueeze(0)
    raise SlimkitError(f"unknown rotation {kind!r}; choose one of: {', '.join(ROTATIONS)}")


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and getattr(m, "bias", None) is None


def check_rotation(model: nn.Module, rotate: str, rotate_down: str) -> None:
    """Raise SlimkitError now if ``rotate`` / ``rotate_down`` cannot be applied to ``model``
    (family, matrix size), before any work is done."""
    bm = block_map_for(model)
    if rotate != "none":
        _residual_parts(model, bm)
        orthogonal_size_ok(get_module(model, bm.pre_blocks[0]).weight.shape[1], rotate)
    if rotate_down != "none":
        downs = down_projections(model)
        orthogonal_size_ok(weight_of(downs[0], bm.transposed).shape[1], rotate_down)


def orthogonal_size_ok(n: int, kind: str) -> None:
    if kind == "hadamard" and (n < 1 or n & (n - 1)):
        raise SlimkitError(f"--rotate hadamard needs a power-of-two width (got {n}); use random")


def _residual_parts(model: nn.Module, bm):
    blocks = get_blocks(model, bm)
    final_norm = get_module(model, bm.post_blocks[0])
    if bm.post_norms:
        names = ", ".join(f"{w} -> {n}" for w, n in bm.post_norms)
        raise SlimkitError(
            f"--rotate: {bm.family} blocks reach the residual stream only through post-norms "
            f"({names}); a norm between a linear and the residual does not commute with the "
            "rotation, so it would not preserve the model's function"
        )
    if bm.residual_other:
        raise SlimkitError(
            f"--rotate: {bm.family} blocks also write the residual stream through "
            f"{', '.join(bm.residual_other)} (not a linear, e.g. an MoE block's routed sum), "
            "whose outputs the rotation cannot turn"
        )
    norms = [get_module(b, n) for b in blocks for n, _ in bm.smooth] + [final_norm]
    if not bm.smooth or not all(n is not None and _is_rms_norm(n) for n in norms):
        raise SlimkitError(
            f"--rotate needs RMSNorm blocks (Llama, Mistral, Qwen2, Qwen3); {bm.family} uses "
            "LayerNorm, which does not commute with a rotation"
        )
    if not bm.residual_writers:
        raise SlimkitError(f"{bm.family}: the block map names no residual writers to rotate")
    return blocks, final_norm


@torch.no_grad()
def rotate_model(model: nn.Module, kind: str = "random", seed: int = 0) -> torch.Tensor | None:
    """Rotate ``model``'s residual stream in place (function-preserving); returns Q (fp64).

    Supported: families whose blocks read the residual through RMSNorms (Llama, Mistral, Qwen2,
    Qwen3); LayerNorm (OPT, GPT-2) subtracts the mean and does not commute with a rotation.
    """
    if kind == "none":
        return None
    bm = block_map_for(model)
    blocks, final_norm = _residual_parts(model, bm)
    head = get_module(model, bm.post_blocks[-1])
    embed = get_module(model, bm.pre_blocks[0])
    hidden = embed.weight.shape[1]
    Q = orthogonal(hidden, kind, seed)

    def rotate_in(m: nn.Module, scale: torch.Tensor | None = None) -> None:
        w = weight_of(m, bm.transposed).double()
        if scale is not None:
            w = w * scale.double().unsqueeze(0)
        set_weight(m, (w @ Q.to(w.device)).to(m.weight.dtype), bm.transposed)

    def rotate_out(m: nn.Module) -> None:
        w = weight_of(m, bm.transposed).double()
        set_weight(m, (Q.T.to(w.device) @ w).to(m.weight.dtype), bm.transposed)
        if getattr(m, "bias", None) is not None:
            m.bias.data.copy_((Q.T.to(w.device) @ m.bias.double()).to(m.bias.dtype))

    if getattr(model.config, "tie_word_embeddings", False) or head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    e = embed.weight.double()
    embed.weight.data.copy_((e @ Q.to(e.device)).to(embed.weight.dtype))
    for block in blocks:
        for norm_name, consumers in bm.smooth:
            norm = get_module(block, norm_name)
            off = norm_factor_offset(norm)  # Gemma's norms scale by (1 + w): reset w to 0
            g = norm.weight.detach().clone() + off
            for c in consumers:
                m = get_module(block, c)
                if m is not None:
                    rotate_in(m, g)
            norm.weight.data.fill_(1.0 - off)
        for w in bm.residual_writers:
            m = get_module(block, w)
            if m is not None:  # (PanGu-pi without augmented shortcuts has no as_up)
                rotate_out(m)
    off = norm_factor_offset(final_norm)
    rotate_in(head, final_norm.weight.detach().clone() + off)
    final_norm.weight.data.fill_(1.0 - off)
    return Q


class DownRotation:
    """Forward pre-hook x -> x H on a down projection (registered first, so activation
    quantizers see the rotated input)."""

    def __init__(self, module: nn.Module, H: torch.Tensor):
        self.H = H.to(module.weight.dtype)
        self.handle = module.register_forward_pre_hook(self, prepend=True)

    def __call__(self, module, args):
        x = args[0]
        return (x @ self.H.to(x.device, x.dtype), *args[1:])


def down_projections(model: nn.Module) -> list[nn.Module]:
    bm = block_map_for(model)
    if len(bm.sequential[-1]) != 1 or bm.sequential[-1][0] not in bm.residual_writers:
        raise SlimkitError(f"--rotate-down: {bm.family} blocks have no single down projection")
    return [get_module(b, bm.sequential[-1][0]) for b in get_blocks(model, bm)]


def attach_down_rotation(
    model: nn.Module, kind: str = "random", seed: int = 0, *, fold: bool = True
) -> list[DownRotation]:
    """Online rotation of every down projection's input; ``fold``: also W_down -> W_down H
    (False when the saved weights already hold it)."""
    bm = block_map_for(model)
    downs = down_projections(model)
    n = weight_of(downs[0], bm.transposed).shape[1]
    H = orthogonal(n, kind, seed + 1)
    hooks = []
    for m in downs:
        if fold:
            w = weight_of(m, bm.transposed).double()
            set_weight(m, (w @ H.to(w.device)).to(m.weight.dtype), bm.transposed)
        hooks.append(DownRotation(m, H))
    return hooks


def has_down_rotation(module: nn.Module) -> bool:
    return any(isinstance(h, DownRotation) for h in module._forward_pre_hooks.values())
