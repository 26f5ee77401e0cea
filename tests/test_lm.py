"""PanGu-π model, collapse diagnostics and the LM trainer (resume, DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimkit.core.errors import SlimkitError
from slimkit.tinylm.collapse import d_rel, effective_dim
from slimkit.tinylm.pangu_pi import PanguPiConfig, PanguPiForCausalLM, count_extra_parameters

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def pangu(**kw):
    torch.manual_seed(0)
    return PanguPiForCausalLM(PanguPiConfig(**SHAPE, **kw)).eval()


def test_auto_classes_round_trip(tmp_path):
    m = pangu()
    with torch.no_grad():  # make AS and SIAF non-trivial so the round trip carries them
        for layer in m.model.layers:
            layer.self_attn.as_up.weight.normal_()
            layer.mlp.siaf_b.normal_()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PanguPiForCausalLM
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m(ids).logits)


def test_causal_mask_holds():
    m = pangu()
    ids = torch.randint(0, 128, (1, 16))
    other = ids.clone()
    other[0, 10:] = (other[0, 10:] + 7) % 128
    with torch.no_grad():
        a, b = m(ids).logits, m(other).logits
    assert torch.equal(a[0, :10], b[0, :10]) and not torch.equal(a[0, 10:], b[0, 10:])


def test_one_term_siaf_and_zero_shortcut_equal_vanilla_llama():
    m = pangu(siaf_terms=1, siaf_init="identity")  # AS up-projection starts at zero
    ref = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    missing, unexpected = ref.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(".as_" in k or ".siaf_" in k for k in unexpected)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-6)
        m.model.layers[0].self_attn.as_up.bias.fill_(0.1)  # the shortcut does act
        assert not torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-3)


def test_extra_parameters_match_the_formulas():
    cfg = PanguPiConfig(**SHAPE, siaf_terms=3, as_ratio=16)
    base = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**SHAPE)).parameters())
    extra = sum(p.numel() for p in PanguPiForCausalLM(cfg).parameters()) - base
    d, f, w = 64, 96, 64 // 16
    assert count_extra_parameters(cfg) == {"siaf": 2 * 2 * 3 * f, "as": 2 * (2 * d * w + w + d)}
    assert extra == sum(count_extra_parameters(cfg).values())


def test_collapse_metrics():
    same = torch.randn(1, 8).repeat(10, 1)
    assert d_rel(same) == pytest.approx(0.0, abs=1e-12)
    rank1 = torch.randn(10, 1) * torch.randn(1, 8) + torch.randn(1, 8)
    assert effective_dim(rank1) == 1
    assert effective_dim(torch.randn(200, 16)) > 8


def lm_args(out, *extra):
    return ["train-lm", "--layers", "1", "--hidden-size", "32", "--intermediate-size", "64", "--heads", "2",
            "--kv-heads", "1", "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--eval-every", "3",
            "--eval-windows", "2", "--checkpoint-every", "2", "--as-ratio", "8", "--out", str(out), *extra]  # fmt: skip


def test_train_lm_resume_is_bit_identical(tmp_path, monkeypatch):
    from conftest import Crash

    import slimkit.tinylm.train as tr
    from slimkit.cli import main

    assert main(lm_args(tmp_path / "full")) == 0
    calls = {"n": 0}
    original = tr.lm_loss

    def crash_at_step_five(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Crash
        return original(*a, **k)

    monkeypatch.setattr(tr, "lm_loss", crash_at_step_five)
    with pytest.raises(Crash):
        main(lm_args(tmp_path / "cut"))
    monkeypatch.undo()
    assert main(lm_args(tmp_path / "cut", "--resume")) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "cut"))
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]


def test_train_lm_under_torchrun_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "slimkit", *lm_args(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "slimkit", *lm_args(tmp_path / "two")]  # fmt: skip
    for cmd in (one, two):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    la, lb = [h["loss"] for h in ra["history"]], [h["loss"] for h in rb["history"]]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4 and rb["world_size"] == 2


def test_ptq_quantizes_the_shortcut_linears():
    import slimkit
    from slimkit.llm.block_maps import block_map_for

    m = pangu(augmented_shortcut=True, as_ratio=16)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.as_up.weight.normal_(0, 0.02)
    assert block_map_for(m).family == "pangu_pi"
    ids = torch.randint(0, 128, (4, 16))
    m, res = slimkit.quantize(m, slimkit.GPTQConfig(wbits=4, group_size=-1), ids)
    names = set(res.records)
    assert "model.layers.0.self_attn.as_down" in names and "model.layers.1.self_attn.as_up" in names
    assert not any("siaf" in n for n in names)


def test_tokenizer_compression_round_trips_and_stays_closed(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from slimkit.cli import main
    from slimkit.data.text import load_documents
    from slimkit.tinylm.tokenizer import TOKEN_MAP

    assert (
        main(
            [
                "compress-tokenizer",
                str(tiny_model_dir),
                "--vocab",
                "300",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    old = AutoTokenizer.from_pretrained(tiny_model_dir)
    new = AutoTokenizer.from_pretrained(tmp_path / "c")
    assert len(new) == 300 < len(old)
    for d in load_documents("wiki-offline", "test")[:50] + load_documents("bbc-news", "test")[:10]:
        assert new.decode(new(d.text).input_ids) == d.text  # exact on held-out text
    assert new.decode(new("naïve ∑ 😀").input_ids) == "naïve ∑ 😀"
    data = json.loads(new.backend_tokenizer.to_str())["model"]
    vocab = data["vocab"]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in data["merges"])
    # the remapped model: same logits on the kept ids for a sequence of kept tokens
    old_ids = json.loads((tmp_path / "c" / TOKEN_MAP).read_text())["old_ids"]
    m_old = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    m_new = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    seq = torch.tensor([old_ids[5], old_ids[40], old_ids[200], old_ids[7]])
    mapped = torch.tensor([5, 40, 200, 7])
    with torch.no_grad():
        a = m_old(seq[None]).logits[0][:, old_ids]
        b = m_new(mapped[None]).logits[0]
    assert torch.allclose(a, b, atol=1e-5)
    rep = json.loads((tmp_path / "c" / "compress_report.json").read_text())
    assert (
        rep["parameters_after"] < rep["parameters_before"]
        and rep["tokens_per_char_after"] >= rep["tokens_per_char_before"]
    )


@pytest.mark.parametrize("family", ["llama", "qwen3", "pangu"])
def test_inheritance_with_nothing_removed_reproduces_the_parent(family):
    from conftest import tiny_model

    from slimkit.tinylm.inherit import InheritConfig, inherit

    parent = pangu() if family == "pangu" else tiny_model(family)
    child, rec = inherit(parent, InheritConfig(score="l1"))
    ids = torch.randint(0, 128, (2, 12))
    masked, _ = inherit(parent, InheritConfig(score="mask", mask_steps=3), ids)
    with torch.no_grad():
        assert torch.allclose(masked(ids).logits, parent(ids).logits, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(child(ids).logits, parent(ids).logits, atol=1e-5)
    assert rec["layers"] == list(range(parent.config.num_hidden_layers))


def test_inheritance_builds_the_requested_smaller_model(tmp_path):
    from conftest import random_ids, tiny_model

    from slimkit.tinylm.inherit import InheritConfig, inherit, spread_layers

    assert len(spread_layers(30, 10, 2)) == 10
    assert spread_layers(30, 10, 2)[:2] == [0, 1] and spread_layers(30, 10, 2)[-2:] == [28, 29]
    parent = tiny_model("llama", layers=4)
    cfg = InheritConfig(layers=3, hidden=48, ffn=64, kv_groups=1, score="taylor", keep_ends=1)
    child, rec = inherit(parent, cfg, random_ids(2, 16))
    c = child.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_key_value_heads,
        c.num_attention_heads,
    ) == (3, 48, 64, 1, 2)
    child.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in child.parameters())
    assert rec["layers"][0] == 0 and rec["layers"][-1] == 3
    # the copied weights are the parent's selected sub-matrices
    h, f = torch.tensor(rec["hidden"]), torch.tensor(rec["ffn"][0])
    want = parent.model.layers[0].mlp.down_proj.weight[h][:, f]
    assert torch.equal(child.model.layers[0].mlp.down_proj.weight, want)
    with pytest.raises(SlimkitError, match="calibration"):
        inherit(parent, InheritConfig(layers=2, score="taylor"))
    with pytest.raises(SlimkitError, match="multiple of"):
        inherit(parent, InheritConfig(hidden=50, kv_groups=2, score="l1"))


def test_learnable_masks_keep_the_live_neurons():
    """Half the FFN neurons of a (briefly trained) model are dead: learned gates must drop them."""
    from conftest import tiny_model

    from slimkit.tinylm.inherit import InheritConfig, inherit

    torch.manual_seed(0)
    m = tiny_model("llama", layers=2, vocab=32)
    F = m.config.intermediate_size
    dead = torch.randperm(F)[: F // 2]
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[:, dead] = 0
    data = (torch.arange(33)[None] * 3 + torch.randint(0, 32, (64, 1))) % 32  # learnable sequences
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for i in range(80):  # dead neurons get zero gradients and stay dead
        ids = data[i % 8 * 8 : i % 8 * 8 + 8]
        loss = torch.nn.functional.cross_entropy(
            m(ids[:, :-1]).logits.reshape(-1, 32), ids[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 1.0
    child, rec = inherit(
        m.eval(), InheritConfig(ffn=F // 2, score="mask", mask_steps=80), data[:16]
    )
    live = set(range(F)) - set(dead.tolist())
    # a live neuron whose removal lowers the loss may rightly go first; a random pick keeps ~50 %
    assert all(len(live & set(rec["ffn"][i])) >= 0.9 * len(live) for i in (0, 1)), rec["ffn"]
    assert child.config.intermediate_size == F // 2
    with pytest.raises(SlimkitError, match="calibration"):
        inherit(m, InheritConfig(ffn=F // 2, score="mask"))
    with pytest.raises(SlimkitError, match="mask-steps"):
        InheritConfig(score="mask", mask_steps=0)


def test_multi_round_draws_without_replacement_and_resumes_exactly(tmp_path, monkeypatch):
    from conftest import Crash

    import slimkit.tinylm.train as tr
    from slimkit.cli import main

    args = ["--rounds", "2", "--keep", "0.5"]  # 6 first-round steps, then 3 drawn batches
    assert main(lm_args(tmp_path / "full", *args)) == 0
    rep = json.loads((tmp_path / "full" / "report.json").read_text())
    plan = rep["plan"]
    assert len(plan) == 9 and plan[:6] == list(range(6))
    assert len(set(plan[6:])) == 3 and set(plan[6:]) <= set(range(6))
    assert [h["round"] for h in rep["history"]] == [1] * 6 + [2] * 3
    lr = [h["lr"] for h in rep["history"]]  # the schedule restarts at round two (the default)
    assert max(lr[6:]) > 2 * lr[5]
    calls = {"n": 0}
    original = tr.lm_loss

    def crash_in_round_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6 + 6 + 2:  # 6 training steps, 6 scoring passes, then step 8
            raise Crash
        return original(*a, **k)

    monkeypatch.setattr(tr, "lm_loss", crash_in_round_two)
    with pytest.raises(Crash):
        main(lm_args(tmp_path / "cut", *args))
    monkeypatch.undo()
    assert main(lm_args(tmp_path / "cut", *args, "--resume")) == 0
    cut = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert cut["plan"] == plan and [h["loss"] for h in cut["history"]] == [
        h["loss"] for h in rep["history"]
    ]


def test_round_schedule_restarts_or_continues_the_cosine():
    from slimkit.tinylm.train import LMTrainConfig, _round_schedule

    common = dict(steps=100, rounds=2, keep=0.5, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    restart = _round_schedule(LMTrainConfig(**common))
    cont = _round_schedule(LMTrainConfig(**common, round_schedule="continue"))
    # restart: round one ends at the floor, round two warms up again and ends at the floor
    assert restart(99) == pytest.approx(0.1, abs=1e-3) and restart(100) < restart(102) < restart(
        104
    )
    assert max(restart(s) for s in range(100, 150)) == pytest.approx(1.0, abs=1e-6)
    assert restart(149) == pytest.approx(0.1, abs=2e-3)
    # continue: one cosine over the 150 steps, never rising after the warm-up
    vals = [cont(s) for s in range(10, 150)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and vals[-1] == pytest.approx(0.1, abs=2e-3)
    assert cont(99) > 0.2
    with pytest.raises(SlimkitError, match="round-schedule"):
        LMTrainConfig(**common, round_schedule="cyclic")
