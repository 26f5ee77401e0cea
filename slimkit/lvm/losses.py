"""Labels and losses of the autoregressive vision model.

Two bugs of the reference code are avoided here on purpose (spec section 5):

1. DeLVM's packed collator sets the label to -100 wherever the *token* is <= 0, so VQ code 0 is
   never supervised. Here a position is ignored only for what it *is* (padding, or a
   non-target image when only targets are supervised), never for its token's value.
2. DeLVM's KD term is a KL averaged over every position, ignored ones included. Here the KL is
   masked with exactly the cross-entropy's mask and averaged over the supervised positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
SUPERVISE = ("all", "targets")


def sentence_labels(ids: torch.Tensor, valid: torch.Tensor, tokens_per_image: int,
                    supervise: str = "all") -> torch.Tensor:  # fmt: skip
    """Next-token labels of sentences ``ids`` [B, L] ([BOS] in out in out ...): int64 [B, L - 1],
    label i = ids[:, i + 1], IGNORE where token i + 1 is padding (``valid`` False) or, with
    ``supervise="targets"``, where it belongs to an input image. Token values (0 included) never
    decide anything."""
    labels = ids[:, 1:].clone()
    keep = valid[:, 1:].clone()
    if supervise == "targets":
        pos = torch.arange(1, ids.shape[1], device=ids.device)  # position of the predicted token
        image = (pos - 1) // tokens_per_image  # 0 = first input, 1 = its target, ...
        keep &= (image % 2 == 1)[None]
    labels[~keep] = IGNORE
    return labels


def masked_kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 1.0, direction: str = "forward") -> torch.Tensor:  # fmt: skip
    """tau^2 x mean over supervised positions of KL(p_T || p_S) (forward, DeLVM's) or
    KL(p_S || p_T) (reverse), p = softmax(logits / tau). Positions whose label is IGNORE
    contribute exactly nothing. ``student``, ``teacher``: [B, L, V] logits; ``labels`` [B, L]."""
    mask = labels != IGNORE
    s = F.log_softmax(student[mask].float() / temperature, -1)
    t = F.log_softmax(teacher[mask].float() / temperature, -1)
    if direction == "reverse":
        s, t = t, s
    kl = (t.exp() * (t - s)).sum(-1)  # KL(exp(t) || exp(s)) per position
    return kl.sum() / mask.sum().clamp_min(1) * temperature**2
