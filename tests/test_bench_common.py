"""Helpers of the benchmark scripts that write into user-facing files."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_common import mean_std, sync_readme  # noqa: E402


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


def test_mean_std_formats_one_many_and_missing_values():
    assert mean_std([]) == "-"
    assert mean_std([None, 2.0]) == "2.00"
    assert mean_std([1.0, 3.0]) == "2.00 ± 1.41"
    assert mean_std([100.4, 99.6], "{:.0f}") == "100 ± 1"


def test_cbq_ladder_gap_ratio_uses_the_gptq_run_with_the_same_calibration():
    """Rows with their own calibration (fast / default preset) are judged against GPTQ given the
    same 32 x 512 calibration, the main CBQ row against GPTQ on the ladder's calibration."""
    from types import SimpleNamespace

    import cbq_ladder

    def run(wiki, bbc):
        return {"ppl": {"wiki-offline": wiki, "bbc-news": bbc}, "seconds": 1.0, "peak_rss_gb": 1.0}

    results = {
        "fp32": {"ppl": {"wiki-offline": 10.0, "bbc-news": 20.0}},
        "w4g64-gptq-s0": run(14.0, 28.0),
        "w4g64-gptq-long-s0": run(12.0, 24.0),
        "w4g64-cbq-s0": run(11.0, 22.0),
        "w4g64-cbq-fast-s0": run(11.5, 21.0),
        "w4g64-cbq-fast-s1": run(10.5, 23.0),
    }
    a = SimpleNamespace(n_calib=16, calib_seq_len=256, epochs=1, eval_windows=20, seq_len=512)
    text = cbq_ladder.summarize(results, a)
    (main,) = [ln for ln in text.splitlines() if ln.startswith("- W4A16 g64, CBQ (= + CFP):")]
    (fast,) = [ln for ln in text.splitlines() if ln.startswith("- W4A16 g64, CBQ, fast preset")]
    # CBQ 1 / 4 and 2 / 8 of GPTQ's gaps; the fast row (mean 11.0 / 22.0) 1 / 2 of GPTQ-long's
    assert "GPTQ's gap: wiki-offline 0.25, bbc-news 0.25 (target <= 0.5: met)" in main
    assert "32 x 512 calibration's gap: wiki-offline 0.50, bbc-news 0.50" in fast
    assert "| W4A16 g64 | CBQ, fast preset (1 epoch, 32 x 512) | 2 | 11.00 ± 0.71 |" in text
