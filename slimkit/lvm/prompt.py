"""Visual prompting: (input, output) example pairs + a query image -> the answer image.

The prompt is [BOS] ex_in_1 ex_out_1 ... ex_in_k ex_out_k query, ``tokens_per_image`` codes per
image; the model then generates the answer's codes. Decoding is greedy [our default, and what
DeLVM's demo really does: it sets temperature / top_p without ``do_sample``], restricted to the
codebook's ids (never BOS). The *token budget* bounds the whole sequence (context + generated);
a prompt that leaves no room for one image is refused, and a budget below the model's context is
respected exactly (generation stops at the budget; a short answer is filled with code 0 and
reported as truncated).

Metrics per task kind: PSNR (dB) against the reference answer for image tasks; for mask tasks
(edges, segment) the mIoU of foreground / background after thresholding the luminance at 0.25
(colour-agnostic, spec pitfall 5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError
from slimkit.lvm.vq import psnr


@torch.no_grad()
def generate_codes(model, prompt: torch.Tensor, n_new: int, codebook: int, budget: int = 0):
    """Greedily extend ``prompt`` (int64 [L]) by up to ``n_new`` codes (ids < ``codebook``),
    never letting the sequence exceed ``budget`` tokens (0 = the model's context). Returns the
    new codes (int64 [<= n_new])."""
    limit = (
        budget
        or int(getattr(model.config, "max_position_embeddings", 0) or 0)
        or len(prompt) + n_new
    )
    room = limit - len(prompt)
    if room < 1:
        raise SlimkitError(
            f"the prompt has {len(prompt)} tokens; the budget of {limit} leaves no room to generate"
        )
    n = min(n_new, room)
    device = next(model.parameters()).device
    ids = prompt.to(device)[None]
    out, past = [], None
    x = ids
    for _ in range(n):
        res = model(input_ids=x, cache=past, use_cache=True)
        past = res.cache
        logits = res.logits[0, -1, :codebook].float()
        nxt = logits.argmax().view(1, 1)
        out.append(nxt)
        x = nxt
    return torch.cat(out, 1)[0].cpu() if out else torch.zeros(0, dtype=torch.long)


def build_prompt(vq, examples: list[torch.Tensor], query: torch.Tensor, bos: int) -> torch.Tensor:
    """[BOS] + the codes of ``examples`` (in, out, in, out, ...) and ``query``, images [3, S, S]."""
    imgs = torch.stack([*examples, query])
    codes = vq.encode(imgs).reshape(len(imgs), -1).cpu()
    return torch.cat([torch.tensor([bos]), codes.reshape(-1)])


@torch.no_grad()
def answer(model, vq, examples: list[torch.Tensor], query: torch.Tensor, bos: int, budget: int = 0):
    """The answer image [3, S, S] and whether the budget truncated its codes."""
    prompt = build_prompt(vq, examples, query, bos)
    T = vq.cfg.tokens_per_image
    new = generate_codes(model, prompt, T, vq.cfg.codebook, budget)
    truncated = len(new) < T
    codes = torch.cat([new, torch.zeros(T - len(new), dtype=torch.long)])
    return vq.decode(codes[None])[0].cpu(), truncated


def mask_miou(pred: torch.Tensor, ref: torch.Tensor, threshold: float = 0.25) -> float:
    """mIoU of foreground / background (luminance > ``threshold``) of two images [3, S, S]."""
    a, b = pred.float().mean(0) > threshold, ref.float().mean(0) > threshold
    ious = []
    for fa, fb in ((a, b), (~a, ~b)):
        union = (fa | fb).sum()
        if union > 0:
            ious.append(float((fa & fb).sum() / union))
    return sum(ious) / len(ious) if ious else 1.0


def task_metric(kind: str, pred: torch.Tensor, ref: torch.Tensor) -> tuple[str, float]:
    if kind == "mask":
        return "miou", mask_miou(pred, ref)
    return "psnr", float(psnr(pred[None], ref[None])[0])


@torch.no_grad()
def evaluate_prompts(
    model, vq, sentences, split: str = "test", n: int = 0, budget: int = 0
) -> dict:
    """Prompt with every sentence of ``split`` (its first P-1 pairs as examples, the last pair's
    input as the query) and score the answer against the last pair's target: per task the mean
    PSNR or mIoU, and the same metric of the tokenizer's own reconstruction of the target (the
    ceiling a perfect model reaches)."""
    from slimkit.lvm.sentences import to_float

    meta, sp = sentences.meta, sentences.split(split)
    res: dict[str, dict] = {}
    count = len(sp["task"]) if not n else min(n, len(sp["task"]))
    for i in range(count):
        task = meta["tasks"][int(sp["task"][i])]
        kind = meta["kinds"][task]
        pairs = to_float(sp["pairs"][i])  # [P, 2, 3, S, S]
        ex = [im for p in pairs[:-1] for im in p]
        pred, _ = answer(model, vq, ex, pairs[-1, 0], meta["bos"], budget)
        ref = pairs[-1, 1]
        name, v = task_metric(kind, pred, ref)
        _, ceil = task_metric(kind, vq.decode(vq.encode(ref[None]))[0].cpu(), ref)
        r = res.setdefault(task, {"metric": name, "values": [], "ceiling": []})
        r["values"].append(v)
        r["ceiling"].append(ceil)
    return {t: {"metric": r["metric"], "value": sum(r["values"]) / len(r["values"]),
                "tokenizer_ceiling": sum(r["ceiling"]) / len(r["ceiling"]), "prompts": len(r["values"])}
            for t, r in res.items()}  # fmt: skip


def save_grid(rows: list[list[torch.Tensor]], path: str | Path, scale: int = 4) -> None:
    """A picture grid: one row per prompt (examples, query, answer[, reference]), 2 px gaps."""
    import numpy as np
    from PIL import Image

    S = rows[0][0].shape[-1]
    width = max(len(r) for r in rows)
    grid = np.full((len(rows) * (S + 2), width * (S + 2), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            a = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            grid[i * (S + 2) : i * (S + 2) + S, j * (S + 2) : j * (S + 2) + S] = a
    img = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    )
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.png")
    img.save(tmp)
    tmp.replace(path)


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file as [3, size, size] in [0, 1] (short side resized, centre crop)."""
    import numpy as np
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"image {p} does not exist")
    try:
        im = Image.open(p).convert("RGB")
    except Exception as e:
        raise SlimkitError(f"cannot read {p} as an image ({e})") from None
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


def write_image(img: torch.Tensor, path: str | Path) -> None:
    from PIL import Image

    a = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial" + (path.suffix or ".png"))
    Image.fromarray(a).save(tmp, format="PNG")
    tmp.replace(path)
