"""GGUF block types as quantization grids (Q2_K..Q6_K, Q4_0..Q8_0) and llama.cpp's per-tensor
file-type mixes: the grid slimkit optimises on is the one the file stores, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.export import ExportConfig, export, load_quantized
from slimkit.quant import gguf_grids as G
from slimkit.quant.methods.gptq import gptq_quantize
from slimkit.quant.quantizer import QuantSpec, fit_grid, quantize_weight


def _weight(rows=6, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :256] = 0  # a dead super-block: scales 0
    w[1, 7] = 2.0  # an outlier dominating its super-block
    w[2] = -w[2].abs()  # a row without positive values
    w[3, :32] *= 1e-4  # a sub-block far below the super-block's largest
    return w


@pytest.mark.parametrize("name", list(G.TYPES))
def test_blocks_dequantize_through_gguf_to_the_fake_quant_weight_exactly(name):
    """slimkit's codes, sub-block scales (mins) and super-block scales packed into GGML blocks
    and read back by gguf's own dequantizer (the port of llama.cpp's) equal slimkit's fake-quant
    weight in every bit; the block reader gives back the codes. Catches any layout, nibble /
    bit-plane order, scale packing, sign or operation-order difference (a K-quant's d * sc * q - dmin * m
    computed otherwise rounds differently)."""
    import gguf

    w = _weight()
    spec = QuantSpec.for_ggml(name)
    qw = quantize_weight(w, spec)
    t = spec.ggml
    raw = G.encode(qw.codes, G.GridParams(qw.scale, qw.zero, qw.super_scale), t)
    assert raw.shape == (w.shape[0], w.shape[1] // t.block * t.block_bytes)
    qt = getattr(gguf.GGMLQuantizationType, t.ggml)
    assert gguf.GGML_QUANT_SIZES[qt] == (t.block, t.block_bytes)
    deq = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qt))).reshape(w.shape)
    assert torch.equal(deq, qw.dequantize())
    assert np.array_equal(G.decode_codes(raw, name, w.shape[1]), qw.codes.numpy())
    assert (deq - w).norm() / w.norm() < {2: 0.35, 3: 0.2, 4: 0.12}.get(t.bits, 0.07)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_k_quant_sub_block_scales_are_the_stored_integers_times_an_fp16_super_scale(name):
    """The defining piece of a K-quant grid: each sub-block's scale (and min) is a small integer
    times the super-block's fp16 d (dmin), in llama.cpp's ranges. Catches fake-quant with free
    float sub-block scales, which no K-quant block can store."""
    t = G.TYPES[name]
    p = fit_grid(_weight(seed=1), QuantSpec.for_ggml(name))
    per = G.QK_K // t.sub
    d = p.super[..., 0].repeat_interleave(per, dim=1)
    assert torch.equal(p.super, p.super.half().float())
    sc = torch.where(d != 0, p.scale / torch.where(d != 0, d, 1), 0)
    assert torch.equal(sc, sc.round()) and torch.equal(d * sc, p.scale)
    lo, hi = (0, t.sc_max) if t.offset else (-t.sc_max, t.sc_max - 1)
    assert sc.min() >= lo and sc.max() <= hi
    if t.offset:
        dmin = p.super[..., 1].repeat_interleave(per, dim=1)
        m = torch.where(dmin != 0, p.zero / torch.where(dmin != 0, dmin, 1), 0)
        assert torch.equal(m, m.round()) and m.min() >= 0 and m.max() <= t.sc_max


def test_gptq_fixes_the_k_quant_grid_from_the_weights_before_the_sweep():
    """GPTQ on Q4_K: the scales are fit on the original weight before the column sweep (a
    super-block spans 256 columns the sweep changes one by one), so they equal RTN's and the
    record is storable; the sweep then lowers the layer's output error below RTN's on the same
    grid. Catches a sweep that refits scales mid-way or ignores the Hessian."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.2
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 256, generator=g) * 0.05
    spec = QuantSpec.for_ggml("q4_k")
    rtn = quantize_weight(w, spec)
    qw = gptq_quantize(w, H, spec, act_order=True)
    assert torch.equal(qw.scale, rtn.scale) and torch.equal(qw.zero, rtn.zero)
    assert torch.equal(qw.super_scale, rtn.super_scale)
    assert torch.equal(qw.g_idx, rtn.g_idx)

    def err(q):
        d = (q.dequantize() - w).double()
        return float(torch.einsum("oi,ij,oj->", d, H.double(), d))

    assert err(qw) < 0.8 * err(rtn)


def _smollm2_types(ftype: str) -> dict[str, int]:
    """Type counts of SmolLM2-135M's block linears (30 layers, widths 576 / 1536, 9 heads, 3
    KV heads) under ``ftype``."""
    counts: dict[str, int] = {}
    for i in range(30):
        for rel, width in [("self_attn.q_proj", 576), ("self_attn.k_proj", 576),
                           ("self_attn.v_proj", 576), ("self_attn.o_proj", 576),
                           ("mlp.gate_proj", 576), ("mlp.up_proj", 576), ("mlp.down_proj", 1536)]:  # fmt: skip
            t = G.tensor_type(f"llama.cpp:{ftype}", rel, width, i, 30, 3)
            counts[t] = counts.get(t, 0) + 1
    return counts


def test_type_choice_follows_llama_cpp_rules_and_width_fallbacks():
    """Counted by hand from llama.cpp's llama_tensor_get_type for SmolLM2-135M: width 576 is not
    a multiple of 256, so Q2_K / Q3_K fall back to Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to
    Q8_0 (180 of the 210 linears); use_more_bits(i, 30) holds for 14 layers (0-2, 5, 8, ..., 23,
    26-29). Catches a wrong rule, counter or fallback."""
    # Q4_K_M: v and down Q6_K in the 14 layers, else Q4_K; everything at 576 falls back
    assert _smollm2_types("q4_k_m") == {"q5_0": 120 + 16 + 30, "q8_0": 14, "q6_k": 14, "q4_k": 16}
    # Q3_K_M: q/k/gate/up Q3_K -> Q4_0; v Q5_K (layers 0, 1) -> Q5_1, else Q4_K -> Q5_0;
    # o Q4_K -> Q5_0; down Q5_K in layer 0 (30 / 16 = 1), else Q4_K
    assert _smollm2_types("q3_k_m") == {
        "q4_0": 120,
        "q5_1": 2,
        "q5_0": 28 + 30,
        "q5_k": 1,
        "q4_k": 29,
    }
    # Q2_K: n_gqa 3 < 4 so v Q3_K -> Q4_0; o Q3_K -> Q4_0; down Q3_K
    assert _smollm2_types("q2_k") == {"q4_0": 180, "q3_k": 30}
    assert sum(n for t, n in _smollm2_types("q3_k_m").items() if not G.TYPES[t].is_k) == 180
    # a model with widths divisible by 256 and n_gqa 4 keeps genuine K-quants
    t = {
        r: G.tensor_type("llama.cpp:q2_k", r, 512, 5, 16, 4)
        for r in ("v_proj", "o_proj", "up_proj")
    }
    assert t == {"v_proj": "q4_k", "o_proj": "q3_k", "up_proj": "q2_k"}
    t = {i: G.tensor_type("llama.cpp:q4_k_s", "v_proj", 512, i, 16, 1) for i in (3, 4)}
    assert t == {3: "q5_k", 4: "q4_k"}
    # the output matrix: Q6_K, Q8_0 when the width is not a multiple of 256
    assert (G.output_type("q4_k", 512), G.output_type("q4_k", 576)) == ("q6_k", "q8_0")
    assert G.tensor_type("gguf:q4_k", "q_proj", 48, 0, 1, 1) is None


def _grid_run(tmp_path, tok, method="rtn", grid="llama.cpp:q4_k_m", layers=8, **kw):
    model = tiny_model("llama", vocab=len(tok), layers=layers, hidden=256)
    model.config.intermediate_size = 320  # not a multiple of 256: down_proj falls back
    model = type(model)(model.config).eval()
    cfg = slimkit.quant.methods.config_class(method)(grid=grid, **kw)
    model, res = slimkit.quantize(model, cfg, random_ids(4, 16, len(tok)))
    d = tmp_path / f"{method}-{grid.replace(':', '-')}"
    slimkit.save_quantized(model, tok, d, res)
    return d


def test_mixed_k_quant_export_is_bit_exact_and_as_large_as_llama_cpp_file(tmp_path, tiny_tokenizer):
    """An RTN run on llama.cpp's Q4_K_M mix of a tiny model (8 layers, widths 256 and 320): each
    tensor is written in the type llama.cpp's quantizer gives it, the weights read back by the
    transformers GGUF loader (gguf's dequantizer) equal the run's fake-quant weights exactly, and
    the tensor data is exactly the bytes of those types. Catches a wrong per-tensor type, a
    super-block scale lost on save / load, or rows permuted without their super-block scales."""
    import gguf

    run = _grid_run(tmp_path, tiny_tokenizer, grid="llama.cpp:q4_k_m")
    out = tmp_path / "m.gguf"
    r = export(run, out, ExportConfig(format="gguf", verify=True))
    v = r["verify"]
    assert v["passed"] and v["codes_identical"]
    assert v["max_abs_weight_diff_vs_reference"] == 0.0
    assert v["max_abs_logit_diff_vs_reference"] == 0.0
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    more = {0, 3, 6, 7}  # use_more_bits(i, 8)
    want, nbytes = {}, 0
    for i in range(8):
        for name, t, shape in [("attn_q", "Q4_K", (256, 256)), ("attn_k", "Q4_K", (128, 256)),
                               ("attn_v", "Q6_K" if i in more else "Q4_K", (128, 256)),
                               ("attn_output", "Q4_K", (256, 256)), ("ffn_gate", "Q4_K", (320, 256)),
                               ("ffn_up", "Q4_K", (320, 256)),
                               ("ffn_down", "Q8_0" if i in more else "Q5_0", (256, 320))]:  # fmt: skip
            want[f"blk.{i}.{name}.weight"] = t
            block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t)]
            nbytes += shape[0] * shape[1] // block * size
    want["token_embd.weight"] = "Q4_K"  # untied: the file's default type
    want["output.weight"] = "Q6_K"
    assert {k: tensors[k].tensor_type.name for k in want} == want
    quantized = sum(int(tensors[k].n_bytes) for k in want if k.startswith("blk."))
    assert quantized == nbytes
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].parts[-1][0] == 15  # Q4_K_M
    qm = load_quantized(run)
    assert all(qw.super_scale is not None for n, qw in qm.layers.items() if qw.spec.ggml.is_k)


@pytest.mark.parametrize(
    "method,kw", [("gptq", {}), ("awq", dict(n_grid=4, clip_grid=4, max_shrink=0.5))]
)
def test_gptq_and_awq_on_q3_k_export_exactly(tmp_path, tiny_tokenizer, method, kw):
    """GPTQ and AWQ (scales folded, then the Q3_K grid) write a pure Q3_K file (the 320-wide
    down projection falls back to Q4_0) whose weights equal the run's in every bit."""
    run = _grid_run(tmp_path, tiny_tokenizer, method=method, grid="gguf:q3_k", layers=1, **kw)
    r = export(run, tmp_path / "m.gguf", ExportConfig(format="gguf", verify=True))
    assert r["verify"]["passed"] and r["verify"]["max_abs_weight_diff_vs_reference"] == 0.0
    assert r["gguf_types"] == ["Q3_K", "Q4_0"]


def test_gguf_grid_refusals(tmp_path, tiny_tokenizer):
    """Clear one-line errors: a GGUF-grid run to a uniform format, an unknown grid, activation
    bits with a GGUF grid, a width no GGUF block fits."""
    run = _grid_run(tmp_path, tiny_tokenizer, grid="gguf:q4_k", layers=1)
    with pytest.raises(SlimkitError, match="only --format gguf"):
        export(run, tmp_path / "ct", ExportConfig(format="compressed-tensors"))
    with pytest.raises(SlimkitError, match="unknown --grid"):
        slimkit.RTNConfig(grid="gguf:q7_k")
    with pytest.raises(SlimkitError, match="weights only"):
        slimkit.RTNConfig(grid="gguf:q4_k", abits=8)
    model = tiny_model("llama", vocab=len(tiny_tokenizer), layers=1, hidden=48)
    with pytest.raises(SlimkitError, match="multiple of 32"):
        slimkit.quantize(model, slimkit.RTNConfig(grid="gguf:q4_0"), None)


def test_cbq_learns_rounding_on_the_q2_k_mix_and_exports_exactly(tmp_path, tiny_tokenizer):
    """CBQ on llama.cpp's Q2_K mix (GPTQ start, learned LoRA rounding): every record lies on
    its type's stored grid (the file's weights equal the run's in every bit) and the learned
    rounding moved codes away from GPTQ's start. Catches a learned quantizer whose hardened
    weight leaves the grid (free scales / clipping) or a mix ignored by CBQ."""
    cfg = dict(epochs=2, train_batch_size=2, batch_size=2, rank=2, cfp=False, window=1, overlap=0)
    run = _grid_run(tmp_path, tiny_tokenizer, method="cbq", grid="llama.cpp:q2_k", layers=1, **cfg)
    qm = load_quantized(run)
    grids = {n.rsplit(".", 1)[-1]: qw.spec.grid for n, qw in qm.layers.items()}
    assert grids == {"q_proj": "q2_k", "k_proj": "q2_k", "v_proj": "q3_k", "o_proj": "q3_k",
                     "gate_proj": "q2_k", "up_proj": "q2_k", "down_proj": "q4_0"}  # fmt: skip
    r = export(run, tmp_path / "m.gguf", ExportConfig(format="gguf", verify=True))
    assert r["verify"]["passed"] and r["verify"]["max_abs_weight_diff_vs_reference"] == 0.0
    gptq = _grid_run(tmp_path, tiny_tokenizer, method="gptq", grid="llama.cpp:q2_k", layers=1)
    g = load_quantized(gptq).layers
    assert any(not torch.equal(g[n].codes, qw.codes) for n, qw in qm.layers.items())


def test_k_quant_mix_runs_in_llama_cpp_with_the_stored_numbers(tmp_path, tiny_tokenizer):
    """llama.cpp itself (llama-cpp-python, `make llamacpp`; skipped where it is not installed)
    reads slimkit's Q4_K_M file and gives the logits of the stored weights, up to llama.cpp's
    8-bit quantization of the activations in its K-quant dot products. Catches a file that only
    gguf's Python reader accepts (tensor types, block layout or metadata llama.cpp reads
    otherwise), and q / k rows permuted without their super-block scales (wrong attention)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    run = _grid_run(tmp_path, tiny_tokenizer, grid="llama.cpp:q4_k_m", layers=2)
    out = tmp_path / "m.gguf"
    export(run, out, ExportConfig(format="gguf"))
    ids = random_ids(1, 24, len(tiny_tokenizer), seed=3)[0].tolist()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False)  # fmt: skip
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    ref_model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                                     dtype=torch.float32).eval()  # fmt: skip
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    err = (got - ref).norm() / ref.norm()
    assert err < 0.03, err  # measured 0.013 (AVX2 build)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
