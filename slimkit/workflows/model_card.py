"""The README.md model card written next to every quantized model."""

from __future__ import annotations


def model_card(run: dict) -> str:
    q = run["quantization"]
    cal = run["calibration"]
    notes = []
    if run.get("quantized", True):
        notes += [
            "**Fake-quantized**: `model.safetensors` holds fp32 weights dequantized from the integer codes in",
            "`quant_state.safetensors`; it is neither smaller nor faster than the original.",
        ]
    if run.get("pruned"):
        notes += [
            "**Pruned**: pruned weights are stored as zeros in dense tensors (per-layer sparsity in",
            "`sparsity.json`); without a sparse format and kernel the model is neither smaller nor faster.",
        ]
    lines = [
        f"# {run['model']} — {q['scheme']} ({q['method']})",
        "",
        "Produced by slimkit.",
        *notes,
        "",
        "## How it was made",
        "",
        "```",
        run["command"],
        "```",
        "",
        f"- source model: `{run['model']}` ({run.get('model_path', '')})",
        f"- method: {q['method']}, scheme {q['scheme']}; full config in `config.yaml`",
        f"- calibration: {cal['calib']} (train split), {cal['n_calib']} windows x {cal['calib_seq_len']} tokens, "
        f"seed {cal['seed']}, token fingerprint `{run['report']['calib_fingerprint']}`",
        f"- quantization time {run['report']['quantize_seconds']:.1f} s, peak RSS {run['report']['peak_rss_gb']:.2f} GB",
        "",
    ]
    evals = run["report"].get("eval", {})
    if evals:
        lines += ["## Evaluation", "", "| corpus | FP ppl | compressed ppl |", "|---|---|---|"]
        for corpus, r in evals.items():
            fp = r.get("fp", {}).get("ppl")
            lines.append(
                f"| {corpus} | {fp:.3f} | {r['quant']['ppl']:.3f} |"
                if fp
                else f"| {corpus} | - | {r['quant']['ppl']:.3f} |"
            )
        lines += [""]
        for corpus, r in evals.items():
            lines.append(f"- {corpus}: {r['protocol']}")
        lines.append("")
    lines += ["Versions and timings: `report.json`. Log: `run.log`.", ""]
    return "\n".join(lines)
