"""Perplexity with the GPTQ protocol, and a bridge to lm-evaluation-harness.

Perplexity: the evaluation text is tokenized once and cut into non-overlapping windows of L
tokens (remainder dropped); each window is scored on its own (no context carried over), the
next-token NLL is averaged over every predicted token of every window, and
ppl = exp(mean NLL). The protocol block returned with the number says exactly which text, L
and windows were used.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.logs import progress


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> dict:
    """GPTQ-protocol perplexity over ``windows`` (int64 [n_windows, L]).

    Returns ``{"ppl", "mean_nll", "n_windows", "seq_len", "n_predicted_tokens", "seconds"}``.

    Example:
        >>> perplexity(model, eval_windows(tok, "wiki-offline", 512, max_windows=40))["ppl"]  # doctest: +SKIP
    """
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise SlimkitError(
            f"evaluation windows must be [n >= 1, L >= 2]; got {tuple(windows.shape)}"
        )
    t0 = time.time()
    model.eval()
    total, count = 0.0, 0
    for i0 in progress(
        range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch", leave=False
    ):
        ids = windows[i0 : i0 + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    mean = total / count
    if not math.isfinite(mean):
        raise SlimkitError("perplexity is not finite: the model produced NaN/Inf logits")
    return {
        "ppl": math.exp(mean),
        "mean_nll": mean,
        "n_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "n_predicted_tokens": count,
        "seconds": time.time() - t0,
    }


def protocol_text(
    dataset: str, split: str, seq_len: int, n_windows: int, dtype: str, device: str
) -> str:
    return (
        f"perplexity protocol: dataset {dataset}, split {split} (document-level hash split), text joined "
        f"with blank lines and tokenized once, {n_windows} non-overlapping windows of {seq_len} tokens "
        f"(stride {seq_len}, remainder dropped), ppl = exp(mean next-token NLL over all windows), "
        f"1 run, deterministic, dtype {dtype}, device {device}"
    )


def lm_eval_tasks(
    model: nn.Module, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None
) -> dict:
    """Zero-shot tasks through lm-evaluation-harness (``pip install lm-eval``; its task data must be
    reachable). Returns lm-eval's ``results`` dict."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SlimkitError(
            "lm-eval tasks need lm-evaluation-harness: pip install 'slimkit[eval]'"
        ) from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=True)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit)
    except Exception as e:  # task data comes from the Hub
        raise SlimkitError(f"lm-eval could not run {tasks}: {type(e).__name__}: {e}") from None
    return out["results"]
