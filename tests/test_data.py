import json

import pytest
import torch

from slimkit import SlimkitError
from slimkit.data import calibration_windows, eval_windows, fingerprint, load_documents


def test_splits_are_disjoint_deterministic_and_cover_everything():
    docs = load_documents("wiki-offline")
    parts = {s: load_documents("wiki-offline", s) for s in ("train", "validation", "test")}
    keys = {s: {d.key for d in p} for s, p in parts.items()}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    assert not (keys["validation"] & keys["test"])
    assert sum(len(k) for k in keys.values()) == len(docs) > 9000
    assert 0.03 < len(keys["test"]) / len(docs) < 0.07
    assert [d.key for d in load_documents("wiki-offline", "test")] == [d.key for d in parts["test"]]


def test_bbc_news_loads_and_splits():
    docs = load_documents("bbc-news")
    assert len(docs) == 2225
    test = load_documents("bbc-news", "test")
    assert 50 < len(test) < 170


def test_calibration_is_deterministic_and_never_reads_test(tiny_tokenizer):
    a = calibration_windows(tiny_tokenizer, "wiki-offline", 4, 64, seed=0)
    b = calibration_windows(tiny_tokenizer, "wiki-offline", 4, 64, seed=0)
    c = calibration_windows(tiny_tokenizer, "wiki-offline", 4, 64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    with pytest.raises(SlimkitError, match="never reads the test split"):
        calibration_windows(tiny_tokenizer, "wiki-offline", 4, 64, split="test")


def test_eval_windows_are_the_test_text_cut_without_overlap(tiny_tokenizer):
    w = eval_windows(tiny_tokenizer, "wiki-offline", 128, max_windows=5)
    assert w.shape == (5, 128)
    full = eval_windows(tiny_tokenizer, "wiki-offline", 128)
    assert torch.equal(full[:5], w)
    text = "\n\n".join(d.text for d in load_documents("wiki-offline", "test"))
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert full.shape[0] == len(ids) // 128
    assert torch.equal(full.flatten(), torch.tensor(ids[: full.numel()]))


def test_file_datasets(tmp_path, tiny_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"Paragraph number {i} talks about things." for i in range(400)))
    docs = load_documents(f"file:{txt}")
    assert len(docs) == 400
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(10)))
    assert [d.text for d in load_documents(f"file:{jl}")][:2] == ["line 0", "line 1"]
    calibration_windows(tiny_tokenizer, f"file:{txt}", 2, 32)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(SlimkitError, match="'text'"):
        load_documents(f"file:{bad}")
    with pytest.raises(SlimkitError, match="not found"):
        load_documents(f"file:{tmp_path / 'missing.txt'}")


def test_too_short_and_unknown(tmp_path, tiny_tokenizer):
    short = tmp_path / "s.txt"
    short.write_text("only a few words")
    with pytest.raises(SlimkitError, match="tokens; 4 samples x 64 tokens need 256"):
        calibration_windows(tiny_tokenizer, f"file:{short}", 4, 64, split="train")
    with pytest.raises(SlimkitError, match="unknown dataset 'nope'"):
        load_documents("nope")


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_datasets_fail_offline_with_one_message(name):
    with pytest.raises(SlimkitError, match="Hugging Face Hub"):
        load_documents(name, "test")
