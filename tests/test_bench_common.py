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
