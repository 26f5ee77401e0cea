"""Vision-language commands: clip train, clip zeroshot, clip retrieve."""

from __future__ import annotations

from slimkit.core.commands import Invocation, arg, command, group

group(
    "clip",
    help="CLIP dual encoders and LightCLIP (train, zero-shot, retrieval): slimkit clip --help",
)


@command("train", group="clip", configs=["slimkit.clip.train:ClipTrainConfig"],
         run=("out", "resume", "overwrite"),
         help="train a CLIP dual encoder (plain, or LightCLIP's multi-level losses)",
         description="Train a CLIP dual encoder: plain contrastive, or LightCLIP (softened "
                     "negatives, token-level matching, fusion-assisted MLM).")  # fmt: skip
def clip_train(inv: Invocation) -> int:
    from slimkit.clip.train import train_clip

    r = train_clip(*inv.configs, **inv.run_kwargs)
    if r:
        print(f"{r['out']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["headline"].items())
              + f" ({r['seconds']:.0f} s)")  # fmt: skip
    return 0


_RUN = arg("run", help="a clip train run directory")
_SPLIT = arg("--split", default="test", help="split of a caption set: train | val | test")
_JSON = arg("--json", output=True, help="also write the metrics here")


def _show(metrics: dict, path: str | None) -> None:
    print(" ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    if path:
        from slimkit.core.rundir import write_json

        write_json(path, metrics)  # temporary file, then renamed


@command("zeroshot", group="clip",
         args=[_RUN, arg("--data", required=True,
                         help="imagefolder:PATH (class = folder name) or a labelled caption set"),
               arg("--templates", default="default",
                   help="default | heldout | a file of templates, one per line with {}"),
               _SPLIT, _JSON],
         help="zero-shot classification top-1 / top-5",
         description="Zero-shot classification with a prompt ensemble: top-1 / top-5.")  # fmt: skip
def clip_zeroshot(inv: Invocation) -> int:
    from slimkit.clip.evaluate import zeroshot_run

    ns = inv.ns
    m = zeroshot_run(ns.run, ns.data, ns.templates, ns.split)
    print(f"{m['images']} images, {m['classes']} classes, {len(m['templates'])} templates")
    _show(m, ns.json)
    return 0


@command("retrieve", group="clip",
         args=[_RUN, arg("--data", required=True, help="pairs:FILE.jsonl|.csv or a caption set"),
               _SPLIT, _JSON],
         help="image <-> text retrieval R@1/5/10",
         description="Image -> text and text -> image retrieval: R@1/5/10.")  # fmt: skip
def clip_retrieve(inv: Invocation) -> int:
    from slimkit.clip.evaluate import retrieve_run

    ns = inv.ns
    m = retrieve_run(ns.run, ns.data, ns.split)
    print(f"{m['pairs']} pairs")
    _show(m, ns.json)
    return 0
