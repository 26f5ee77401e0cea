"""Run exported models: ``slimkit generate`` and ``slimkit bench``.

On the CPU, PyTorch has no int4 kernel that beats fp32 on AVX2 machines, so compressed-tensors
and GPTQ exports are dequantized at load for generation (and say so); speed is measured only where
it is real: llama.cpp (llama-cpp-python, optional) running a GGUF export beside an F16 GGUF of the
same model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit")


def describe(path: str | Path) -> str:
    p = Path(path)
    if p.suffix == ".gguf":
        return "gguf"
    cfg = p / "config.json"
    if cfg.is_file():
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
        return {"compressed-tensors": "compressed-tensors", "gptq": "gptq"}.get(
            q.get("quant_method", ""), "transformers"
        )
    return "transformers"


def load_for_generation(path: str | Path):
    """(model, tokenizer, how) for an export, a slimkit run or any model directory / name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, p = describe(path), Path(path)
    if kind == "gguf":
        if not p.is_file():
            raise SlimkitError(f"{p} does not exist")
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, dtype=torch.float32
        )
        how = (
            "GGUF dequantized to fp32 at load by transformers (for llama.cpp speed: slimkit bench)"
        )
    elif kind == "compressed-tensors":
        from slimkit.export.compressed_tensors import load_ct

        tok = AutoTokenizer.from_pretrained(p)
        model = load_ct(p)
        how = "compressed-tensors dequantized to fp32 at load (no fast int4 CPU kernel in PyTorch)"
    elif kind == "gptq":
        from slimkit.export.gptq import load_gptq

        tok = AutoTokenizer.from_pretrained(p)
        model = load_gptq(p)
        how = "GPTQ dequantized to fp32 at load (no fast int4 CPU kernel in PyTorch)"
    else:
        from slimkit.quant.api import load_saved

        model, tok, meta = load_saved(str(path))
        how = "slimkit fake-quant run (fp32)" if meta else "unquantized model"
    return model.eval(), tok, how


@dataclass
class GenerateConfig:
    """Options of ``slimkit generate`` (keyword arguments of :func:`generate`)."""

    max_new_tokens: int = field(default=32, metadata={"help": "tokens to generate"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SlimkitError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")


@dataclass
class BenchConfig:
    """Options of ``slimkit bench`` (keyword arguments of :func:`bench_gguf`)."""

    prompt_tokens: int = field(default=128, metadata={"help": "prompt length (prefill)"})
    new_tokens: int = field(default=64, metadata={"help": "tokens decoded"})
    threads: int = field(
        default=0,
        metadata={"help": "llama.cpp threads (0 = the cores not already busy: CPU count minus "
                          "the load average, at least 1)"},
    )  # fmt: skip

    against: str = field(
        default="",
        metadata={"help": "llama.cpp:FTYPE (e.g. llama.cpp:Q3_K_M): also quantize the F16 GGUF of "
                          "the same model with llama.cpp's own quantizer and compare size, speed "
                          "and perplexity side by side"},
    )  # fmt: skip
    base: str = field(
        default="",
        metadata={"help": "the model the file was quantized from (model id or directory; default: "
                          "the one the file's slimkit metadata names)"},
    )  # fmt: skip
    ppl: str = field(
        default="wiki-offline",
        metadata={"help": "with --against: comma-separated corpora whose test windows give the "
                          "perplexity (llama.cpp's logits; empty = none)"},
    )  # fmt: skip
    max_windows: int = field(
        default=10, metadata={"help": "with --against: test windows per corpus (0 = all)"}
    )
    seq_len: int = field(default=512, metadata={"help": "with --against: perplexity window length"})

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise SlimkitError(f"threads must be >= 0 (got {self.threads})")
        if self.against and not self.against.startswith("llama.cpp:"):
            raise SlimkitError(
                f"--against takes llama.cpp:FTYPE, e.g. llama.cpp:Q3_K_M (got {self.against!r})"
            )
        if self.max_windows < 0 or self.seq_len < 2:
            raise SlimkitError("max_windows must be >= 0 and seq_len >= 2")
        for k in ("prompt_tokens", "new_tokens"):
            if getattr(self, k) < 1:
                raise SlimkitError(f"{k} must be >= 1 (got {getattr(self, k)})")


def generate(path: str | Path, prompt: str, max_new_tokens: int = 32) -> dict:
    """Greedy continuation of ``prompt``."""
    model, tok, how = load_for_generation(path)
    ids = tok(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1] :]
    return {
        "text": tok.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "seconds": dt,
        "how": how,
    }


def write_f16_gguf(gguf_path: Path | None, out: Path, base: str = "") -> Path:
    """An F16 GGUF of the model a slimkit GGUF was exported from (the speed baseline), or of
    the model ``base`` names (a model id or directory)."""
    import gguf

    from slimkit.export.base import ExportConfig, QuantizedModel
    from slimkit.export.gguf_format import GGUFExporter
    from slimkit.llm.models import load_model

    if not base:
        field = gguf.GGUFReader(str(gguf_path)).fields.get("slimkit.base_model")
        base = field.contents() if field is not None else ""
    if not base:
        raise SlimkitError(
            f"{gguf_path} does not name the model it was made from: pass --baseline F16.gguf"
        )
    model, tok = load_model(base)
    qm = QuantizedModel(Path(base), model, tok, {"config": {}}, {}, {}, {"model": base})
    GGUFExporter().write(qm, ExportConfig(format="gguf"), out)
    return out


# portable AVX2 build flags of llama.cpp (the Makefile's LLAMACPP_CMAKE)
PORTABLE_CMAKE = (
    "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
)


def default_threads() -> int:
    """llama.cpp threads that this machine can give now without oversubscription: the cores
    not already busy (CPU count minus the 1-minute load average, rounded), at least 1.
    Oversubscribed threads make llama.cpp's timings swing by an order of magnitude."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, (cores or 1) - busy)


def _llama_cpp():
    """The llama_cpp module, or a clear message naming the portable build."""
    try:
        import llama_cpp
    except ImportError:
        raise SlimkitError(
            "slimkit bench runs GGUF files through llama.cpp, which is not installed: run "
            "`make llamacpp` in a slimkit checkout, or pip install llama-cpp-python==0.3.36 with "
            f'CMAKE_ARGS="{PORTABLE_CMAKE}" (it compiles llama.cpp, about 10 minutes on 2 cores; '
            "the flags avoid instructions a virtual machine may report but not allow)"
        ) from None
    return llama_cpp


def _probe_llama_cpp(path: Path) -> None:
    """Load and evaluate a few tokens in a child process, so that a llama.cpp build that dies on
    this CPU (e.g. AMX / AVX-512 code in a VM that does not allow it) gives a clear message."""
    import signal
    import subprocess
    import sys

    code = (
        f"from llama_cpp import Llama; m = Llama(model_path={str(path)!r}, n_ctx=64, n_threads=1, "
        "verbose=False); m.eval(m.tokenize(b'The city'))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode < 0:
        name = signal.Signals(-r.returncode).name
        raise SlimkitError(
            f"llama.cpp died with {name} on {path.name}: this llama-cpp-python build uses CPU "
            f'instructions this machine cannot run. Rebuild it for this CPU, e.g. CMAKE_ARGS="'
            f'{PORTABLE_CMAKE}" pip install --force-reinstall --no-cache-dir llama-cpp-python'
            " (what `make llamacpp` runs)"
        )
    if r.returncode:
        raise SlimkitError(f"llama.cpp could not run {path}: {r.stderr.strip()[-500:]}")


def bench_gguf(
    path: str | Path,
    baseline: str | Path | None = None,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    threads: int = 0,
    repeats: int = 3,
    base: str = "",
) -> dict:
    """Size, prefill and decode tokens/s of a GGUF and of its F16 baseline through llama.cpp,
    alternated in one process (best of ``repeats``)."""
    Llama = _llama_cpp().Llama
    p = Path(path)
    if baseline is None:
        baseline = p.with_name(p.stem + ".f16-baseline.gguf")
        if not Path(baseline).is_file():
            log.info("writing the F16 baseline %s", baseline)
            write_f16_gguf(p, Path(baseline), base=base_model_of(p, base))
    files = {"model": p, "f16": Path(baseline)}
    for f in files.values():
        _probe_llama_cpp(f)
    if not threads:
        threads = default_threads()
        log.info("llama.cpp threads: %d (cores not busy now; --threads N to choose)", threads)
    llms = {
        k: Llama(
            model_path=str(f),
            n_ctx=prompt_tokens + new_tokens + 8,
            n_threads=threads,
            verbose=False,
        )
        for k, f in files.items()
    }
    tokens = llms["model"].tokenize(
        ("The history of the city begins in the early middle ages. " * 64).encode()
    )[:prompt_tokens]
    best = alternated_speed(llms, tokens, new_tokens, repeats)
    res = {
        "engine": f"llama.cpp (llama-cpp-python), CPU, {threads} threads",
        "prompt_tokens": len(tokens),
        "new_tokens": new_tokens,
        "files": {k: str(f) for k, f in files.items()},
        "size_mb": {k: f.stat().st_size / 1e6 for k, f in files.items()},
        **{k: best[k] for k in files},
    }
    res["ratios_vs_f16"] = {
        "size": res["size_mb"]["model"] / res["size_mb"]["f16"],
        "prefill": best["model"]["prefill_tok_s"] / best["f16"]["prefill_tok_s"],
        "decode": best["model"]["decode_tok_s"] / best["f16"]["decode_tok_s"],
    }
    return res


def alternated_speed(llms: dict, tokens: list[int], new_tokens: int, repeats: int) -> dict:
    """Prefill and greedy-decode tokens/s of each loaded llama.cpp model, the models taking
    turns within every repeat (so a burst of load on a shared machine hits all of them), best of
    ``repeats``: {name: {"prefill_tok_s", "decode_tok_s"}}."""
    best = {k: {"prefill_tok_s": 0.0, "decode_tok_s": 0.0} for k in llms}
    for _ in range(repeats):
        for k, llm in llms.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([llm.sample(temp=0.0)])
            t2 = time.perf_counter()
            b = best[k]
            b["prefill_tok_s"] = max(b["prefill_tok_s"], len(tokens) / (t1 - t0))
            b["decode_tok_s"] = max(b["decode_tok_s"], new_tokens / (t2 - t1))
    return best


def llama_perplexity(path: str | Path, windows, threads: int = 1) -> float:
    """Perplexity of a GGUF in llama.cpp over ``windows`` (int array [n, L]): every window
    evaluated from an empty cache, each token scored from llama.cpp's own logits."""
    import numpy as np

    llama_cpp = _llama_cpp()
    windows = np.asarray(windows)
    n, length = windows.shape
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=length, n_batch=length, n_threads=threads,
                          logits_all=True, verbose=False)  # fmt: skip
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[:length], dtype=np.float64)[:-1]
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll -= logp[np.arange(length - 1), w[1:]].sum()
        count += length - 1
    import math

    return math.exp(nll / count)


def llama_ftype(name: str) -> int:
    """llama.cpp's ``LLAMA_FTYPE_MOSTLY_<NAME>`` (Q4_K_M, Q3_K_M, Q2_K, Q8_0, ...)."""
    llama_cpp = _llama_cpp()
    key = f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    if not hasattr(llama_cpp, key):
        known = sorted(k[len("LLAMA_FTYPE_MOSTLY_") :] for k in dir(llama_cpp)
                       if k.startswith("LLAMA_FTYPE_MOSTLY_"))  # fmt: skip
        raise SlimkitError(
            f"unknown llama.cpp file type {name!r}; choose one of {', '.join(known)}"
        )
    return int(getattr(llama_cpp, key))


def gguf_file_type(path: str | Path) -> int | None:
    """``general.file_type`` of a GGUF (llama.cpp's LLAMA_FTYPE number), None when absent."""
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    return None if f is None else int(f.parts[-1][0])


def llama_quantize(f16: str | Path, out: str | Path, ftype: str, threads: int = 1) -> Path:
    """llama.cpp's own quantization (``llama_model_quantize``, its default parameters: no
    importance matrix) of the GGUF ``f16`` to file type ``ftype``, written to ``out`` through a
    temporary file; an existing ``out`` of that file type is kept."""
    llama_cpp, out = _llama_cpp(), Path(out)
    want = llama_ftype(ftype)
    if out.is_file() and gguf_file_type(out) == want:
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")  # two processes may race here
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = want
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise SlimkitError(f"llama.cpp could not quantize {f16} to {ftype} (return code {rc})")
    tmp.replace(out)
    return out


def base_model_of(path: str | Path, base: str = "") -> str:
    """The model a slimkit GGUF was quantized from: ``base`` if given, else the model (a
    directory that still exists, or a model id / registered name) its slimkit metadata names."""
    import gguf

    if base:
        return base
    fields = gguf.GGUFReader(str(path)).fields
    names = [fields[k].contents() for k in ("slimkit.base_model", "slimkit.base_model_id")
             if k in fields]  # fmt: skip
    from slimkit.llm.models import resolve_model_path

    for name in filter(None, names):
        try:
            resolve_model_path(name)
            return name
        except Exception:  # noqa: BLE001 - a moved directory or an id not cached here
            continue
    if names:
        raise SlimkitError(
            f"{path} was made from {' / '.join(filter(None, names))}, which is not found here: "
            "pass --base MODEL (the model it was quantized from)"
        )
    raise SlimkitError(
        f"{path} does not say which model it was made from (no slimkit metadata): pass --base "
        "MODEL (the model it was quantized from)"
    )


def bench_against(path: str | Path, cfg: BenchConfig, baseline: str | Path | None = None) -> dict:
    """A slimkit GGUF beside llama.cpp's own quantization of the same model (``cfg.against`` =
    ``llama.cpp:FTYPE``): the F16 GGUF of the base model (``baseline``, or written by slimkit
    from ``cfg.base`` / the file's metadata) quantized by ``llama_model_quantize``, then both
    files measured in llama.cpp in one run: size, prefill / decode tokens/s (alternated, best of
    3) and perplexity over the first ``cfg.max_windows`` test windows of each ``cfg.ppl`` corpus
    (the same token ids for both files).

    Example:
        >>> r = bench_against("m-q3_k.gguf", BenchConfig(against="llama.cpp:Q3_K_M"))  # doctest: +SKIP
        >>> r["ratio"]["size_mb"] <= 1.0  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    from slimkit.data.text import eval_windows

    Llama = _llama_cpp().Llama
    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"{p} does not exist")
    ftype = cfg.against.split(":", 1)[1].upper()
    want = llama_ftype(ftype)
    if baseline is None:
        baseline = p.with_name(p.stem + ".f16-baseline.gguf")
        if not Path(baseline).is_file():
            base = base_model_of(p, cfg.base)
            log.info("writing the F16 GGUF of %s to %s", base, baseline)
            tmp = Path(baseline).with_name(f"{Path(baseline).name}.{os.getpid()}.partial")
            write_f16_gguf(None, tmp, base=base)
            tmp.replace(baseline)
    ref = llama_quantize(baseline, p.with_name(f"{p.stem}.llama.cpp-{ftype.lower()}.gguf"), ftype)
    files = {"slimkit": p, f"llama.cpp {ftype}": ref}
    for f in files.values():
        _probe_llama_cpp(f)
    threads = cfg.threads or default_threads()
    res: dict = {
        "engine": f"llama.cpp (llama-cpp-python), CPU, {threads} threads",
        "against": cfg.against,
        "files": {k: str(f) for k, f in files.items()},
        "file_types": {k: gguf_file_type(f) for k, f in files.items()},
        "requested_file_type": want,
        "metrics": {"size_mb": {k: f.stat().st_size / 1e6 for k, f in files.items()}},
    }
    llms = {k: Llama(model_path=str(f), n_ctx=cfg.prompt_tokens + cfg.new_tokens + 8,
                     n_threads=threads, verbose=False) for k, f in files.items()}  # fmt: skip
    tokens = llms["slimkit"].tokenize(
        ("The history of the city begins in the early middle ages. " * 64).encode()
    )[: cfg.prompt_tokens]
    speed = alternated_speed(llms, tokens, cfg.new_tokens, 3)
    del llms
    for m in ("prefill_tok_s", "decode_tok_s"):
        res["metrics"][m] = {k: speed[k][m] for k in files}
    corpora = [c for c in cfg.ppl.split(",") if c]
    if corpora:
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        for c in corpora:
            w = eval_windows(tok, c, cfg.seq_len, max_windows=cfg.max_windows or None)
            res["metrics"][f"ppl {c}"] = {k: llama_perplexity(f, w.numpy(), threads)
                                           for k, f in files.items()}  # fmt: skip
        res["ppl_protocol"] = (
            f"llama.cpp's logits over the first {cfg.max_windows or 'all'} windows of "
            f"{cfg.seq_len} tokens of each test split"
        )
    res["prompt_tokens"], res["new_tokens"] = len(tokens), cfg.new_tokens
    other = f"llama.cpp {ftype}"
    res["ratio"] = {m: v["slimkit"] / v[other] for m, v in res["metrics"].items()}
    return res


def against_table(r: dict) -> str:
    """The side-by-side markdown table of :func:`bench_against`: one row per metric."""
    a, b = r["files"]
    lines = [f"| metric | slimkit | {b} | slimkit / {b.split()[0]} |", "|---|---|---|---|"]
    for m, v in r["metrics"].items():
        fmt = ".3f" if m.startswith("ppl") else ".1f"
        lines.append(f"| {m} | {v[a]:{fmt}} | {v[b]:{fmt}} | {r['ratio'][m]:.3f} |")
    return "\n".join(lines)
