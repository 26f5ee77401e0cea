"""The public pruning entry point: ``slimkit.prune(model, config, calib)``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimkit.core.config import to_dict
from slimkit.core.errors import SlimkitError
from slimkit.llm.compress import CompressionResult, register_entry_point, run_blockwise
from slimkit.prune.base import PRUNE_METHODS, PruneConfig, pruner_for_config


def prune(
    model: nn.Module,
    config: PruneConfig,
    calib: torch.Tensor | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[nn.Module, CompressionResult]:
    """Prune ``model`` in place with the method that takes ``config``'s type.

    Args:
        model: a transformers causal LM of a supported family.
        config: ``MagnitudeConfig``, ``WandaConfig`` or ``SparseGPTConfig`` (``sparsity="0.5"``
            or ``"2:4"``).
        calib: int64 token ids [n_samples, seq_len]; magnitude pruning may pass None.

    Returns:
        ``(model, result)``; ``result`` is the report (a dict: the achieved sparsity per layer and
        overall, ...) with ``result.sparsity`` (and, for SparseGPT with quantization,
        ``result.quantization``) beside it. The weights are dense tensors with zeros: neither
        smaller nor faster without a sparse format.

    Example:
        >>> model, report = slimkit.prune(model, WandaConfig(sparsity="2:4"), calib)  # doctest: +SKIP
    """
    name = pruner_for_config(config)
    if calib is None:
        if config.needs_data():
            raise SlimkitError(f"pruning method {name!r} needs calibration data")
        calib = torch.zeros(1, 2, dtype=torch.long)  # the method reads no activations
    method = PRUNE_METHODS.get(name)(config)
    pipe, report = run_blockwise(
        model, name, method, config, calib, checkpoint_dir=checkpoint_dir, resume=resume
    )
    per_layer = {e["layer"]: e["sparsity"] for e in report["layers"]}
    if name == "structured":  # fraction of FFN channels removed, per block
        overall = sum(per_layer.values()) / max(len(per_layer), 1)
    else:
        sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in per_layer}
        overall = sum(per_layer[n] * sizes[n] for n in per_layer) / max(sum(sizes.values()), 1)
    report["sparsity"] = {"overall_in_pruned_layers": overall, "per_layer": per_layer}
    report["parameters"] = sum(p.numel() for p in model.parameters())
    sparsity = {"method": name, "config": to_dict(config), **report["sparsity"]}
    quantization = None
    if pipe.records:  # SparseGPT with joint quantization
        quantization = {
            "method": name,
            "config": {
                **to_dict(config),
                "abits": 16,
                "act_granularity": "per-token",
                "act_sym": True,
            },
            "records": pipe.records,
            "act_params": {},
        }
    return model, CompressionResult(report, quantization=quantization, sparsity=sparsity)


register_entry_point("pruning", prune)
