"""Describers: write one caption per image of a split (``slimkit describe``).

Registered in :data:`CAPTIONERS` (``slimkit list captioners``):

- ``attributes`` (offline, deterministic): words from properties measured on the image, the
  GPT4Image spec's small-scale describer. Ink mass -> "thin" / "bold", bounding-box size ->
  "small" / "large" (both against the other images of the same class: the lower and upper
  third), second-moment slant -> "slanted left" / "slanted right" / "upright", ink centroid ->
  "on the left" / "in the centre" / "on the right". ``--prompt class`` names the class ("a bold
  seven slanted right"), ``--prompt agnostic`` does not ("a bold digit slanted right").
- ``class-name`` (offline): the class name only ("a seven"): label semantics without instance
  detail, the spec's control arm.
- ``hf:MODEL`` (online): any transformers image-to-text model (e.g.
  ``hf:Salesforce/blip-image-captioning-base``); with ``--prompt class`` the class name is given
  as the text prefix ("a photo of a seven,"), which conditional captioners such as BLIP continue.

"Ink" is the distance of each pixel from the image's border median, so dark-on-light and
light-on-dark images are measured alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry
from slimkit.distill.captions import split_fingerprint, write_captions
from slimkit.vision.data import ImageData, load_images, stratified_subset

log = logging.getLogger("slimkit")
CAPTIONERS = Registry("captioner")
PROMPTS = ("class", "agnostic")
SLANT = 0.12  # |shear| below this is "upright" (x shift per unit of height)


@dataclass
class DescribeConfig:
    data: str = field(
        default="digits",
        metadata={"help": "digits | mnist-5k | shapes | cifar10 | cifar100 | imagefolder:PATH"},
    )
    img_size: int = field(
        default=32, metadata={"help": "resolution the attributes are measured at"}
    )
    split: str = field(
        default="train", metadata={"help": "train | test", "choices": ["train", "test"]}
    )
    train_subset: int = field(
        default=0,
        metadata={"help": "describe the stratified subset of N training images that "
                          "train-classifier --train-subset N trains on (0 = all)"},
    )  # fmt: skip
    captioner: str = field(
        default="attributes", metadata={"help": "attributes | class-name | hf:MODEL"}
    )
    prompt: str = field(
        default="class",
        metadata={"help": "class: the description names the class; agnostic: it does not",
                  "choices": list(PROMPTS)},
    )  # fmt: skip
    noun: str = field(
        default="",
        metadata={"help": "word for the object in class-agnostic text (default: digit for "
                          "digit sets, shape for shapes, object otherwise)"},
    )  # fmt: skip
    batch_size: int = field(default=16, metadata={"help": "images per call of an online captioner"})
    max_new_tokens: int = field(
        default=40, metadata={"help": "longest caption an online captioner generates (tokens)"}
    )

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise SlimkitError(f"--prompt must be one of {', '.join(PROMPTS)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise SlimkitError("--batch-size and --max-new-tokens must be >= 1")
        if self.split not in ("train", "test"):
            raise SlimkitError("--split must be train or test")
        name = self.captioner.split(":", 1)[0]
        CAPTIONERS.get(name)


def article(word: str) -> str:
    """``a seven``, ``an eight``, ``a one`` (spoken with a consonant)."""
    w = word.lower()
    vowel = w[:1] in "aeiou" and not w.startswith(("one", "uni", "use"))
    return ("an " if vowel else "a ") + word


def raw_images(data: ImageData, x: torch.Tensor) -> torch.Tensor:
    """Undo the set's normalisation: (N, C, H, W) in [0, 1]."""
    mean = torch.tensor(data.mean)[:, None, None]
    std = torch.tensor(data.std)[:, None, None]
    return (x * std + mean).clamp(0, 1)


def measure(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image (N, C, H, W in [0, 1]): ``ink`` (mean ink, 0..1), ``size`` (bounding-box area
    fraction of the pixels with ink above half the maximum), ``slant`` (x shift per unit of
    height from the second moments: > 0 leans right), ``cx`` (ink centroid, 0 = left edge)."""
    g = images.float().mean(1)  # (N, H, W)
    n, h, w = g.shape
    border = torch.cat([g[:, 0], g[:, -1], g[:, :, 0], g[:, :, -1]], 1)
    ink = (g - border.median(1).values[:, None, None]).abs()
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")  # fmt: skip
    mass = ink.sum((1, 2)).clamp(min=1e-8)
    mx = (ink * xx).sum((1, 2)) / mass
    my = (ink * yy).sum((1, 2)) / mass
    dx, dy = xx - mx[:, None, None], yy - my[:, None, None]
    mu11 = (ink * dx * dy).sum((1, 2)) / mass
    mu02 = (ink * dy * dy).sum((1, 2)) / mass
    # image rows grow downwards: a stroke leaning right has x falling as y grows (mu11 < 0)
    slant = -mu11 / mu02.clamp(min=1e-8)
    on = ink > 0.5 * ink.amax((1, 2), keepdim=True)
    rows, cols = on.any(2), on.any(1)

    def extent(m: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(m.shape[1]).expand_as(m)
        hi = torch.where(m, idx, -1).amax(1)
        lo = torch.where(m, idx, m.shape[1]).amin(1)
        return (hi - lo + 1).clamp(min=0).float()

    size = extent(rows) * extent(cols) / (h * w)
    return {"ink": ink.mean((1, 2)).numpy(), "size": size.numpy(), "slant": slant.numpy(),
            "cx": (mx / max(w - 1, 1)).numpy()}  # fmt: skip


def _terciles(v: np.ndarray, labels: np.ndarray, low: str, high: str) -> list[str]:
    """``low`` for the lower third of each class, ``high`` for the upper third, else ""."""
    out = [""] * len(v)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        lo, hi = np.quantile(v[idx], [1 / 3, 2 / 3])
        for i in idx:
            out[i] = low if v[i] < lo else high if v[i] > hi else ""
    return out


def attribute_words(images: torch.Tensor, labels: np.ndarray) -> list[dict[str, str]]:
    """The words of each image (dict thickness / size / slant / position)."""
    m = measure(images)
    thick = _terciles(m["ink"], labels, "thin", "bold")
    size = _terciles(m["size"], labels, "small", "large")
    out = []
    for i in range(len(labels)):
        s = m["slant"][i]
        slant = "slanted right" if s > SLANT else "slanted left" if s < -SLANT else "upright"
        cx = m["cx"][i]
        pos = "on the left" if cx < 0.45 else "on the right" if cx > 0.55 else "in the centre"
        out.append({"thickness": thick[i], "size": size[i], "slant": slant, "position": pos})
    return out


def _noun(cfg: DescribeConfig, data: ImageData) -> str:
    if cfg.noun:
        return cfg.noun
    if data.name in ("digits", "mnist-5k"):
        return "digit"
    return "shape" if data.name == "shapes" else "object"


def _class_names(data: ImageData) -> list[str]:
    if data.classes:
        return [str(c).replace("_", " ") for c in data.classes]
    return [f"class {c}" for c in range(data.num_classes)]


@CAPTIONERS.register("attributes", help="offline: words from measured ink, size, slant, position")
def describe_attributes(images, labels, data, cfg: DescribeConfig) -> list[str]:
    names, noun = _class_names(data), _noun(cfg, data)
    caps = []
    for w, y in zip(attribute_words(images, labels), labels):
        obj = names[int(y)] if cfg.prompt == "class" else noun
        adj = " ".join(a for a in (w["thickness"], w["size"]) if a)
        head = article(f"{adj} {obj}" if adj else obj)
        caps.append(f"{head} {w['slant']}, {w['position']}")
    return caps


@CAPTIONERS.register("class-name", help="offline: the class name only ('a seven'), a control")
def describe_class_name(images, labels, data, cfg: DescribeConfig) -> list[str]:
    names = _class_names(data)
    if cfg.prompt == "agnostic":
        raise SlimkitError("--captioner class-name names the class; it has no agnostic prompt")
    return [article(names[int(y)]) for y in labels]


@CAPTIONERS.register(
    "hf",
    help="online: hf:MODEL, a transformers captioner that continues a text prefix (BLIP-style)",
)
def describe_hf(images, labels, data, cfg: DescribeConfig) -> list[str]:
    """Captions from a transformers image-text-to-text model (a hub id or a local directory).
    Class-conditioned: the model continues "a photo of a <class>," (BLIP's conditional
    captioning); class-agnostic: it starts from an empty prefix. The caption is the whole
    generated text, prefix included."""
    model = cfg.captioner.split(":", 1)[1] if ":" in cfg.captioner else ""
    if not model:
        raise SlimkitError("name the model: --captioner hf:Salesforce/blip-image-captioning-base")
    from PIL import Image
    from transformers import pipeline

    try:
        pipe = pipeline("image-text-to-text", model=model)
    except Exception as e:  # offline, unknown id, not an image-to-text model
        raise SlimkitError(f"cannot load image-to-text model {model!r}: {str(e)[:200]}") from None
    names = _class_names(data)
    caps: list[str] = []
    for i in range(0, len(labels), cfg.batch_size):
        batch, ys = images[i : i + cfg.batch_size], labels[i : i + cfg.batch_size]
        pil = [Image.fromarray((b.permute(1, 2, 0).numpy() * 255).astype(np.uint8).squeeze())
               .convert("RGB") for b in batch]  # fmt: skip
        prefix = [f"a photo of {article(names[int(y)])}," if cfg.prompt == "class" else ""
                  for y in ys]  # fmt: skip
        outs = pipe(images=pil, text=prefix, max_new_tokens=cfg.max_new_tokens)
        caps += [(o[0] if isinstance(o, list) else o)["generated_text"].strip() for o in outs]
    if len(caps) != len(labels):
        raise SlimkitError(f"{model} returned {len(caps)} captions for {len(labels)} images")
    return caps


def split_images(cfg_data: str, img_size: int, split: str, train_subset: int = 0):
    """(ImageData, x, labels, ids) of the split a run trains on (``train_subset`` as
    train-classifier picks it) or of the test split."""
    data = load_images(cfg_data, img_size)
    ds, ids = (data.train, data.train_ids) if split == "train" else (data.test, data.test_ids)
    x, y = ds.tensors
    ids = list(ids)
    if split == "train" and train_subset:
        if train_subset > len(y):
            raise SlimkitError(
                f"--train-subset {train_subset} exceeds the {len(y)} training images"
            )
        idx = stratified_subset(y.numpy(), train_subset)
        x, y, ids = x[torch.from_numpy(idx)], y[torch.from_numpy(idx)], [ids[i] for i in idx]
    return data, x, y.numpy(), ids


def describe(cfg: DescribeConfig, *, out: str | Path) -> dict:
    """Write ``out`` (JSON lines: id, caption, split, label) for the chosen split; return a
    summary (count, split fingerprint, three examples)."""
    data, x, y, ids = split_images(cfg.data, cfg.img_size, cfg.split, cfg.train_subset)
    fn = CAPTIONERS.get(cfg.captioner.split(":", 1)[0])
    caps = fn(raw_images(data, x), y, data, cfg)
    fp = split_fingerprint(data.name, cfg.split, ids)
    write_captions(out, ids, caps, fp, y)
    words = sum(len(c.split()) for c in caps) / len(caps)
    log.info("%d captions of %s %s (split %s), %.1f words each, e.g. %r", len(caps), data.name,
             cfg.split, fp, words, caps[0])  # fmt: skip
    step = max(len(caps) // 3, 1)
    return {"out": str(out), "count": len(caps), "split": fp, "mean_words": words,
            "examples": [f"{ids[i]}: {caps[i]}" for i in range(0, len(caps), step)][:3],
            "distinct": len(set(caps))}  # fmt: skip
