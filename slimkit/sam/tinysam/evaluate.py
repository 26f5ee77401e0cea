"""Evaluation against ground-truth instance masks (``slimkit sam eval``).

Prompted (``--prompts point,box``), per instance: ``1pt`` one positive point at the centre-most
pixel (maximum of the distance transform); ``5pt`` four more clicks, each at the centre-most
pixel of the current error region (positive if it lies in the instance), as SAM's interactive
evaluation; ``box`` the instance's tight box. The highest-scored of the three masks is compared
with the ground truth. Seconds per image cover the image encoding and every prompt.

Everything mode (``--prompts everything``): ``segment_everything`` per image; its masks, in
order of predicted IoU, are matched greedily one-to-one to the ground-truth instances at mask
IoU >= 0.5; recall = matched instances / instances, precision = matched masks / masks (summed
over the images).

Complexity: parameters of the image encoder and of prompt encoder + mask decoder; MACs of the
encoder per image and of the decoder per prompt, counted by ``torch.utils.flop_counter`` over
matmuls and convolutions (it counts FLOPs = 2 x MACs; both columns are given).
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
def evaluate_prompts(model, scenes, clicks: int = 5, point: bool = True, box: bool = True) -> dict:
    """mIoU for 1 point and ``clicks`` points (``point``) and a box (``box``) over every
    instance of ``scenes``."""
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
            for c in range(clicks if point else 0):
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
            if box:
                ys, xs = np.nonzero(m)
                out, iou, _ = pred.predict(
                    box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
                )
                res["box"].append(_iou(out[int(np.argmax(iou))], m))
        seconds.append(time.perf_counter() - t0)
    model.train(was_training)
    out = {f"miou_{k}": float(np.mean(v)) for k, v in res.items() if v}
    return out | {"instances": sum(len(m) for _, m in scenes), "images": len(seconds),
                  "seconds_per_image": float(np.mean(seconds)) if seconds else 0.0}  # fmt: skip


def match_instances(preds: list[np.ndarray], gts: list[np.ndarray], thr: float = 0.5):
    """Greedy one-to-one matching of ``preds`` (best first) to ``gts`` at mask IoU >= ``thr``;
    returns (matched, number of predictions, number of ground-truth instances)."""
    if not preds or not gts:
        return 0, len(preds), len(gts)
    p = np.stack([m.reshape(-1) for m in preds]).astype(np.float32)
    g = np.stack([m.reshape(-1) for m in gts]).astype(np.float32)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    taken = np.zeros(len(gts), bool)
    matched = 0
    for i in range(len(preds)):
        cand = np.where(~taken & (iou[i] >= thr), iou[i], -1.0)
        j = int(cand.argmax())
        if cand[j] >= thr:
            taken[j] = True
            matched += 1
    return matched, len(preds), len(gts)


@torch.no_grad()
def evaluate_everything(model, scenes, cfg) -> dict:
    """Everything-mode recall / precision at mask IoU 0.5 (``cfg``: an ``EverythingConfig``)."""
    from slimkit.sam.everything import sam_predict_fn, segment_everything

    tp = n_pred = n_gt = prompts = 0
    seconds = []
    for img, gts in scenes:
        t0 = time.perf_counter()
        fn, _ = sam_predict_fn(model, img)
        res = segment_everything(fn, img.shape[:2], cfg)
        seconds.append(time.perf_counter() - t0)
        masks = sorted(res["masks"], key=lambda r: -r["predicted_iou"])
        t, p, g = match_instances([r["segmentation"] for r in masks], gts)
        tp, n_pred, n_gt, prompts = tp + t, n_pred + p, n_gt + g, prompts + res["prompts"]
    return {"everything_recall": tp / max(n_gt, 1), "everything_precision": tp / max(n_pred, 1),
            "everything_masks_per_image": n_pred / max(len(seconds), 1),
            "everything_prompts_per_image": prompts / max(len(seconds), 1),
            "everything_seconds_per_image": float(np.mean(seconds)) if seconds else 0.0}  # fmt: skip


@torch.no_grad()
def complexity(model) -> dict:
    """Parameters, MACs and FLOPs (= 2 x MACs) of the encoder per image and of the decoder per
    prompt (one point), counted by ``torch.utils.flop_counter`` (matmuls, convolutions)."""
    size = model.cfg.img_size
    dev = next(model.parameters()).device
    # the counter's module tracker hooks the gradients of outputs: parameters must be frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        enc, dec = _count(model, size, dev)
    finally:
        for p in trainable:
            p.requires_grad_(True)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    return {"params_encoder": count(model.image_encoder),
            "params_decoder": count(model.prompt_encoder) + count(model.mask_decoder),
            "macs_encoder": enc // 2, "flops_encoder": enc,
            "macs_decoder_per_prompt": dec // 2, "flops_decoder_per_prompt": dec}  # fmt: skip


def _count(model, size: int, dev) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        emb = model.image_encoder(torch.zeros(1, 3, size, size, device=dev))
    enc = int(fc.get_total_flops())
    pts = (
        torch.full((1, 1, 2), size / 2, device=dev),
        torch.ones(1, 1, dtype=torch.long, device=dev),
    )
    with FlopCounterMode(display=False) as fc:
        model.decode(emb, points=pts)
    return enc, int(fc.get_total_flops())


PROMPT_KINDS = ("point", "box", "everything")


@dataclass
class EvalConfig:
    data: str = field(
        default="scenes",
        metadata={"help": "scenes (held-out generated), coco:DIR (annotations.json + images) "
                          "or sa1b:DIR (SA-1B sa_N.json beside sa_N.jpg)"},
    )  # fmt: skip
    scenes: int = field(default=50, metadata={"help": "held-out generated scenes"})
    first_seed: int = field(
        default=TEST_SEED,
        metadata={"help": "seed of the first scene (validation scenes start at 1000000)"},
    )
    limit: int = field(default=0, metadata={"help": "coco / sa1b: only the first N images"})
    prompts: str = field(
        default="point,box",
        metadata={"help": "comma list of point (1 and --clicks points), box, everything"},
    )
    clicks: int = field(default=5, metadata={"help": "points of the interactive protocol (>= 2)"})
    everything_mode: str = field(
        default="hierarchical",
        metadata={"help": "everything sampler", "choices": ["dense", "hierarchical"]},
    )
    points_per_side: int = field(
        default=16, metadata={"help": "everything: dense grid points per side"}
    )
    int8_kernels: bool = field(
        default=False, metadata={"help": "a quantized run: integer matmuls for its linears"}
    )
    device: str = field(
        default="cpu", metadata={"help": "auto (the GPU if any, else CPU), cpu, cuda[:N]"}
    )

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.clicks < 2 or self.limit < 0 or self.points_per_side < 4:
            raise SlimkitError("--scenes must be >= 1, --clicks >= 2, --limit >= 0 and "
                               "--points-per-side >= 4")  # fmt: skip
        kinds = [k.strip() for k in self.prompts.split(",") if k.strip()]
        bad = [k for k in kinds if k not in PROMPT_KINDS]
        if bad or not kinds:
            raise SlimkitError(f"--prompts takes a comma list of {', '.join(PROMPT_KINDS)} "
                               f"(got {self.prompts!r})")  # fmt: skip
        if not (self.data == "scenes" or self.data.startswith(("coco:", "sa1b:"))):
            raise SlimkitError(f"--data must be scenes, coco:DIR or sa1b:DIR (got {self.data!r})")

    def kinds(self) -> list[str]:
        return [k.strip() for k in self.prompts.split(",") if k.strip()]


def load_data(cfg: EvalConfig, size: int):
    """(image, instance masks) pairs of ``cfg.data`` at the model's input size."""
    if cfg.data == "scenes":
        return validation_scenes(size, cfg.scenes, cfg.first_seed)
    kind, _, path = cfg.data.partition(":")
    if kind == "sa1b":
        from slimkit.sam.sa1b import load_sa1b_folder

        return load_sa1b_folder(path, size, cfg.limit)
    from slimkit.sam.coco import load_coco_folder

    data = load_coco_folder(path, size)
    return data[: cfg.limit] if cfg.limit else data


def load_any(path: str | Path, int8_kernels: bool = False):
    """A quantized run (quant.json), a slimkit SAM run (sam_config.json) or a SAM checkpoint."""
    from slimkit.sam.checkpoint import load_sam
    from slimkit.sam.train import load_trained

    p = Path(path)
    if not p.exists():
        raise SlimkitError(f"{p} does not exist")
    if (p / "quant.json").is_file():
        from slimkit.sam.tinysam.quant import load_quantized

        return load_quantized(p, int8_kernels=int8_kernels)
    if int8_kernels:
        raise SlimkitError(f"--int8-kernels needs a quantized run (sam quantize); {p} is not one")
    if (p / "sam_config.json").is_file() or p.name == "model.safetensors":
        return load_trained(p)
    return load_sam(p)


def evaluate_model(path: str | Path, cfg: EvalConfig) -> dict:
    from slimkit.core.dist import resolve_device
    from slimkit.sam.everything import EverythingConfig

    torch.set_grad_enabled(False)
    try:
        dev = resolve_device(cfg.device)
        model = load_any(path).to(dev).eval()
        cx = complexity(model)
        if cfg.int8_kernels:
            model = load_any(path, int8_kernels=True).to(dev).eval()
        data = load_data(cfg, model.cfg.img_size)
        kinds = cfg.kinds()
        r = {}
        if "point" in kinds or "box" in kinds:
            r |= evaluate_prompts(model, data, cfg.clicks, "point" in kinds, "box" in kinds)
        if "everything" in kinds:
            ev = EverythingConfig(mode=cfg.everything_mode, points_per_side=cfg.points_per_side)
            r |= evaluate_everything(model, data, ev)
        if cfg.int8_kernels:
            from slimkit.sam.tinysam.quant import int8_kernel_report

            r["int8_kernels"] = int8_kernel_report(model)
    finally:
        torch.set_grad_enabled(True)
    return {"model": str(path), "data": cfg.data, "images": len(data),
            "scenes": cfg.scenes if cfg.data == "scenes" else None,
            "first_seed": cfg.first_seed, "clicks": cfg.clicks, "prompts": kinds, **cx, **r}  # fmt: skip
