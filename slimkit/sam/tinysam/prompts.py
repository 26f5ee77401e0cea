"""Prompt drawing for TinySAM's distillation: initial points inside the ground-truth mask, and
online hard prompt sampling, where each new point is drawn from the region the current
prediction gets wrong (spec section 2.3)."""

from __future__ import annotations

import numpy as np

from slimkit.core.errors import SlimkitError

REGIONS = ("xor", "fn")


def error_region(gt: np.ndarray, pred: np.ndarray, region: str = "xor") -> np.ndarray:
    """Pixels to draw the next point from: ``xor`` the symmetric error (SAM's interactive
    simulation), ``fn`` the missed foreground only (the paper's M_gt - M_i)."""
    if region == "xor":
        return gt ^ pred
    if region == "fn":
        return gt & ~pred
    raise SlimkitError(f"unknown error region {region!r}; choose one of: {', '.join(REGIONS)}")


def sample_error_points(gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator,
                        region: str = "xor") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """gt, pred: (K, H, W) bool. One point per mask drawn uniformly from its error region:
    coords (K, 2) as (x, y) and labels (K,): 1 inside the ground truth, 0 outside, -1 (a padding
    point the prompt encoder ignores) when the prediction has no error left."""
    if gt.shape != pred.shape or gt.ndim != 3:
        raise SlimkitError(f"gt and pred must both be (K, H, W) (got {gt.shape}, {pred.shape})")
    coords = np.zeros((len(gt), 2), np.float32)
    labels = np.full(len(gt), -1, np.int64)
    for k in range(len(gt)):
        ys, xs = np.nonzero(error_region(gt[k], pred[k], region))
        if len(xs):
            j = rng.integers(len(xs))
            coords[k] = xs[j], ys[j]
            labels[k] = int(gt[k, ys[j], xs[j]])
    return coords, labels


def initial_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn pixel of a non-empty (H, W) mask, as (x, y)."""
    ys, xs = np.nonzero(mask)
    j = rng.integers(len(xs))
    return np.array([xs[j], ys[j]], np.float32)
