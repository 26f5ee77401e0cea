"""One registry of compression methods, dispatch on the config's type, and what a run returns.

Every LLM compression method (quantization, pruning, and any later kind) registers its
:class:`~slimkit.llm.pipeline.BlockwiseMethod` class here with the config dataclass it takes and
its kind; :func:`compress` finds the method from the config's type and calls the entry point of
its kind (``slimkit.quantize``, ``slimkit.prune``), which returns ``(model, result)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from slimkit.core.config import to_dict
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry
from slimkit.core.rundir import peak_rss_gb
from slimkit.data.text import fingerprint
from slimkit.llm.experts import reset_counts, unseen_experts
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline

log = logging.getLogger("slimkit")

COMPRESSION_METHODS = Registry("compression method")
_ENTRY_POINTS: dict[str, Callable] = {}  # kind -> function(model, config, calib, **kw)


def register_compression_method(name: str, config_cls: type, *, kind: str, help: str):
    """Class decorator: register a :class:`BlockwiseMethod` under ``name``, taking a
    ``config_cls`` (its exact type selects the method) and belonging to ``kind``
    (``quantization``, ``pruning``)."""

    def deco(cls):
        COMPRESSION_METHODS.register(name, cls, config=config_cls, kind=kind, help=help)
        cls.method_name = name
        return cls

    return deco


def register_entry_point(kind: str, fn: Callable) -> Callable:
    """The public function that runs a method of ``kind`` (e.g. ``slimkit.quantize``)."""
    _ENTRY_POINTS[kind] = fn
    return fn


def method_for_config(config, kind: str | None = None) -> str:
    """The registered name of the method that takes ``config``'s type (of ``kind`` if given)."""
    for name, _ in COMPRESSION_METHODS.items():
        meta = COMPRESSION_METHODS.meta(name)
        if type(config) is meta["config"] and kind in (None, meta["kind"]):
            return name
    what = f"{kind} method" if kind else "compression method"
    raise SlimkitError(f"no {what} takes a {type(config).__name__}")


def compress(model: nn.Module, config, calib: torch.Tensor | None = None, **kw):
    """Compress ``model`` with the method that takes ``config``'s type; returns
    ``(model, result)`` (see :class:`CompressionResult`).

    Example:
        >>> model, result = slimkit.compress(model, slimkit.WandaConfig(sparsity="2:4"), calib)  # doctest: +SKIP
    """
    kind = COMPRESSION_METHODS.meta(method_for_config(config))["kind"]
    if kind not in _ENTRY_POINTS:
        raise SlimkitError(f"no entry point runs {kind} methods (import its package first)")
    return _ENTRY_POINTS[kind](model, config, calib, **kw)


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
    reset_counts(model)
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
    # MoE experts that no calibration token was routed to: no statistics, rounded to nearest
    fallback = sorted(unseen_experts(model)) if name != "rtn" else []
    fallback = sorted(set(fallback) | {e["layer"] for e in pipe.log if e.get("rtn_fallback")})
    if fallback:
        report["rtn_fallback"] = fallback
        log.warning(
            "%d linears saw no calibration token and were rounded to nearest: %s",
            len(fallback),
            ", ".join(fallback[:4]) + (" ..." if len(fallback) > 4 else ""),
        )
    return pipe, report


class CompressionResult(dict):
    """What a compression run returns beside the model.

    The dict itself is the report (JSON-able: method, scheme, seconds, per-layer errors and
    sparsities, ...; what ``report.json`` holds). The exact results that are not JSON ride as
    attributes:

    - ``quantization``: ``{"method", "config", "records", "act_params"}`` when weights were
      quantized (``records``: linear name -> ``QuantizedWeight`` with the integer codes;
      ``act_params``: calibrated activation-quantizer numbers), else None;
    - ``sparsity``: ``{"method", "config", "overall_in_pruned_layers", "per_layer"}`` when
      weights were pruned, else None.
    """

    def __init__(
        self, report: dict, *, quantization: dict | None = None, sparsity: dict | None = None
    ):
        super().__init__(report)
        self.quantization = quantization
        self.sparsity = sparsity

    @property
    def records(self) -> dict:
        """Linear name -> QuantizedWeight (empty when nothing was quantized)."""
        return self.quantization["records"] if self.quantization else {}
