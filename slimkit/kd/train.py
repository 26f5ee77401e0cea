"""Image-classifier training and distillation on one trainer.

``train_classifier(TrainConfig(...), out=...)`` trains a timm model with cross-entropy (to make a
teacher); ``distill(DistillConfig(...), out=...)`` trains a student against a frozen teacher with
any combination of registered losses. Both write a run directory: ``model.safetensors`` (the
plain timm model; distillation branches are never saved), ``config.yaml``, ``report.json``
(per-epoch loss and top-1 / top-5, best and last epoch reported separately), ``run.log``.

Determinism and resume: the model is initialised from ``seed``; each epoch's data order and
augmentation come from a generator seeded with (seed, epoch), so a run resumed from its last
epoch checkpoint (``--resume``) reproduces an uninterrupted run exactly. Under ``torchrun`` every
rank takes an equal slice of each global batch (gloo on CPU, nccl on GPU), gradients are
averaged by DDP, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slimkit.core import dist
from slimkit.core.config import save_yaml, to_dict
from slimkit.core.errors import SlimkitError
from slimkit.core.optim import warmup_cosine
from slimkit.core.rundir import RunDir, peak_rss_gb, save_checkpoint, versions, write_json
from slimkit.kd.distiller import Distiller
from slimkit.kd.losses import LOSSES, LossSettings, parse_losses, total_loss
from slimkit.vision.data import ImageData, load_images, random_shift, stratified_subset
from slimkit.vision.models import create_model

log = logging.getLogger("slimkit")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    arch: str = field(
        default="tiny-resnet", metadata={"help": "timm model name or a slimkit tiny model"}
    )
    data: str = field(
        default="digits",
        metadata={"help": "digits | mnist-5k | shapes | cifar10 | cifar100 | imagefolder:PATH"},
    )
    img_size: int = field(default=32, metadata={"help": "input resolution (images are resized)"})
    train_subset: int = field(
        default=0, metadata={"help": "train on a stratified subset of N images (0 = all)"}
    )
    pretrained: bool = field(
        default=False, metadata={"help": "timm pretrained weights (needs the internet)"}
    )
    init: str = field(
        default="",
        metadata={"help": "initial weights: a run directory or a .safetensors / .pth file"},
    )
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    batch_size: int = field(
        default=64, metadata={"help": "global batch size (split across torchrun ranks)"}
    )
    optimizer: str = field(
        default="adamw", metadata={"help": "adamw | sgd", "choices": list(OPTIMIZERS)}
    )
    lr: float = field(
        default=2e-3, metadata={"help": "peak learning rate (not scaled by batch or ranks)"}
    )
    min_lr: float = field(
        default=1e-5, metadata={"help": "final learning rate of the cosine schedule"}
    )
    warmup_epochs: float = field(default=2.0, metadata={"help": "linear warm-up length"})
    weight_decay: float = field(
        default=0.05, metadata={"help": "decoupled (AdamW) or L2 (SGD) weight decay"}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    clip_grad: float = field(default=5.0, metadata={"help": "gradient-norm clip (0 = off)"})
    shift: int = field(
        default=2, metadata={"help": "random translation augmentation, pixels (0 = off)"}
    )
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (0 = off)"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0 = off)"})
    ema: float = field(
        default=0.0, metadata={"help": "EMA decay of the weights evaluated and saved (0 = off)"}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "cross-entropy label smoothing"})
    seed: int = field(
        default=0, metadata={"help": "initialisation, data order and augmentation seed"}
    )
    device: str = field(
        default="auto", metadata={"help": "auto (this rank's GPU if any, else CPU), cpu, cuda[:N]"}
    )

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SlimkitError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "img_size"):
            if getattr(self, name) < 1:
                raise SlimkitError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise SlimkitError("--lr must be > 0")


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = field(
        default="",
        metadata={"help": "teacher weights: a train-classifier run directory or a weights file"},
    )
    teacher_arch: str = field(
        default="",
        metadata={"help": "teacher architecture (default: read from the teacher run directory)"},
    )
    loss: str = field(
        default="ofa",
        metadata={"help": "ce | kd | dkd | dist | fitnet | ofa, or weighted: ce=1,kd=0.5"},
    )
    kd_tau: float = field(default=1.0, metadata={"help": "KD temperature"})
    dkd_alpha: float = field(default=1.0, metadata={"help": "DKD target-class weight"})
    dkd_beta: float = field(default=2.0, metadata={"help": "DKD non-target weight"})
    dkd_tau: float = field(default=1.0, metadata={"help": "DKD temperature"})
    dist_beta: float = field(default=1.0, metadata={"help": "DIST inter-class weight"})
    dist_gamma: float = field(default=1.0, metadata={"help": "DIST intra-class weight"})
    dist_tau: float = field(default=1.0, metadata={"help": "DIST temperature"})
    ofa_gamma: float = field(default=1.0, metadata={"help": "OFA target-enhancement exponent"})
    ofa_branch_weight: float = field(
        default=1.0, metadata={"help": "OFA weight of each stage branch (lambda_ofa)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_losses(self.loss)
        if self.ofa_gamma < 1:
            raise SlimkitError("--ofa-gamma must be >= 1")

    def settings(self) -> LossSettings:
        return LossSettings(**{k: getattr(self, k) for k in LossSettings.__dataclass_fields__})


def load_model_from_run(path: str, arch: str, data: ImageData) -> nn.Module:
    """A trained classifier: a slimkit run directory (its config names the architecture) or a
    weights file with an explicit ``arch``."""
    p = Path(path)
    if not arch and p.is_dir() and (p / "config.yaml").is_file():
        from slimkit.core.config import load_yaml

        arch = load_yaml(p / "config.yaml")["arch"]
    if not arch:
        raise SlimkitError(f"name the architecture of {p} (--teacher-arch / --student-arch)")
    return create_model(arch, num_classes=data.num_classes, in_chans=data.in_chans,
                        img_size=data.img_size, checkpoint=str(p)).eval()  # fmt: skip


def _teacher(cfg: DistillConfig, data: ImageData) -> nn.Module:
    if not cfg.teacher:
        raise SlimkitError(
            "distillation needs --teacher (a train-classifier run directory or a weights file)"
        )
    return load_model_from_run(cfg.teacher, cfg.teacher_arch, data)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    return warmup_cosine(
        cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr / cfg.lr
    )


@torch.no_grad()
def evaluate(model: nn.Module, ds, batch_size: int = 256) -> dict:
    model.eval()
    x, y = ds.tensors
    dev = next(model.parameters()).device
    correct1 = correct5 = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size].to(dev)).cpu()
        top = logits.topk(min(5, logits.shape[1]), 1).indices
        yy = y[i : i + batch_size, None]
        correct1 += (top[:, :1] == yy).any(1).sum().item()
        correct5 += (top == yy).any(1).sum().item()
    return {"top1": 100 * correct1 / len(y), "top5": 100 * correct5 / len(y)}


def run_training(cfg: TrainConfig, *, out: str | Path, resume: bool = False, overwrite: bool = False,
                 command: str = "") -> dict:  # fmt: skip
    """Train (``TrainConfig``) or distil (``DistillConfig``) into the run directory ``out``."""
    is_kd = isinstance(cfg, DistillConfig)
    data = load_images(cfg.data, cfg.img_size)
    x_all, y_all = data.train.tensors
    if cfg.train_subset:
        if cfg.train_subset > len(y_all):
            raise SlimkitError(
                f"--train-subset {cfg.train_subset} exceeds the {len(y_all)} training images"
            )
        idx = torch.from_numpy(stratified_subset(y_all.numpy(), cfg.train_subset))
        x_all, y_all = x_all[idx], y_all[idx]
    rank0 = dist.rank() == 0
    rd = RunDir(out, resume=resume, overwrite=overwrite) if rank0 else None
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.arch, num_classes=data.num_classes, in_chans=data.in_chans,
                           img_size=cfg.img_size, pretrained=cfg.pretrained,
                           checkpoint=cfg.init or None)  # fmt: skip
    losses = parse_losses(cfg.loss) if is_kd else {"ce": 1.0}
    teacher = (
        _teacher(cfg, data) if is_kd and any(LOSSES.meta(n)["teacher"] for n in losses) else None
    )
    settings = cfg.settings() if is_kd else LossSettings(label_smoothing=cfg.label_smoothing)
    settings.label_smoothing = cfg.label_smoothing
    distiller = Distiller(student, teacher, losses, data.num_classes, data.in_chans, cfg.img_size)
    device = dist.resolve_device(cfg.device)
    distiller.to(device)
    model: nn.Module = distiller
    if dist.is_dist():
        model = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None
        )
    params = [p for p in distiller.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    n = len(y_all)
    steps = max(n // cfg.batch_size, 1)  # drop the last partial batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    ema = copy.deepcopy(student).eval() if cfg.ema else None
    mixer = None
    if cfg.mixup or cfg.cutmix:
        from timm.data import Mixup

        mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      label_smoothing=cfg.label_smoothing, num_classes=data.num_classes)  # fmt: skip
    cached_t = None
    if teacher is not None and cfg.shift == 0 and mixer is None and not distiller.need_hints:
        cached_t = torch.cat(
            [
                distiller.teacher_logits(x_all[i : i + 512].to(device)).cpu()
                for i in range(0, n, 512)
            ]
        )
        log.info("teacher logits cached for %d training images (no augmentation)", n)
    history: list[dict] = []
    start = 0
    ckpt = rd.checkpoint_dir / "last.pt" if rd else None
    if resume and dist.is_dist():
        raise SlimkitError("resume a torchrun job as a single process, or restart it")
    if rd and rd.resumed and ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        distiller.load_state_dict(st["distiller"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        history, start = st["history"], st["epoch"]
        log.info("resumed after epoch %d", start)
    world, r = dist.world_size(), dist.rank()
    if cfg.batch_size % world:
        raise SlimkitError(f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks")
    t0 = time.time()
    for epoch in range(start, cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
        model.train()
        tot, parts_sum = 0.0, {}
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            x = random_shift(x, cfg.shift, g)
            t_logits = cached_t[idx] if cached_t is not None else None
            if mixer is not None:
                import numpy as np

                torch.manual_seed(cfg.seed * 100_003 + epoch * 1000 + s)  # mixup draws from the
                np.random.seed((cfg.seed * 100_003 + epoch * 1000 + s) % 2**32)  # global RNGs
                x, y = mixer(x, y)
            sl = slice(r * len(idx) // world, (r + 1) * len(idx) // world)
            t_sl = None if t_logits is None else t_logits[sl].to(device)
            b = model(x[sl].to(device), y[sl].to(device), t_sl)
            loss, parts = total_loss(losses, b, settings)
            if not torch.isfinite(loss):
                raise SlimkitError(
                    f"non-finite loss at epoch {epoch + 1} step {s + 1} ({parts}); lower --lr, --ofa-gamma or --ofa-branch-weight"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, ps in zip(ema.state_dict().values(), student.state_dict().values()):
                        if pe.is_floating_point():
                            pe.mul_(cfg.ema).add_(ps.detach(), alpha=1 - cfg.ema)
                        else:
                            pe.copy_(ps)
            tot += float(loss.detach())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        evaluated = ema if ema is not None else student
        acc = evaluate(evaluated, data.test)
        rec = {"epoch": epoch + 1, "loss": tot / steps, **{f"loss_{k}": v / steps for k, v in parts_sum.items()},
               **acc, "lr": sched.get_last_lr()[0]}  # fmt: skip
        history.append(rec)
        if rank0:
            eta = (time.time() - t0) / (epoch + 1 - start) * (cfg.epochs - epoch - 1)
            log.info("epoch %d/%d loss %.4f top1 %.2f top5 %.2f (ETA %.0f s)", epoch + 1, cfg.epochs,
                     rec["loss"], acc["top1"], acc["top5"], eta)  # fmt: skip
            save_checkpoint(ckpt, {"distiller": distiller.state_dict(), "opt": opt.state_dict(),
                                    "sched": sched.state_dict(), "ema": ema.state_dict() if ema else None,
                                    "history": history, "epoch": epoch + 1})  # fmt: skip
    report = {}
    if rank0:
        final = ema if ema is not None else student
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()},
            str(rd.path / "model.safetensors"),
        )
        save_yaml(to_dict(cfg), rd.path / "config.yaml")
        best = max(history, key=lambda h: h["top1"])
        report = {
            "kind": "distill" if is_kd else "train-classifier",
            "command": command,
            "data": {
                "name": data.name,
                "train_images": n,
                "test_images": len(data.test),
                "classes": data.num_classes,
            },
            "losses": losses,
            "global_batch": cfg.batch_size,
            "world_size": world,
            "last": history[-1],
            "best": best,
            "history": history,
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "training_only_parameters": sum(
                p.numel()
                for n_, p in distiller.named_parameters()
                if n_.startswith(("branches", "connectors"))
            ),  # fmt: skip
            "seconds": time.time() - t0,
            "device": str(device),
            "peak_rss_gb": peak_rss_gb(),
            "versions": versions(),
        }
        write_json(rd.path / "report.json", report)
        report["out"] = str(rd.commit())
        log.info("wrote %s: last top1 %.2f, best top1 %.2f (epoch %d)", report["out"],
                 history[-1]["top1"], best["top1"], best["epoch"])  # fmt: skip
    dist.barrier()
    return report


def train_classifier(cfg: TrainConfig, **kw) -> dict:
    return run_training(cfg, **kw)


def distill(cfg: DistillConfig, **kw) -> dict:
    return run_training(cfg, **kw)


def load_report(run: str | Path) -> dict:
    return json.loads((Path(run) / "report.json").read_text())
