import copy

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.llm.pipeline import BlockwisePipeline
from slimkit.quant.api import quantize
from slimkit.quant.methods import AWQConfig, RTNConfig
from slimkit.quant.methods.awq import AWQ, grouped_error, search_clip
from slimkit.quant.obs import HessianAccumulator
from slimkit.quant.outliers import inject_outliers
from slimkit.quant.quantizer import QuantSpec, quantize_weight
from tests.conftest import random_ids, tiny_model


class _ScaleOnly(AWQ):
    """Only AWQ's scale search and folding: no clipping, no rounding."""

    def on_window(self, win):
        for b in win.block_ids:
            self.scale_block(win, b)


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt", "gpt2"])
def test_awq_scale_folding_leaves_the_fp_logits_unchanged(family):
    # the pipeline keeps its activations in fp32, which OPT's and GPT-2's LayerNorm refuse to
    # mix with fp64 weights: those two are checked in fp32
    model = tiny_model(family, layers=2)
    model, tol = (model, 1e-4) if family in ("opt", "gpt2") else (model.double(), 1e-9)
    if family != "gpt2":
        inject_outliers(model, fraction=0.05, k=20)
    ids = random_ids(4, 32)
    with torch.no_grad():
        ref = model(ids).logits
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = AWQConfig(wbits=3, group_size=32)
    pipe = BlockwisePipeline(model, ids, cfg.pipeline_options())
    pipe.run(_ScaleOnly(cfg))
    searched = [e for e in pipe.log if "awq_alpha" in e]
    # norm -> q/k/v and norm -> MLP per block, plus value -> output where it maps one to one (OPT)
    # and up -> down (Llama family)
    per_block = {"llama": 3, "qwen3": 3, "opt": 3, "gpt2": 2}[family]
    assert len(searched) == 2 * per_block, searched
    assert any(e["awq_alpha"] > 0 for e in searched)
    assert all(e["awq_gain"] <= 1 for e in searched)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("norm" in n or "ln_" in n for n in changed), sorted(changed)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=tol, rtol=0)


def test_awq_with_alpha_zero_and_no_clipping_is_rtn():
    model = tiny_model("llama", layers=2)
    ids = random_ids(4, 32)
    m_awq, _ = quantize(
        copy.deepcopy(model), AWQConfig(wbits=3, group_size=32, n_grid=1, auto_clip=False), ids
    )
    m_rtn, _ = quantize(copy.deepcopy(model), RTNConfig(wbits=3, group_size=32), ids)
    for (n, a), (_, b) in zip(m_awq.named_parameters(), m_rtn.named_parameters()):
        assert torch.equal(a, b), n


def test_grouped_clip_error_is_the_mean_squared_group_output_error():
    """err[row, group] = dW_g H_g dW_g^T equals (2x) the reference's mean over tokens of
    (x_g . dW_g)^2, computed token by token."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g)
    dw = torch.randn(5, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add(x)
    H = acc.finish()
    err = grouped_error(dw, H, 16)
    ref = torch.einsum("tgi,rgi->trg", x.reshape(300, 4, 16), dw.reshape(5, 4, 16)).pow(2).mean(0)
    assert torch.allclose(err, 2 * ref, rtol=1e-4)
    per_row = grouped_error(dw, H, -1)
    assert torch.allclose(per_row[:, 0], 2 * (x @ dw.T).pow(2).mean(0), rtol=1e-4)


def test_clip_search_never_raises_the_output_error_and_does_clip_an_outlier():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    w[0, 3] = 12.0  # one outlier weight per row 0: clipping it should pay
    x = torch.randn(500, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add(x)
    H = acc.finish()
    spec = QuantSpec(bits=3, group_size=32)
    mv = search_clip(w, H, spec, grid=20, max_shrink=0.5)
    assert mv[0, 0] < 12.0
    clipped = torch.clamp(w.reshape(8, 2, 32), -mv[..., None], mv[..., None]).reshape(8, 64)
    e_clip = grouped_error(quantize_weight(clipped, spec).dequantize() - w, H, 32)
    e_rtn = grouped_error(quantize_weight(w, spec).dequantize() - w, H, 32)
    assert (e_clip <= e_rtn * (1 + 1e-6)).all()
    assert e_clip[0, 0] < e_rtn[0, 0]


def _logit_error_on_an_outlier_model():
    """err(config): mean squared logit error of a tiny Llama with injected outlier channels."""
    model = tiny_model("llama", layers=2)
    inject_outliers(model, fraction=0.05, k=20, seed=0)
    ids = random_ids(8, 32)
    with torch.no_grad():
        ref = model(ids).logits

    def err(cfg):
        m, _ = quantize(copy.deepcopy(model), cfg, ids)
        with torch.no_grad():
            return float((m(ids).logits - ref).pow(2).mean())

    return err


def test_awq_beats_rtn_with_outlier_channels():
    """Salient input channels (injected function-preservingly) are what AWQ's scales protect."""
    err = _logit_error_on_an_outlier_model()
    e_rtn = err(RTNConfig(wbits=3, group_size=32))
    e_scale = err(AWQConfig(wbits=3, group_size=32, auto_clip=False))
    e_awq = err(AWQConfig(wbits=3, group_size=32))
    assert e_awq < e_scale < e_rtn
    assert e_awq < 0.6 * e_rtn


def test_search_tokens_keeps_the_first_batches_reaching_the_cap():
    from slimkit.quant.methods.awq import _ParentInputs

    lin = torch.nn.Linear(8, 8)
    rec = _ParentInputs(lin, max_tokens=40)
    xs = [torch.randn(1, 32, 8) for _ in range(4)]
    with torch.no_grad():
        refs = [lin(x) for x in xs]
    for x in xs[:2]:
        lin(x)
    lin(input=xs[2])  # hidden states passed by keyword count as well
    lin(xs[3])
    rec.handle.remove()
    assert rec.tokens == 64 and len(rec.calls) == 2  # 32 < 40, then 64 >= 40: the rest skipped
    assert all(torch.equal(y, r) for y, r in zip(rec.outputs(), refs[:2]))
    uncapped = _ParentInputs(lin)
    for x in xs:
        lin(x)
    uncapped.handle.remove()
    assert len(uncapped.calls) == 4


def test_search_tokens_cap_at_or_above_the_calibration_set_changes_nothing():
    """A cap that keeps every batch is the uncapped search, bit for bit; a one-batch cap still
    protects the outlier channels (far below RTN's error)."""
    err = _logit_error_on_an_outlier_model()
    model = tiny_model("llama", layers=2)
    ids = random_ids(8, 32)
    full, _ = quantize(copy.deepcopy(model), AWQConfig(wbits=3, group_size=32), ids)
    same, _ = quantize(
        copy.deepcopy(model), AWQConfig(wbits=3, group_size=32, search_tokens=8 * 32), ids
    )
    for (n, a), (_, b) in zip(full.named_parameters(), same.named_parameters()):
        assert torch.equal(a, b), n
    e_rtn = err(RTNConfig(wbits=3, group_size=32))
    e_cap = err(AWQConfig(wbits=3, group_size=32, search_tokens=1))
    assert e_cap < 0.6 * e_rtn, (e_cap, e_rtn)


@pytest.mark.parametrize("method", ["awq", "cbq"])
def test_search_tokens_reaches_the_scale_search(monkeypatch, method):
    """The cap set on AWQ (or on CBQ's AWQ start) is what the scale search replays: one batch of
    four sequences with a cap of one token, both batches without a cap."""
    from slimkit.quant.methods import CBQConfig
    from slimkit.quant.methods.awq import _ParentInputs

    replayed = []
    outputs = _ParentInputs.outputs

    def counting(self):
        replayed.append(len(self.calls))
        return outputs(self)

    monkeypatch.setattr(_ParentInputs, "outputs", counting)
    model = tiny_model("llama", layers=2)
    ids = random_ids(8, 32)  # two batches of four
    for cap, calls in ((0, 2), (1, 1)):
        replayed.clear()
        if method == "awq":
            cfg = AWQConfig(wbits=3, group_size=32, search_tokens=cap)
        else:
            cfg = CBQConfig(
                wbits=3, group_size=32, epochs=0, rounding="nearest", awq_init=True,
                awq_search_tokens=cap,
            )  # fmt: skip
        quantize(copy.deepcopy(model), cfg, ids)
        assert replayed and set(replayed) == {calls}, (cap, replayed)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"group_size": 0},
        {"n_grid": 0},
        {"clip_grid": 0},
        {"max_shrink": 1.0},
        {"search_tokens": -1},
    ],
)
def test_awq_config_rejects_bad_values(kwargs):
    with pytest.raises(SlimkitError):
        AWQConfig(**kwargs)


def test_duo_scaling_statistic_and_grid():
    from slimkit.quant.methods.awq import awq_scales, scale_grid, weight_means

    w1 = torch.tensor([[1.0, -2.0, 4.0, 0.0], [2.0, 2.0, -1.0, 1.0]])
    w2 = torch.tensor([[0.0, 3.0, 0.0, 3.0]])
    # per-row groups of 2: |W| / max of its group, then the mean over the 3 rows
    want = (
        torch.tensor([0.5, 1.0, 1.0, 0.0]) + torch.tensor([1.0, 1.0, 1.0, 1.0])
        + torch.tensor([0.0, 1.0, 0.0, 1.0])
    ) / 3  # fmt: skip
    assert torch.allclose(weight_means([w1, w2], 2), want, atol=1e-5)
    grid = scale_grid(20, duo=True)  # llm-compressor: the identity, then 19 duo points over [0, 1]
    assert grid[0] == (0.0, False) and len(grid) == 20 and grid[-1] == (1.0, True)
    assert scale_grid(20, duo=False) == [(i / 20, False) for i in range(20)]  # llm-awq
    x = torch.tensor([1.0, 4.0, 9.0, 16.0])
    s = awq_scales(x, 0.5)
    assert torch.allclose(s, torch.tensor([1.0, 2.0, 3.0, 4.0]) / 2)  # / sqrt(max * min)
    assert torch.equal(awq_scales(x, 0.0), torch.ones(4))


def test_awq_duo_scaling_beats_rtn_with_outlier_channels():
    err = _logit_error_on_an_outlier_model()
    e_rtn = err(RTNConfig(wbits=3, group_size=32))
    assert err(AWQConfig(wbits=3, group_size=32, duo_scaling=True, auto_clip=False)) < e_rtn
