"""TinySAM full-stage distillation (``slimkit sam distill``), on the shared trainer.

Per step: a batch of images (generated scenes, or an SA-1B / COCO folder read lazily through
``slimkit.sam.tinysam.data``); the student encodes them, the teacher's embeddings come
from the on-disk cache (``slimkit sam cache-embeddings``) or from the frozen teacher. For up to
``prompts_per_image`` instances a prompt is drawn (one positive point inside the instance, or
its box with probability ``box_prob``). With ``hard_prompts`` every point prompt gets a random
number of extra rounds (uniform in 0..``max_rounds``): the current prediction (student by
default, no gradient) is compared with the ground truth and the next point is drawn from the
error region (positive inside the ground truth). Student and teacher decoders then see the same
prompts and the loss is

    L = w_embedding L_emb + w_token L_token + w_output sum_i H_i L_output^i / K
        + w_focal focal + w_dice dice (best of the 3 masks) + w_iou |IoU_pred - IoU|

with H_i = 1 unless ``hard_mask_weighting`` (then TinySAM's teacher-vs-student IoU weight).
``mode: embedding`` is MobileSAM's recipe: only L_emb, decoder frozen. The student's prompt
encoder and mask decoder start from the teacher's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.core.optim import warmup_cosine
from slimkit.sam.model import SAM_ALIASES, SAM_CONFIGS, build_sam
from slimkit.sam.tinysam import losses as L
from slimkit.sam.tinysam.data import DATA_HELP, parse_data
from slimkit.sam.tinysam.prompts import REGIONS, initial_point, sample_error_points
from slimkit.train import TRAINERS, LoopOptions, Trainer, TrainTask, run_task

log = logging.getLogger("slimkit")
MODES = ("full", "embedding")


@dataclass
class DistillConfig:
    teacher: str = field(
        default="", metadata={"help": "teacher: a slimkit SAM run directory or a SAM checkpoint"}
    )
    student: str = field(
        default="vit_micro",
        metadata={"help": "student architecture (decoder copied from the teacher)"},
    )
    embeddings: str = field(
        default="",
        metadata={
            "help": "teacher embedding cache (slimkit sam cache-embeddings); empty: run the teacher"
        },
    )
    data: str = field(default="scenes", metadata={"help": DATA_HELP})
    scenes: int = field(default=2000, metadata={"help": "training scenes (--data scenes)"})
    mode: str = field(
        default="full",
        metadata={
            "help": "full (TinySAM) or embedding (MobileSAM: embedding loss only, decoder frozen)",
            "choices": list(MODES),
        },
    )
    embedding_loss: str = field(
        default="l1", metadata={"help": "l1 (TinySAM) or mse (MobileSAM)", "choices": ["l1", "mse"]}
    )
    w_embedding: float = field(
        default=1.0, metadata={"help": "weight of the image-embedding loss (alpha)"}
    )
    w_token: float = field(default=1.0, metadata={"help": "weight of the output-token loss (beta)"})
    w_output: float = field(default=1.0, metadata={"help": "weight of the mask-logit loss (gamma)"})
    w_focal: float = field(default=20.0, metadata={"help": "weight of the ground-truth focal loss"})
    w_dice: float = field(default=1.0, metadata={"help": "weight of the ground-truth dice loss"})
    w_iou: float = field(default=1.0, metadata={"help": "weight of the IoU-prediction l1 loss"})
    hard_prompts: bool = field(
        default=False,
        metadata={"help": "online hard prompt sampling (extra points from the error region)"},
    )
    max_rounds: int = field(
        default=9, metadata={"help": "extra point rounds per prompt drawn uniformly from 0..N"}
    )
    error_region: str = field(
        default="xor",
        metadata={
            "help": "xor (symmetric error) or fn (missed foreground)",
            "choices": list(REGIONS),
        },
    )
    hard_from: str = field(
        default="student",
        metadata={
            "help": "whose prediction defines the error region",
            "choices": ["student", "teacher"],
        },
    )
    hard_mask_weighting: bool = field(
        default=False,
        metadata={"help": "weight each mask's logit loss by the teacher-vs-student IoU"},
    )
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "images per step"})
    prompts_per_image: int = field(default=4, metadata={"help": "instances prompted per image"})
    box_prob: float = field(
        default=0.3, metadata={"help": "probability of a box prompt instead of a point"}
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    checkpoint_every: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    val_scenes: int = field(default=50, metadata={"help": "validation scenes for the report"})
    seed: int = field(default=0, metadata={"help": "initialisation and prompt seed"})
    device: str = field(
        default="auto", metadata={"help": "auto (the GPU if any, else CPU), cpu, cuda[:N]"}
    )

    def __post_init__(self) -> None:
        self.student = SAM_ALIASES.get(self.student.lower(), self.student)
        if self.student not in SAM_CONFIGS:
            raise SlimkitError(f"unknown student architecture {self.student!r}; choose one of: "
                               f"{', '.join([*SAM_CONFIGS, *SAM_ALIASES])}")  # fmt: skip
        if self.mode not in MODES:
            raise SlimkitError(f"--mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        parse_data(self.data)
        if min(self.steps, self.batch_size, self.scenes, self.prompts_per_image) < 1:
            raise SlimkitError(
                "--steps, --batch-size, --scenes and --prompts-per-image must be >= 1"
            )
        if self.max_rounds < 0:
            raise SlimkitError("--max-rounds must be >= 0")


def _low_target(gt: np.ndarray, size: tuple[int, int], dev) -> torch.Tensor:
    t = torch.as_tensor(np.stack(gt), dtype=torch.float32)[:, None].to(dev)
    return (F.interpolate(t, size, mode="area")[:, 0] > 0.5).float()


class SamDistillTask(TrainTask):
    """Full-stage (or embedding-only) distillation of a SAM student from a frozen SAM teacher."""

    kind = "sam-distill"

    def __init__(self, cfg: DistillConfig, device: torch.device):
        from slimkit.sam.tinysam.cache import EmbeddingCache, load_teacher
        from slimkit.sam.tinysam.data import open_source

        self.cfg, self.device = cfg, device
        world = dist.world_size()
        if cfg.batch_size % world:
            raise SlimkitError(
                f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks"
            )
        if not cfg.teacher:
            raise SlimkitError("give --teacher (a slimkit SAM run directory or a SAM checkpoint)")
        teacher = load_teacher(cfg.teacher).eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)
        student = build_sam(cfg.student).train()
        if student.cfg.img_size != teacher.cfg.img_size:
            raise SlimkitError(f"student {cfg.student} takes {student.cfg.img_size} px images, the "
                               f"teacher {teacher.cfg.img_size} px")  # fmt: skip
        for part in ("prompt_encoder", "mask_decoder"):
            src, dst = getattr(teacher, part).state_dict(), getattr(student, part).state_dict()
            bad = [k for k in dst if k not in src or src[k].shape != dst[k].shape]
            if bad:
                raise SlimkitError(f"the teacher's {part} does not fit the student {cfg.student} "
                                   f"(e.g. {bad[0]}): choose a student with the teacher's prompt width")  # fmt: skip
            getattr(student, part).load_state_dict(src)
        if cfg.mode == "embedding":
            student.prompt_encoder.requires_grad_(False)
            student.mask_decoder.requires_grad_(False)
        self.teacher = teacher.to(device)
        self.model = student.to(device)
        self.data = open_source(cfg.data, student.cfg.img_size, cfg.scenes)
        self.cache_emb = (EmbeddingCache(cfg.embeddings, cfg.teacher, self.data.describe())
                          if cfg.embeddings else None)  # fmt: skip

    def scene(self, i: int):
        """(image, instance masks) of image i of the training list."""
        return self.data.sample(i)[:2]

    def optimizer(self):
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        ids = self.data.order(cfg.seed, step, cfg.batch_size)
        world, r = dist.world_size(), dist.rank()
        mine = slice(r * len(ids) // world, (r + 1) * len(ids) // world) if world > 1 else None
        return [(step, ids, mine)]

    # ------------------------------------------------------------------ prompts

    def draw_prompts(self, masks, rng: np.random.Generator):
        """Up to k prompts of one image: (gt masks of point prompts, first points) and (gt masks
        of box prompts, boxes), each list in drawing order. ``masks``: a list, or a lazy
        sequence that decodes only the masks drawn here; one left empty by the resize to the
        input size is skipped."""
        cfg = self.cfg
        pts, boxes = [], []
        for i in rng.permutation(len(masks))[: cfg.prompts_per_image]:
            m = masks[i]
            if not m.any():
                continue
            if rng.random() < cfg.box_prob:
                ys, xs = np.nonzero(m)
                boxes.append(
                    (m, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32))
                )
            else:
                pts.append((m, initial_point(m, rng)))
        return pts, boxes

    @torch.no_grad()
    def hard_points(self, emb: torch.Tensor, gt: np.ndarray, coords: np.ndarray,
                    rng: np.random.Generator,
                    extent: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Online hard prompt sampling for K point prompts of one image: coords (K, 1, 2) ->
        (coords (K, 1 + R, 2), labels (K, 1 + R)), where prompt k gets rounds[k] <= R real extra
        points (the rest are padding, label -1). ``emb``: the embedding of the predicting model.
        ``extent``: (h, w) of the image inside its padded canvas; the prediction is cut to it,
        so no point is drawn in the padding."""
        cfg = self.cfg
        model = self.model if cfg.hard_from == "student" else self.teacher
        k = len(coords)
        rounds = rng.integers(0, cfg.max_rounds + 1, k)
        labels = np.ones((k, 1), np.int64)
        size = self.model.cfg.img_size
        for r in range(int(rounds.max(initial=0))):
            active = rounds > r
            low, iou = model.decode(
                emb, (torch.as_tensor(coords).to(emb.device), torch.as_tensor(labels).to(emb.device)),
                None, None, True)  # fmt: skip
            best = low[torch.arange(k), iou.argmax(1)][:, None]
            pred = F.interpolate(best, (size, size), mode="bilinear", align_corners=False)[:, 0] > 0
            pred = pred.cpu().numpy()[:, : gt.shape[1], : gt.shape[2]]
            if extent is not None:
                pred[:, extent[0] :] = False
                pred[:, :, extent[1] :] = False
            c, lab = sample_error_points(gt, pred, rng, cfg.error_region)
            lab[~active] = -1
            c[lab == -1] = 0
            coords = np.concatenate([coords, c[:, None]], 1)
            labels = np.concatenate([labels, lab[:, None]], 1)
        return coords, labels

    # ------------------------------------------------------------------ loss

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        step, ids, mine = micro
        cfg, dev, student, teacher = self.cfg, self.device, self.model, self.teacher
        world = dist.world_size()
        own = list(range(len(ids)))[mine] if mine is not None else list(range(len(ids)))
        data = self.data
        samples = {b: data.sample(ids[b]) for b in own}  # only this rank's images are read
        x = torch.stack([torch.as_tensor(samples[b][0]).permute(2, 0, 1).float() for b in own]).to(
            dev
        )
        s_emb = student.image_encoder(student.preprocess(x))
        if self.cache_emb is not None:
            t_emb = self.cache_emb.get([ids[b] for b in own]).to(dev)
        else:
            with torch.no_grad():
                t_emb = teacher.image_encoder(teacher.preprocess(x))
        l_emb = L.embedding_loss(s_emb, t_emb, cfg.embedding_loss) * len(own) / len(ids) * world
        if cfg.mode == "embedding":
            return cfg.w_embedding * l_emb, {"embedding": float(l_emb.detach())}
        # prompts of the whole step (every rank: instance counts only, no image is read)
        total = max(1, sum(min(cfg.prompts_per_image, data.count(i)) for i in ids))
        low_size = student.prompt_encoder.mask_input_size
        terms, parts = [], {"token": 0.0, "output": 0.0, "mask": 0.0, "iou": 0.0, "weight": 0.0}
        for j, b in enumerate(own):
            rng = np.random.default_rng([cfg.seed, step, b])  # per image: same on any rank
            _, masks, extent = samples[b]
            pts, boxes = self.draw_prompts(masks, rng)
            groups = []
            if pts:
                gt = np.stack([m for m, _ in pts])
                coords = np.stack([p for _, p in pts])[:, None]
                labels = np.ones((len(pts), 1), np.int64)
                if cfg.hard_prompts:
                    e = (
                        s_emb[j : j + 1].detach()
                        if cfg.hard_from == "student"
                        else t_emb[j : j + 1]
                    )
                    coords, labels = self.hard_points(e, gt, coords, rng, extent)
                groups.append(
                    (gt, (torch.as_tensor(coords).to(dev), torch.as_tensor(labels).to(dev)), None)
                )
            if boxes:
                groups.append((np.stack([m for m, _ in boxes]), None,
                               torch.as_tensor(np.stack([bx for _, bx in boxes])).to(dev)))  # fmt: skip
            for gt, points, bx in groups:
                target = _low_target(gt, low_size, dev)
                s_low, s_iou, s_tok = self._decode(student, s_emb[j : j + 1], points, bx)
                with torch.no_grad():
                    t_low, _, t_tok = self._decode(teacher, t_emb[j : j + 1], points, bx)
                focal, dice = L.focal_dice(s_low, target)
                l_mask = (cfg.w_focal * focal + cfg.w_dice * dice).min(1).values
                l_iou = L.iou_l1(s_iou, s_low, target).mean(1)
                l_tok = L.token_loss(s_tok, t_tok)
                l_out = L.output_loss(s_low, t_low)
                h = (L.hard_mask_weights(t_low, s_low, target) if cfg.hard_mask_weighting
                     else torch.ones_like(l_out))  # fmt: skip
                terms.append(
                    cfg.w_token * l_tok + cfg.w_output * h * l_out + l_mask + cfg.w_iou * l_iou
                )
                for name, v in (
                    ("token", l_tok),
                    ("output", l_out),
                    ("mask", l_mask),
                    ("iou", l_iou),
                    ("weight", h),
                ):
                    parts[name] += float(v.detach().sum()) / total
        own_sum = torch.cat(terms).sum() if terms else s_emb.sum() * 0
        loss = cfg.w_embedding * l_emb + own_sum * world / total
        return loss, {"embedding": float(l_emb.detach()), **parts}

    @staticmethod
    def _decode(model, emb, points, boxes):
        sparse, dense = model.prompt_encoder(points, boxes, None)
        return model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True,
                                  return_tokens=True)  # fmt: skip

    # ------------------------------------------------------------------ bookkeeping

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        from safetensors.torch import save_file

        from slimkit.sam.tinysam.evaluate import evaluate_prompts, validation_scenes

        cfg, model = self.cfg, self.model
        val = evaluate_prompts(model, validation_scenes(model.cfg.img_size, cfg.val_scenes))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(path / "model.safetensors"))  # fmt: skip
        (path / "sam_config.json").write_text(
            json.dumps({"arch": cfg.student, **asdict(model.cfg)}, indent=1) + "\n"
        )
        log.info("validation mIoU: 1 point %.3f, box %.3f", val["miou_1pt"], val["miou_box"])
        return {"config": asdict(cfg), "validation": val, "history": self.history,
                "headline": {"validation mIoU, 1 point": val["miou_1pt"],
                             "validation mIoU, box": val["miou_box"]}}  # fmt: skip


def distill_sam(cfg: DistillConfig, *, out: str | Path, resume: bool = False,
                overwrite: bool = False, command: str = "") -> dict:  # fmt: skip
    """Distil a SAM student from ``cfg.teacher`` into the run directory ``out``."""
    return run_task(
        SamDistillTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command
    )


def tiny_teacher(path: Path, seed: int = 0) -> Path:
    """A random-weight vit_mini saved as a slimkit SAM run (for tests and smoke runs)."""
    from safetensors.torch import save_file

    if not (path / "model.safetensors").is_file():
        path.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        m = build_sam("vit_mini")
        save_file(
            {k: v.contiguous() for k, v in m.state_dict().items()}, str(path / "model.safetensors")
        )
        (path / "sam_config.json").write_text(
            json.dumps({"arch": "vit_mini", **asdict(m.cfg)}) + "\n"
        )
    return path


def _tiny(tmp: Path) -> DistillConfig:
    return DistillConfig(teacher=str(tiny_teacher(tmp / "teacher")), steps=4, batch_size=2,
                         prompts_per_image=2, scenes=8, checkpoint_every=2, val_scenes=2,
                         warmup_steps=1, hard_prompts=True, max_rounds=2,
                         hard_mask_weighting=True)  # fmt: skip


TRAINERS.register("sam-distill", distill_sam, config=DistillConfig, task=SamDistillTask, tiny=_tiny)
