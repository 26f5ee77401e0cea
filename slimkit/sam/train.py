"""Train a small promptable segmentation model offline (``slimkit sam train``).

Data: procedurally generated scenes (``draw_scene``): 3-8 textured shapes over a textured
background with clutter; later shapes occlude earlier ones, and each instance mask is exactly
its visible part. Scene i of the training set is drawn from seed i, validation scenes from seeds
10^6 + i, so the sets never overlap and are identical across runs.

Step: a batch of scenes is encoded once; for up to ``prompts_per_image`` instances a prompt is
drawn (one positive point inside the instance, or its box, with probability ``box_prob``);
the decoder predicts three masks; loss = min over the three of (20 focal + dice) against the
instance (SAM's multimask loss) + MSE between the predicted and the actual IoU of every mask.
AdamW, warm-up + cosine, gradient clipping, a checkpoint every ``checkpoint_every`` steps and
exact ``--resume``. The model is written as ``model.safetensors`` with the official key names
plus ``sam_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.core.optim import warmup_cosine
from slimkit.sam.model import SAM_ALIASES, SAM_CONFIGS, Sam, build_sam
from slimkit.train import TRAINERS, LoopOptions, Trainer, TrainTask, run_task
from slimkit.vision.data import SHAPES, clutter, shape_mask, texture

log = logging.getLogger("slimkit")
VAL_SEED = 1_000_000


def draw_scene(size: int, seed: int, n_min: int = 3, n_max: int = 8, min_area: int = 30):
    """(image H x W x 3 uint8, instance masks list of H x W bool), visible parts only."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    g = rng.uniform(-0.2, 0.2, 2)
    img = rng.uniform(0.2, 0.8, 3)[:, None, None] * texture(rng, xx, yy, rng.uniform(0, math.pi))
    img = img + (g[0] * xx + g[1] * yy)
    owner = np.full((size, size), -1)
    for k in range(rng.integers(n_min, n_max + 1)):
        name = SHAPES[rng.integers(len(SHAPES))]
        m = shape_mask(
            name,
            xx,
            yy,
            *rng.uniform(0.1, 0.9, 2),
            rng.uniform(0.07, 0.2),
            rng.uniform(0, 2 * math.pi),
        )
        color = rng.uniform(0, 1, 3)[:, None, None] * texture(rng, xx, yy, rng.uniform(0, math.pi))
        img = np.where(m, color, img)
        owner[m] = k
    img = clutter(rng, img, xx, yy, rng.integers(0, 4))
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    masks = [owner == k for k in range(owner.max() + 1) if (owner == k).sum() >= min_area]
    return (img.transpose(1, 2, 0) * 255).astype(np.uint8), masks


@dataclass
class SamTrainConfig:
    arch: str = field(default="vit_mini", metadata={"help": "SAM architecture (vit_mini for CPU)"})
    init: str = field(default="", metadata={"help": "start from this checkpoint"})
    data: str = field(
        default="scenes",
        metadata={
            "help": "scenes (generated) or coco:PATH (annotations.json + images; every 10th image validates)"
        },
    )
    scenes: int = field(default=2000, metadata={"help": "training scenes (seeds 0..N-1)"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "images per step"})
    prompts_per_image: int = field(default=4, metadata={"help": "instances prompted per image"})
    box_prob: float = field(
        default=0.3, metadata={"help": "probability of a box prompt instead of a point"}
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    checkpoint_every: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    val_scenes: int = field(
        default=50, metadata={"help": "validation scenes (one point per instance)"}
    )
    seed: int = field(default=0, metadata={"help": "initialisation and prompt seed"})
    device: str = field(
        default="auto", metadata={"help": "auto (the GPU if any, else CPU), cpu, cuda[:N]"}
    )

    def __post_init__(self) -> None:
        self.arch = SAM_ALIASES.get(self.arch.lower(), self.arch)
        if self.arch not in SAM_CONFIGS:
            raise SlimkitError(
                f"unknown SAM architecture {self.arch!r}; choose one of: {', '.join([*SAM_CONFIGS, *SAM_ALIASES])}"
            )
        if min(self.steps, self.batch_size, self.scenes, self.prompts_per_image) < 1:
            raise SlimkitError(
                "--steps, --batch-size, --scenes and --prompts-per-image must be >= 1"
            )


def _prompts(masks: list[np.ndarray], k: int, rng: np.random.Generator, box_prob: float):
    """Up to k (mask, point or box) prompts, one per chosen instance."""
    idx = rng.permutation(len(masks))[:k]
    out = []
    for i in idx:
        ys, xs = np.nonzero(masks[i])
        if rng.random() < box_prob:
            out.append(
                (
                    masks[i],
                    None,
                    np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32),
                )
            )
        else:
            j = rng.integers(len(xs))
            out.append((masks[i], np.array([[xs[j], ys[j]]], np.float32), None))
    return out


def mask_losses(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """logits (K, 3, h, w), target (K, h, w) in {0, 1}, iou_pred (K, 3) -> scalar."""
    t = target[:, None].expand_as(logits)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    pt = p * t + (1 - p) * (1 - t)
    focal = ((0.25 * t + 0.75 * (1 - t)) * (1 - pt) ** 2 * ce).flatten(2).mean(-1)
    inter = (p * t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    per_mask = 20 * focal + dice
    hard = logits > 0
    actual = (
        (hard & (t > 0.5)).flatten(2).sum(-1) / ((hard | (t > 0.5)).flatten(2).sum(-1)).clamp(min=1)
    ).float()
    return per_mask.min(1).values.mean() + F.mse_loss(iou_pred, actual.detach())


def _step_loss(
    model: Sam,
    images: list[np.ndarray],
    masks: list[list[np.ndarray]],
    cfg: SamTrainConfig,
    rng,
    mine: slice | None = None,
) -> torch.Tensor:
    """The mean loss over the prompts of one global batch. Prompts are drawn for every image
    from ``rng`` in batch order; with ``mine`` (a rank's slice of the images) only those images
    are encoded and the sum of their prompt losses is scaled so that the ranks' average is the
    global mean (the same loss as one process over the whole batch)."""
    dev = model.pixel_mean.device
    prompts = [_prompts(ms, cfg.prompts_per_image, rng, cfg.box_prob) for ms in masks]
    total = sum(len(p) for p in prompts)
    own = range(len(images))[mine] if mine is not None else range(len(images))
    x = torch.stack([torch.as_tensor(images[b]).permute(2, 0, 1).float() for b in own]).to(dev)
    feats = model.image_encoder(model.preprocess(x))
    losses = []
    low_size = model.prompt_encoder.mask_input_size
    for j, b in enumerate(own):
        for gt, pt, box in prompts[b]:
            points = (
                None
                if pt is None
                else (
                    torch.as_tensor(pt)[None].to(dev),
                    torch.ones(1, 1, dtype=torch.int64, device=dev),
                )
            )
            boxes = None if box is None else torch.as_tensor(box)[None].to(dev)
            low, iou = model.decode(feats[j : j + 1], points, boxes, None, True)
            target = F.interpolate(
                torch.as_tensor(gt, dtype=torch.float32)[None, None].to(dev), low_size, mode="area"
            )[0]
            losses.append(mask_losses(low, (target > 0.5).float(), iou))
    if mine is None:
        return torch.stack(losses).mean()
    world = len(images) // len(own)
    own_sum = torch.stack(losses).sum() if losses else feats.sum() * 0
    return own_sum * world / total


@torch.no_grad()
def evaluate_points(model: Sam, scenes) -> dict:
    """Validation mIoU with one positive point at the centre-most pixel of every instance."""
    from scipy import ndimage

    from slimkit.sam.predictor import SamPredictor

    model.eval()
    pred = SamPredictor(model)
    ious = []
    for img, masks in scenes:
        pred.set_image(img)
        for m in masks:
            d = ndimage.distance_transform_edt(m)
            y, x = np.unravel_index(d.argmax(), d.shape)
            out, iou, _ = pred.predict(np.array([[x, y]]), np.array([1]))
            best = out[int(np.argmax(iou))]
            ious.append((best & m).sum() / max((best | m).sum(), 1))
    model.train()
    return {"miou_1pt": float(np.mean(ious)), "instances": len(ious)}


class SamTask(TrainTask):
    """Promptable-segmentation training: per step a batch of scenes (or COCO images), prompts
    drawn from a generator seeded with (seed, step), the multimask + IoU loss of ``_step_loss``.
    Under torchrun each rank takes its slice of the step's images."""

    kind = "sam-train"

    def __init__(self, cfg: SamTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        world = dist.world_size()
        if cfg.batch_size % world:
            raise SlimkitError(
                f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks"
            )
        if not (cfg.data == "scenes" or cfg.data.startswith("coco:")):
            raise SlimkitError(f"--data must be scenes or coco:PATH (got {cfg.data!r})")
        torch.manual_seed(cfg.seed)
        model = build_sam(cfg.arch).train()
        if cfg.init:
            from slimkit.sam.checkpoint import load_into, read_state_dict

            load_into(model, read_state_dict(cfg.init), cfg.init)
        self.model = model.to(device)
        size = model.cfg.img_size
        self.cache: dict[int, tuple] = {}
        if cfg.data.startswith("coco:"):
            from slimkit.sam.coco import load_coco_folder

            items = load_coco_folder(cfg.data.split(":", 1)[1], size)
            self.val_items = items[::10] if len(items) >= 10 else items[:1]
            self.train_items = [it for i, it in enumerate(items) if len(items) < 10 or i % 10]
            self.n_scenes = len(self.train_items)
        else:
            self.n_scenes = cfg.scenes
            self.train_items = None
            self.val_items = None

    def scene(self, i: int):
        if self.train_items is not None:
            return self.train_items[i]
        if len(self.cache) > 4096:
            self.cache.clear()
        return self.cache.setdefault(i, draw_scene(self.model.cfg.img_size, i))

    def optimizer(self):
        cfg = self.cfg
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(cfg.steps, cfg.warmup_steps, cfg.min_lr / cfg.lr)
        )

    def loop_options(self) -> LoopOptions:
        cfg = self.cfg
        return LoopOptions(
            total_steps=cfg.steps, clip_grad=1.0, checkpoint_every=cfg.checkpoint_every
        )

    def micro_batches(self, step: int) -> list:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        ids = rng.integers(0, self.n_scenes, cfg.batch_size)
        batch = [self.scene(int(i)) for i in ids]
        world, r = dist.world_size(), dist.rank()
        # every rank draws the prompts of the whole batch, then computes its slice of images
        mine = slice(r * len(batch) // world, (r + 1) * len(batch) // world) if world > 1 else None
        return [([b[0] for b in batch], [b[1] for b in batch], rng, mine)]

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        images, masks, rng, mine = micro
        return _step_loss(self.model, images, masks, self.cfg, rng, mine), {}

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        from safetensors.torch import save_file

        cfg, model = self.cfg, self.model
        size = model.cfg.img_size
        val_items = self.val_items
        if val_items is None:
            val_items = (draw_scene(size, VAL_SEED + i) for i in range(cfg.val_scenes))
        val = evaluate_points(model, val_items)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            str(path / "model.safetensors"),
        )
        (path / "sam_config.json").write_text(
            json.dumps({"arch": cfg.arch, **asdict(model.cfg)}, indent=1) + "\n"
        )
        log.info("validation mIoU (1 point) %.3f over %d instances", val["miou_1pt"],
                 val["instances"])  # fmt: skip
        return {"config": asdict(cfg), "validation": val, "history": self.history,
                "headline": {"validation mIoU, 1 point": val["miou_1pt"]},
                "protocol": "one positive point at the centre-most pixel of every validation "
                            "instance; mIoU of the highest-scored of the three masks"}  # fmt: skip


def train_sam(
    cfg: SamTrainConfig,
    *,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    command: str = "",
) -> dict:
    """Train a promptable segmentation model into the run directory ``out``."""
    return run_task(SamTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command)


def _tiny_sam(tmp: Path) -> SamTrainConfig:
    return SamTrainConfig(steps=4, batch_size=2, prompts_per_image=2, scenes=8, checkpoint_every=2,
                          val_scenes=2, warmup_steps=1)  # fmt: skip


TRAINERS.register("sam-train", train_sam, config=SamTrainConfig, task=SamTask, tiny=_tiny_sam)


def load_trained(path: str | Path) -> Sam:
    """A ``slimkit sam train`` run directory (or its model.safetensors)."""
    from slimkit.sam.checkpoint import load_into, read_state_dict

    p = Path(path)
    d = p if p.is_dir() else p.parent
    cfg_file = d / "sam_config.json"
    if not cfg_file.is_file():
        raise SlimkitError(f"{d} has no sam_config.json (not a slimkit sam train run)")
    c = json.loads(cfg_file.read_text())
    arch = c.pop("arch")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
    model = build_sam(arch, **fields)
    return load_into(model, read_state_dict(d / "model.safetensors"), str(d))
