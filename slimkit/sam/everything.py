"""Segment everything: prompt a grid of points, keep good masks, remove duplicates.

Samplers (pluggable):
- ``dense``: SAM's grid of ``points_per_side``^2 points.
- ``hierarchical`` (TinySAM): a sparse pass on a (points_per_side / 4)^2 grid; the pixels whose
  logit exceeds ``high_score_thresh`` (a logit, default 8.5) in any surviving sparse mask form the
  confident region C; dense candidates p + (a s_x, b s_y) around every sparse point p, with
  s = size // points_per_side and a, b in {-1, 0, 1, 2} minus (0, 0) (the +2 offsets only inside
  the image), are prompted only outside C; both passes are merged.

Filters (both samplers): predicted IoU > ``pred_iou_thresh``; stability score (area above
+offset over area above -offset of the logits) >= ``stability_score_thresh``; box NMS at
``box_nms_thresh`` scored by predicted IoU; optional removal of small islands and holes.
Output: one record per mask (segmentation, area, bbox XYWH, predicted_iou, stability_score,
point), plus the number of prompts, the seconds spent and (hierarchical) the share of the image
inside the confident region.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

SAMPLERS = Registry("everything sampler")
# predict(points (N, 2) float xy in original pixels) -> (logits (N, 3, H, W), iou (N, 3))
PredictFn = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EverythingConfig:
    mode: str = field(
        default="hierarchical",
        metadata={"help": "dense | hierarchical", "choices": ["dense", "hierarchical"]},
    )
    points_per_side: int = field(default=32, metadata={"help": "dense grid points per side"})
    points_per_batch: int = field(default=64, metadata={"help": "prompts per decoder call"})
    pred_iou_thresh: float = field(default=0.88, metadata={"help": "minimum predicted IoU"})
    stability_score_thresh: float = field(
        default=0.95, metadata={"help": "minimum stability score"}
    )
    stability_score_offset: float = field(
        default=1.0, metadata={"help": "logit offset of the stability score"}
    )
    box_nms_thresh: float = field(
        default=0.7, metadata={"help": "box IoU above which duplicates are removed"}
    )
    high_score_thresh: float = field(
        default=8.5, metadata={"help": "hierarchical: logit of the confident region"}
    )
    min_mask_region_area: int = field(
        default=0, metadata={"help": "remove islands and holes smaller than this (pixels)"}
    )

    def __post_init__(self) -> None:
        if self.points_per_side < 4 or (self.mode == "hierarchical" and self.points_per_side % 4):
            raise SlimkitError(
                "--points-per-side must be >= 4 (and a multiple of 4 for hierarchical)"
            )


def grid_points(n: int, w: int, h: int) -> np.ndarray:
    xs = (np.arange(n) + 0.5) / n * w
    ys = (np.arange(n) + 0.5) / n * h
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


def dense_candidates(sparse: np.ndarray, w: int, h: int, points_per_side: int) -> np.ndarray:
    """TinySAM's dense lattice around the sparse points (the sparse points themselves excluded)."""
    sx, sy = w // points_per_side, h // points_per_side
    out = []
    for px, py in sparse:
        for a in (-1, 0, 1, 2):
            for b in (-1, 0, 1, 2):
                if a == 0 and b == 0:
                    continue
                x, y = px + a * sx, py + b * sy
                if 0 <= x < w and 0 <= y < h:
                    out.append((x, y))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def outside_region(points: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Points whose pixel (row y, column x) is not in the boolean H x W ``region``."""
    if len(points) == 0:
        return points
    xi = np.clip(points[:, 0].astype(int), 0, region.shape[1] - 1)
    yi = np.clip(points[:, 1].astype(int), 0, region.shape[0] - 1)
    return points[~region[yi, xi]]


def stability_score(logits: torch.Tensor, thr: float, offset: float) -> torch.Tensor:
    hi = (logits > thr + offset).flatten(-2).sum(-1).float()
    lo = (logits > thr - offset).flatten(-2).sum(-1).float()
    return hi / lo.clamp(min=1)


@dataclass
class Pass:
    masks: list = field(default_factory=list)  # (logits H x W, iou, stability, point)
    prompts: int = 0
    confident: float | None = None  # hierarchical sparse pass: share of pixels in C


def _run(
    points: np.ndarray, predict: PredictFn, cfg: EverythingConfig, confident: np.ndarray | None
) -> Pass:
    res = Pass()
    for i in range(0, len(points), cfg.points_per_batch):
        pts = points[i : i + cfg.points_per_batch]
        logits, iou = predict(pts)
        res.prompts += len(pts)
        stab = stability_score(logits, 0.0, cfg.stability_score_offset)
        keep = (iou > cfg.pred_iou_thresh) & (stab >= cfg.stability_score_thresh)
        for n, k in zip(*torch.nonzero(keep, as_tuple=True)):
            lg = logits[n, k]
            if confident is not None:
                confident |= (lg > cfg.high_score_thresh).cpu().numpy()
            res.masks.append((lg.gt(0).cpu(), float(iou[n, k]), float(stab[n, k]), pts[n].tolist()))
    return res


@SAMPLERS.register("dense", help="SAM's full grid")
def dense_sampler(predict: PredictFn, w: int, h: int, cfg: EverythingConfig):
    return [_run(grid_points(cfg.points_per_side, w, h), predict, cfg, None)]


@SAMPLERS.register(
    "hierarchical", help="TinySAM: sparse grid, dense points only outside confident regions"
)
def hierarchical_sampler(predict: PredictFn, w: int, h: int, cfg: EverythingConfig):
    sparse = grid_points(cfg.points_per_side // 4, w, h)
    confident = np.zeros((h, w), dtype=bool)
    first = _run(sparse, predict, cfg, confident)
    first.confident = float(confident.mean())
    cand = outside_region(dense_candidates(sparse, w, h, cfg.points_per_side), confident)
    second = _run(cand, predict, cfg, None)
    return [first, second]


def _box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def remove_small_regions(mask: np.ndarray, area: int) -> np.ndarray:
    from scipy import ndimage

    out = mask.copy()
    for fill in (False, True):  # islands of the mask, then holes
        target = out if not fill else ~out
        lab, n = ndimage.label(target)
        sizes = ndimage.sum(target, lab, range(1, n + 1))
        small = np.isin(lab, 1 + np.flatnonzero(sizes < area))
        out = out & ~small if not fill else out | small
    return out


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], cuts, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in rle["counts"]:
        flat[pos : pos + c] = val
        pos += c
        val = not val
    return flat.reshape(w, h).T


def segment_everything(predict: PredictFn, size: tuple[int, int], cfg: EverythingConfig) -> dict:
    """Run the sampler, merge, NMS; ``size`` = (H, W) of the original image."""
    from torchvision.ops import nms

    h, w = size
    t0 = time.perf_counter()
    passes = SAMPLERS.get(cfg.mode)(predict, w, h, cfg)
    found = [m for p in passes for m in p.masks]
    records = []
    if found:
        boxes = torch.tensor([_box(m[0]) for m in found], dtype=torch.float32)
        scores = torch.tensor([m[1] for m in found])
        keep = nms(boxes, scores, cfg.box_nms_thresh).tolist()
        for i in keep:
            mask, iou, stab, pt = found[i]
            m = mask.numpy()
            if cfg.min_mask_region_area:
                m = remove_small_regions(m, cfg.min_mask_region_area)
            if not m.any():
                continue
            x0, y0, x1, y1 = _box(torch.from_numpy(m))
            records.append({"segmentation": m, "area": int(m.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "predicted_iou": iou, "stability_score": stab, "point_coords": [pt]})  # fmt: skip
    return {
        "masks": records,
        "prompts": sum(p.prompts for p in passes),
        "prompts_per_pass": [p.prompts for p in passes],
        # hierarchical: share of the image in the confident region (its dense points are skipped)
        "confident_fraction": next((p.confident for p in passes if p.confident is not None), None),
        "seconds": time.perf_counter() - t0,
    }


def sam_predict_fn(model, image: np.ndarray) -> tuple[PredictFn, float]:
    """A ``PredictFn`` over one image for a slimkit SAM (the image is encoded once)."""
    from slimkit.sam.predictor import SamPredictor

    t0 = time.perf_counter()
    pred = SamPredictor(model)
    pred.set_image(image)
    enc = time.perf_counter() - t0
    h, w = image.shape[:2]
    nh, nw = pred.input_size

    @torch.no_grad()
    def predict(points: np.ndarray):
        c = torch.as_tensor(points, dtype=torch.float32).clone()
        c[:, 0] *= nw / w
        c[:, 1] *= nh / h
        c = c.to(pred.device)
        labels = torch.ones(len(points), 1, dtype=torch.int64, device=pred.device)
        low, iou = model.decode(pred.features, (c[:, None], labels), None, None, True)
        return model.postprocess(low, pred.input_size, (h, w)), iou

    return predict, enc


def overlay(image: np.ndarray, masks: list[dict], path: str, seed: int = 0) -> None:
    """The image with every mask in its own colour and its outline, as a PNG."""
    from PIL import Image
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = image.astype(np.float32).copy()
    for m in sorted(masks, key=lambda r: -r["area"]):
        seg = m["segmentation"]
        color = rng.uniform(40, 255, 3)
        out[seg] = 0.45 * out[seg] + 0.55 * color
        edge = seg & ~ndimage.binary_erosion(seg)
        out[edge] = color * 0.6
    Image.fromarray(out.clip(0, 255).astype(np.uint8)).save(path)
