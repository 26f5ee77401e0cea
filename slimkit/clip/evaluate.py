"""Zero-shot classification (top-1 / top-5 with a prompt ensemble) and image <-> text retrieval
(R@1/5/10 both ways) of a dual encoder.

Retrieval counts a hit when the retrieved item's caption is the same text as the query's own
caption: generated sets repeat captions (same class and attributes), and an identical caption
is an equally correct answer. With unique captions this is the usual pair retrieval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    dev = model.logit_scale.device
    return torch.cat([model.encode_image(images[i : i + batch_size].to(dev)).float().cpu()
                      for i in range(0, len(images), batch_size)])  # fmt: skip


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    model.eval()
    dev = model.logit_scale.device
    ids, _ = tokenizer(texts, model.arch.context_length)
    return torch.cat([model.encode_text(ids[i : i + batch_size].to(dev)).float().cpu()
                      for i in range(0, len(ids), batch_size)])  # fmt: skip


def class_embeddings(
    model, tokenizer, class_names: list[str], templates: list[str]
) -> torch.Tensor:
    """(classes, d): the normalised mean of each class's prompt embeddings (CLIP's ensemble)."""
    if not templates or not class_names:
        raise SlimkitError("zero-shot needs class names and at least one prompt template")
    e = embed_texts(model, tokenizer, [t.format(c) for c in class_names for t in templates])
    return F.normalize(e.view(len(class_names), len(templates), -1).mean(1), dim=-1)


def zeroshot(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
             templates: list[str]) -> dict:  # fmt: skip
    """Top-1 / top-5 (%) of classifying ``images`` by their nearest class prompt embedding."""
    cls = class_embeddings(model, tokenizer, class_names, templates)
    sim = embed_images(model, images) @ cls.T
    top = sim.topk(min(5, len(class_names)), 1).indices
    y = labels[:, None]
    return {"top1": 100 * (top[:, :1] == y).any(1).float().mean().item(),
            "top5": 100 * (top == y).any(1).float().mean().item()}  # fmt: skip


def recall_at(sim: torch.Tensor, relevant: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """R@K (%) of rows of ``sim`` (queries x items) given the bool matrix of relevant items."""
    order = sim.argsort(1, descending=True)
    hit_rank = relevant.gather(1, order).float().argmax(1)  # first relevant position
    return {k: 100 * (hit_rank < k).float().mean().item() for k in ks}


def retrieval(img: torch.Tensor, txt: torch.Tensor, captions: list[str],
              labels: torch.Tensor | None = None) -> dict:  # fmt: skip
    """R@1/5/10 image->text and text->image for pairs (img[i], txt[i]); a hit is any item whose
    caption equals the query's caption. With class labels, also class-aware image->text R@1."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions])
    same = key[:, None] == key[None, :]
    sim = img @ txt.T
    i2t, t2i = recall_at(sim, same), recall_at(sim.T, same)
    out = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
    if labels is not None and (labels >= 0).all():
        out["i2t_class_r1"] = recall_at(sim, labels[:, None] == labels[None, :], (1,))[1]
    return out


GENERIC_TEMPLATES = ["a {}", "a photo of a {}", "a picture of a {}"]


def _normalise(x: torch.Tensor, arch) -> torch.Tensor:
    mean = torch.tensor(arch.mean or [0.5] * x.shape[1])[:, None, None]
    std = torch.tensor(arch.std or [0.5] * x.shape[1])[:, None, None]
    return (x - mean) / std


def _imagefolder(path: str, arch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from pathlib import Path

    from torchvision import datasets, transforms

    p = Path(path)
    if not p.is_dir():
        raise SlimkitError(f"imagefolder: {p} is not a directory of class sub-folders")
    tf = [transforms.Resize((arch.img_size, arch.img_size))]
    if arch.in_chans == 1:
        tf.append(transforms.Grayscale())
    ds = datasets.ImageFolder(str(p), transform=transforms.Compose([*tf, transforms.ToTensor()]))
    if len(ds) == 0 or len(ds.classes) < 2:
        raise SlimkitError(f"imagefolder: {p} needs at least two class folders with images")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    names = [c.replace("_", " ") for c in ds.classes]
    return _normalise(x, arch), torch.tensor(ds.targets), names


def _templates(spec: str, named: dict[str, list[str]]) -> list[str]:
    from pathlib import Path

    if spec in named:
        return named[spec]
    if spec == "default":
        return GENERIC_TEMPLATES
    p = Path(spec)
    if not p.is_file():
        raise SlimkitError(
            f"--templates {spec!r}: not one of {sorted({'default', *named})} nor a file of "
            "templates (one per line, with {} for the class name)"
        )
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not lines or any("{}" not in ln for ln in lines):
        raise SlimkitError(f"--templates {p}: every line needs {{}} where the class name goes")
    return lines


def _caption_split(spec: str, arch, split: str):
    from slimkit.clip.captions import load_pairs

    if split not in ("train", "val", "test"):
        raise SlimkitError(f"--split must be train, val or test (got {split!r})")
    data = load_pairs(spec, arch.img_size)
    if data.in_chans != arch.in_chans:
        raise SlimkitError(f"{spec} has {data.in_chans} channels, the model takes {arch.in_chans}")
    return data, getattr(data, split)


def zeroshot_run(run: str, data: str, templates: str = "default", split: str = "test") -> dict:
    """Zero-shot top-1 / top-5 of a trained run on ``imagefolder:PATH`` (class = folder name)
    or on a split of a class-labelled caption set."""
    from slimkit.clip.model import load_clip

    model, tok = load_clip(run)
    if data.startswith("imagefolder:"):
        x, y, names = _imagefolder(data.split(":", 1)[1], model.arch)
        prompts = _templates(templates, {})
    else:
        d, s = _caption_split(data, model.arch, split)
        if not d.class_names:
            raise SlimkitError(f"{data} has no classes: use imagefolder:PATH or a labelled set")
        x, y, names, prompts = s.images, s.labels, d.class_names, _templates(templates, d.templates)
    return {"images": len(y), "classes": len(names), "templates": prompts,
            **zeroshot(model, tok, x, y, names, prompts)}  # fmt: skip


def retrieve_run(run: str, data: str, split: str = "test") -> dict:
    """R@1/5/10 both ways of a trained run on every pair of ``pairs:FILE`` or WebDataset shards
    (normalised with the run's statistics) or on a split of a caption set."""
    from slimkit.clip.captions import read_pair_images
    from slimkit.clip.model import load_clip

    model, tok = load_clip(run)
    labels = None
    if data.startswith("pairs:"):
        x, caps = read_pair_images(data.split(":", 1)[1], model.arch.img_size, model.arch.in_chans)
        x = _normalise(torch.from_numpy(x), model.arch)
    else:
        _, s = _caption_split(data, model.arch, split)
        x, caps, labels = s.images, s.captions, s.labels
    img, txt = embed_images(model, x), embed_texts(model, tok, caps)
    return {"pairs": len(caps), **retrieval(img, txt, caps, labels)}
