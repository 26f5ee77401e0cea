import copy
import json

import pytest
import torch

from slimkit import SlimkitError
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline, PipelineOptions, plan_windows
from slimkit.quant.api import quantize
from slimkit.quant.methods import METHODS, GPTQConfig, RTNConfig, config_class
from tests.conftest import (
    FAMILIES,
    Crash,
    checkpoint_files_are_only_the_latest,
    crash_in_checkpoint,
    crash_on_call,
    random_ids,
    tiny_model,
)


def test_plan_windows_k2_o1_visits_in_order():
    plan = plan_windows(5, 2, 1)
    assert plan == [([0, 1], [0]), ([1, 2], [1]), ([2, 3], [2]), ([3, 4], [3, 4])]
    assert plan_windows(6, 3, 1) == [([0, 1, 2], [0, 1]), ([2, 3, 4], [2]), ([3, 4, 5], [3, 4, 5])]
    assert plan_windows(3, 1, 0) == [([0], [0]), ([1], [1]), ([2], [2])]
    for n, k, o in [(7, 3, 2), (9, 4, 1), (30, 2, 1)]:
        finalized = [b for _, f in plan_windows(n, k, o) for b in f]
        assert finalized == list(range(n))  # each block finalized exactly once, in order


@pytest.mark.parametrize(
    "k,o,msg", [(5, 0, "larger than the model"), (2, 2, "overlap"), (0, 0, "window")]
)
def test_bad_windows(k, o, msg):
    with pytest.raises(SlimkitError, match=msg):
        plan_windows(4, k, o)


class Recorder(BlockwiseMethod):
    needs_fp = True

    def __init__(self):
        self.events = []

    def on_window(self, win):
        self.events.append(("window", tuple(win.block_ids)))
        # with nothing quantized the two streams are identical
        assert torch.equal(win.inputs_q.all(), win.inputs_fp.all())

    def on_finalize(self, win, index, block):
        self.events.append(("final", index))


def test_windowed_walk_order_and_streams():
    model = tiny_model("llama", layers=4)
    rec = Recorder()
    BlockwisePipeline(
        model, random_ids(4, 16), PipelineOptions(window=2, overlap=1, batch_size=2)
    ).run(rec)
    assert rec.events == [
        ("window", (0, 1)), ("final", 0),
        ("window", (1, 2)), ("final", 1),
        ("window", (2, 3)), ("final", 2), ("final", 3),
    ]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_without_quantization_reproduces_logits(family):
    model = tiny_model(family, layers=3)
    ids = random_ids(6, 24)
    pipe = BlockwisePipeline(model, ids, PipelineOptions(batch_size=3))
    pipe.run(BlockwiseMethod())
    with torch.no_grad():
        for i0, i1 in pipe.batches():
            ref = model(input_ids=ids[i0:i1], use_cache=False).logits
            assert torch.allclose(pipe.head_logits(pipe.outputs, i0, i1), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_on_every_family(family, method):
    """Registered methods enrol here: quantize a tiny model of each family, check the records."""
    model = tiny_model(family)
    ids = random_ids(4, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    cfg = config_class(method)(wbits=4, group_size=32, batch_size=2)
    model, report = quantize(model, cfg, ids)
    records = report.records
    assert report["n_quantized_linears"] == len(records) > 0
    errs = [v for e in report["layers"] for k, v in e.items() if k.endswith("err")]
    assert len(errs) == len(records) and all(0 < e < 1 for e in errs)
    for name, rec in records.items():
        w = dict(model.named_modules())[name].weight.data
        w = w.t() if family == "gpt2" else w
        assert torch.allclose(rec.dequantize(), w, atol=1e-6), (
            name
        )  # model holds the dequantized codes
        assert int(rec.codes.max()) <= 15
    with torch.no_grad():
        out = model(input_ids=ids).logits
    rel = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert rel < 0.1, rel


def _gptq_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_resume_after_crash_gives_identical_weights(tmp_path, monkeypatch, method):
    """Every tensor of the model comes back: quantized linears and, for AWQ, the folded norms."""
    ids = random_ids(6, 16)
    cfg = config_class(method)(wbits=3, group_size=16, batch_size=2)
    base = tiny_model("llama", layers=4)
    full, full_rep = quantize(copy.deepcopy(base), cfg, ids)

    with monkeypatch.context() as mp:
        crash_on_call(mp, METHODS.get(method), "on_window", 3)
        with pytest.raises(Crash):
            quantize(copy.deepcopy(base), cfg, ids, checkpoint_dir=tmp_path)
    prog = json.loads((tmp_path / "progress.json").read_text())
    assert prog["next_window"] == 2 and 0 < prog["elapsed_seconds"] < 600
    # the killed process's checkpointed time counts in the resumed run's seconds
    prog["elapsed_seconds"] = 1000.0
    (tmp_path / "progress.json").write_text(json.dumps(prog))
    resumed, rep = quantize(copy.deepcopy(base), cfg, ids, checkpoint_dir=tmp_path, resume=True)
    assert rep["resumed_at_window"] == 2 and 1000 < rep["seconds"] < 1600
    assert full_rep["resumed_at_window"] is None and full_rep["seconds"] < 600
    a, b = _gptq_weights(full), _gptq_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = full_rep.records, rep.records
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k].codes, rb[k].codes) for k in ra)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(a[norm], base.state_dict()[norm]) == (method == "gptq")


def test_a_kill_at_any_step_of_a_checkpoint_write_resumes_to_the_same_weights(
    tmp_path, monkeypatch, one_thread
):
    """Kill the run after every single file-system step of a middle window's checkpoint write
    (it replaces the checkpoint of the window before) and resume: the weights and integer codes must equal those of an uninterrupted run. Catches a
    checkpoint that is not atomic as a whole (block files replaced in place before progress.json
    named the new window: a resume then started a window from blocks already changed by it)."""
    ids = random_ids(4, 16)
    cfg = GPTQConfig(wbits=3, group_size=16, batch_size=2)
    base = tiny_model("llama", layers=3)
    full, full_res = quantize(copy.deepcopy(base), cfg, ids)
    want = _gptq_weights(full)
    n, killed = 0, 0
    while True:
        n += 1
        d = tmp_path / f"kill-{n}"
        with monkeypatch.context() as mp:
            seen = crash_in_checkpoint(mp, n, windows={1})
            try:
                quantize(copy.deepcopy(base), cfg, ids, checkpoint_dir=d)
            except Crash:
                killed += 1
            else:
                assert seen["steps"] < n
                break
        resumed, res = quantize(copy.deepcopy(base), cfg, ids, checkpoint_dir=d, resume=True)
        got = _gptq_weights(resumed)
        assert all(torch.equal(want[k], got[k]) for k in want), f"killed after step {n}"
        ra, rb = full_res.records, res.records
        assert all(torch.equal(ra[k].codes, rb[k].codes) for k in ra), f"killed after step {n}"
        # what a killed write left behind is gone once the resumed run checkpoints
        assert checkpoint_files_are_only_the_latest(d), f"killed after step {n}"
    assert killed >= 8  # every step of the write was visited


def test_disk_offload_matches_ram():
    ids = random_ids(4, 16)
    base = tiny_model("qwen2")
    outs = []
    for offload in ("ram", "disk"):
        m, _ = quantize(
            copy.deepcopy(base),
            GPTQConfig(wbits=4, group_size=32, offload=offload, batch_size=2),
            ids,
        )
        outs.append(_gptq_weights(m))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_rtn_needs_no_data_but_gptq_does():
    model = tiny_model("llama")
    quantize(model, RTNConfig(wbits=4, group_size=32))
    with pytest.raises(SlimkitError, match="needs calibration data"):
        quantize(tiny_model("llama"), GPTQConfig(wbits=4, group_size=32))


def test_unsupported_family():
    from transformers import BertConfig, BertForMaskedLM

    m = BertForMaskedLM(
        BertConfig(
            vocab_size=32,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    with pytest.raises(SlimkitError, match="unsupported model family 'bert'"):
        quantize(m, RTNConfig())


def test_resume_refuses_a_different_job(tmp_path):
    ids = random_ids(4, 16)
    quantize(
        tiny_model("llama"),
        GPTQConfig(wbits=4, group_size=32, batch_size=2),
        ids,
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(
        SlimkitError, match=r"cannot resume: the checkpoint was made with config.wbits=\[4\]"
    ):
        quantize(
            tiny_model("llama"),
            GPTQConfig(wbits=3, group_size=32, batch_size=2),
            ids,
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_unavailable_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SlimkitError, match="not available"):
        quantize(tiny_model("llama"), RTNConfig(group_size=32, device="cuda"))
