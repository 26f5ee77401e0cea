"""Tokenizer compression (PanGu-π Pro, section 2.1): shrink an existing byte-level BPE tokenizer
to its most frequent pieces on a corpus, and remap a model's embedding / LM-head rows.

Kept, in this order, until ``target_size``: every added / special token, the 256 byte-level base
pieces (so any text still encodes and decodes exactly), then pieces by descending frequency on
the corpus' train split, each together with the pieces its BPE merge is built from (recursively;
the vocabulary stays closed under its merges). Merges survive when both parents and the result
are kept, in their original priority order. New ids follow the old id order; the old -> new id
map is saved with the tokenizer (``slimkit_token_map.json``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.data.text import _tokenize, load_documents

TOKEN_MAP = "slimkit_token_map.json"


def token_counts(tok, corpus: str, split: str = "train") -> Counter:
    counts: Counter = Counter()
    docs = load_documents(corpus, split)
    for i in range(0, len(docs), 256):
        counts.update(_tokenize(tok, "\n\n".join(d.text for d in docs[i : i + 256])))
    return counts


def _byte_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def compress_tokenizer(tok, counts: Counter, target_size: int):
    """(new tokenizer, old_ids kept in new-id order) for a byte-level BPE fast tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("pre_tokenizer") or {}).get("type") not in (
        "ByteLevel",
        "Sequence",
    ):
        raise SlimkitError(
            "tokenizer compression handles byte-level BPE tokenizers (tokenizer.json)"
        )
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: s for s, i in vocab.items()}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    parents = {}
    for a, b in merges:
        parents.setdefault(a + b, (a, b))
    added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    keep: set[str] = set(added.values())
    base = _byte_alphabet() & set(vocab)
    keep |= base
    if target_size < len(keep):
        raise SlimkitError(
            f"--vocab {target_size} is below the {len(keep)} special and byte-level pieces every "
            "byte-level tokenizer must keep"
        )

    def closure(piece: str) -> list[str]:
        need, stack = [], [piece]
        while stack:
            p = stack.pop()
            if p in keep or p in need:
                continue
            need.append(p)
            if p in parents:
                stack.extend(parents[p])
        return need

    ranked = sorted((i for i in by_id if i not in added), key=lambda i: (-counts.get(i, 0), i))
    for i in ranked:
        if len(keep) >= target_size:
            break
        need = closure(by_id[i])
        if need and len(keep) + len(need) <= target_size:
            keep.update(need)
    old_ids = sorted(
        vocab[s] if s in vocab else next(k for k, v in added.items() if v == s) for s in keep
    )
    new_id = {old: new for new, old in enumerate(old_ids)}
    id_to_piece = {**by_id, **added}
    model["vocab"] = {
        id_to_piece[o]: new_id[o] for o in old_ids if o not in added or id_to_piece[o] in vocab
    }
    kept_merges = [(a, b) for a, b in merges if a in keep and b in keep and a + b in keep]
    model["merges"] = [[a, b] for a, b in kept_merges]
    for t in data.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    pp = data.get("post_processor") or {}
    for spec in (pp.get("special_tokens") or {}).values():
        spec["ids"] = [new_id[i] for i in spec.get("ids", [])]
    backend = Tokenizer.from_str(json.dumps(data))
    kw = {
        k: getattr(tok, k)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tok, k, None)
    }
    new = PreTrainedTokenizerFast(tokenizer_object=backend, **kw)
    new.chat_template = getattr(tok, "chat_template", None)
    return new, old_ids


def remap_model(model: nn.Module, old_ids: list[int]) -> nn.Module:
    """Keep the embedding (and untied LM-head) rows of ``old_ids``, in that order."""
    idx = torch.tensor(old_ids)
    emb = model.get_input_embeddings()
    new_emb = nn.Embedding(len(old_ids), emb.weight.shape[1])
    new_emb.weight.data = emb.weight.data[idx].clone()
    model.set_input_embeddings(new_emb)
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if head is not None and not tied:
        new_head = nn.Linear(head.in_features, len(old_ids), bias=head.bias is not None)
        new_head.weight.data = head.weight.data[idx].clone()
        if head.bias is not None:
            new_head.bias.data = head.bias.data[idx].clone()
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(old_ids)
    new_id = {o: n for n, o in enumerate(old_ids)}
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(model.config, attr, None)
        if isinstance(v, int):
            setattr(model.config, attr, new_id.get(v))
    if tied:
        model.tie_weights()
    return model


def tokens_per_char(tok, corpus: str, split: str = "validation") -> float:
    text = "\n\n".join(d.text for d in load_documents(corpus, split))
    return len(_tokenize(tok, text)) / max(len(text), 1)


@dataclass
class CompressTokenizerConfig:
    """Options of ``slimkit compress-tokenizer`` (keyword arguments of :func:`compress_run`;
    the target vocabulary size is a required input of the command)."""

    data: str = field(
        default="wiki-offline", metadata={"help": "corpus whose train split is counted"}
    )
    tokenizer_only: bool = field(default=False, metadata={"help": "do not write a remapped model"})


def compress_run(
    model_name: str,
    corpus: str,
    target_size: int,
    out: str | Path,
    *,
    with_model: bool = True,
    overwrite: bool = False,
) -> dict:
    """``slimkit compress-tokenizer``: the compressed tokenizer (and the remapped model) in ``out``
    (written under ``OUT.partial`` and renamed when complete; an existing ``out`` is refused
    unless ``overwrite``)."""
    from slimkit.core.rundir import atomic_output, check_output
    from slimkit.data.text import check_corpus
    from slimkit.llm.models import load_model

    out = check_output(out, overwrite=overwrite)  # before the model is loaded
    check_corpus(corpus)
    model, tok = load_model(model_name)
    counts = token_counts(tok, corpus)
    new_tok, old_ids = compress_tokenizer(tok, counts, target_size)
    before = sum(p.numel() for p in model.parameters())
    total = sum(counts.values())
    covered = sum(counts.get(i, 0) for i in old_ids)
    report = {
        "source": model_name, "corpus": corpus, "vocab_before": len(tok), "vocab_after": len(old_ids),
        "train_token_coverage": covered / max(total, 1),
        "tokens_per_char_before": tokens_per_char(tok, corpus), "tokens_per_char_after": tokens_per_char(new_tok, corpus),
        "parameters_before": before,
    }  # fmt: skip
    if with_model:
        remap_model(model, old_ids)
        report["parameters_after"] = sum(p.numel() for p in model.parameters())
    with atomic_output(out, overwrite=overwrite) as tmp:
        new_tok.save_pretrained(tmp)
        (tmp / TOKEN_MAP).write_text(json.dumps({"old_ids": old_ids}) + "\n")
        if with_model:
            model.save_pretrained(tmp)
        (tmp / "compress_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
