"""Feature-collapse diagnostics (PanGu-π section 2.5) per layer of a causal LM.

For the hidden states Z (tokens x d) of one sequence at a layer's output:
- d_rel(Z) = ||Z - 1 z_mean^T||_F / ||Z||_F: 0 when all tokens are identical (collapsed);
- d(0.8): principal components needed to explain 80 % of the variance of the centred tokens;
- mean pairwise cosine similarity of the tokens.
Each is averaged over the evaluation windows. Layer 0 is the embedding output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def d_rel(z: torch.Tensor) -> float:
    z = z.double()
    return float((z - z.mean(0)).norm() / z.norm().clamp(min=1e-30))


def effective_dim(z: torch.Tensor, fraction: float = 0.8) -> int:
    z = z.double()
    s = torch.linalg.svdvals(z - z.mean(0)) ** 2
    if s.sum() <= 0:
        return 0
    c = torch.cumsum(s, 0) / s.sum()
    return int((c < fraction - 1e-12).sum().item()) + 1


def mean_cosine(z: torch.Tensor) -> float:
    u = torch.nn.functional.normalize(z.double(), dim=1)
    n = u.shape[0]
    sim = u @ u.T
    return float((sim.sum() - n) / (n * (n - 1)))


@torch.no_grad()
def collapse_profile(model: nn.Module, windows: torch.Tensor) -> list[dict]:
    """Per layer (0 = embeddings): mean d_rel, d(0.8) and token cosine over ``windows``."""
    model.eval()
    rows: list[dict] | None = None
    for w in windows:
        hs = model(input_ids=w[None], output_hidden_states=True, use_cache=False).hidden_states
        cur = [
            {"d_rel": d_rel(h[0]), "d80": effective_dim(h[0]), "cos": mean_cosine(h[0])} for h in hs
        ]
        rows = cur if rows is None else [{k: a[k] + b[k] for k in a} for a, b in zip(rows, cur)]
    n = windows.shape[0]
    return [{"layer": i, **{k: v / n for k, v in r.items()}} for i, r in enumerate(rows)]


@dataclass
class CollapseConfig:
    """Options of ``slimkit analyze-collapse`` (:func:`analyze_collapse`)."""

    data: str = field(
        default="wiki-offline", metadata={"help": "corpus whose validation split is read"}
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per window"})
    windows: int = field(default=8, metadata={"help": "validation windows averaged"})

    def __post_init__(self) -> None:
        from slimkit.core.errors import SlimkitError

        if self.seq_len < 2 or self.windows < 1:
            raise SlimkitError(
                f"seq_len must be >= 2 and windows >= 1 (got {self.seq_len}, {self.windows})"
            )


def analyze_collapse(models: list[str], cfg: CollapseConfig | None = None) -> dict[str, list[dict]]:
    """:func:`collapse_profile` of each model (directory, registered name or HF id) on the same
    validation windows of ``cfg.data``."""
    from slimkit.data.text import check_corpus, eval_windows
    from slimkit.llm.models import load_model

    cfg = cfg or CollapseConfig()
    check_corpus(cfg.data)
    profiles = {}
    for name in models:
        model, tok = load_model(name)
        w = eval_windows(tok, cfg.data, cfg.seq_len, max_windows=cfg.windows, split="validation")
        profiles[name] = collapse_profile(model, w)
    return profiles


def plot_profiles(profiles: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, prof in profiles.items():
        layers = [p["layer"] for p in prof]
        axes[0].plot(layers, [p["d_rel"] for p in prof], marker="o", ms=3, label=name)
        axes[1].plot(layers, [p["d80"] for p in prof], marker="o", ms=3, label=name)
    axes[0].set_title("d_rel (0 = collapsed)")
    axes[1].set_title("effective dimension d(0.8)")
    for ax in axes:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
