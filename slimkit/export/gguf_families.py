"""What llama.cpp needs to run each decoder family from a GGUF file, beyond the tensors.

One entry per transformers model type: the llama.cpp architecture (whose tensor names come from
the ``gguf`` package's map), whether the q / k rows are permuted to GGML's rotary layout, the
offset stored in the RMSNorm weights, the architecture's metadata, and what llama.cpp cannot run
(a model that needs it is refused). The facts follow llama.cpp's own converter
(``convert_hf_to_gguf.py``) and its model loaders:

- Llama / Mistral (``llama``): llama.cpp rotates pairs of adjacent dimensions, Hugging Face
  rotates the two halves of each head, so the q / k rows are permuted (the converter's
  ``permute``); every other family here uses the half-rotation (NEOX) itself, rows unmoved.
- Qwen2 (``qwen2``): q / k / v biases, written as ``attn_q.bias`` etc.
- Qwen3 (``qwen3``): per-head RMSNorms of q and k (``attn_q_norm`` / ``attn_k_norm``); the head
  size is its own setting (``attention.key_length``), not hidden / heads.
- Gemma-3 (``gemma3``): RMSNorm computes x (1 + w), and the converter stores 1 + w (all six
  norms of a block: attention in / out, feed-forward in / out, q, k; and the final one);
  llama.cpp scales the embedding by sqrt(hidden) itself and applies GELU (tanh) gating.
  Sliding-window layers: window size, a period (every p-th layer is full attention, the last of
  each period: ``attention.sliding_window_pattern``) and their own rotary base
  (``rope.freq_base_swa``). llama.cpp derives the attention scale from the head size
  (1/sqrt(head_dim); 1/sqrt(hidden / heads) for the 62-layer 27B) rather than reading
  ``query_pre_attn_scalar``, and applies no logit soft-capping with sliding windows.
- Phi-3 (``phi3``): the fused ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv`` and a
  ``ffn_up`` of twice the width whose first half is the gate), with the original context length
  of its rotary settings and the rotary dimension count. LongRoPE (Phi-3-128k, Phi-3.5): the
  short and long frequency factors as the tensors ``rope_factors_short`` / ``rope_factors_long``
  and the attention factor (``rope.scaling.attn_factor``). llama.cpp picks the long factors when
  its context window exceeds the original one, transformers when the sequence does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit")


def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def rope_params(c, layer_type: str | None = None) -> dict:
    """The rotary settings of ``c`` (transformers' ``rope_parameters``; per layer type where the
    family keeps one set per attention type, as Gemma-3 does)."""
    p = dict(getattr(c, "rope_parameters", None) or {})
    if layer_type is not None and layer_type in p:
        return dict(p[layer_type])
    if "full_attention" in p:
        return dict(p["full_attention"])
    p.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    return p


def swa_period(layer_types: list[str]) -> int | None:
    """llama.cpp's sliding-window period p: layer i is full attention iff i % p == p - 1 (p = 1:
    every layer full, 0: none); None when the layer types follow no such period."""
    full = [t == "full_attention" for t in layer_types]
    if not any(full):
        return 0
    for p in range(1, len(full) + 1):
        if all(f == (i % p == p - 1) for i, f in enumerate(full)):
            return p
    return None


@dataclass(frozen=True)
class GGUFFamily:
    """How one transformers model type is written for llama.cpp."""

    arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool  # llama.cpp's adjacent-pair rotary layout (Llama): q / k rows permuted
    norm_offset: float  # added to every ``*norm.weight`` (Gemma stores its x (1 + w) as 1 + w)
    metadata: Callable  # (writer, config) -> None: the architecture's own keys
    missing: Callable  # config -> what llama.cpp cannot run for this model, or None
    tensors: Callable = field(default=lambda c: {})  # config -> extra GGUF tensors (name: array)

    @property
    def model_arch(self):
        import gguf

        return getattr(gguf.MODEL_ARCH, self.arch)


def _rope_missing(c, allowed=("default",), layer_type: str | None = None) -> str | None:
    kind = rope_params(c, layer_type).get("rope_type") or "default"
    if kind not in allowed:
        return (
            f"its rotary scaling {kind!r} (llama.cpp needs rope-factor tensors or scaling keys "
            "that slimkit does not write)"
        )
    return None


def _no_missing(c) -> str | None:
    return _rope_missing(c)


def _qwen_missing(c) -> str | None:
    if getattr(c, "use_sliding_window", False):
        return "sliding-window attention (llama.cpp's qwen2 / qwen3 attend to the whole context)"
    return _rope_missing(c)


def _gemma3_missing(c) -> str | None:
    if not getattr(c, "sliding_window", None):
        return "no sliding window (llama.cpp's gemma3 without one soft-caps the logits)"
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None):
            return f"{key} (llama.cpp's gemma3 applies no logit soft-capping with sliding windows)"
    hd, scalar = head_dim(c), getattr(c, "query_pre_attn_scalar", None)
    want = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else hd
    if scalar is not None and scalar != want:
        return (
            f"query_pre_attn_scalar {scalar} (llama.cpp scales gemma3 attention by 1/sqrt({want}), "
            "from the head size, and reads no key for it)"
        )
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    if swa_period(types) is None:
        return (
            f"its layer types {types} (llama.cpp takes a period: every p-th layer full attention)"
        )
    return _rope_missing(c, ("default", "linear"), "full_attention") or _rope_missing(
        c, ("default",), "sliding_attention"
    )


def _common(w, c) -> None:
    hd = head_dim(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_key_length(hd)
    w.add_value_length(hd)


def _llama(w, c) -> None:
    _common(w, c)
    w.add_rope_freq_base(float(rope_params(c)["rope_theta"]))
    w.add_rope_dimension_count(head_dim(c))


def _qwen(w, c) -> None:
    _common(w, c)
    w.add_rope_freq_base(float(rope_params(c)["rope_theta"]))


def _phi3(w, c) -> None:
    _common(w, c)
    p = rope_params(c)
    w.add_rope_freq_base(float(p["rope_theta"]))
    orig = p.get("original_max_position_embeddings") or getattr(
        c, "original_max_position_embeddings", c.max_position_embeddings
    )
    w.add_rope_scaling_orig_ctx_len(int(orig))
    rot = p.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0
    w.add_rope_dimension_count(int(rot * c.hidden_size) // c.num_attention_heads)
    if p.get("rope_type") == "longrope":
        w.add_rope_scaling_attn_factors(_longrope_attention_factor(c, p))
    window = getattr(c, "sliding_window", None) or 0
    if window:
        log.warning(
            "GGUF: llama.cpp runs phi3 without its %d-token sliding window (full attention); "
            "outputs differ from transformers beyond that length",
            window,
        )
    w.add_sliding_window(int(window))


def _longrope_attention_factor(c, p: dict) -> float:
    """transformers' LongRoPE cos / sin scale: the given one, else sqrt(1 + ln s / ln L0) with s
    the extension factor (``factor``, else max / original positions) and L0 the original length."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    orig = p["original_max_position_embeddings"]
    s = p.get("factor") or c.max_position_embeddings / orig
    return math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0


def _phi3_tensors(c) -> dict:
    p = rope_params(c)
    if p.get("rope_type") != "longrope":
        return {}
    return {
        "rope_factors_long.weight": np.asarray(p["long_factor"], dtype=np.float32),
        "rope_factors_short.weight": np.asarray(p["short_factor"], dtype=np.float32),
    }


def _gemma3(w, c) -> None:
    import gguf

    _common(w, c)
    full = rope_params(c, "full_attention")
    w.add_rope_freq_base(float(full["rope_theta"]))
    if (full.get("rope_type") or "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    w.add_sliding_window(int(getattr(c, "sliding_window", None) or 0))
    w.add_sliding_window_pattern(swa_period(types))
    w.add_rope_freq_base_swa(float(rope_params(c, "sliding_attention")["rope_theta"]))


_LLAMA = GGUFFamily("LLAMA", True, 0.0, _llama, _no_missing)
FAMILIES: dict[str, GGUFFamily] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": GGUFFamily("QWEN2", False, 0.0, _qwen, _qwen_missing),
    "qwen3": GGUFFamily("QWEN3", False, 0.0, _qwen, _qwen_missing),
    "gemma3_text": GGUFFamily("GEMMA3", False, 1.0, _gemma3, _gemma3_missing),
    "phi3": GGUFFamily(
        "PHI3",
        False,
        0.0,
        _phi3,
        lambda c: _rope_missing(c, ("default", "longrope")),
        _phi3_tensors,
    ),
}


def family_for(config) -> GGUFFamily:
    """The family of a transformers config, or SlimkitError naming what llama.cpp lacks."""
    mt = config.model_type
    fam = FAMILIES.get(mt)
    if fam is None:
        raise SlimkitError(
            f"GGUF export writes the model types {', '.join(FAMILIES)}; this model is {mt!r} "
            "(no llama.cpp tensor map and metadata written for it here). Use --format "
            "compressed-tensors or gptq."
        )
    why = fam.missing(config)
    if why:
        raise SlimkitError(
            f"GGUF export cannot write this {mt} model for llama.cpp: {why}. Use --format "
            "compressed-tensors or gptq."
        )
    return fam
