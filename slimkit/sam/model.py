"""Segment Anything (Kirillov et al. 2023) with the official checkpoint layout.

Image encoder: ViT with windowed attention (global attention in a few blocks), decomposed
relative position biases, absolute position embedding, and a convolutional neck to a 256-channel
embedding at 1/16 of the input. Prompt encoder: random Fourier positional encoding (a persistent
2 x 128 Gaussian matrix: it must be loaded, never re-drawn), learned point / box-corner
embeddings, a small conv stack for dense mask prompts. Mask decoder: a two-way transformer
(tokens <-> image) and hypernetwork MLPs giving four masks (one single-output, three multimask)
plus an IoU head.

Module and parameter names follow the official ``sam_vit_{b,l,h}`` files, so those checkpoints
load strictly (``slimkit.sam.checkpoint``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act=F.gelu):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


# ---------------------------------------------------------------- image encoder (ViT)


def _rel_pos(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings (q_size, k_size, C) from a (2 max(q,k) - 1, C) table,
    linearly resized when the table was trained for another size."""
    n = 2 * max(q_size, k_size) - 1
    if table.shape[0] != n:
        table = F.interpolate(table.T[None], size=n, mode="linear")[0].T
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[rel.long()]


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rel_pos: bool, size: tuple[int, int] | None):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # identity hook points on the matmul operands (q, k, post-softmax, v) and outputs
        # (places for activation quantizers and calibration hooks; no parameters, so the
        # state-dict keys are unchanged)
        self.q_in, self.k_in, self.v_in = nn.Identity(), nn.Identity(), nn.Identity()
        self.softmax_out, self.qk_out, self.av_out = nn.Identity(), nn.Identity(), nn.Identity()
        self.use_rel_pos = rel_pos
        if rel_pos:
            hd = dim // heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size[0] - 1, hd))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size[1] - 1, hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, -1).unbind(0)
        attn = self.qk_out(self.q_in(q * self.scale) @ self.k_in(k).transpose(-2, -1))
        if self.use_rel_pos:
            rh, rw = _rel_pos(h, h, self.rel_pos_h), _rel_pos(w, w, self.rel_pos_w)
            rq = q.reshape(b * self.heads, h, w, -1)
            bias_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
            bias_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
            attn = (
                attn.view(b * self.heads, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :]
            ).view(b * self.heads, h * w, h * w)
        out = (
            self.av_out(self.softmax_out(attn.softmax(-1)) @ self.v_in(v))
            .view(b, self.heads, h, w, -1)
            .permute(0, 2, 3, 1, 4)
            .reshape(b, h, w, -1)
        )
        return self.proj(out)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int, grid: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = (window, window) if window > 0 else (grid, grid)
        self.attn = ViTAttention(dim, heads, True, size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            h, w = x.shape[1:3]
            x, padded = _partition(x, self.window)
            x = self.attn(x)
            x = _unpartition(x, self.window, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def _partition(x: torch.Tensor, win: int):
    b, h, w, c = x.shape
    ph, pw = (win - h % win) % win, (win - w % win) % win
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = (
        x.view(b, hp // win, win, wp // win, win, c)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(-1, win, win, c)
    )
    return x, (hp, wp)


def _unpartition(x: torch.Tensor, win: int, padded: tuple[int, int], size: tuple[int, int]):
    hp, wp = padded
    b = x.shape[0] // (hp * wp // win // win)
    x = (
        x.view(b, hp // win, wp // win, win, win, -1)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(b, hp, wp, -1)
    )
    return x[:, : size[0], : size[1]].contiguous()


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    def __init__(self, img_size: int = 1024, patch: int = 16, in_chans: int = 3, dim: int = 768,
                 depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                 window: int = 14, global_blocks: tuple[int, ...] = (2, 5, 8, 11)):  # fmt: skip
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch
        self.patch_embed = PatchEmbed(patch, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(
            ViTBlock(dim, heads, mlp_ratio, 0 if i in global_blocks else window, grid)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


# ---------------------------------------------------------------- prompt encoder


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_feats: int = 64, scale: float = 1.0):
        super().__init__()
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn(2, num_feats)
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:  # coords in [0, 1]
        c = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        c = 2 * math.pi * c
        return torch.cat([torch.sin(c), torch.cos(c)], -1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        dev = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], -1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        c = coords.clone()
        c[..., 0] = c[..., 0] / image_size[1]
        c[..., 1] = c[..., 1] / image_size[0]
        return self._encode(c.float())


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int = 256, embed_size: tuple[int, int] = (64, 64),
                 input_size: tuple[int, int] = (1024, 1024), mask_chans: int = 16):  # fmt: skip
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = embed_size
        self.input_image_size = input_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0/1: negative / positive point, 2/3: box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * embed_size[0], 4 * embed_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_chans // 4, 2, 2), LayerNorm2d(mask_chans // 4), nn.GELU(),
            nn.Conv2d(mask_chans // 4, mask_chans, 2, 2), LayerNorm2d(mask_chans), nn.GELU(),
            nn.Conv2d(mask_chans, embed_dim, 1),
        )  # fmt: skip
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size)[None]

    def forward(self, points=None, boxes=None, masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        bs = next(t.shape[0] for t in (points[0] if points is not None else None, boxes, masks) if t is not None) \
            if any(t is not None for t in (points, boxes, masks)) else 1  # fmt: skip
        sparse = torch.empty(bs, 0, self.embed_dim, device=self.point_embeddings[0].weight.device)
        if points is not None:
            coords, labels = points
            coords = coords + 0.5  # pixel centres
            if boxes is None:  # pad with a "not a point" token
                coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], 1)
                labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], 1)
            pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
            pe = torch.where(
                (labels == -1)[..., None], self.not_a_point_embed.weight.expand_as(pe), pe
            )
            pe = pe + (labels == 0)[..., None] * self.point_embeddings[0].weight
            pe = pe + (labels == 1)[..., None] * self.point_embeddings[1].weight
            sparse = torch.cat([sparse, pe], 1)
        if boxes is not None:
            corners = (boxes + 0.5).reshape(-1, 2, 2)
            pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
            pe[:, 0] = pe[:, 0] + self.point_embeddings[2].weight
            pe[:, 1] = pe[:, 1] + self.point_embeddings[3].weight
            sparse = torch.cat([sparse, pe], 1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense


# ---------------------------------------------------------------- mask decoder


class Attention(nn.Module):
    """Multi-head attention with an optional down-projection of the embedding dimension."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)
        # identity hook points on the matmul operands and outputs (as in ViTAttention)
        self.q_in, self.k_in, self.v_in = nn.Identity(), nn.Identity(), nn.Identity()
        self.softmax_out, self.qk_out, self.av_out = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, q, k, v):
        def split(x):
            b, n, c = x.shape
            return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        logits = self.qk_out(self.q_in(q) @ self.k_in(k).transpose(-2, -1))
        attn = (logits / math.sqrt(q.shape[-1])).softmax(-1)
        out = self.av_out(self.softmax_out(attn) @ self.v_in(v)).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class TwoWayBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, F.relu)  # ReLU in the decoder, GELU in the encoder
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample)
        self.skip_first_pe = skip_first_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int = 2,
        dim: int = 256,
        heads: int = 8,
        mlp_dim: int = 2048,
        downsample: int = 2,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, heads, mlp_dim, downsample, i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image, image_pe, tokens):
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    def __init__(self, dims: list[int], sigmoid: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.sigmoid = sigmoid

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return torch.sigmoid(x) if self.sigmoid else x


class MaskDecoder(nn.Module):
    def __init__(self, dim: int = 256, transformer: TwoWayTransformer | None = None, num_multimask: int = 3,
                 iou_depth: int = 3, iou_hidden: int = 256):  # fmt: skip
        super().__init__()
        self.transformer = transformer or TwoWayTransformer(dim=dim)
        self.num_mask_tokens = num_multimask + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU(),
        )  # fmt: skip
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP([dim, dim, dim, dim // 8]) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            [dim] + [iou_hidden] * (iou_depth - 1) + [self.num_mask_tokens]
        )

    def forward(self, image_embeddings, image_pe, sparse, dense, multimask: bool,
                return_tokens: bool = False):  # fmt: skip
        """(masks, iou); with ``return_tokens`` also the output tokens (IoU token + mask tokens,
        (B, 1 + num_mask_tokens, dim)) after the two-way transformer (TinySAM's token loss)."""
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0)
        tokens = torch.cat([tokens[None].expand(sparse.shape[0], -1, -1), sparse], 1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], 0) + dense
        pos = torch.repeat_interleave(image_pe, tokens.shape[0], 0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack(
            [m(mask_out[:, i]) for i, m in enumerate(self.output_hypernetworks_mlps)], 1
        )
        masks = (hyper @ up.flatten(2)).reshape(b, -1, up.shape[2], up.shape[3])
        iou = self.iou_prediction_head(iou_out)
        sl = slice(1, None) if multimask else slice(0, 1)
        if return_tokens:
            return masks[:, sl], iou[:, sl], hs[:, : 1 + self.num_mask_tokens]
        return masks[:, sl], iou[:, sl]


# ---------------------------------------------------------------- the model


@dataclass
class SamConfig:
    """Shape of a SAM model (official ViT-B/L/H or a small one for CPU work)."""

    img_size: int = 1024
    patch: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    window: int = 14
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)
    prompt_dim: int = 256
    decoder_heads: int = 8
    decoder_mlp: int = 2048
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    extra: dict = field(default_factory=dict)


class Sam(nn.Module):
    mask_threshold = 0.0

    def __init__(self, cfg: SamConfig, image_encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder or ImageEncoderViT(
            cfg.img_size,
            cfg.patch,
            3,
            cfg.dim,
            cfg.depth,
            cfg.heads,
            4.0,
            cfg.prompt_dim,
            cfg.window,
            cfg.global_blocks,
        )
        grid = cfg.img_size // 16 if image_encoder is not None else cfg.img_size // cfg.patch
        self.prompt_encoder = PromptEncoder(
            cfg.prompt_dim, (grid, grid), (cfg.img_size, cfg.img_size)
        )
        self.mask_decoder = MaskDecoder(
            cfg.prompt_dim,
            TwoWayTransformer(2, cfg.prompt_dim, cfg.decoder_heads, cfg.decoder_mlp, 2),
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False
        )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a (B, 3, h, w) 0..255 image (already resized) and pad it to img_size."""
        x = (x - self.pixel_mean) / self.pixel_std
        s = self.cfg.img_size
        return F.pad(x, (0, s - x.shape[-1], 0, s - x.shape[-2]))

    def decode(self, embedding, points=None, boxes=None, mask_input=None, multimask: bool = True):
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        return self.mask_decoder(
            embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask
        )

    def postprocess(
        self, masks: torch.Tensor, input_size: tuple[int, int], original: tuple[int, int]
    ) -> torch.Tensor:
        s = self.cfg.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original, mode="bilinear", align_corners=False)


SAM_CONFIGS = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(dim=1024, depth=24, heads=16, global_blocks=(5, 11, 17, 23)),
    "vit_h": SamConfig(dim=1280, depth=32, heads=16, global_blocks=(7, 15, 23, 31)),
    # a small SAM-structured model for CPU training and tests: 256 px input, 16 x 16 embedding
    "vit_t": SamConfig(dim=320, extra={"encoder": "tinyvit"}),  # MobileSAM / TinySAM
    "vit_mini": SamConfig(img_size=256, dim=128, depth=4, heads=4, window=4, global_blocks=(1, 3),
                          prompt_dim=64, decoder_heads=4, decoder_mlp=256),
    # a smaller student of vit_mini (same embedding and decoder shapes) for distillation on CPU
    "vit_micro": SamConfig(img_size=256, dim=48, depth=2, heads=2, window=4, global_blocks=(1,),
                           prompt_dim=64, decoder_heads=4, decoder_mlp=256),
}  # fmt: skip


# other names users meet in the MobileSAM / TinySAM releases
SAM_ALIASES = {
    "tinyvit-5m": "vit_t",
    "tinyvit_5m": "vit_t",
    "mobilesam": "vit_t",
    "tinysam": "vit_t",
}


TINYVIT_SHAPE = ("dims", "depths", "heads", "windows")


def build_sam(arch: str = "vit_b", **overrides) -> Sam:
    from slimkit.core.errors import SlimkitError

    arch = SAM_ALIASES.get(arch.lower(), arch)
    if arch not in SAM_CONFIGS:
        raise SlimkitError(
            f"unknown SAM architecture {arch!r}; choose one of: {', '.join([*SAM_CONFIGS, *SAM_ALIASES])}"
        )
    cfg = SamConfig(**{**SAM_CONFIGS[arch].__dict__, **overrides})
    if cfg.extra.get("encoder") == "tinyvit":
        from slimkit.sam.tinyvit import TinyViT

        # ``extra`` may shrink the TinyViT (dims / depths / heads / windows) for tests and CPU work
        shape = {k: tuple(cfg.extra[k]) for k in TINYVIT_SHAPE if k in cfg.extra}
        enc = TinyViT(img_size=cfg.img_size, out_chans=cfg.prompt_dim, **shape)
        return Sam(cfg, image_encoder=enc).eval()
    return Sam(cfg).eval()
