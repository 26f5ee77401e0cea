"""Instance level: the CLIP contrastive loss with progressively softened negative labels
(LightCLIP §2.1; the formulas are slimkit's design [our default], the paper's abstract only says
"progressively softened").

At training progress r in [0, 1] the target matrix is

    Y(r) = (1 - alpha(r)) I + alpha(r) Q,      alpha(r) = alpha_max * ramp(r),  ramp(0) = 0

with Q_ii = 0 and, off the diagonal, ``uniform``: 1 / (N - 1), or ``similarity``: a softmax
over j != i of the stop-gradient cosine similarity / kappa. The loss is the mean of the
image->text and text->image soft cross-entropies. alpha = 0 is exactly the CLIP loss.

Negatives come from the whole global batch: :func:`gather_with_grad` all-gathers features of
every rank with a backward that returns each rank the summed gradient of its own slice, so every
rank computes the same global loss and the trainer's gradient average equals one process's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimkit.core import dist
from slimkit.core.errors import SlimkitError

SOFT_MODES = ("uniform", "similarity")
RAMPS = ("linear", "cosine")


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as td

        ctx.n, ctx.rank, ctx.world = x.shape[0], dist.rank(), dist.world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = dist.all_reduce_sum(grad.contiguous().clone())  # every rank's loss uses every slice
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """This rank's (n, ...) slice -> the global (world * n, ...) batch, rank order; identity in
    one process. Gradients flow back to each rank's own slice (summed over ranks)."""
    return _GatherWithGrad.apply(x) if dist.is_dist() else x


def softening_alpha(progress: float, alpha_max: float, ramp: str = "linear") -> float:
    """alpha(r) = alpha_max * ramp(r): 0 at the start of training, alpha_max at the end."""
    if ramp not in RAMPS:
        raise SlimkitError(f"soft ramp must be one of {RAMPS} (got {ramp!r})")
    r = min(max(progress, 0.0), 1.0)
    return alpha_max * (r if ramp == "linear" else 0.5 * (1 - math.cos(math.pi * r)))


def soft_targets(
    sim: torch.Tensor, alpha: float, mode: str = "uniform", kappa: float = 0.07
) -> torch.Tensor:
    """Y = (1 - alpha) I + alpha Q for the rows of an (N, N) similarity matrix (no gradient)."""
    if mode not in SOFT_MODES:
        raise SlimkitError(f"soft mode must be one of {SOFT_MODES} (got {mode!r})")
    n = sim.shape[0]
    eye = torch.eye(n, device=sim.device, dtype=torch.float32)
    if alpha == 0 or n == 1:
        return eye
    if mode == "uniform":
        q = (1 - eye) / (n - 1)
    else:
        s = sim.detach().float() / kappa
        q = s.masked_fill(eye.bool(), float("-inf")).softmax(1)
    return (1 - alpha) * eye + alpha * q


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j Y_ij log softmax(S)_ij, in fp32."""
    return -(targets * logits.float().log_softmax(1)).sum(1).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The plain CLIP loss on normalised (N, d) features of one (global) batch."""
    logits = scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return 0.5 * (
        F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().T, labels)
    )


def softened_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, alpha: float,
                       mode: str = "uniform", kappa: float = 0.07) -> torch.Tensor:  # fmt: skip
    """L_inst = (CE_soft(S, Y_rows) + CE_soft(S^T, Y_cols)) / 2 with S = scale * image @ text^T.

    Args:
        image, text: L2-normalised (N, d) features of the same global batch, pair i = row i.
        scale: the logit scale 1 / tau.
        alpha: softening weight (0 = hard labels = :func:`clip_loss`).
        mode: ``uniform`` or ``similarity`` (Q from the stop-gradient cosines / kappa).
        kappa: temperature of the similarity-mode Q, on cosine similarities.
    """
    cos = image @ text.T
    logits = scale * cos
    y_rows = soft_targets(cos, alpha, mode, kappa)
    y_cols = soft_targets(cos.T, alpha, mode, kappa)
    return 0.5 * (soft_cross_entropy(logits, y_rows) + soft_cross_entropy(logits.T, y_cols))
