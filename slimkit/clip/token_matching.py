"""Token level: relaxed bipartite matching between image patch tokens and word tokens, and its
contrastive loss (LightCLIP §2.2; slimkit's design [our default]).

For image i and caption j, A_ij(l, m) = w_{j,l} . u_{i,m} (normalised word and patch tokens).

- ``relaxed`` (default): each word takes its best patch, patches may be reused:
  T_ij = mean over the caption's words of max_m A_ij(l, m). One einsum and a max.
- ``hungarian``: the strict one-to-one matching (each word a distinct patch) per pair, solved by
  SciPy's ``linear_sum_assignment``; T_ij is the mean matched similarity over min(L_j, M) words.
  A small-scale reference (N^2 assignment problems on the CPU), not for training at scale.

``symmetric=True`` also averages the patch -> word direction (each patch its best word).
The loss is the symmetric InfoNCE over the (N, N) matrix scale * T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError

MATCHES = ("relaxed", "hungarian")


def token_affinity(words: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """A (N_img, N_txt, L, M) = w_{j,l} . u_{i,m} for every image i and caption j."""
    return torch.einsum("jld,imd->ijlm", words, patches)


def token_similarity(words: torch.Tensor, word_mask: torch.Tensor, patches: torch.Tensor,
                     match: str = "relaxed", symmetric: bool = False) -> torch.Tensor:  # fmt: skip
    """T (N_img, N_txt): the matched token similarity of every (image, caption) pair.

    Args:
        words: (N_txt, L, d) normalised word tokens.
        word_mask: (N_txt, L) bool, True on the words to match (no padding / specials).
        patches: (N_img, M, d) normalised patch tokens.
    """
    if match not in MATCHES:
        raise SlimkitError(f"token match must be one of {MATCHES} (got {match!r})")
    a = token_affinity(words, patches)  # (I, J, L, M)
    m = word_mask.to(a.dtype)  # (J, L)
    n_words = m.sum(1).clamp(min=1)  # (J,)
    if match == "hungarian":
        return _hungarian(a, word_mask)
    best = a.max(3).values  # (I, J, L): each word's best patch
    t = (best * m[None]).sum(2) / n_words[None]
    if symmetric:  # each patch's best (real) word
        back = a.masked_fill(~word_mask[None, :, :, None], float("-inf")).max(2).values
        t = 0.5 * (t + back.mean(2))
    return t


def _hungarian(a: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    ni, nj = a.shape[:2]
    out = torch.zeros(ni, nj, dtype=a.dtype, device=a.device)
    cost = a.detach().float().cpu().numpy()
    for j in range(nj):
        rows = torch.nonzero(word_mask[j]).flatten().cpu()
        if len(rows) == 0:
            continue
        for i in range(ni):
            r, c = linear_sum_assignment(cost[i, j][rows.numpy()], maximize=True)
            idx_l = rows[torch.as_tensor(r)].to(a.device)
            out[i, j] = a[i, j, idx_l, torch.as_tensor(c, device=a.device)].mean()
    return out


def token_contrastive_loss(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over scale * T (pairs on the diagonal)."""
    logits = (scale * t).float()
    labels = torch.arange(len(t), device=t.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
