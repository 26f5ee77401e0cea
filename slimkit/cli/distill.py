"""Image-classification and distillation commands: train-classifier, distill, cka."""

from __future__ import annotations

import json
from pathlib import Path

from slimkit.core.commands import Invocation, arg, command

RUN = ("out", "resume", "overwrite")


def _print_report(r: dict | None) -> None:
    if r:
        print(f"{r['out']}: last top-1 {r['last']['top1']:.2f} %, best {r['best']['top1']:.2f} % "
              f"(epoch {r['best']['epoch']}), {r['seconds']:.0f} s")  # fmt: skip


@command("train-classifier", configs=["slimkit.distill.train:TrainConfig"], run=RUN,
         help="train a timm image classifier (e.g. a teacher)",
         description="Train a timm image classifier (e.g. a teacher) with cross-entropy.")  # fmt: skip
def train_classifier(inv: Invocation) -> int:
    from slimkit.distill.train import train_classifier as train

    _print_report(train(*inv.configs, **inv.run_kwargs))
    return 0


@command("distill", configs=["slimkit.distill.train:DistillConfig"], run=RUN,
         help="distil a frozen teacher into a student (KD, DKD, DIST, FitNet, OFA)",
         description="Distil a frozen teacher into a student (KD, DKD, DIST, FitNet, OFA).")  # fmt: skip
def distill(inv: Invocation) -> int:
    from slimkit.distill.train import distill as run_distill

    _print_report(run_distill(*inv.configs, **inv.run_kwargs))
    return 0


@command("cka", configs=["slimkit.distill.cka:CKAConfig"],
         args=[arg("--teacher", required=True, help="run directory (or weights file with --teacher-arch)"),
               arg("--student", required=True, help="run directory (or weights file with --student-arch)"),
               arg("--plot", output=True, help="write the heat-map here (PNG)"),
               arg("--json", output=True, help="write the matrix here")],
         help="linear CKA between every teacher and student stage",
         description="Linear CKA between every teacher and student stage.")  # fmt: skip
def cka(inv: Invocation) -> int:
    from slimkit.distill.cka import cka_between_runs, plot_cka

    ns, (cfg,) = inv.ns, inv.configs
    m, n = cka_between_runs(ns.teacher, ns.student, cfg)
    print("CKA (rows: teacher stages 1-4, columns: student stages 1-4)")
    for i, row in enumerate(m.tolist()):
        print(f"T{i + 1} " + " ".join(f"{v:.3f}" for v in row))
    print(f"mean diagonal {m.diagonal().mean():.3f}")
    if ns.plot:
        plot_cka(m, ns.plot, f"linear CKA on {cfg.data} ({n} test images)",
                 Path(ns.teacher).name, Path(ns.student).name)  # fmt: skip
    if ns.json:
        Path(ns.json).write_text(json.dumps({"cka": m.tolist(), "images": n}, indent=1) + "\n")
    return 0
