"""One CBQ rule at every setting: its choices made on the validation split, reported on test.

The rule, written down before any of its runs (the ladder's schedule: 16 x 256 calibration tokens
of wiki-offline train, 1 epoch, batch 1, window 2 / overlap 1, LoRA rounding started from GPTQ's
codes, asymmetric weights, seed = calibration seed):

1. Start (scope: weight-only settings with 3- or 4-bit weights in groups): CFP, or AWQ's scales
   and clipping ranges with a clipping-factor learning rate of 1e-2 (`--awq-init --lr-clip
   1e-2`). ONE choice for the whole scope, made on the validation split (decision ``start``).
   Elsewhere (2-bit, per-channel, weight-activation settings): CFP.
2. Rotation: with 4-bit activations always R1 + R4 (`--rotate random --rotate-down random`;
   unrotated, every method is in the thousands). With 8-bit activations: rotated or not, ONE
   choice made on the validation split at W4A8 (decision ``rotation``).

Each decision compares its options by the geometric mean of the perplexities over its settings and
both corpora on the VALIDATION split (documents in hash buckets 5-9, disjoint from calibration and
test), calibration seed 0. The rule then runs unchanged at every setting with seeds 0, 1, 2 and is
reported on the TEST split (first 20 windows of 512 tokens of wiki-offline and bbc-news) beside
GPTQ, AWQ (weight-only settings) and rotated GPTQ (weight-activation settings). Test runs are the
ladder's (``benchmarks/cbq_ladder.py``, same command, same seeds) where the ladder holds them and
are run here otherwise; nothing in this table was chosen on its test windows.

    python benchmarks/cbq_rule.py                  # validation runs, then the rule's test runs
    python benchmarks/cbq_rule.py --validation-only

Writes benchmarks/results/cbq_rule.{json,md}; finished runs are kept in the JSON and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cbq_ladder as ladder  # noqa: E402
from bench_common import ROOT, machine_line, mean_std, run_quantize, seed_list  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CORPORA = ladder.CORPORA
DECISIONS = {  # name: (settings judged, {option: ladder row})
    "start": (("w3g64", "w4g64"), {"CFP": "cbq", "AWQ start, clipping lr 1e-2": "cbq-awq-lrclip"}),
    "rotation": (("w4a8",), {"not rotated": "cbq", "R1 + R4": "cbq-rot"}),
}
BASELINES = {  # setting kind: ladder baseline rows shown beside the rule
    "weight": ("gptq", "awq"),
    "act": ("gptq", "gptq-rot", "sq-rtn"),
}


def rule_row(setting: str, picks: dict[str, str]) -> str:
    """The ladder row the rule runs at ``setting`` given the validation picks."""
    if setting == "w4a4":
        return "cbq-rot"
    for name, (scope, options) in DECISIONS.items():
        if setting in scope:
            return options[picks[name]]
    return "cbq"


def validation_run(setting: str, row: str, seed: int, a) -> dict:
    """One ladder row evaluated on the validation split (its own run directory)."""
    _, method, flags = ladder.ROWS[row]
    flags = [*ladder.SETTINGS[setting][1], "--no-sym", *flags]
    if method == "cbq":
        flags += ["--epochs", "1"]
    if row in ladder.ROT_ROWS:
        flags += ["--rotate-seed", str(seed)]
    return run_quantize(
        ladder.MODEL, method, flags, ladder.CACHE / "runs-val" / f"{setting}-{row}-s{seed}",
        seed=seed, n_calib=16, seq_len=512, eval_windows=a.eval_windows, corpora=CORPORA,
        calib_seq_len=256, extra=[*ladder.OVERRIDES.get(row, []), "--split", "validation"],
        keep_weights=False,
    )  # fmt: skip


def geo(ppls: list[dict]) -> float:
    vals = [p[c] for p in ppls for c in CORPORA]
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def picks_of(val: dict) -> dict[str, str] | None:
    out = {}
    for name, (settings, options) in DECISIONS.items():
        scores = {}
        for opt, row in options.items():
            runs = [val.get(f"{s}-{row}-s0") for s in settings]
            if any(r is None for r in runs):
                return None
            scores[opt] = geo([r["ppl"] for r in runs])
        out[name] = min(scores, key=scores.get)
    return out


def markdown(res: dict, ladder_res: dict, a) -> str:
    val, picks = res["validation"], res.get("picks")
    lines = [
        "# One CBQ rule at every setting (SmolLM2-135M), chosen on validation, reported on test",
        "",
        "The rule and its two decisions are stated in benchmarks/cbq_rule.py's docstring, written "
        "before the runs. Validation: the first "
        f"{a.eval_windows} windows of 512 tokens of the validation splits of wiki-offline and "
        "bbc-news (hash buckets 5-9 of documents; calibration reads train, buckets 10-99). Test: "
        "the first 20 windows of the test splits (buckets 0-4), as in the ladder. Calibration: "
        "16 x 256 tokens of wiki-offline train, 1 epoch.",
        "",
        "Command: `python benchmarks/cbq_rule.py` (test runs not in benchmarks/results/"
        "cbq_ladder.json are run by it with the ladder's command).",
        res.get("machine", machine_line()),
        "",
        "## Decisions (validation split, calibration seed 0; geometric mean over settings and corpora)",
        "",
        "| decision | option | settings | " + " | ".join(f"{c} ppl" for c in CORPORA)
        + " | geometric mean | for comparison: test, ladder, 3 seeds |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, (settings, options) in DECISIONS.items():
        for opt, row in options.items():
            runs = [val.get(f"{s}-{row}-s0") for s in settings]
            if any(r is None for r in runs):
                continue
            cells = [" / ".join(f"{r['ppl'][c]:.2f}" for r in runs) for c in CORPORA]
            chosen = " (chosen)" if picks and picks[name] == opt else ""
            test = [ladder.runs_of(ladder_res, s, row) for s in settings]
            test_geo = (
                f"{geo([x['ppl'] for rr in test for x in rr]):.2f}" if all(test) else "-"
            )  # read after the choice, never used for it
            lines.append(f"| {name} | {opt}{chosen} | {', '.join(settings)} | "
                         + " | ".join(cells) + f" | {geo([r['ppl'] for r in runs]):.2f} | {test_geo} |")  # fmt: skip
    if not picks:
        lines += ["", "Decisions not complete: no test table yet."]
        return "\n".join(lines) + "\n"
    fp = ladder_res.get("fp32", {}).get("ppl")
    lines += [
        "",
        "## The rule on the test split (mean ± sample std over calibration seeds 0, 1, 2)",
        "",
        f"Rule: start = {picks['start']} at W3 / W4 g64; rotation at W4A8 = {picks['rotation']}; "
        "W4A4 rotated; CFP elsewhere. Baseline rows: the ladder's, same calibration windows."
        + (f" FP32: {fp['wiki-offline']:.2f} / {fp['bbc-news']:.2f}." if fp else ""),
        "",
        "| setting | method | n | wiki-offline ppl | bbc-news ppl | rule below every baseline |",
        "|---|---|---|---|---|---|",
    ]
    for s, (slabel, _) in ladder.SETTINGS.items():
        row = rule_row(s, picks)
        kind = "act" if s in ladder.ACT_SETTINGS else "weight"
        runs = ladder.runs_of(res["test"], s, row)
        means = {}
        for r in (*BASELINES[kind], row):
            rr = runs if r == row else ladder.runs_of(ladder_res, s, r)
            if not rr:
                continue
            means[r] = {c: sum(x["ppl"][c] for x in rr) / len(rr) for c in CORPORA}
            cells = [mean_std([x["ppl"][c] for x in rr]) for c in CORPORA]
            label = f"**rule: {ladder.ROWS[r][0]}**" if r == row else ladder.ROWS[r][0]
            verdict = ""
            if r == row:
                base = [m for k, m in means.items() if k != row]
                verdict = "yes" if base and all(
                    means[row][c] < min(m[c] for m in base) for c in CORPORA) else "NO"  # fmt: skip
            lines.append(
                f"| {slabel} | {label} | {len(rr)} | {cells[0]} | {cells[1]} | {verdict} |"
            )
    lines += [
        "",
        "llm-compressor's GPTQ was run only at W4 g64 and under benchmarks/ptq_baselines.py's "
        "protocol (32 x 512 calibration, 40 test windows): 16.54 ± 0.04 / 31.66 ± 0.16 against "
        "slimkit's GPTQ 16.62 ± 0.09 / 31.84 ± 0.35 there (3 seeds each, "
        "benchmarks/results/ptq_baselines.md); slimkit's GPTQ row stands in for it here.",
        "",
        "Test rows taken from benchmarks/results/cbq_ladder.json: "
        + ", ".join(sorted(k for k, v in res["test"].items() if v.get("from_ladder")))
        + ". Run here: "
        + (", ".join(sorted(k for k, v in res["test"].items() if not v.get("from_ladder"))) or "none")
        + ".",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=seed_list, default="0,1,2", help="test seeds of the rule")
    p.add_argument("--eval-windows", type=int, default=20, help="validation windows per corpus")
    p.add_argument("--validation-only", action="store_true")
    p.add_argument("--results", default=str(RESULTS / "cbq_rule.json"))
    a = p.parse_args()
    path = Path(a.results)
    res = json.loads(path.read_text()) if path.exists() else {}
    res.setdefault("validation", {})
    res.setdefault("test", {})
    res["machine"] = machine_line()
    lpath = RESULTS / "cbq_ladder.json"
    ladder_res = json.loads(lpath.read_text()) if lpath.exists() else {}

    def save() -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(path)
        md = path.with_suffix(".md")
        md.with_suffix(".md.tmp").write_text(markdown(res, ladder_res, a))
        md.with_suffix(".md.tmp").replace(md)

    for settings, options in DECISIONS.values():
        for row in options.values():
            for s in settings:
                key = f"{s}-{row}-s0"
                if key not in res["validation"]:
                    res["validation"][key] = validation_run(s, row, 0, a)
                    print("validation", key, res["validation"][key]["ppl"], flush=True)
                    save()
    res["picks"] = picks_of(res["validation"])
    save()
    if a.validation_only:
        print(path.with_suffix(".md").read_text())
        return
    for seed in a.seeds:
        for s in ladder.SETTINGS:
            row = rule_row(s, res["picks"])
            key = f"{s}-{row}-s{seed}"
            if key in res["test"]:
                continue
            if key in ladder_res:
                res["test"][key] = {**ladder_res[key], "from_ladder": True}
            else:
                res["test"][key] = ladder.run(s, row, seed, ladder.default_args())
                print("test", key, res["test"][key]["ppl"], flush=True)
            save()
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
