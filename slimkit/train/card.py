"""What a finished training run leaves for people to look at: a loss curve and a model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

log = logging.getLogger("slimkit")


def read_metrics(path: Path) -> list[dict]:
    """The per-step records of ``metrics.jsonl`` (roll-back events left out)."""
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if "event" not in r]


def plot_losses(metrics: Path, out: Path) -> bool:
    """Loss (log scale) and learning rate per step as a PNG; False when matplotlib is missing."""
    rows = read_metrics(metrics)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no loss plot (pip install 'slimkit[plot]')")
        return False
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="loss")
    if all(r["loss"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in rows], color="tab:orange", lw=0.8, alpha=0.7)
    lr.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return True


def write_card(path: Path, report: dict, config: dict) -> None:
    """``README.md``: what was trained, with which command and options, and the headline numbers."""
    head = report.get("headline", {})
    lines = [f"# slimkit {report.get('kind', 'training')} run", ""]
    if report.get("command"):
        lines += ["Command:", "", "```", report["command"], "```", ""]
    if head:
        lines += ["| result | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in head.items()]  # fmt: skip
        lines.append("")
    curve = report.get("validation_curve") or []
    if len(curve) > 1:  # a learning curve: one row per evaluation, its columns from the first
        keys = list(curve[0])
        lines += ["Validation during training:", "", "| " + " | ".join(keys) + " |",
                  "|" + "---|" * len(keys)]  # fmt: skip
        lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                                    for k in keys) + " |" for r in curve]  # fmt: skip
        lines.append("")
    if report.get("protocol"):
        lines += [f"Evaluation protocol: {report['protocol']}", ""]
    lines += [
        f"{report.get('world_size', 1)} process(es) on {report.get('device', '?')}, "
        f"{report.get('seconds', 0):.0f} s of training, {report.get('rollbacks', 0)} roll-back(s)"
        + (
            f", resumed at step {report['resumed_at_step']}"
            if report.get("resumed_at_step")
            else ""
        )
        + ".",
        "",
        "Files: `config.yaml` (the options, below), `report.json` (all metrics), `metrics.jsonl` "
        "(one line per optimizer step), `loss.png`, `run.log`.",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    (path / "README.md").write_text("\n".join(lines))
