"""Distillation losses, registered by name and combined with weights (``ce=1,kd=1``).

All losses run in fp32 on log-softmax (never log(softmax)), so fp16-range logits stay finite.
Every loss takes a :class:`Batch` (student and teacher outputs of one step) and returns a scalar.

- ``ce``: cross-entropy with label smoothing.
- ``kd``: tau^2 KL(p_t || p_s) at temperature tau (Hinton).
- ``dkd``: decoupled KD, alpha TCKD + beta NCKD, both x tau^2 (Zhao et al. 2022).
- ``dist``: beta (1 - Pearson over classes) + gamma (1 - Pearson over the batch), x tau^2 (Huang et al. 2022).
- ``fitnet``: MSE between connector(student stage k) and teacher stage k, both patchified to a
  common token grid (works across CNN / ViT pairs).
- ``ofa``: OFA loss on the final logits plus ``ofa_branch_weight`` x OFA on every stage branch
  (Hao et al. 2023; the official code's weight form, see :func:`ofa_loss`).
- ``text-align``: GPT4Image's symmetric contrastive loss between the projected pooled feature
  and the image's text embedding over the global batch (Huang et al. 2023;
  :mod:`slimkit.distill.text_align`); added by ``--text-align FILE --align-weight W``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

LOSSES = Registry("distillation loss")


@dataclass
class Batch:
    labels: torch.Tensor  # (B,) int, or (B, K) soft labels (mixup / cutmix)
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    branch_logits: list[torch.Tensor] = field(default_factory=list)
    hint_pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    align_image: torch.Tensor | None = None  # (B_local, D) projected pooled features
    align_text: torch.Tensor | None = None  # (B_global, D) unit text embeddings, global order
    align_keys: torch.Tensor | None = None  # (B_global,) sample keys of the global batch

    def hard_labels(self) -> torch.Tensor:
        return self.labels if self.labels.dim() == 1 else self.labels.argmax(1)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1)
    if labels.dim() == 2:  # soft labels
        return -(labels.float() * logp).sum(1).mean()
    return F.nll_loss(logp, labels) * (1 - smoothing) - logp.mean(1).mean() * smoothing


def kd_loss(s: torch.Tensor, t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """tau^2 KL(softmax(t/tau) || softmax(s/tau)), mean over the batch."""
    ls = F.log_softmax(s.float() / tau, 1)
    lt = F.log_softmax(t.float() / tau, 1)
    return (lt.exp() * (lt - ls)).sum(1).mean() * tau**2


def dkd_loss(s, t, y, alpha: float = 1.0, beta: float = 2.0, tau: float = 1.0) -> torch.Tensor:
    """Decoupled KD: TCKD on (target, rest) binary distributions, NCKD on non-target classes."""
    s, t = s.float() / tau, t.float() / tau
    mask = F.one_hot(y, s.shape[1]).bool()
    ls, lt = F.log_softmax(s, 1), F.log_softmax(t, 1)

    # binary (target, non-target) log-probabilities, stable via logsumexp
    def binary(lp):
        tgt = lp.masked_fill(~mask, float("-inf")).logsumexp(1)
        rest = lp.masked_fill(mask, float("-inf")).logsumexp(1)
        return torch.stack([tgt, rest], 1)

    bs, bt = binary(ls), binary(lt)
    tckd = (bt.exp() * (bt - bs)).sum(1).mean()
    ns = F.log_softmax(s.masked_fill(mask, float("-inf")), 1)
    nt = F.log_softmax(t.masked_fill(mask, float("-inf")), 1)
    pt = nt.exp()
    nckd = (pt * (nt - ns)).masked_fill(mask, 0.0).sum(1).mean()
    return (alpha * tckd + beta * nckd) * tau**2


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)


def dist_loss(s, t, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    ps, pt = F.softmax(s.float() / tau, 1), F.softmax(t.float() / tau, 1)
    inter = (1 - _pearson(ps, pt, 1)).mean()
    intra = (1 - _pearson(ps, pt, 0)).mean()
    return (beta * inter + gamma * intra) * tau**2


def ofa_weights(t: torch.Tensor, y: torch.Tensor, gamma: float, tau: float = 1.0) -> torch.Tensor:
    """w_c = (p_t,c + 1[c=y])^gamma - 1[c=y] (the official code's target enhancement)."""
    pt = F.softmax(t.float() / tau, 1)
    onehot = F.one_hot(y, pt.shape[1]).float()
    return (pt + onehot).pow(gamma) - onehot


def ofa_loss(s, t, y, gamma: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """mean_b  - sum_c w_c log softmax(s / tau)_c.

    At gamma = 1 the weights are p_t, so this is CE(p_t, p_s) = KD at tau 1 plus the constant
    H(p_t) (the official code's form; the spec's "CE + KD" holds for the objective ce + ofa)."""
    w = ofa_weights(t, y, gamma, tau)
    return -(w * F.log_softmax(s.float() / tau, 1)).sum(1).mean()


@dataclass
class LossSettings:
    """Hyper-parameters of every registered loss (one config, fields prefixed by loss name)."""

    label_smoothing: float = 0.1
    kd_tau: float = 1.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 2.0
    dkd_tau: float = 1.0
    dist_beta: float = 1.0
    dist_gamma: float = 1.0
    dist_tau: float = 1.0
    ofa_gamma: float = 1.0
    ofa_branch_weight: float = 1.0
    align_tau: float = 0.2
    align_mask_same: bool = True
    align_loss: str = "clip"


def _need_teacher(b: Batch, name: str) -> torch.Tensor:
    if b.teacher_logits is None:
        raise SlimkitError(f"loss {name!r} needs a teacher (--teacher / --teacher-arch)")
    return b.teacher_logits


LOSSES.register("ce", lambda b, s: cross_entropy(b.student_logits, b.labels, s.label_smoothing),
                help="cross-entropy with label smoothing", teacher=False)  # fmt: skip
LOSSES.register("kd", lambda b, s: kd_loss(b.student_logits, _need_teacher(b, "kd"), s.kd_tau),
                help="Hinton KD: tau^2 KL at temperature tau", teacher=True)  # fmt: skip
LOSSES.register("dkd", lambda b, s: dkd_loss(b.student_logits, _need_teacher(b, "dkd"), b.hard_labels(),
                s.dkd_alpha, s.dkd_beta, s.dkd_tau), help="decoupled KD (TCKD + NCKD)", teacher=True)  # fmt: skip
LOSSES.register("dist", lambda b, s: dist_loss(b.student_logits, _need_teacher(b, "dist"), s.dist_beta,
                s.dist_gamma, s.dist_tau), help="DIST: inter- and intra-class Pearson", teacher=True)  # fmt: skip


@LOSSES.register(
    "fitnet",
    help="FitNet hints: MSE of connector(student stage) vs teacher stage, patchified",
    teacher=True,
    hints=True,
)
def _fitnet(b: Batch, s: LossSettings) -> torch.Tensor:
    if not b.hint_pairs:
        raise SlimkitError("fitnet needs stage features (the distiller provides them)")
    return sum(F.mse_loss(a.float(), t.float()) for a, t in b.hint_pairs) / len(b.hint_pairs)


@LOSSES.register(
    "ofa",
    help="OFA: target-enhanced loss on final logits and on every stage branch",
    teacher=True,
    branches=True,
)
def _ofa(b: Batch, s: LossSettings) -> torch.Tensor:
    t, y = _need_teacher(b, "ofa"), b.hard_labels()
    loss = ofa_loss(b.student_logits, t, y, s.ofa_gamma)
    for z in b.branch_logits:
        loss = loss + s.ofa_branch_weight * ofa_loss(z, t, y, s.ofa_gamma)
    return loss


@LOSSES.register(
    "text-align",
    help="GPT4Image: projected feature vs its text embedding (--align-loss clip|ctr|byol)",
    teacher=False,
    text=True,
)
def _text_align(b: Batch, s: LossSettings) -> torch.Tensor:
    from slimkit.distill.text_align import align_loss

    if b.align_image is None:
        raise SlimkitError("loss 'text-align' needs text embeddings (--text-align FILE)")
    if b.align_text is None:  # a mixed batch with --align-mix skip
        return b.student_logits.new_zeros(())
    return align_loss(s.align_loss, b.align_image, b.align_text, s.align_tau, b.align_keys,
                      s.align_mask_same)  # fmt: skip


PRESETS = {
    "kd": "ce,kd",
    "dkd": "ce,dkd",
    "dist": "ce,dist",
    "fitnet": "ce,fitnet",
    "ofa": "ce,ofa",
}


def parse_losses(spec: str) -> dict[str, float]:
    """``ofa`` -> {ce: 1, ofa: 1}; ``ce=1,kd=0.5`` -> {ce: 1, kd: 0.5}."""
    spec = PRESETS.get(spec.strip(), spec)
    out: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition("=")
        LOSSES.get(name)
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise SlimkitError(f"loss weight {w!r} of {name!r} is not a number") from None
    if not out:
        raise SlimkitError("no loss given; e.g. --loss ofa or --loss ce=1,kd=1")
    return out


def total_loss(
    weights: dict[str, float], batch: Batch, settings: LossSettings
) -> tuple[torch.Tensor, dict]:
    parts = {n: LOSSES.get(n)(batch, settings) for n in weights}
    total = sum(weights[n] * v for n, v in parts.items())
    return total, {n: float(v.detach()) for n, v in parts.items()}
