"""Structural position encoding (SPE) of SAM-DiffSR: a list of segment masks -> one float map E.

Exact behaviour of the official code (spec section 2.3):

1. Pattern P [H, W]: 1-D rotary embedding (theta 10000, dim = W) applied to an all-ones tensor,
   rows being the sequence axis: with w_k = 10000^(-2k/W), k = 0 .. W//2 - 1,
   P[i, 2k] = cos(i w_k) - sin(i w_k) and P[i, 2k+1] = cos(i w_k) + sin(i w_k); for odd W the
   last column stays 1.
2. Per mask: e_k = sum of P over the mask / (H * W) -- a mean over the whole image, so e_k grows
   with the segment's area.
3. Paint: E = e_k on mask k, later masks overwrite earlier ones, uncovered pixels are 0.

No normalisation; E is single-channel and broadcast over RGB by the diffusion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rope_pattern(h: int, w: int, theta: float = 10000.0) -> np.ndarray:
    """The rotary pattern P [h, w] (float64) of an all-ones input."""
    k = np.arange(w // 2, dtype=np.float64)
    freq = theta ** (-2 * k / w)
    ang = np.arange(h, dtype=np.float64)[:, None] * freq[None, :]  # rows = positions
    p = np.ones((h, w))
    p[:, 0 : 2 * (w // 2) : 2] = np.cos(ang) - np.sin(ang)
    p[:, 1 : 2 * (w // 2) : 2] = np.cos(ang) + np.sin(ang)
    return p


def encode_masks(masks: Sequence[np.ndarray], size: tuple[int, int] | None = None) -> np.ndarray:
    """E [H, W] float32 from binary masks in generator order (last writer wins).

    Args:
        masks: boolean arrays [H, W], all of one size.
        size: (H, W) when ``masks`` may be empty (then E = 0).

    Example:
        >>> m = np.zeros((2, 3), bool); m[:, 2] = True
        >>> encode_masks([m])[0]      # two ones of P (the odd last column) over 6 pixels
        array([0.       , 0.       , 0.3333333], dtype=float32)
    """
    if not len(masks):
        if size is None:
            raise ValueError("encode_masks: no masks and no size")
        return np.zeros(size, np.float32)
    h, w = masks[0].shape
    p = rope_pattern(h, w)
    e = np.zeros((h, w))
    for m in masks:
        m = np.asarray(m, bool)
        if m.shape != (h, w):
            raise ValueError(f"mask of shape {m.shape}, expected {(h, w)}")
        e[m] = p[m].sum() / (h * w)
    return e.astype(np.float32)


def encode_labels(labels: np.ndarray) -> np.ndarray:
    """E of a label map [H, W] (one mask per distinct label, in increasing label order; label
    < 0 = uncovered). Segments of a label map do not overlap, so the order does not matter."""
    return encode_masks([labels == v for v in np.unique(labels) if v >= 0], labels.shape)
