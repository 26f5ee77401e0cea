"""VQGAN tokenizers from user-supplied checkpoints in the taming-transformers key layout.

The module tree reproduces taming's ``VQModel`` (``taming/models/vqgan.py``,
``taming/modules/diffusionmodules/model.py``) attribute for attribute, so a taming state dict
loads *strictly* (the training-only ``loss.*`` keys dropped):

    encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}, encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.{norm_out,conv_out}, quant_conv,
    quantize.embedding, post_quant_conv, decoder.conv_in, decoder.mid.*,
    decoder.up.{i}.block.{j}, decoder.up.{i}.attn.{j}, decoder.up.{i}.upsample.conv,
    decoder.{norm_out,conv_out}

GroupNorm(32, eps 1e-6), swish, attention at the resolutions in ``attn_resolutions``,
down-sampling by a stride-2 conv after (0, 1, 0, 1) padding, nearest up-sampling + conv. The
shape comes from taming's YAML (``model.params.ddconfig``, ``embed_dim``, ``n_embed``) or the
same keys at the top level of a JSON / YAML file. Weights are read from safetensors or with
``torch.load(weights_only=True)`` (a Lightning ``.ckpt`` holding only tensors and plain
containers loads; one that pickles objects is refused: convert it to safetensors first).

Input range: taming's models take [-1, 1]; open-muse's take [0, 1] (``input_range``). The
tokenizer interface is the VQ-VAE's: ``encode(images in [0, 1]) -> [B, h, w]``, ``decode``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError


@dataclass
class VQGANConfig:
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [16])
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    embed_dim: int = 256
    n_embed: int = 1024
    input_range: str = "-1,1"  # taming; open-muse checkpoints take "0,1"
    arch: str = "vqgan"

    # the VQ-VAE's interface names
    @property
    def codebook(self) -> int:
        return self.n_embed

    @property
    def image_size(self) -> int:
        return self.resolution

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (m(h).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        mult, res = [1, *cfg.ch_mult], cfg.resolution
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = cfg.ch * mult[i], cfg.ch * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        cin, res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin)
        up = [None] * n
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Quantize(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.embedding = nn.Embedding(n, d)


class VQGAN(nn.Module):
    """Taming's VQModel for inference: ``encode(images in [0, 1]) -> codes [B, h, w]``,
    ``decode(codes) -> images in [0, 1]``; ``cfg`` carries ``codebook``, ``image_size``,
    ``tokens_per_image`` like the VQ-VAE's config."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        if cfg.input_range not in ("-1,1", "0,1"):
            raise SlimkitError(f"input_range must be -1,1 or 0,1 (got {cfg.input_range!r})")
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantize = _Quantize(cfg.n_embed, cfg.embed_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        s = self.cfg.resolution
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise SlimkitError(
                f"the tokenizer takes images [B, 3, {s}, {s}] (got {list(images.shape)})"
            )
        x = images.to(self.codebook.device).float()
        if self.cfg.input_range == "-1,1":
            x = x * 2 - 1
        z = self.quant_conv(self.encoder(x))
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.codebook
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d2.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.cfg.grid
        codes = codes.reshape(-1, g, g).to(self.codebook.device)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.n_embed):
            raise SlimkitError(f"code ids must lie in [0, {self.cfg.n_embed})")
        q = self.quantize.embedding(codes).permute(0, 3, 1, 2)
        x = self.decoder(self.post_quant_conv(q))
        return ((x + 1) / 2 if self.cfg.input_range == "-1,1" else x).clamp(0, 1)


def read_vqgan_config(path: str | Path, **overrides) -> VQGANConfig:
    """A VQGAN shape from taming's YAML (``model.params.{ddconfig, embed_dim, n_embed}``) or a
    JSON / YAML file with the same keys at the top level."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"VQGAN config {p} does not exist")
    try:
        raw = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise SlimkitError(f"cannot read {p} ({e})") from None
    params = (raw or {}).get("model", {}).get("params", raw) or {}
    flat = {**params.get("ddconfig", {}), **{k: v for k, v in params.items() if k != "ddconfig"}}
    known = {f for f in VQGANConfig.__dataclass_fields__}
    cfg = {k: v for k, v in flat.items() if k in known} | overrides
    try:
        return VQGANConfig(**cfg)
    except TypeError as e:
        raise SlimkitError(f"{p}: not a VQGAN config ({e})") from None


def load_vqgan(weights: str | Path, config: str | Path | VQGANConfig, **overrides) -> VQGAN:
    """A taming-layout VQGAN (``loss.*`` keys ignored, everything else strict), in eval mode."""
    from slimkit.core.weights import load_state_dict

    cfg = config if isinstance(config, VQGANConfig) else read_vqgan_config(config, **overrides)
    sd = load_state_dict(weights)
    if isinstance(sd.get("state_dict"), dict):  # a Lightning checkpoint
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.") and torch.is_tensor(v)}
    model = VQGAN(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SlimkitError(
            f"{weights} is not a taming VQGAN of this shape: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return model.eval()


def save_vqgan(model: VQGAN, path: str | Path) -> None:
    """A tokenizer directory (``vq_config.json`` with ``arch: vqgan`` + ``vq.safetensors``)."""
    from safetensors.torch import save_file

    from slimkit.lvm.vq import CONFIG_FILE, WEIGHTS_FILE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(asdict(model.cfg), indent=1) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / WEIGHTS_FILE))  # fmt: skip
