"""The ``slimkit sr`` command group (SAM-DiffSR / SRDiff super-resolution): make-masks, train,
upscale, eval."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from slimkit.core.commands import Invocation, arg, command, group
from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit")

group("sr", help="diffusion super-resolution (SRDiff, SAM-DiffSR): slimkit sr --help")
RUN = ("out", "resume", "overwrite")
SAMPLER_ARGS = [
    arg("--sampler", default="ddim", choices=["ddim", "ddpm"],
        help="ddpm: all T ancestral steps; ddim: --steps strided deterministic steps"),
    arg("--steps", type=int, default=0, help="sampler steps (0 = T)"),
    arg("--seed", type=int, default=0, help="seed of the sampler's noise"),
    arg("--samples", type=int, default=1,
        help="K samples (seeds SEED..SEED+K-1) averaged: the posterior-mean estimate, higher PSNR, "
             "less detail; eval also scores the K samples one by one"),
    arg("--tile", type=int, default=0,
        help="run the denoiser on overlapping LR windows of this size (large images; 0 = whole image)"),
    arg("--tile-overlap", type=int, default=8, help="LR pixels shared by neighbouring windows"),
    arg("--device", default="auto", help="auto, cpu, cuda[:N]"),
]  # fmt: skip


@command("make-masks", group="sr", run=("out", "overwrite"), out_help="folder of SPE maps to create",
         args=[arg("--images", required=True, help="folder of HR images, or photos[:NAME,...] (bundled)"),
               arg("--mask-source", default="slic",
                   help="slic[:N], felzenszwalb[:SCALE], slimkit-sam:RUN or sam:CKPT"),
               arg("--points-per-side", type=int, default=32, help="SAM sources: everything grid points per side"),
               arg("--pred-iou-thresh", type=float, default=0.88,
                   help="SAM sources: minimum predicted IoU (SAM's 0.88; lower it for a small SAM trained here)"),
               arg("--stability-thresh", type=float, default=0.95,
                   help="SAM sources: minimum stability score (SAM's 0.95)")],
         help="segment every HR image and store its structural position encoding",
         description="Segment every HR image (SAM everything mode, or superpixels) and write its "
                     "SPE map (float32 .npy, HR size, keyed like the image) for sr train --masks.")  # fmt: skip
def make_masks(inv: Invocation) -> int:
    import numpy as np

    from slimkit.core.rundir import atomic_output
    from slimkit.sr.data import load_hr_images, mask_file
    from slimkit.sr.masks import mask_source
    from slimkit.sr.structural_position_encoding import encode_masks

    ns = inv.ns
    if ns.images == "synthetic":
        raise SlimkitError("synthetic images carry their segments: train with --masks segments")
    from slimkit.sam.everything import EverythingConfig
    from slimkit.sr.masks import SAM_SOURCES

    sam = ns.mask_source.partition(":")[0] in SAM_SOURCES
    everything = EverythingConfig(mode="dense", points_per_side=ns.points_per_side,
                                  pred_iou_thresh=ns.pred_iou_thresh,
                                  stability_score_thresh=ns.stability_thresh)  # fmt: skip
    source = mask_source(ns.mask_source, everything)
    images = load_hr_images(ns.images)
    index = {}
    with atomic_output(ns.out, overwrite=ns.overwrite) as tmp:
        for im in images:
            masks = source(im.hr)
            if not masks:
                hint = (f"; a small SAM may need lower filters than --pred-iou-thresh {ns.pred_iou_thresh} "
                        f"--stability-thresh {ns.stability_thresh}" if sam else "")  # fmt: skip
                log.warning("%s: no segment (its SPE map is all zeros)%s", im.key, hint)
            e = encode_masks(masks, im.hr.shape[:2])
            f = mask_file(tmp, im.key)
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, e)
            index[im.key] = {"shape": list(e.shape), "segments": len(masks),
                             "e_min": float(e.min()), "e_max": float(e.max())}  # fmt: skip
        (tmp / "index.json").write_text(
            json.dumps(
                {
                    "mask_source": ns.mask_source,
                    **({"everything": asdict(everything)} if sam else {}),
                    "images": index,
                },
                indent=1,
            )
            + "\n"  # fmt: skip
        )
    n = sum(v["segments"] for v in index.values())
    empty = sum(not v["segments"] for v in index.values())
    if empty:
        log.warning("%d of %d images have no segment", empty, len(index))
    print(f"{ns.out}: SPE maps of {len(index)} images ({n} segments, source {ns.mask_source})")
    return 0


@command("train", group="sr", configs=["slimkit.sr.train:SRTrainConfig"], run=RUN,
         help="train the RRDB encoder (--stage rrdb) or the diffusion model (SRDiff / SAM-DiffSR)",
         description="Train SRDiff's RRDB LR encoder (--stage rrdb, L1) or the residual diffusion "
                     "model on top of it; --masks turns on SAM-DiffSR's structure-modulated noise.")  # fmt: skip
def train(inv: Invocation) -> int:
    from slimkit.sr.train import train_sr

    r = train_sr(*inv.configs, **inv.run_kwargs)
    if r:
        heads = ", ".join(f"{k} {v:.2f}" for k, v in r["headline"].items())
        print(f"{r['out']}: {heads} dB on {r['protocol']}")
    return 0


def _model(path: str, device):
    from slimkit.sr.models import load_run

    p = Path(path)
    if not p.exists():
        raise SlimkitError(f"model {p} does not exist")
    model, info = load_run(p, "diffusion")
    return model.to(device).eval(), info


@command("upscale", group="sr", run=("out", "overwrite"), out_help="SR image (PNG) to write",
         args=[arg("image", help="the LR image to super-resolve"),
               arg("--model", required=True, help="sr train run (diffusion) or an official SRDiff / SAM-DiffSR .ckpt"),
               arg("--scale", type=int, default=0, help="check: the model's factor (0 = the model's)"),
               *SAMPLER_ARGS],
         help="super-resolve one image (no masks, no SAM)",
         description="Super-resolve one image with a trained model; inference needs neither masks "
                     "nor SAM, and costs the same for SRDiff and SAM-DiffSR.")  # fmt: skip
def upscale(inv: Invocation) -> int:
    import time

    import torch
    from PIL import Image

    from slimkit.core.dist import resolve_device
    from slimkit.core.rundir import atomic_output
    from slimkit.sr.data import read_image, to_signed
    from slimkit.sr.evaluate import super_resolve, to_uint8
    from slimkit.sr.models import SRDiff

    ns = inv.ns
    if not Path(ns.image).is_file():
        raise SlimkitError(f"image {ns.image} does not exist")
    model, _ = _model(ns.model, resolve_device(ns.device))
    s = model.cfg.scale
    if ns.scale and ns.scale != s:
        raise SlimkitError(f"--scale {ns.scale}: the model {ns.model} is x{s}")
    if ns.samples < 1:
        raise SlimkitError(f"--samples must be >= 1 (got {ns.samples})")
    lr = to_signed(read_image(ns.image))
    t0 = time.perf_counter()
    k = ns.samples if isinstance(model, SRDiff) else 1
    srs = [super_resolve(model, lr, s, sampler=ns.sampler, steps=ns.steps, seed=ns.seed + j,
                         tile=ns.tile, tile_overlap=ns.tile_overlap) for j in range(k)]  # fmt: skip
    sr = to_uint8(torch.stack(srs).mean(0))
    sec = time.perf_counter() - t0
    with atomic_output(ns.out, overwrite=ns.overwrite, directory=False) as tmp:
        Image.fromarray(sr).save(tmp, format="PNG")
    print(f"{ns.out}: {lr.shape[2]} x {lr.shape[1]} -> {sr.shape[1]} x {sr.shape[0]} (x{s}, "
          f"{ns.sampler} {ns.steps or model.cfg.timesteps} steps"
          f"{f', mean of {k} samples' if k > 1 else ''}) in {sec:.1f} s")  # fmt: skip
    return 0


@command("eval", group="sr", run=("out", "overwrite"), out_help="folder for metrics.md / .json and side-by-side PNGs",
         args=[arg("models", nargs="+", help="sr train runs (diffusion) or official checkpoints, e.g. SRDiff then SAM-DiffSR"),
               arg("--images", default="photos", help="HR images: a folder, photos[:NAME,...] or synthetic"),
               arg("--protocol", default="both", choices=["basicsr", "pyiqa", "srdiff", "both"],
                   help="basicsr: Y, crop = scale, uint8; pyiqa: Y (ycbcr), no crop, float; srdiff: "
                        "the same as pyiqa (what SAM-DiffSR's evaluation script reports)"),
               arg("--crop", type=int, default=0, help="score the centre CROP x CROP of each HR image (0 = whole)"),
               arg("--n", type=int, default=0, help="synthetic: number of images"),
               *SAMPLER_ARGS],
         help="PSNR / SSIM per protocol and side-by-side pictures",
         description="Score bicubic and each model on HR images (LR by MATLAB bicubic), PSNR / SSIM "
                     "with the protocol named beside every number, and one side-by-side PNG per image.")  # fmt: skip
def evaluate(inv: Invocation) -> int:
    from slimkit.core.dist import resolve_device
    from slimkit.core.rundir import atomic_output
    from slimkit.sr.data import load_hr_images
    from slimkit.sr.evaluate import evaluate_images
    from slimkit.sr.metrics import PROTOCOLS

    ns = inv.ns
    device = resolve_device(ns.device)
    models, scales = {}, set()
    for p in ns.models:
        m, info = _model(p, device)
        name = info.get("method") or Path(p).stem
        models[name if name not in models else f"{name} ({p})"] = m
        scales.add(m.cfg.scale)
    if len(scales) != 1:
        raise SlimkitError(f"the models have different scales {sorted(scales)}")
    scale = scales.pop()
    images = load_hr_images(ns.images, n=ns.n or 8, size=64, seed=2_000_003)
    if ns.crop:
        for im in images:
            h, w = im.hr.shape[:2]
            c = min(ns.crop, h, w)
            im.hr = im.hr[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
    protocol = "pyiqa" if ns.protocol == "srdiff" else ns.protocol
    protocols = PROTOCOLS if protocol == "both" else (protocol,)
    with atomic_output(ns.out, overwrite=ns.overwrite) as tmp:
        res = evaluate_images(models, images, scale, protocols=protocols, sampler=ns.sampler, steps=ns.steps,
                              seed=ns.seed, device=device, pictures=tmp, tile=ns.tile,
                              tile_overlap=ns.tile_overlap, samples=ns.samples)  # fmt: skip
        res.update({"images": ns.images, "crop": ns.crop, "scale": scale, "sampler": ns.sampler,
                    "steps": ns.steps, "seed": ns.seed, "samples": ns.samples, "models": ns.models,
                    "tile": ns.tile, "tile_overlap": ns.tile_overlap})  # fmt: skip
        (tmp / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")
        (tmp / "metrics.md").write_text(metrics_table(res))
    print(metrics_table(res), end="")
    return 0


def metrics_table(res: dict) -> str:
    """The summary as a Markdown table, the protocol beside every number."""
    lines = [f"x{res['scale']} on {res['images']} ({len({r['image'] for r in res['rows']})} images), "
             f"{res['sampler']} sampler, steps {res['steps'] or 'T'}, seed {res['seed']}"
             + (f", {res['samples']} samples per image (seeds {res['seed']}..{res['seed'] + res['samples'] - 1}; "
                "a model's row is the mean of its samples' scores, '(mean of K)' scores their average)"
                if res.get("samples", 1) > 1 else ""), "",
             "| method | protocol | PSNR (dB) | SSIM | seconds / image |", "|---|---|---|---|---|"]  # fmt: skip
    for m, ps in res["summary"].items():
        sec = res["seconds_per_image"].get(m)
        for p, v in ps.items():
            lines.append(
                f"| {m} | {p} | {v['psnr']:.2f} | {v['ssim']:.4f} | {'' if sec is None else f'{sec:.2f}'} |"
            )
    return "\n".join(lines) + "\n"
