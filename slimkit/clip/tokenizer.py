"""Tokenizers of the text tower: a word-level one built from the training captions (ships with
the run directory as ``tokenizer.json``; nothing to download), or the WordPiece tokenizer of a
pretrained text tower (MiniLM), saved beside it in ``text_tokenizer/``.

Text is lower-cased and split into words and punctuation. Every sequence is
``[BOS] w1 ... wk [EOS] [PAD] ...``, truncated to ``context_length`` with the ``[EOS]`` kept
(the text tower pools at ``[EOS]``). Words never seen in training map to ``[UNK]``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")
PAD, UNK, BOS, EOS, MASK = range(len(SPECIALS))
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordTokenizer:
    """``WordTokenizer.build(captions)``; ``tok(["a bold seven"], 16) -> (ids, attention)``.

    Args:
        vocab: the token strings, specials first (ids are positions in this list).
    """

    def __init__(self, vocab: list[str]):
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise SlimkitError(f"a word vocabulary starts with {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: list[str], min_count: int = 1) -> WordTokenizer:
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted(w for w, c in counts.items() if c >= min_count)
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.vocab)

    def specials(self) -> dict[str, int]:
        """Ids the model needs: padding, sequence start / end, [MASK], first ordinary word."""
        return {"pad_id": PAD, "bos_id": BOS, "eos_id": EOS, "mask_id": MASK,
                "first_word_id": len(SPECIALS)}  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, UNK) for w in words(text)]

    def __call__(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, context_length) int64, attention (B, context_length) bool: True on real tokens)."""
        ids = torch.full((len(texts), context_length), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            seq = [BOS, *self.encode(t)[: context_length - 2], EOS]
            ids[i, : len(seq)] = torch.tensor(seq)
        return ids, ids != PAD

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "word", "vocab": self.vocab}, indent=0) + "\n")


class PretrainedTokenizer:
    """A Hugging Face (WordPiece) tokenizer with the interface of :class:`WordTokenizer`:
    ``[CLS] words [SEP] [PAD]...``, pooled at ``[SEP]``."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.hf = AutoTokenizer.from_pretrained(self.path)
        if self.hf.mask_token_id is None or self.hf.sep_token_id is None:
            raise SlimkitError(f"the tokenizer in {path} has no [MASK] / [SEP] token")

    def __len__(self) -> int:
        return len(self.hf)

    def specials(self) -> dict[str, int]:
        h = self.hf
        ids = list(h.all_special_ids)
        # BERT vocabularies keep [unused*] slots below the first real word ("!" = 999)
        first = max(h.convert_tokens_to_ids("!") or 0, max(ids) + 1)
        return {"pad_id": h.pad_token_id, "bos_id": h.cls_token_id, "eos_id": h.sep_token_id,
                "mask_id": h.mask_token_id, "first_word_id": first}  # fmt: skip

    def __call__(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.hf(list(texts), padding="max_length", truncation=True,
                      max_length=context_length, return_tensors="pt")  # fmt: skip
        ids = enc["input_ids"].long()
        return ids, ids != self.hf.pad_token_id

    def save(self, path: str | Path) -> None:
        d = Path(path).parent / "text_tokenizer"
        self.hf.save_pretrained(str(d))
        Path(path).write_text(json.dumps({"type": "pretrained", "dir": d.name}) + "\n")


def load_tokenizer(path: str | Path):
    """The tokenizer a run directory's ``tokenizer.json`` describes."""
    try:
        d = json.loads(Path(path).read_text())
        if d.get("type") == "pretrained":
            return PretrainedTokenizer(Path(path).parent / d["dir"])
        return WordTokenizer(list(d["vocab"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SlimkitError(
            f"{path} is not a slimkit tokenizer description (tokenizer.json)"
        ) from None


def word_mask(ids: torch.Tensor, pad_id: int = PAD, bos_id: int = BOS, eos_id: int = EOS,
              **_) -> torch.Tensor:  # fmt: skip
    """True on word tokens (not padding, start, end): the tokens the token-level loss matches
    and MLM may mask. Takes a tokenizer's ``specials()`` as keywords."""
    return (ids != pad_id) & (ids != bos_id) & (ids != eos_id)
