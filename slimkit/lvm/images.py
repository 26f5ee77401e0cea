"""Offline image sources for the VQ tokenizer and the visual sentences.

Every source returns float images in [0, 1], shape [N, 3, S, S] (no mean / std normalisation,
as the VQGAN expects), drawn deterministically from a seed:

- ``scenes``: procedural scenes of 1-3 shapes (slimkit.vision.data's shapes and textures) on a
  gradient background, returned with their instance masks (for the segmentation task);
- ``photos``: random crops of the photos bundled with scikit-image and scikit-learn;
- a directory: random crops of every ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` file in it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.vision.data import SHAPES, shape_mask, texture

SOURCES = ("scenes", "photos")
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                   "immunohistochemistry", "colorwheel")  # fmt: skip
_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


def scenes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes and their instance maps: images [n, 3, S, S] in [0, 1] and int64 masks
    [n, S, S] (0 = background, k = k-th shape, later shapes drawn over earlier ones)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.zeros((n, 3, size, size), np.float32)
    masks = np.zeros((n, size, size), np.int64)
    for i in range(n):
        g = rng.uniform(-0.2, 0.2, 2)
        bg = rng.uniform(0.1, 0.6, 3)[:, None, None] + (g[0] * xx + g[1] * yy)
        img = np.broadcast_to(bg, (3, size, size)).copy()
        for k in range(1, int(rng.integers(1, 4)) + 1):
            th = rng.uniform(0, 2 * math.pi)
            m = shape_mask(SHAPES[rng.integers(len(SHAPES))], xx, yy, *rng.uniform(0.2, 0.8, 2),
                           rng.uniform(0.15, 0.3), th)  # fmt: skip
            fg = rng.uniform(0.3, 1.0, 3)[:, None, None] * texture(rng, xx, yy, th)
            img = np.where(m, fg, img)
            masks[i][m] = k
        images[i] = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return torch.from_numpy(images), torch.from_numpy(masks)


def _bundled_photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = [np.asarray(getattr(skimage.data, name)()) for name in _SKIMAGE_PHOTOS]
    out += list(load_sample_images().images)
    return [p[..., :3] for p in out if p.ndim == 3]


def _folder_photos(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in _EXTS)
    if not files:
        raise SlimkitError(f"--images {folder}: no {'/'.join(_EXTS)} files in it")
    photos = []
    for f in files:
        try:
            photos.append(np.asarray(Image.open(f).convert("RGB")))
        except Exception as e:
            raise SlimkitError(f"cannot read {f} as an image ({e})") from None
    return photos


def crops(photos: list[np.ndarray], n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` random square crops (side 1/8 to 1/3 of the short side) resized to ``size``."""
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        h, w = p.shape[:2]
        side = int(rng.uniform(0.125, 0.34) * min(h, w))
        side = max(min(side, h, w), 1)
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        t = torch.from_numpy(np.ascontiguousarray(p[y : y + side, x : x + side])).float() / 255
        t = t.permute(2, 0, 1)[None]
        out[i] = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp(0, 1)  # fmt: skip
    return out


def load_images(spec: str, n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` images [n, 3, size, size] in [0, 1] from ``spec``: ``scenes``, ``photos`` or a
    directory of image files.

    Example:
        >>> load_images("scenes", 4, 32).shape
        torch.Size([4, 3, 32, 32])
    """
    if n < 1:
        raise SlimkitError(f"need at least one image (got {n})")
    if spec == "scenes":
        return scenes(n, size, seed)[0]
    if spec == "photos":
        return crops(_bundled_photos(), n, size, seed)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise SlimkitError(
            f"--images {spec!r}: not a directory; give a folder of images, scenes or photos"
        )
    return crops(_folder_photos(folder), n, size, seed)
