"""The shared training loop against a minimal plain PyTorch loop, for every registered trainer.

Both loops run the same task (model, batches, loss, per-step hook such as the epoch-end
evaluation) from the same seed in one process, interleaved A B A B so that load on the machine
hits both alike; the table gives optimizer steps per second of each and their ratio (target:
the shared loop at >= 90 % of the plain one). The shared loop's extra work is what it is for:
metrics.jsonl, gradient-norm check, in-memory roll-back snapshots and atomic checkpoints.

    python benchmarks/trainer.py [--repeats 3] [--trainers train-lm,sam-train]
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
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line  # noqa: E402

from slimkit.core import dist  # noqa: E402
from slimkit.train import TRAINERS, Trainer, discover  # noqa: E402

# longer than the tests' tiny runs, so that set-up does not dominate; evaluation stays rare
LONGER = {
    "train-classifier": {"epochs": 2, "train_subset": 320},
    "distill": {"epochs": 2, "train_subset": 320},
    "train-lm": {"steps": 20, "eval_every": 1000, "checkpoint_every": 10},
    "sam-train": {"steps": 10, "checkpoint_every": 5},
}


def plain(name: str, cfg) -> float:
    """Steps per second of a minimal loop: no checks, no metrics, no checkpoints."""
    task = TRAINERS.meta(name)["task"](cfg, torch.device("cpu"))
    opt, sched = task.optimizer()
    o = task.loop_options()
    params = [p for p in task.model.parameters() if p.requires_grad]
    shim = SimpleNamespace(ema=None, sched=sched)
    ema = None
    if o.ema:  # the distillation recipe keeps an EMA: the plain loop does the same work
        import copy

        src = task.ema_of or task.model
        ema = copy.deepcopy(src).eval().requires_grad_(False)
        shim.ema = ema
    t0 = time.perf_counter()
    for step in range(o.total_steps):
        opt.zero_grad(set_to_none=True)
        micro = task.micro_batches(step)
        total = 0.0
        for mb in micro:
            loss = task.loss(mb)[0] / len(micro)
            loss.backward()
            total += float(loss.detach())
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        if sched is not None:
            sched.step()
        if ema is not None:
            with torch.no_grad():
                for pe, ps in zip(ema.state_dict().values(), src.state_dict().values()):
                    if pe.is_floating_point():
                        pe.mul_(o.ema).add_(ps.detach(), alpha=1 - o.ema)
                    else:
                        pe.copy_(ps)
        rec = {"step": step + 1, "loss": total, "lr": lr, "seconds": time.perf_counter() - t0}
        task.after_step(step, rec, shim)
    return o.total_steps / (time.perf_counter() - t0)


def shared(name: str, cfg, out: Path) -> float:
    task = TRAINERS.meta(name)["task"](cfg, torch.device("cpu"))
    opt, sched = task.optimizer()
    o = task.loop_options()
    tr = Trainer(task, opt, sched, o, device=torch.device("cpu"), out=out, config=cfg)
    tr.fit()
    return o.total_steps / tr.loop_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trainers", default="", help="comma-separated names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trainer"))
    args = ap.parse_args()
    assert dist.world_size() == 1
    names = [n for n in discover() if not args.trainers or n in args.trainers.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in names:
            (tmp / name).mkdir()  # each trainer's prerequisites (e.g. a teacher) apart
            cfg = TRAINERS.meta(name)["tiny"](tmp / name)
            for k, v in LONGER.get(name, {}).items():
                setattr(cfg, k, v)
            p, s = [], []
            for r in range(args.repeats):
                p.append(plain(name, cfg))
                s.append(shared(name, cfg, tmp / f"{name}-{r}"))
                print(
                    f"{name} repeat {r}: plain {p[-1]:.2f} / shared {s[-1]:.2f} steps/s", flush=True
                )
            ratios = [b / a for a, b in zip(p, s)]
            rows[name] = {"plain": p, "shared": s, "ratio_median": statistics.median(ratios)}
    threads = os.environ.get("OMP_NUM_THREADS")
    cmd = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/trainer.py "
    cmd += " ".join(sys.argv[1:])
    lines = [
        "# Shared training loop vs a minimal plain loop",
        "",
        f"Command: `{cmd.strip()}`  ",
        machine_line(),
        "",
        "Same task, seed and steps in one process, interleaved; steps per second (median of the "
        f"{args.repeats} repeats) and the median of the per-repeat ratios shared / plain.",
        "",
        "| trainer | plain loop (steps/s) | shared loop (steps/s) | shared / plain |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {statistics.median(r['plain']):.2f} | "
                     f"{statistics.median(r['shared']):.2f} | {100 * r['ratio_median']:.0f} % |")  # fmt: skip
    lines += ["", "Target: >= 90 %. Met: " + ", ".join(
        f"{n} {'yes' if r['ratio_median'] >= 0.9 else 'NO'}" for n, r in rows.items()), ""]  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(lines))
    Path(args.out + ".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
