"""CPU inference of SmolLM2-135M as GGUF files in llama.cpp: FP32, FP16, Q8_0, Q4_1 from slimkit
GPTQ (group 32) and Q4_1 from plain RTN, side by side in one process.

The embedded SmolLM2 already lies on a Q4_1 grid (groups of 32), which would make RTN nearly
lossless; so the model is first fine-tuned briefly in fp32 on wiki-offline (`slimkit train-lm
--init smollm2-135m`, --ft-steps steps at lr 2e-5), which moves every weight off that grid. All
files are made from that fine-tuned model with `slimkit quantize` + `slimkit export --format
gguf` (FP32 / FP16: the same writer without quantization).

Per file: size; llama.cpp prefill tokens/s (a 512-token prompt) and decode tokens/s (batch 1,
128 new tokens), alternated between files, best of --repeats; perplexity on the first
--eval-windows windows of 512 tokens of the wiki-offline test split, computed on the GGUF as
transformers' GGUF loader reads it. The decode bound: bytes read per token (the whole file: with
tied embeddings the output layer reads the embedding matrix) / memory bandwidth measured here
(numpy copy of a 512 MB array, best of 5).

    python benchmarks/inference.py            # ~25 min on 2 cores

Results: benchmarks/results/inference.json and inference.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, sh, slimkit_cmd  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "inference"
FILES = {
    "FP32": (None, []),
    "FP16": (None, []),
    "Q8_0 (RTN, 8-bit sym g32)": ("rtn", ["--wbits", "8", "--group-size", "32", "--sym"]),
    "Q4_1 (slimkit GPTQ g32)": ("gptq", ["--wbits", "4", "--group-size", "32"]),
    "Q4_1 (RTN g32)": ("rtn", ["--wbits", "4", "--group-size", "32"]),
}


def bandwidth_gbs() -> float:
    import numpy as np

    a = np.ones(512 * 2**20 // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        dt = time.perf_counter() - t0
        best = max(best, 2 * a.nbytes / dt / 1e9)  # read + write
    return best


def finetuned_smollm2(out: Path, steps: int) -> Path:
    """SmolLM2-135M fine-tuned ``steps`` steps in fp32 on wiki-offline (off its Q4_1 grid), cached
    in ``out``."""
    if not (out / "report.json").is_file():
        sh(slimkit_cmd("train-lm", "--init", "smollm2-135m", "--steps", str(steps), "--lr", "2e-5",
                       "--min-lr", "2e-5", "--warmup-steps", "1", "--batch-size", "4", "--seq-len", "256",
                       "--eval-windows", "4", "--checkpoint-every", "1000", "--out", str(out), "--overwrite"))  # fmt: skip
    return out


def build(a) -> dict[str, Path]:
    base = finetuned_smollm2(CACHE / "smollm2-ft", a.ft_steps)
    files = {}
    for name, (method, flags) in FILES.items():
        tag = name.split(" ")[0] + ("-gptq" if "GPTQ" in name else "")
        out = CACHE / f"{tag}.gguf"
        if not out.is_file():
            if method is None:  # unquantized: the writer with no quantized layers
                code = (
                    "import sys; from pathlib import Path; from slimkit.llm.models import load_model; "
                    "from slimkit.export.base import ExportConfig, QuantizedModel; "
                    "from slimkit.export.gguf_format import GGUFExporter; "
                    f"m, t = load_model({str(base)!r}); "
                    f"qm = QuantizedModel(Path({str(base)!r}), m, t, {{'config': {{}}}}, {{}}, {{}}, {{'model': {str(base)!r}}}); "
                    f"GGUFExporter().write(qm, ExportConfig(format='gguf', dtype={('float32' if name == 'FP32' else 'float16')!r}), Path({str(out)!r}))"
                )  # fmt: skip
                sh([sys.executable, "-c", code])
            else:
                run = CACHE / f"run-{tag}"
                sh(slimkit_cmd("quantize", str(base), "--method", method, *flags, "--calib", "wiki-offline",
                               "--n-calib", "32", "--calib-seq-len", "512", "--out", str(run), "--overwrite"))  # fmt: skip
                sh(slimkit_cmd("export", str(run), "--format", "gguf", "--out", str(out), "--verify",
                               "--gguf-pre", "smollm", "--overwrite"))  # fmt: skip
        files[name] = out
    return files


def speed(files: dict[str, Path], a) -> dict[str, dict]:
    from llama_cpp import Llama

    from slimkit.export.runtime import _probe_llama_cpp

    for f in files.values():
        _probe_llama_cpp(f)
    llms = {k: Llama(model_path=str(f), n_ctx=a.prompt + a.new + 8, n_threads=2, n_batch=512, verbose=False)
            for k, f in files.items()}  # fmt: skip
    text = (
        "The history of the city begins in the early middle ages, when a market grew by the river. "
        * 80
    ).encode()
    best = {k: {"prefill": 0.0, "decode": 0.0} for k in files}
    for _ in range(a.repeats):
        for k, llm in llms.items():
            toks = llm.tokenize(text)[: a.prompt]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks)
            t1 = time.perf_counter()
            for _ in range(a.new):
                llm.eval([llm.sample(temp=0.0)])
            t2 = time.perf_counter()
            best[k]["prefill"] = max(best[k]["prefill"], len(toks) / (t1 - t0))
            best[k]["decode"] = max(best[k]["decode"], a.new / (t2 - t1))
    return best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ft-steps", type=int, default=30)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--results", default=str(RESULTS / "inference.json"))
    a = p.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    files = build(a)
    res = {"bandwidth_gbs": bandwidth_gbs(), "files": {}}
    sp = speed(files, a)
    for name, f in files.items():
        j = CACHE / f"eval-{f.stem}.json"
        if not j.is_file():
            sh(slimkit_cmd("eval", str(f), "--ppl", "wiki-offline", "--seq-len", "512", "--max-windows",
                           str(a.eval_windows), "--json", str(j)))  # fmt: skip
        ppl = json.loads(j.read_text())["results"]["wiki-offline"]["ppl"]
        size = f.stat().st_size
        res["files"][name] = {"size_mb": size / 1e6, "ppl": ppl, **sp[name],
                              "decode_bound": res["bandwidth_gbs"] * 1e9 / size}  # fmt: skip
    Path(a.results).write_text(json.dumps(res, indent=1) + "\n")
    f16 = res["files"]["FP16"]["decode"]
    lines = [
        "# SmolLM2-135M in llama.cpp: FP32, FP16, Q8_0 and Q4_1 (slimkit GPTQ vs RTN)",
        "",
        f"Model: SmolLM2-135M fine-tuned {a.ft_steps} steps in fp32 on wiki-offline (off the embedded Q4_1 grid). "
        f"llama.cpp through llama-cpp-python, 2 threads, prefill of a {a.prompt}-token prompt, decode of {a.new} "
        f"tokens (batch 1), files alternated, best of {a.repeats}. Perplexity: first {a.eval_windows} windows of "
        "512 tokens of the wiki-offline test split, on the GGUF as transformers reads it. Decode bound = measured "
        f"memory bandwidth ({res['bandwidth_gbs']:.1f} GB/s, numpy copy) / bytes per token (the whole file).",
        "",
        f"Command: `python benchmarks/inference.py {' '.join(sys.argv[1:])}`".rstrip(),
        machine_line(),
        "",
        "| file | size MB | prefill tok/s | decode tok/s | decode vs FP16 | decode bound tok/s | wiki-offline ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["files"].items():
        lines.append(f"| {name} | {r['size_mb']:.1f} | {r['prefill']:.0f} | {r['decode']:.1f} | "
                     f"{r['decode'] / f16:.2f} | {r['decode_bound']:.0f} | {r['ppl']:.3f} |")  # fmt: skip
    Path(a.results).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
