"""Exports of quantized SmolLM2-135M: compressed-tensors, GPTQ and GGUF, each verified,
evaluated as loaded by its reader, and (GGUF) timed in llama.cpp beside the F16 GGUF.

Runs: GPTQ W4A16 g64 (compressed-tensors, GPTQ), GPTQ W3A16 g64 (GPTQ), GPTQ W4A16 g32
asymmetric (GGUF Q4_1, compressed-tensors), GPTQ W4A16 g32 symmetric (Q4_0) and RTN W8A16 g32
symmetric (Q8_0). The embedded model already lies on a 4-bit grid with blocks of 32 (it ships as
Q4_1), so the g32 rows show export fidelity, size and speed, not quantization quality. A SparseGPT
2:4 run (`slimkit prune`) is exported as compressed-tensors sparse-24-bitmask.
Each run is one `slimkit quantize` (wiki-offline calibration),
each export one `slimkit export --verify`, each evaluation one `slimkit eval` of the artifact
(the tokenizer and weights the reader rebuilds, not slimkit's in-memory model).

    python benchmarks/export.py                 # about 25 min on 2 cores (+ llama.cpp timing)
    python benchmarks/export.py --runs gptq-w4g32 --formats gguf

Speed: `slimkit bench` (llama.cpp through llama-cpp-python, 2 threads), prefill of 128 tokens and
64 greedy decode steps, best of 3, alternated with the F16 GGUF in one process; skipped with a
note when llama-cpp-python is not installed. Results: benchmarks/results/export.json and export.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, run_quantize, sh, slimkit_cmd  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "export"
MODEL = "smollm2-135m"
CORPORA = ("wiki-offline", "bbc-news")
# run: (method, flags, formats it is exported to)
RUNS = {
    "gptq-w4g64": ("gptq", ["--wbits", "4", "--group-size", "64"], ["compressed-tensors", "gptq"]),
    "gptq-w3g64": ("gptq", ["--wbits", "3", "--group-size", "64"], ["gptq"]),
    "gptq-w4g32": ("gptq", ["--wbits", "4", "--group-size", "32"], ["gguf", "compressed-tensors"]),
    "gptq-w4g32-sym": ("gptq", ["--wbits", "4", "--group-size", "32", "--sym"], ["gguf"]),
    "rtn-w8g32-sym": ("rtn", ["--wbits", "8", "--group-size", "32", "--sym"], ["gguf"]),
    "sparsegpt-24": ("sparsegpt", ["--sparsity", "2:4"], ["sparse-24"]),  # `slimkit prune`
}
FORMATS = {"compressed-tensors": "", "gptq": "", "gguf": ".gguf", "sparse-24": ""}


def evaluate(path: Path, a, out_json: Path) -> dict:
    sh(slimkit_cmd("eval", str(path), "--ppl", ",".join(CORPORA), "--seq-len", "512",
                   "--max-windows", str(a.eval_windows), "--json", str(out_json)))  # fmt: skip
    res = json.loads(out_json.read_text())["results"]
    return {c: res[c]["ppl"] for c in CORPORA}


def run_one(run: str, fmt: str, a, results: dict) -> dict:
    method, flags, _ = RUNS[run]
    run_dir = CACHE / "runs" / run
    key = f"{run}-run"
    if key not in results and fmt == "sparse-24":
        sh(slimkit_cmd("prune", MODEL, "--method", method, *flags, "--calib", "wiki-offline", "--n-calib",
                       str(a.n_calib), "--calib-seq-len", "512", "--ppl", ",".join(CORPORA), "--seq-len", "512",
                       "--max-windows", str(a.eval_windows), "--out", str(run_dir), "--overwrite"))  # fmt: skip
        rep = json.loads((run_dir / "report.json").read_text())
        results[key] = {"ppl": {c: rep["eval"][c]["quant"]["ppl"] for c in CORPORA}}
    elif key not in results:
        results[key] = run_quantize(
            MODEL, method, flags, run_dir, seed=0, n_calib=a.n_calib, seq_len=512,
            eval_windows=a.eval_windows, corpora=CORPORA,
        )  # fmt: skip
    out = CACHE / "exports" / f"{run}-{fmt}{FORMATS[fmt]}"
    sh(slimkit_cmd("export", str(run_dir), "--format", fmt, "--out", str(out), "--verify",
                   "--overwrite"))  # fmt: skip
    side = out.with_name(out.name + ".export.json") if fmt == "gguf" else out / "export.json"
    rep = json.loads(side.read_text())
    r = {
        "size_mb": rep["size_bytes"] / 1e6,
        "source_mb": rep["source_size_bytes"] / 1e6,
        "export_seconds": rep["export_seconds"],
        "verify": rep["verify"],
        "ppl": evaluate(out, a, CACHE / f"eval-{run}-{fmt}.json"),
    }
    if fmt == "gguf" and a.speed:
        r["speed"] = speed(run, out)
    return r


def speed(run: str, out: Path) -> dict:
    bj = CACHE / f"bench-{run}.json"
    try:
        sh(slimkit_cmd("bench", str(out), "--json", str(bj)))
        return json.loads(bj.read_text())
    except SystemExit as e:  # llama-cpp-python missing or failing: say so in the table
        return {"error": str(e)}


def summarize(results: dict, a) -> str:
    lines = [
        "# Exports of quantized SmolLM2-135M (embedded Q4_1 GGUF dequantized to fp32)",
        "",
        f"Quantization: wiki-offline calibration, {a.n_calib} windows x 512 tokens, seed 0. Perplexity: GPTQ "
        f"protocol, first {a.eval_windows} windows of 512 tokens of the test splits, computed on the artifact as "
        "its reader loads it (`slimkit eval EXPORT`). Verify: integer codes decoded from the files vs slimkit's, "
        "and logits of the reloaded model vs slimkit's model with the stored (fp16) scales on two prompts. "
        "g32 rows: the embedded model already lies on a 4-bit grid with blocks of 32 (it ships as Q4_1 GGUF), "
        "so their perplexities are artificially close to FP32; they show fidelity, size and speed only.",
        "",
        f"Command: `python benchmarks/export.py {' '.join(sys.argv[1:])}`".rstrip(),
        machine_line(),
        "",
        "| run | format | reader | size MB | codes identical | max abs logit diff (rel.) | top-1 agree | "
        "wiki ppl (fake-quant → export) | bbc ppl (fake-quant → export) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    speed = []
    for run in RUNS:
        base = results.get(f"{run}-run")
        for fmt in RUNS[run][2]:
            r = results.get(f"{run}-{fmt}")
            if not r or not base:
                continue
            v = r["verify"]
            ppl = " | ".join(f"{base['ppl'][c]:.3f} → {r['ppl'][c]:.3f}" for c in CORPORA)
            lines.append(
                f"| {run} | {fmt} | {v['reader']} | {r['size_mb']:.1f} (fp32 {r['source_mb']:.0f}) | "
                f"{v['codes_identical']} | {v['max_abs_logit_diff_vs_reference']:.3g} "
                f"({v['relative_logit_diff']:.1e}) | {v['top1_agreement']:.4f} | {ppl} |"
            )
            if "speed" in r:
                speed.append((run, r["speed"]))
    if speed:
        lines += ["", "## llama.cpp speed (CPU)", ""]
        for run, s in speed:
            if "error" in s:
                lines.append(
                    f"- {run}: not measured ({s['error']}; llama-cpp-python not installed)"
                )
                continue
            x = s["ratios_vs_f16"]
            lines.append(
                f"- {run}: {s['engine']}, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens. "
                f"Export {s['size_mb']['model']:.1f} MB, prefill {s['model']['prefill_tok_s']:.0f} tok/s, decode "
                f"{s['model']['decode_tok_s']:.1f} tok/s; F16 {s['size_mb']['f16']:.1f} MB, prefill "
                f"{s['f16']['prefill_tok_s']:.0f} tok/s, decode {s['f16']['decode_tok_s']:.1f} tok/s. Ratios: size "
                f"{x['size']:.2f}, prefill {x['prefill']:.2f}, decode {x['decode']:.2f}."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", default=",".join(RUNS), help=f"subset of: {', '.join(RUNS)}")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"subset of: {', '.join(FORMATS)}")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip llama.cpp timing")
    p.add_argument("--results", default=str(RESULTS / "export.json"))
    a = p.parse_args()
    runs, fmts = a.runs.split(","), a.formats.split(",")
    bad = [r for r in runs if r not in RUNS] + [f for f in fmts if f not in FORMATS]
    if bad:
        raise SystemExit(f"unknown runs/formats {bad}")
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    for run in runs:
        for fmt in (f for f in RUNS[run][2] if f in fmts):
            key = f"{run}-{fmt}"
            if key in results:
                if a.speed and "error" in results[key].get("speed", {}):  # retry a failed timing
                    out = CACHE / "exports" / f"{run}-{fmt}{FORMATS[fmt]}"
                    results[key]["speed"] = speed(run, out)
                    path.write_text(json.dumps(results, indent=1) + "\n")
                    path.with_suffix(".md").write_text(summarize(results, a))
                continue
            results[key] = run_one(run, fmt, a, results)
            path.write_text(json.dumps(results, indent=1) + "\n")
            path.with_suffix(".md").write_text(summarize(results, a))
            print(key, results[key]["ppl"], flush=True)
    print(summarize(results, a))


if __name__ == "__main__":
    main()
