"""Block maps of SAM image encoders for the shared block-wise pipeline (Q-TinySAM).

The pipeline walks one ``nn.ModuleList`` of blocks, each called with one tensor. A SAM encoder
is laid out as such a chain, sharing (not copying) the encoder's modules, so that every
quantized place, convolutions included, is calibrated on the stream of the already quantized
blocks before it:

- ViT (``vit_b/l/h``, ``vit_mini``, ``vit_micro``): patch embedding (+ position embedding),
  the transformer blocks, the neck.
- TinyViT (``vit_t``): patch embedding (two stride-2 Conv-BN), stage 1's MBConv blocks, each
  patch merging, the windowed-attention blocks of stages 2-4, the neck.

The activation shape changes along a TinyViT's chain ((B, C, H, W) maps in the conv stages,
(B, L, C) tokens after); the pipeline's stores take each block's output shape.

Example:
    >>> chain, names = encoder_chain(sam.image_encoder)  # doctest: +SKIP
    >>> BlockwisePipeline(chain, images, block_map=chain_block_map()).run(method)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.errors import SlimkitError


class PatchEmbedWithPosition(nn.Module):
    """A ViT's patch embedding plus its absolute position embedding (one pipeline block)."""

    def __init__(self, patch_embed: nn.Module, pos_embed: torch.Tensor):
        super().__init__()
        self.patch_embed = patch_embed
        self._pos = [pos_embed]  # a reference, not a parameter of this block: no second copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x) + self._pos[0].to(x.device)


class NeckOnTokens(nn.Module):
    """The encoder's neck fed with the last block's output: (B, H, W, C) for a ViT, (B, L, C)
    tokens on a ``res`` x ``res`` grid for a TinyViT; returns the (B, 256, H, W) embedding."""

    def __init__(self, neck: nn.Module, res: int | None = None):
        super().__init__()
        self.neck, self.res = neck, res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.res is None:  # ViT: (B, H, W, C)
            return self.neck(x.permute(0, 3, 1, 2))
        b, _, c = x.shape
        return self.neck(x.view(b, self.res, self.res, c).permute(0, 3, 1, 2))


class EncoderChain(nn.Module):
    """The encoder as one flat list of blocks; ``forward`` equals the encoder's."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def encoder_chain(enc: nn.Module, prefix: str = "image_encoder.") -> tuple[EncoderChain, list]:
    """(chain, per block (module whose places are quantized, its full name prefix in the SAM)).

    The module of a block's places is the block itself, or for the adapters the wrapped patch
    embedding / neck, so that the place names are the SAM's own module names."""
    from slimkit.sam.model import ImageEncoderViT
    from slimkit.sam.tinyvit import TinyViT

    blocks, roots = [], []
    if isinstance(enc, ImageEncoderViT):
        blocks.append(PatchEmbedWithPosition(enc.patch_embed, enc.pos_embed))
        roots.append((enc.patch_embed, f"{prefix}patch_embed."))
        for i, blk in enumerate(enc.blocks):
            blocks.append(blk)
            roots.append((blk, f"{prefix}blocks.{i}."))
        blocks.append(NeckOnTokens(enc.neck))
    elif isinstance(enc, TinyViT):
        blocks.append(enc.patch_embed)
        roots.append((enc.patch_embed, f"{prefix}patch_embed."))
        for i, stage in enumerate(enc.layers):
            for j, blk in enumerate(stage.blocks):
                blocks.append(blk)
                roots.append((blk, f"{prefix}layers.{i}.blocks.{j}."))
            if stage.downsample is not None:
                blocks.append(stage.downsample)
                roots.append((stage.downsample, f"{prefix}layers.{i}.downsample."))
        blocks.append(NeckOnTokens(enc.neck, enc.final_res))
    else:
        raise SlimkitError(
            "sam quantize handles ViT (vit_b/l/h, vit_mini, vit_micro) and TinyViT (vit_t) image "
            f"encoders; this model's encoder is {type(enc).__name__}"
        )
    roots.append((enc.neck, f"{prefix}neck."))
    return EncoderChain(blocks), roots


def chain_block_map():
    """The pipeline adapter of an :class:`EncoderChain` (one image tensor in, blocks at
    ``blocks``; the places are found by the method, not declared here)."""
    from slimkit.llm.block_maps import BlockMap, check_batch, feed_inputs

    return BlockMap(family="sam-encoder", model_types=(), blocks="blocks", pre_blocks=(),
                    post_blocks=(), sequential=(), feed=feed_inputs, check_calib=check_batch)  # fmt: skip
