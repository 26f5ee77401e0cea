"""Pure mask utilities: which weights to prune given a score (lowest scores are pruned).

Every function returns a bool tensor of the weight's shape, True = pruned, and meets the
requested count exactly (ties broken by position, never by a threshold that could overshoot).
"""

from __future__ import annotations

import torch

from slimkit.core.errors import SlimkitError

COMPARISON_GROUPS = ("layer", "row")


def unstructured_mask(score: torch.Tensor, ratio: float, group: str = "row") -> torch.Tensor:
    """Prune the fraction ``ratio`` of lowest scores per output row (``row``) or over the whole
    layer (``layer``). Per row: exactly floor(ratio * in) per row; per layer: floor(ratio * numel)."""
    if group not in COMPARISON_GROUPS:
        raise SlimkitError(
            f"unknown comparison group {group!r}; choose one of: {', '.join(COMPARISON_GROUPS)}"
        )
    mask = torch.zeros_like(score, dtype=torch.bool)
    if group == "row":
        k = int(score.shape[1] * ratio)
        if k:
            idx = torch.topk(score, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, True)
        return mask
    k = int(score.numel() * ratio)
    if k:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        mask.view(-1)[idx] = True
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row and every group of ``m`` consecutive input columns, prune the ``m - n``
    lowest scores (keep ``n``)."""
    rows, cols = score.shape
    if cols % m:
        raise SlimkitError(f"N:M sparsity needs M={m} to divide the input width {cols}")
    s = score.reshape(rows, cols // m, m)
    idx = torch.topk(s, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)
