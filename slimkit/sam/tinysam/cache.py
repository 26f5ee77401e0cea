"""Teacher image embeddings computed once and stored on disk (TinySAM never runs the teacher's
image encoder in training): ``slimkit sam cache-embeddings``.

A cache directory holds ``manifest.json`` and ``shard-NNNNN.safetensors`` files (``embeddings``
(n, C, h, w) float32 and ``ids`` (n,) int64: the scene seeds, or for a folder the rows of the
manifest's ``ids``, the image ids in list order). The manifest carries a fingerprint: the SHA-256
of the teacher's weights file and of the image list (``slimkit.sam.tinysam.data``: scenes and
their count, or a folder's image ids and byte sizes; the input size). A distillation run
recomputes the fingerprint from its own teacher and data and refuses a cache made for another
(a stale cache would silently distil the wrong targets). The directory is written as
``OUT.partial`` and renamed when complete. Shards are read lazily (memory-mapped), so a cache
larger than memory serves a run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError
from slimkit.sam.model import Sam
from slimkit.sam.tinysam.data import DATA_HELP, open_source, parse_data, scenes_id

__all__ = ["CacheConfig", "EmbeddingCache", "cache_embeddings", "fingerprint", "scenes_id"]


def weights_file(teacher: str | Path) -> Path:
    """The weights file of a teacher: a run directory's model.safetensors, or the file."""
    p = Path(teacher)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise SlimkitError(f"teacher {teacher} does not exist (a slimkit SAM run or a checkpoint)")
    return p


def load_teacher(teacher: str | Path) -> Sam:
    """A slimkit SAM run directory (``sam train`` / ``sam distill``) or an official checkpoint."""
    from slimkit.sam.checkpoint import load_sam
    from slimkit.sam.train import load_trained

    p = Path(teacher)
    weights_file(p)
    if (p / "sam_config.json").is_file() or (p.parent / "sam_config.json").is_file():
        return load_trained(p)
    return load_sam(p)


def fingerprint(teacher: str | Path, images: str) -> str:
    """SHA-256 over the teacher's weights bytes and the image-list description."""
    h = hashlib.sha256()
    with open(weights_file(teacher), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(b"\0" + images.encode())
    return h.hexdigest()


@dataclass
class CacheConfig:
    teacher: str = field(
        default="", metadata={"help": "teacher: a slimkit SAM run or a SAM checkpoint"}
    )
    data: str = field(default="scenes", metadata={"help": DATA_HELP})
    images: str = field(
        default="",
        metadata={"help": "a folder of images (every image file; for an SA-1B folder the list "
                          "of --data sa1b:DIR)"},
    )  # fmt: skip
    scenes: int = field(default=2000, metadata={"help": "images to embed (scene seeds 0..N-1)"})
    shard_size: int = field(default=256, metadata={"help": "embeddings per safetensors shard"})
    batch_size: int = field(default=8, metadata={"help": "images per teacher forward"})
    device: str = field(
        default="auto", metadata={"help": "auto (the GPU if any, else CPU), cpu, cuda[:N]"}
    )

    def __post_init__(self) -> None:
        parse_data(self.data)
        if self.images and self.data != "scenes":
            raise SlimkitError("give --images DIR or --data sa1b:DIR / coco:DIR, not both")
        if min(self.scenes, self.shard_size, self.batch_size) < 1:
            raise SlimkitError("--scenes, --shard-size and --batch-size must be >= 1")


def _encode(model: Sam, images, device) -> torch.Tensor:
    """The image embeddings of size x size x 3 uint8 images."""
    x = torch.stack([torch.as_tensor(im).permute(2, 0, 1).float() for im in images]).to(device)
    return model.image_encoder(model.preprocess(x))


@torch.no_grad()
def cache_embeddings(cfg: CacheConfig, *, out: str | Path, overwrite: bool = False) -> dict:
    """Embed the images of ``cfg.data`` / ``cfg.images`` (in list order) with the teacher's
    image encoder into sharded safetensors."""
    from safetensors.torch import save_file

    from slimkit.core.dist import resolve_device
    from slimkit.core.rundir import atomic_output

    if not cfg.teacher:
        raise SlimkitError("give --teacher (a slimkit SAM run directory or a SAM checkpoint)")
    device = resolve_device(cfg.device)
    model = load_teacher(cfg.teacher).to(device).eval()
    size = model.cfg.img_size
    source = open_source(cfg.data, size, cfg.scenes, cfg.images)
    images = source.describe()
    fp = fingerprint(cfg.teacher, images)
    n, shards = len(source), []
    with atomic_output(out, overwrite=overwrite) as tmp:
        for s, start in enumerate(range(0, n, cfg.shard_size)):
            ids = list(range(start, min(start + cfg.shard_size, n)))
            embs = []
            for b in range(0, len(ids), cfg.batch_size):
                imgs = [source.image(i) for i in ids[b : b + cfg.batch_size]]
                embs.append(_encode(model, imgs, device).float().cpu())
            name = f"shard-{s:05d}.safetensors"
            save_file({"embeddings": torch.cat(embs).contiguous(),
                       "ids": torch.tensor(ids, dtype=torch.int64)}, str(tmp / name))  # fmt: skip
            shards.append({"file": name, "start": ids[0], "count": len(ids)})
        manifest = {"fingerprint": fp, "teacher": str(cfg.teacher), "images": images,
                    "count": n, "shape": list(embs[0].shape[1:]), "shards": shards}  # fmt: skip
        if source.kind != "scenes":
            manifest |= {"data": source.where, "ids": source.ids}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {"out": str(out), **manifest}


class EmbeddingCache:
    """Cached teacher embeddings, refused unless made from ``teacher`` on ``images`` (the image
    list's ``describe()``). ``get(rows)``: the embeddings of those rows of the image list."""

    def __init__(self, path: str | Path, teacher: str | Path, images: str):
        d = Path(path)
        man = d / "manifest.json"
        if not man.is_file():
            raise SlimkitError(f"{d} is not an embedding cache (no manifest.json); make one with "
                               "slimkit sam cache-embeddings")  # fmt: skip
        m = json.loads(man.read_text())
        if m.get("fingerprint") != fingerprint(teacher, images):
            made = f"{m['data']}: {m.get('images')}" if "data" in m else m.get("images")
            raise SlimkitError(
                f"embedding cache {d} is stale: made from teacher {m.get('teacher')} on "
                f"{made}, not from {teacher} on {images}; run slimkit sam "
                "cache-embeddings again"
            )
        self.path, self.manifest = d, m
        self.count = int(m["count"])
        self.ids = m.get("ids")
        self._starts = [int(sh["start"]) for sh in m["shards"]]
        self._open: dict[int, object] = {}

    def _shard(self, k: int):
        from safetensors import safe_open

        if k not in self._open:
            sh = self.manifest["shards"][k]
            f = self.path / sh["file"]
            if not f.is_file():
                raise SlimkitError(f"embedding cache {self.path} lacks {sh['file']}")
            self._open[k] = safe_open(str(f), framework="pt")
        return self._open[k].get_slice("embeddings")

    def get(self, ids) -> torch.Tensor:
        from bisect import bisect_right

        rows = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.count:
                raise SlimkitError(
                    f"embedding cache {self.path} has no row {i} ({self.count} rows)"
                )
            k = bisect_right(self._starts, i) - 1
            r = i - self._starts[k]
            rows.append(self._shard(k)[r : r + 1])
        return torch.cat(rows)
