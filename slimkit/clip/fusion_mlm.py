"""Text side: masked language modelling on the text tower, helped by an auxiliary fusion module
that injects the unmasked image into the masked caption at several depths (LightCLIP §2.3;
slimkit's design [our default]).

Training only: :class:`FusionMLM` holds the fusion blocks, the image -> text-width projection,
the MLM head and the token-level temperature. None of it is part of
:class:`slimkit.clip.model.DualEncoder`, so the saved model and its inference cost are those of
a plain CLIP with the same towers.

Leakage: the fusion blocks see the image tokens and the masked caption's hidden state only; the
unmasked caption never enters the MLM branch (its ids are only the labels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.clip.tokenizer import MASK, SPECIALS, word_mask


def fusion_layers(depth: int, every: int = 0) -> list[int]:
    """Block indices after which fusion is inserted: every ``every``-th block (0 = every
    ceil(depth / 3)-th, i.e. three injection points), 0-based: depth 12 -> [3, 7, 11]."""
    every = every or math.ceil(depth / 3)
    return [k - 1 for k in range(every, depth + 1, every)]


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, prob: float = 0.15,
                vocab_size: int | None = None, specials: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """BERT masking of word tokens: each is chosen with ``prob``; a chosen token becomes [MASK]
    (80 %), a random word (10 %) or stays (10 %). At least one token per caption with words is
    chosen. Returns (masked ids, labels with -100 where nothing is predicted).
    ``specials``: the tokenizer's ``specials()`` (default: the word tokenizer's ids)."""
    sp = specials or {"mask_id": MASK, "first_word_id": len(SPECIALS)}
    cand = word_mask(ids, **(specials or {}))
    u = torch.rand(ids.shape, generator=generator)
    chosen = cand & (u < prob)
    # force one position per caption that has words but got none
    none = cand.any(1) & ~chosen.any(1)
    if none.any():
        score = torch.where(cand, u, torch.full_like(u, 2.0))
        pick = score.argmin(1)
        chosen[none, pick[none]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    how = torch.rand(ids.shape, generator=generator)
    out = ids.clone()
    out[chosen & (how < 0.8)] = sp["mask_id"]
    if vocab_size is not None and vocab_size > sp["first_word_id"]:
        rand = torch.randint(sp["first_word_id"], vocab_size, ids.shape, generator=generator)
        swap = chosen & (how >= 0.8) & (how < 0.9)
        out[swap] = rand[swap]
    return out, labels


class FusionBlock(nn.Module):
    """h <- h + CrossAttn(LN(h), LN(V)); h <- h + MLP(LN(h)). V: image tokens at text width."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_mlp = (
            nn.LayerNorm(width),
            nn.LayerNorm(width),
            nn.LayerNorm(width),
        )
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(v)
        h = h + self.attn(self.ln_q(h), kv, kv, need_weights=False)[0]
        return h + self.mlp(self.ln_mlp(h))


class FusionMLM(nn.Module):
    """The training-only module of LightCLIP.

    Args:
        image_width: channels of the image tower's patch tokens.
        text_width, text_depth, text_heads: the text tower's shape.
        vocab_size: MLM output size.
        tie: MLM output layer tied to the text tower's token embedding (no vocab x width matrix).
        fusion_every: fusion after every k-th text block (0 = three injection points).
        token_temperature: initial temperature of the token-level contrastive loss.
    """

    def __init__(self, image_width: int, text_width: int, text_depth: int, text_heads: int,
                 vocab_size: int, *, fusion_every: int = 0, mlm: bool = True,
                 tie: bool = False, token_temperature: float = 0.07):  # fmt: skip
        super().__init__()
        self.layers = fusion_layers(text_depth, fusion_every) if mlm else []
        self.image_to_text = nn.Linear(image_width, text_width) if mlm else None
        self.fusion = nn.ModuleList(FusionBlock(text_width, text_heads) for _ in self.layers)
        self.tie = tie
        out = [] if tie else [nn.Linear(text_width, vocab_size)]
        self.mlm_head = (
            nn.Sequential(
                nn.Linear(text_width, text_width), nn.GELU(), nn.LayerNorm(text_width), *out
            )
            if mlm
            else None
        )
        # tied: logits = head(h) @ E^T + b with E the text tower's token embedding (BERT's way)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size)) if mlm and tie else None
        self.token_logit_scale = nn.Parameter(torch.tensor(math.log(1 / token_temperature)))

    def token_scale(self) -> torch.Tensor:
        return self.token_logit_scale.exp().clamp(max=100.0)

    def fuser(self, image_tokens: torch.Tensor):
        """``fuse(k, h)`` for :meth:`TextTower.forward`: fusion after the chosen blocks."""
        v = self.image_to_text(image_tokens)
        where = {k: i for i, k in enumerate(self.layers)}

        def fuse(k: int, h: torch.Tensor) -> torch.Tensor:
            return self.fusion[where[k]](h, v) if k in where else h

        return fuse

    def mlm_loss_sum(self, text_tower, masked_ids: torch.Tensor, labels: torch.Tensor,
                     image_tokens: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Sum of the cross-entropies at the masked positions (the caller divides by the global
        count of masked tokens, so several ranks add up to one process)."""
        h = text_tower(masked_ids, fuse=self.fuser(image_tokens))
        sel = labels != -100
        logits = self.mlm_head(h[sel])
        if self.tie:
            logits = F.linear(logits, text_tower.input_embeddings().weight, self.mlm_bias)
        return F.cross_entropy(logits.float(), labels[sel], reduction="sum")
