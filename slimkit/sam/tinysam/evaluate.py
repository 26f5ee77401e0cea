"""Point- and box-prompted mIoU against ground-truth instance masks (``slimkit sam eval``).

Protocol per instance: ``1pt`` one positive point at the centre-most pixel (maximum of the
distance transform); ``5pt`` four more clicks, each at the centre-most pixel of the current
error region (positive if it lies in the instance), as SAM's interactive evaluation; ``box``
the instance's tight box. The highest-scored of the three masks is compared with the ground
truth. Seconds per image cover the image encoding and every prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.sam.train import VAL_SEED, draw_scene

TEST_SEED = 3_000_000  # held-out scenes for reported numbers (validation: VAL_SEED + i)


def validation_scenes(size: int, n: int, base: int = VAL_SEED):
    return [draw_scene(size, base + i) for i in range(n)]


def _centre(region: np.ndarray) -> tuple[int, int]:
    from scipy import ndimage

    d = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(d.argmax(), d.shape)
    return int(x), int(y)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@torch.no_grad()
def evaluate_prompts(model, scenes, clicks: int = 5) -> dict:
    """mIoU for 1 point, ``clicks`` points and a box over every instance of ``scenes``."""
    from slimkit.sam.predictor import SamPredictor

    was_training = model.training
    pred = SamPredictor(model)
    res = {"1pt": [], f"{clicks}pt": [], "box": []}
    seconds = []
    for img, masks in scenes:
        t0 = time.perf_counter()
        pred.set_image(img)
        for m in masks:
            pts, labels = [_centre(m)], [1]
            for c in range(clicks):
                out, iou, _ = pred.predict(np.array(pts, np.float32), np.array(labels))
                best = out[int(np.argmax(iou))]
                if c == 0:
                    res["1pt"].append(_iou(best, m))
                err = best ^ m
                if c == clicks - 1 or not err.any():
                    res[f"{clicks}pt"].append(_iou(best, m))
                    break
                x, y = _centre(err)
                pts.append((x, y))
                labels.append(int(m[y, x]))
            ys, xs = np.nonzero(m)
            out, iou, _ = pred.predict(
                box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            )
            res["box"].append(_iou(out[int(np.argmax(iou))], m))
        seconds.append(time.perf_counter() - t0)
    model.train(was_training)
    return {f"miou_{k}": float(np.mean(v)) if v else 0.0 for k, v in res.items()} | {
        "instances": len(res["box"]), "images": len(seconds),
        "seconds_per_image": float(np.mean(seconds)) if seconds else 0.0}  # fmt: skip


@dataclass
class EvalConfig:
    scenes: int = field(default=50, metadata={"help": "held-out generated scenes"})
    first_seed: int = field(
        default=TEST_SEED,
        metadata={"help": "seed of the first scene (validation scenes start at 1000000)"},
    )
    clicks: int = field(default=5, metadata={"help": "points of the interactive protocol (>= 2)"})
    device: str = field(
        default="cpu", metadata={"help": "auto (the GPU if any, else CPU), cpu, cuda[:N]"}
    )

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.clicks < 2:
            raise SlimkitError("--scenes must be >= 1 and --clicks >= 2")


def load_any(path: str | Path):
    """A quantized run (quant.json), a slimkit SAM run (sam_config.json) or a SAM checkpoint."""
    from slimkit.sam.checkpoint import load_sam
    from slimkit.sam.train import load_trained

    p = Path(path)
    if not p.exists():
        raise SlimkitError(f"{p} does not exist")
    if (p / "quant.json").is_file():
        from slimkit.sam.tinysam.quant import load_quantized

        return load_quantized(p)
    if (p / "sam_config.json").is_file() or p.name == "model.safetensors":
        return load_trained(p)
    return load_sam(p)


def evaluate_model(path: str | Path, cfg: EvalConfig) -> dict:
    from slimkit.core.dist import resolve_device

    torch.set_grad_enabled(False)
    try:
        model = load_any(path).to(resolve_device(cfg.device)).eval()
        scenes = validation_scenes(model.cfg.img_size, cfg.scenes, cfg.first_seed)
        r = evaluate_prompts(model, scenes, cfg.clicks)
    finally:
        torch.set_grad_enabled(True)
    return {"model": str(path), "scenes": cfg.scenes, "first_seed": cfg.first_seed,
            "clicks": cfg.clicks, **r}  # fmt: skip
