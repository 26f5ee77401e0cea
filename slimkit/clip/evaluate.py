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
