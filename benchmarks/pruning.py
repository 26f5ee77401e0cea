"""Pruning on the embedded SmolLM2-135M: magnitude, Wanda, SparseGPT (50 % and 2:4), SparseGPT 2:4
+ GPTQ W4 in one pass, and structured FFN pruning (25 % of channels), side by side.

Each row is one `slimkit prune` process, calibrated on wiki-offline (train split; magnitude needs
no data) and evaluated with GPTQ-protocol perplexity on the first --eval-windows windows of 512
tokens of the wiki-offline and bbc-news test splits. Size = model.safetensors on disk. For the
structured model, greedy decode tokens/s is measured beside the dense model in this process.

    python benchmarks/pruning.py                      # about 40 min on 2 cores
    python benchmarks/pruning.py --rows wanda-50,sparsegpt-50 --seeds 0,1,2

Results: benchmarks/results/pruning.json (a rerun skips finished runs) and pruning.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, mean_std, seed_list, sh, slimkit_cmd  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "pruning"
MODEL = "smollm2-135m"
CORPORA = ("wiki-offline", "bbc-news")

# name: (label, flags for `slimkit prune`, calibration-dependent)
ROWS: dict[str, tuple[str, list[str], bool]] = {
    "dense": ("FP32 dense", [], False),
    "magnitude-50": ("magnitude 50 %", ["--method", "magnitude", "--sparsity", "0.5"], False),
    "wanda-50": ("Wanda 50 %", ["--method", "wanda", "--sparsity", "0.5"], True),
    "sparsegpt-50": ("SparseGPT 50 %", ["--method", "sparsegpt", "--sparsity", "0.5"], True),
    "magnitude-24": ("magnitude 2:4", ["--method", "magnitude", "--sparsity", "2:4"], False),
    "wanda-24": ("Wanda 2:4", ["--method", "wanda", "--sparsity", "2:4"], True),
    "sparsegpt-24": ("SparseGPT 2:4", ["--method", "sparsegpt", "--sparsity", "2:4"], True),
    "sparsegpt-24-w4": (
        "SparseGPT 2:4 + GPTQ W4A16 per-channel (one pass)",
        ["--method", "sparsegpt", "--sparsity", "2:4", "--then", "gptq", "--wbits", "4"],
        True,
    ),
    "structured-25": (
        "structured: 25 % of FFN channels removed",
        ["--method", "structured", "--sparsity", "0.25"],
        True,
    ),
    "structured-25-h33": (
        "structured: 25 % of FFN channels and 1 of 3 KV head groups (3 of 9 heads) removed",
        ["--method", "structured", "--sparsity", "0.25", "--heads", "0.34"],
        True,
    ),
}


def run_row(row: str, seed: int, a) -> dict:
    _, flags, _ = ROWS[row]
    ev = ["--ppl", ",".join(CORPORA), "--seq-len", "512", "--max-windows", str(a.eval_windows)]
    if row == "dense":
        j = CACHE / "dense.json"
        sh(slimkit_cmd("eval", MODEL, *ev, "--json", str(j)))
        res = json.loads(j.read_text())["results"]
        from slimkit.llm.models import resolve_model_path

        size = (Path(resolve_model_path(MODEL)) / "model.safetensors").stat().st_size
        return {"ppl": {c: res[c]["ppl"] for c in CORPORA}, "seconds": 0.0, "size_mb": size / 1e6}
    out = CACHE / "runs" / f"{row}-s{seed}"
    calib = [
        "--calib",
        "wiki-offline",
        "--n-calib",
        str(a.n_calib),
        "--calib-seq-len",
        "512",
        "--seed",
        str(seed),
    ]
    sh(slimkit_cmd("prune", MODEL, *flags, *calib, *ev, "--out", str(out), "--overwrite"))
    rep = json.loads((out / "report.json").read_text())
    r = {
        "ppl": {c: rep["eval"][c]["quant"]["ppl"] for c in CORPORA},
        "seconds": rep["quantize_seconds"],
        "size_mb": (out / "model.safetensors").stat().st_size / 1e6,
        "sparsity": rep.get("sparsity", {}).get("overall_in_pruned_layers"),
        "parameters": rep.get("parameters"),
    }
    if row.startswith("structured"):
        r["decode"] = decode_speed(out)
    return r


def decode_speed(pruned_dir: Path, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Greedy decode tokens/s of the pruned model and the dense one, alternated in one process."""
    import torch

    from slimkit.llm.models import load_model

    torch.set_num_threads(2)
    models = {"dense": load_model(MODEL)[0], "pruned": load_model(str(pruned_dir))[0]}
    tok = load_model(str(pruned_dir))[1]
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    best = {k: 0.0 for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                m.generate(
                    ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                )
            best[k] = max(best[k], new_tokens / (time.perf_counter() - t0))
    return {**{f"{k}_tok_s": v for k, v in best.items()}, "ratio": best["pruned"] / best["dense"]}


def summarize(results: dict, a) -> str:
    lines = [
        "# Pruning on SmolLM2-135M (embedded Q4_1 GGUF dequantized to fp32)",
        "",
        f"Calibration: wiki-offline train split, {a.n_calib} windows x 512 tokens (magnitude: none). Evaluation: "
        f"GPTQ-protocol perplexity, first {a.eval_windows} windows of 512 tokens of the wiki-offline and bbc-news "
        "test splits; mean ± sample std over calibration seeds (n). Pruned layers: every linear of every decoder "
        "block (embeddings and lm_head kept). Unstructured and 2:4 models are dense tensors with zeros (same size, "
        "no speed-up without a sparse kernel); the structured model is really smaller. Seconds: pruning only.",
        "",
        f"Command: `python benchmarks/pruning.py {' '.join(sys.argv[1:])}`".rstrip(),
        machine_line(),
        "",
        "| method | n | wiki-offline ppl | bbc-news ppl | sparsity | seconds | size MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, (label, _, _) in ROWS.items():
        runs = [v for k, v in results.items() if k.rsplit("-s", 1)[0] == row]
        if not runs:
            continue
        cells = [mean_std([r["ppl"][c] for r in runs]) for c in CORPORA]
        sp = mean_std([r.get("sparsity") for r in runs], "{:.3f}")
        lines.append(
            f"| {label} | {len(runs)} | {cells[0]} | {cells[1]} | {sp} | "
            f"{mean_std([r['seconds'] for r in runs], '{:.0f}')} | {runs[0]['size_mb']:.0f} |"
        )
    dec = [(k.rsplit("-s", 1)[0], v["decode"]) for k, v in results.items() if "decode" in v]
    seen = set()
    for row, d in dec:
        if row in seen:
            continue
        seen.add(row)
        lines += [
            "",
            f"Greedy decode, 64 new tokens, batch 1, best of 3, same process: dense {d['dense_tok_s']:.1f} tok/s, "
            f"{row} {d['pruned_tok_s']:.1f} tok/s (ratio {d['ratio']:.2f}).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument(
        "--seeds",
        type=seed_list,
        default="0",
        help="calibration seeds of calibration-dependent rows",
    )
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--results", default=str(RESULTS / "pruning.json"))
    a = p.parse_args()
    rows = list(ROWS) if a.rows == "all" else a.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    seeds = a.seeds
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    plan = [(r, seeds[0]) for r in rows] + [(r, s) for s in seeds[1:] for r in rows if ROWS[r][2]]
    for row, seed in plan:
        key = f"{row}-s{seed}"
        if key in results:
            continue
        results[key] = run_row(row, seed, a)
        path.write_text(json.dumps(results, indent=1) + "\n")
        path.with_suffix(".md").write_text(summarize(results, a))
        print(key, results[key]["ppl"], flush=True)
    print(summarize(results, a))


if __name__ == "__main__":
    main()
