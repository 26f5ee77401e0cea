"""The public quantization entry point: ``slimkit.quantize(model, config, calib)``, and saving /
loading of quantized models (fake-quant weights plus their exact integer form)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.config import to_dict
from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import block_map_for, get_module
from slimkit.llm.compress import CompressionResult, register_entry_point, run_blockwise
from slimkit.quant import activations as acts
from slimkit.quant.activations import ACT_KEYS, ActSpec
from slimkit.quant.methods import METHODS, QuantConfig, method_for_config

log = logging.getLogger("slimkit")
QUANT_STATE = "quant_state.safetensors"
QUANT_JSON = "quantization.json"


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[nn.Module, CompressionResult]:
    """Quantize ``model`` in place with the method that takes ``config``'s type.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2/3, OPT, GPT-2 families).
        config: e.g. ``GPTQConfig(wbits=4, group_size=64)``, ``RTNConfig(...)``,
            ``SmoothQuantConfig(...)``.
        calib: int64 token ids [n_samples, seq_len] (see ``slimkit.data.calibration_windows``).
            RTN without activation quantization may pass None.
        checkpoint_dir: write a checkpoint after every finalized block here.
        resume: continue from the checkpoint in ``checkpoint_dir``.

    Returns:
        ``(model, result)``; the model's weights are fake-quantized (dequantized from the integer
        codes, which are in ``result.records``), activation quantizers are attached. ``result``
        is the report (a dict) with ``result.quantization`` beside it (see
        :class:`~slimkit.llm.compress.CompressionResult`); pass it to :func:`save_quantized`.

    Example:
        >>> from slimkit import GPTQConfig, quantize
        >>> model, result = quantize(model, GPTQConfig(wbits=4, group_size=64), calib)  # doctest: +SKIP
        >>> save_quantized(model, tokenizer, "out", result)  # doctest: +SKIP
    """
    name = method_for_config(config)
    method = METHODS.get(name)(config)
    needs_data = name != "rtn" or (config.abits != 16 and config.act_granularity == "per-tensor")
    if calib is None and needs_data:
        raise SlimkitError(f"method {name!r} needs calibration data")
    if not needs_data:  # RTN reads no activations: skip the calibration forward passes
        calib = torch.zeros(1, 2, dtype=torch.long)
    rotate(model, config)
    pipe, report = run_blockwise(
        model, name, method, config, calib, checkpoint_dir=checkpoint_dir, resume=resume
    )
    quantization = {
        "method": name,
        "config": to_dict(config),
        "records": pipe.records,
        "act_params": _act_params(model, pipe.records),
    }
    report["quantize_seconds"] = report["seconds"]
    report["n_quantized_linears"] = len(pipe.records)
    return model, CompressionResult(report, quantization=quantization)


register_entry_point("quantization", quantize)


def rotate(model: nn.Module, config: QuantConfig) -> None:
    """The rotation front end (``--rotate``, ``--rotate-down``), before any method runs."""
    from slimkit.quant.rotation import attach_down_rotation, rotate_model

    if config.rotate != "none":
        rotate_model(model, config.rotate, config.rotate_seed)
    if config.rotate_down != "none":
        attach_down_rotation(model, config.rotate_down, config.rotate_seed)


def _act_params(model: nn.Module, names) -> dict[str, dict[str, torch.Tensor]]:
    """Calibrated activation-quantizer numbers (static range, clip ratio) of the named layers."""
    out = {}
    for name in names:
        hook = acts.hook_of(get_module(model, name))
        if hook is not None and acts.saved_params(hook):
            out[name] = acts.saved_params(hook)
    return out


def save_quantized(
    model: nn.Module, tokenizer, out_dir: str | Path, result: CompressionResult
) -> None:
    """Write a ``save_pretrained`` directory with fake-quant weights plus ``quant_state.safetensors``
    (integer codes, scales, zero points, g_idx, static activation ranges) and ``quantization.json``.

    ``result``: what :func:`quantize` (or a pruning method that quantizes) returned for ``model``.
    """
    q = getattr(result, "quantization", None)
    if q is None:
        raise SlimkitError("no quantization result: pass the result that slimkit.quantize returned")
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tensors, layers = {}, {}
    for name, rec in q["records"].items():
        tensors.update({k: v.contiguous() for k, v in rec.tensors(name).items()})
        layers[name] = asdict(rec.spec)
    for name, params in q["act_params"].items():
        tensors.update({f"{name}.{k}": v for k, v in params.items()})
    save_file(tensors, str(out / QUANT_STATE))
    cfg = q["config"]
    act = (
        None
        if cfg["abits"] == 16
        else {"bits": cfg["abits"], "granularity": cfg["act_granularity"], "sym": cfg["act_sym"]}
    )
    meta = {
        "format": "slimkit-fake-quant",
        "note": "model.safetensors holds dequantized (fake-quant) weights; the integer codes are in "
        f"{QUANT_STATE}. This is not a packed checkpoint: it is neither smaller nor faster.",
        "method": q["method"],
        "config": cfg,
        "activations": act,
        # config.json does not keep it (transformers drops it on save), see _restore_attention
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "layers": layers,
    }
    (out / QUANT_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def attach_saved_activation_quantizers(model: nn.Module, model_dir: str | Path) -> dict | None:
    """Re-attach activation quantizers (and an online down-projection rotation) of a saved
    slimkit model and give it back the attention implementation it was quantized with; returns
    its quantization.json."""
    path = Path(model_dir) / QUANT_JSON
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    _restore_attention(model, meta.get("attn_implementation"), path)
    kind = meta.get("config", {}).get("rotate_down", "none")
    if kind != "none":  # the saved down projections already hold W H; the hook brings x H
        from slimkit.quant.rotation import attach_down_rotation

        attach_down_rotation(model, kind, meta["config"].get("rotate_seed", 0), fold=False)
    if meta.get("activations"):
        spec = ActSpec(**meta["activations"])
        state = load_file(str(Path(model_dir) / QUANT_STATE))
        block_map_for(model)
        for name in meta["layers"]:
            module = get_module(model, name)
            if module is None:
                raise SlimkitError(f"{path} names layer {name!r}, which the model does not have")
            params = {k: state[f"{name}.{k}"] for k in ACT_KEYS if f"{name}.{k}" in state}
            acts.attach_saved(module, spec, params)
    return meta


def load_saved(path_or_name: str):
    """(model, tokenizer, quantization.json or None) for a model directory that
    :func:`save_quantized` wrote (fake-quant weights, activation quantizers re-attached) or for
    any other model directory or name."""
    from slimkit.llm.models import load_model

    p = Path(path_or_name)
    if p.is_dir() and (p / QUANT_JSON).is_file():
        model, tok = load_model(str(p))
        meta = attach_saved_activation_quantizers(model, p)
        return model, tok, meta
    if p.with_name(p.name + ".partial").exists() and not p.exists():
        raise SlimkitError(f"{p} did not finish; resume it with the same command plus --resume")
    model, tok = load_model(path_or_name)
    return model, tok, None


def _restore_attention(model: nn.Module, saved: str | None, path: Path) -> None:
    """``from_pretrained`` builds a model with transformers' default attention (sdpa) whatever
    the model ran when it was quantized: config.json does not record it. Eager and sdpa attention
    differ in fp32 round-off (~1e-7), and an 8-bit activation that sits at a rounding tie then
    takes the neighbouring code, which moved the logits by ~1e-3. A saved run runs the attention
    it was quantized with. (Runs saved before this was recorded keep the default.)"""
    current = getattr(model.config, "_attn_implementation", None)
    if saved is None or current == saved:
        return
    model.set_attn_implementation(saved)
    if model.config._attn_implementation != saved:
        raise SlimkitError(
            f"{path} was quantized with {saved!r} attention, which this "
            f"{type(model).__name__} cannot switch to (it runs {current!r})"
        )
