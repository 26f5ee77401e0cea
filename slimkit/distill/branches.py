"""Training-only heads of the distiller: OFA exit branches (stage feature -> class logits) and
FitNet connectors (student stage -> teacher stage). They live in :class:`Distiller`, never in the
student, so the saved student is the plain timm model.

OFA branches (spec ofa-kd.md 2.2):
- CNN student, stage k of 4: (4 - k) SepConv blocks (depthwise 3x3 stride 2, pointwise, BN, ReLU,
  depthwise 3x3, pointwise, BN, ReLU), widths doubling up to d* = max(d_s, d_t); stage 4 a 1x1
  conv to d*; global average pool; Linear(d*, classes). A block that would shrink the map below
  1x1 uses stride 1 (tiny inputs).
- Token student (ViT / Mixer / Swin): m = max(floor(log2(g / g_final)), 0) patch merges
  (2x2 concat -> LayerNorm -> Linear; first to d_s, GELU after each but the last of several),
  prefix tokens re-attached, max(4 - k, 1) pre-norm transformer blocks (4 heads), CLS read-out or
  token mean, Linear(d_s, classes). ``g_final`` is the student's final grid (the official code
  fixes 7 for 224 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.vision.models import StageFeature


def _init(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class SepConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.Conv2d(cin, cin, 1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class CNNBranch(nn.Module):
    def __init__(self, channels: int, size: int, stage: int, width: int, num_classes: int):
        super().__init__()
        n_blocks = 4 - stage
        layers: list[nn.Module] = []
        c = channels
        for i in range(n_blocks):
            out = width if i == n_blocks - 1 else min(c * 2, width)
            stride = 2 if size > 1 else 1
            layers.append(SepConv(c, out, stride))
            size = (size + 1) // 2 if stride == 2 else size
            c = out
        if n_blocks == 0:
            layers.append(nn.Conv2d(c, width, 1))
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        _init(self)

    def forward(self, f: StageFeature) -> torch.Tensor:
        return self.fc(self.body(f.spatial).mean((2, 3)))


class PatchMerge(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * cin)
        self.proj = nn.Linear(4 * cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, cout, H/2, W/2)
        if x.shape[2] % 2 or x.shape[3] % 2:
            x = F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2))
        x = torch.cat(
            [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], 1
        )
        x = self.proj(self.norm(x.permute(0, 2, 3, 1)))
        return x.permute(0, 3, 1, 2)


class TokenBranch(nn.Module):
    def __init__(self, channels: int, grid: int, final_grid: int, stage: int, width: int,
                 num_classes: int, has_prefix: bool):  # fmt: skip
        super().__init__()
        m = max(int(math.floor(math.log2(max(grid, 1) / max(final_grid, 1)))), 0)
        merges: list[nn.Module] = []
        c = channels
        for i in range(m):
            merges.append(PatchMerge(c, width))
            if m == 1 or i < m - 1:
                merges.append(nn.GELU())
            c = width
        self.merges = nn.Sequential(*merges)
        self.proj = nn.Identity() if c == width else nn.Linear(c, width)
        self.prefix_proj = (
            nn.Linear(channels, width) if has_prefix and channels != width else nn.Identity()
        )
        self.has_prefix = has_prefix
        heads = 4 if width % 4 == 0 else 1
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )  # fmt: skip
            for _ in range(max(4 - stage, 1))
        )
        self.fc = nn.Linear(width, num_classes)
        _init(self)

    def forward(self, f: StageFeature) -> torch.Tensor:
        x = self.merges(f.spatial)
        t = self.proj(x.flatten(2).transpose(1, 2))
        if self.has_prefix and f.prefix is not None:
            t = torch.cat([self.prefix_proj(f.prefix), t], 1)
        for blk in self.blocks:
            t = blk(t)
        pooled = t[:, 0] if self.has_prefix and f.prefix is not None else t.mean(1)
        return self.fc(pooled)


class Connector(nn.Module):
    """FitNet regressor: both stages patchified to the coarser grid, student tokens projected to
    the teacher's width (1x1 conv == per-token linear)."""

    def __init__(self, cs: int, ct: int):
        super().__init__()
        self.proj = nn.Conv2d(cs, ct, 1)
        _init(self)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = min(s.shape[2], t.shape[2])
        s = F.adaptive_avg_pool2d(s, g)
        t = F.adaptive_avg_pool2d(t, g)
        return self.proj(s), t
