"""slimkit's GGUF files on llama.cpp's K-quant mixes beside llama.cpp's own quantization of the
same F16 file, every file measured in llama.cpp (llama-cpp-python, `make llamacpp`).

Two models whose weights lie on no 4-bit grid:
- ``smollm2-ft``: SmolLM2-135M fine-tuned briefly in fp32 on wiki-offline train (the model of
  benchmarks/inference.py, with --ft-steps steps); widths 576 / 1536, so llama.cpp's mixes send
  most tensors to the legacy 32-blocks (mixed types);
- ``tiny256``: a Llama that slimkit trains itself (`slimkit train-lm --init` from a random
  4-layer Llama of width 256, FFN 768, --tiny-steps steps on wiki-offline train): every width a
  multiple of 256, so every linear is a genuine K-quant.

For each file type (Q4_K_M, Q3_K_M, Q2_K): llama.cpp's `llama_model_quantize` of the model's
F16 GGUF (its own quantizer, default parameters, no importance matrix) against `slimkit
quantize --grid llama.cpp:FTYPE` with RTN, GPTQ and CBQ, exported by `slimkit export --format
gguf`. Per file: size; perplexity from llama.cpp's logits over the first --eval-windows windows
of 512 tokens of the wiki-offline and bbc-news test splits (the same token ids for every file);
prefill (128-token prompt) and greedy decode (64 tokens) tokens/s, all files of a model
alternated in one measuring run, best of 3, one thread.

Hyper-parameters are slimkit's documented defaults, nothing chosen on the reported windows:
GPTQ's and CBQ's defaults, CBQ's ``--preset`` (calibration size and epochs: --cbq-preset, ``fast``
for tiny256, ``demo`` for smollm2-ft to fit the CPU budget), GPTQ on the same calibration windows
(wiki-offline train, seed 0).

    OMP_NUM_THREADS=1 python benchmarks/gguf_vs_llamacpp.py

Resumable: quantized files are cached in benchmarks/.cache/gguf_vs_llamacpp/ and every finished
measurement in benchmarks/results/gguf_vs_llamacpp.json; a rerun does only what is missing.
Writes benchmarks/results/gguf_vs_llamacpp.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, sh, slimkit_cmd, slimkit_logged  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "gguf_vs_llamacpp"
JSON = RESULTS / "gguf_vs_llamacpp.json"
CORPORA = ("wiki-offline", "bbc-news")
FTYPES = ("Q4_K_M", "Q3_K_M", "Q2_K")
METHODS = ("rtn", "gptq", "cbq")
PRESET = {"tiny256": "fast", "smollm2-ft": "demo"}
DESCRIBE = {
    "tiny256": "Llama trained by slimkit (4 layers, width 256, FFN 768, 4 heads / 2 KV heads, "
    "tied 49,152 x 256 embedding, 15.7 M parameters): every linear a K-quant",
    "smollm2-ft": "SmolLM2-135M fine-tuned in fp32 (30 layers, widths 576 / 1536, tied "
    "embedding): llama.cpp's mixes fall back to Q4_0 / Q5_0 / Q5_1 / Q8_0 for most tensors",
}


def build_tiny(steps: int) -> Path:
    """A Llama trained by `slimkit train-lm` from a random init of width 256 (cached)."""
    out = CACHE / f"tiny256-{steps}steps"
    if (out / "report.json").is_file():
        return out
    init = CACHE / "tiny256-init"
    if not (init / "config.json").is_file():
        code = (
            "import torch; from transformers import LlamaConfig, LlamaForCausalLM; "
            "from slimkit.tinylm.train import load_tokenizer; "
            "tok = load_tokenizer('smollm2-135m'); torch.manual_seed(0); "
            "m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, "
            "intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, "
            "num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, "
            "bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, "
            "pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)); "
            f"m.save_pretrained({str(init)!r}); tok.save_pretrained({str(init)!r})"
        )
        sh([sys.executable, "-c", code])
    sh(slimkit_cmd("train-lm", "--init", str(init), "--steps", str(steps), "--batch-size", "4",
                   "--seq-len", "256", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "10",
                   "--eval-windows", "8", "--eval-every", "100000", "--checkpoint-every", "100000",
                   "--out", str(out), "--overwrite"))  # fmt: skip
    return out


def build_smollm2(steps: int) -> Path:
    from inference import finetuned_smollm2

    return finetuned_smollm2(CACHE / f"smollm2-ft{steps}", steps)


def _lock(path: Path) -> bool:
    """Take ``path`` as a lock (holding this pid); False while another live process holds it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(path.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):  # its holder died: take it over
            path.unlink(missing_ok=True)
            return _lock(path)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def quantize(base: Path, name: str, method: str, ftype: str, preset: str) -> tuple[Path, dict]:
    """slimkit quantize + export of one method on llama.cpp's mix of ``ftype`` (cached; two
    processes of this script share the work through a lock per file). Returns the file and the
    quantization's wall and CPU seconds."""
    import resource

    tag = f"{name}-{method}-{ftype.lower()}"
    out, run, lock = CACHE / f"{tag}.gguf", CACHE / f"run-{tag}", CACHE / f"{tag}.lock"
    timing = CACHE / f"{tag}.seconds.json"
    while not out.is_file():
        if not _lock(lock):
            time.sleep(10)  # the other process is making it
            continue
        try:
            flags = ["--method", method, "--grid", f"llama.cpp:{ftype.lower()}"]
            if method != "rtn":  # GPTQ takes CBQ's preset calibration (the same windows)
                flags += ["--preset", preset] if method == "cbq" else []
                n, length = {"fast": ("32", "512"), "demo": ("16", "256")}[preset]
                flags += ["--calib", "wiki-offline", "--n-calib", n, "--calib-seq-len", length]
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = slimkit_logged(["quantize", str(base), *flags, "--out", str(run), "--overwrite"],
                                  CACHE / f"{tag}.quantize.log", threads=1)  # fmt: skip
            ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime
            timing.write_text(json.dumps({"wall_s": round(wall), "cpu_s": round(cpu)}))
            slimkit_logged(["export", str(run), "--format", "gguf", "--out", str(out),
                            "--overwrite"], CACHE / f"{tag}.export.log", threads=1)  # fmt: skip
        finally:
            lock.unlink(missing_ok=True)
    return out, json.loads(timing.read_text()) if timing.is_file() else {}


def load_results() -> dict:
    res = json.loads(JSON.read_text()) if JSON.is_file() else None
    if isinstance(res, dict) and "rows" in res:
        return res
    return {"rows": {}, "speed": {}, "models": {}}


def save(res: dict, args) -> None:
    if args.build_only:  # the measuring process owns the results
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    # merge: another measuring process (another model) may have saved since this one started
    disk = load_results()
    mine = set(args.models.split(","))
    for part in ("rows", "speed", "models"):
        keep = {k: v for k, v in disk[part].items() if k.split("/")[0] not in mine}
        res[part] = {**keep, **{k: v for k, v in res[part].items() if k.split("/")[0] in mine}}
    res["command"] = "OMP_NUM_THREADS=1 python benchmarks/gguf_vs_llamacpp.py " + " ".join(
        sys.argv[1:]
    )
    res["machine"] = machine_line()
    tmp = JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(JSON)
    (RESULTS / "gguf_vs_llamacpp.md").write_text(markdown(res, args))


def markdown(res: dict, args) -> str:
    lines = [
        "# slimkit GGUF vs llama.cpp's own quantization, measured in llama.cpp",
        "",
        f"Commands: one per model, below. {res['machine']}",
        "",
        "llama.cpp: llama-cpp-python 0.3.36 (`make llamacpp`, portable AVX2 build), one thread. "
        "For each file type, llama.cpp's `llama_model_quantize` of the model's F16 GGUF (written "
        "by slimkit; default parameters, no importance matrix) against slimkit RTN / GPTQ / CBQ "
        "on the same per-tensor grids (`slimkit quantize --grid llama.cpp:FTYPE`, then `slimkit "
        "export --format gguf`). Perplexity: llama.cpp's logits over the first windows of 512 "
        "tokens of the wiki-offline and bbc-news test splits (how many: per model below; "
        "identical token ids for every file of a model). Speed: 128-token prompt (prefill) and 64 "
        "greedy tokens (decode), every file of a model alternated in one run, best of 3, one "
        "thread on a 2-core machine shared with other jobs: compare within a model's table, "
        "and with care. Hyper-parameters: slimkit's documented defaults (every grid fit by "
        "llama.cpp's own scale search, `--clip auto`; GPTQ: damp 0.01, "
        "act-order with static groups; CBQ: window 2, overlap 1, LoRA rounding from GPTQ's "
        "codes, CFP), CBQ's preset for the calibration size and epochs (named per model; GPTQ "
        "gets the same calibration windows of wiki-offline train, seed 0); nothing was chosen "
        "on the reported windows. One seed. Quantize CPU s: CPU seconds of the `slimkit "
        "quantize` process (wall time on this shared machine was 2-4x more); a second process of "
        "this script with `--build-only` may make some of the files meanwhile (the same "
        "commands; it writes no results).",
        "",
    ]
    for name, info in res["models"].items():
        lines += [f"## {name}: {DESCRIBE[name]}", "", f"Command: `{info.get('command', '')}`.",
                  "", info.get("note", ""), ""]  # fmt: skip
        lines += [
            "| type | file | size MB | wiki-offline ppl | bbc-news ppl | prefill tok/s | "
            "decode tok/s | quantize CPU s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        speed = res["speed"].get(name, {}).get("files", {})
        order = ["F16", *FTYPES], ["F16", "llama.cpp", *METHODS]
        rows = sorted(
            ((k, r) for k, r in res["rows"].items() if r["model"] == name),
            key=lambda kr: (order[0].index(kr[1]["type"]), order[1].index(kr[0].split("/")[-1])),
        )
        for key, r in rows:
            sp = speed.get(key, {})
            fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
            lines.append(
                f"| {r['type']} | {r['label']} | {r['size_mb']:.1f} | "
                f"{fmt(r.get('wiki-offline'), '.3f')} | {fmt(r.get('bbc-news'), '.3f')} | "
                f"{fmt(sp.get('prefill_tok_s'), '.0f')} | {fmt(sp.get('decode_tok_s'), '.1f')} | "
                f"{fmt(r.get('quantize', {}).get('cpu_s'), '.0f')} |"
            )
        missing = [f"{t} {m}" for t in FTYPES for m in ("llama.cpp", *METHODS)
                   if f"{name}/{t}/{m}" not in res["rows"]]  # fmt: skip
        if missing:
            lines += [
                "",
                f"Not measured in this run (the CPU budget ran out): {', '.join(missing)}.",
            ]
        if name not in res["speed"]:
            lines += ["", "No speed run for this model in this run (the CPU budget ran out)."]
        lines += [
            "",
            "Relative to llama.cpp's file of the same type (ratios; below 1 = smaller / "
            "lower perplexity than llama.cpp's):",
            "",
            "| type | method | size | wiki-offline ppl | bbc-news ppl |",
            "|---|---|---|---|---|",
        ]
        for key, r in rows:
            ref = res["rows"].get(f"{name}/{r['type']}/llama.cpp")
            if key.endswith(("/llama.cpp", "/F16")) or not ref:
                continue
            ratios = [r[m] / ref[m] for m in ("size_mb", *CORPORA)]
            lines.append(f"| {r['type']} | {key.split('/')[-1].upper()} | "
                         + " | ".join(f"{x:.3f}" for x in ratios) + " |")  # fmt: skip
        lines.append("")
    lines += res.get("closing", [])
    return "\n".join(lines) + "\n"


def run_model(name: str, args, res: dict) -> None:
    """Build, quantize and measure one model (everything cached / resumable)."""

    from slimkit.data.text import eval_windows
    from slimkit.export.runtime import (
        alternated_speed,
        gguf_file_type,
        llama_ftype,
        llama_perplexity,
        llama_quantize,
        write_f16_gguf,
    )
    from slimkit.tinylm.train import load_tokenizer

    t0 = time.time()
    base = build_tiny(args.tiny_steps) if name == "tiny256" else build_smollm2(args.ft_steps)
    report = json.loads((base / "report.json").read_text())
    info = res["models"].setdefault(name, {})
    if not args.build_only:
        info["command"] = "OMP_NUM_THREADS=1 python benchmarks/gguf_vs_llamacpp.py " + " ".join(
            sys.argv[1:]
        )
    info.update(base=str(base.relative_to(ROOT)), cbq_preset=PRESET[name],
                val_ppl=report.get("final_val_ppl"))  # fmt: skip
    if name == "tiny256":
        info["note"] = (
            f"Trained by `slimkit train-lm --init` ({args.tiny_steps} steps of 4 x 256 "
            f"tokens of wiki-offline train, lr 3e-3; validation ppl "
            f"{report.get('final_val_ppl', float('nan')):.1f}). CBQ preset `fast` (32 x 512 "
            "calibration tokens, 1 epoch). Perplexity over the first "
            f"{args.eval_windows} test windows of each corpus."
        )
    else:
        info["note"] = (
            f"Fine-tuned {args.ft_steps} steps (4 x 256 tokens, lr 2e-5) from the embedded "
            "SmolLM2-135M, which moves every weight off its Q4_1 grid. CBQ preset `demo` "
            "(16 x 256 calibration tokens, 1 epoch) and perplexity over the first "
            f"{args.smollm2_eval_windows} test windows of each corpus: the CPU budget of this run."
        )
    # cache files are named after the model as built (tiny256's training steps), so a rerun
    # with other steps never reuses another model's files or rows
    cname = base.name if name == "tiny256" else name
    f16 = CACHE / f"{cname}-f16.gguf"
    if not f16.is_file():
        tmp = f16.with_name(f"{f16.name}.{os.getpid()}.partial")
        write_f16_gguf(None, tmp, base=str(base))
        tmp.replace(f16)
    tok = load_tokenizer(str(base))
    n_windows = args.eval_windows if name == "tiny256" else args.smollm2_eval_windows
    info["eval_windows"] = n_windows
    windows = {c: eval_windows(tok, c, 512, max_windows=n_windows).numpy() for c in CORPORA}
    files = {}

    def perplexities(path: Path) -> dict:
        """{corpus: ppl} of a file, cached beside it (either process may compute it)."""
        cache, lock = path.with_suffix(f".ppl{n_windows}.json"), path.with_suffix(".ppl.lock")
        if cache.is_file() and cache.stat().st_mtime < path.stat().st_mtime:
            cache.unlink()  # measured on an earlier build of the file
        while not cache.is_file():
            if not _lock(lock):
                time.sleep(10)
                continue
            try:
                ppl = {c: round(llama_perplexity(path, windows[c], threads=1), 4) for c in CORPORA}
                cache.write_text(json.dumps(ppl))
            finally:
                lock.unlink(missing_ok=True)
        return json.loads(cache.read_text())

    def measure(key: str, label: str, ftype: str, path: Path, secs: dict | None = None) -> None:
        files[key] = path
        if args.build_only:  # perplexities after all files, last first (the other process
            return  # measures first to last)
        r = res["rows"].get(key)
        if (
            r
            and r.get("size_mb") == round(path.stat().st_size / 1e6, 3)
            and r.get("eval_windows") == n_windows  # every row of a table on the same windows
            and r.get("base") == info["base"]  # the same model as built now
            and r.get("mtime") == path.stat().st_mtime  # and the same file (not a rebuilt one)
            and all(r.get(c) for c in CORPORA)
        ):
            if secs and r.get("quantize") != secs:
                r["quantize"] = secs
                save(res, args)
            return
        r = {"model": name, "base": info["base"], "type": ftype, "label": label, "file": str(path.relative_to(ROOT)),
             "size_mb": round(path.stat().st_size / 1e6, 3), "file_type": gguf_file_type(path),
             "quantize": secs or {}, "eval_windows": n_windows, "mtime": path.stat().st_mtime,
             **perplexities(path)}  # fmt: skip
        res["rows"][key] = r
        print(r, flush=True)
        save(res, args)

    measure(f"{name}/F16", "F16 (slimkit's writer)", "F16", f16)
    for ftype in args.ftypes.split(","):
        own = llama_quantize(f16, CACHE / f"{cname}-llama-{ftype.lower()}.gguf", ftype)
        assert gguf_file_type(own) == llama_ftype(ftype)
        measure(f"{name}/{ftype}/llama.cpp", "llama.cpp's quantizer", ftype, own)
    for method in args.methods.split(","):  # cheap methods first: every type, then the next
        for ftype in args.ftypes.split(","):
            path, secs = quantize(base, cname, method, ftype, PRESET[name])
            label = f"slimkit {method.upper()}, same grids"
            measure(f"{name}/{ftype}/{method}", label, ftype, path, secs)
    if args.build_only:
        for path in reversed(list(files.values())):
            perplexities(path)
    if not args.skip_speed and not args.build_only:
        sp = res["speed"].get(name, {})
        mtimes = {k: f.stat().st_mtime for k, f in files.items()}
        if sp.get("mtimes") != mtimes:  # not measured on exactly these files
            from llama_cpp import Llama

            llms = {k: Llama(model_path=str(f), n_ctx=128 + 64 + 8, n_threads=1, verbose=False)
                    for k, f in files.items()}  # fmt: skip
            text = "The history of the city begins in the early middle ages. " * 64
            tokens = next(iter(llms.values())).tokenize(text.encode())[:128]
            res["speed"][name] = {"files": alternated_speed(llms, tokens, 64, 3), "mtimes": mtimes}
            del llms
            save(res, args)
    info["seconds"] = info.get("seconds", 0) + round(time.time() - t0)
    save(res, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny256,smollm2-ft")
    ap.add_argument("--ftypes", default=",".join(FTYPES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--eval-windows", type=int, default=10, help="test windows per corpus")
    ap.add_argument(
        "--smollm2-eval-windows",
        type=int,
        default=5,
        help="test windows per corpus for smollm2-ft (135 M: CPU budget)",
    )
    ap.add_argument("--ft-steps", type=int, default=10, help="fine-tuning steps of smollm2-ft")
    ap.add_argument("--tiny-steps", type=int, default=2000, help="training steps of tiny256")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--build-only",
        action="store_true",
        help="only make the files (a second process sharing the quantizations)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    res = load_results()
    for name in args.models.split(","):
        run_model(name, args, res)
    print(markdown(res, args))


if __name__ == "__main__":
    main()
