"""Super-resolve images and score them: ``super_resolve`` (any size: the LR image is padded to
the U-Net's multiple and the result cut back), ``evaluate_images`` (PSNR / SSIM per protocol,
seconds per image, per method, with bicubic as the floor), ``side_by_side`` (LR, bicubic,
each model, HR, and a zoomed crop of each) and ``eps_l1_by_t`` (the training objective per
band of diffusion steps on held-out images)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.sr.data import HRImage, make_pair
from slimkit.sr.degrade import crop_to_multiple, upsample
from slimkit.sr.diffusion import diffusion_loss, sample
from slimkit.sr.metrics import PROTOCOLS, psnr_ssim
from slimkit.sr.models import RRDBNet, SRDiff


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3] (clipped, rounded)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def super_resolve(model: torch.nn.Module, lr: torch.Tensor, scale: int, *, sampler: str = "ddim",
                  steps: int = 0, seed: int = 0, compat_scale: bool | None = None, tile: int = 0,
                  tile_overlap: int = 8) -> torch.Tensor:  # fmt: skip
    """SR of one LR image ``lr`` [3, h, w] in [-1, 1] -> [3, s*h, s*w] in [-1, 1] (not clipped).
    ``model``: an :class:`SRDiff` (sampled with ``sampler`` / ``steps`` from noise seeded by
    ``seed``) or an :class:`RRDBNet` (regression). ``compat_scale`` (default: as the model was
    trained; True for official checkpoints) makes U(LR) from LR/256 as SRDiff's code does.
    ``tile`` > 0 (LR pixels): the diffusion model's denoiser runs on overlapping windows, blended
    at every step (memory for large images; see :class:`slimkit.sr.diffusion.TiledDenoiser`)."""
    if compat_scale is None:
        compat_scale = bool(getattr(model, "compat_scale", False))
    dev = next(model.parameters()).device
    h, w = lr.shape[1:]
    m = model.cfg.multiple if isinstance(model, SRDiff) else 1
    ph, pw = (-h) % m, (-w) % m
    x = lr[None].to(dev)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    if isinstance(model, RRDBNet):
        out = model(x)[0]
    else:
        u8 = (x + 1) * 127.5
        up = upsample(u8.double() / (256.0 if compat_scale else 255.0), scale).float() * 2 - 1
        out = sample(model, x, up, sampler=sampler, steps=steps, tile=tile, tile_overlap=tile_overlap,
                     generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return out[0, :, : scale * h, : scale * w].cpu()


def evaluate_images(models: dict[str, torch.nn.Module], images: list[HRImage], scale: int, *,
                    protocols=PROTOCOLS, sampler: str = "ddim", steps: int = 0, seed: int = 0,
                    device: torch.device | str = "cpu", pictures: Path | None = None, tile: int = 0,
                    tile_overlap: int = 8, samples: int = 1) -> dict:  # fmt: skip
    """Score bicubic and every model on ``images`` (HR; LR made by MATLAB bicubic 1/s).

    Returns ``{"rows": [{image, method, protocol, psnr, ssim}], "summary": {method: {protocol:
    {psnr, ssim}}}, "seconds_per_image": {method: s}}``; with ``pictures`` a side-by-side PNG per
    image is written there. ``samples`` = K > 1 draws K samples of each diffusion model (sampler
    seeds ``seed`` .. ``seed + K - 1``): its row is then the mean of the K samples' scores (a
    less noisy estimate of one sample's), and a row ``"<name> (mean of K)"`` scores the average
    of the K samples, an estimate of the model's posterior mean (higher PSNR, less detail: the
    perception-distortion trade-off). Seconds per image are per sample."""
    if samples < 1:
        raise SlimkitError(f"samples must be >= 1 (got {samples})")
    rows, seconds = [], {}
    for m in models.values():
        m.to(device).eval()
    for im in images:
        hr = crop_to_multiple(im.hr, scale)
        pair = make_pair(hr, scale)
        outs = {"bicubic": to_uint8(pair["lr_up"])}
        scored: dict[str, list[np.ndarray]] = {"bicubic": [outs["bicubic"]]}
        for name, m in models.items():
            k = samples if isinstance(m, SRDiff) else 1
            t0 = time.perf_counter()
            srs = [super_resolve(m, pair["lr"], scale, sampler=sampler, steps=steps, seed=seed + j,
                                 tile=tile, tile_overlap=tile_overlap) for j in range(k)]  # fmt: skip
            seconds.setdefault(name, []).append((time.perf_counter() - t0) / k)
            outs[name] = to_uint8(srs[0])
            scored[name] = [to_uint8(x) for x in srs]
            if k > 1:
                outs[f"{name} (mean of {k})"] = to_uint8(torch.stack(srs).mean(0))
                scored[f"{name} (mean of {k})"] = [outs[f"{name} (mean of {k})"]]
        for name, srs in scored.items():
            for p in protocols:
                rs = [psnr_ssim(sr, hr, p, scale) for sr in srs]
                rows.append({"image": im.key, "method": name, "protocol": rs[0]["protocol"],
                             "psnr": float(np.mean([r["psnr"] for r in rs])),
                             "ssim": float(np.mean([r["ssim"] for r in rs]))})  # fmt: skip
        if pictures is not None:
            side_by_side(
                to_uint8(pair["lr"]), outs, hr, Path(pictures) / f"{im.key.replace('/', '_')}.png"
            )
    summary: dict = {}
    for r in rows:
        d = summary.setdefault(r["method"], {}).setdefault(r["protocol"], {"psnr": [], "ssim": []})
        d["psnr"].append(r["psnr"])
        d["ssim"].append(r["ssim"])
    summary = {m: {p: {k: float(np.mean(v)) for k, v in d.items()} for p, d in ps.items()}
               for m, ps in summary.items()}  # fmt: skip
    return {"rows": rows, "summary": summary,
            "seconds_per_image": {k: float(np.mean(v)) for k, v in seconds.items()}}  # fmt: skip


def side_by_side(lr: np.ndarray, outs: dict[str, np.ndarray], hr: np.ndarray, path: Path) -> None:
    """One PNG: top row LR (nearest x s), each of ``outs`` (bicubic, models), HR; bottom row the
    same zoomed on the centre crop (a quarter of the side, nearest x 2), labels above."""
    from PIL import Image, ImageDraw

    h, w = hr.shape[:2]
    s = h // lr.shape[0]
    panels = {"LR": np.repeat(np.repeat(lr, s, 0), s, 1), **outs, "HR": hr}
    ch, cw = max(h // 4, 8), max(w // 4, 8)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    zh, zw = min(2 * ch, h), min(2 * cw, w)
    label = 14
    canvas = Image.new("RGB", (len(panels) * (w + 4), label + h + 4 + zh), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, img) in enumerate(panels.items()):
        x = i * (w + 4)
        draw.text((x + 2, 1), name, fill="black")
        canvas.paste(Image.fromarray(img), (x, label))
        crop = Image.fromarray(np.ascontiguousarray(img[y0 : y0 + ch, x0 : x0 + cw]))
        canvas.paste(crop.resize((zw, zh), Image.NEAREST), (x, label + h + 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


@torch.no_grad()
def eps_l1_by_t(model: SRDiff, images: list[HRImage], scale: int, *,
                e_maps: list[np.ndarray] | None = None, coefficient: str = "code",
                buckets: int = 5, seed: int = 0) -> list[float]:  # fmt: skip
    """The model's noise-prediction L1, |eps' - eps_theta(x_t, t, RRDB(lr))| averaged over
    pixels and ``images`` (whole images), at every step t, then per band of T / ``buckets``
    consecutive steps (t = 0 first). Each model is scored on its own training target: eps' =
    eps + c_t E with ``e_maps`` (one SPE map per image, HR size; SAM-DiffSR and its controls)
    and ``coefficient``, eps itself without. The noise of image i is drawn from ``seed`` + i and
    is the same at every t and for every model, so models compare on common noise."""
    T = model.schedule.T
    if not 1 <= buckets <= T:
        raise ValueError(f"buckets must be in 1..{T} (got {buckets})")
    dev = next(model.parameters()).device
    per_t = torch.zeros(T, dtype=torch.float64)
    ts = torch.arange(T, device=dev)
    for i, im in enumerate(images):
        p = make_pair(im.hr, scale)
        hr, lr, up = (p[k][None].to(dev).expand(T, -1, -1, -1) for k in ("hr", "lr", "lr_up"))
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(hr.shape[1:], generator=g).to(dev).expand(T, -1, -1, -1)
        e = None
        if e_maps is not None:
            m = np.asarray(e_maps[i], np.float32)[: hr.shape[2], : hr.shape[3]]
            e = torch.from_numpy(m)[None, None].to(dev).expand(T, -1, -1, -1)
        per_t += diffusion_loss(model, hr, lr, up, ts, noise, e, coefficient).double().cpu()
    per_t /= max(len(images), 1)
    edges = [b * T // buckets for b in range(buckets + 1)]
    return [float(per_t[a:b].mean()) for a, b in zip(edges, edges[1:])]
