"""Helpers of the benchmark scripts that write into user-facing files."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_common import mean_std, seed_list, sync_readme  # noqa: E402


def test_sync_readme_replaces_only_the_marked_block_and_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    head, tail = "# T\n\nintro\n<!-- t:begin -->\n", "<!-- t:end -->\n\nafter\n"
    readme.write_text(head + "old table\nold verdict\n" + tail)
    assert sync_readme("t", "\nnew table\n\n", readme)
    assert readme.read_text() == head + "new table\n" + tail
    assert sync_readme("t", "new table", readme)
    assert readme.read_text() == head + "new table\n" + tail
    # other keys and files without markers are left untouched
    assert not sync_readme("other", "x", readme)
    assert readme.read_text() == head + "new table\n" + tail
    bare = tmp_path / "B.md"
    bare.write_text("<!-- t:end --> before <!-- t:begin -->\n")
    assert not sync_readme("t", "x", bare)
    assert bare.read_text() == "<!-- t:end --> before <!-- t:begin -->\n"


def test_seed_list_parses_integers_and_rejects_the_rest():
    import argparse

    import pytest

    assert seed_list("0,1,2") == [0, 1, 2]
    assert seed_list("7") == [7]
    for bad in ("1,x", "", "1,,2", "0.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
            seed_list(bad)


def test_mean_std_formats_one_many_and_missing_values():
    assert mean_std([]) == "-"
    assert mean_std([None, 2.0]) == "2.00"
    assert mean_std([1.0, 3.0]) == "2.00 ± 1.41"
    assert mean_std([100.4, 99.6], "{:.0f}") == "100 ± 1"


def test_cbq_ladder_gap_target_is_judged_against_the_better_gptq_row():
    """The halving target uses the lower GPTQ perplexity per corpus (GPTQ on the ladder's
    calibration or on 32 x 512); the ratio to GPTQ given the same calibration is shown beside."""
    from types import SimpleNamespace

    import cbq_ladder

    def run(wiki, bbc):
        return {"ppl": {"wiki-offline": wiki, "bbc-news": bbc}, "seconds": 1.0, "peak_rss_gb": 1.0}

    results = {
        "fp32": {"ppl": {"wiki-offline": 10.0, "bbc-news": 20.0}},
        "w4g64-gptq-s0": run(14.0, 24.0),  # better on bbc-news
        "w4g64-gptq-long-s0": run(12.0, 28.0),  # better on wiki-offline
        "w4g64-cbq-s0": run(11.0, 22.0),
        "w4g64-cbq-fast-s0": run(11.5, 21.0),
        "w4g64-cbq-fast-s1": run(10.5, 23.0),
    }
    a = SimpleNamespace(n_calib=16, calib_seq_len=256, epochs=1, eval_windows=20, seq_len=512)
    text = cbq_ladder.summarize(results, a).splitlines()
    (main,) = [ln for ln in text if ln.startswith("- W4A16 g64, CBQ (= + CFP):")]
    (fast,) = [ln for ln in text if ln.startswith("- W4A16 g64, CBQ, fast preset")]
    # CBQ: gaps 1 / 2 against the best gaps 2 / 4; vs GPTQ (same calibration) 1/4 and 2/4
    assert "best GPTQ row's gap: wiki-offline 0.50, bbc-news 0.50 (target <= 0.5: met)" in main
    assert "[vs the GPTQ row with the same calibration: wiki-offline 0.25, bbc-news 0.50]" in main
    # fast (mean 11.0 / 22.0) the same against the best rows; same calibration = GPTQ 32 x 512
    assert "best GPTQ row's gap: wiki-offline 0.50, bbc-news 0.50 (target <= 0.5: met)" in fast
    assert "same calibration: wiki-offline 0.50, bbc-news 0.25]" in fast
    results["w4g64-cbq-s0"] = run(11.0, 22.1)
    (main,) = [ln for ln in cbq_ladder.summarize(results, a).splitlines() if "CBQ (= + CFP):" in ln]
    assert "bbc-news 0.53 (target <= 0.5: NOT met)" in main
    assert "| W4A16 g64 | CBQ, fast preset (1 epoch, 32 x 512) | 2 | 11.00 ± 0.71 |" in "\n".join(
        text
    )
    # GPTQ on 64 x 512 is a baseline, takes part in "best" and is the 64 x 512 row's own GPTQ
    results["w4g64-gptq-64-s0"] = run(13.0, 30.0)
    results["w4g64-cbq-awq4k-64-s0"] = run(11.0, 22.0)

    def verdict():
        text = cbq_ladder.summarize(results, a).splitlines()
        (line,) = [ln for ln in text if ln.startswith("- W4A16 g64, CBQ, 1 epoch, 64 x 512")]
        return line

    assert "below every baseline (gptq, gptq-long, gptq-64)" in verdict()
    assert "best GPTQ row's gap: wiki-offline 0.50, bbc-news 0.50" in verdict()
    assert "same calibration: wiki-offline 0.33, bbc-news 0.20]" in verdict()
    results["w4g64-gptq-64-s0"] = run(11.5, 30.0)  # now the best GPTQ row on wiki-offline
    assert "best GPTQ row's gap: wiki-offline 0.67, bbc-news 0.50" in verdict()


def test_cbq_ladder_fast_row_runs_the_fast_preset():
    """The ladder's `cbq-fast` row spells the preset out as flags; it must follow the preset."""
    import cbq_ladder

    from slimkit.quant.methods import CBQConfig

    fast = CBQConfig.PRESETS["fast"]
    flags = ["--epochs", str(fast["epochs"]), "--n-calib", str(fast["n_calib"])]
    flags += ["--calib-seq-len", str(fast["calib_seq_len"])]
    assert cbq_ladder.OVERRIDES["cbq-fast"] == flags
    label = cbq_ladder.ROWS["cbq-fast"][0]
    assert f"{fast['n_calib']} x {fast['calib_seq_len']}" in label


def test_cbq_ladder_plan_puts_each_baseline_where_it_applies():
    """AWQ is weight-only (as in the reference), SmoothQuant + RTN only at the W+A settings; the
    first seed of every row comes before any extra seed."""
    import cbq_ladder

    p = cbq_ladder.plan(["w3g64", "w4a8"], ["awq", "sq-rtn", "gptq", "gptq-rot"], [0, 1])
    assert ("w3g64", "awq", 0) in p and ("w3g64", "awq", 1) in p
    assert ("w4a8", "gptq-rot", 0) in p
    assert not any(s == "w4a8" and r == "awq" for s, r, _ in p)
    assert not any(s == "w3g64" and r in ("sq-rtn", "gptq-rot") for s, r, _ in p)
    firsts = [i for i, (_, _, sd) in enumerate(p) if sd == 0]
    assert max(firsts) < min(i for i, (_, _, sd) in enumerate(p) if sd == 1)
    assert "awq" in cbq_ladder.BASELINES


def test_cbq_ladder_lowest_cbq_row_needs_three_seeds_and_beats_each_corpus_baseline():
    """The per-setting pick is the CBQ row with the lowest geometric mean among rows with 3
    seeds; it is judged against the lowest baseline of each corpus separately."""
    from types import SimpleNamespace

    import cbq_ladder

    def run(wiki, bbc):
        return {"ppl": {"wiki-offline": wiki, "bbc-news": bbc}, "seconds": 1.0, "peak_rss_gb": 1.0}

    results = {"fp32": {"ppl": {"wiki-offline": 10.0, "bbc-news": 20.0}}}
    for sd in range(3):
        results[f"w3g64-gptq-s{sd}"] = run(14.0, 30.0)
        results[f"w3g64-awq-s{sd}"] = run(16.0, 24.0)  # the lowest baseline on bbc-news
        results[f"w3g64-cbq-s{sd}"] = run(12.0, 26.0)  # geometric mean 17.7
        results[f"w3g64-cbq-fast-s{sd}"] = run(13.0, 23.0)  # 17.3: the pick
        results[f"w3g64-k2-s{sd}"] = run(10.5, 21.0)  # a ladder step, not a CBQ row
    results["w3g64-cbq-long-s0"] = run(11.0, 21.0)  # lowest, but one seed
    a = SimpleNamespace(n_calib=16, calib_seq_len=256, epochs=1, eval_windows=20, seq_len=512)

    def line():
        text = cbq_ladder.summarize(results, a).splitlines()
        (ln,) = [x for x in text if x.startswith("- W3A16 g64: ")]
        return ln

    assert line() == (
        "- W3A16 g64: CBQ, fast preset (1 epoch, 32 x 512) (n=3) 13.00 / 23.00; lowest baseline "
        "per corpus 14.00 (GPTQ) / 24.00 (AWQ): below on both corpora: yes"
    )
    for sd in range(3):
        results[f"w3g64-awq-s{sd}"] = run(16.0, 22.5)
    assert line().endswith("22.50 (AWQ): below on both corpora: NO")
