"""TinyViT-5M image encoder of MobileSAM / TinySAM (``vit_t``), with their checkpoint layout.

Patch embedding: two stride-2 3x3 Conv-BN (GELU between) to 1/4 resolution. Stage 1: MBConv
blocks (1x1 expand x4, 3x3 depthwise, 1x1 project with a zero-initialised BN, residual, GELU).
Stages 2-4: windowed attention blocks (pre-LayerNorm attention with a learned bias per head and
per |dy|, |dx| offset inside the window, a 3x3 depthwise Conv-BN between attention and MLP, a
pre-LayerNorm MLP). Patch merging between stages (1x1 Conv-BN, 3x3 depthwise Conv-BN, 1x1
Conv-BN, GELUs); as in MobileSAM the last merging keeps the resolution (stride 1), so the
1024 px input ends at 64 x 64 like SAM's ViT. Neck: SAM's (1x1 conv, LayerNorm2d, 3x3 conv,
LayerNorm2d) to a 256-channel embedding. The classification leftovers ``norm_head`` / ``head``
exist so official files load strictly; they are unused.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.sam.model import LayerNorm2d


class ConvBN(nn.Sequential):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 1,
        stride: int = 1,
        pad: int = 0,
        groups: int = 1,
        bn_init: float = 1.0,
    ):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(cin, dim // 2, 3, 2, 1), nn.GELU(), ConvBN(dim // 2, dim, 3, 2, 1)
        )

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand: float = 4.0):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_init=0.0)

    def forward(self, x):
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x):
        if x.dim() == 3:  # tokens -> map
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Attention inside a window with a learned bias per head and |offset| (attn_ratio 1)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.key_dim = dim // heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # identity hook points on the matmul operands and outputs (as in SAM's ViTAttention):
        # places for Q-TinySAM's activation quantizers; no parameters, state-dict keys unchanged
        self.q_in, self.k_in, self.v_in = nn.Identity(), nn.Identity(), nn.Identity()
        self.softmax_out, self.qk_out, self.av_out = nn.Identity(), nn.Identity(), nn.Identity()
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p in points:
            for q in points:
                off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs",
            torch.tensor(idxs).view(len(points), len(points)),
            persistent=False,
        )

    def forward(self, x):  # (B, N, C)
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, self.heads, -1).split([self.key_dim] * 3, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attn = (
            self.qk_out(self.q_in(q) @ self.k_in(k).transpose(-2, -1)) * self.scale
            + self.attention_biases[:, self.attention_bias_idxs]
        )
        out = self.av_out(self.softmax_out(attn.softmax(-1)) @ self.v_in(v))
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    def __init__(
        self, dim: int, resolution: tuple[int, int], heads: int, window: int, mlp_ratio: float = 4.0
    ):
        super().__init__()
        self.resolution, self.window = resolution, window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x):  # (B, L, C)
        h, w = self.resolution
        b, L, c = x.shape
        res = x
        ws = self.window
        if h == ws and w == ws:
            x = self.attn(x)
        else:
            x = x.view(b, h, w, c)
            pb, pr = (ws - h % ws) % ws, (ws - w % ws) % ws
            if pb or pr:
                x = F.pad(x, (0, 0, 0, pr, 0, pb))
            ph, pw = h + pb, w + pr
            nh, nw = ph // ws, pw // ws
            x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            x = self.attn(x)
            x = (
                x.view(b, nh, nw, ws, ws, c)
                .transpose(2, 3)
                .reshape(b, ph, pw, c)[:, :h, :w]
                .reshape(b, L, c)
            )
        x = res + x
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, L).transpose(1, 2)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    def __init__(self, img_size: int = 1024, in_chans: int = 3, dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                 heads=(2, 4, 5, 10), windows=(7, 7, 14, 7), out_chans: int = 256, num_classes: int = 1000):  # fmt: skip
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, dims[0])
        r0 = img_size // 4
        self.layers = nn.ModuleList()
        for i in range(4):
            res = r0 // 2 ** (i - 1 if i == 3 else i)
            down = None
            if i < 3:  # the last merging keeps the resolution (MobileSAM)
                down = PatchMerging((res, res), dims[i], dims[i + 1], 1 if i == 2 else 2)
            if i == 0:
                blocks = [MBConv(dims[0]) for _ in range(depths[0])]
            else:
                blocks = [
                    TinyViTBlock(dims[i], (res, res), heads[i], windows[i])
                    for _ in range(depths[i])
                ]
            self.layers.append(Stage(blocks, down))
        self.final_res = r0 // 4
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans),
        )  # fmt: skip

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.final_res, self.final_res, c).permute(0, 3, 1, 2)
        return self.neck(x)
