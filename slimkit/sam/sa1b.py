"""SA-1B reader: the official per-image layout, ``sa_N.jpg`` beside ``sa_N.json``.

Each JSON holds ``image`` (``file_name``, ``width``, ``height``, ``image_id``) and
``annotations``: per mask ``segmentation`` (COCO RLE: ``size`` [h, w] and a compressed
``counts`` string), ``bbox`` (XYWH), ``area``, ``point_coords``, ``predicted_iou``,
``stability_score``, ``crop_box``. Masks are decoded with ``pycocotools`` when it is installed,
else with slimkit's own COCO RLE decoder (the same masks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slimkit.core.errors import SlimkitError


def decode_rle(seg: dict) -> np.ndarray:
    """H x W bool mask of a COCO RLE (compressed string or uncompressed list of counts)."""
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise SlimkitError("an SA-1B segmentation must be a COCO RLE with size and counts")
    h, w = (int(v) for v in seg["size"])
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        mask_utils = None
    if mask_utils is not None and isinstance(seg["counts"], str):
        rle = {"size": [h, w], "counts": seg["counts"].encode()}
        return mask_utils.decode(rle).astype(bool)
    from slimkit.sam.coco import decode_segmentation

    return decode_segmentation(seg, h, w)


def read_sa1b_json(path: Path) -> tuple[dict, list[dict]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SlimkitError(f"cannot read {path} as SA-1B JSON ({e})") from None
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise SlimkitError(f"{path} is not an SA-1B annotation file (no image / annotations)")
    return data["image"], data["annotations"]


def load_sa1b_folder(path: str | Path, size: int, limit: int = 0):
    """(image size x size x 3 uint8, instance masks) per image of an SA-1B folder, letterboxed
    to ``size`` as SAM's preprocessing does; ``limit`` > 0 reads only the first images."""
    from PIL import Image

    from slimkit.sam.coco import letterbox

    p = Path(path)
    if not p.is_dir():
        raise SlimkitError(f"SA-1B folder {p} does not exist")
    files = sorted(p.glob("*.json"), key=lambda f: (len(f.stem), f.stem))
    if not files:
        raise SlimkitError(f"{p} holds no SA-1B annotation files (sa_N.json beside sa_N.jpg)")
    out = []
    for f in files[:limit] if limit > 0 else files:
        info, anns = read_sa1b_json(f)
        img_file = p / info.get("file_name", f.stem + ".jpg")
        if not img_file.is_file():
            raise SlimkitError(f"image {img_file.name} of {f.name} not found beside it")
        img = Image.open(img_file).convert("RGB")
        for a in anns:
            hh, ww = a["segmentation"]["size"]
            if (hh, ww) != (img.height, img.width):
                raise SlimkitError(
                    f"{f.name}: a mask of size {hh}x{ww} on an image of {img.height}x{img.width}"
                )
        canvas, masks = letterbox(img, (decode_rle(a["segmentation"]) for a in anns), size)
        if masks:
            out.append((canvas, masks))
    if not out:
        raise SlimkitError(f"{p} has no image with a usable mask")
    return out
