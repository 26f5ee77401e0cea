"""LightCLIP ablation on an offline caption set: plain CLIP (open_clip's ``ClipLoss``) vs
+ softened negatives vs + token-level matching vs + fusion-assisted MLM (full LightCLIP), same
towers, data, steps and seeds.

1. Selection on the validation split (seed 100, never a reporting seed), one knob at a time on
   the ladder: alpha_max of the softened labels, then lambda_tok, then lambda_mlm; the score is
   the mean of val zero-shot top-1, image->text R@1 and text->image R@1.
2. Report on the test split: every variant with seeds 0..n-1, mean ± std of zero-shot top-1
   (training-style prompts, and differently phrased held-out prompts), R@1 both ways over the
   held-out captions (a hit is an identical caption) and class-aware image->text R@1.

    python benchmarks/lightclip.py                       # digits-captions, 5 seeds
    python benchmarks/lightclip.py --seeds 0,1 --epochs 4 --data shapes-captions

Runs happen in this process with one thread; results go to benchmarks/results/lightclip.json
and lightclip.md (written to a temporary file, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, mean_std, seed_list  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GRID = {"soft_alpha": [0.1, 0.3], "token_weight": [0.5, 1.0], "mlm_weight": [0.5, 1.0]}
METRICS = [("zeroshot_top1", "zero-shot top-1"), ("zeroshot_heldout_prompts_top1", "zero-shot top-1, held-out prompts"),
           ("i2t_r1", "image->text R@1"), ("t2i_r1", "text->image R@1"), ("i2t_class_r1", "class-aware i->t R@1")]  # fmt: skip


def _run(common: dict, extra: dict, seed: int, tmp: Path) -> dict:
    from slimkit.clip.train import ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(**common, **extra, seed=seed, device="cpu")
    t0 = time.time()
    r = train_clip(cfg, out=tmp / f"run-{time.time_ns()}")
    return {"val": r["val"], "test": r["test"], "seconds": time.time() - t0,
            "parameters": r["parameters"]}  # fmt: skip


def _score(r: dict) -> float:
    v = r["val"]
    return (v["zeroshot_top1"] + v["i2t_r1"] + v["t2i_r1"]) / 3


def main() -> None:
    import logging

    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits-captions")
    p.add_argument("--seeds", type=seed_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-arch", default="tiny-vit-p8")
    p.add_argument("--out", default=str(RESULTS / "lightclip"))
    a = p.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("slimkit").setLevel(logging.WARNING)
    common = dict(data=a.data, epochs=a.epochs, batch_size=a.batch_size, image_arch=a.image_arch,
                  text_depth=2, lr=2e-3)  # fmt: skip
    t_start = time.time()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        chosen: dict = {}
        selection = []
        for knob, values in GRID.items():
            scores = {}
            for v in values:
                r = _run(common, {**chosen, knob: v}, 100, tmp)
                scores[v] = _score(r)
                selection.append({"knob": knob, "value": v, "with": dict(chosen), "val_score": scores[v],
                                  "val": r["val"]})  # fmt: skip
                print(f"select {knob}={v} (with {chosen}): val score {scores[v]:.2f}", flush=True)
            chosen[knob] = max(scores, key=scores.get)
        variants = {
            "CLIP (open_clip ClipLoss)": {"contrastive": "open_clip"},
            "+ softened negatives": {"soft_alpha": chosen["soft_alpha"]},
            "+ token level": {"soft_alpha": chosen["soft_alpha"], "token_weight": chosen["token_weight"]},
            "+ MLM fusion (LightCLIP)": dict(chosen),
        }  # fmt: skip
        runs: dict[str, list] = {k: [] for k in variants}
        for seed in a.seeds:  # interleaved: machine load drifts evenly over the variants
            for name, extra in variants.items():
                runs[name].append(_run(common, extra, seed, tmp))
                m = runs[name][-1]["test"]
                print(f"seed {seed} {name}: " + ", ".join(f"{k} {m[k]:.1f}" for k, _ in METRICS), flush=True)  # fmt: skip
    total = time.time() - t_start
    command = "python benchmarks/lightclip.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "machine": machine_line(),
        "settings": {**common, "seeds": a.seeds, "grid": GRID, "chosen_on_val": chosen},
        "selection": selection,
        "variants": variants,
        "runs": runs,
        "seconds_total": total,
    }
    summary = {
        name: {k: [r["test"][k] for r in rs] for k, _ in METRICS} for name, rs in runs.items()
    }
    result["summary"] = {n: {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                             for k, v in s.items()} for n, s in summary.items()}  # fmt: skip
    lines = [
        "# LightCLIP ablation (small scale, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        machine_line() + f" Total {total / 60:.1f} min, one thread.",
        "",
        f"Data: `{a.data}` (train captions from the training templates; val / test captions from "
        "differently phrased held-out templates). Towers: image `" + a.image_arch + "`, text "
        "transformer width 64, depth 2; d = 64. "
        f"{a.epochs} epochs, global batch {a.batch_size}, AdamW lr 2e-3 cosine; same steps for every variant.",
        "",
        "Chosen on the validation split (seed 100; score = mean of val zero-shot top-1, i->t R@1, "
        "t->i R@1): " + ", ".join(f"`{k}={v}`" for k, v in chosen.items()) + ".",
        "",
        f"Test split, mean ± std over seeds {a.seeds} (%):",
        "",
        "| variant | " + " | ".join(t for _, t in METRICS) + " | s / run | saved params | training-only params |",
        "|---|" + "---|" * (len(METRICS) + 3),
    ]  # fmt: skip
    for name, rs in runs.items():
        cells = [mean_std(summary[name][k]) for k, _ in METRICS]
        secs = statistics.mean(r["seconds"] for r in rs)
        par = rs[0]["parameters"]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {secs:.0f} | {par['total_saved']:,} | {par['training_only']:,} |")  # fmt: skip
    lines += [
        "",
        "Selection runs (validation split, seed 100):",
        "",
        "| knob | value | with | val score |",
        "|---|---|---|---|",
        *[f"| {s['knob']} | {s['value']} | {s['with'] or '-'} | {s['val_score']:.2f} |" for s in selection],
        "",
    ]  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", "\n".join(lines))):
        tmpf = out.with_suffix(suffix + ".tmp")
        tmpf.write_text(text)
        os.replace(tmpf, out.with_suffix(suffix))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
