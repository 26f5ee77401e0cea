"""``slimkit sam predict`` and ``slimkit sam everything``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from slimkit.core.config import add_arguments, from_args
from slimkit.core.errors import SlimkitError
from slimkit.core.logs import setup_logging


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
    from slimkit.core.dist import resolve_device

    return _load_model(ns).to(resolve_device(ns.device))


def _load_model(ns):
    from slimkit.sam.checkpoint import load_sam
    from slimkit.sam.model import build_sam

    if ns.checkpoint:
        if (Path(ns.checkpoint) / "sam_config.json").is_file() or Path(
            ns.checkpoint
        ).name == "model.safetensors":
            from slimkit.sam.train import load_trained

            return load_trained(ns.checkpoint)
        return load_sam(ns.checkpoint, ns.arch)
    if not ns.random_weights:
        raise SlimkitError(
            "give --checkpoint (an official SAM .pth or a slimkit one), or --random-weights to try the pipeline"
        )
    return build_sam(ns.arch or "vit_mini")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("--checkpoint", help="SAM state dict (.pth / .safetensors)")
    p.add_argument(
        "--arch",
        help="vit_b | vit_l | vit_h | vit_t (= tinyvit-5m: MobileSAM, TinySAM) | vit_mini (default: from the checkpoint)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="no checkpoint: random weights (pipeline check)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (the GPU if any, else CPU), cpu, cuda[:N]"
    )
    p.add_argument("--out", required=True)


def cmd_predict(argv: list[str]) -> int:
    from PIL import Image

    from slimkit.sam.predictor import SamPredictor

    p = argparse.ArgumentParser(
        prog="slimkit sam predict", description="Masks for point / box prompts."
    )
    _common(p)
    p.add_argument("--point", action="append", default=[], help="x,y (foreground); repeat for more")
    p.add_argument("--neg-point", action="append", default=[], help="x,y (background)")
    p.add_argument("--box", help="x0,y0,x1,y1")
    ns = p.parse_args(argv)
    setup_logging()

    def xy(s):
        try:
            return [float(v) for v in s.split(",")]
        except ValueError:
            raise SlimkitError(f"cannot read {s!r} as numbers separated by commas") from None

    pts = [xy(s) for s in ns.point] + [xy(s) for s in ns.neg_point]
    labels = [1] * len(ns.point) + [0] * len(ns.neg_point)
    pred = SamPredictor(_model(ns))
    pred.set_image(_image(ns.image))
    masks, iou, _ = pred.predict(np.array(pts) if pts else None, np.array(labels) if pts else None,
                                 np.array(xy(ns.box)) if ns.box else None, multimask_output=True)  # fmt: skip
    best = int(np.argmax(iou))
    Image.fromarray((masks[best] * 255).astype(np.uint8)).save(ns.out)
    print(
        f"{ns.out}: mask {best} of {len(iou)} (predicted IoU {iou[best]:.3f}), {int(masks[best].sum())} pixels"
    )
    return 0


def cmd_everything(argv: list[str]) -> int:
    from PIL import Image

    from slimkit.sam.everything import (
        EverythingConfig,
        overlay,
        rle_encode,
        sam_predict_fn,
        segment_everything,
    )

    p = argparse.ArgumentParser(
        prog="slimkit sam everything", description="Segment everything in an image."
    )
    _common(p)
    add_arguments(p, EverythingConfig)
    ns = p.parse_args(argv)
    setup_logging()
    cfg = from_args(EverythingConfig, ns)
    img = _image(ns.image)
    predict, enc = sam_predict_fn(_model(ns), img)
    res = segment_everything(predict, img.shape[:2], cfg)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(res["masks"]):
        Image.fromarray((m["segmentation"] * 255).astype(np.uint8)).save(out / f"mask_{i:03d}.png")
    overlay(img, res["masks"], str(out / "overlay.png"))
    records = [{**{k: v for k, v in m.items() if k != "segmentation"}, "segmentation": rle_encode(m["segmentation"])}
               for m in res["masks"]]  # fmt: skip
    summary = {"image": ns.image, "mode": cfg.mode, "masks": len(records), "prompts": res["prompts"],
               "prompts_per_pass": res["prompts_per_pass"], "encoder_seconds": enc, "decoder_seconds": res["seconds"]}  # fmt: skip
    (out / "masks.json").write_text(json.dumps({**summary, "annotations": records}) + "\n")
    print(f"{out}: {len(records)} masks from {res['prompts']} prompts ({cfg.mode}); encoder {enc:.2f} s, "
          f"prompts + filtering {res['seconds']:.2f} s; overlay.png, masks.json (RLE), mask_*.png")  # fmt: skip
    return 0


def cmd_train(argv: list[str]) -> int:
    import shlex

    from slimkit.core.config import parse_run_command
    from slimkit.sam.train import SamTrainConfig, train_sam

    ns, cfg = parse_run_command(argv, "slimkit sam train", SamTrainConfig,
                                "Train a small promptable model on generated scenes or a COCO folder.")  # fmt: skip
    r = train_sam(cfg, out=ns.out, resume=ns.resume, overwrite=ns.overwrite,
                  command="slimkit sam train " + shlex.join(argv))  # fmt: skip
    print(
        f"{r['out']}: validation mIoU with one point {r['validation']['miou_1pt']:.3f} ({r['seconds']:.0f} s)"
    )
    return 0


def main(argv: list[str]) -> int:
    cmds = {"predict": cmd_predict, "everything": cmd_everything, "train": cmd_train}
    if not argv or argv[0] not in cmds:
        raise SlimkitError(
            "usage: slimkit sam {predict,everything} IMAGE --checkpoint CKPT --out OUT ..."
        )
    return cmds[argv[0]](argv[1:])
