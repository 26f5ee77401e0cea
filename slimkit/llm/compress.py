"""Run one compression method (quantization or pruning) on the block-wise pipeline and report."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from slimkit.core.config import to_dict
from slimkit.core.rundir import peak_rss_gb
from slimkit.data.text import fingerprint
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline


def run_blockwise(
    model: nn.Module,
    name: str,
    method: BlockwiseMethod,
    config,
    calib: torch.Tensor,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[BlockwisePipeline, dict]:
    """Run ``method`` over ``model``; returns the pipeline (records, log) and the base report."""
    t0 = time.time()
    identity = {"method": name, "config": to_dict(config), "calib_fingerprint": fingerprint(calib)}
    pipe = BlockwisePipeline(
        model, calib, config.pipeline_options(), checkpoint_dir=checkpoint_dir, identity=identity
    )
    pipe.run(method, resume=resume)
    report = {
        "method": name,
        "scheme": config.scheme(),
        # a resumed run counts the windows its checkpoint kept (not the work lost in the kill)
        "seconds": time.time() - t0 + pipe.prior_seconds,
        "resumed_at_window": pipe.resumed_at,
        "peak_rss_gb": peak_rss_gb(),
        "n_calib_samples": int(calib.shape[0]),
        "calib_seq_len": int(calib.shape[1]),
        "calib_fingerprint": fingerprint(calib),
        "layers": [e for e in pipe.log if "layer" in e],
        # everything else the method logged, in order: per-window losses, folds, hardening
        "events": [e for e in pipe.log if "layer" not in e],
    }
    return pipe, report
