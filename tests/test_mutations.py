"""Tests that fail when a defining piece of a method is broken: each compares slimkit with a
hand computation, a reference implementation written here from the paper or the format
description, or an independent reader.

Mutations 1, 2a, 3, 4a, 4b, 5, 6a and 7 each passed the whole suite before this module existed;
2b and 6b are other ways to break the same pieces that the earlier tests missed as well
(test_cbq.py, resp. test_gptq.py, test_smoothquant.py and test_pipeline.py pass with them); 4c was
already caught by test_kd.py and is listed for completeness; 8 came with the GPTQ v2 export and
passes every other module. Each now makes the named tests fail.
To rerun: apply one mutation to the working tree, run
``python -m pytest tests/test_mutations.py -q -p no:cacheprovider`` (the named tests must fail),
then ``git checkout -- <file>``. Never commit a mutation.

1. ``slimkit/quant/methods/cbq/window_training.py`` (``_train``): delete
   ``targets.append(pipe.run_blocks(win.fp_blocks, win.inputs_q))``, CBQ's homologous second
   term E(T_fp(X_q), T_q(X_q)).
   Fails: ``test_cbq_window_loss_is_the_homologous_sum``.
2. LoRA-Rounding's factors never trained:
   a. ``window_training.py`` (``_params``): ``n in ("a1", "a2", "v")`` -> ``n in ("v",)`` (the
      factors are not handed to the optimizer).
      Fails: ``test_cbq_trains_the_lora_rounding_factors``.
   b. ``slimkit/quant/methods/cbq/lora_rounding.py`` (``LinearQuantizer.__init__``): create
      ``a1`` and ``a2`` with ``nn.Parameter(..., requires_grad=False)``.
      Fails: ``test_lora_rounding_gradient_by_hand``, ``test_cbq_trains_the_lora_rounding_factors``.
3. ``slimkit/tinylm/pangu_pi.py`` (``PanguPiMLP.siaf``): ``for i in range(a.shape[0])`` ->
   ``for i in range(1)`` (SIAF sums only its first term).
   Fails: ``test_siaf_sums_every_term_by_hand``.
4. ``slimkit/distill/losses.py``: drop ``* tau**2`` from
   a. ``dkd_loss``. Fails: ``test_dkd_at_temperature_by_hand``.
   b. ``dist_loss``. Fails: ``test_dist_at_temperature_by_hand``.
   c. ``kd_loss``. Fails: ``test_kd_at_temperature_by_hand`` (and test_kd.py's KD test).
5. ``slimkit/quant/methods/smoothquant.py`` (``smooth_scales``): swap the exponents,
   ``a.pow(1 - alpha) / w_max.pow(alpha)``.
   Fails: ``test_smooth_scales_at_alpha_075_by_hand``,
   ``test_smoothquant_folds_hand_computed_scales``.
6. GPTQ's dampening 100x:
   a. ``slimkit/quant/obs.py`` (``inverse_factor``): ``H += damp * torch.mean(...)`` ->
      ``H += 100 * damp * torch.mean(...)``.
      Fails: ``test_gptq_matches_the_paper_reference`` (both cases),
      ``test_gptq_in_the_pipeline_matches_the_reference``.
   b. ``slimkit/quant/methods/gptq.py``: ``GPTQConfig.damp`` default 0.01 -> 1.0.
      Fails: ``test_gptq_in_the_pipeline_matches_the_reference``.
7. ``slimkit/export/gptq.py``: GPTQ v1 qzeros without their -1 offset, in writer and reader
   together (slimkit's own round trip still passes): ``QZERO_OFFSET = {"gptq": -1, ...}`` ->
   ``{"gptq": 0, ...}``.
   Fails: ``test_gptq_v1_checkpoint_read_by_an_independent_reader`` (all cases),
   ``test_gptq_default_checkpoint_format_read_by_an_independent_reader`` (the symmetric case).
8. ``slimkit/export/gptq.py``: GPTQ v2 qzeros written with v1's offset, in writer and reader
   together: ``QZERO_OFFSET = {..., "gptq_v2": 0}`` -> ``{..., "gptq_v2": -1}``.
   Fails: ``test_gptq_default_checkpoint_format_read_by_an_independent_reader`` (the asymmetric
   cases).

The GPTQ readers here (``read_gptq_v1`` / ``read_gptq_v2``) are written from the format
descriptions, not from slimkit's code (qweight packs the transposed codes along the input
features, 32 / b values per int32 word, value i at stream bit i * b; qzeros packs the zero points
along the output features the same way, v1 storing zero - 1 and v2 the zero itself; scales fp16;
g_idx the group of each input column), with their own bit-stream arithmetic (Python integers,
not slimkit's numpy unpacker). Where gptqmodel is installed (``make gptqmodel``),
tests/test_gptq_readers.py also loads slimkit's GPTQ files with gptqmodel's own loader and
kernel, which catches mutations 7 and 8 as well.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import random_ids, tiny_model

# ----------------------------------------------------------------------------- distillation


S = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.1, 0.2, 0.3, -2.0], [1.0, -1.0, 0.5, 0.0]])
T = torch.tensor([[1.5, 1.0, -0.5, 2.0], [-1.0, 0.0, 2.0, 0.5], [0.2, 0.4, -0.3, 1.1]])
Y = torch.tensor([0, 2, 3])
TAU = 4.0  # the DKD / DIST papers' CIFAR temperature; at tau 1 a missing tau^2 is invisible


def _softmax(row, tau):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kd_at_temperature_by_hand():
    """Hinton KD: tau^2 KL(softmax(t / tau) || softmax(s / tau)). Catches a dropped tau^2."""
    from slimkit.distill import losses as L

    want = sum(_kl(_softmax(t, TAU), _softmax(s, TAU)) for s, t in zip(S.tolist(), T.tolist()))
    assert L.kd_loss(S, T, TAU).item() == pytest.approx(want / 3 * TAU**2, rel=1e-5)


def test_dkd_at_temperature_by_hand():
    """DKD (Zhao et al. 2022, mdistiller ``dkd_loss``): (alpha TCKD + beta NCKD) * tau^2, TCKD on
    the binary (target, rest) split, NCKD on the non-target classes renormalised, all at
    temperature tau. Catches a dropped tau^2 (invisible at tau 1, the only value tested before)."""
    from slimkit.distill import losses as L

    alpha, beta = 1.0, 8.0
    want = 0.0
    for s, t, y in zip(S.tolist(), T.tolist(), Y.tolist()):
        ps, pt = _softmax(s, TAU), _softmax(t, TAU)
        tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rs = [v for i, v in enumerate(ps) if i != y]
        rt = [v for i, v in enumerate(pt) if i != y]
        nckd = _kl([v / sum(rt) for v in rt], [v / sum(rs) for v in rs])
        want += (alpha * tckd + beta * nckd) * TAU**2
    got = L.dkd_loss(S, T, Y, alpha, beta, TAU).item()
    assert got == pytest.approx(want / 3, rel=1e-5)
    # the registered loss reads its temperature from the settings
    b = L.Batch(labels=Y, student_logits=S, teacher_logits=T)
    st = L.LossSettings(dkd_alpha=alpha, dkd_beta=beta, dkd_tau=TAU)
    assert L.LOSSES.get("dkd")(b, st).item() == pytest.approx(want / 3, rel=1e-5)


def test_dist_at_temperature_by_hand():
    """DIST (Huang et al. 2022, official ``DIST`` module): tau^2 (beta (1 - mean Pearson over the
    classes of each sample) + gamma (1 - mean Pearson over the batch of each class)) on
    softmax(z / tau). Catches a dropped tau^2."""
    from slimkit.distill import losses as L

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        den = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
        return num / den

    ps = [_softmax(r, TAU) for r in S.tolist()]
    pt = [_softmax(r, TAU) for r in T.tolist()]
    inter = sum(1 - pearson(a, b) for a, b in zip(ps, pt)) / len(ps)
    cols = list(zip(*ps)), list(zip(*pt))
    intra = sum(1 - pearson(a, b) for a, b in zip(*cols)) / len(cols[0])
    beta, gamma = 2.0, 0.5
    want = TAU**2 * (beta * inter + gamma * intra)
    assert L.dist_loss(S, T, beta, gamma, TAU).item() == pytest.approx(want, rel=1e-4)
    b = L.Batch(labels=Y, student_logits=S, teacher_logits=T)
    st = L.LossSettings(dist_beta=beta, dist_gamma=gamma, dist_tau=TAU)
    assert L.LOSSES.get("dist")(b, st).item() == pytest.approx(want, rel=1e-4)


# ----------------------------------------------------------------------------- PanGu-pi SIAF


def test_siaf_sums_every_term_by_hand():
    """SIAF (PanGu-pi Eq. 7) on the SwiGLU gate: down((sum_i SiLU(a_i * gate(x) + b_i)) * up(x)),
    with per-channel a_i, b_i. Three terms with non-trivial a_i, b_i, computed here by hand.
    Catches a SIAF that sums only its first term (the default init makes term 2 nearly 0, so the
    model-level tests could not see it)."""
    from slimkit.tinylm.pangu_pi import PanguPiConfig, PanguPiForCausalLM

    torch.manual_seed(0)
    cfg = PanguPiConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, siaf_terms=3,
                        as_ratio=4)  # fmt: skip
    mlp = PanguPiForCausalLM(cfg).model.layers[0].mlp
    with torch.no_grad():
        mlp.siaf_a.copy_(torch.randn(3, 24))
        mlp.siaf_b.copy_(torch.randn(3, 24))
    x = torch.randn(2, 5, 16)

    def silu(v):
        return v / (1 + math.exp(-v))

    g = (x @ mlp.gate_proj.weight.T).tolist()
    u = (x @ mlp.up_proj.weight.T).tolist()
    a, b = mlp.siaf_a.tolist(), mlp.siaf_b.tolist()
    act = torch.tensor(
        [
            [[sum(silu(a[i][c] * gc + b[i][c]) for i in range(3)) * uc for c, (gc, uc) in
              enumerate(zip(gr, ur))] for gr, ur in zip(gb, ub)]
            for gb, ub in zip(g, u)
        ]
    )  # fmt: skip
    want = act @ mlp.down_proj.weight.T
    with torch.no_grad():
        got = mlp(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())


# ----------------------------------------------------------------------------- SmoothQuant


def test_smooth_scales_at_alpha_075_by_hand():
    """SmoothQuant Eq. 4: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), max over the consumers'
    rows. At alpha 0.5 swapped exponents give the same number; at 0.75 they do not."""
    from slimkit.quant.methods.smoothquant import smooth_scales

    a = torch.tensor([16.0, 1.0, 81.0, 0.5])
    w1 = torch.tensor([[1.0, -16.0, 0.5, 2.0], [0.25, 2.0, -1.0, -0.5]])
    w2 = torch.tensor([[-0.5, 4.0, 0.25, 8.0]])
    wmax = [1.0, 16.0, 1.0, 8.0]  # max over both consumers and their rows of |W_.j|
    want = torch.tensor([a_**0.75 / w_**0.25 for a_, w_ in zip(a.tolist(), wmax)])
    got = smooth_scales(a, [w1, w2], 0.75)
    assert torch.allclose(got, want, rtol=1e-6), (got.tolist(), want.tolist())


def test_smoothquant_folds_hand_computed_scales():
    """The whole method at alpha 0.75: block 0's norms end up divided by s computed here from the
    full-precision model's activations (max |X_j| over every calibration token) and the
    consumers' original weights. Catches swapped exponents, and a statistic taken elsewhere."""
    from slimkit.quant.api import quantize
    from slimkit.quant.methods import SmoothQuantConfig

    model = tiny_model("llama", layers=2)
    ref = copy.deepcopy(model)
    ids = random_ids(4, 16)
    blk = ref.model.layers[0]
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, _n=n: seen.__setitem__(_n, out.detach()))
        for n, m in (("attn", blk.input_layernorm), ("mlp", blk.post_attention_layernorm))
    ]
    with torch.no_grad():
        ref(ids)
    for h in hooks:
        h.remove()
    consumers = {
        "attn": [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj],
        "mlp": [blk.mlp.gate_proj, blk.mlp.up_proj],
    }
    alpha = 0.75
    model, _ = quantize(model, SmoothQuantConfig(wbits=8, abits=16, alpha=alpha), ids)
    got = {"attn": model.model.layers[0].input_layernorm.weight,
           "mlp": model.model.layers[0].post_attention_layernorm.weight}  # fmt: skip
    norms = {"attn": blk.input_layernorm.weight, "mlp": blk.post_attention_layernorm.weight}
    for key in ("attn", "mlp"):
        a = seen[key].abs().reshape(-1, seen[key].shape[-1]).amax(0).double()
        w = torch.cat([m.weight.detach().abs() for m in consumers[key]]).amax(0).double()
        s = a**alpha / w ** (1 - alpha)
        assert float(s.max() / s.min()) > 1.5  # the scales are far from uniform: a real check
        want = norms[key].detach().double() / s
        rel = float(((got[key].detach().double() - want) / want).abs().max())
        assert rel < 1e-5, (key, rel)


# ----------------------------------------------------------------------------- GPTQ


def reference_gptq(W, H, bits, damp, group=-1, act_order=False):
    """GPTQ as the paper writes it (Frantar et al. 2022, Algorithm 1), in fp64 and without the
    lazy block updates: H <- H + damp * mean(diag H) I; U = upper Cholesky factor of H^-1;
    for each column j (in descending diag(H) with act-order): q_j = quant(w_j), then
    W[:, j:] -= ((w_j - q_j) / U_jj) U_j,j: . Asymmetric min-max grid with 0 in the range, fit
    per row (per channel) or per group of consecutive original columns (static groups) before
    the sweep. Returns (codes in original column order, margin per row), the margin being the
    smallest distance, in grid steps, of an unclamped pre-rounding value of the row from a
    rounding boundary (rows are independent: a tie flipped in one row changes no other row)."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    qmax = 2**bits - 1

    def fit(x):
        lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        s = (hi - lo) / qmax
        return s, torch.round(-lo / s)

    step = cols if group == -1 else group
    params = [fit(W[:, i : i + step]) for i in range(0, cols, step)]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q, margin = torch.zeros(rows, cols), torch.ones(rows, dtype=torch.float64)
    for j in range(cols):
        s, z = params[int(perm[j]) // step]
        x = W[:, j] / s
        inside = (x + z > -0.5) & (x + z < qmax + 0.5)
        dist = ((x - torch.floor(x)) - 0.5).abs()
        margin = torch.where(inside, torch.minimum(margin, dist), margin)
        q = torch.clamp(torch.round(x) + z, 0, qmax)
        Q[:, j] = q
        err = (W[:, j] - s * (q - z)) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out, margin


@pytest.mark.parametrize("act_order,group", [(False, -1), (True, 16)])
def test_gptq_matches_the_paper_reference(act_order, group):
    """slimkit's blocked GPTQ (lazy updates in blocks of 8 columns, fp32) gives exactly the codes
    of the reference above on correlated inputs (cond(H) ~ 1e3, where dampening matters).
    Ties: the seeded input keeps every pre-rounding value at least 5e-4 grid steps from a
    rounding boundary (asserted), far more than the fp32 / fp64 difference, so codes must be
    equal, not merely close. Catches a wrong dampening (100x changes ~80 of 512 codes), a wrong
    Cholesky factor, error propagation or act-order / static-group bookkeeping."""
    from slimkit.quant.methods.gptq import gptq_quantize
    from slimkit.quant.quantizer import QuantSpec

    g = torch.Generator().manual_seed(0)
    n, cols, rows = 256, 32, 16
    X = torch.randn(n, 8, generator=g) @ torch.randn(8, cols, generator=g)
    X = X + 0.3 * torch.randn(n, cols, generator=g)
    H = (2 / n * X.double().T @ X.double()).float()
    W = torch.randn(rows, cols, generator=g)
    want, margin = reference_gptq(W, H, 3, 0.01, group, act_order)
    assert float(margin.min()) > 5e-4
    wrong, _ = reference_gptq(W, H, 3, 1.0, group, act_order)
    assert int((wrong != want).sum()) > 20  # dampening visibly matters on this input
    qw = gptq_quantize(W, H, QuantSpec(3, group), damp=0.01, block_size=8, act_order=act_order,
                       static_groups=True)  # fmt: skip
    diff = int((qw.codes.float() != want).sum())
    assert diff == 0, f"{diff} of {want.numel()} codes differ from the reference"


def test_gptq_in_the_pipeline_matches_the_reference(monkeypatch):
    """GPTQ run by ``slimkit.quantize`` with the default config (the paper's percdamp 0.01,
    act-order, static groups): every linear's codes equal the reference's on the Hessian that
    linear was given. Catches a changed default dampening as well as one inside the sweep.
    Ties: a row with a pre-rounding value within 1e-5 grid steps of a boundary is not compared
    (fp32 and fp64 may round it differently; this seed has 1 such row of 512, and all rows
    matched when measured)."""
    from slimkit.quant.api import quantize
    from slimkit.quant.methods import GPTQConfig
    from slimkit.quant.methods import gptq as gptq_mod

    calls = []
    original = gptq_mod.gptq_quantize

    def spy(w, H, spec, **kw):
        qw = original(w, H, spec, **kw)
        calls.append((w.clone(), H.clone(), spec, kw["act_order"], qw))
        return qw

    monkeypatch.setattr(gptq_mod, "gptq_quantize", spy)
    model = tiny_model("llama", layers=1)
    quantize(model, GPTQConfig(wbits=3, group_size=32), random_ids(4, 32))
    assert len(calls) == 7
    compared = total = 0
    for w, H, spec, act_order, qw in calls:
        assert act_order and spec.group_size == 32
        want, margin = reference_gptq(w, H, 3, 0.01, 32, act_order)
        rows = margin >= 1e-5
        diff = int((qw.codes.float()[rows] != want[rows]).sum())
        assert diff == 0, f"{diff} of {int(rows.sum()) * want.shape[1]} codes differ"
        compared, total = compared + int(rows.sum()), total + len(rows)
    assert compared >= 0.95 * total


# ----------------------------------------------------------------------------- GPTQ v1 export


def _read_packed_column(words, bits: int, n: int) -> list[int]:
    """n unsigned b-bit values of one packed run: the int32 words, least significant first, form
    one little-endian bit stream; value i is stream bits [i*b, (i+1)*b) (GPTQ v1; 3-bit values
    straddle words, IST-DASLab/gptq ``quant.py``)."""
    stream = 0
    for k, w in enumerate(words):
        stream |= (int(w) & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]


def _read_gptq(directory, zero_offset: int) -> dict[str, torch.Tensor]:
    """Dequantized weights of a GPTQ directory whose ``qzeros`` hold zero + ``zero_offset``."""
    import json

    from safetensors.torch import load_file

    bits = json.loads((directory / "config.json").read_text())["quantization_config"]["bits"]
    state = load_file(str(directory / "model.safetensors"))
    out = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        qweight, qzeros = state[key].tolist(), state[name + ".qzeros"].tolist()
        scales, g_idx = state[name + ".scales"], state[name + ".g_idx"]
        assert scales.dtype == torch.float16 and g_idx.dtype == torch.int32
        n_groups, n_out = scales.shape
        n_in = len(g_idx)
        q = torch.tensor(
            [_read_packed_column([row[o] for row in qweight], bits, n_in) for o in range(n_out)]
        ).T  # (in, out)
        zero = torch.tensor([_read_packed_column(row, bits, n_out) for row in qzeros]) - zero_offset
        g = g_idx.long()
        w = scales.float()[g] * (q.float() - zero[g].float())  # (in, out)
        out[name] = w.T
    return out


def read_gptq_v1(directory) -> dict[str, torch.Tensor]:
    """An independent GPTQ v1 reader (format description, not slimkit's code): for each linear,
    ``qweight`` [in*b/32, out] int32 packs the codes along the input features, ``qzeros``
    [groups, out*b/32] packs the zero points along the output features and stores zero - 1,
    ``scales`` [groups, out] fp16, ``g_idx`` [in] the group of each input column. Returns the
    dequantized weights W[o, c] = scale[g, o] * (q[c, o] - zero[g, o]), g = g_idx[c]."""
    return _read_gptq(directory, -1)


def read_gptq_v2(directory) -> dict[str, torch.Tensor]:
    """An independent GPTQ v2 reader, from gptqmodel's description of ``format: gptq_v2`` ("v2
    format fixed sym = False quantization"): the v1 layout, but ``qzeros`` stores the zero point
    itself (gptqmodel converts v1 to v2 on load by adding 1 to every packed zero)."""
    return _read_gptq(directory, 0)


def _export_and_read(tmp_path, tok, kw, checkpoint_format="auto"):
    import json

    import slimkit
    from slimkit.export import ExportConfig, export, load_quantized
    from slimkit.quant.methods import RTNConfig

    model = tiny_model("llama", layers=1, vocab=len(tok))
    model, res = slimkit.quantize(model, RTNConfig(**kw), None)
    slimkit.save_quantized(model, tok, tmp_path / "run", res)
    cfg = ExportConfig(format="gptq", checkpoint_format=checkpoint_format)
    export(tmp_path / "run", tmp_path / "g", cfg)
    qcfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    return qcfg, load_quantized(tmp_path / "run").layers


def _assert_exact(got, layers):
    assert got.keys() == layers.keys() and len(got) == 7
    for name, qw in layers.items():
        idx = qw.g_idx.long()
        want = qw.scale.half().float()[:, idx] * (qw.codes.float() - qw.zero[:, idx])
        assert torch.equal(got[name], want), (name, float((got[name] - want).abs().max()))


@pytest.mark.parametrize("kw", [dict(wbits=4, group_size=32), dict(wbits=3, group_size=-1),
                                dict(wbits=2, group_size=32, sym=True)])  # fmt: skip
def test_gptq_v1_checkpoint_read_by_an_independent_reader(tmp_path, tiny_tokenizer, kw):
    """The exported v1 tensors, read by the reader above, dequantize to the run's weights (codes,
    fp16-rounded scales, zero points) exactly. Catches zero points stored without the v1
    ``- 1`` (with slimkit's own reader changed to match, its round trip still passes), a wrong
    packing order, or scales / g_idx of the wrong shape."""
    qcfg, layers = _export_and_read(tmp_path, tiny_tokenizer, kw, "gptq")
    assert qcfg["checkpoint_format"] == qcfg["format"] == "gptq"
    _assert_exact(read_gptq_v1(tmp_path / "g"), layers)


@pytest.mark.parametrize("kw", [dict(wbits=4, group_size=32), dict(wbits=3, group_size=-1),
                                dict(wbits=2, group_size=32), dict(wbits=4, group_size=32, sym=True)])  # fmt: skip
def test_gptq_default_checkpoint_format_read_by_an_independent_reader(tmp_path, tiny_tokenizer, kw):
    """The default export is v2 for asymmetric runs (gptqmodel refuses asymmetric v1 files it
    did not write) and v1 for symmetric ones; either, read by the matching reader above,
    dequantizes to the run's weights exactly. Catches v2 zero points written with v1's ``- 1``
    (slimkit's own reader changed to match still round-trips), a config that names one format
    while the tensors are in the other, or symmetric runs moved off v1."""
    qcfg, layers = _export_and_read(tmp_path, tiny_tokenizer, kw)
    want = "gptq" if kw.get("sym") else "gptq_v2"
    assert qcfg["checkpoint_format"] == qcfg["format"] == want and qcfg["sym"] == bool(
        kw.get("sym")
    )
    _assert_exact((read_gptq_v1 if want == "gptq" else read_gptq_v2)(tmp_path / "g"), layers)


# ----------------------------------------------------------------------------- CBQ


def _block_io(model, ids, j: int, k: int):
    """(input of decoder layer j, output of decoder layer k) on ``ids``, by forward hooks."""
    layers, seen = model.model.layers, {}

    def pre(mod, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def post(mod, args, out):
        seen["y"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    hooks = [layers[j].register_forward_pre_hook(pre, with_kwargs=True),
             layers[k].register_forward_hook(post)]  # fmt: skip
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen["x"], seen["y"]


def _rel_l2(ref, out):
    """The spec's L2 distance, normalised per token (slimkit's documented choice):
    ||ref - out||^2 / ||ref||^2 averaged over the tokens."""
    ref, out = ref.double(), out.double()
    return float(((ref - out).pow(2).sum(-1) / ref.pow(2).sum(-1)).mean())


def test_cbq_window_loss_is_the_homologous_sum():
    """CBQ's reconstruction loss of a window (blocks j..j+K-1) is
    E(T_fp(X_fp), T_q(X_q)) + E(T_fp(X_q), T_q(X_q)) (homologous reconstruction).

    With zero learning rates the quantizers never move, so the final quantized model IS the
    window function T_q the loss was computed with. The test rebuilds both terms from the
    full-precision model, the quantized model and a hybrid (quantized prefix, FP window), and
    compares their sum with the first-step loss CBQ logged for every window (one step each).
    Catches a dropped second term (window 0 would log half the value, window 1 ~ the first term
    alone) and a second term that compares against the wrong input."""
    from slimkit.quant.api import quantize
    from slimkit.quant.methods import CBQConfig

    model = tiny_model("llama", layers=3)
    fp = copy.deepcopy(model)
    ids = random_ids(4, 16)
    cfg = CBQConfig(wbits=2, group_size=16, epochs=1, train_batch_size=4, cfp=False,
                    rounding_init="nearest", lr_clip=0.0, lr_round=0.0)  # fmt: skip
    model, res = quantize(model, cfg, ids)
    logged = [e["loss_first_steps"] for e in res["events"] if "loss_first_steps" in e]
    assert len(logged) == 2  # windows [0, 1] and [1, 2]
    for j, got in enumerate(logged):
        x_fp, y_fp = _block_io(fp, ids, j, j + 1)
        x_q, y_q = _block_io(model, ids, j, j + 1)
        hybrid = copy.deepcopy(model)
        for b in (j, j + 1):
            hybrid.model.layers[b] = copy.deepcopy(fp.model.layers[b])
        x_h, y_h = _block_io(hybrid, ids, j, j + 1)
        assert torch.equal(x_h, x_q)
        first, second = _rel_l2(y_fp, y_q), _rel_l2(y_h, y_q)
        if j == 1:  # the quantized prefix makes X_q differ from X_fp: the terms differ
            assert not torch.allclose(x_q, x_fp) and abs(first - second) > 0.05 * first
        assert got == pytest.approx(first + second, rel=1e-3), (j, got, first, second)


def test_lora_rounding_gradient_by_hand():
    """Gradient of the LoRA-Rounding factors: h = clip(sigmoid(V0 + A1 A2) (zeta - gamma) + gamma,
    0, 1), weight = s (floor(W / s) + h_hard + z - z) with a straight-through gradient into h, so
    for L = sum(G * weight): dL/dV = G s (zeta - gamma) sigmoid'(V) [0 < h_pre < 1], dL/dA1 =
    dL/dV A2^T, dL/dA2 = A1^T dL/dV. Catches frozen factors (requires_grad False, a detached h)."""
    from slimkit.quant.methods.cbq import GAMMA, ZETA, LinearQuantizer
    from slimkit.quant.quantizer import QuantSpec

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    spec = QuantSpec(3, -1)
    q = LinearQuantizer(w, spec, "lora", rank=2, generator=g)
    with torch.no_grad():  # A2 starts at 0 (so would A1's gradient): move it, as training would
        q.a2.copy_(0.5 * torch.randn(q.a2.shape, generator=g))
    codes = q.harden(w).codes
    G = torch.randn(8, 16, generator=g) * ((codes > 0) & (codes < spec.qmax))  # off the clamp
    (q.weight(w) * G).sum().backward()
    with torch.no_grad():
        s, _ = q.scale_zero(w)
        v = q.v0 + q.a1 @ q.a2
        sig = torch.sigmoid(v)
        pre = sig * (ZETA - GAMMA) + GAMMA
        dv = G * s.reshape(8, 1) * (ZETA - GAMMA) * sig * (1 - sig) * ((pre > 0) & (pre < 1))
    assert float(dv.abs().sum()) > 0
    assert q.a1.grad is not None and q.a2.grad is not None, "no gradient reaches A1 / A2"
    assert torch.allclose(q.a1.grad, dv @ q.a2.detach().T, rtol=1e-4, atol=1e-7)
    assert torch.allclose(q.a2.grad, q.a1.detach().T @ dv, rtol=1e-4, atol=1e-7)


def test_cbq_trains_the_lora_rounding_factors(monkeypatch):
    """One AdamW step per window (lr_round 1e-3, clipping frozen): Adam's first step moves every
    parameter with a non-zero gradient by lr * g / (|g| + eps) ~ lr, so the A2 factors of the
    first window's linears (A2 = 0 at the start, A1 random, hence a non-zero gradient) move by
    lr, entry by entry, and never by more. Catches factors left out of the optimizer, frozen, or
    trained at another learning rate."""
    from slimkit.quant.api import quantize
    from slimkit.quant.methods import CBQConfig
    from slimkit.quant.methods.cbq import CBQ

    moves = []
    original = CBQ._train

    def train(self, win):
        qs = [q for b in win.block_ids for q in self.wq[b].values()]
        before = [(q.a1.detach().clone(), q.a2.detach().clone()) for q in qs]
        original(self, win)
        moves.append(
            [
                ((q.a1.detach() - a1).abs(), (q.a2.detach() - a2).abs())
                for q, (a1, a2) in zip(qs, before)
            ]
        )

    monkeypatch.setattr(CBQ, "_train", train)
    lr = 1e-3
    cfg = CBQConfig(wbits=2, group_size=16, epochs=1, train_batch_size=4, cfp=False,
                    rounding_init="nearest", lr_clip=0.0, lr_round=lr)  # fmt: skip
    quantize(tiny_model("llama", layers=2), cfg, random_ids(4, 16))
    assert len(moves) == 1 and len(moves[0]) == 14  # one window, 2 blocks x 7 linears
    for d1, d2 in moves[0]:
        assert float(d1.max()) <= lr * 1.0001 and float(d2.max()) <= lr * 1.0001
        at_lr = ((d2 > 0.99 * lr) & (d2 <= lr * 1.0001)).float().mean()
        assert float(at_lr) > 0.5, float(at_lr)
