"""The tokenizer in a GGUF file's metadata, from the model's Hugging Face fast tokenizer
(``tokenizer.json``), in the two forms llama.cpp reads for decoder LMs:

- ``gpt2``: byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM): tokens, types and merges, with the
  pre-tokenizer's name (``tokenizer.ggml.pre``);
- ``llama``: SentencePiece-style BPE (Llama-2, Gemma, Phi-3, Mistral v0.1): pieces with "▁" for
  spaces, ``<0xXX>`` byte-fallback tokens, and per-piece scores that llama.cpp merges by (the
  highest-scoring adjacent pair first). ``tokenizer.json`` holds merges, not scores, so a piece's
  score is minus the rank of the first merge that makes it: llama.cpp then merges in the order
  Hugging Face's BPE does (for a vocabulary converted from SentencePiece the merges are sorted by
  piece score, so this is SentencePiece's own order). Byte tokens are typed BYTE, the unknown
  token UNKNOWN, special added tokens CONTROL; ``add_space_prefix`` follows the tokenizer
  (Llama-2's Metaspace prepends "▁", Gemma's does not).

Unigram vocabularies (T5-style SentencePiece) and other models are refused.
"""

from __future__ import annotations

import json
import logging
import re

from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit")
# tokenizer.ggml.pre values llama.cpp knows, guessed from the model's name when not given
PRE_HINTS = (("smollm", "smollm"), ("qwen", "qwen2"), ("llama-3", "llama-bpe"), ("gpt2", "gpt-2"))
SPACE = "\u2581"
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


def tokenizer_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _nodes(x):
    """Every dict inside a tokenizer.json component (Sequences included)."""
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from _nodes(v)
    elif isinstance(x, list):
        for v in x:
            yield from _nodes(v)


def vocab_kind(data: dict) -> str:
    """``gpt2`` or ``llama`` (llama.cpp's tokenizer model), or SlimkitError naming the problem."""
    if not data.get("model", {}).get("vocab"):
        raise SlimkitError(
            "GGUF files carry the tokenizer, and this run has no fast (tokenizer.json) tokenizer "
            "with a vocabulary: "
            "quantize from a model directory with its tokenizer, or use --format "
            "compressed-tensors or gptq."
        )
    model = data.get("model", {})
    kind = model.get("type")
    parts = [data.get("normalizer"), data.get("pre_tokenizer"), data.get("decoder")]
    types = {n.get("type") for n in _nodes(parts)}
    metaspace = "Metaspace" in types or SPACE in json.dumps(parts, ensure_ascii=False)
    if kind == "BPE" and model.get("byte_fallback") and metaspace:
        return "llama"
    if kind == "BPE" and "ByteLevel" in types:
        return "gpt2"
    what = {
        "Unigram": "a Unigram SentencePiece vocabulary (T5-style; llama.cpp's 'llama' tokenizer "
        "merges BPE pieces by score)",
        "WordPiece": "a WordPiece vocabulary (BERT-style)",
    }.get(kind, f"a {kind or 'non-BPE'} tokenizer without byte-level or byte-fallback pieces")
    raise SlimkitError(
        f"GGUF export writes byte-level BPE (GPT-2 style) and SentencePiece-style BPE tokenizers "
        f"(byte fallback, '▁' for spaces); this model has {what}. Use --format compressed-tensors "
        "or gptq."
    )


def add_space_prefix(data: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text (SentencePiece's add_dummy_prefix)."""
    for n in _nodes([data.get("normalizer"), data.get("pre_tokenizer")]):
        if n.get("type") == "Prepend" and n.get("prepend") == SPACE:
            return True
        if n.get("type") == "Metaspace":
            if n.get("prepend_scheme", "always") in ("always", "first") or n.get(
                "add_prefix_space"
            ):
                return True
    return False


def _merges(data: dict) -> list[tuple[str, str]]:
    return [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        for m in data["model"].get("merges", [])
    ]


def write_tokenizer(w, tok, model_config, vocab_size: int, pre: str = "", name: str = "") -> str:
    """Add ``tok`` to the GGUF writer ``w`` with ``vocab_size`` tokens (ids the tokenizer does not
    use become UNUSED ``[PADi]`` tokens, as llama.cpp's converter writes them). Returns the
    tokenizer model written (``gpt2`` / ``llama``)."""
    import gguf

    data = tokenizer_json(tok)
    kind = vocab_kind(data)
    vocab = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    by_id = {i: s for s, i in vocab.items()}
    unk = data["model"].get("unk_token") or getattr(tok, "unk_token", None)
    merges = _merges(data)
    score = {}
    if kind == "llama":
        for rank, (a, b) in enumerate(merges):
            score.setdefault(a + b, -float(rank))
    floor = -float(len(merges) + 1)  # below every merge: never preferred by llama.cpp
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(s)
        if kind == "llama" and s == unk:
            types.append(gguf.TokenType.UNKNOWN)
            scores.append(-1000.0)
        elif i in added:
            special = added[i].get("special")
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        elif kind == "llama" and BYTE_PIECE.match(s):
            types.append(gguf.TokenType.BYTE)
            scores.append(floor)
        else:
            types.append(gguf.TokenType.NORMAL)
            scores.append(score.get(s, floor))
    w.add_tokenizer_model(kind)
    if kind == "gpt2":
        pre = pre or next((p for hint, p in PRE_HINTS if hint in name.lower()), "default")
        if pre == "default":
            log.warning(
                "GGUF: unknown pre-tokenizer for this model; writing tokenizer.ggml.pre = "
                "'default' (pass --gguf-pre NAME with llama.cpp's name for it if text "
                "tokenizes differently)"
            )
        w.add_tokenizer_pre(pre)
    else:
        w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "gpt2":
        w.add_token_merges([f"{a} {b}" for a, b in merges])
    else:
        w.add_token_scores(scores)
        w.add_add_space_prefix(add_space_prefix(data))
    for attr, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("unk_token_id", w.add_unk_token_id),
        ("pad_token_id", w.add_pad_token_id),
    ):
        v = getattr(tok, attr, None)
        if v is None:
            v = getattr(model_config, attr, None)
        if isinstance(v, int):
            add(v)
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)
    return kind
