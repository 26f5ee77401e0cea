"""GPT4Image's alignment of a classifier's pooled feature with its image's text embedding.

- :class:`AlignHead`: the training-only projection g (the official code's heads).
  CNN ``mlp``: Linear(d -> 2D, no bias) -> BatchNorm1d -> ReLU -> Linear(2D -> D), weights
  truncated normal with std 1024^-0.5; ViT ``mlp``: the same without BatchNorm, biases on,
  std 0.02; ``linear``: Linear(d -> D, no bias), std 1024^-0.5.
- :func:`gather_local_grad`: the global batch of image embeddings on every rank, with gradient
  only through this rank's rows (the official ``concat_all_gather(rank=...)``); one process
  without a process group just returns its own rows.
- :func:`clip_align_loss`: the symmetric contrastive loss over the global batch,
  l_ij = f_i . e_j / tau, L = (CE(l, arange) + CE(l^T, arange)) / 2, with duplicate text
  targets (two samples with the same id or an identical embedding, e.g. class-name-only text)
  masked out of each other's negatives [slimkit's ``mask_same_key``].
- :func:`ctr_align_loss` and :func:`byol_align_loss`: the official code's other two modes on
  the local batch: one-directional image -> text InfoNCE, and mean(2 - 2 f_i . e_i).
- :func:`align_loss`: one of the three by name (``--align-loss clip|ctr|byol``).

Gradient scale under ``torchrun``: every rank computes the same global loss but back-propagates
only through its own rows, and the shared trainer averages gradients over ranks; the loss
therefore scales its gradient (not its value) by the world size, so N ranks give the gradients
of one process on the same global batch (the official code's DDP average gives 1/N of them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError

HEADS = ("mlp", "linear")
MODES = ("clip", "ctr", "byol")
TAU = {"cnn": 0.2, "tokens": 0.05}  # official ResNet and DeiT scripts


class AlignHead(nn.Module):
    """g: pooled feature (B, d) -> (B, D) projection, before L2 normalisation.

    Args:
        in_dim: the backbone's pooled width d.
        out_dim: the text embedding width D.
        kind: ``mlp`` or ``linear``.
        batch_norm: BatchNorm in the MLP (the CNN head; off for ViTs).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", batch_norm: bool = True):
        super().__init__()
        if kind not in HEADS:
            raise SlimkitError(f"--align-head must be one of {', '.join(HEADS)} (got {kind!r})")
        self.kind, self.batch_norm = kind, batch_norm
        if kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim, bias=False)
            nn.init.trunc_normal_(self.proj.weight, std=1024**-0.5)
            return
        hidden = 2 * out_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, out_dim)]
        self.proj = nn.Sequential(*layers)
        std = 1024**-0.5 if batch_norm else 0.02
        for m in (self.proj[0], self.proj[-1]):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B_local, D) of every rank in rank order; only this rank's rows keep
    their gradient. Without a process group: ``x`` itself."""
    if not dist.is_dist():
        return x
    import torch.distributed as td

    parts = [torch.empty_like(x) for _ in range(dist.world_size())]
    td.all_gather(parts, x.detach().contiguous())
    parts[dist.rank()] = x
    return torch.cat(parts)


def duplicate_mask(text: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B) bool: True where j != i and j's text target duplicates i's (same sample key, or
    an identical embedding), i.e. a negative that is really a positive."""
    same = (text @ text.T) > 1 - 1e-6
    if keys is not None:
        same = same | (keys[:, None] == keys[None, :])
    return same & ~torch.eye(len(text), dtype=torch.bool, device=text.device)


def clip_align_loss(image: torch.Tensor, text: torch.Tensor, tau: float,
                    keys: torch.Tensor | None = None, mask_same: bool = True) -> torch.Tensor:  # fmt: skip
    """Symmetric contrastive loss of image embeddings against their text embeddings.

    Args:
        image: (B_local, D) this rank's projected image features (normalised here).
        text: (B, D) unit text embeddings of the GLOBAL batch, in global order (rank r's rows at
            r * B_local .. (r + 1) * B_local); every rank holds them all.
        tau: temperature.
        keys: (B,) sample keys of the global batch (duplicates are masked), or None.
        mask_same: mask duplicate text targets out of the negatives.

    Returns the loss over the global batch (the same value on every rank); its gradient is
    scaled by the world size (see the module docstring).

    Example:
        >>> f, e = torch.randn(4, 8), F.normalize(torch.randn(4, 8), dim=1)
        >>> float(clip_align_loss(f, e, 0.2)) > 0
        True
    """
    f = gather_local_grad(F.normalize(image.float(), dim=1))
    if f.shape[0] != text.shape[0]:
        raise SlimkitError(f"{f.shape[0]} image embeddings but {text.shape[0]} text embeddings")
    if f.shape[1] != text.shape[1]:
        raise SlimkitError(
            f"the alignment head gives {f.shape[1]}-d embeddings, the text ones are {text.shape[1]}-d"
        )
    logits = f @ text.float().T / tau
    if mask_same:
        logits = logits.masked_fill(duplicate_mask(text.float(), keys), float("-inf"))
    target = torch.arange(len(f), device=f.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    world = dist.world_size()
    return loss * world - loss.detach() * (world - 1) if world > 1 else loss


def _local_rows(text: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's rows of the global batch's text targets (rank r holds rows r*n .. (r+1)*n)."""
    if len(text) == n:
        return text
    r = dist.rank()
    if len(text) != n * dist.world_size():
        raise SlimkitError(f"{n} image embeddings per rank but {len(text)} text embeddings")
    return text[r * n : (r + 1) * n]


def _check_width(f: torch.Tensor, text: torch.Tensor) -> None:
    if f.shape[1] != text.shape[1]:
        raise SlimkitError(
            f"the alignment head gives {f.shape[1]}-d embeddings, the text ones are {text.shape[1]}-d"
        )


def ctr_align_loss(image: torch.Tensor, text: torch.Tensor, tau: float,
                   keys: torch.Tensor | None = None, mask_same: bool = True) -> torch.Tensor:  # fmt: skip
    """The official ``ctr`` mode: one-directional image -> text InfoNCE on this rank's batch,
    l_ij = f_i . e_j / tau, L = CE(l, arange); duplicate targets masked as in
    :func:`clip_align_loss`. Arguments as there (``text`` / ``keys`` of the global batch; only
    this rank's rows are used, and the trainer's gradient average makes it the official DDP
    loss)."""
    f = F.normalize(image.float(), dim=1)
    e = _local_rows(text.float(), len(f))
    _check_width(f, e)
    logits = f @ e.T / tau
    if mask_same:
        k = None if keys is None else _local_rows(keys, len(f))
        logits = logits.masked_fill(duplicate_mask(e, k), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(f), device=f.device))


def byol_align_loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The official ``byol`` mode: mean over this rank's batch of 2 - 2 f_i . e_i (the squared
    distance of the unit vectors); no negatives, no temperature."""
    f = F.normalize(image.float(), dim=1)
    e = _local_rows(text.float(), len(f))
    _check_width(f, e)
    return (2 - 2 * (f * e).sum(1)).mean()


def align_loss(mode: str, image: torch.Tensor, text: torch.Tensor, tau: float,
               keys: torch.Tensor | None = None, mask_same: bool = True) -> torch.Tensor:  # fmt: skip
    """The alignment loss named ``mode`` (``clip``, ``ctr`` or ``byol``)."""
    if mode == "clip":
        return clip_align_loss(image, text, tau, keys, mask_same)
    if mode == "ctr":
        return ctr_align_loss(image, text, tau, keys, mask_same)
    if mode == "byol":
        return byol_align_loss(image, text)
    raise SlimkitError(f"--align-loss must be one of {', '.join(MODES)} (got {mode!r})")


def mix_text(text: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Text targets of a mixup / cutmix batch (image i mixed with image B-1-i at weight lam, as
    timm does): the same mix of the two texts, renormalised. ``lam`` is one float (timm's batch
    mode) or a (B, 1) tensor of per-image weights (its pair and elem modes)."""
    if torch.is_tensor(lam):
        lam = lam.to(text.dtype).reshape(-1, 1)
    return F.normalize(lam * text + (1 - lam) * text.flip(0), dim=1)
