"""COCO-style instance masks: ``annotations.json`` (COCO ``images`` / ``annotations``, masks as
polygons, uncompressed RLE or compressed RLE strings) next to the image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slimkit.core.errors import SlimkitError


def decode_compressed_counts(s: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (6-bit chunks, continuation bit 0x20,
    sign bit 0x10 on the last chunk, counts after the second stored as deltas)."""
    counts: list[int] = []
    i = 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_segmentation(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):  # polygons
        from PIL import Image, ImageDraw

        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        for poly in seg:
            if len(poly) >= 6:
                draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1)
        return np.asarray(img, dtype=bool)
    counts = seg["counts"]
    if isinstance(counts, str):
        counts = decode_compressed_counts(counts)
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in counts:
        flat[pos : pos + c] = val
        pos += c
        val = not val
    return flat.reshape(w, h).T


def load_coco_folder(path: str | Path, size: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """(image size x size x 3 uint8, instance masks) per image: the longest side resized to
    ``size`` and the rest padded with zeros, as SAM's preprocessing does."""
    from PIL import Image

    p = Path(path)
    ann_file = p / "annotations.json"
    if not ann_file.is_file():
        raise SlimkitError(f"{p} has no annotations.json (COCO instance format)")
    data = json.loads(ann_file.read_text())
    by_image: dict[int, list] = {}
    for a in data.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for im in data.get("images", []):
        f = p / im["file_name"]
        if not f.is_file():
            f = p / "images" / im["file_name"]
        if not f.is_file():
            raise SlimkitError(f"image {im['file_name']} of {ann_file} not found")
        img = Image.open(f).convert("RGB")
        h, w = img.height, img.width
        canvas, masks = letterbox(
            img, (decode_segmentation(a["segmentation"], h, w) for a in by_image.get(im["id"], [])),
            size,
        )  # fmt: skip
        if masks:
            out.append((canvas, masks))
    if not out:
        raise SlimkitError(f"{ann_file} has no image with a usable instance mask")
    return out


def fit_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) of an h x w image whose longest side is resized to ``size`` (SAM)."""
    s = size / max(h, w)
    return int(h * s + 0.5), int(w * s + 0.5)


def letterbox_image(img, size: int) -> np.ndarray:
    """size x size x 3 uint8: the longest side resized to ``size`` (bilinear), the rest zeros."""
    from PIL import Image

    nh, nw = fit_size(img.height, img.width, size)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:nh, :nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR))
    return canvas


def letterbox_mask(m: np.ndarray, size: int) -> np.ndarray:
    """size x size bool: an H x W mask resized (nearest) and padded as its image."""
    from PIL import Image

    nh, nw = fit_size(m.shape[0], m.shape[1], size)
    mm = np.zeros((size, size), bool)
    mm[:nh, :nw] = (
        np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 127
    )
    return mm


def letterbox(img, masks, size: int, min_area: int = 10):
    """(size x size x 3 uint8, masks at that size): the longest side resized to ``size`` and the
    rest padded with zeros, as SAM's preprocessing does; masks smaller than ``min_area`` pixels
    after resizing are dropped."""
    canvas = letterbox_image(img, size)
    out = []
    for m in masks:
        mm = letterbox_mask(m, size)
        if mm.sum() >= min_area:
            out.append(mm)
    return canvas, out
