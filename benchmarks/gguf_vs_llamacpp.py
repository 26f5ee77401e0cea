"""slimkit's GGUF files on llama.cpp's K-quant mixes beside llama.cpp's own quantization of the
same F16 file, all measured in llama.cpp (llama-cpp-python, `make llamacpp`).

For each file type: llama.cpp's `llama_model_quantize` of the F16 GGUF of the embedded
SmolLM2-135M (its own quantizer: K-quant sub-block scale search, no calibration data) against
the files slimkit writes from a GPTQ run on the same per-tensor grids (`--grid llama.cpp:FTYPE`,
made by `python benchmarks/gguf_kquants.py`, or any `--slimkit TYPE=FILE`). Perplexity is
llama.cpp's own: its logits over the GPTQ-protocol windows of the wiki-offline and bbc-news test
splits (the same token ids for every file); prefill tokens / s come from that pass (one thread).

    python benchmarks/gguf_vs_llamacpp.py --slimkit Q3_K_M=runs/gptq-q3_k_m.gguf,Q2_K=runs/gptq-q2_k.gguf

Writes benchmarks/results/gguf_vs_llamacpp.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "gguf_vs_llamacpp"
MODEL = "smollm2-135m"
CORPORA = ("wiki-offline", "bbc-news")


def llama_ppl(path: Path, windows: np.ndarray) -> tuple[float, float]:
    """(perplexity, prefill tokens / s) of ``path`` in llama.cpp over ``windows`` [n, L]."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_threads=1,
                          n_batch=windows.shape[1], logits_all=True, verbose=False)  # fmt: skip
    nll, count, seconds = 0.0, 0, 0.0
    for w in windows:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(w.tolist())
        seconds += time.perf_counter() - t0
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)[:-1]
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return math.exp(nll / count), windows.size / seconds


def llama_quantize(f16: Path, out: Path, ftype: str) -> Path:
    import llama_cpp

    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed ({rc}) for {ftype}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slimkit", required=True, help="TYPE=FILE,... slimkit GGUF per file type")
    ap.add_argument("--eval-windows", type=int, default=10)
    args = ap.parse_args()
    from slimkit.data.text import eval_windows
    from slimkit.export.runtime import write_f16_gguf
    from slimkit.llm.models import load_model

    files = dict(kv.split("=", 1) for kv in args.slimkit.split(","))
    CACHE.mkdir(parents=True, exist_ok=True)
    f16 = CACHE / "f16.gguf"
    if not f16.is_file():
        write_f16_gguf(None, f16, base=MODEL)
    _, tok = load_model(MODEL)
    windows = {c: eval_windows(tok, c, 512, max_windows=args.eval_windows).numpy() for c in CORPORA}
    rows = []

    def measure(label: str, ftype: str, path: Path) -> None:
        r = {"type": ftype, "file": label, "size_mb": path.stat().st_size / 1e6}
        for c in CORPORA:
            r[c], r[f"{c}_prefill_tok_s"] = llama_ppl(path, windows[c])
        rows.append(r)
        print(r, flush=True)

    measure("F16", "F16", f16)
    for ftype, path in files.items():
        own = llama_quantize(f16, CACHE / f"llama-{ftype.lower()}.gguf", ftype)
        measure("llama.cpp's quantizer", ftype, own)
        measure("slimkit GPTQ, same grids", ftype, Path(path))
    lines = [
        "# slimkit GGUF vs llama.cpp's own quantization, measured in llama.cpp",
        "",
        f"Command: `python benchmarks/gguf_vs_llamacpp.py --slimkit {args.slimkit} "
        f"--eval-windows {args.eval_windows}`. {machine_line()}",
        "",
        f"Model: the embedded {MODEL} (its F16 GGUF written by slimkit). llama.cpp: "
        "llama-cpp-python 0.3.36 (`make llamacpp`), one thread. Perplexity: llama.cpp's logits "
        f"over the first {args.eval_windows} GPTQ-protocol windows of 512 tokens of each test "
        "split (identical token ids for every file). The slimkit files come from one GPTQ run "
        "per type (8 x 512 calibration tokens of wiki-offline train, seed 0; "
        "`python benchmarks/gguf_kquants.py`). Prefill tok/s is one thread on a shared machine: "
        "compare it only within a run, and with care.",
        "",
        "| type | file | size MB | wiki-offline ppl | bbc-news ppl | prefill tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['file']} | {r['size_mb']:.1f} | {r['wiki-offline']:.3f} | "
            f"{r['bbc-news']:.3f} | {r['wiki-offline_prefill_tok_s']:.0f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gguf_vs_llamacpp.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "gguf_vs_llamacpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
