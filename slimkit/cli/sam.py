"""The ``slimkit sam`` command group: predict, everything, train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slimkit.core.commands import Invocation, arg, command, group
from slimkit.core.errors import SlimkitError

group("sam", help="segment anything (SAM, MobileSAM, TinySAM checkpoints): slimkit sam --help")

MODEL_ARGS = [
    arg("image"),
    arg("--checkpoint", help="SAM state dict (.pth / .safetensors)"),
    arg("--arch", help="vit_b | vit_l | vit_h | vit_t (= tinyvit-5m: MobileSAM, TinySAM) | "
                       "vit_mini (default: from the checkpoint)"),
    arg("--random-weights", action="store_true", help="no checkpoint: random weights (pipeline check)"),
    arg("--device", default="auto", help="auto (the GPU if any, else CPU), cpu, cuda[:N]"),
]  # fmt: skip


def _image(path: str) -> np.ndarray:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"image {p} does not exist")
    try:
        return np.asarray(Image.open(p).convert("RGB"))
    except Exception as e:
        raise SlimkitError(f"cannot read {p} as an image ({e})") from None


def _model(ns):
    """The SAM that ``--checkpoint`` / ``--arch`` / ``--random-weights`` name, on ``--device``."""
    from slimkit.core.dist import resolve_device
    from slimkit.sam.checkpoint import load_sam
    from slimkit.sam.model import build_sam

    if ns.checkpoint:
        ckpt = Path(ns.checkpoint)
        if (ckpt / "sam_config.json").is_file() or ckpt.name == "model.safetensors":
            from slimkit.sam.train import load_trained

            model = load_trained(ns.checkpoint)
        else:
            model = load_sam(ns.checkpoint, ns.arch)
    elif ns.random_weights:
        model = build_sam(ns.arch or "vit_mini")
    else:
        raise SlimkitError(
            "give --checkpoint (an official SAM .pth or a slimkit one), or --random-weights to try "
            "the pipeline"
        )
    return model.to(resolve_device(ns.device))


def _xy(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",")]
    except ValueError:
        raise SlimkitError(f"cannot read {s!r} as numbers separated by commas") from None


@command("predict", group="sam", run=("out",), out_help="mask PNG to write",
         args=[*MODEL_ARGS,
               arg("--point", action="append", default=[], help="x,y (foreground); repeat for more"),
               arg("--neg-point", action="append", default=[], help="x,y (background)"),
               arg("--box", help="x0,y0,x1,y1")],
         help="masks for point / box prompts", description="Masks for point / box prompts.")  # fmt: skip
def predict(inv: Invocation) -> int:
    from PIL import Image

    from slimkit.sam.predictor import SamPredictor

    ns = inv.ns
    pts = [_xy(s) for s in ns.point] + [_xy(s) for s in ns.neg_point]
    labels = [1] * len(ns.point) + [0] * len(ns.neg_point)
    pred = SamPredictor(_model(ns))
    pred.set_image(_image(ns.image))
    masks, iou, _ = pred.predict(np.array(pts) if pts else None, np.array(labels) if pts else None,
                                 np.array(_xy(ns.box)) if ns.box else None, multimask_output=True)  # fmt: skip
    best = int(np.argmax(iou))
    Image.fromarray((masks[best] * 255).astype(np.uint8)).save(ns.out)
    print(f"{ns.out}: mask {best} of {len(iou)} (predicted IoU {iou[best]:.3f}), "
          f"{int(masks[best].sum())} pixels")  # fmt: skip
    return 0


@command("everything", group="sam", configs=["slimkit.sam.everything:EverythingConfig"],
         run=("out",), out_help="directory for mask_*.png, overlay.png and masks.json",
         args=MODEL_ARGS, help="segment everything in an image",
         description="Segment everything in an image.")  # fmt: skip
def everything(inv: Invocation) -> int:
    from PIL import Image

    from slimkit.sam.everything import overlay, rle_encode, sam_predict_fn, segment_everything

    ns, (cfg,) = inv.ns, inv.configs
    img = _image(ns.image)
    predict_fn, enc = sam_predict_fn(_model(ns), img)
    res = segment_everything(predict_fn, img.shape[:2], cfg)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(res["masks"]):
        Image.fromarray((m["segmentation"] * 255).astype(np.uint8)).save(out / f"mask_{i:03d}.png")
    overlay(img, res["masks"], str(out / "overlay.png"))
    records = [{**{k: v for k, v in m.items() if k != "segmentation"}, "segmentation": rle_encode(m["segmentation"])}
               for m in res["masks"]]  # fmt: skip
    summary = {"image": ns.image, "mode": cfg.mode, "masks": len(records), "prompts": res["prompts"],
               "prompts_per_pass": res["prompts_per_pass"],
               "confident_fraction": res["confident_fraction"], "encoder_seconds": enc, "decoder_seconds": res["seconds"]}  # fmt: skip
    (out / "masks.json").write_text(json.dumps({**summary, "annotations": records}) + "\n")
    print(f"{out}: {len(records)} masks from {res['prompts']} prompts ({cfg.mode}); encoder {enc:.2f} s, "
          f"prompts + filtering {res['seconds']:.2f} s; overlay.png, masks.json (RLE), mask_*.png")  # fmt: skip
    return 0


@command("train", group="sam", configs=["slimkit.sam.train:SamTrainConfig"],
         run=("out", "resume", "overwrite"),
         help="train a small promptable model on generated scenes or a COCO folder",
         description="Train a small promptable model on generated scenes or a COCO folder.")  # fmt: skip
def train(inv: Invocation) -> int:
    from slimkit.sam.train import train_sam

    r = train_sam(*inv.configs, **inv.run_kwargs)
    print(f"{r['out']}: validation mIoU with one point {r['validation']['miou_1pt']:.3f} "
          f"({r['seconds']:.0f} s)")  # fmt: skip
    return 0


@command("cache-embeddings", group="sam", configs=["slimkit.sam.tinysam.cache:CacheConfig"],
         run=("out", "overwrite"), help="store a teacher's image embeddings (safetensors shards)",
         description="Compute a teacher's image embeddings once and store them as fingerprinted "
                     "safetensors shards for slimkit sam distill --embeddings.")  # fmt: skip
def cache_embeddings(inv: Invocation) -> int:
    from slimkit.sam.tinysam.cache import cache_embeddings as run

    r = run(*inv.configs, out=inv.ns.out, overwrite=inv.ns.overwrite)
    print(f"{r['out']}: {r['count']} embeddings {tuple(r['shape'])} in {len(r['shards'])} shards "
          f"(fingerprint {r['fingerprint'][:12]})")  # fmt: skip
    return 0


@command("distill", group="sam", configs=["slimkit.sam.tinysam.train:DistillConfig"],
         run=("out", "resume", "overwrite"),
         help="TinySAM distillation of a small SAM from a teacher",
         description="TinySAM full-stage distillation (or MobileSAM's embedding-only recipe) of a "
                     "small SAM student from a teacher SAM.")  # fmt: skip
def distill(inv: Invocation) -> int:
    from slimkit.sam.tinysam.train import distill_sam

    r = distill_sam(*inv.configs, **inv.run_kwargs)
    v = r["validation"]
    print(f"{r['out']}: validation mIoU 1 point {v['miou_1pt']:.3f}, box {v['miou_box']:.3f} "
          f"({r['seconds']:.0f} s)")  # fmt: skip
    return 0


@command("quantize", group="sam", configs=["slimkit.sam.tinysam.quant:SamQuantConfig"],
         run=("out", "overwrite"), args=[arg("model", help="a slimkit SAM run directory")],
         help="Q-TinySAM: W8A8 post-training quantization of the image encoder and decoder",
         description="Q-TinySAM: W8A8 post-training quantization of a SAM's image encoder (ViT "
                     "or TinyViT vit_t, linears, attention matmuls and convolutions) and mask "
                     "decoder (int8 weights + scales in safetensors).")  # fmt: skip
def quantize(inv: Invocation) -> int:
    from slimkit.sam.tinysam.quant import quantize_sam

    r = quantize_sam(inv.ns.model, *inv.configs, out=inv.ns.out, overwrite=inv.ns.overwrite)
    print(f"{r['out']}: {r['layers']} linears / convs W{r['wbits']}A{r['abits']} ({r['act_quantizer']}, "
          f"{r['search']} search), {r['act_points']} activation quantizers; calibration task "
          f"KL to the FP model {r['calib_task_kl']:.3g}")  # fmt: skip
    return 0


@command("eval", group="sam", configs=["slimkit.sam.tinysam.evaluate:EvalConfig"],
         args=[arg("model", help="a slimkit SAM run (trained, distilled or quantized) or a checkpoint"),
               arg("--json", output=True, help="also write the results here")],
         help="point / box mIoU and everything-mode recall / precision against ground truth",
         description="Point- and box-prompted mIoU and everything-mode recall / precision against "
                     "ground-truth instances (held-out generated scenes, COCO or SA-1B), params, "
                     "MACs, FLOPs and seconds per image.")  # fmt: skip
def evaluate(inv: Invocation) -> int:
    from slimkit.sam.tinysam.evaluate import evaluate_model

    r = evaluate_model(inv.ns.model, *inv.configs)
    if inv.ns.json:
        from slimkit.core.rundir import write_json

        write_json(inv.ns.json, r)
    k = r["clicks"]
    parts = []
    if "miou_1pt" in r:
        parts.append(f"mIoU 1 point {r['miou_1pt']:.3f}, {k} points {r[f'miou_{k}pt']:.3f}")
    if "miou_box" in r:
        parts.append(f"box {r['miou_box']:.3f}")
    if "miou_box" in r or "miou_1pt" in r:
        parts.append(f"over {r['instances']} instances, {r['seconds_per_image']:.3f} s per image")
    if "everything_recall" in r:
        parts.append(f"everything recall {r['everything_recall']:.3f} precision "
                     f"{r['everything_precision']:.3f} @ IoU 0.5, "
                     f"{r['everything_seconds_per_image']:.3f} s per image")  # fmt: skip
    print(f"{inv.ns.model} on {r['images']} images: " + "; ".join(parts))
    print(f"params encoder {r['params_encoder'] / 1e6:.3f} M, decoder {r['params_decoder'] / 1e6:.3f} M; "
          f"MACs encoder {r['macs_encoder'] / 1e9:.3f} G per image, decoder "
          f"{r['macs_decoder_per_prompt'] / 1e9:.4f} G per prompt (FLOPs = 2 x MACs: "
          f"{r['flops_encoder'] / 1e9:.3f} G, {r['flops_decoder_per_prompt'] / 1e9:.4f} G)")  # fmt: skip
    return 0
