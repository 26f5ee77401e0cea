"""Validation-split choice of benchmarks/sr.py's training recipe: the RRDB encoder's steps, then
the diffusion learning rate and steps, from learning curves on held-out synthetic validation
images (the trainer's validation split, generator seed 1_000_003 + training seed; never the test
images of sr.py, which use seed 9_000_001, nor the bundled photos).

1. RRDB: one run of --rrdb-max steps, validation PSNR every --rrdb-every steps; the choice is
   the first evaluated step within 0.05 dB of the curve's best.
2. Diffusion, on that RRDB: SRDiff and SAM-DiffSR at each --lrs and --emas (decay of the
   evaluated weight average; 0 = raw weights, as the official code), --max-steps steps,
   validation PSNR every --every steps (DDIM 10 steps, sampler seed 0, as sr.py). The choice
   maximises the two recipes' mean validation PSNR, smoothed over three consecutive evaluations
   (a step and its neighbours: single evaluations swing by several dB), over (lr, ema, step);
   both recipes share it, so the comparison in sr.py stays at one budget. --max-steps is the
   CPU budget's cap, stated in the report.

Finished runs are cached in benchmarks/.cache/sr_select/ and reused (an interrupted run resumes;
two processes with different --part split the diffusion runs). Writes
benchmarks/results/sr_select.md and sr_select.json.

    python benchmarks/sr_select.py [--part 0/2] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line  # noqa: E402

from slimkit.sr.train import SRTrainConfig, train_sr  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "sr_select"
RECIPES = {"SRDiff": {}, "SAM-DiffSR": {"masks": "segments"}}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _run(cfg: SRTrainConfig, name: str) -> dict:
    """Train (or reuse) one run; returns its report's validation curve and bicubic PSNR."""
    out = CACHE / name
    done = out / "report.json"
    if not done.is_file():
        t0 = time.process_time()
        train_sr(cfg, out=out, overwrite=True)
        rep = json.loads(done.read_text())
        rep["cpu_seconds"] = time.process_time() - t0
        done.write_text(json.dumps(rep, indent=1))
    rep = json.loads(done.read_text())
    return {"curve": rep["validation_curve"], "cpu_seconds": rep.get("cpu_seconds", 0.0),
            "bicubic": rep["validation"]["bicubic"]["basicsr-y-crop4"]["psnr"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lrs", type=_floats, default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--emas", type=_floats, default=[0.0, 0.995])
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--rrdb-max", type=int, default=1500)
    ap.add_argument("--rrdb-every", type=int, default=100)
    ap.add_argument("--val-images", type=int, default=8)
    ap.add_argument("--part", default="0/1", help="i/n: this process trains the i-th of n shares")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    if a.report_only:
        (results / "sr_select.md").write_text(
            report(json.loads((results / "sr_select.json").read_text()))
        )
        return
    torch.set_num_threads(1)
    i, n = (int(v) for v in a.part.split("/"))
    base = dict(images="synthetic", n_images=500, image_size=64, patch=32, batch_size=16,
                val_images=a.val_images, val_steps=10, checkpoint_every=0, device="cpu", seed=a.seed)  # fmt: skip
    # 1. RRDB steps: the curve of one long run; a run of k steps is this run's first k steps
    # (constant lr, per-step batch generators), so the chosen count is retrained exactly.
    rr = _run(SRTrainConfig(stage="rrdb", steps=a.rrdb_max, lr=1e-3, eval_every=a.rrdb_every, **base),
              f"rrdb-s{a.seed}-{a.rrdb_max}")  # fmt: skip
    best = max(p["psnr"] for p in rr["curve"])
    rrdb_steps = next(p["step"] for p in rr["curve"] if p["psnr"] >= best - 0.05)
    rrdb = CACHE / f"rrdb-s{a.seed}-{rrdb_steps}"
    _run(SRTrainConfig(stage="rrdb", steps=rrdb_steps, lr=1e-3, **base), rrdb.name)
    # 2. diffusion grid
    runs = {}
    grid = [(lr, e, r) for e in a.emas for lr in a.lrs for r in RECIPES]
    for k, (lr, e, r) in enumerate(grid):
        name = f"{r}-lr{lr:g}-s{a.seed}-{a.max_steps}-rrdb{rrdb_steps}" + (
            f"-ema{e:g}" if e else ""
        )
        if k % n != i and not (CACHE / name / "report.json").is_file():
            continue
        cfg = SRTrainConfig(stage="diffusion", rrdb=str(rrdb), steps=a.max_steps, lr=lr, ema=e,
                            eval_every=a.every, **RECIPES[r], **base)  # fmt: skip
        key = f"{r} lr {lr:g}" + (f" ema {e:g}" if e else "")
        runs[key] = {"lr": lr, "ema": e, "recipe": r, **_run(cfg, name)}
        print(f"{key}: {runs[key]['curve'][-1]}", flush=True)
    if len(runs) < len(grid):
        print(f"part {a.part}: {len(runs)} of {len(grid)} runs present; run the other parts, "
              "then this command again (finished runs are reused) for the report")  # fmt: skip
        return
    data = {"command": "python benchmarks/sr_select.py " + " ".join(sys.argv[1:]),
            "machine": machine_line(), "args": vars(a), "rrdb_curve": rr["curve"],
            "rrdb_steps": rrdb_steps, "rrdb_bicubic": rr["bicubic"], "runs": runs}  # fmt: skip
    data["choice"] = choose(data)
    (results / "sr_select.json").write_text(json.dumps(data, indent=1) + "\n")
    (results / "sr_select.md").write_text(report(data))
    print(report(data))


def choose(data: dict) -> dict:
    """(lr, ema, step) with the best mean validation PSNR of the recipes, each step's value the
    mean of its own evaluation and its neighbours' (two at the ends of the curve)."""
    by: dict[tuple, list[list[dict]]] = {}
    for run in data["runs"].values():
        by.setdefault((run["lr"], run.get("ema", 0.0)), []).append(run["curve"])
    best = None
    for (lr, e), curves in by.items():
        mean = [statistics.mean(p["psnr"] for p in pts) for pts in zip(*curves)]
        for j, pts in enumerate(zip(*curves)):
            v = statistics.mean(mean[max(j - 1, 0) : j + 2])
            if best is None or v > best["psnr"]:
                best = {"lr": lr, "ema": e, "steps": pts[0]["step"], "psnr": v, "raw": mean[j]}
    return best


def report(data: dict) -> str:
    a, c = data["args"], data["choice"]
    runs = data["runs"]
    L = ["# Validation-split choice of the SR benchmark's recipe", "",
         f"Command: `{data['command']}` (each `--part` in its own process, then once more for the report)  ",
         data["machine"], "",
         f"Validation: {a['val_images']} synthetic 64 x 64 images from generator seed {1_000_003 + a['seed']} "
         "(training seed 0's validation split), x4, BasicSR Y PSNR with the border cropped, DDIM 10 steps, "
         "sampler seed 0. The test images of `benchmarks/sr.py` (generator seed 9_000_001) and the bundled "
         "photos were not looked at. Training as in sr.py: 500 synthetic images, 32 x 32 HR patches, batch 16, "
         f"one seed ({a['seed']}).", "",
         f"## 1. RRDB encoder steps (Adam 1e-3; bicubic {data['rrdb_bicubic']:.2f} dB)", "",
         "| step | " + " | ".join(str(p["step"]) for p in data["rrdb_curve"]) + " |",
         "|---|" + "---|" * len(data["rrdb_curve"]),
         "| PSNR (dB) | " + " | ".join(f"{p['psnr']:.2f}" for p in data["rrdb_curve"]) + " |", "",
         f"Chosen: **{data['rrdb_steps']} steps**, the first within 0.05 dB of the curve's best.", "",
         f"## 2. Diffusion learning rate and steps (on the {data['rrdb_steps']}-step RRDB)", "",
         "| run | " + " | ".join(str(p["step"]) for p in next(iter(runs.values()))["curve"]) + " | CPU s |",
         "|---|" + "---|" * (len(next(iter(runs.values()))["curve"]) + 1)]  # fmt: skip
    for name, r in runs.items():
        L.append(
            f"| {name} | "
            + " | ".join(f"{p['psnr']:.2f}" for p in r["curve"])
            + f" | {r['cpu_seconds']:.0f} |"
        )
    L += ["", f"Bicubic on the same images: {next(iter(runs.values()))['bicubic']:.2f} dB.", "",
          f"Chosen: **Adam {c['lr']:g}, EMA {c.get('ema', 0):g}, {c['steps']} steps** (mean validation PSNR of "
          f"SRDiff and SAM-DiffSR {c.get('raw', c['psnr']):.2f} dB at that step, {c['psnr']:.2f} dB smoothed over "
          f"it and its neighbouring evaluations; 'ema' rows evaluate the weight average). The grid stops at {a['max_steps']} steps, the CPU budget of the 15 runs of "
          "sr.py; a curve still rising there means more steps would help.", ""]  # fmt: skip
    return "\n".join(L)


if __name__ == "__main__":
    main()
