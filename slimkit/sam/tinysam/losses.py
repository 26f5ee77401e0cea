"""The loss terms of TinySAM's full-stage distillation (spec section 2.3), each a plain function
of tensors so that it can be checked against a hand computation.

- ``embedding_loss``: l1 (TinySAM) or MSE (MobileSAM) between student and teacher image embeddings.
- ``token_loss``: l1 between the output tokens (IoU token + mask tokens) after the two-way
  transformer.
- ``output_loss``: l1 between the low-resolution mask logits, one value per prompt (so hard mask
  weighting can weight it per mask).
- ``focal_dice``: ground-truth focal + dice per predicted mask (SAM's 20 : 1 by default).
- ``iou_l1``: l1 between the predicted IoU and the actual IoU of each binarised mask.
- ``hard_mask_weights``: H_i = sigmoid(IoU(M_T, GT) / (IoU(M_S, GT) + eps) - 1), no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean over every element of (B, C, h, w); ``kind`` l1 or mse."""
    if kind == "l1":
        return (student - teacher).abs().mean()
    if kind == "mse":
        return (student - teacher).pow(2).mean()
    raise SlimkitError(f"unknown embedding loss {kind!r}; choose l1 or mse")


def token_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per prompt: mean |difference| over the (tokens, dim) output tokens -> (K,)."""
    return (student - teacher).abs().flatten(1).mean(1)


def output_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per prompt: mean |difference| over the (3, h, w) mask logits -> (K,)."""
    return (student - teacher).abs().flatten(1).mean(1)


def focal_dice(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """logits (K, M, h, w), target (K, h, w) in {0, 1} -> (focal (K, M), dice (K, M)): the mean
    sigmoid focal loss over pixels and the soft dice loss (smoothing 1) of every mask."""
    t = target[:, None].expand_as(logits)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    pt = p * t + (1 - p) * (1 - t)
    focal = ((alpha * t + (1 - alpha) * (1 - t)) * (1 - pt) ** gamma * ce).flatten(2).mean(-1)
    inter = (p * t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    return focal, dice


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each binarised mask (logit > 0): logits (K, M, h, w), target (K, h, w) -> (K, M)."""
    hard = logits > 0
    t = (target > 0.5)[:, None]
    inter = (hard & t).flatten(2).sum(-1).float()
    union = (hard | t).flatten(2).sum(-1).float()
    return inter / union.clamp(min=1)


def iou_l1(iou_pred: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K, M): |predicted IoU - actual IoU| (TinySAM uses l1 where SAM uses MSE)."""
    return (iou_pred - mask_iou(logits, target).detach()).abs()


@torch.no_grad()
def hard_mask_weights(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:  # fmt: skip
    """TinySAM's (AAAI) hard mask weight per prompt, (K,): the IoU of each model is that of its
    best of the M masks against the ground truth; 0.5 when both are equally good, towards 1 when
    the student trails the teacher, never below sigmoid(-1)."""
    it = mask_iou(teacher_logits, target).max(1).values
    is_ = mask_iou(student_logits, target).max(1).values
    return torch.sigmoid(it / (is_ + eps) - 1)
