"""CBQ ablation ladder on the embedded SmolLM2-135M, beside RTN, GPTQ, AWQ and SmoothQuant.

Ladder (each step adds one CBQ component): RTN -> GPTQ -> block reconstruction with learned
step sizes (K=1, round-to-nearest: the OmniQuant-LWC analogue) -> + cross-block windows (K=2,
O=1) -> + LoRA-Rounding (started from GPTQ's codes, slimkit's default) -> + CFP (= CBQ); plus
CBQ with the rounding started from round-to-nearest (the paper's AdaRound initialisation),
full-rank AdaRound in place of LoRA-Rounding (cost check), CBQ's `fast` and `default` presets
(32 x 512 calibration, 1 and 2 epochs) beside GPTQ given the same calibration, AWQ at the
weight-only settings, CBQ started from AWQ's scales and clipping ranges instead of CFP and CBQ
with a ten times smaller clipping-factor learning rate (each alone and together, and together
under the fast preset), and at the
weight-activation settings SmoothQuant + RTN and a rotation front end (`--rotate random
--rotate-down random`, QuaRot's R1 + R4) under RTN, GPTQ and CBQ (and under GPTQ and CBQ's fast
preset given 32 x 512 calibration).

Every run is one `slimkit quantize` process calibrated on wiki-offline (train split) and evaluated
on wiki-offline and bbc-news (test splits; calibration never sees bbc-news), context --seq-len,
GPTQ perplexity protocol. Several calibration seeds give mean ± sample std.

    python benchmarks/cbq_ladder.py                               # the whole plan (many hours)
    python benchmarks/cbq_ladder.py --settings w2g64 --rows rtn,gptq,cbq --seeds 0

Runs are ordered so that the most informative rows finish first (RTN, GPTQ and CBQ at every
setting, then AWQ and SmoothQuant, then the ladder steps, then more seeds); results are appended to
benchmarks/results/cbq_ladder.json as each run finishes, a rerun skips finished runs, and the
Markdown table benchmarks/results/cbq_ladder.md and the plot cbq_ladder.png (perplexity gap to
FP32 of RTN, GPTQ, AWQ, SmoothQuant + RTN, CBQ and its fast preset per setting) are rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    ROOT,
    eval_fp,
    machine_line,
    mean_std,
    pyplot,
    run_quantize,
    seed_list,
    sync_readme,
)

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "cbq"
MODEL = "smollm2-135m"
CORPORA = ("wiki-offline", "bbc-news")

SETTINGS = {  # name: (label, flags)
    "w2g64": ("W2A16 g64", ["--wbits", "2", "--group-size", "64"]),
    "w3g64": ("W3A16 g64", ["--wbits", "3", "--group-size", "64"]),
    "w4g64": ("W4A16 g64", ["--wbits", "4", "--group-size", "64"]),
    "w4": ("W4A16 per-channel", ["--wbits", "4", "--group-size", "-1"]),
    "w4a8": ("W4A8", ["--wbits", "4", "--group-size", "-1", "--abits", "8"]),
    "w4a4": ("W4A4", ["--wbits", "4", "--group-size", "-1", "--abits", "4"]),
}
ACT_SETTINGS = ("w4a8", "w4a4")
BASELINES = (
    "rtn",
    "gptq",
    "awq",
    "sq-rtn",
    "gptq-long",
    "gptq-64",
    "rtn-rot",
    "gptq-rot",
    "gptq-long-rot",
)
NOCFP = ["--no-cfp"]
ROT = ["--rotate", "random", "--rotate-down", "random"]  # QuaRot-style R1 + R4 front end
ROT_ROWS = ("rtn-rot", "gptq-rot", "cbq-rot", "gptq-long-rot", "cbq-fast-rot")
ROWS = {  # name: (label, method, flags)
    "rtn": ("RTN", "rtn", []),
    "gptq": ("GPTQ", "gptq", ["--no-static-groups"]),
    "sq-rtn": ("SmoothQuant + RTN", "smoothquant", ["--weight-method", "rtn"]),
    "awq": ("AWQ", "awq", []),
    "rtn-rot": ("RTN, rotated (R1 + R4)", "rtn", ROT),
    "gptq-rot": ("GPTQ, rotated (R1 + R4)", "gptq", ["--no-static-groups", *ROT]),
    "cbq-rot": ("CBQ, rotated (R1 + R4)", "cbq", ["--rounding", "lora", *ROT]),
    "k1": ("block recon. K=1 (LWC)", "cbq", ["--window", "1", "--overlap", "0", "--rounding", "nearest", *NOCFP]),
    "k2": ("+ windows K=2, O=1", "cbq", ["--rounding", "nearest", *NOCFP]),
    "lora": ("+ LoRA-Rounding (from GPTQ codes)", "cbq", ["--rounding", "lora", *NOCFP]),
    "cbq": ("CBQ (= + CFP)", "cbq", ["--rounding", "lora"]),
    "cbq-lin": ("CBQ, CFP also on v->o and up->down", "cbq", ["--rounding", "lora", "--cfp-linear"]),
    "cbq-awq": ("CBQ, AWQ start in place of CFP, clipping-factor lr 1e-1", "cbq",
                ["--rounding", "lora", "--awq-init", "--lr-clip", "1e-1"]),
    "cbq-awq-lrclip": ("CBQ, AWQ start, clipping-factor lr 1e-2", "cbq",
                       ["--rounding", "lora", "--awq-init", "--lr-clip", "1e-2"]),
    "cbq-lrclip": ("CBQ, clipping-factor lr 1e-2", "cbq", ["--rounding", "lora", "--lr-clip", "1e-2"]),
    "adaround": ("CBQ with full AdaRound", "cbq", ["--rounding", "full"]),
    "cbq-rtninit": ("CBQ, rounding from nearest", "cbq", ["--rounding-init", "nearest"]),
    "cbq-fast": ("CBQ, fast preset (1 epoch, 32 x 512)", "cbq", []),
    "cbq-long": ("CBQ, default preset (2 epochs, 32 x 512)", "cbq", []),
    "cbq-fast-awq": ("CBQ, fast preset, AWQ start, clipping-factor lr 1e-2", "cbq",
                     ["--awq-init", "--lr-clip", "1e-2"]),
    "cbq-fast-awq4k": ("CBQ, fast preset, AWQ start (scale search on 4096 tokens), clipping-factor lr 1e-2",
                       "cbq", ["--awq-init", "--lr-clip", "1e-2", "--awq-search-tokens", "4096"]),
    "cbq-long-awq4k": ("CBQ, default preset, AWQ start (scale search on 4096 tokens), clipping-factor lr 1e-2",
                       "cbq", ["--awq-init", "--lr-clip", "1e-2", "--awq-search-tokens", "4096"]),
    "cbq-awq4k-64": ("CBQ, 1 epoch, 64 x 512, AWQ start (scale search on 4096 tokens), clipping-factor lr 1e-2",
                     "cbq", ["--awq-init", "--lr-clip", "1e-2", "--awq-search-tokens", "4096"]),
    "gptq-long": ("GPTQ, 32 x 512 calibration", "gptq", ["--no-static-groups"]),
    "gptq-64": ("GPTQ, 64 x 512 calibration", "gptq", ["--no-static-groups"]),
    "gptq-long-rot": ("GPTQ, rotated, 32 x 512 calibration", "gptq", ["--no-static-groups", *ROT]),
    "cbq-fast-rot": ("CBQ, rotated, fast preset", "cbq", ["--rounding", "lora", *ROT]),
}  # fmt: skip
# flags that override the common calibration / schedule flags of a row (passed last)
OVERRIDES = {
    "cbq-fast": ["--epochs", "1", "--n-calib", "32", "--calib-seq-len", "512"],
    "cbq-long": ["--epochs", "2", "--n-calib", "32", "--calib-seq-len", "512"],
    "gptq-long": ["--n-calib", "32", "--calib-seq-len", "512"],
    "cbq-awq4k-64": ["--epochs", "1", "--n-calib", "64", "--calib-seq-len", "512"],
    "gptq-64": ["--n-calib", "64", "--calib-seq-len", "512"],
}
OVERRIDES["cbq-fast-rot"] = OVERRIDES["cbq-fast-awq"] = OVERRIDES["cbq-fast"]
OVERRIDES["cbq-fast-awq4k"] = OVERRIDES["cbq-fast"]
OVERRIDES["cbq-long-awq4k"] = OVERRIDES["cbq-long"]
OVERRIDES["gptq-long-rot"] = OVERRIDES["gptq-long"]


GPTQ_ROWS = ("gptq", "gptq-long", "gptq-64")


def calibration_of(row: str) -> tuple[str, str]:
    """The row's --n-calib / --calib-seq-len overrides ("" where it keeps the ladder's own)."""
    flags = OVERRIDES.get(row, [])
    return tuple(
        flags[flags.index(f) + 1] if f in flags else "" for f in ("--n-calib", "--calib-seq-len")
    )


def same_calibration_gptq(row: str) -> str | None:
    """The GPTQ row calibrated on the same windows as ``row``, if the ladder has one."""
    return next((g for g in GPTQ_ROWS if calibration_of(g) == calibration_of(row)), None)


def runs_of(results: dict, setting: str, row: str) -> list[dict]:
    """The finished runs (all seeds) of one setting and row."""
    return [v for k, v in results.items() if k.rsplit("-s", 1)[0] == f"{setting}-{row}"]


def run(setting: str, row: str, seed: int, a) -> dict:
    _, method, flags = ROWS[row]
    flags = [*SETTINGS[setting][1], "--no-sym", *flags]
    if method == "cbq":
        flags += ["--epochs", str(a.epochs)]
    if row in ROT_ROWS:  # a new rotation per seed: the spread includes the rotation's draw
        flags += ["--rotate-seed", str(seed)]
    return run_quantize(
        MODEL, method, flags, CACHE / "runs" / f"{setting}-{row}-s{seed}", seed=seed,
        n_calib=a.n_calib, seq_len=a.seq_len, eval_windows=a.eval_windows, corpora=CORPORA,
        calib_seq_len=a.calib_seq_len, extra=OVERRIDES.get(row, []), keep_weights=a.keep_weights,
        resume=a.resume,
    )  # fmt: skip


def plan(settings: list[str], rows: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    def ok(s, r):
        if r == "sq-rtn" or r in ROT_ROWS:  # rotation: a front end for 4-bit activations
            return r in rows and s in ACT_SETTINGS
        if r == "awq":  # weight-only, as in the reference
            return r in rows and s not in ACT_SETTINGS
        return r in rows

    stages = [
        ["rtn", "gptq", "cbq", "cbq-fast", "gptq-long"],
        ["awq", "sq-rtn", "rtn-rot", "gptq-rot", "cbq-rot", "cbq-awq"],
        ["gptq-long-rot", "cbq-fast-rot", "cbq-awq-lrclip"],
        ["k1", "k2", "lora", "cbq-rtninit", "adaround", "cbq-lin", "cbq-lrclip"],
        ["cbq-long", "cbq-fast-awq", "cbq-fast-awq4k", "cbq-long-awq4k", "gptq-64", "cbq-awq4k-64"],
    ]
    out = [(s, r, seeds[0]) for st in stages for s in settings for r in st if ok(s, r)]
    out += [(s, r, sd) for sd in seeds[1:] for s in settings
            for r in ("gptq", "cbq", "cbq-fast", "gptq-long") if ok(s, r)]  # fmt: skip
    out += [(s, r, sd) for sd in seeds[1:] for st in stages[1:] for s in settings for r in st
            if ok(s, r)]  # fmt: skip
    return out


MIN_SEEDS_BEST = 3


def best_cbq_row(means: dict, counts: dict) -> str | None:
    """The CBQ row (any configuration) with the lowest geometric-mean perplexity over the
    corpora among rows with at least ``MIN_SEEDS_BEST`` seeds, or None."""
    cands = [r for r in means if ROWS[r][0].startswith("CBQ") and counts[r] >= MIN_SEEDS_BEST]
    return min(cands, key=lambda r: math.prod(means[r].values()), default=None)


def gap_ratio(ppl: float, ref_ppl: float, fp_ppl: float) -> float:
    """Perplexity gap to FP32 as a fraction of the reference method's gap."""
    return (ppl - fp_ppl) / max(1e-9, ref_ppl - fp_ppl)


def summarize(results: dict, a) -> str:
    fp = results.get("fp32")
    lines = [
        "# CBQ ablation ladder on SmolLM2-135M (embedded Q4_1 GGUF dequantized to fp32)",
        "",
        f"Calibration: wiki-offline train split, {a.n_calib} windows x {a.calib_seq_len} tokens; trained rows "
        f"{a.epochs} epoch(s), batch 1, K=2/O=1 unless stated. Evaluation: GPTQ-protocol perplexity on the "
        f"first {a.eval_windows} windows of {a.seq_len} tokens of the test splits of wiki-offline and bbc-news "
        "(never seen in calibration). Weights asymmetric; activations dynamic per-token symmetric. "
        "Perplexity: mean ± sample std over calibration seeds (n). Seconds: quantization wall time; peak RSS: "
        "whole process.",
        "",
        "Command: `python benchmarks/cbq_ladder.py [--settings ...] [--rows ...] [--seeds ...]` "
        "(runs accumulate in cbq_ladder.json; each invocation skips finished runs; the "
        "invocations behind this table are listed in docs/cbq.md).",
        machine_line(),
        "",
    ]
    if fp:
        lines.append("FP32: " + ", ".join(f"{c} {fp['ppl'][c]:.2f}" for c in CORPORA) + "\n")
    lines += [
        "| setting | method | n | wiki-offline ppl | bbc-news ppl | seconds | peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts, best_rows = [], []
    for s, (slabel, _) in SETTINGS.items():
        means, counts = {}, {}
        for r, (rlabel, _, _) in ROWS.items():
            runs = runs_of(results, s, r)
            if not runs:
                continue
            means[r] = {c: sum(x["ppl"][c] for x in runs) / len(runs) for c in CORPORA}
            counts[r] = len(runs)
            cells = [mean_std([x["ppl"][c] for x in runs]) for c in CORPORA]
            lines.append(
                f"| {slabel} | {rlabel} | {len(runs)} | {cells[0]} | {cells[1]} | "
                f"{mean_std([x['seconds'] for x in runs], '{:.0f}')} | "
                f"{mean_std([x['peak_rss_gb'] for x in runs])} |"
            )
        baselines = {r: m for r, m in means.items() if r in BASELINES}
        pick = best_cbq_row(means, counts)
        if pick and baselines:
            low = {c: min(baselines, key=lambda b: baselines[b][c]) for c in CORPORA}
            below = all(means[pick][c] < baselines[low[c]][c] for c in CORPORA)
            best_rows.append(
                f"- {slabel}: {ROWS[pick][0]} (n={counts[pick]}) "
                + " / ".join(f"{means[pick][c]:.2f}" for c in CORPORA)
                + "; lowest baseline per corpus "
                + " / ".join(f"{baselines[low[c]][c]:.2f} ({ROWS[low[c]][0]})" for c in CORPORA)
                + f": below on both corpora: {'yes' if below else 'NO'}"
            )
        for r in (
            "cbq",
            "cbq-fast",
            "cbq-long",
            "cbq-rot",
            "cbq-fast-rot",
            "cbq-awq",
            "cbq-awq-lrclip",
            "cbq-fast-awq",
            "cbq-fast-awq4k",
            "cbq-long-awq4k",
            "cbq-awq4k-64",
        ):
            if r not in means or not baselines:
                continue
            below = all(means[r][c] < min(m[c] for m in baselines.values()) for c in CORPORA)
            v = (
                f"- {slabel}, {ROWS[r][0]}: below every baseline ({', '.join(baselines)}) on both "
                f"corpora: {'yes' if below else 'NO'}"
            )
            # the target is judged against the better GPTQ row per corpus (more calibration
            # data does not always help GPTQ here); the same-calibration ratio is shown beside it
            gptqs = [g for g in GPTQ_ROWS if g in means]
            if fp and gptqs and s in ("w4g64", "w4", "w3g64"):
                fpp = fp["ppl"]
                best = [
                    gap_ratio(means[r][c], min(means[g][c] for g in gptqs), fpp[c]) for c in CORPORA
                ]
                met = "met" if max(best) <= 0.5 else "NOT met"
                v += (
                    "; gap to FP32 / best GPTQ row's gap: "
                    + ", ".join(f"{c} {x:.2f}" for c, x in zip(CORPORA, best))
                    + f" (target <= 0.5: {met})"
                )
                same = same_calibration_gptq(r)
                if same in means and len(gptqs) > 1:
                    v += (
                        " [vs the GPTQ row with the same calibration: "
                        + ", ".join(
                            f"{c} {gap_ratio(means[r][c], means[same][c], fpp[c]):.2f}"
                            for c in CORPORA
                        )
                        + "]"
                    )
            verdicts.append(v)
    if verdicts:
        lines += ["", "Targets (means):", *verdicts]
    if best_rows:
        lines += [
            "",
            f"Lowest CBQ row per setting among rows with >= {MIN_SEEDS_BEST} seeds (geometric mean "
            "over the two corpora; chosen on these evaluation windows, so an optimistic pick):",
            *best_rows,
        ]
    lines += [
        "",
        "Plots: cbq_ladder.png (gap to FP32 per setting, log scale), cbq_ladder_steps.png (each "
        "ladder step's perplexity relative to GPTQ's, per setting)",
    ]
    return "\n".join(lines) + "\n"


PLOT_ROWS = ("rtn", "gptq", "gptq-long", "awq", "sq-rtn", "gptq-rot", "cbq", "cbq-fast", "cbq-rot")


def plot(results: dict, path: Path) -> bool:
    """Bars of the perplexity gap to FP32 (log scale, mean and spread over seeds) per setting."""
    plt = pyplot()
    if plt is None:
        return False
    fp = results.get("fp32")
    if not fp:
        return False
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(6 * len(CORPORA), 4), sharey=True)
    width = 0.8 / len(PLOT_ROWS)
    for ax, c in zip(axes, CORPORA):
        for j, r in enumerate(PLOT_ROWS):
            xs, ys, lo, hi = [], [], [], []
            for i, s in enumerate(SETTINGS):
                gaps = [max(v["ppl"][c] - fp["ppl"][c], 1e-3) for v in runs_of(results, s, r)]
                if gaps:
                    m = sum(gaps) / len(gaps)
                    xs.append(i + (j - (len(PLOT_ROWS) - 1) / 2) * width)
                    ys.append(m)
                    lo.append(m - min(gaps))
                    hi.append(max(gaps) - m)
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=ROWS[r][0])
        ax.set_yscale("log")
        ax.set_xticks(range(len(SETTINGS)), [v[0] for v in SETTINGS.values()], rotation=20)
        ax.set_title(f"{c} (FP32 {fp['ppl'][c]:.2f})")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("perplexity - FP32 perplexity (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M PTQ: gap to FP32, mean over seeds (bars: min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


LADDER = ("rtn", "gptq", "k1", "k2", "lora", "cbq")


def plot_steps(results: dict, path: Path) -> bool:
    """The ladder as lines: perplexity of each step relative to GPTQ's (mean over seeds), one
    line per setting, one panel per corpus; steps a setting has not run are left out."""
    plt = pyplot()
    if plt is None:
        return False

    def mean(s, r, c):
        v = [x["ppl"][c] for x in runs_of(results, s, r)]
        return sum(v) / len(v) if v else None

    fig, axes = plt.subplots(1, len(CORPORA), figsize=(6 * len(CORPORA), 4), sharey=True)
    drawn = False
    for ax, c in zip(axes, CORPORA):
        for s, (slabel, _) in SETTINGS.items():
            ref = mean(s, "gptq", c)
            pts = [(i, mean(s, r, c)) for i, r in enumerate(LADDER)]
            pts = [(i, m / ref) for i, m in pts if m is not None and ref]
            if len(pts) > 3:  # more than the baselines and CBQ
                ax.plot(*zip(*pts), marker="o", label=slabel)
                drawn = True
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(LADDER)), [ROWS[r][0].split(" (")[0] for r in LADDER],
                      rotation=25, ha="right", fontsize=8)  # fmt: skip
        ax.set_title(c)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity / GPTQ perplexity (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle("CBQ ablation ladder on SmolLM2-135M (mean over seeds)")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"subset of: {', '.join(SETTINGS)}"
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"subset of: {', '.join(ROWS)}")
    p.add_argument("--seeds", type=seed_list, default="0,1,2")
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512, help="evaluation context")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--results", default=str(RESULTS / "cbq_ladder.json"))
    p.add_argument(
        "--keep-weights",
        action="store_true",
        help="keep each run's quantized weights under benchmarks/.cache/cbq/runs (0.6 GB a run; "
        "by default only reports and logs are kept)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue each run a stopped invocation left unfinished from its last checkpoint "
        "(without it such a run starts over); its seconds include the checkpointed windows and "
        "its entry records the window it resumed at",
    )
    return p


def default_args() -> argparse.Namespace:
    """The ladder's default options (its schedule and evaluation), for scripts that reuse run()."""
    return build_parser().parse_args([])


def main() -> None:
    a = build_parser().parse_args()
    settings, rows = a.settings.split(","), a.rows.split(",")
    for x in settings:
        if x not in SETTINGS:
            raise SystemExit(f"unknown setting {x!r}; choose from {', '.join(SETTINGS)}")
    for x in rows:
        if x not in ROWS:
            raise SystemExit(f"unknown row {x!r}; choose from {', '.join(ROWS)}")
    seeds = a.seeds
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    if "fp32" not in results:
        CACHE.mkdir(parents=True, exist_ok=True)
        results["fp32"] = eval_fp(MODEL, CACHE / "fp32.json", seq_len=a.seq_len,
                                  eval_windows=a.eval_windows, corpora=CORPORA)  # fmt: skip
    for s, r, seed in plan(settings, rows, seeds):
        key = f"{s}-{r}-s{seed}"
        if key in results:
            continue
        results[key] = run(s, r, seed, a)
        path.write_text(json.dumps(results, indent=1) + "\n")
        path.with_suffix(".md").write_text(summarize(results, a))
        print(key, results[key]["ppl"], flush=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    md = summarize(results, a)
    path.with_suffix(".md").write_text(md)
    plot(results, path.with_suffix(".png"))
    plot_steps(results, path.with_name(path.stem + "_steps.png"))
    if path.resolve() == (RESULTS / "cbq_ladder.json").resolve():
        # docs/cbq.md's copy of the table and the target verdicts, between its markers
        doc = ROOT / "docs" / "cbq.md"
        if not sync_readme("cbq_ladder", md[md.index("FP32:") : md.index("Plots:")], readme=doc):
            print("docs/cbq.md has no <!-- cbq_ladder:begin/end --> markers: its table not updated")
    print(md)


if __name__ == "__main__":
    main()
