"""Image-classification and distillation commands: train-classifier, distill, cka, and
GPT4Image's describe and embed-text."""

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


@command("describe", configs=["slimkit.distill.describers:DescribeConfig"], run=("out",),
         out_help="caption file to write (JSON lines: id, caption, split, label)",
         help="write one caption per image, keyed by sample id (GPT4Image)",
         description="Write one caption per image of a split, keyed by its stable sample id: "
                     "offline from measured attributes or the class name, online with any "
                     "transformers image-to-text model.")  # fmt: skip
def describe(inv: Invocation) -> int:
    from slimkit.distill.describers import describe as run_describe

    r = run_describe(*inv.configs, out=inv.ns.out)
    print(f"{r['out']}: {r['count']} captions ({r['distinct']} distinct, {r['mean_words']:.1f} "
          f"words each) for split {r['split']}")  # fmt: skip
    for e in r["examples"]:
        print(f"  {e}")
    return 0


@command("embed-text", configs=["slimkit.distill.text_encoders:EmbedTextConfig"], run=("out",),
         args=[arg("captions", help="caption file of slimkit describe (JSON lines)")],
         out_help="embeddings file to write (.safetensors; kept when already up to date)",
         help="embed captions with a frozen text encoder, cached in safetensors (GPT4Image)",
         description="Embed every caption with a frozen text encoder; L2-normalised rows, the "
                     "id list and a fingerprint of captions + encoder are saved together.")  # fmt: skip
def embed_text(inv: Invocation) -> int:
    from slimkit.distill.text_encoders import embed_text as run_embed

    r = run_embed(inv.ns.captions, *inv.configs, out=inv.ns.out)
    state = "up to date, kept" if r["cached"] else f"{r['dim']}-d"
    print(f"{r['out']}: {r['count']} embeddings ({state}), {100 * r['truncated']:.1f} % of the "
          f"captions truncated, fingerprint {r['fingerprint']}")  # fmt: skip
    return 0
