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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.core.optim import warmup_cosine
from slimkit.distill.distiller import Distiller
from slimkit.distill.losses import LOSSES, LossSettings, parse_losses, total_loss
from slimkit.train import TRAINERS, LoopOptions, Trainer, TrainTask, run_task
from slimkit.vision.data import ImageData, load_images, random_shift, stratified_subset
from slimkit.vision.models import create_model, family, pooled_width

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
    mix_mode: str = field(
        default="batch",
        metadata={"help": "timm's mixup / cutmix mode: batch (one lambda per batch), pair (one "
                          "per pair i, B-1-i) or elem (one per image)",
                  "choices": ["batch", "pair", "elem"]},
    )  # fmt: skip
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
    text_align: str = field(
        default="",
        metadata={"help": "GPT4Image: text embeddings of the training images (slimkit "
                          "embed-text output) to align the pooled feature with ('' = off)"},
    )  # fmt: skip
    align_weight: float = field(default=0.3, metadata={"help": "weight of the alignment loss"})
    align_tau: float = field(
        default=0.0,
        metadata={"help": "alignment temperature (0 = the official default: 0.2 for CNNs, "
                          "0.05 for ViT-like models)"},
    )  # fmt: skip
    align_head: str = field(
        default="mlp",
        metadata={"help": "projection: mlp (BatchNorm for CNNs, none for ViTs) or linear",
                  "choices": ["mlp", "linear"]},
    )  # fmt: skip
    align_mix: str = field(
        default="mix",
        metadata={"help": "mixup / cutmix batches: mix the text targets with the same lambda, "
                          "or skip the alignment loss on them", "choices": ["mix", "skip"]},
    )  # fmt: skip
    align_loss: str = field(
        default="clip",
        metadata={"help": "alignment loss: clip (symmetric contrastive over the global batch), "
                          "ctr (image -> text InfoNCE on the local batch) or byol "
                          "(mean 2 - 2 f.e)", "choices": ["clip", "ctr", "byol"]},
    )  # fmt: skip
    align_mask_same: bool = field(
        default=True,
        metadata={"help": "mask duplicate text targets (same id or identical text) out of the "
                          "contrastive negatives"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SlimkitError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.align_head not in ("mlp", "linear"):
            raise SlimkitError("--align-head must be mlp or linear")
        if self.align_loss not in ("clip", "ctr", "byol"):
            raise SlimkitError("--align-loss must be clip, ctr or byol")
        if self.align_mix not in ("mix", "skip"):
            raise SlimkitError("--align-mix must be mix or skip")
        if self.mix_mode not in ("batch", "pair", "elem"):
            raise SlimkitError("--mix-mode must be batch, pair or elem")
        if self.mix_mode == "pair" and self.batch_size % 2:
            raise SlimkitError(
                "--mix-mode pair mixes image i with image B-1-i: use an even --batch-size"
            )
        if self.mix_mode != "batch" and self.align_mix == "skip" and self.text_align:
            raise SlimkitError(
                "--align-mix skip drops the alignment term on mixed batches, and with --mix-mode "
                f"{self.mix_mode} nearly every batch is mixed: use --align-mix mix"
            )
        if self.align_tau < 0 or self.align_weight < 0:
            raise SlimkitError("--align-tau and --align-weight must be >= 0")
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


def load_model_from_run(
    path: str, arch: str, data: ImageData, arch_flag: str = "--teacher-arch"
) -> nn.Module:
    """A trained classifier: a slimkit run directory (its config names the architecture) or a
    weights file with an explicit ``arch``."""
    p = Path(path)
    if not arch and p.is_dir() and (p / "config.yaml").is_file():
        from slimkit.core.config import load_yaml

        arch = load_yaml(p / "config.yaml")["arch"]
    if not arch:
        raise SlimkitError(
            f"name the architecture of {p} with {arch_flag}, or give a run directory (its "
            "config.yaml names it)"
        )
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


class ClassifierTask(TrainTask):
    """Cross-entropy training (``TrainConfig``) or distillation (``DistillConfig``) of a timm
    model, one epoch = ``len(train) // batch_size`` optimizer steps (the last partial batch is
    dropped). Each epoch's data order and augmentation come from a generator seeded with
    (seed, epoch); at the end of every epoch the evaluated model (the EMA if kept) is scored on
    the test split and a checkpoint is written."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.kind = (
            cfg,
            "distill" if isinstance(cfg, DistillConfig) else "train-classifier",
        )
        is_kd = isinstance(cfg, DistillConfig)
        self.data = data = load_images(cfg.data, cfg.img_size)
        x_all, y_all = data.train.tensors
        if cfg.train_subset:
            if cfg.train_subset > len(y_all):
                raise SlimkitError(
                    f"--train-subset {cfg.train_subset} exceeds the {len(y_all)} training images"
                )
            idx = torch.from_numpy(stratified_subset(y_all.numpy(), cfg.train_subset))
            x_all, y_all = x_all[idx], y_all[idx]
        self.x_all, self.y_all, self.n = x_all, y_all, len(y_all)
        train_ids = list(data.train_ids)
        if cfg.train_subset:
            train_ids = [train_ids[i] for i in idx.tolist()]
        self.train_ids = train_ids
        world = dist.world_size()
        if cfg.batch_size % world:
            raise SlimkitError(
                f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks"
            )
        torch.manual_seed(cfg.seed)
        self.student = create_model(cfg.arch, num_classes=data.num_classes, in_chans=data.in_chans,
                                    img_size=cfg.img_size, pretrained=cfg.pretrained,
                                    checkpoint=cfg.init or None)  # fmt: skip
        self.losses = parse_losses(cfg.loss) if is_kd else {"ce": 1.0}
        self.text, head = self._text_targets(cfg, data)
        teacher = (
            _teacher(cfg, data)
            if is_kd and any(LOSSES.meta(n)["teacher"] for n in self.losses)
            else None
        )
        self.settings = cfg.settings() if is_kd else LossSettings()
        self.settings.label_smoothing = cfg.label_smoothing
        self.settings.align_tau, self.settings.align_mask_same = self.align_tau, cfg.align_mask_same
        self.settings.align_loss = cfg.align_loss
        self.model = Distiller(self.student, teacher, self.losses, data.num_classes,
                               data.in_chans, cfg.img_size, head).to(device)  # fmt: skip
        self.ema_of = self.student
        self.device = device
        self.steps_per_epoch = max(self.n // cfg.batch_size, 1)
        self.mixer = None
        if cfg.mixup or cfg.cutmix:
            from timm.data import Mixup

            self.mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, mode=cfg.mix_mode,
                               label_smoothing=cfg.label_smoothing, num_classes=data.num_classes)  # fmt: skip
        self.cached_t = None
        if (
            teacher is not None
            and cfg.shift == 0
            and self.mixer is None
            and not self.model.need_hints
        ):
            self.cached_t = torch.cat(
                [
                    self.model.teacher_logits(x_all[i : i + 512].to(device)).cpu()
                    for i in range(0, self.n, 512)
                ]
            )
            log.info("teacher logits cached for %d training images (no augmentation)", self.n)
        self.history: list[dict] = []
        self.gen: torch.Generator | None = None
        self.order: torch.Tensor | None = None
        self._epoch_sums: dict[str, float] = {}

    def _text_targets(self, cfg: TrainConfig, data: ImageData):
        """GPT4Image: the text embedding of every training image (rows in training order) and
        the alignment head; (None, None) without ``--text-align``."""
        if not cfg.text_align:
            if "text-align" in self.losses:
                raise SlimkitError("loss 'text-align' needs text embeddings: --text-align FILE")
            return None, None
        from slimkit.distill.captions import check_ids, split_fingerprint
        from slimkit.distill.text_align import TAU, AlignHead
        from slimkit.distill.text_encoders import load_text_embeddings

        te = load_text_embeddings(cfg.text_align)
        fp = split_fingerprint(data.name, "train", self.train_ids)
        check_ids(f"text embeddings {cfg.text_align}", te.ids, te.split, self.train_ids, fp)
        self.losses.setdefault("text-align", cfg.align_weight)
        fam = family(self.student)
        self.align_tau = cfg.align_tau or TAU[fam]
        self.text_meta = {"file": cfg.text_align, "encoder": te.meta.get("encoder"),
                          "encoder_version": te.meta.get("encoder_version"),
                          "dim": te.embeddings.shape[1], "tau": self.align_tau,
                          "weight": self.losses["text-align"], "head": cfg.align_head,
                          "head_batch_norm": fam == "cnn", "mix": cfg.align_mix,
                          "loss": cfg.align_loss}  # fmt: skip
        log.info("text alignment (%s): %d embeddings (%s, %d-d), weight %g, tau %g, %s head%s",
                 cfg.align_loss, len(te.ids), te.meta.get("encoder"), te.embeddings.shape[1],
                 self.losses["text-align"], self.align_tau, cfg.align_head,
                 " with BatchNorm" if fam == "cnn" and cfg.align_head == "mlp" else "")  # fmt: skip
        head = AlignHead(pooled_width(self.student), te.embeddings.shape[1], cfg.align_head,
                         batch_norm=fam == "cnn")  # fmt: skip
        return te.rows_for(self.train_ids), head

    text_meta: dict | None = None
    align_tau = 0.2

    def optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, self.steps_per_epoch))

    def loop_options(self) -> LoopOptions:
        return LoopOptions(total_steps=self.cfg.epochs * self.steps_per_epoch,
                           clip_grad=self.cfg.clip_grad, ema=self.cfg.ema)  # fmt: skip

    def micro_batches(self, step: int) -> list:
        cfg = self.cfg
        epoch, s = divmod(step, self.steps_per_epoch)
        if s == 0:  # (a resumed run restores the generator and order of its epoch)
            self.gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            self.order = torch.randperm(self.n, generator=self.gen)
        self.model.train()
        idx = self.order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        x, y = self.x_all[idx], self.y_all[idx]
        x = random_shift(x, cfg.shift, self.gen)
        t_logits = self.cached_t[idx] if self.cached_t is not None else None
        text = self.text[idx] if self.text is not None else None
        if self.mixer is not None:
            import numpy as np
            from timm.data.mixup import mixup_target

            torch.manual_seed(cfg.seed * 100_003 + epoch * 1000 + s)  # mixup draws from the
            np.random.seed((cfg.seed * 100_003 + epoch * 1000 + s) % 2**32)  # global RNGs
            # timm's Mixup.__call__, with lambda kept for the text targets: image i is mixed
            # with image B-1-i (cutmix's lambda is the kept area); lambda is one float (batch
            # mode) or a (B, 1) tensor (pair / elem modes)
            m = self.mixer
            mix = {"elem": m._mix_elem, "pair": m._mix_pair}.get(m.mode, m._mix_batch)
            lam = mix(x)
            y = mixup_target(y, m.num_classes, lam, m.label_smoothing)
            if text is not None and bool((torch.as_tensor(lam) < 1).any()):
                if cfg.align_mix == "mix":
                    from slimkit.distill.text_align import mix_text

                    text = mix_text(text, lam)
                else:
                    text = None
        world, r = dist.world_size(), dist.rank()
        sl = slice(r * len(idx) // world, (r + 1) * len(idx) // world)
        t_sl = None if t_logits is None else t_logits[sl].to(self.device)
        if self.text is None:
            return [(x[sl].to(self.device), y[sl].to(self.device), t_sl)]
        text = None if text is None else text.to(self.device)  # the global batch's, every rank
        return [(x[sl].to(self.device), y[sl].to(self.device), t_sl, text, idx.to(self.device))]

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        return total_loss(self.losses, self.model(*micro), self.settings)

    def after_step(self, step: int, rec: dict, trainer: Trainer) -> bool:
        for k, v in rec.items():
            if k == "loss" or k.startswith("loss_"):
                self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + v
        epoch, s = divmod(step, self.steps_per_epoch)
        if s + 1 < self.steps_per_epoch:
            return False
        spe, sums, self._epoch_sums = self.steps_per_epoch, self._epoch_sums, {}
        evaluated = trainer.ema if trainer.ema is not None else self.student
        acc = evaluate(evaluated, self.data.test)
        self.history.append({"epoch": epoch + 1, **{k: v / spe for k, v in sums.items()}, **acc,
                             "lr": trainer.sched.get_last_lr()[0]})  # fmt: skip
        eta = (
            rec["seconds"] / (len(self.history) - self._first_epoch) * (self.cfg.epochs - epoch - 1)
        )
        log.info("epoch %d/%d loss %.4f top1 %.2f top5 %.2f (ETA %.0f s)", epoch + 1,
                 self.cfg.epochs, self.history[-1]["loss"], acc["top1"], acc["top5"], eta)  # fmt: skip
        return True

    _first_epoch = 0

    def state_dict(self) -> dict:
        return {"history": self.history, "epoch_sums": self._epoch_sums,
                "gen": self.gen.get_state() if self.gen is not None else None,
                "order": self.order}  # fmt: skip

    def load_state_dict(self, st: dict) -> None:
        self.history, self._epoch_sums = list(st["history"]), dict(st["epoch_sums"])
        self._first_epoch = len(self.history)
        self.order = st["order"]
        self.gen = None
        if st["gen"] is not None:
            self.gen = torch.Generator()
            self.gen.set_state(st["gen"])

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        final = trainer.ema if trainer.ema is not None else self.student
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()},
            str(path / "model.safetensors"),
        )
        history, data = self.history, self.data
        best = max(history, key=lambda h: h["top1"])
        log.info("last top1 %.2f, best top1 %.2f (epoch %d)", history[-1]["top1"], best["top1"],
                 best["epoch"])  # fmt: skip
        return {
            "kind": self.kind,
            "data": {"name": data.name, "train_images": self.n, "test_images": len(data.test),
                     "classes": data.num_classes},  # fmt: skip
            "losses": self.losses,
            "global_batch": self.cfg.batch_size,
            "last": history[-1],
            "best": best,
            "history": history,
            "headline": {"top-1 (last epoch, %)": history[-1]["top1"],
                         "top-1 (best epoch, %)": best["top1"], "best epoch": best["epoch"]},
            "protocol": f"top-1 / top-5 on the {len(data.test)} test images of {data.name} "
                        "after every epoch (the EMA weights when kept)",
            "student_parameters": sum(p.numel() for p in self.student.parameters()),
            "training_only_parameters": sum(
                p.numel()
                for n_, p in self.model.named_parameters()
                if n_.startswith(("branches", "connectors", "align_head"))
            ),
            "text_align": self.text_meta,
        }  # fmt: skip


def run_training(cfg: TrainConfig, *, out: str | Path, resume: bool = False, overwrite: bool = False,
                 command: str = "") -> dict:  # fmt: skip
    """Train (``TrainConfig``) or distil (``DistillConfig``) into the run directory ``out``."""
    return run_task(
        ClassifierTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command
    )


def train_classifier(cfg: TrainConfig, **kw) -> dict:
    return run_training(cfg, **kw)


def distill(cfg: DistillConfig, **kw) -> dict:
    return run_training(cfg, **kw)


def _tiny_classifier(tmp: Path) -> TrainConfig:
    return TrainConfig(arch="tiny-vit", data="digits", epochs=3, batch_size=32, train_subset=96,
                       warmup_epochs=0.5)  # fmt: skip


def _tiny_distill(tmp: Path) -> DistillConfig:
    teacher = tmp / "teacher"
    if not teacher.exists():
        train_classifier(TrainConfig(arch="tiny-vit", data="digits", epochs=1, batch_size=32,
                                     train_subset=96), out=teacher)  # fmt: skip
    return DistillConfig(arch="tiny-vit", data="digits", epochs=3, batch_size=32, train_subset=96,
                         warmup_epochs=0.5, teacher=str(teacher), loss="ce,kd", ema=0.9)  # fmt: skip


def _tiny_text_align(tmp: Path) -> TrainConfig:
    """train-classifier with GPT4Image text alignment (ViT student: no BatchNorm anywhere, so
    two ranks match one process exactly)."""
    from slimkit.distill.describers import DescribeConfig, describe
    from slimkit.distill.text_encoders import EmbedTextConfig, embed_text

    emb = tmp / "text-emb.safetensors"
    if not emb.exists():
        describe(DescribeConfig(data="digits", train_subset=96), out=tmp / "captions.jsonl")
        embed_text(tmp / "captions.jsonl", EmbedTextConfig(encoder="tfidf"), out=emb)
    return TrainConfig(arch="tiny-vit", data="digits", epochs=3, batch_size=32, train_subset=96,
                       warmup_epochs=0.5, text_align=str(emb), align_weight=0.5)  # fmt: skip


TRAINERS.register("train-classifier", train_classifier, config=TrainConfig, task=ClassifierTask,
                  tiny=_tiny_classifier)  # fmt: skip
TRAINERS.register("distill", distill, config=DistillConfig, task=ClassifierTask, tiny=_tiny_distill)
TRAINERS.register("train-classifier+text-align", train_classifier, config=TrainConfig,
                  task=ClassifierTask, tiny=_tiny_text_align)  # fmt: skip


def load_report(run: str | Path) -> dict:
    return json.loads((Path(run) / "report.json").read_text())
