"""Paired HR / LR data for super-resolution, with SPE maps aligned in HR coordinates.

Image sources (``images``):
- ``synthetic``: piecewise-textured images (Voronoi cells, each filled with oriented stripes of
  random frequency, checks, a smooth gradient or noise) with their known segment maps, the
  SAM stand-in of the small-scale check;
- ``photos`` or ``photos:NAME,NAME``: the bundled real photos (scikit-image, scikit-learn,
  matplotlib; see ``PHOTOS``);
- a folder of ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` / ``.tif`` files (any HR set, e.g.
  DIV2K_train_HR).

Every HR image is cut to a multiple of the scale; its LR image is MATLAB bicubic 1/s (rounded
to uint8) and U(LR) the MATLAB bicubic x s of the whole LR image. A training patch takes one
window in HR coordinates (y, x multiples of s) from the HR image, U(LR) and E, and the matching
window y/s, x/s from the LR image, then the same flips for all four. (The official data path
crops E with LR coordinates and re-zooms it, misaligning E with the image by a factor 4; this is
not copied.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.sr.degrade import crop_to_multiple, degrade, upsample
from slimkit.sr.structural_position_encoding import encode_labels

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry", "motorcycle", "china", "flower", "grace_hopper")  # fmt: skip
EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------
def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # oriented stripes, random frequency
        th, f = rng.uniform(0, math.pi), rng.uniform(0.15, 0.9)
        return 0.5 + 0.5 * np.sin(f * (xx * math.cos(th) + yy * math.sin(th)) + rng.uniform(0, 6))
    if kind == 1:  # checks
        p = rng.integers(2, 7)
        return ((xx // p + yy // p) % 2).astype(np.float64)
    if kind == 2:  # smooth gradient
        g = rng.uniform(-1, 1, 2) / max(xx.shape)
        v = g[0] * xx + g[1] * yy
        return (v - v.min()) / (np.ptp(v) + 1e-9)
    return rng.uniform(0, 1, xx.shape)  # noise


def synthetic_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One piecewise-textured image uint8 [S, S, 3] and its segment labels [S, S] (int)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    k = int(rng.integers(3, 9))
    seeds = rng.uniform(0, size, (k, 2))
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    labels = d.argmin(-1)
    img = np.zeros((size, size, 3))
    for c in range(k):
        lo, hi = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1, 3)
        t = _texture(rng, yy, xx)[..., None]
        img = np.where((labels == c)[..., None], lo + (hi - lo) * t, img)
    return np.round(img * 255).astype(np.uint8), labels


def bundled_photo(name: str) -> np.ndarray:
    """A bundled photo as uint8 RGB [H, W, 3] (offline)."""
    if name not in PHOTOS:
        raise SlimkitError(f"unknown bundled photo {name!r}; one of: {', '.join(PHOTOS)}")
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        return np.asarray(
            Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
        )
    import skimage.data

    img = (
        skimage.data.stereo_motorcycle()[0]
        if name == "motorcycle"
        else getattr(skimage.data, name)()
    )
    return np.ascontiguousarray(np.asarray(img)[..., :3])


def read_image(path: str | Path) -> np.ndarray:
    from PIL import Image

    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except Exception as e:
        raise SlimkitError(f"cannot read {path} as an image ({e})") from None


@dataclass
class HRImage:
    key: str  # file stem relative to the folder, photo name, or synthetic/NNNNN
    hr: np.ndarray  # uint8 [H, W, 3]
    labels: np.ndarray | None = None  # known segments (synthetic only)


def load_hr_images(spec: str, *, n: int = 0, size: int = 64, seed: int = 0) -> list[HRImage]:
    """The HR images that ``spec`` names (see the module doc); ``n`` / ``size`` / ``seed`` are
    for ``synthetic`` (``n`` = 0: all the images of a folder / photo list)."""
    if spec == "synthetic":
        if n < 1:
            raise SlimkitError("synthetic images need a count >= 1")
        rng = np.random.default_rng(seed)
        return [HRImage(f"synthetic/{i:05d}", *synthetic_image(size, rng)) for i in range(n)]
    if spec == "photos" or spec.startswith("photos:"):
        names = [s for s in spec.partition(":")[2].split(",") if s] or list(PHOTOS)
        return [HRImage(name, bundled_photo(name)) for name in names]
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise SlimkitError(
            f"--images {spec!r}: not a folder; give a folder of images, synthetic, or photos[:NAME,...]"
        )
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in EXTS)
    if not files:
        raise SlimkitError(f"--images {folder}: no {'/'.join(EXTS)} files in it")
    return [HRImage(str(f.relative_to(folder).with_suffix("")), read_image(f)) for f in files]


def mask_file(masks_dir: str | Path, key: str) -> Path:
    return Path(masks_dir) / f"{key}.npy"


def load_e_map(masks_dir: str | Path, key: str, shape: tuple[int, int]) -> np.ndarray:
    """The SPE map of image ``key`` written by ``slimkit sr make-masks`` (float32 [H, W] .npy,
    read without unpickling), cut to the image's multiple-of-scale size."""
    f = mask_file(masks_dir, key)
    if not f.is_file():
        raise SlimkitError(
            f"no SPE map for image {key!r} in {masks_dir} (run slimkit sr make-masks on these images)"
        )
    try:
        e = np.load(f, allow_pickle=False, mmap_mode="r")  # cut per patch, never all in memory
    except ValueError as err:
        raise SlimkitError(f"{f} is not a plain .npy array ({err})") from None
    if e.ndim != 2 or e.shape[0] < shape[0] or e.shape[1] < shape[1]:
        raise SlimkitError(f"{f}: SPE map of shape {e.shape} does not cover the image {shape}")
    if e.dtype != np.float32:
        raise SlimkitError(f"{f}: SPE map of dtype {e.dtype}, expected float32")
    return e[: shape[0], : shape[1]]


# ---------------------------------------------------------------------------------------
# pairs and patches
# ---------------------------------------------------------------------------------------
def to_signed(x_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(x_uint8, copy=True)).permute(2, 0, 1).float() / 127.5 - 1


def make_pair(
    hr_uint8: np.ndarray, scale: int, compat_scale: bool = False
) -> dict[str, torch.Tensor]:
    """HR, LR and U(LR) as float [3, ., .] in [-1, 1]. ``compat_scale`` reproduces SRDiff's
    division of the uint8 LR by 256 (not 255) before upsampling."""
    hr = crop_to_multiple(hr_uint8, scale)
    lr = degrade(hr, scale)
    lr_t = torch.from_numpy(lr).permute(2, 0, 1).double()
    up = upsample(lr_t / (256.0 if compat_scale else 255.0), scale).float() * 2 - 1
    return {"hr": to_signed(hr), "lr": to_signed(lr), "lr_up": up}


class PairedPatches:
    """Random aligned patches of (HR, LR, U(LR), E).

    Images are kept as uint8 (HR and LR) and E as given (a memory-mapped .npy stays on disk);
    U(LR) of a patch is the bicubic x s of its LR window widened by 2 LR pixels (the kernel's
    reach), so it equals the crop of the whole image's U(LR) without computing or storing it.

    Args:
        images: HR images (each at least ``patch`` pixels on each side after the crop).
        e_maps: one float [H, W] map per image in HR coordinates, or None (SRDiff).
        scale: SR factor; patch: HR patch side (multiple of ``scale``); flips: random
            horizontal / vertical flips (the official recipe has none).
    """

    def __init__(self, images: list[HRImage], e_maps: list[np.ndarray] | None, *, scale: int,
                 patch: int, flips: bool = False, compat_scale: bool = False):  # fmt: skip
        if patch % scale:
            raise SlimkitError(f"--patch {patch} must be a multiple of --scale {scale}")
        if not images:
            raise SlimkitError("no training images")
        self.scale, self.patch, self.flips = scale, patch, flips
        self.divisor = 256.0 if compat_scale else 255.0
        self.hr, self.lr = [], []
        for im in images:
            hr = crop_to_multiple(im.hr, scale)
            h, w = hr.shape[:2]
            if h < patch or w < patch:
                raise SlimkitError(
                    f"image {im.key} ({h} x {w}) is smaller than the {patch}-pixel patch"
                )
            self.hr.append(torch.from_numpy(np.array(hr, copy=True)).permute(2, 0, 1))
            self.lr.append(torch.from_numpy(degrade(hr, scale)).permute(2, 0, 1))
        self.e = None if e_maps is None else list(e_maps)

    def __len__(self) -> int:
        return len(self.hr)

    def _lr_up(self, i: int, ly: int, lx: int, n: int) -> torch.Tensor:
        lr = self.lr[i]
        h, w = lr.shape[1:]
        y0, x0 = max(ly - 2, 0), max(lx - 2, 0)
        y1, x1 = min(ly + n + 2, h), min(lx + n + 2, w)
        up = upsample(lr[:, y0:y1, x0:x1].double() / self.divisor, self.scale).float() * 2 - 1
        s, p = self.scale, n * self.scale
        return up[:, (ly - y0) * s : (ly - y0) * s + p, (lx - x0) * s : (lx - x0) * s + p]

    def window(self, i: int, y: int, x: int, flip_h: bool = False, flip_v: bool = False) -> dict:
        """The patch of image ``i`` whose top-left HR pixel is (y, x) (multiples of the scale)."""
        s, p = self.scale, self.patch
        if y % s or x % s:
            raise ValueError(f"patch corner ({y}, {x}) is not on the LR grid of scale {s}")
        out = {
            "hr": self.hr[i][:, y : y + p, x : x + p].float() / 127.5 - 1,
            "lr_up": self._lr_up(i, y // s, x // s, p // s),
            "lr": self.lr[i][:, y // s : (y + p) // s, x // s : (x + p) // s].float() / 127.5 - 1,
        }
        if self.e is not None:  # the same HR window as the image
            out["e"] = torch.from_numpy(np.array(self.e[i][y : y + p, x : x + p], np.float32))[None]
        dims = ([-1] if flip_h else []) + ([-2] if flip_v else [])
        if dims:
            out = {k: v.flip(dims) for k, v in out.items()}
        return out

    def batch(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``n`` random patches (a deterministic function of ``generator``'s state)."""
        s, p = self.scale, self.patch
        items = []
        for _ in range(n):
            i = int(torch.randint(len(self.hr), (1,), generator=generator))
            h, w = self.hr[i].shape[1:]
            y = int(torch.randint((h - p) // s + 1, (1,), generator=generator)) * s
            x = int(torch.randint((w - p) // s + 1, (1,), generator=generator)) * s
            fh, fv = (torch.rand(2, generator=generator) < 0.5).tolist()
            items.append(self.window(i, y, x, fh and self.flips, fv and self.flips))
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def e_maps_for(images: list[HRImage], masks: str, control: str = "none") -> list[np.ndarray] | None:
    """SPE maps of ``images``: ``masks`` = "" (SRDiff: none), ``segments`` (the known segments
    of synthetic images) or a make-masks folder. ``control``: ``none``; ``other-image`` (each
    image gets the map of the next image, resized: structure-mismatched); ``constant`` (the
    image-mean value of its own map everywhere)."""
    if not masks:
        return None
    if masks == "segments":
        if any(im.labels is None for im in images):
            raise SlimkitError("--masks segments needs --images synthetic (known segments)")
        maps = [encode_labels(im.labels) for im in images]
    else:
        maps = [load_e_map(masks, im.key, im.hr.shape[:2]) for im in images]
    if control == "none":
        return maps
    if control == "constant":
        return [np.full(m.shape, float(np.mean(m)), np.float32) for m in maps]
    if control == "other-image":
        if len(maps) < 2:
            raise SlimkitError("--control other-image needs at least 2 training images")
        out = []
        for i, m in enumerate(maps):
            o = torch.from_numpy(np.array(maps[(i + 1) % len(maps)], np.float32))[None, None]
            out.append(torch.nn.functional.interpolate(o, size=m.shape, mode="bilinear",
                                                       align_corners=False)[0, 0].numpy())  # fmt: skip
        return out
    raise SlimkitError(f"--control must be none, other-image or constant (got {control!r})")
