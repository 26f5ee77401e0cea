"""Image classifiers from timm by name, with a stage map that finds four stages of any CNN, ViT,
Swin-like or MLP-Mixer model without per-model code.

``create_model("resnet18", num_classes=10, in_chans=1, img_size=32)`` builds any timm model
(``pretrained=True`` downloads weights when online; ``checkpoint=`` loads a local
safetensors / state dict). slimkit also names a few tiny configurations of timm classes for CPU
experiments (``slimkit list vision-models``).

Stages [our default]: hierarchical models (feature_info with several output strides) tap the
ends of their last four stages; isotropic models (ViT, Mixer: one stride) tap blocks
n/4 - 1, n/2 - 1, 3n/4 - 1 and n - 1 of their n blocks. Features come from timm's
``forward_intermediates`` (CLS / prefix tokens kept when the model has them), with forward hooks
on the feature_info modules as the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry
from slimkit.core.weights import load_state_dict

TINY = Registry("vision model")


def _register_tiny(name: str, base: str, help: str, **kw) -> None:
    TINY.register(name, (base, kw), help=help)


_register_tiny("tiny-vit", "vit", "ViT: patch 4, width 64, depth 8, 4 heads (timm VisionTransformer)",
               patch_size=4, embed_dim=64, depth=8, num_heads=4)  # fmt: skip
_register_tiny("tiny-resnet", "resnet18", "ResNet: one basic block per stage, widths 16/32/64/128",
               layers=[1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16)  # fmt: skip
_register_tiny("small-resnet", "resnet18", "ResNet: two basic blocks per stage, widths 32/64/128/256",
               layers=[2, 2, 2, 2], channels=(32, 64, 128, 256), stem_width=32)  # fmt: skip
_register_tiny("tiny-mixer", "mixer", "MLP-Mixer: patch 4, width 64, 8 blocks (timm MlpMixer)",
               patch_size=4, embed_dim=64, num_blocks=8)  # fmt: skip
_register_tiny("tiny-vit-p8", "vit", "ViT: patch 8 (16 tokens at 32x32), width 64, depth 4, 4 heads (CLIP towers)",
               patch_size=8, embed_dim=64, depth=4, num_heads=4)  # fmt: skip
_register_tiny("tiny-resnet-os8", "resnet18", "tiny-resnet at output stride 8 (a 4x4 map at 32x32; CLIP towers)",
               layers=[1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16, output_stride=8)  # fmt: skip
_register_tiny("tiny-swin", "swin", "Swin: patch 2, widths 16..128, one block per stage, window 2",
               patch_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2)  # fmt: skip


def create_model(
    arch: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 224,
    pretrained: bool = False,
    checkpoint: str | None = None,
    **kwargs,
) -> nn.Module:
    """A timm classifier (or one of slimkit's tiny configurations of a timm class)."""
    import timm

    if arch in TINY:
        base, kw = TINY.get(arch)
        kw = {**kw, **kwargs}
        common = dict(num_classes=num_classes, in_chans=in_chans)
        if base == "vit":
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(img_size=img_size, **common, **kw)
        elif base == "mixer":
            from timm.models.mlp_mixer import MlpMixer

            model = MlpMixer(img_size=img_size, **common, **kw)
        elif base == "swin":
            from timm.models.swin_transformer import SwinTransformer

            model = SwinTransformer(img_size=img_size, **common, **kw)
        else:
            model = timm.create_model(base, pretrained=False, **common, **kw)
    else:
        try:
            model = _timm_create(arch, num_classes, in_chans, img_size, pretrained, kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise SlimkitError(
                    f"unknown model {arch!r}: not a timm model name (timm.list_models()) nor one of "
                    f"slimkit's tiny models ({', '.join(TINY.names())})"
                ) from None
            raise
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def _timm_create(arch, num_classes, in_chans, img_size, pretrained, kwargs):
    import timm

    try:  # isotropic models take the input size; CNNs do not
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes,
                                 in_chans=in_chans, img_size=img_size, **kwargs)  # fmt: skip
    except TypeError:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes,
                                 in_chans=in_chans, **kwargs)  # fmt: skip


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    state = load_state_dict(p)  # safetensors, or a pickle read with weights_only=True
    if isinstance(state, dict) and p.suffix != ".safetensors":
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise SlimkitError(f"checkpoint {p} does not hold a state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches are raised even when strict=False
        first = next((s.strip() for s in str(e).splitlines() if "size mismatch" in s), str(e))
        raise SlimkitError(f"checkpoint {p} does not fit the model: {first[:240]}") from None
    if missing or unexpected:
        raise SlimkitError(
            f"checkpoint {p} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


@dataclass
class StageFeature:
    """One tapped stage: a spatial map (B, C, H, W) and, for ViT-like models, prefix tokens (B, P, C)."""

    spatial: torch.Tensor
    prefix: torch.Tensor | None = None

    def tokens(self) -> torch.Tensor:
        """(B, P + H*W, C): prefix tokens first."""
        t = self.spatial.flatten(2).transpose(1, 2)
        return t if self.prefix is None else torch.cat([self.prefix, t], 1)


class StageTaps(nn.Module):
    """Wraps a timm classifier: ``forward(x) -> (logits, [StageFeature] * 4)`` in one pass."""

    def __init__(self, model: nn.Module, n_stages: int = 4):
        super().__init__()
        self.model = model
        info = list(getattr(model, "feature_info", []) or [])
        if not info:
            raise SlimkitError(
                f"{type(model).__name__} has no timm feature_info: cannot find its stages"
            )
        strides = [f.get("reduction") for f in info]
        self.hierarchical = len(set(strides)) > 1
        n = len(info)
        if self.hierarchical:
            self.indices = list(range(max(n - n_stages, 0), n))
        else:
            self.indices = sorted({max(n * (k + 1) // n_stages - 1, 0) for k in range(n_stages)})
        self.modules_ = [info[i]["module"] for i in self.indices]
        self.use_fi = hasattr(model, "forward_intermediates")
        self.prefix_ok = False
        if self.use_fi:
            import inspect

            sig = inspect.signature(model.forward_intermediates).parameters
            self.prefix_ok = (
                "return_prefix_tokens" in sig and getattr(model, "num_prefix_tokens", 0) > 0
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[StageFeature]]:
        if self.use_fi:
            kw = {"return_prefix_tokens": True} if self.prefix_ok else {}
            final, inter = self.model.forward_intermediates(x, indices=self.indices, **kw)
            feats = [StageFeature(*f) if isinstance(f, tuple) else StageFeature(f) for f in inter]
            return self.model.forward_head(final), [_nchw(f) for f in feats]
        return self._hooked(x)

    def _hooked(self, x: torch.Tensor):
        store: dict[str, torch.Tensor] = {}
        handles = [
            self.model.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: store.__setitem__(name, o)
            )
            for name in self.modules_
        ]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return logits, [_nchw(StageFeature(store[n])) for n in self.modules_]


def _nchw(f: StageFeature) -> StageFeature:
    """Token sequences (B, L, C) and channels-last maps (B, H, W, C) become (B, C, H, W)."""
    s = f.spatial
    if s.dim() == 3:  # (B, L, C) square grid
        g = int(round(s.shape[1] ** 0.5))
        if g * g != s.shape[1]:
            raise SlimkitError(f"stage tokens of length {s.shape[1]} are not a square grid")
        s = s.transpose(1, 2).reshape(s.shape[0], s.shape[2], g, g)
    return StageFeature(s, f.prefix)


def stage_shapes(
    model: nn.Module, in_chans: int, img_size: int
) -> list[tuple[tuple, tuple | None]]:
    """(spatial shape, prefix shape) of each stage, from a dry forward pass (batch 2)."""
    taps = StageTaps(model)
    was = model.training
    model.eval()
    with torch.no_grad():
        _, feats = taps(torch.zeros(2, in_chans, img_size, img_size))
    model.train(was)
    return [
        (tuple(f.spatial.shape[1:]), None if f.prefix is None else tuple(f.prefix.shape[1:]))
        for f in feats
    ]


def family(model: nn.Module) -> str:
    """``cnn`` for convolutional feature maps, ``tokens`` for ViT / Mixer / Swin-like models."""
    name = type(model).__name__.lower()
    token_like = ("vision", "vit", "mixer", "swin", "mlp", "deit", "beit", "eva", "resmlp")
    return "tokens" if any(k in name for k in token_like) else "cnn"


def pooled_width(model: nn.Module) -> int:
    return int(getattr(model, "num_features", 0) or model.get_classifier().in_features)
