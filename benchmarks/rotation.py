"""The rotation front end on the embedded SmolLM2-135M: RTN with and without `--rotate` (R1) and
`--rotate-down` (R4), at W4A4 (where 4-bit activations break) and W4A8.

Every row is one `slimkit quantize --method rtn` process (per-channel asymmetric weights,
dynamic per-token activations; no calibration data is used), evaluated on the first 20 windows
of 512 tokens of wiki-offline and bbc-news (test splits). Rotated rows run once per rotation
seed (`--rotate-seed`); the table gives mean ± sample standard deviation.

    python benchmarks/rotation.py                 # about 15 min on 2 cores
    python benchmarks/rotation.py --seeds 0

Writes benchmarks/results/rotation.md and rotation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, eval_fp, machine_line, mean_std, run_quantize, seed_list  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "rotation"
MODEL = "smollm2-135m"
CORPORA = ("wiki-offline", "bbc-news")
BASE = ["--wbits", "4", "--group-size", "-1", "--no-sym"]
# name: (label, flags, depends on the rotation seed)
ROWS = {
    "w4a4": ("W4A4, no rotation", [*BASE, "--abits", "4"], False),
    "w4a4-r1": ("W4A4, --rotate random (R1)", [*BASE, "--abits", "4", "--rotate", "random"], True),
    "w4a4-r1r4": ("W4A4, R1 + --rotate-down random (R4)",
                  [*BASE, "--abits", "4", "--rotate", "random", "--rotate-down", "random"], True),
    "w4a8": ("W4A8, no rotation", [*BASE, "--abits", "8"], False),
    "w4a8-r1r4": ("W4A8, R1 + R4",
                  [*BASE, "--abits", "8", "--rotate", "random", "--rotate-down", "random"], True),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="rotation seeds of the rotated rows")
    ap.add_argument("--eval-windows", type=int, default=20)
    args = ap.parse_args()
    seeds = seed_list(args.seeds)
    CACHE.mkdir(parents=True, exist_ok=True)
    fp = eval_fp(MODEL, CACHE / "fp.json", seq_len=512, eval_windows=args.eval_windows,
                 corpora=CORPORA)  # fmt: skip
    runs: dict[str, list[dict]] = {}
    for name, (_, flags, seeded) in ROWS.items():
        for s in seeds if seeded else [0]:
            extra = ["--rotate-seed", str(s)] if seeded else []
            r = run_quantize(MODEL, "rtn", flags + extra, CACHE / f"{name}-s{s}", seed=0,
                             n_calib=8, seq_len=512, eval_windows=args.eval_windows,
                             corpora=CORPORA, keep_weights=False)  # fmt: skip
            runs.setdefault(name, []).append(r)
    lines = [
        "# Rotation front end: RTN on SmolLM2-135M (embedded)",
        "",
        f"Command: `python benchmarks/rotation.py --seeds {args.seeds}`. {machine_line()}",
        "",
        "Per-channel asymmetric 4-bit weights, dynamic per-token activations; perplexity on the "
        f"first {args.eval_windows} windows of 512 tokens of each test split. Rotated rows: mean "
        f"± std over rotation seeds {args.seeds}.",
        "",
        f"FP32: {fp['ppl']['wiki-offline']:.2f} / {fp['ppl']['bbc-news']:.2f}.",
        "",
        "| row | n | wiki-offline ppl | bbc-news ppl |",
        "|---|---|---|---|",
    ]
    for name, (label, _, _) in ROWS.items():
        rs = runs[name]
        cells = [mean_std([r["ppl"][c] for r in rs]) for c in CORPORA]
        lines.append(f"| {label} | {len(rs)} | {cells[0]} | {cells[1]} |")
    lines += ["", "Commands of every run: rotation.json."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rotation.json").write_text(json.dumps({"fp": fp, "runs": runs}, indent=1) + "\n")
    (RESULTS / "rotation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
