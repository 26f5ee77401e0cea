"""SR trainers on the shared loop (``slimkit.train``):

- ``sr-rrdb``: L1 pre-training of the RRDB LR encoder (a regression SR net: rrdb(LR) ~ HR);
- ``sr-diffusion``: SRDiff's residual diffusion with the RRDB frozen; with ``--masks`` the
  SAM-DiffSR structure-modulated forward process (``slimkit.sr.diffusion``), with ``--control``
  the spec's two controls (masks of another image; a constant map).

Both take :class:`SRTrainConfig` (``--stage`` picks one). Batches (patches, t, noise) are a
function of (seed, step) only, drawn for the global batch and sliced per rank, so a resumed or
a torchrun run repeats an uninterrupted single-process one.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.sr.data import PairedPatches, e_maps_for, load_hr_images
from slimkit.sr.diffusion import COEFFICIENTS, SAMPLERS, diffusion_loss
from slimkit.sr.models import RRDBNet, SRDiff, SRModelConfig, load_run, save_model
from slimkit.train import TRAINERS, LoopOptions, Trainer, TrainTask, run_task

log = logging.getLogger("slimkit")
CONTROLS = ("none", "other-image", "constant")


@dataclass
class SRTrainConfig:
    stage: str = field(
        default="diffusion",
        metadata={
            "help": "rrdb (L1 pre-training of the LR encoder) or diffusion",
            "choices": ["rrdb", "diffusion"],
        },
    )
    images: str = field(
        default="synthetic",
        metadata={"help": "synthetic, photos[:NAME,...] or a folder of HR images"},
    )
    n_images: int = field(default=2000, metadata={"help": "synthetic: number of training images"})
    image_size: int = field(default=64, metadata={"help": "synthetic: image side (pixels)"})
    masks: str = field(
        default="",
        metadata={"help": "SAM-DiffSR: make-masks folder, or segments (synthetic); empty = SRDiff"},
    )
    control: str = field(
        default="none",
        metadata={
            "help": "SPE control: none, other-image (another image's map), constant (its mean)",
            "choices": list(CONTROLS),
        },
    )
    coefficient: str = field(
        default="code",
        metadata={
            "help": "modulation: code = sqrt(1-abar) beta (official), strong = sqrt(1-abar)",
            "choices": list(COEFFICIENTS),
        },
    )
    rrdb: str = field(
        default="",
        metadata={
            "help": "diffusion: the frozen LR encoder (an sr train --stage rrdb run, or an official RRDB checkpoint)"
        },
    )
    scale: int = field(default=4, metadata={"help": "SR factor (4 or 8)"})
    patch: int = field(default=32, metadata={"help": "HR patch side (multiple of scale)"})
    flips: bool = field(
        default=False, metadata={"help": "random horizontal / vertical flips (official: none)"}
    )
    rrdb_blocks: int = field(default=4, metadata={"help": "RRDB blocks (official 17)"})
    rrdb_feat: int = field(default=16, metadata={"help": "RRDB features (official 64)"})
    rrdb_growth: int = field(default=8, metadata={"help": "RRDB growth channels (official 32)"})
    hidden: int = field(default=16, metadata={"help": "U-Net width (official 64)"})
    dim_mults: str = field(
        default="1,2,2", metadata={"help": "U-Net width multipliers per level (official 1,2,3,4)"}
    )
    timesteps: int = field(default=100, metadata={"help": "diffusion steps T (cosine schedule)"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "patches per step (global)"})
    lr: float = field(default=2e-4, metadata={"help": "Adam learning rate"})
    lr_decay_every: int = field(
        default=0,
        metadata={"help": "halve the learning rate every N steps (0 = never; official 200k)"},
    )
    clip_grad: float = field(default=10.0, metadata={"help": "gradient-norm clip (0 = off)"})
    ema: float = field(
        default=0.0,
        metadata={
            "help": "EMA decay of the trained weights, evaluated and saved instead of the raw ones (0 = off, official)"
        },
    )
    val_images: int = field(
        default=16, metadata={"help": "held-out synthetic images for the report"}
    )
    val_sampler: str = field(
        default="ddim", metadata={"help": "sampler of the report", "choices": list(SAMPLERS)}
    )
    val_steps: int = field(default=10, metadata={"help": "sampler steps of the report"})
    eval_every: int = field(
        default=0,
        metadata={
            "help": "validation PSNR every N steps: the report's learning curve (0 = only at the end)"
        },
    )
    srdiff_compat_scale: bool = field(
        default=False, metadata={"help": "U(LR) from LR/256 as SRDiff's code (parity runs)"}
    )
    checkpoint_every: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda[:N]"})
    seed: int = field(default=0, metadata={"help": "initialisation, data and noise seed"})

    def __post_init__(self) -> None:
        for k in ("n_images", "steps", "batch_size", "timesteps", "hidden", "val_steps"):
            if getattr(self, k) < 1:
                raise SlimkitError(f"--{k.replace('_', '-')} must be >= 1")
        if not 0 <= self.ema < 1:
            raise SlimkitError(f"--ema must be in [0, 1) (got {self.ema})")
        if self.eval_every < 0:
            raise SlimkitError("--eval-every must be >= 0 (0 = validate only at the end)")
        if self.patch % self.scale:
            raise SlimkitError(f"--patch {self.patch} must be a multiple of --scale {self.scale}")
        self.model_config()
        if self.patch % (self.scale * self.model_config().multiple):
            raise SlimkitError(
                f"--patch {self.patch} must be a multiple of {self.scale * self.model_config().multiple} for --dim-mults {self.dim_mults}"
            )
        if self.control != "none" and not self.masks:
            raise SlimkitError("--control needs --masks (it replaces the SPE maps of the masks)")

    def model_config(self) -> SRModelConfig:
        try:
            mults = [int(v) for v in self.dim_mults.split(",")]
        except ValueError:
            raise SlimkitError(
                f"--dim-mults must be integers separated by commas (got {self.dim_mults!r})"
            ) from None
        return SRModelConfig(scale=self.scale, rrdb_blocks=self.rrdb_blocks, rrdb_feat=self.rrdb_feat,
                             rrdb_growth=self.rrdb_growth, hidden=self.hidden, dim_mults=mults,
                             timesteps=self.timesteps)  # fmt: skip

    @property
    def method(self) -> str:
        if self.stage == "rrdb":
            return "RRDB (L1)"
        if not self.masks:
            return "SRDiff"
        return "SAM-DiffSR" if self.control == "none" else f"SAM-DiffSR control ({self.control})"


def _validation(cfg: SRTrainConfig):
    return load_hr_images(
        "synthetic", n=cfg.val_images, size=cfg.image_size, seed=cfg.seed + 1_000_003
    )


class _SRTask(TrainTask):
    def __init__(self, cfg: SRTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        if cfg.batch_size % dist.world_size():
            raise SlimkitError(f"--batch-size must be divisible by the {dist.world_size()} ranks")
        images = load_hr_images(cfg.images, n=cfg.n_images, size=cfg.image_size, seed=cfg.seed)
        maps = e_maps_for(images, cfg.masks, cfg.control) if cfg.stage == "diffusion" else None
        self.data = PairedPatches(images, maps, scale=cfg.scale, patch=cfg.patch, flips=cfg.flips,
                                  compat_scale=cfg.srdiff_compat_scale)  # fmt: skip

    def loop_options(self) -> LoopOptions:
        return LoopOptions(total_steps=self.cfg.steps, clip_grad=self.cfg.clip_grad,
                           checkpoint_every=self.cfg.checkpoint_every, ema=self.cfg.ema)  # fmt: skip

    @contextmanager
    def _averaged(self, trainer: Trainer):
        """The trained module holds the EMA weights inside the block (no-op without --ema)."""
        if trainer.ema is None:
            yield
            return
        src = trainer.ema_src
        saved = copy.deepcopy(src.state_dict())
        src.load_state_dict(trainer.ema.state_dict())
        try:
            yield
        finally:
            src.load_state_dict(saved)

    def _optimizer(self, params):
        opt = torch.optim.Adam(params, lr=self.cfg.lr)
        n = self.cfg.lr_decay_every
        return opt, (torch.optim.lr_scheduler.StepLR(opt, n, 0.5) if n else None)

    def _validate(self) -> dict:
        """Score the model on the held-out validation images (basicsr protocol)."""
        raise NotImplementedError

    def after_step(self, step: int, record: dict, trainer: Trainer) -> bool:
        """Every ``eval_every`` steps, rank 0 adds the validation PSNR to the history (the
        report's learning curve). Evaluation uses its own noise generator and restores the
        training mode, so the run's weights do not depend on ``eval_every``."""
        rec = {"step": step + 1, "loss": record["loss"]}
        n = self.cfg.eval_every
        if n and (step + 1) % n == 0 and step + 1 < self.cfg.steps and dist.rank() == 0:
            modes = [m.training for m in self.model.modules()]
            with torch.no_grad(), self._averaged(trainer):
                val = self._validate()
            for m, mode in zip(self.model.modules(), modes):
                m.training = mode
            rec["val_psnr"] = val[self.cfg.method]["basicsr-y-crop4"]["psnr"]
            log.info("step %d: validation PSNR %.2f dB", step + 1, rec["val_psnr"])
        self.history.append(rec)
        return False

    def _curve(self, final: dict) -> list[dict]:
        """(step, validation PSNR) pairs of the run, the final evaluation last."""
        pts = [{"step": r["step"], "psnr": r["val_psnr"]} for r in self.history if "val_psnr" in r]
        return pts + [
            {"step": self.cfg.steps, "psnr": final[self.cfg.method]["basicsr-y-crop4"]["psnr"]}
        ]

    def _global_batch(self, step: int) -> tuple[dict, torch.Generator]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return self.data.batch(self.cfg.batch_size, g), g

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        w, r, b = dist.world_size(), dist.rank(), self.cfg.batch_size
        return t[r * b // w : (r + 1) * b // w].to(self.device)


class RRDBTask(_SRTask):
    """L1 pre-training of the RRDB encoder (SRDiff's first stage)."""

    kind = "sr-rrdb"

    def __init__(self, cfg: SRTrainConfig, device: torch.device):
        super().__init__(cfg, device)
        torch.manual_seed(cfg.seed)
        self.model = RRDBNet(cfg.model_config()).to(device).train()

    def optimizer(self):
        return self._optimizer(self.model.parameters())

    def micro_batches(self, step: int) -> list:
        b, _ = self._global_batch(step)
        return [{k: self._mine(v) for k, v in b.items() if k in ("hr", "lr")}]

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        return F.l1_loss(self.model(micro["lr"])[0], micro["hr"]), {}

    def _validate(self) -> dict:
        from slimkit.sr.evaluate import evaluate_images

        return evaluate_images({"RRDB (L1)": self.model}, _validation(self.cfg), self.cfg.scale,
                               protocols=("basicsr",), device=self.device)["summary"]  # fmt: skip

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        if trainer.ema is not None:  # the average is what the run delivers
            trainer.ema_src.load_state_dict(trainer.ema.state_dict())
        save_model(self.model, self.cfg.model_config(), path, stage="rrdb", method=self.cfg.method)
        val = self._validate()
        return {"kind": self.kind, "validation": val, "validation_curve": self._curve(val),
                "headline": {f"{m} PSNR ({p})": v["psnr"] for m, d in val.items() for p, v in d.items()},
                "protocol": f"{self.cfg.val_images} held-out synthetic images, x{self.cfg.scale}"}  # fmt: skip


class DiffusionTask(_SRTask):
    """SRDiff / SAM-DiffSR: L1 on the (modulated) noise, the RRDB encoder frozen."""

    kind = "sr-diffusion"

    def __init__(self, cfg: SRTrainConfig, device: torch.device):
        if not cfg.rrdb:
            raise SlimkitError(
                "--rrdb is required: the frozen LR encoder (run slimkit sr train --stage rrdb first)"
            )
        rrdb, info = load_run(cfg.rrdb, "rrdb")
        mc = cfg.model_config()
        got = info["model"]
        for k in ("rrdb_blocks", "rrdb_feat", "rrdb_growth"):
            if got[k] != getattr(mc, k):
                raise SlimkitError(
                    f"--rrdb {cfg.rrdb} has {k}={got[k]}, this run asks for {getattr(mc, k)} (LeiaLi/SRDiff#10)"
                )
        super().__init__(cfg, device)
        torch.manual_seed(cfg.seed)
        self.model = SRDiff(mc)
        self.model.rrdb.load_state_dict(rrdb.state_dict())
        self.model.rrdb.requires_grad_(False).eval()
        self.model.to(device)
        self.ema_of = self.model.denoise_fn  # the frozen encoder needs no average

    def optimizer(self):
        return self._optimizer(self.model.denoise_fn.parameters())

    def micro_batches(self, step: int) -> list:
        b, g = self._global_batch(step)
        n, p = self.cfg.batch_size, self.cfg.patch
        b["t"] = torch.randint(0, self.cfg.timesteps, (n,), generator=g)
        b["noise"] = torch.randn(n, 3, p, p, generator=g)
        return [{k: self._mine(v) for k, v in b.items()}]

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        self.model.rrdb.eval()
        per = diffusion_loss(self.model, micro["hr"], micro["lr"], micro["lr_up"], micro["t"],
                             micro["noise"], micro.get("e"), self.cfg.coefficient)  # fmt: skip
        return per.mean(), {}

    def _validate(self) -> dict:
        from slimkit.sr.evaluate import evaluate_images

        cfg = self.cfg
        return evaluate_images({cfg.method: self.model}, _validation(cfg), cfg.scale, protocols=("basicsr",),
                               sampler=cfg.val_sampler, steps=cfg.val_steps, device=self.device)["summary"]  # fmt: skip

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        cfg = self.cfg
        if trainer.ema is not None:  # the average is what the run delivers
            trainer.ema_src.load_state_dict(trainer.ema.state_dict())
        save_model(self.model, cfg.model_config(), path, stage="diffusion", method=cfg.method,
                   masks=cfg.masks, control=cfg.control, coefficient=cfg.coefficient, rrdb=cfg.rrdb,
                   srdiff_compat_scale=cfg.srdiff_compat_scale)  # fmt: skip
        val = self._validate()
        return {"kind": self.kind, "method": cfg.method, "validation": val, "validation_curve": self._curve(val),
                "headline": {f"{m} PSNR ({p})": v["psnr"] for m, d in val.items() for p, v in d.items()},
                "protocol": f"{cfg.val_images} held-out synthetic images, x{cfg.scale}, "
                            f"{cfg.val_sampler} {cfg.val_steps} steps, sampler seed 0"}  # fmt: skip


def train_sr(cfg: SRTrainConfig, *, out: str | Path, resume: bool = False, overwrite: bool = False,
             command: str = "") -> dict:  # fmt: skip
    """Train one SR stage into the run directory ``out`` (``model.safetensors`` in the official
    key layout + ``sr_config.json``); ``cfg.stage`` picks the RRDB or the diffusion trainer."""
    task = RRDBTask if cfg.stage == "rrdb" else DiffusionTask
    return run_task(task, cfg, out=out, resume=resume, overwrite=overwrite, command=command)


# ---------------------------------------------------------------------------------------
# seconds-long runs for the shared trainer tests
# ---------------------------------------------------------------------------------------
def _tiny(stage: str, **kw) -> SRTrainConfig:
    return SRTrainConfig(stage=stage, n_images=8, image_size=32, patch=16, rrdb_blocks=2, rrdb_feat=8,
                         rrdb_growth=4, hidden=8, dim_mults="1,2", timesteps=20, steps=6, batch_size=4,
                         val_images=2, val_steps=2, checkpoint_every=2, **kw)  # fmt: skip


def _tiny_rrdb(tmp: Path) -> SRTrainConfig:
    return _tiny("rrdb")


def _tiny_diffusion(tmp: Path) -> SRTrainConfig:
    rrdb = tmp / "tiny-sr-rrdb"
    if not rrdb.exists():
        c = _tiny("rrdb")
        c.steps = 2
        train_sr(c, out=rrdb)
    return _tiny("diffusion", rrdb=str(rrdb), masks="segments", flips=True)


TRAINERS.register("sr-rrdb", train_sr, config=SRTrainConfig, task=RRDBTask, tiny=_tiny_rrdb)
TRAINERS.register(
    "sr-diffusion", train_sr, config=SRTrainConfig, task=DiffusionTask, tiny=_tiny_diffusion
)

__all__ = ["DiffusionTask", "RRDBTask", "SRTrainConfig", "train_sr"]
