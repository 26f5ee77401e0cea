"""The VQ tokenizer: images in [0, 1] <-> a raster grid of codebook ids.

:class:`VQVAE` is a small VQ-VAE (van den Oord et al. 2017) with a down-sampling factor
``f = 4`` (a 32 x 32 image -> 8 x 8 = 64 tokens, the spec's stand-in for VQGAN-f16's 16 x 16):

    encoder: conv3x3 -> [conv4x4 stride 2] x 2 -> residual block -> conv1x1 to D      [B, D, h, w]
    quantize: nearest codebook vector (squared distance), straight-through gradient
    decoder: conv1x1 -> residual block -> [transposed conv4x4 stride 2] x 2 -> conv3x3, sigmoid

Loss = MSE(recon, x) + beta * ||z - sg(e)||^2 (the commitment term), plus ||sg(z) - e||^2 when
the codebook is learned by gradient (``quantizer="st"``). With ``quantizer="ema"`` [our default,
as in VQ-VAE-2] the codebook is an exponential moving average of the encoder outputs assigned to
each code (decay 0.99, Laplace-smoothed counts); under ``torchrun`` the per-code sums are
all-reduced so every rank keeps the same codebook as one process on the whole batch.

Dead codes: a code whose moving-average usage (decay 0.9) falls below ``dead_threshold`` is restarted at a
live code (drawn in proportion to usage) plus small noise, from a generator seeded with the
step, so all ranks restart the same codes the same way [our default; restarting at random
encoder outputs would make the result depend on how the batch is split across ranks].

Encoding is deterministic (argmin, ties to the lowest id; eval mode has no randomness) and per
image (an image's codes do not depend on the rest of the batch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError

CONFIG_FILE, WEIGHTS_FILE = "vq_config.json", "vq.safetensors"


@dataclass
class VQConfig:
    """Shape of a :class:`VQVAE`: ``codebook`` codes of width ``embed_dim``, ``channels`` in the
    first conv (doubled after the first down-sampling), images of ``image_size`` pixels."""

    codebook: int = 256
    embed_dim: int = 32
    channels: int = 32
    image_size: int = 32
    quantizer: str = "ema"
    beta: float = 0.25
    decay: float = 0.99
    dead_threshold: float = 0.03

    @property
    def factor(self) -> int:
        return 4

    @property
    def grid(self) -> int:
        return self.image_size // self.factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 1))  # fmt: skip

    def forward(self, x):
        return x + self.body(x)


class VQVAE(nn.Module):
    """A VQ-VAE tokenizer: ``encode(images) -> LongTensor[B, h, w]``, ``decode(codes) -> images``.

    Example:
        >>> vq = VQVAE(VQConfig(codebook=64)).eval()
        >>> codes = vq.encode(torch.rand(2, 3, 32, 32))   # [2, 8, 8], ids in [0, 64)
        >>> vq.decode(codes).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        if cfg.quantizer not in ("ema", "st"):
            raise SlimkitError(f"quantizer must be ema or st (got {cfg.quantizer!r})")
        if cfg.image_size % cfg.factor or cfg.codebook < 2:
            raise SlimkitError(
                f"image size must be a multiple of {cfg.factor} and the codebook >= 2 codes"
            )
        self.cfg = cfg
        c, d = cfg.channels, cfg.embed_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 4, 2, 1), _Res(2 * c), nn.ReLU(), nn.Conv2d(2 * c, d, 1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * c, 1), _Res(2 * c), nn.ReLU(), nn.ConvTranspose2d(2 * c, 2 * c, 4, 2, 1),
            nn.ReLU(), nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.ReLU(), nn.Conv2d(c, 3, 3, padding=1),
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(cfg.codebook, d, generator=g) * 0.5
        if cfg.quantizer == "ema":
            self.register_buffer("codebook", emb)
            self.register_buffer("ema_count", torch.ones(cfg.codebook))
            self.register_buffer("ema_sum", emb.clone())
        else:
            self.codebook = nn.Parameter(emb)
        self.register_buffer("usage", torch.ones(cfg.codebook) / cfg.codebook)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))

    # ---- the tokenizer interface --------------------------------------------------------
    def codes_of(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of every vector of z [B, D, h, w] -> [B, h, w]."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        e = self.codebook.float()
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d2.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] -> int64 codes [B, S/4, S/4] in raster order."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.cfg.image_size:
            raise SlimkitError(
                f"the tokenizer takes images [B, 3, {self.cfg.image_size}, {self.cfg.image_size}]"
                f" (got {list(images.shape)})"
            )
        return self.codes_of(self.encoder(images.to(self.codebook.device).float()))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] (or [B, h*w]) -> images [B, 3, S, S] in [0, 1]."""
        g = self.cfg.grid
        codes = codes.reshape(-1, g, g).to(self.codebook.device)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook):
            raise SlimkitError(f"code ids must lie in [0, {self.cfg.codebook})")
        return self._decode_codes(codes)

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        q = F.embedding(codes, self.codebook).permute(0, 3, 1, 2)
        return torch.sigmoid(self.decoder(q))

    # ---- training -----------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruction, loss and its parts; updates the EMA codebook in training mode."""
        cfg = self.cfg
        z = self.encoder(images)
        if self.training and not int(self.initialized):
            self._init_from(z.detach())
        codes = self.codes_of(z.detach())
        e = F.embedding(codes, self.codebook).permute(0, 3, 1, 2)
        commit = F.mse_loss(z, e.detach())
        loss_q = commit * cfg.beta
        parts = {"commit": float(commit.detach())}
        if cfg.quantizer == "st":
            cb = F.mse_loss(e, z.detach())
            loss_q = loss_q + cb
            parts["codebook"] = float(cb.detach())
        zq = z + (e - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        recon = torch.sigmoid(self.decoder(zq))
        rec = F.mse_loss(recon, images)
        parts["recon"] = float(rec.detach())
        if self.training:
            self._update(z.detach(), codes)
        return recon, rec + loss_q, parts

    @torch.no_grad()
    def _init_from(self, z: torch.Tensor) -> None:
        """Data-dependent start: the codes are K encoder outputs of the first global batch, evenly
        spaced in raster order (gathered over ranks in rank order, so every rank and one process
        on the whole batch start from the same codebook)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        if dist.is_dist():
            w, r = dist.world_size(), dist.rank()
            full = torch.zeros(w * len(flat), flat.shape[1], device=flat.device)
            full[r * len(flat) : (r + 1) * len(flat)] = flat
            flat = dist.all_reduce_sum(full)
        idx = torch.linspace(0, len(flat) - 1, self.cfg.codebook).round().long().to(flat.device)
        self.codebook.data.copy_(
            flat[idx] + 1e-3 * torch.arange(self.cfg.codebook, device=flat.device)[:, None]
        )
        if self.cfg.quantizer == "ema":
            self.ema_sum.copy_(self.codebook)
        self.initialized.fill_(1)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        cfg = self.cfg
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        onehot = F.one_hot(codes.reshape(-1), cfg.codebook).float()
        counts, sums = onehot.sum(0), onehot.t() @ flat
        packed = torch.cat([counts[:, None], sums], 1)
        if dist.is_dist():  # the codebook of one process on the whole global batch
            dist.all_reduce_sum(packed)
        counts, sums = packed[:, 0], packed[:, 1:]
        # usage: a faster average than the codebook's, so that dead codes are found in tens of steps
        self.usage.mul_(0.9).add_(counts / counts.sum().clamp_min(1), alpha=0.1)
        if cfg.quantizer == "ema":
            self.ema_count.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
            self.ema_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + cfg.codebook * 1e-5) * n
            self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, step: int) -> int:
        """Move codes used less than ``dead_threshold / K`` of the time next to live codes;
        returns how many were restarted."""
        cfg = self.cfg
        dead = self.usage < cfg.dead_threshold / cfg.codebook
        n = int(dead.sum())
        if n == 0 or n == cfg.codebook:
            return 0
        g = torch.Generator().manual_seed(1_000_003 + step)
        live = self.usage.cpu().clone()
        live[dead.cpu()] = 0
        src = torch.multinomial(live, n, replacement=True, generator=g)
        cb = self.codebook.detach().cpu()
        noise = torch.randn(n, cb.shape[1], generator=g) * cb.std() * 0.1
        new = (cb[src] + noise).to(self.codebook.device)
        self.codebook.data[dead] = new
        self.usage[dead] = 1.0 / cfg.codebook
        if cfg.quantizer == "ema":
            self.ema_sum[dead] = new
            self.ema_count[dead] = 1.0
        return n


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] ([B, ...] -> [B])."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def round_trip(vq: VQVAE, images: torch.Tensor, batch: int = 64) -> dict:
    """Encode -> decode metrics: mean PSNR (dB), the fraction of codes used and the perplexity
    of the code histogram (exp of its entropy; K when all codes are used equally)."""
    was = vq.training
    vq.eval()
    p, hist = [], torch.zeros(vq.cfg.codebook)
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        codes = vq.encode(x)
        p.append(psnr(vq.decode(codes).cpu(), x))
        hist += torch.bincount(codes.reshape(-1).cpu(), minlength=vq.cfg.codebook).float()
    vq.train(was)
    prob = hist / hist.sum()
    ent = -(prob[prob > 0] * prob[prob > 0].log()).sum()
    return {"psnr": float(torch.cat(p).mean()), "codebook_usage": float((hist > 0).float().mean()),
            "code_perplexity": float(ent.exp()), "images": len(images)}  # fmt: skip


def save_vq(vq: VQVAE, path: str | Path) -> None:
    """Write ``vq_config.json`` and ``vq.safetensors`` into the directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(asdict(vq.cfg), indent=1) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()},
              str(path / WEIGHTS_FILE))  # fmt: skip


def load_vq(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """A tokenizer directory written by ``slimkit lvm train-tokenizer`` or ``import-vqgan``
    (safetensors only), in eval mode."""
    from slimkit.core.weights import check_safetensors

    p = Path(path)
    if p.is_file() and p.name in (CONFIG_FILE, WEIGHTS_FILE):
        p = p.parent
    cfg_file, w_file = p / CONFIG_FILE, p / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise SlimkitError(
            f"{path} is not a tokenizer directory (no {CONFIG_FILE} + {WEIGHTS_FILE}); "
            "make one with `slimkit lvm train-tokenizer`"
        )
    try:
        raw = json.loads(cfg_file.read_text())
        if raw.get("arch") == "vqgan":  # an imported VQGAN (slimkit lvm import-vqgan)
            from slimkit.lvm.vqgan import VQGAN, VQGANConfig

            cfg, build = VQGANConfig(**raw), VQGAN
        else:
            cfg, build = VQConfig(**raw), VQVAE
    except (TypeError, ValueError, AttributeError) as e:
        raise SlimkitError(f"{cfg_file}: not a tokenizer config ({e})") from None
    check_safetensors(w_file)
    from safetensors.torch import load_file

    vq = build(cfg)
    try:
        vq.load_state_dict(load_file(str(w_file)))
    except RuntimeError as e:
        raise SlimkitError(
            f"{w_file} does not match {cfg_file}: {str(e).splitlines()[0]}"
        ) from None
    return vq.to(device).eval()
