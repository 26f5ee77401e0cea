"""Run exported models: ``slimkit generate`` and ``slimkit bench``.

On the CPU, PyTorch has no int4 kernel that beats fp32 on AVX2 machines, so compressed-tensors
and GPTQ exports are dequantized at load for generation (and say so); speed is measured only where
it is real: llama.cpp (llama-cpp-python, optional) running a GGUF export beside an F16 GGUF of the
same model.
"""

from __future__ import annotations

import json
import logging
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

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise SlimkitError(f"threads must be >= 0 (got {self.threads})")
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
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, (cores or 1) - busy)


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
) -> dict:
    """Size, prefill and decode tokens/s of a GGUF and of its F16 baseline through llama.cpp,
    alternated in one process (best of ``repeats``)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SlimkitError(
            "slimkit bench runs GGUF files through llama.cpp, which is not installed: run "
            "`make llamacpp` in a slimkit checkout, or pip install llama-cpp-python==0.3.36 with "
            f'CMAKE_ARGS="{PORTABLE_CMAKE}" (it compiles llama.cpp, about 10 minutes on 2 cores; '
            "the flags avoid instructions a virtual machine may report but not allow)"
        ) from None
    p = Path(path)
    if baseline is None:
        baseline = p.with_name(p.stem + ".f16-baseline.gguf")
        if not Path(baseline).is_file():
            log.info("writing the F16 baseline %s", baseline)
            write_f16_gguf(p, Path(baseline))
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
    best = {k: {"prefill_tok_s": 0.0, "decode_tok_s": 0.0} for k in files}
    for _ in range(repeats):
        for k, llm in llms.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                tok = llm.sample(temp=0.0)
                llm.eval([tok])
            t2 = time.perf_counter()
            b = best[k]
            b["prefill_tok_s"] = max(b["prefill_tok_s"], len(tokens) / (t1 - t0))
            b["decode_tok_s"] = max(b["decode_tok_s"], new_tokens / (t2 - t1))
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
