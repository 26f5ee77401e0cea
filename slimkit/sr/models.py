"""SRDiff's networks, with the official SRDiff / SAM-DiffSR state-dict key layout, so that their
released checkpoints load into these modules (``load_official``).

- :class:`RRDBNet`: the LR encoder (ESRGAN's RRDB trunk, two nearest x2 upsamplings). Its
  features (every third RRDB block output from the third on, plus the fused trunk) condition the
  U-Net.
- :class:`Unet`: the conditional denoiser (no GroupNorm, Mish, sinusoidal time embedding, no
  attention). The LR features are projected to HR size by a ConvTranspose2d (kernel 2s, stride
  s) and added after the first level's two ResNet blocks.
- :class:`SRDiff`: ``denoise_fn`` + ``rrdb`` (the official attribute names) + the schedule
  buffers (not saved: they are recomputed from the config, and ignored when an official
  checkpoint carries them).

Shapes: LR [B, 3, h, w] in [-1, 1]; HR / residual [B, 3, s*h, s*w].
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError


@dataclass
class SRModelConfig:
    """Sizes of the two networks. Official SRDiff: rrdb_blocks 17, rrdb_feat 64, rrdb_growth 32,
    hidden 64, dim_mults (1, 2, 3, 4); the small-scale check: 4 / 16 / 8, 16, (1, 2, 2)."""

    scale: int = 4
    rrdb_blocks: int = 4
    rrdb_feat: int = 16
    rrdb_growth: int = 8
    hidden: int = 16
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    timesteps: int = 100

    def __post_init__(self) -> None:
        if self.scale not in (4, 8):
            raise SlimkitError(f"scale must be 4 or 8, as in SRDiff (got {self.scale})")
        if self.rrdb_blocks < 2:
            raise SlimkitError(
                "the RRDB encoder needs at least 2 blocks (its features start at the 3rd output)"
            )
        if not self.dim_mults or min(self.dim_mults) < 1:
            raise SlimkitError(f"dim_mults must be positive integers (got {self.dim_mults})")

    @property
    def multiple(self) -> int:
        """HR sides must be multiples of this (one stride-2 downsampling per level but the last)."""
        return 2 ** (len(self.dim_mults) - 1)


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(F.softplus(x))


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        a = t.float()[:, None] * freq[None]
        return torch.cat((a.sin(), a.cos()), dim=-1)


class Block(nn.Module):
    """Reflection-padded 3x3 conv + Mish (``block.0`` pad, ``block.1`` conv, ``block.2`` Mish)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim_out, 3), Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.mlp(temb)[:, :, None, None]
        return self.block2(h) + self.res_conv(x)


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ConvTranspose2d(dim, dim, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResidualDenseBlock_5C(nn.Module):  # noqa: N801  (the official class name)
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.RDB1 = ResidualDenseBlock_5C(nf, gc)
        self.RDB2 = ResidualDenseBlock_5C(nf, gc)
        self.RDB3 = ResidualDenseBlock_5C(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """LR encoder / regression SR net. ``forward(lr)`` -> (SR in [-1, 1], features list)."""

    def __init__(self, cfg: SRModelConfig):
        super().__init__()
        nf, self.scale = cfg.rrdb_feat, cfg.scale
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(
            *[RRDB(nf, cfg.rrdb_growth) for _ in range(cfg.rrdb_blocks)]
        )
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        if cfg.scale == 8:
            self.upconv3 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feas = []
        fea_first = fea = self.conv_first((lr + 1) / 2)
        for block in self.RRDB_trunk:
            fea = block(fea)
            feas.append(fea)
        fea = fea_first + self.trunk_conv(fea)
        feas.append(fea)
        ups = [self.upconv1, self.upconv2] + ([self.upconv3] if self.scale == 8 else [])
        for conv in ups:
            fea = self.lrelu(conv(F.interpolate(fea, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.HRconv(fea)))
        return out.clamp(0, 1) * 2 - 1, feas


class Unet(nn.Module):
    """The conditional denoiser: ``forward(x_t, t, cond_features)`` -> predicted noise."""

    def __init__(self, cfg: SRModelConfig):
        super().__init__()
        dim = cfg.hidden
        dims = [3, *(dim * m for m in cfg.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        s = cfg.scale
        n_feats = (cfg.rrdb_blocks + 1) // 3  # features taken: outputs 3, 6, ... and the trunk
        self.cond_proj = nn.ConvTranspose2d(cfg.rrdb_feat * n_feats, dim, s * 2, s, s // 2)
        self.time_pos_emb = SinusoidalPosEmb(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), Mish(), nn.Linear(dim * 4, dim))
        self.downs = nn.ModuleList()
        for i, (a, b) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([ResnetBlock(a, b, dim), ResnetBlock(b, b, dim),
                                             nn.Identity() if last else Downsample(b)]))  # fmt: skip
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, dim)
        self.mid_block2 = ResnetBlock(mid, mid, dim)
        self.ups = nn.ModuleList()
        for i, (a, b) in enumerate(reversed(in_out[1:])):
            last = i == len(in_out) - 1  # never true: every up level upsamples (official quirk)
            self.ups.append(nn.ModuleList([ResnetBlock(b * 2, a, dim), ResnetBlock(a, a, dim),
                                           nn.Identity() if last else Upsample(a)]))  # fmt: skip
        self.final_conv = nn.Sequential(Block(dim, dim), nn.Conv2d(dim, 3, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: list[torch.Tensor]) -> torch.Tensor:
        temb = self.mlp(self.time_pos_emb(t))
        c = self.cond_proj(torch.cat(cond[2::3], 1))
        skips = []
        for i, (r1, r2, down) in enumerate(self.downs):
            x = r2(r1(x, temb), temb)
            if i == 0:
                x = x + c
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_block1(x, temb), temb)
        for r1, r2, up in self.ups:
            x = up(r2(r1(torch.cat((x, skips.pop()), 1), temb), temb))
        return self.final_conv(x)


class SRDiff(nn.Module):
    """Denoiser + frozen LR encoder + the diffusion schedule (``slimkit.sr.diffusion``).

    The model is the same for SRDiff and SAM-DiffSR: structure modulation changes the training
    targets only, never the network or the sampler."""

    def __init__(self, cfg: SRModelConfig):
        super().__init__()
        from slimkit.sr.diffusion import Schedule

        self.cfg = cfg
        self.denoise_fn = Unet(cfg)
        self.rrdb = RRDBNet(cfg)
        self.schedule = Schedule(cfg.timesteps)

    def encode(self, lr: torch.Tensor) -> list[torch.Tensor]:
        """The RRDB features that condition the denoiser (no gradient: the encoder is frozen)."""
        with torch.no_grad():
            return self.rrdb(lr)[1]


# ---------------------------------------------------------------------------------------
# official checkpoints
# ---------------------------------------------------------------------------------------
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "mask_coefficient",
}  # fmt: skip


def unwrap_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    """The tensors of an official checkpoint: ``{"state_dict": {"model": sd}}`` (SRDiff's
    trainer), ``{"model": sd}`` or a bare state dict; ``module.`` prefixes stripped."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not obj:
        raise SlimkitError(f"{source} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _count(sd: dict, prefix: str) -> int:
    n = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}  # fmt: skip
    return max(n) + 1 if n else 0


def infer_config(sd: dict[str, torch.Tensor], source: str, timesteps: int = 100) -> SRModelConfig:
    """The :class:`SRModelConfig` of an official SRDiff / SAM-DiffSR state dict, from shapes."""
    try:
        nf = sd["rrdb.conv_first.weight"].shape[0]
        gc = sd["rrdb.RRDB_trunk.0.RDB1.conv1.weight"].shape[0]
        blocks = _count(sd, "rrdb.RRDB_trunk.")
        hidden = sd["denoise_fn.mlp.0.weight"].shape[1]
        levels = _count(sd, "denoise_fn.downs.")
        mults = [sd[f"denoise_fn.downs.{i}.0.block1.block.1.weight"].shape[0] // hidden
                 for i in range(levels)]  # fmt: skip
        scale = sd["denoise_fn.cond_proj.weight"].shape[-1] // 2
    except KeyError as e:
        raise SlimkitError(
            f"{source} is not an SRDiff / SAM-DiffSR checkpoint (no {e.args[0]})"
        ) from None
    for bad, what in (
        ("denoise_fn.mid_attn.", "use_attn: true"),
        ("denoise_fn.up_proj.", "up_input: true"),
    ):
        if any(k.startswith(bad) for k in sd):
            raise SlimkitError(
                f"{source} was trained with {what}, which slimkit does not implement"
            )
    if "betas" in sd:
        timesteps = sd["betas"].numel()
    return SRModelConfig(scale=scale, rrdb_blocks=blocks, rrdb_feat=nf, rrdb_growth=gc,
                         hidden=hidden, dim_mults=mults, timesteps=timesteps)  # fmt: skip


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load every parameter or fail naming the first missing / unexpected / mis-shaped key (an
    untrained model is never used silently: LeiaLi/SRDiff#14, lose4578/SAM-DiffSR#10)."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k not in SCHEDULE_BUFFERS}
    for k, v in own.items():
        if k not in sd:
            raise SlimkitError(
                f"{source} lacks {k} {tuple(v.shape)}; is it for another model size?"
            )
        if tuple(sd[k].shape) != tuple(v.shape):
            raise SlimkitError(
                f"{source}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(v.shape)}"
            )
    extra = sorted(set(sd) - set(own))
    if extra:
        raise SlimkitError(f"{source} has keys the model does not, e.g. {extra[0]}")
    model.load_state_dict(sd, strict=True)
    return model


def load_official(path: str | Path) -> SRDiff:
    """An official SRDiff / SAM-DiffSR checkpoint (``model_ckpt_steps_*.ckpt``, read with
    ``weights_only=True``) as an :class:`SRDiff`; the sizes are read from the tensor shapes."""
    from slimkit.core.weights import load_state_dict

    sd = unwrap_state_dict(load_state_dict(path), str(path))
    model = SRDiff(infer_config(sd, str(path)))
    model.compat_scale = True  # trained on U(LR) made from LR / 256 (SRDiff's data code)
    return load_strict(model, sd, str(path))


CONFIG_FILE = "sr_config.json"


def save_model(model: nn.Module, cfg: SRModelConfig, path: Path, **info) -> None:
    """Write ``model.safetensors`` (official key layout) and ``sr_config.json`` into ``path``."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"))
    (path / CONFIG_FILE).write_text(json.dumps({"model": asdict(cfg), **info}, indent=1) + "\n")


def load_run(path: str | Path, kind: str = "diffusion") -> tuple[nn.Module, dict]:
    """A ``slimkit sr train`` run directory (``kind`` = ``diffusion`` -> :class:`SRDiff`,
    ``rrdb`` -> :class:`RRDBNet`) or an official checkpoint file (diffusion only)."""
    from slimkit.core.weights import load_state_dict

    p = Path(path)
    if p.is_file() and kind == "diffusion":
        return load_official(p), {
            "stage": "diffusion",
            "modulation": "unknown (official checkpoint)",
        }
    if p.is_file() and kind == "rrdb":
        sd = unwrap_state_dict(load_state_dict(p), str(p))
        sd = {k.removeprefix("rrdb."): v for k, v in sd.items() if not k.startswith("denoise_fn.")}
        full = {"rrdb." + k: v for k, v in sd.items()}
        cfg = SRModelConfig(scale=4, rrdb_blocks=_count(full, "rrdb.RRDB_trunk."),
                            rrdb_feat=sd["conv_first.weight"].shape[0],
                            rrdb_growth=sd["RRDB_trunk.0.RDB1.conv1.weight"].shape[0])  # fmt: skip
        return load_strict(RRDBNet(cfg), sd, str(p)), {"stage": "rrdb", "model": asdict(cfg)}
    f = p / CONFIG_FILE
    if not f.is_file():
        raise SlimkitError(
            f"{p} is neither a `slimkit sr train` run (no {CONFIG_FILE}) nor a checkpoint file"
        )
    info = json.loads(f.read_text())
    if info.get("stage") != kind:
        raise SlimkitError(f"{p} is a {info.get('stage')} run; a {kind} run is needed here")
    cfg = SRModelConfig(**info["model"])
    model = SRDiff(cfg) if kind == "diffusion" else RRDBNet(cfg)
    from safetensors.torch import load_file

    model.compat_scale = bool(info.get("srdiff_compat_scale", False))
    return load_strict(model, load_file(str(p / "model.safetensors")), str(p)), info
