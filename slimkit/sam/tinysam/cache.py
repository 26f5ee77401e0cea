"""Teacher image embeddings computed once and stored on disk (TinySAM never runs the teacher's
image encoder in training): ``slimkit sam cache-embeddings``.

A cache directory holds ``manifest.json`` and ``shard-NNNNN.safetensors`` files (``embeddings``
(n, C, h, w) float32 and ``ids`` (n,) int64). The manifest carries a fingerprint: the SHA-256 of
the teacher's weights file and of the image list (data source, count, size). A distillation run
recomputes the fingerprint from its own teacher and data and refuses a cache made for another
(a stale cache would silently distil the wrong targets). The directory is written as
``OUT.partial`` and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError
from slimkit.sam.model import Sam


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


def scenes_id(n: int, size: int) -> str:
    return f"scenes:0..{n - 1}@{size}"


@dataclass
class CacheConfig:
    teacher: str = field(
        default="", metadata={"help": "teacher: a slimkit SAM run or a SAM checkpoint"}
    )
    data: str = field(default="scenes", metadata={"help": "scenes (generated; seeds 0..N-1)"})
    scenes: int = field(default=2000, metadata={"help": "images to embed (scene seeds 0..N-1)"})
    shard_size: int = field(default=256, metadata={"help": "embeddings per safetensors shard"})
    batch_size: int = field(default=8, metadata={"help": "images per teacher forward"})
    device: str = field(
        default="auto", metadata={"help": "auto (the GPU if any, else CPU), cpu, cuda[:N]"}
    )

    def __post_init__(self) -> None:
        if self.data != "scenes":
            raise SlimkitError(f"--data must be scenes (got {self.data!r})")
        if min(self.scenes, self.shard_size, self.batch_size) < 1:
            raise SlimkitError("--scenes, --shard-size and --batch-size must be >= 1")


def _encode(model: Sam, images, device) -> torch.Tensor:
    x = torch.stack([torch.as_tensor(im).permute(2, 0, 1).float() for im in images]).to(device)
    return model.image_encoder(model.preprocess(x))


@torch.no_grad()
def cache_embeddings(cfg: CacheConfig, *, out: str | Path, overwrite: bool = False) -> dict:
    """Embed scenes 0..N-1 with the teacher's image encoder into sharded safetensors."""
    from safetensors.torch import save_file

    from slimkit.core.dist import resolve_device
    from slimkit.core.rundir import atomic_output
    from slimkit.sam.train import draw_scene

    if not cfg.teacher:
        raise SlimkitError("give --teacher (a slimkit SAM run directory or a SAM checkpoint)")
    device = resolve_device(cfg.device)
    model = load_teacher(cfg.teacher).to(device).eval()
    size = model.cfg.img_size
    images = scenes_id(cfg.scenes, size)
    fp = fingerprint(cfg.teacher, images)
    shards = []
    with atomic_output(out, overwrite=overwrite) as tmp:
        for s, start in enumerate(range(0, cfg.scenes, cfg.shard_size)):
            ids = list(range(start, min(start + cfg.shard_size, cfg.scenes)))
            embs = []
            for b in range(0, len(ids), cfg.batch_size):
                imgs = [draw_scene(size, i)[0] for i in ids[b : b + cfg.batch_size]]
                embs.append(_encode(model, imgs, device).float().cpu())
            name = f"shard-{s:05d}.safetensors"
            save_file({"embeddings": torch.cat(embs).contiguous(),
                       "ids": torch.tensor(ids, dtype=torch.int64)}, str(tmp / name))  # fmt: skip
            shards.append({"file": name, "start": ids[0], "count": len(ids)})
        manifest = {"fingerprint": fp, "teacher": str(cfg.teacher), "images": images,
                    "count": cfg.scenes, "shape": list(embs[0].shape[1:]), "shards": shards}  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {"out": str(out), **manifest}


class EmbeddingCache:
    """Cached teacher embeddings, refused unless made from ``teacher`` on ``images``."""

    def __init__(self, path: str | Path, teacher: str | Path, images: str):
        from safetensors.torch import load_file

        d = Path(path)
        man = d / "manifest.json"
        if not man.is_file():
            raise SlimkitError(f"{d} is not an embedding cache (no manifest.json); make one with "
                               "slimkit sam cache-embeddings")  # fmt: skip
        m = json.loads(man.read_text())
        if m.get("fingerprint") != fingerprint(teacher, images):
            raise SlimkitError(
                f"embedding cache {d} is stale: made from teacher {m.get('teacher')} on "
                f"{m.get('images')}, not from {teacher} on {images}; run slimkit sam "
                "cache-embeddings again"
            )
        embs = []
        for sh in m["shards"]:
            t = load_file(str(d / sh["file"]))
            embs.append(t["embeddings"])
        self.embeddings = torch.cat(embs)
        self.count = len(self.embeddings)

    def get(self, ids) -> torch.Tensor:
        return self.embeddings[torch.as_tensor(list(ids), dtype=torch.int64)]
