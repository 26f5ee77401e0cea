"""`slimkit bench FILE.gguf --against llama.cpp:FTYPE`: llama.cpp's own quantization of the same
model beside slimkit's file (llama.cpp parts skipped where llama-cpp-python is not installed)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_model

import slimkit.cli
from slimkit.core.errors import SlimkitError
from slimkit.export import ExportConfig, export
from slimkit.export.runtime import BenchConfig


def _base_and_file(tmp_path, tok):
    """A tiny Llama of width 256 (genuine K-quants) saved as a model directory, and slimkit's
    Q3_K_M file of it (RTN on llama.cpp's mix, quantized by the CLI from that directory)."""
    base = tmp_path / "base"
    tiny_model("llama", vocab=len(tok), layers=2, hidden=256).save_pretrained(base)
    tok.save_pretrained(base)
    run = tmp_path / "run"
    assert slimkit.cli.main(["quantize", str(base), "--method", "rtn", "--grid",
                             "llama.cpp:q3_k_m", "--out", str(run)]) == 0  # fmt: skip
    out = tmp_path / "m-q3_k_m.gguf"
    export(run, out, ExportConfig(format="gguf"))
    return base, out


def test_bench_against_config_refusals():
    """Catches an --against value that is not llama.cpp:FTYPE reaching llama.cpp (an opaque
    failure there) instead of a one-line error."""
    with pytest.raises(SlimkitError, match="llama.cpp:FTYPE"):
        BenchConfig(against="Q3_K_M")
    with pytest.raises(SlimkitError, match="max_windows"):
        BenchConfig(against="llama.cpp:Q3_K_M", max_windows=-1)


def test_bench_against_llama_cpp_compares_both_files(tmp_path, tiny_tokenizer, capsys):
    """The side-by-side table has one row per metric (size, prefill, decode, perplexity per
    corpus) with both files and their ratio; the reference file is llama.cpp's own quantization
    with the requested file type (general.file_type) of the model the slimkit file names in its
    metadata; the two files are the same size (slimkit writes each tensor in the type llama.cpp
    gives it) and their perplexities are close. Catches a reference quantized to the wrong type
    (e.g. the F16 file itself, or llama.cpp's default Q8_0), a base model not found from the
    file, and a table that drops a metric."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from slimkit.export.runtime import gguf_file_type

    base, out = _base_and_file(tmp_path, tiny_tokenizer)
    j = tmp_path / "r.json"
    argv = ["bench", str(out), "--against", "llama.cpp:Q3_K_M", "--ppl", "wiki-offline,bbc-news",
            "--max-windows", "2", "--seq-len", "64", "--prompt-tokens", "16", "--new-tokens", "4",
            "--threads", "1", "--json", str(j)]  # fmt: skip
    assert slimkit.cli.main(argv) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| metric | slimkit | llama.cpp Q3_K_M | slimkit / llama.cpp |"
    metrics = [line.split("|")[1].strip() for line in table[1:]]
    assert metrics == ["size_mb", "prefill_tok_s", "decode_tok_s", "ppl wiki-offline",
                       "ppl bbc-news"]  # fmt: skip
    r = json.loads(j.read_text())
    ref = r["files"]["llama.cpp Q3_K_M"]
    assert (
        gguf_file_type(ref)
        == llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M
        == r["file_types"]["llama.cpp Q3_K_M"]
    )
    assert gguf_file_type(out) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M
    assert abs(r["ratio"]["size_mb"] - 1) < 0.01, r["metrics"]["size_mb"]
    for c in ("wiki-offline", "bbc-news"):
        assert 0.8 < r["ratio"][f"ppl {c}"] < 1.25, r["metrics"][f"ppl {c}"]
    assert all(v > 0 for m in ("prefill_tok_s", "decode_tok_s") for v in r["metrics"][m].values())


def test_bench_against_refuses_when_the_base_model_is_unknown(tmp_path, tiny_tokenizer, capsys):
    """A file whose base model cannot be found (moved directory) is refused with one line naming
    --base, and --base then makes it work. Catches a fallback that quantizes some other model
    (e.g. slimkit's default) and so compares files of different models."""
    pytest.importorskip("llama_cpp")
    base, out = _base_and_file(tmp_path, tiny_tokenizer)
    moved = tmp_path / "elsewhere"
    shutil.move(base, moved)
    argv = ["bench", str(out), "--against", "llama.cpp:Q2_K", "--ppl", "", "--prompt-tokens",
            "8", "--new-tokens", "2", "--threads", "1"]  # fmt: skip
    assert slimkit.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--base" in err and str(base) in err
    assert not out.with_name(out.stem + ".f16-baseline.gguf").exists()  # nothing half-written
    assert slimkit.cli.main([*argv, "--base", str(moved)]) == 0
    assert "| size_mb |" in capsys.readouterr().out
