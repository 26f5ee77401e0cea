"""Loading SAM checkpoints (official ``sam_vit_{b,l,h}_*.pth`` state dicts) safely and strictly."""

from __future__ import annotations

from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.weights import load_state_dict
from slimkit.sam.model import SAM_CONFIGS, Sam, build_sam


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A raw state dict, {"model": ...} or {"state_dict": ...}; ``module.`` prefixes stripped;
    read with ``weights_only=True`` (pickled modules are refused)."""
    p = Path(path)
    sd = load_state_dict(p)
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise SlimkitError(f"{p} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(model: Sam, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> Sam:
    """Strict load that names the first missing / unexpected / mis-shaped key."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise SlimkitError(
                f"{source} lacks {k} {tuple(v.shape)}: is it for another architecture?"
            )
        if tuple(sd[k].shape) != tuple(v.shape):
            raise SlimkitError(
                f"{source}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(v.shape)} (wrong --arch?)"
            )
    extra = [k for k in sd if k not in own]
    if extra:
        raise SlimkitError(
            f"{source} has keys this architecture does not, e.g. {extra[0]} (wrong --arch?)"
        )
    model.load_state_dict(sd, strict=True)
    return model


def guess_arch(sd: dict[str, torch.Tensor]) -> str:
    if "image_encoder.patch_embed.seq.0.c.weight" in sd:
        return "vit_t"  # MobileSAM / TinySAM
    w = sd.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        raise SlimkitError("not a SAM checkpoint (no image_encoder.patch_embed weights)")
    dims = {cfg.dim: name for name, cfg in SAM_CONFIGS.items() if not cfg.extra}
    if w.shape[0] not in dims:
        raise SlimkitError(f"no SAM architecture with encoder width {w.shape[0]}")
    return dims[w.shape[0]]


def load_sam(checkpoint: str | Path, arch: str | None = None) -> Sam:
    sd = read_state_dict(checkpoint)
    model = build_sam(arch or guess_arch(sd))
    return load_into(model, sd, str(checkpoint))
