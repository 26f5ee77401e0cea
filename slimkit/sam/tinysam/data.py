"""The training images of ``sam distill`` and ``sam cache-embeddings``: one image list, one id
per image, shared by both commands so that a cached embedding is the one of its image.

Sources:

- ``scenes``: generated scenes, seeds 0..N-1 (the id is the seed).
- ``sa1b:DIR``: the official SA-1B layout, ``sa_N.jpg`` beside ``sa_N.json`` (per-image JSON,
  COCO RLE masks; ``slimkit.sam.sa1b``). Every image of the folder, ordered by file name
  (``sa_2`` before ``sa_10``); the id is the file stem (SA-1B's image_id is its number).
- ``coco:DIR``: ``annotations.json`` (COCO instances) beside the images or in ``DIR/images``;
  the images with at least one non-crowd instance, ordered by file name; the id is the stem.
- ``cache-embeddings --images DIR``: every image file of DIR, no annotations; for an SA-1B
  folder the same list as ``sa1b:DIR``, so a cache made with ``--images`` serves ``sam distill
  --data sa1b:DIR``.

Images are letterboxed as SAM preprocesses them: the longest side resized to the model's input
size, zeros bottom and right; masks the same way (nearest). Nothing is read up front but file
names (and COCO's one ``annotations.json``): an SA-1B JSON is parsed when a step uses its image,
and only the masks of the instances a step prompts are decoded. An instance counts if its
``area`` scaled to the input size covers at least ``MIN_AREA`` pixels (the readers of ``sam
eval`` apply the same bound to the decoded masks).

``describe()`` is the image list's fingerprint text (embedding caches): for folders the number
of images, the input size and the SHA-256 of every image's id and byte size, so a cache made for
another folder, another input size or scenes does not match.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from slimkit.core.errors import SlimkitError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_AREA = 10  # pixels after letterboxing
DATA_HELP = (
    "scenes (generated; seeds 0..N-1), sa1b:DIR (sa_N.jpg beside sa_N.json, the official SA-1B "
    "layout) or coco:DIR (annotations.json + images)"
)


def parse_data(data: str) -> tuple[str, str]:
    """``scenes`` / ``sa1b:DIR`` / ``coco:DIR`` -> (kind, DIR)."""
    if data == "scenes":
        return "scenes", ""
    kind, _, path = data.partition(":")
    if kind in ("sa1b", "coco") and path:
        return kind, path
    raise SlimkitError(f"--data must be scenes, sa1b:DIR or coco:DIR (got {data!r})")


def scenes_id(n: int, size: int) -> str:
    return f"scenes:0..{n - 1}@{size}"


def _order_key(p: Path) -> tuple[int, str]:
    return len(p.stem), p.stem


class LazyMasks(Sequence):
    """The instance masks of one image, each decoded on first access."""

    def __init__(self, n: int, decode: Callable[[int], np.ndarray]):
        self._n, self._decode, self._done = n, decode, {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(i)
        if i not in self._done:
            self._done[i] = self._decode(i)
        return self._done[i]

    @property
    def decoded(self) -> int:
        return len(self._done)


class Source:
    """An ordered image list. ``sample(i)`` -> (image size x size x 3 uint8, instance masks,
    (h, w) of the image inside the padded canvas); ``count(i)``: its number of instances."""

    kind = ""
    size = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def count(self, i: int) -> int:
        raise NotImplementedError

    def sample(self, i: int):
        raise NotImplementedError

    def order(self, seed: int, step: int, batch: int) -> list[int]:
        """The images of optimizer step ``step`` (0-based): for folders, epoch after epoch, each
        a permutation of the list drawn from (seed, epoch), so a step's images depend on the
        seed and the step only (resume draws the same ones)."""
        n, out = len(self), []
        for p in range(step * batch, (step + 1) * batch):
            e = p // n
            if e not in self._perms:
                self._perms = {e: np.random.default_rng([seed, e, 0x5A1B]).permutation(n)}
            out.append(int(self._perms[e][p % n]))
        return out


class Scenes(Source):
    """Generated scenes 0..n-1 (``slimkit.sam.train.draw_scene``)."""

    kind = "scenes"

    def __init__(self, n: int, size: int):
        self.n, self.size, self._cache = n, size, {}

    def __len__(self) -> int:
        return self.n

    def describe(self) -> str:
        return scenes_id(self.n, self.size)

    @property
    def where(self) -> str:
        return "scenes"

    def image(self, i: int) -> np.ndarray:
        from slimkit.sam.train import draw_scene

        return draw_scene(self.size, i)[0]

    def sample(self, i: int):
        from slimkit.sam.train import draw_scene

        if len(self._cache) > 4096:
            self._cache.clear()
        img, masks = self._cache.setdefault(i, draw_scene(self.size, i))
        return img, masks, (self.size, self.size)

    def count(self, i: int) -> int:
        return len(self.sample(i)[1])

    def order(self, seed: int, step: int, batch: int) -> list[int]:
        rng = np.random.default_rng([seed, step])
        return [int(i) for i in rng.integers(0, self.n, batch)]


def list_images(d: Path) -> list[Path]:
    """The image files of a folder, ordered by name (``sa_2`` before ``sa_10``)."""
    if not d.is_dir():
        raise SlimkitError(f"image folder {d} does not exist")
    files = sorted(
        (f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file()), key=_order_key
    )
    if not files:
        raise SlimkitError(f"{d} holds no images ({', '.join(IMAGE_EXTS)})")
    for a, b in zip(files, files[1:]):
        if a.stem == b.stem:
            raise SlimkitError(f"{d}: {a.name} and {b.name} share the id {a.stem}")
    return files


def _open(path: Path):
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except OSError as e:
        raise SlimkitError(f"cannot read image {path} ({e})") from None


class ImageFolder(Source):
    """Every image file of a folder, without annotations (``cache-embeddings --images``)."""

    kind = "images"

    def __init__(self, path: str | Path, size: int, files: list[Path] | None = None):
        self.path, self.size = Path(path), size
        self.files = list_images(self.path) if files is None else files
        self.ids = [f.stem for f in self.files]
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def where(self) -> str:
        return f"{self.kind}:{self.path}"

    def describe(self) -> str:
        h = hashlib.sha256()
        for f, i in zip(self.files, self.ids):
            h.update(f"{i}\0{f.stat().st_size}\n".encode())
        return (f"{len(self)} images @{self.size} px ({self.ids[0]} .. {self.ids[-1]}, "
                f"list sha256 {h.hexdigest()[:16]})")  # fmt: skip

    def image(self, i: int) -> np.ndarray:
        from slimkit.sam.coco import letterbox_image

        return letterbox_image(_open(self.files[i]), self.size)

    def count(self, i: int) -> int:
        raise SlimkitError(f"{self.path} has no annotations: use --data sa1b:DIR or coco:DIR")

    def sample(self, i: int):
        return self.count(i)


def _usable(area, h: int, w: int, size: int) -> bool:
    s = size / max(h, w)
    return area is None or float(area) * s * s >= MIN_AREA


class Sa1bFolder(ImageFolder):
    """An SA-1B folder: every image needs its JSON beside it (and every JSON its image)."""

    kind = "sa1b"

    def __init__(self, path: str | Path, size: int):
        p = Path(path)
        if not p.is_dir():
            raise SlimkitError(f"SA-1B folder {p} does not exist")
        jsons = {f.stem for f in p.glob("*.json")}
        if not jsons:
            raise SlimkitError(f"{p} holds no SA-1B annotation files (sa_N.json beside sa_N.jpg)")
        super().__init__(p, size)
        lonely = [f.name for f in self.files if f.stem not in jsons]
        if lonely:
            raise SlimkitError(f"{p}: no SA-1B annotation file beside {lonely[0]} (expected "
                               f"{Path(lonely[0]).stem}.json; {len(lonely)} image(s) without one)")  # fmt: skip
        orphans = sorted(jsons - set(self.ids))
        if orphans:
            raise SlimkitError(f"{p}: {orphans[0]}.json has no image beside it "
                               f"({len(orphans)} annotation file(s) without one)")  # fmt: skip
        self._anns: OrderedDict[int, list] = OrderedDict()
        self._counts: dict[int, int] = {}
        self.annotations(0)  # a folder in another format fails here, not steps later

    def annotations(self, i: int) -> list[dict]:
        """The usable annotations of image i (its JSON parsed; the last few kept)."""
        from slimkit.sam.sa1b import read_sa1b_json

        if i in self._anns:
            self._anns.move_to_end(i)
            return self._anns[i]
        f = self.path / f"{self.ids[i]}.json"
        _, anns = read_sa1b_json(f)
        if not isinstance(anns, list) or not anns:
            raise SlimkitError(f"{f} lists no annotations (an SA-1B file holds the image's masks)")
        keep = []
        for a in anns:
            seg = a.get("segmentation") if isinstance(a, dict) else None
            if not isinstance(seg, dict) or len(seg.get("size", ())) != 2 or "counts" not in seg:
                raise SlimkitError(f"{f}: an annotation without a COCO RLE segmentation")
            h, w = (int(v) for v in seg["size"])
            if _usable(a.get("area"), h, w, self.size):
                keep.append(a)
        self._anns[i] = keep
        self._counts[i] = len(keep)
        while len(self._anns) > 32:
            self._anns.popitem(last=False)
        return keep

    def count(self, i: int) -> int:
        if i not in self._counts:
            self.annotations(i)
        return self._counts[i]

    def sample(self, i: int):
        from slimkit.sam.coco import fit_size, letterbox_image, letterbox_mask
        from slimkit.sam.sa1b import decode_rle

        anns = self.annotations(i)
        img = _open(self.files[i])
        for a in anns:
            if tuple(int(v) for v in a["segmentation"]["size"]) != (img.height, img.width):
                hh, ww = a["segmentation"]["size"]
                raise SlimkitError(f"{self.ids[i]}.json: a mask of size {hh}x{ww} on an image of "
                                   f"{img.height}x{img.width}")  # fmt: skip
        masks = LazyMasks(
            len(anns), lambda k: letterbox_mask(decode_rle(anns[k]["segmentation"]), self.size)
        )
        return letterbox_image(img, self.size), masks, fit_size(img.height, img.width, self.size)


class CocoFolder(ImageFolder):
    """COCO instances: the images with at least one usable non-crowd instance."""

    kind = "coco"

    def __init__(self, path: str | Path, size: int):
        p = Path(path)
        ann_file = p / "annotations.json"
        if not ann_file.is_file():
            raise SlimkitError(f"{p} has no annotations.json (COCO instance format)")
        try:
            data = json.loads(ann_file.read_text())
            by_image: dict = {}
            for a in data.get("annotations", []):
                by_image.setdefault(a["image_id"], []).append(a)
            images = data.get("images", [])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SlimkitError(f"cannot read {ann_file} as COCO instances ({e!r})") from None
        items = []
        for im in images:
            f = p / im["file_name"]
            if not f.is_file():
                f = p / "images" / im["file_name"]
            if not f.is_file():
                raise SlimkitError(f"image {im['file_name']} of {ann_file} not found")
            h, w = im.get("height"), im.get("width")
            if not (h and w):
                from PIL import Image

                with Image.open(f) as img:
                    w, h = img.size
            anns = [a for a in by_image.get(im["id"], []) if not a.get("iscrowd")
                    and _usable(a.get("area"), int(h), int(w), size)]  # fmt: skip
            if anns:
                items.append((f, (int(h), int(w)), anns))
        if not items:
            raise SlimkitError(f"{ann_file} has no image with a usable instance mask")
        items.sort(key=lambda t: _order_key(t[0]))
        for a, b in zip(items, items[1:]):
            if a[0].stem == b[0].stem:
                raise SlimkitError(f"{ann_file}: {a[0]} and {b[0]} share the id {a[0].stem}")
        super().__init__(p, size, [f for f, _, _ in items])
        self.items = items

    def count(self, i: int) -> int:
        return len(self.items[i][2])

    def sample(self, i: int):
        from slimkit.sam.coco import decode_segmentation, fit_size, letterbox_image, letterbox_mask

        f, (h, w), anns = self.items[i]
        img = _open(f)
        if (img.height, img.width) != (h, w):
            raise SlimkitError(f"{f.name}: annotated as {h}x{w}, the file is "
                               f"{img.height}x{img.width}")  # fmt: skip
        masks = LazyMasks(len(anns), lambda k: letterbox_mask(
            decode_segmentation(anns[k]["segmentation"], h, w), self.size))  # fmt: skip
        return letterbox_image(img, self.size), masks, fit_size(h, w, self.size)


def open_source(data: str, size: int, scenes: int = 0, images: str = "") -> Source:
    """The image list of ``--data`` (or, for ``cache-embeddings --images``, of a plain folder)."""
    if images:
        if data != "scenes":
            raise SlimkitError("give --images DIR or --data sa1b:DIR / coco:DIR, not both")
        return ImageFolder(images, size)
    kind, path = parse_data(data)
    if kind == "scenes":
        return Scenes(scenes, size)
    return Sa1bFolder(path, size) if kind == "sa1b" else CocoFolder(path, size)


NUCLEI_PIN = "stardist==0.9.2"


def nuclei_image() -> tuple[np.ndarray, list[np.ndarray]]:
    """The one real image with instance masks available offline: the 512 x 512 fluorescence
    nuclei image of the ``stardist`` wheel (``data/images/img2d.tif``, 125 labelled nuclei in
    ``mask2d.tif``; BSD-3). Returns (RGB uint8 image, boolean mask per instance, in label
    order). Only the data files are read (importing stardist would need TensorFlow): the wheel is
    installed with ``pip install --no-deps`` (``make`` does). The uint16 intensities are scaled
    to 0..255 by their 1st and 99.8th percentiles, grey in all three channels."""
    import importlib.util

    import tifffile

    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise SlimkitError(f"the nuclei image comes from the stardist wheel: pip install --no-deps {NUCLEI_PIN}")  # fmt: skip
    d = Path(next(iter(spec.submodule_search_locations))) / "data" / "images"
    img = tifffile.imread(d / "img2d.tif").astype(np.float32)
    label = tifffile.imread(d / "mask2d.tif")
    lo, hi = np.percentile(img, (1.0, 99.8))
    grey = np.clip((img - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    masks = [label == k for k in np.unique(label) if k]
    return np.repeat(grey[..., None], 3, axis=2), masks
