"""End-to-end LLM jobs behind the CLI: quantize into a run directory, evaluate a model or run.

Each CLI subcommand maps onto one function here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

from slimkit.core import dist
from slimkit.core.config import save_yaml, to_dict
from slimkit.core.errors import SlimkitError
from slimkit.core.rundir import RunDir, check_output, peak_rss_gb, versions, write_json
from slimkit.data.text import calibration_windows, eval_windows, fingerprint
from slimkit.llm.compress import compress, method_for_config
from slimkit.llm.evaluate import lm_eval_tasks, perplexity, protocol_text
from slimkit.llm.models import check_context, check_finite, load_model, resolve_model_path
from slimkit.llm.pipeline import resolve_device
from slimkit.quant.api import load_saved, save_quantized
from slimkit.quant.methods import QuantConfig, check_model_widths
from slimkit.quant.rotation import check_rotation
from slimkit.workflows.model_card import model_card
from slimkit.workflows.run_config import CalibConfig, EvalConfig

log = logging.getLogger("slimkit")


def evaluate_model(model, tok, ev: EvalConfig, *, device: str = "auto", label: str = "") -> dict:
    """Perplexity on every corpus of ``ev`` (and lm-eval tasks); returns {corpus: result}."""
    dev = resolve_device(device)
    model.to(dev)
    out = {}
    for corpus in ev.corpora():
        windows = eval_windows(
            tok, corpus, ev.seq_len, max_windows=ev.max_windows or None, split=ev.split
        )
        r = perplexity(model, windows, batch_size=ev.eval_batch_size, device=dev)
        r["protocol"] = protocol_text(
            corpus, ev.split, ev.seq_len, r["n_windows"], "float32", str(dev)
        )
        r["eval_fingerprint"] = fingerprint(windows)
        log.info(
            "%s ppl on %s: %.3f (%d windows of %d)",
            label or "model",
            corpus,
            r["ppl"],
            r["n_windows"],
            ev.seq_len,
        )
        out[corpus] = r
    if ev.tasks:
        out["lm_eval"] = lm_eval_tasks(model, tok, [t for t in ev.tasks.split(",") if t])
    model.to("cpu")
    return out


def _method_name(cfg) -> str:
    from slimkit.prune import PruneConfig  # noqa: F401  (registers the pruning methods)

    return method_for_config(cfg)


def _apply(model, cfg, ids, ckpt: Path, resume: bool):
    from slimkit.prune import PruneConfig  # noqa: F401  (registers the pruning entry point)

    return compress(model, cfg, ids, checkpoint_dir=ckpt, resume=resume)


def compress_run(
    model_name: str,
    steps: list,
    calib: CalibConfig,
    ev: EvalConfig | None = None,
    *,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    eval_fp: bool = False,
    command: str | None = None,
) -> dict:
    """Apply ``steps`` (quantization and/or pruning configs, in order) to ``model_name`` and write
    the run directory ``out``; returns the report dict.

    Writes the model (fake-quant and/or dense with zeros), quant_state.safetensors and
    quantization.json (if quantized), sparsity.json (if pruned), config.yaml, report.json,
    README.md and run.log; checkpoints after every block so ``resume`` loses nothing.
    """
    if not steps:
        raise SlimkitError("nothing to do: give at least one quantization or pruning config")
    t0 = time.time()
    names = [_method_name(c) for c in steps]
    if dist.rank() == 0:  # an existing or unwritable --out: refused before the model is read
        check_output(out, overwrite=overwrite)
    model_path = resolve_model_path(model_name)
    model, tok = load_model(model_path)
    check_context(model, calib.calib_seq_len, "--calib-seq-len")
    if ev and ev.corpora():
        check_context(model, ev.seq_len, "--seq-len")
    check_finite(model)
    for i, cfg in enumerate(steps):  # bad group size / N:M width: fail before anything is written
        resolve_device(cfg.device)
        if isinstance(cfg, QuantConfig):
            check_model_widths(model, cfg)
            check_rotation(model, cfg.rotate, cfg.rotate_down)
            if i > 0 and (cfg.rotate != "none" or cfg.rotate_down != "none"):
                raise SlimkitError(
                    "--rotate / --rotate-down after pruning would make the pruned weights dense "
                    "again; quantize the pruned model without rotation"
                )
    ids = calibration_windows(tok, calib.calib, calib.n_calib, calib.calib_seq_len, seed=calib.seed)
    rank0 = dist.rank() == 0
    rd = RunDir(out, resume=resume, overwrite=overwrite) if rank0 else None
    with rd or contextlib.nullcontext():  # bad input found from here on removes OUT.partial
        ckpt = rd.checkpoint_dir if rd else Path(str(out) + ".partial") / "checkpoint"
        dist.barrier()
        resolved = {
            "model": model_name,
            "method": "+".join(names),
            **(
                {"quant": to_dict(steps[0])}
                if len(steps) == 1
                else {"steps": [{"method": n, **to_dict(c)} for n, c in zip(names, steps)]}
            ),
            "calibration": to_dict(calib),
            "eval": to_dict(ev) if ev else None,
        }
        if rd:
            save_yaml(resolved, rd.path / "config.yaml")
        device = steps[-1].device
        fp_eval = {}
        if ev and eval_fp and ev.corpora() and rank0:
            fp_eval = evaluate_model(model, tok, ev, device=device, label="FP32")
        step_reports = []
        for i, cfg in enumerate(steps):
            sub = ckpt if len(steps) == 1 else ckpt / f"step{i}"
            model, rep = _apply(model, cfg, ids, sub, resume)
            step_reports.append(rep)
        # the last step that quantized (pruned) holds the model's quantization (sparsity)
        quantized = next((r for r in reversed(step_reports) if r.quantization), None)
        sparsity = next((r.sparsity for r in reversed(step_reports) if r.sparsity), None)
        report: dict = dict(step_reports[-1])
        scheme = " + ".join(r["scheme"] for r in step_reports)
        report.update(
            {
                "method": "+".join(names),
                "scheme": scheme,
                "quantize_seconds": sum(r["seconds"] for r in step_reports),
            }
        )
        if len(steps) > 1:
            report["steps"] = step_reports
        if not rank0:
            return report
        if ev and ev.corpora():
            q_eval = evaluate_model(model, tok, ev, device=device, label=scheme)
            report["eval"] = {
                c: {"quant": q_eval[c], "fp": fp_eval.get(c, {}), "protocol": q_eval[c]["protocol"]}
                for c in ev.corpora()
            }
        if quantized is not None:
            save_quantized(model, tok, rd.path, quantized)
        else:
            model.save_pretrained(rd.path)
            tok.save_pretrained(rd.path)
        if sparsity is not None:
            write_json(rd.path / "sparsity.json", sparsity)
        report.update(
            {
                "model": model_name,
                "model_path": model_path,
                "total_seconds": time.time() - t0,
                "peak_rss_gb": peak_rss_gb(),
                "versions": versions(),
                "world_size": dist.world_size(),
                "calibration": {
                    **to_dict(calib),
                    "split": "train",
                    "fingerprint": report["calib_fingerprint"],
                },
            }
        )
        write_json(rd.path / "report.json", report)
        card = {
            "model": model_name,
            "model_path": model_path,
            "command": command or " ".join(["slimkit", *sys.argv[1:]]),
            "quantization": {"method": "+".join(names), "scheme": scheme},
            "quantized": quantized is not None,
            "pruned": sparsity is not None,
            "calibration": to_dict(calib),
            "report": report,
        }
        (rd.path / "README.md").write_text(model_card(card))
        final = rd.commit()
        log.info("wrote %s", final)
        report["out"] = str(final)
        return report


def quantize_run(
    model_name: str, qcfg: QuantConfig, calib: CalibConfig, ev: EvalConfig | None = None, **kw
) -> dict:
    """Quantize ``model_name`` into a run directory (see :func:`compress_run`)."""
    return compress_run(model_name, [qcfg], calib, ev, **kw)


def load_for_eval(path_or_name: str):
    """A slimkit run directory (fake-quant weights + activation quantizers) or any model."""
    from slimkit.export.runtime import describe, load_for_generation

    p = Path(path_or_name)
    if describe(p) != "transformers":  # an export: compressed-tensors, GPTQ or GGUF
        model, tok, how = load_for_generation(p)
        log.info("%s: %s", p, how)
        return model, tok, {"method": f"export ({describe(p)})"}
    return load_saved(path_or_name)


def eval_run(
    path_or_name: str, ev: EvalConfig, *, device: str = "auto", json_out: str | None = None
) -> dict:
    if not ev.corpora() and not ev.tasks:
        raise SlimkitError("nothing to evaluate: pass --ppl CORPUS[,CORPUS] and/or --tasks")
    model, tok, meta = load_for_eval(path_or_name)
    if ev.corpora():
        check_context(model, ev.seq_len, "--seq-len")
    res = evaluate_model(model, tok, ev, device=device, label=path_or_name)
    out = {
        "model": path_or_name,
        "quantization": meta and {"method": meta["method"]},
        "results": res,
    }
    if json_out:
        write_json(json_out, out)
    return out
