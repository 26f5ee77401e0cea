"""Segment everything with SAM's dense grid vs TinySAM's hierarchical sampler, on a small model
trained offline (`slimkit sam train --recipe recipes/sam/shapes-small.yaml`) and held-out
generated scenes with exact instance masks, the real nuclei image of the stardist wheel (125
labelled nuclei), plus the bundled real photos (timing and dense/hierarchical agreement only:
they have no ground truth).

Per image: prompts sent to the decoder, seconds (prompting + filtering; the image is encoded once
and that time is reported separately), mask recall (ground-truth instances matched by a kept
mask with IoU >= 0.5), precision (kept masks matching an instance) and mIoU (mean over
ground-truth instances of the best IoU with a kept mask). The filters (predicted IoU, stability)
and the hierarchical sampler's confident-region threshold (a logit: this small model's logits are
not SAM's, so 8.5 is not meaningful for it) are chosen on validation scenes, never the test ones.

The oracle rows (spec T3a) bound what any model could save on these scenes: the oracle answers
a point on an instance with that instance (logit +10 inside, -10 outside, predicted IoU 1) and a
point on the background with nothing, so its confident region is exactly the instances its sparse
points hit. Its prompts are counted, not timed (it is not a network). "confident area" is the
share of the image inside the hierarchical sampler's confident region after the sparse pass: the
dense candidates there are skipped, so it is what sets the speed-up.

    python benchmarks/sam_everything.py                 # trains the recipe's model once (~20 min)
    python benchmarks/sam_everything.py --model runs/sam-small --images 20 --taus auto,4,8.5
    python benchmarks/sam_everything.py --model runs/tinysam --results benchmarks/results/sam_everything_student.json

Results (``--results``, default benchmarks/results/sam_everything.json): the .json, the .md, and
<stem>_overlay.png (one held-out scene, hierarchical) and <stem>_photo_overlay.png (a photo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, mean_std  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "sam"
TEST_SEED = 2_000_000  # scenes never used in training (0..N) or validation (10^6..)


def trained_model() -> Path:
    out = CACHE / "sam-small"
    if not (out / "report.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "slimkit",
            "sam",
            "train",
            "--recipe",
            "recipes/sam/shapes-small.yaml",
            "--out",
            str(out),
            "--resume",
        ]  # fmt: skip  (a killed training continues)
        with open(out.with_suffix(".log"), "w") as f:
            if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"training failed; see {out.with_suffix('.log')}")
    return out


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's bundled RGB photos


def photos() -> list[tuple[str, np.ndarray]]:
    """The bundled real photos (no ground truth: only prompts, time and agreement are reported)."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    out = [(name, getattr(data, name)()) for name in PHOTOS]
    gh = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return out + [("grace_hopper", np.asarray(Image.open(gh).convert("RGB")))]


def oracle_predict(gt: list[np.ndarray], background: bool = False):
    """Spec T3a's oracle on a generated scene: the instance under the point (+10 inside, -10
    outside, IoU 1); on the background nothing (-10 everywhere, IoU 0), or with ``background``
    the background itself as one more segment (as SAM segments stuff in a photo)."""
    import torch

    h, w = gt[0].shape if gt else (1, 1)
    label = np.zeros((h, w), dtype=int)
    for i, m in enumerate(gt, 1):
        label[m] = i  # later instances are drawn over earlier ones

    def predict(points):
        out, iou = [], []
        for x, y in points:
            k = label[min(int(y), h - 1), min(int(x), w - 1)]
            seg = k or background
            out.append(np.where(label == k, 10.0, -10.0) if seg else np.full((h, w), -10.0))
            iou.append(1.0 if seg else 0.0)
        lg = torch.tensor(np.stack(out), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
        return lg, torch.tensor(iou)[:, None].repeat(1, 3)

    return predict


def agreement(ref: list[dict], other: list[dict]) -> float:
    """Share of the reference (dense) masks matched by a mask of ``other`` with IoU >= 0.5."""
    if not ref:
        return float("nan")
    hit = 0
    for m in ref:
        r = m["segmentation"]
        hit += any(
            (r & o["segmentation"]).sum() >= 0.5 * (r | o["segmentation"]).sum() for o in other
        )
    return hit / len(ref)


def score(masks: list[dict], gt: list[np.ndarray]) -> dict:
    """recall / mIoU over ground-truth instances (best kept mask each), precision over kept masks
    (share matching an instance at IoU >= 0.5), and their F1: more masks cannot buy F1."""
    iou = np.array(
        [
            [(m["segmentation"] & g).sum() / max((m["segmentation"] | g).sum(), 1) for m in masks]
            for g in gt
        ]
    ).reshape(len(gt), len(masks))
    best = iou.max(1) if masks else np.zeros(len(gt))
    recall = float((best >= 0.5).mean())
    precision = float((iou.max(0) >= 0.5).mean()) if masks and len(gt) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"recall": recall, "miou": float(best.mean()), "precision": precision, "f1": f1}


def cached(predict):
    """The same prompts give the same decoder outputs: threshold sweeps decode once."""
    memo: dict = {}

    def f(points):
        key = np.asarray(points).tobytes()
        if key not in memo:
            memo[key] = predict(points)
        return memo[key]

    return f


def calibrate(model, a) -> dict:
    """Filters and the confident-region logit chosen on validation scenes (never the test ones):
    the (predicted IoU, stability) pair with the best dense F1 (mIoU alone would reward keeping
    every mask), then the hierarchical threshold with the fewest prompts whose mIoU stays within
    1 point of dense."""
    from slimkit.sam.everything import EverythingConfig, sam_predict_fn, segment_everything
    from slimkit.sam.train import VAL_SEED, draw_scene

    scenes = [draw_scene(model.cfg.img_size, VAL_SEED + i) for i in range(a.calib_scenes)]
    filt: dict = {}
    hier: dict = {}
    for img, gt in scenes:
        predict = cached(sam_predict_fn(model, img)[0])
        for it in IOU_GRID:
            for st in STAB_GRID:
                cfg = EverythingConfig(mode="dense", points_per_side=32, pred_iou_thresh=it,
                                       stability_score_thresh=st)  # fmt: skip
                r = score(segment_everything(predict, img.shape[:2], cfg)["masks"], gt)
                filt.setdefault((it, st), []).append((r["f1"], r["miou"]))
    (it, st), (_, dense_miou) = max(
        ((k, tuple(np.mean(v, 0))) for k, v in filt.items()), key=lambda kv: (kv[1][0], kv[0])
    )
    for img, gt in scenes:
        predict = sam_predict_fn(model, img)[0]
        for tau in TAU_GRID:
            cfg = EverythingConfig(mode="hierarchical", points_per_side=32, pred_iou_thresh=it,
                                   stability_score_thresh=st, high_score_thresh=tau)  # fmt: skip
            r = segment_everything(predict, img.shape[:2], cfg)
            hier.setdefault(tau, []).append((score(r["masks"], gt)["miou"], r["prompts"]))
    ok = [t for t, v in hier.items() if np.mean([m for m, _ in v]) >= dense_miou - 0.01]
    tau = min(ok or TAU_GRID, key=lambda t: (np.mean([n for _, n in hier[t]]), -t))
    return {"pred_iou_thresh": it, "stability_thresh": st, "tau": tau, "dense_miou": dense_miou,
            "hierarchical": {str(t): {"miou": float(np.mean([m for m, _ in v])), "prompts": float(np.mean([n for _, n in v]))}
                             for t, v in hier.items()}}  # fmt: skip


IOU_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 0.88)
STAB_GRID = (0.0, 0.3, 0.6, 0.8, 0.95)
TAU_GRID = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.5)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--model", help="a `slimkit sam train` run to use (default: train the recipe's)")
    p.add_argument(
        "--calib-scenes", type=int, default=5, help="validation scenes for the thresholds"
    )
    p.add_argument("--taus", default="auto,8.5", help="hierarchical thresholds; auto = calibrated")
    p.add_argument("--pred-iou-thresh", type=float, help="default: calibrated")
    p.add_argument("--stability-thresh", type=float, help="default: calibrated")
    p.add_argument("--photos", action=argparse.BooleanOptionalAction, default=True,
                   help="also time both samplers on scikit-image's bundled photos")  # fmt: skip
    p.add_argument("--results", default=str(RESULTS / "sam_everything.json"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from slimkit.sam.everything import EverythingConfig, overlay, sam_predict_fn, segment_everything
    from slimkit.sam.train import draw_scene, load_trained

    run = Path(a.model) if a.model else trained_model()
    model = load_trained(run)
    val = json.loads((run / "report.json").read_text())["validation"]
    cal = calibrate(model, a)
    print("calibrated on validation scenes:", json.dumps(cal), flush=True)
    a.pred_iou_thresh = cal["pred_iou_thresh"] if a.pred_iou_thresh is None else a.pred_iou_thresh
    a.stability_thresh = (
        cal["stability_thresh"] if a.stability_thresh is None else a.stability_thresh
    )
    taus = list(dict.fromkeys(cal["tau"] if t == "auto" else float(t) for t in a.taus.split(",")))
    arms = [("dense", None)] + [("hierarchical", t) for t in taus]
    rows = {f"{m}" + (f" tau={t}" if t is not None else ""): [] for m, t in arms}
    oracle_rows: dict[str, list] = {
        "dense": [],
        "hierarchical": [],
        "hierarchical, background a segment": [],
    }
    stem = Path(a.results).with_suffix("")

    def each_image(predict, img, mode, tau):
        cfg = EverythingConfig(mode=mode, points_per_side=32, pred_iou_thresh=a.pred_iou_thresh,
                               stability_score_thresh=a.stability_thresh, high_score_thresh=tau or 8.5)  # fmt: skip
        t0 = time.perf_counter()
        res = segment_everything(predict, img.shape[:2], cfg)
        return res, time.perf_counter() - t0

    for i in range(a.images):
        img, gt = draw_scene(model.cfg.img_size, TEST_SEED + i)
        predict, enc = sam_predict_fn(model, img)
        for (mode, tau), name in zip(arms, rows):
            res, secs = each_image(predict, img, mode, tau)
            sc = score(res["masks"], gt)
            rows[name].append({"prompts": res["prompts"], "seconds": secs, "encoder_seconds": enc,
                               "confident": res["confident_fraction"], **sc, "masks": len(res["masks"])})  # fmt: skip
            if i == 0 and mode == "hierarchical" and tau == taus[0]:
                overlay(img, res["masks"], f"{stem}_overlay.png")
        for arm in oracle_rows:
            mode = arm.split(",")[0]
            cfg = EverythingConfig(mode=mode, points_per_side=32, pred_iou_thresh=0.5,
                                   stability_score_thresh=0.5)  # fmt: skip
            res = segment_everything(oracle_predict(gt, "background" in arm), img.shape[:2], cfg)
            oracle_rows[arm].append({"prompts": res["prompts"], "confident": res["confident_fraction"],
                                     "instance_area": float(np.any(gt, 0).mean()) if gt else 0.0,
                                     **score(res["masks"], gt)})  # fmt: skip
    from slimkit.sam.tinysam.data import nuclei_image

    nimg, ngt = nuclei_image()  # the one real image with instance masks (125 nuclei)
    npredict, nenc = sam_predict_fn(model, nimg)
    nuclei_rows = {}
    for (mode, tau), name in zip(arms, rows):
        res, secs = each_image(npredict, nimg, mode, tau)
        nuclei_rows[name] = {"prompts": res["prompts"], "seconds": secs, "encoder_seconds": nenc,
                             "confident": res["confident_fraction"], **score(res["masks"], ngt),
                             "masks": len(res["masks"])}  # fmt: skip
    photo_rows: dict[str, list] = {name: [] for name in rows}
    for pname, img in photos() if a.photos else []:
        predict, enc = sam_predict_fn(model, img)
        dense_masks = None
        for (mode, tau), name in zip(arms, rows):
            res, secs = each_image(predict, img, mode, tau)
            dense_masks = res["masks"] if mode == "dense" else dense_masks
            photo_rows[name].append({"photo": pname, "prompts": res["prompts"], "seconds": secs,
                                     "masks": len(res["masks"]), "agreement": agreement(dense_masks, res["masks"])})  # fmt: skip
            if pname == "chelsea" and mode == "hierarchical" and tau == taus[0]:
                overlay(img, res["masks"], f"{stem}_photo_overlay.png")
    out = {
        "validation": val,
        "calibration": cal,
        "rows": rows,
        "oracle_rows": oracle_rows,
        "nuclei_rows": nuclei_rows,
        "photo_rows": photo_rows,
        "args": vars(a),
    }
    Path(a.results).write_text(json.dumps(out, indent=1) + "\n")
    dense_s = np.mean([r["seconds"] for r in rows["dense"]])
    arch = json.loads((run / "sam_config.json").read_text()).get("arch", "?")
    made = json.loads((run / "report.json").read_text()).get("command") or ""
    made = f" (`{made}`)" if made else ""
    per_tau = ", ".join(
        f"{t}: {v['miou']:.3f} / {v['prompts']:.0f} prompts" for t, v in cal["hierarchical"].items()
    )
    lines = [
        "# Segment everything: dense grid vs hierarchical (small SAM trained offline)",
        "",
        f"Model: `{arch}` ({model.cfg.img_size} px), run `{run.name}`{made}; validation mIoU with one centre "
        f"point {val['miou_1pt']:.3f}. {a.images} held-out generated scenes (seeds {TEST_SEED}..), 32 points per side "
        f"(hierarchical: 8 sparse), predicted IoU > {a.pred_iou_thresh}, stability >= {a.stability_thresh}, box NMS 0.7. "
        f"Filters and the hierarchical confident-region logit (tau) chosen on {a.calib_scenes} validation scenes "
        f"(dense mIoU {cal['dense_miou']:.3f} there; chosen tau {cal['tau']}: the fewest prompts within 1 point of "
        f"dense mIoU; per tau: {per_tau}). "
        "Seconds: prompting + filtering + NMS per image (the image encoding, done once, is listed separately). "
        "Mean ± std over images.",
        "",
        f"Command: `python benchmarks/sam_everything.py {' '.join(sys.argv[1:])}`".rstrip(),
        machine_line(),
        "",
        "| sampler | prompts / image | seconds / image | speed-up vs dense | confident area | mask recall (IoU >= 0.5) | precision | mIoU | masks kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def conf(rs):
        c = [r["confident"] for r in rs if r.get("confident") is not None]
        return mean_std(c, "{:.3f}") if c else "-"

    for name, rs in rows.items():
        lines.append(
            f"| {name} | {mean_std([r['prompts'] for r in rs], '{:.0f}')} | {mean_std([r['seconds'] for r in rs])} | "
            f"{dense_s / np.mean([r['seconds'] for r in rs]):.2f} | {conf(rs)} | {mean_std([r['recall'] for r in rs], '{:.3f}')} | "
            f"{mean_std([r['precision'] for r in rs], '{:.3f}')} | "
            f"{mean_std([r['miou'] for r in rs], '{:.3f}')} | {mean_std([r['masks'] for r in rs], '{:.1f}')} |"
        )
    enc = np.mean([r["encoder_seconds"] for r in rows["dense"]])
    od, oh = oracle_rows["dense"], oracle_rows["hierarchical"]
    lines += [
        "",
        f"Image encoding: {enc:.3f} s per image (both samplers). Overlay: {stem.name}_overlay.png.",
        "",
        "Oracle on the same scenes (spec T3a; prompts counted, not timed): the most any model could skip here. "
        f"Instances cover {mean_std([r['instance_area'] for r in oh], '{:.3f}')} of each image.",
        "",
        "| oracle sampler | prompts / image | prompt ratio vs dense | confident area | mask recall |",
        "|---|---|---|---|---|",
        f"| dense | {mean_std([r['prompts'] for r in od], '{:.0f}')} | 1.00 | - | {mean_std([r['recall'] for r in od], '{:.3f}')} |",
    ]
    for arm in list(oracle_rows)[1:]:
        oh = oracle_rows[arm]
        lines.append(
            f"| {arm} | {mean_std([r['prompts'] for r in oh], '{:.0f}')} | "
            f"{np.mean([r['prompts'] for r in od]) / np.mean([r['prompts'] for r in oh]):.2f} | {conf(oh)} | "
            f"{mean_std([r['recall'] for r in oh], '{:.3f}')} |"
        )
    nd = nuclei_rows["dense"]["seconds"]
    lines += ["", f"## Real image with instance masks: stardist's nuclei ({len(ngt)} nuclei, 512 x 512)", "",
              "Fluorescence microscopy, never seen in training; same filters and thresholds.", "",
              "| sampler | prompts | seconds | speed-up vs dense | confident area | recall | precision | mIoU | masks kept |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in nuclei_rows.items():
        c = f"{r['confident']:.3f}" if r["confident"] is not None else "-"
        lines.append(f"| {name} | {r['prompts']} | {r['seconds']:.2f} | {nd / r['seconds']:.2f} | {c} | "
                     f"{r['recall']:.3f} | {r['precision']:.3f} | {r['miou']:.3f} | {r['masks']} |")  # fmt: skip
    if any(photo_rows.values()):
        pd = np.mean([r["seconds"] for r in photo_rows["dense"]])
        lines += ["", f"## Bundled photos ({', '.join(r['photo'] for r in photo_rows['dense'])})", "",
                  "No ground truth, and the model only ever saw generated shapes: these rows measure the samplers "
                  "(prompts, time) and how many of the dense grid's masks the hierarchical sampler also finds "
                  f"(IoU >= 0.5), not segmentation quality. Overlay: {stem.name}_photo_overlay.png.", "",
                  "| sampler | prompts / image | seconds / image | speed-up vs dense | dense masks also found | masks kept |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, rs in photo_rows.items():
            ag = [r["agreement"] for r in rs if not np.isnan(r["agreement"])]
            lines.append(
                f"| {name} | {mean_std([r['prompts'] for r in rs], '{:.0f}')} | {mean_std([r['seconds'] for r in rs])} | "
                f"{pd / np.mean([r['seconds'] for r in rs]):.2f} | {mean_std(ag, '{:.3f}')} | "
                f"{mean_std([r['masks'] for r in rs], '{:.1f}')} |"
            )
    Path(a.results).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
