"""The numbers `make demo` prints, recorded: FP32 and CBQ W4A16 g64 (demo preset) perplexity on
the embedded SmolLM2-135M, seconds of quantization and in all, peak memory, and the machine.

    python benchmarks/demo.py                            # runs `slimkit demo` (about 5 min on 2 cores)
    python benchmarks/demo.py --from-run runs/demo-cbq-w4g64   # records a finished `make demo` run

Writes benchmarks/results/demo.md and demo.json and refreshes the README's demo line. Seconds
depend on what else the machine runs: the load average before and after is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, sh, slimkit_cmd, sync_readme  # noqa: E402

from slimkit.workflows.demo import DEMO_ARGS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def summarise(run: Path, load: tuple[float, float] | None) -> dict:
    report = json.loads((run / "report.json").read_text())
    r = report["eval"]["wiki-offline"]
    return {
        "command": f"slimkit quantize {DEMO_ARGS} --out {run.name}",
        "protocol": r["protocol"],
        "fp32_ppl": r["fp"]["ppl"],
        "cbq_ppl": r["quant"]["ppl"],
        "quantize_seconds": report["quantize_seconds"],
        "total_seconds": report["total_seconds"],
        "peak_rss_gb": report["peak_rss_gb"],
        "load_before_after": list(load) if load else None,
        "machine": machine_line(),
    }


def markdown(s: dict, how: str) -> str:
    load = s["load_before_after"]
    load = (
        f" Load average before / after: {load[0]:.2f} / {load[1]:.2f}."
        if load
        else " (Load average not recorded: the run was made by `make demo`.)"
    )
    return (
        "# `make demo`: CBQ W4A16 g64 (demo preset) on the embedded SmolLM2-135M\n\n"
        f"Command: `{how}` (the run directory records `{s['command']}`).\n"
        f"{s['machine']}{load}\n\n"
        f"Evaluation: {s['protocol']}.\n\n"
        "| model | wiki-offline ppl |\n|---|---|\n"
        f"| FP32 | {s['fp32_ppl']:.3f} |\n"
        f"| CBQ W4A16 g64, demo preset (fake-quant) | {s['cbq_ppl']:.3f} |\n\n"
        f"Quantization {s['quantize_seconds']:.0f} s, whole run {s['total_seconds']:.0f} s "
        f"(model load, calibration, two perplexity passes), peak RSS {s['peak_rss_gb']:.2f} GB.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", default="", help="record this finished demo run directory")
    args = ap.parse_args()
    if args.from_run:
        run, how, load = Path(args.from_run), "make demo", None
    else:
        before = os.getloadavg()[0]
        run = Path(tempfile.mkdtemp(prefix="slimkit-demo-")) / "run"
        sh(slimkit_cmd("demo", "--out", str(run)))
        how, load = "python benchmarks/demo.py", (before, os.getloadavg()[0])
    s = summarise(run, load)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(s, indent=1) + "\n")
    (RESULTS / "demo.md").write_text(markdown(s, how))
    line = (
        f"FP32 {s['fp32_ppl']:.2f}, CBQ {s['cbq_ppl']:.2f}, {s['quantize_seconds']:.0f} s of "
        f"quantization and {s['total_seconds']:.0f} s in all on 2 CPU cores "
        "([benchmarks/results/demo.md](benchmarks/results/demo.md), `make demo` recorded by "
        "`python benchmarks/demo.py --from-run runs/demo-cbq-w4g64`)."
    )
    sync_readme("demo", line)
    print(markdown(s, how))


if __name__ == "__main__":
    main()
