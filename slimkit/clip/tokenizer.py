"""A word-level tokenizer built from the training captions (ships with the run directory as
``tokenizer.json``; nothing to download).

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

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        try:
            d = json.loads(Path(path).read_text())
            return cls(list(d["vocab"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise SlimkitError(f"{path} is not a slimkit word tokenizer (tokenizer.json)") from None


def word_mask(ids: torch.Tensor) -> torch.Tensor:
    """True on word tokens (not padding, [BOS], [EOS]): the tokens the token-level loss matches."""
    return (ids != PAD) & (ids != BOS) & (ids != EOS)
