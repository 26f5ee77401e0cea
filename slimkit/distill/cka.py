"""Linear CKA between the stages of two models (Kornblith et al. 2019; OFA-KD Fig. 1).

CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred features (n x p, n x q).
Over many images the minibatch estimator is used: unbiased HSIC (Song et al. 2012) accumulated
over fixed batches, CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) sum HSIC(L, L)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.vision.models import StageTaps


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with the same number of rows (samples)."""
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(0)
    y = y - y.mean(0)
    num = (y.T @ x).norm() ** 2
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den)


def _hsic_unbiased(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    g = g.clone().fill_diagonal_(0)
    kl = k @ g
    return (kl.trace() + k.sum() * g.sum() / ((n - 1) * (n - 2)) - 2 * kl.sum() / (n - 2)) / (
        n * (n - 3)
    )


@torch.no_grad()
def cka_matrix(
    teacher: nn.Module, student: nn.Module, images: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """(teacher stages x student stages) minibatch linear CKA on ``images``."""
    ta, sa = StageTaps(teacher.eval()), StageTaps(student.eval())
    sums = None
    for i in range(0, images.shape[0] - 3, batch_size):
        x = images[i : i + batch_size]
        if x.shape[0] < 4:
            break
        _, tf = ta(x)
        _, sf = sa(x)
        gt = [(f.tokens().flatten(1).double() @ f.tokens().flatten(1).double().T) for f in tf]
        gs = [(f.tokens().flatten(1).double() @ f.tokens().flatten(1).double().T) for f in sf]
        cur = torch.zeros(len(gt), len(gs), 3, dtype=torch.float64)
        for a, k in enumerate(gt):
            for b, gram in enumerate(gs):
                cur[a, b, 0] = _hsic_unbiased(k, gram)
                cur[a, b, 1] = _hsic_unbiased(k, k)
                cur[a, b, 2] = _hsic_unbiased(gram, gram)
        sums = cur if sums is None else sums + cur
    return (sums[..., 0] / (sums[..., 1] * sums[..., 2]).sqrt()).float()


@dataclass
class CKAConfig:
    """Options of ``slimkit cka`` (:func:`cka_between_runs`)."""

    teacher_arch: str = field(
        default="", metadata={"help": "timm arch when --teacher is a weights file"}
    )
    student_arch: str = field(
        default="", metadata={"help": "timm arch when --student is a weights file"}
    )
    data: str = field(default="digits", metadata={"help": "image set whose test split is read"})
    img_size: int = field(default=32, metadata={"help": "input resolution"})
    max_images: int = field(default=512, metadata={"help": "test images used"})

    def __post_init__(self) -> None:
        from slimkit.core.errors import SlimkitError

        if self.img_size < 1 or self.max_images < 2:
            raise SlimkitError(
                f"img_size must be >= 1 and max_images >= 2 (got {self.img_size}, {self.max_images})"
            )


def cka_between_runs(
    teacher: str, student: str, cfg: CKAConfig | None = None
) -> tuple[torch.Tensor, int]:
    """Linear CKA between every stage of two trained classifiers (run directories, or weights
    files with ``*_arch``) on the test images of ``cfg.data``; returns the matrix and the image
    count."""
    from slimkit.distill.train import load_model_from_run
    from slimkit.vision.data import load_images

    cfg = cfg or CKAConfig()
    data = load_images(cfg.data, cfg.img_size)
    t = load_model_from_run(teacher, cfg.teacher_arch, data)
    s = load_model_from_run(student, cfg.student_arch, data, "--student-arch")
    x = data.test.tensors[0][: cfg.max_images]
    return cka_matrix(t, s, x), len(x)


def plot_cka(m: torch.Tensor, path: str, title: str, teacher: str, student: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                    color="white" if m[i, j] < 0.6 else "black", fontsize=8)  # fmt: skip
    ax.set_xticks(range(m.shape[1]), [f"S{j + 1}" for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), [f"T{i + 1}" for i in range(m.shape[0])])
    ax.set_xlabel(f"student stage ({student})")
    ax.set_ylabel(f"teacher stage ({teacher})")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
