"""MATLAB-compatible bicubic resizing (``imresize(x, s, 'bicubic')`` with antialiasing), the
degradation every bicubic SR benchmark (and SRDiff / SAM-DiffSR) uses.

Why not ``F.interpolate(mode="bicubic", antialias=True)``: torch's kernel uses a = -0.75 and other
boundary handling; MATLAB uses Keys' cubic with a = -0.5, stretches it by 1/s when shrinking
(antialiasing) and mirrors indices at the border. Resizing is separable, so each axis is one
``(out x in)`` weight matrix and ``resize(x) = W_h @ x @ W_w^T`` in float64.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from slimkit.core.errors import SlimkitError


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel with a = -0.5 (MATLAB's ``cubic``)."""
    a = np.abs(x)
    a2, a3 = a * a, a * a * a
    return (1.5 * a3 - 2.5 * a2 + 1) * (a <= 1) + (-0.5 * a3 + 2.5 * a2 - 4 * a + 2) * (
        (a > 1) & (a <= 2)
    )


@lru_cache(maxsize=64)
def resize_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """The ``(out_len, in_len)`` float64 matrix of MATLAB's bicubic resize along one axis.

    Output pixel i (1-based) samples input position u = i/s + (1 - 1/s)/2; when shrinking
    (s < 1) the kernel is widened to 4/s taps and scaled by s (antialiasing); out-of-range taps
    are mirrored (MATLAB's symmetric padding); each row is normalised to sum to 1."""
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    i = np.arange(1, out_len + 1, dtype=np.float64)
    u = i / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input positions
    d = u[:, None] - idx
    w = scale * _cubic(d * scale) if antialias else _cubic(d)
    w = w / w.sum(1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), taps), cols.ravel()), w.ravel())
    return m


def imresize(img: torch.Tensor, scale: float) -> torch.Tensor:
    """MATLAB ``imresize(img, scale, 'bicubic')`` of ``[..., H, W]`` (any float range; the result
    is float64-accurate, returned in ``img``'s float dtype, not clipped or rounded). The output
    side is ``ceil(side * scale)``.

    Example:
        >>> imresize(torch.rand(3, 64, 48), 1 / 4).shape
        torch.Size([3, 16, 12])
    """
    if scale <= 0:
        raise SlimkitError(f"resize scale must be positive (got {scale})")
    h, w = img.shape[-2:]
    oh, ow = math.ceil(h * scale - 1e-9), math.ceil(w * scale - 1e-9)
    mh = torch.from_numpy(resize_matrix(h, oh, scale)).to(img.device)
    mw = torch.from_numpy(resize_matrix(w, ow, scale)).to(img.device)
    dtype = img.dtype if img.is_floating_point() else torch.float32
    out = mh @ img.to(torch.float64) @ mw.T
    return out.to(dtype)


def crop_to_multiple(hr: np.ndarray, scale: int) -> np.ndarray:
    """Cut ``[H, W, ...]`` to the largest multiple of ``scale`` on each side (top-left kept,
    as BasicSR's ``mod_crop``)."""
    h, w = hr.shape[:2]
    if h < scale or w < scale:
        raise SlimkitError(f"image of {h} x {w} pixels is smaller than the scale {scale}")
    return hr[: h - h % scale, : w - w % scale]


def degrade(hr_uint8: np.ndarray, scale: int) -> np.ndarray:
    """The LR image of an HR ``uint8 [H, W, 3]`` image (H, W multiples of ``scale``): MATLAB
    bicubic ``1/scale``, rounded and clipped to uint8 as a saved LR image would be."""
    t = torch.from_numpy(np.array(hr_uint8, copy=True)).permute(2, 0, 1).to(torch.float64)
    lr = imresize(t, 1 / scale).round().clamp(0, 255)
    return lr.permute(1, 2, 0).numpy().astype(np.uint8)


def upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """U(y_LR): MATLAB bicubic ``x scale`` of ``[..., h, w]``."""
    return imresize(lr, float(scale))
