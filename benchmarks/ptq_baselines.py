"""PTQ baselines on the embedded SmolLM2-135M: slimkit RTN / GPTQ / AWQ / SmoothQuant beside llm-compressor.

Every slimkit row is one `slimkit quantize` process (so wall seconds and peak RSS are its own),
calibrated on wiki-offline (train split) and evaluated on wiki-offline AND bbc-news (test splits,
a corpus the calibration never saw), context 512, GPTQ perplexity protocol. Calibration-dependent
rows run for several calibration seeds; the table gives mean ± sample standard deviation.
llm-compressor's rows (its own virtual environment, see benchmarks/peers/) use the very same
calibration windows (checked by fingerprint) and evaluation windows.

    python benchmarks/ptq_baselines.py                    # everything (about 2 h on 2 cores)
    python benchmarks/ptq_baselines.py --rows gptq-w4g64,rtn-w4g64 --seeds 0

Results are appended to benchmarks/results/ptq_baselines.json as each run finishes (a rerun skips
finished runs) and the Markdown table benchmarks/results/ptq_baselines.md is rewritten.
Note: the embedded model is a Q4_1 GGUF (4-bit, blocks of 32) dequantized to fp32, so no row
uses 4-bit group 32, which would be artificially lossless.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, eval_fp, machine_line, mean_std, run_quantize, seed_list, sh  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "ptq"
PEER_PY = ROOT / "benchmarks" / "peers" / ".venv-llmcompressor" / "bin" / "python"
MODEL = "smollm2-135m"
CORPORA = ("wiki-offline", "bbc-news")

W = ["--no-sym"]
G = ["--no-static-groups"]  # GPTQ's dynamic act-order groups, as these rows were measured
# name: (tool, method, flags, calibration-dependent)
ROWS: dict[str, tuple[str, str, list[str], bool]] = {
    "fp32": ("slimkit", "fp", [], False),
    "rtn-w4g64": ("slimkit", "rtn", ["--wbits", "4", "--group-size", "64", *W], False),
    "gptq-w4g64": ("slimkit", "gptq", ["--wbits", "4", "--group-size", "64", *W, *G], True),
    "rtn-w4": ("slimkit", "rtn", ["--wbits", "4", "--group-size", "-1", *W], False),
    "gptq-w4": ("slimkit", "gptq", ["--wbits", "4", "--group-size", "-1", *W, *G], True),
    "rtn-w3g64": ("slimkit", "rtn", ["--wbits", "3", "--group-size", "64", *W], False),
    "gptq-w3g64": ("slimkit", "gptq", ["--wbits", "3", "--group-size", "64", *W, *G], True),
    "rtn-w2g64": ("slimkit", "rtn", ["--wbits", "2", "--group-size", "64", *W], False),
    "gptq-w2g64": ("slimkit", "gptq", ["--wbits", "2", "--group-size", "64", *W, *G], True),
    "rtn-w8a8": (
        "slimkit",
        "rtn",
        ["--wbits", "8", "--group-size", "-1", "--sym", "--abits", "8"],
        False,
    ),
    "sq-rtn-w8a8": (
        "slimkit",
        "smoothquant",
        ["--wbits", "8", "--abits", "8", "--weight-method", "rtn"],
        True,
    ),
    "rtn-w4a8": (
        "slimkit",
        "rtn",
        ["--wbits", "4", "--group-size", "-1", *W, "--abits", "8"],
        False,
    ),
    "sq-rtn-w4a8": (
        "slimkit",
        "smoothquant",
        ["--wbits", "4", "--group-size", "-1", *W, "--abits", "8", "--weight-method", "rtn"],
        True,
    ),
    "gptq-w4a8": (
        "slimkit",
        "gptq",
        ["--wbits", "4", "--group-size", "-1", *W, "--abits", "8"],
        True,
    ),
    "sq-gptq-w4a8": (
        "slimkit",
        "smoothquant",
        ["--wbits", "4", "--group-size", "-1", *W, "--abits", "8", "--weight-method", "gptq"],
        True,
    ),
    "llmc-rtn-w4g64": ("llm-compressor", "rtn", ["--wbits", "4", "--group-size", "64"], False),
    "llmc-gptq-w4g64": ("llm-compressor", "gptq", ["--wbits", "4", "--group-size", "64"], True),
    # AWQ: slimkit's default (llm-awq: activation scales + clip search), slimkit with
    # llm-compressor's algorithm (duo scaling, no clip search), and llm-compressor itself
    "awq-w4g64": ("slimkit", "awq", ["--wbits", "4", "--group-size", "64", *W], True),
    "awq-duo-w4g64": (
        "slimkit",
        "awq",
        ["--wbits", "4", "--group-size", "64", *W, "--duo-scaling", "--no-auto-clip"],
        True,
    ),
    "llmc-awq-w4g64": ("llm-compressor", "awq", ["--wbits", "4", "--group-size", "64"], True),
}
LABELS = {
    "fp32": ("FP32", "-"),
    "rtn-w4g64": ("W4A16 g64", "RTN"),
    "gptq-w4g64": ("W4A16 g64", "GPTQ"),
    "llmc-rtn-w4g64": ("W4A16 g64", "llm-compressor RTN"),
    "llmc-gptq-w4g64": ("W4A16 g64", "llm-compressor GPTQ"),
    "awq-w4g64": ("W4A16 g64", "AWQ (llm-awq: scales + clip search)"),
    "awq-duo-w4g64": ("W4A16 g64", "AWQ, duo scaling, no clip search"),
    "llmc-awq-w4g64": ("W4A16 g64", "llm-compressor AWQ (duo scaling)"),
    "rtn-w4": ("W4A16 per-channel", "RTN"),
    "gptq-w4": ("W4A16 per-channel", "GPTQ"),
    "rtn-w3g64": ("W3A16 g64", "RTN"),
    "gptq-w3g64": ("W3A16 g64", "GPTQ"),
    "rtn-w2g64": ("W2A16 g64", "RTN"),
    "gptq-w2g64": ("W2A16 g64", "GPTQ"),
    "rtn-w8a8": ("W8A8", "RTN"),
    "sq-rtn-w8a8": ("W8A8", "SmoothQuant + RTN"),
    "rtn-w4a8": ("W4A8", "RTN"),
    "sq-rtn-w4a8": ("W4A8", "SmoothQuant + RTN"),
    "gptq-w4a8": ("W4A8", "GPTQ"),
    "sq-gptq-w4a8": ("W4A8", "SmoothQuant + GPTQ"),
}


def eval_flags(a) -> list[str]:
    return [
        "--ppl",
        ",".join(CORPORA),
        "--seq-len",
        str(a.seq_len),
        "--max-windows",
        str(a.eval_windows),
    ]


def run_slimkit(row: str, seed: int, a) -> dict:
    _, method, flags, _ = ROWS[row]
    if method == "fp":
        return eval_fp(MODEL, CACHE / "fp32.json", seq_len=a.seq_len, eval_windows=a.eval_windows,
                       corpora=CORPORA)  # fmt: skip
    return run_quantize(
        MODEL, method, flags, CACHE / "runs" / f"{row}-s{seed}", seed=seed, n_calib=a.n_calib,
        seq_len=a.seq_len, eval_windows=a.eval_windows, corpora=CORPORA, keep_weights=a.keep_weights,
    )  # fmt: skip


def dump_windows(seed: int, a) -> tuple[Path, dict[str, Path], str]:
    """The exact token windows slimkit uses, as safetensors for the peer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from slimkit.data import calibration_windows, eval_windows, fingerprint
    from slimkit.llm.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
    CACHE.mkdir(parents=True, exist_ok=True)
    calib = calibration_windows(tok, "wiki-offline", a.n_calib, a.seq_len, seed=seed)
    cpath = CACHE / f"calib-s{seed}.safetensors"
    save_file({"input_ids": calib}, str(cpath))
    epaths = {}
    for c in CORPORA:
        e = eval_windows(tok, c, a.seq_len, max_windows=a.eval_windows)
        epaths[c] = CACHE / f"eval-{c}.safetensors"
        save_file({"input_ids": e}, str(epaths[c]))
    return cpath, epaths, fingerprint(calib)


def run_peer(row: str, seed: int, a) -> dict:
    _, scheme, flags, _ = ROWS[row]
    if not PEER_PY.exists():
        sh(["bash", "benchmarks/peers/setup_llmcompressor.sh"])
    from slimkit.llm.models import resolve_model_path

    cpath, epaths, fp = dump_windows(seed, a)
    out = CACHE / "runs" / f"{row}-s{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    evals = [x for c, p in epaths.items() for x in ("--eval", f"{c}={p}")]
    cmd = [str(PEER_PY), "benchmarks/peers/llmcompressor_runner.py", "--model-dir", resolve_model_path(MODEL),
           "--calib", str(cpath), *evals, "--scheme", scheme, *flags, "--out", str(out)]  # fmt: skip
    sh(cmd)
    r = json.loads(out.read_text())
    return {
        "ppl": r["ppl"],
        "ppl_fp": r["ppl_fp"],
        "seconds": r["quantize_seconds"],
        "peak_rss_gb": r["peak_rss_gb"],
        "calib_fingerprint": fp,
        "peer": {k: r[k] for k in ("version", "torch", "transformers", "quant_args") if k in r},
    }


def summarize(results: dict, a) -> str:
    lines = [
        "# PTQ baselines on SmolLM2-135M (embedded Q4_1 GGUF dequantized to fp32)",
        "",
        f"Calibration: wiki-offline train split, {a.n_calib} windows x {a.seq_len} tokens, seeds as listed. "
        f"Evaluation: GPTQ-protocol perplexity, first {a.eval_windows} non-overlapping windows of {a.seq_len} "
        "tokens of the test split of wiki-offline and of bbc-news (never seen in calibration). "
        "Perplexity is mean ± sample std over calibration seeds (n = number of seeds); seconds = quantization "
        "wall time only (calibration capture + method), peak RSS = whole process (load, quantize, evaluate). "
        "All weight grids asymmetric except W8A8 (symmetric int8, SmoothQuant's convention); GPTQ with act-order, "
        "true-sequential, damp 0.01, block 128. Activations: dynamic per-token symmetric int8.",
        "",
        f"Command: `{' '.join(['python benchmarks/ptq_baselines.py', *sys.argv[1:]])}`",
        machine_line(),
        "",
        "| setting | method | n | wiki-offline ppl | bbc-news ppl | seconds | peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        runs = [v for k, v in results.items() if k.rsplit("-s", 1)[0] == row]
        if not runs:
            continue
        setting, method = LABELS[row]

        cells = [mean_std([r["ppl"][c] for r in runs]) for c in CORPORA]
        lines.append(
            f"| {setting} | {method} | {len(runs)} | {cells[0]} | {cells[1]} | "
            f"{mean_std([r['seconds'] for r in runs], '{:.0f}')} | {mean_std([r['peak_rss_gb'] for r in runs])} |"
        )
    peer = next((r for k, r in results.items() if k.startswith("llmc-") and "peer" in r), None)
    if peer:
        lines += ["", f"llm-compressor: {json.dumps(peer['peer'])}; its FP32 ppl in its own harness: "
                  + ", ".join(f"{c} {v:.3f}" for c, v in peer["ppl_fp"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument(
        "--seeds",
        type=seed_list,
        default="0,1,2",
        help="calibration seeds of the --multi-seed rows",
    )
    p.add_argument(
        "--multi-seed",
        default="gptq-w4g64,gptq-w3g64,gptq-w2g64,llmc-gptq-w4g64",
        help="calibration-dependent rows run for every seed (others: the first seed only); 'all'",
    )
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--results", default=str(RESULTS / "ptq_baselines.json"))
    p.add_argument(
        "--keep-weights",
        action="store_true",
        help="keep each run's quantized weights under benchmarks/.cache/ptq/runs (0.6 GB a run; "
        "by default only reports and logs are kept)",
    )
    a = p.parse_args()
    rows = list(ROWS) if a.rows == "all" else a.rows.split(",")
    first = ["fp32", "rtn-w4g64", "gptq-w4g64", "llmc-rtn-w4g64", "llmc-gptq-w4g64"]
    rows = [r for r in first if r in rows] + [r for r in rows if r not in first]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    seeds = a.seeds
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    multi = set(ROWS) if a.multi_seed == "all" else set(a.multi_seed.split(","))
    # first seed of every row, then the extra seeds: the whole table fills in early
    plan = [(r, seeds[0]) for r in rows] + [
        (r, s) for s in seeds[1:] for r in rows if r in multi and ROWS[r][3]
    ]
    for row, seed in plan:
        tool = ROWS[row][0]
        key = f"{row}-s{seed}"
        if key in results:
            continue
        results[key] = (
            run_peer(row, seed, a) if tool == "llm-compressor" else run_slimkit(row, seed, a)
        )
        path.write_text(json.dumps(results, indent=1) + "\n")
        path.with_suffix(".md").write_text(summarize(results, a))
        print(key, results[key]["ppl"], flush=True)
    print(summarize(results, a))


if __name__ == "__main__":
    main()
