"""Exports: bit packing, the three formats read back by independent readers, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model

import slimkit
import slimkit.cli
from slimkit.core.errors import SlimkitError
from slimkit.export import ExportConfig, export, load_quantized
from slimkit.export import gguf_format as gg
from slimkit.export.gptq import read_gptq
from slimkit.export.packing import pack_rows, unpack_rows_bitstream


def make_run(tmp_path, tok, name="run", method="rtn", **kw):
    from slimkit.quant.methods import config_class

    cfg = config_class(method)(**kw)
    model = tiny_model("llama", vocab=len(tok), layers=2)
    model, res = slimkit.quantize(model, cfg, random_ids(4, 32, len(tok)))
    d = tmp_path / name
    slimkit.save_quantized(model, tok, d, res)
    return d


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 40])
def test_pack_rows_round_trip(bits, n):
    c = torch.randint(
        0, 2**bits, (n, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)
    )
    p = pack_rows(c, bits)
    assert p.dtype == torch.int32 and p.shape == (-(-n * bits // 32), 7)
    assert torch.equal(torch.from_numpy(unpack_rows_bitstream(p.numpy(), bits, n)), c)


def test_three_bit_words_straddle_as_the_gptq_reference():
    v = [(5 * i + 3) % 8 for i in range(32)]
    words = [
        int(w) & 0xFFFFFFFF for w in pack_rows(torch.tensor(v, dtype=torch.uint8)[:, None], 3)[:, 0]
    ]
    w0 = sum(v[i] << (3 * i) for i in range(10)) | ((v[10] & 3) << 30)
    w1 = (v[10] >> 2) | sum(v[11 + i] << (3 * i + 1) for i in range(10)) | ((v[21] & 1) << 31)
    w2 = (v[21] >> 1) | sum(v[22 + i] << (3 * i + 2) for i in range(10))
    assert words == [w0, w1, w2]


CT_CASES = [
    dict(wbits=4, group_size=32),
    dict(wbits=4, group_size=64, sym=True),
    dict(wbits=4, group_size=-1),
    dict(wbits=8, group_size=64),
    dict(wbits=8, group_size=-1, sym=True),
]


@pytest.mark.parametrize(
    "kw", CT_CASES, ids=lambda k: f"w{k['wbits']}g{k['group_size']}{'s' if k.get('sym') else 'a'}"
)
def test_compressed_tensors_fp32_scales_reload_bit_exact(tmp_path, tiny_tokenizer, kw):
    run = make_run(tmp_path, tiny_tokenizer, **kw)
    r = export(
        run,
        tmp_path / "ct",
        ExportConfig(format="compressed-tensors", dtype="float32", verify=True),
    )
    v = r["verify"]
    assert v["codes_identical"] and v["passed"]
    assert v["max_abs_weight_diff_vs_reference"] == 0.0  # fp32 scales: dequantization is exact
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    w = cfg["config_groups"]["group_0"]["weights"]
    assert w["num_bits"] == kw["wbits"] and w["symmetric"] == kw.get("sym", False)
    assert w["strategy"] == ("channel" if kw["group_size"] == -1 else "group")


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_compressed_tensors_loads_with_plain_from_pretrained(tmp_path, tiny_tokenizer, sym):
    """A plain ``AutoModelForCausalLM.from_pretrained(dir)`` (no CompressedTensorsConfig passed)
    loads the W4 g32 export and gives the logits of slimkit's model with the stored scales.
    Catches the asymmetric export failing with a weight_zero_point size mismatch ([out / 8,
    groups] in the file, [out, groups] registered by compressed-tensors 0.20's loader), while the
    zero points stay packed the way the package's own compressor packs them (what vLLM reads)."""
    from transformers import AutoModelForCausalLM

    from slimkit.export.base import FORMATS, reference_model

    run = make_run(tmp_path, tiny_tokenizer, wbits=4, group_size=32, sym=sym)
    cfg = ExportConfig(format="compressed-tensors", dtype="float32")
    export(run, tmp_path / "ct", cfg)
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg.get("dequantize", False) == (not sym)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    qm = load_quantized(run)
    if not sym:
        from safetensors.torch import load_file

        zp = load_file(str(tmp_path / "ct" / "model.safetensors"))
        q = qm.layers["model.layers.0.self_attn.q_proj"]
        assert zp["model.layers.0.self_attn.q_proj.weight_zero_point"].shape == (
            q.codes.shape[0] // 8,
            q.scale.shape[1],
        )
    ref = reference_model(qm, FORMATS.get("compressed-tensors")(), cfg).eval()
    ids = random_ids(2, 16, len(tiny_tokenizer))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_act_order_g_idx_goes_to_gptq_static_groups_to_compressed_tensors(tmp_path, tiny_tokenizer):
    kw = dict(method="gptq", wbits=4, group_size=32, act_order=True)
    run = make_run(tmp_path, tiny_tokenizer, name="ao", static_groups=False, **kw)
    qm = load_quantized(run)
    assert any(qm.act_order(n) for n in qm.layers)  # the case is really exercised
    with pytest.raises(SlimkitError, match="static-groups"):
        export(run, tmp_path / "ct", ExportConfig(format="compressed-tensors"))
    r = export(run, tmp_path / "g", ExportConfig(format="gptq", verify=True))
    assert r["verify"]["passed"] and r["verify"]["max_abs_weight_diff_vs_reference"] == 0.0
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"][
        "desc_act"
    ]
    run = make_run(tmp_path, tiny_tokenizer, name="sg", static_groups=True, **kw)
    r = export(run, tmp_path / "ct", ExportConfig(format="compressed-tensors", verify=True))
    v = r["verify"]
    assert v["codes_identical"] and v["passed"] and v["top1_agreement"] == 1.0
    assert 0 < v["max_abs_weight_diff_vs_reference"] < 1e-3  # fp16 dequantization arithmetic


def test_compressed_tensors_w8a8_int_quantized(tmp_path, tiny_tokenizer):
    run = make_run(tmp_path, tiny_tokenizer, wbits=8, group_size=-1, sym=True, abits=8)
    r = export(run, tmp_path / "ct", ExportConfig(format="compressed-tensors", verify=True))
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized" and r["verify"]["passed"]
    acts = cfg["config_groups"]["group_0"]["input_activations"]
    assert acts["num_bits"] == 8 and acts["dynamic"] and acts["strategy"] == "token"


def test_awq_run_exports_with_its_folded_norms(tmp_path, tiny_tokenizer):
    """AWQ changes norm weights as well as linears: the exported checkpoint must carry them,
    so the reloaded model's logits equal the quantized run's exactly."""
    run = make_run(tmp_path, tiny_tokenizer, method="awq", wbits=4, group_size=32)
    r = export(run, tmp_path / "g", ExportConfig(format="gptq", verify=True))
    v = r["verify"]
    assert v["codes_identical"] and v["passed"]
    assert v["max_abs_logit_diff_vs_reference"] == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v1_independent_reader_exact(tmp_path, tiny_tokenizer, bits):
    run = make_run(tmp_path, tiny_tokenizer, wbits=bits, group_size=32)
    cfg = ExportConfig(format="gptq", checkpoint_format="gptq", verify=True)
    r = export(run, tmp_path / "g", cfg)
    assert r["checkpoint_format"] == "gptq"
    v = r["verify"]
    assert v["codes_identical"] and v["passed"]
    assert v["max_abs_weight_diff_vs_reference"] == 0.0
    assert v["max_abs_logit_diff_vs_reference"] == 0.0
    qm = load_quantized(run)
    codes, zeros, scales, g_idx = read_gptq(tmp_path / "g")["model.layers.0.mlp.down_proj"]
    qw = qm.layers["model.layers.0.mlp.down_proj"]
    assert np.array_equal(scales, qw.scale.half().float().numpy())
    assert np.array_equal(g_idx, qw.g_idx.numpy())


def test_gptq_v1_zero_point_zero_shifted_exactly_or_refused(tmp_path, tiny_tokenizer):
    run = make_run(tmp_path, tiny_tokenizer, wbits=4, group_size=32)
    qm = load_quantized(run)
    from slimkit.export.gptq import v1_codes

    qw = qm.layers["model.layers.0.self_attn.q_proj"]
    qw.zero[0, 0] = 0.0  # a group whose zero is 0 and whose codes leave room: shift by one
    cols = (qw.g_idx == 0).nonzero().flatten()
    qw.codes[0, cols] = torch.clamp(qw.codes[0, cols], max=14)
    codes, zero, n = v1_codes(qw, "q")
    assert n >= 1 and zero.min() >= 1
    idx = qw.g_idx.long()
    assert torch.equal(codes.float() - zero[:, idx], qw.codes.float() - qw.zero[:, idx])
    qw.codes[0, cols[0]] = 15  # the top code is used: no exact shift exists
    with pytest.raises(SlimkitError, match="zero point 0"):
        v1_codes(qw, "q")


@pytest.mark.parametrize("bits", [3, 8])
def test_gptq_v2_asymmetric_default_round_trip_exact(tmp_path, tiny_tokenizer, bits):
    """An asymmetric run exports as GPTQ v2 by default (qzeros hold the zero point itself) and
    reads back bit for bit. Catches the default staying on v1 (which gptqmodel refuses for
    asymmetric files) and a v2 reader that still adds v1's 1."""
    run = make_run(tmp_path, tiny_tokenizer, wbits=bits, group_size=32)
    r = export(run, tmp_path / "g", ExportConfig(format="gptq", verify=True))
    v = r["verify"]
    assert r["checkpoint_format"] == "gptq_v2" and r["zero_groups_shifted"] == 0
    assert v["codes_identical"] and v["passed"]
    assert v["max_abs_weight_diff_vs_reference"] == 0.0
    assert v["max_abs_logit_diff_vs_reference"] == 0.0
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == qc["format"] == "gptq_v2" and qc["sym"] is False
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text()) == qc
    assert "checkpoint_format gptq_v2" in (tmp_path / "g" / "README.md").read_text()
    qw = load_quantized(run).layers["model.layers.0.mlp.down_proj"]
    codes, zeros, _, _ = read_gptq(tmp_path / "g")["model.layers.0.mlp.down_proj"]
    assert np.array_equal(zeros, qw.zero.numpy()) and np.array_equal(codes, qw.codes.numpy())


def test_gptq_v2_writes_zero_point_zero_that_v1_refuses(tmp_path, tiny_tokenizer):
    """v2 stores a zero point of 0 beside the top code as it is, where v1 (zero - 1) has no exact
    encoding and refuses. Catches the v2 path going through v1's shift / refusal."""
    from slimkit.export.gptq import GPTQExporter

    run = make_run(tmp_path, tiny_tokenizer, wbits=4, group_size=32)
    qm = load_quantized(run)
    qw = qm.layers["model.layers.0.self_attn.q_proj"]
    qw.zero[0, 0] = 0.0
    qw.codes[0, (qw.g_idx == 0).nonzero().flatten()[0]] = 15
    ex = GPTQExporter()
    with pytest.raises(SlimkitError, match="zero point 0"):
        (tmp_path / "v1").mkdir()
        ex.write(qm, ExportConfig(format="gptq", checkpoint_format="gptq"), tmp_path / "v1")
    (tmp_path / "v2").mkdir()
    assert (
        ex.write(qm, ExportConfig(format="gptq"), tmp_path / "v2")["checkpoint_format"] == "gptq_v2"
    )
    codes, zeros, _, _ = read_gptq(tmp_path / "v2")["model.layers.0.self_attn.q_proj"]
    assert np.array_equal(codes, qw.codes.numpy()) and np.array_equal(zeros, qw.zero.numpy())


def test_gptq_checkpoint_format_refusals(tmp_path):
    with pytest.raises(SlimkitError, match="auto, gptq or gptq_v2"):
        ExportConfig(format="gptq", checkpoint_format="gptq_v3")
    with pytest.raises(SlimkitError, match="--format gptq only"):
        ExportConfig(format="gguf", checkpoint_format="gptq_v2")
    d = tmp_path / "g"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"quantization_config": {"bits": 4, "checkpoint_format": "marlin"}})
    )
    with pytest.raises(SlimkitError, match="'marlin' is not one slimkit reads"):
        read_gptq(d)


@pytest.mark.parametrize(
    "sym,bits,kind", [(False, 4, "Q4_1"), (True, 4, "Q4_0"), (True, 8, "Q8_0")]
)
def test_gguf_transformers_reload_exact(tmp_path, tiny_tokenizer, sym, bits, kind):
    run = make_run(tmp_path, tiny_tokenizer, wbits=bits, group_size=32, sym=sym)
    out = tmp_path / "m.gguf"
    r = export(run, out, ExportConfig(format="gguf", verify=True))
    v = r["verify"]
    assert r["gguf_types"] == [kind]
    assert v["codes_identical"] and v["tokenizer_identical"] and v["passed"]
    assert (
        v["max_abs_weight_diff_vs_reference"] == 0.0 and v["max_abs_logit_diff_vs_reference"] == 0.0
    )
    import gguf

    reader = gguf.GGUFReader(str(out))
    t = {t.name: t for t in reader.tensors}
    assert t["blk.0.attn_q.weight"].tensor_type.name == kind
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    qm = load_quantized(run)
    assert ("output.weight" in t) == (not qm.model.config.tie_word_embeddings)
    assert reader.fields["general.architecture"].contents() == "llama"
    # gguf's own dequantizer reproduces slimkit's reference weight bit for bit
    name = "model.layers.1.mlp.up_proj"
    deq = gguf.quants.dequantize(
        np.asarray(t["blk.1.ffn_up.weight"].data), t["blk.1.ffn_up.weight"].tensor_type
    )
    want = gg.GGUFExporter().reference_weight(qm.layers[name], ExportConfig(format="gguf"))
    assert np.array_equal(deq, want.numpy())


def test_gguf_without_rope_permutation_fails_verification(tmp_path, tiny_tokenizer, monkeypatch):
    run = make_run(tmp_path, tiny_tokenizer, wbits=4, group_size=32)
    monkeypatch.setattr(gg, "rope_permutation", lambda n, h: torch.arange(n))
    with pytest.raises(SlimkitError, match="FAILED"):
        export(run, tmp_path / "m.gguf", ExportConfig(format="gguf", verify=True))
    assert (tmp_path / "m.gguf").exists()  # the files are kept for inspection


def test_refusals_name_settings_that_fit(tmp_path, tiny_tokenizer):
    run = make_run(tmp_path, tiny_tokenizer, name="g64", wbits=4, group_size=64)
    with pytest.raises(SlimkitError, match="group-size 32"):
        export(run, tmp_path / "m.gguf", ExportConfig(format="gguf"))
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()
    run3 = make_run(tmp_path, tiny_tokenizer, name="w3", wbits=3, group_size=32)
    with pytest.raises(SlimkitError, match="--format gptq"):
        export(run3, tmp_path / "ct", ExportConfig(format="compressed-tensors"))
    w4a4 = make_run(tmp_path, tiny_tokenizer, name="w4a4", wbits=4, group_size=32, abits=4)
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(SlimkitError, match="--weights-only"):
            export(w4a4, tmp_path / f"x-{fmt}", ExportConfig(format=fmt))
    r = export(w4a4, tmp_path / "w", ExportConfig(format="gptq", weights_only=True, verify=True))
    assert r["verify"]["passed"] and "Weights only" in (tmp_path / "w" / "README.md").read_text()
    with pytest.raises(SlimkitError, match="not a quantized slimkit run"):
        export(tmp_path / "nothing", tmp_path / "y", ExportConfig())


def test_killed_export_leaves_no_final_output(tmp_path, tiny_tokenizer, monkeypatch):
    from conftest import Crash, crash_on_call

    from slimkit.export.gptq import GPTQExporter

    run = make_run(tmp_path, tiny_tokenizer, wbits=4, group_size=32)
    crash_on_call(monkeypatch, GPTQExporter, "write", 1)
    with pytest.raises(Crash):
        export(run, tmp_path / "g", ExportConfig(format="gptq"))
    assert not (tmp_path / "g").exists()
    monkeypatch.undo()
    export(run, tmp_path / "g", ExportConfig(format="gptq"))  # a rerun replaces the leftover
    assert (tmp_path / "g" / "model.safetensors").is_file()
    assert not (tmp_path / "g.partial").exists()


def test_cli_export_and_generate(tmp_path, tiny_tokenizer, capsys):
    from slimkit.cli import main

    run = make_run(tmp_path, tiny_tokenizer, wbits=4, group_size=32)
    # the embedding kept as the run has it (F16), so the file must generate the run's very text;
    # with the default Q8_0 embedding a random tiny model's near-flat logits can pick other
    # tokens (that file's own reference is checked bit for bit by verify)
    out = str(tmp_path / "m.gguf")
    argv = ["export", str(run), "--format", "gguf", "--gguf-embeddings", "f16", "--out", out]
    assert main([*argv, "--verify"]) == 0
    assert "PASSED" in capsys.readouterr().out
    for target in (tmp_path / "m.gguf", run):
        assert main(["generate", str(target), "--prompt", "The city", "--max-new-tokens", "4"]) == 0
    outs = capsys.readouterr()
    texts = [line for line in outs.out.splitlines() if line.startswith("The city")]
    assert len(texts) == 2 and texts[0] == texts[1]  # the GGUF generates what the run generates
    assert "dequantized" in outs.err
    assert main(["export", str(run), "--format", "nope", "--out", str(tmp_path / "z")]) == 2


def test_f16_baseline_gguf_is_the_base_model(tmp_path, tiny_tokenizer, tiny_model_dir):
    """The speed baseline of `slimkit bench`: an F16 GGUF written from the run's base model."""
    import gguf
    from transformers import AutoModelForCausalLM

    from slimkit.export.runtime import write_f16_gguf
    from slimkit.llm.models import load_model

    run = tmp_path / "run"
    slimkit.cli.main(["quantize", str(tiny_model_dir), "--method", "rtn", "--wbits", "4",
                      "--group-size", "32", "--out", str(run)])  # fmt: skip
    export(run, tmp_path / "m.gguf", ExportConfig(format="gguf"))
    base = write_f16_gguf(tmp_path / "m.gguf", tmp_path / "f16.gguf")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(base)).tensors}
    assert types == {"F16", "F32"}
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="f16.gguf", dtype=torch.float32
    )
    ref, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float() if p.dim() > 1 else p)
        ids = random_ids(1, 16, len(tiny_tokenizer))
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "qwen2", "gpt2"])
def test_other_families(tmp_path, family):
    """OPT and Qwen2 (linear biases) export to compressed-tensors and GPTQ; GPT-2's Conv1D is
    refused; GGUF refuses OPT (no llama.cpp mapping) and a run without a tokenizer."""
    model = tiny_model(family)
    model, res = slimkit.quantize(
        model, slimkit.RTNConfig(wbits=4, group_size=32), random_ids(2, 16)
    )
    slimkit.save_quantized(model, None, tmp_path / "run", res)
    if family == "gpt2":
        with pytest.raises(SlimkitError, match="Conv1D"):
            export(tmp_path / "run", tmp_path / "ct", ExportConfig())
        return
    for fmt in ("compressed-tensors", "gptq"):
        r = export(tmp_path / "run", tmp_path / fmt, ExportConfig(format=fmt, verify=True))
        assert r["verify"]["passed"] and r["verify"]["codes_identical"]
    # GGUF: OPT has no llama.cpp mapping here; Qwen2 has one, but this run has no tokenizer
    with pytest.raises(SlimkitError, match="'opt'" if family == "opt" else "no tokenizer.json"):
        export(tmp_path / "run", tmp_path / "m.gguf", ExportConfig(format="gguf"))


def test_sparse24_bitmask_export_round_trip(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from slimkit.cli import main
    from slimkit.export.sparse24 import read_sparse24, two_four_mask
    from slimkit.llm.models import load_model

    run = tmp_path / "run"
    assert (
        main(
            [
                "prune",
                str(tiny_model_dir),
                "--method",
                "magnitude",
                "--sparsity",
                "2:4",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    r = export(run, tmp_path / "sp", ExportConfig(format="sparse-24", dtype="float32", verify=True))
    assert r["verify"]["passed"] and r["verify"]["sparse_weights_identical"]
    assert r["verify"]["max_abs_logit_diff_vs_reference"] == 0.0
    pruned, _ = load_model(str(run))
    state = load_file(tmp_path / "sp" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    w = pruned.get_submodule(name).weight.detach()
    assert state[f"{name}.compressed"].shape == (w.shape[0], w.shape[1] // 2)
    bits = np.unpackbits(state[f"{name}.bitmask"].numpy(), axis=-1, bitorder="little")[
        :, : w.shape[1]
    ]
    assert np.array_equal(bits.astype(bool), two_four_mask(w).numpy())  # independent decode
    assert torch.equal(read_sparse24(tmp_path / "sp")[name], w)
    cfg = json.loads((tmp_path / "sp" / "config.json").read_text())["quantization_config"][
        "sparsity_config"
    ]
    assert cfg["format"] == "sparse-24-bitmask" and cfg["sparsity_structure"] == "2:4"
    assert r["size_bytes"] < 0.75 * r["source_size_bytes"]


def test_sparse24_refuses_unstructured_and_quantized_runs(tmp_path, tiny_model_dir):
    from slimkit.cli import main

    base = ["prune", str(tiny_model_dir), "--method", "magnitude"]
    assert main([*base, "--sparsity", "0.5", "--out", str(tmp_path / "u")]) == 0
    with pytest.raises(SlimkitError, match="not 2:4 sparse"):
        export(tmp_path / "u", tmp_path / "x", ExportConfig(format="sparse-24"))
    assert main([*base, "--sparsity", "2:4", "--then", "rtn", "--wbits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0  # fmt: skip
    with pytest.raises(SlimkitError, match="marlin-24"):
        export(tmp_path / "q", tmp_path / "y", ExportConfig(format="sparse-24"))
    with pytest.raises(SlimkitError, match="not a pruned"):
        export(tiny_model_dir, tmp_path / "z", ExportConfig(format="sparse-24"))


def test_pack_unpack_property_over_random_shapes_and_grids():
    """canonical -> pack -> unpack -> canonical is the identity for every bits / group / symmetry,
    over random shapes (GPTQ packing with the independent reader; compressed-tensors packing with
    its own unpacker), and the dequantized weights equal slimkit's fake-quant exactly."""
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    from slimkit.quant.quantizer import QuantSpec, quantize_weight

    g = torch.Generator().manual_seed(0)
    for trial in range(24):
        bits = [2, 3, 4, 8][trial % 4]
        group = [-1, 32, 64, 128][(trial // 4) % 4]
        sym = bool(trial % 3 == 0)
        out = 8 * int(torch.randint(1, 9, (1,), generator=g))
        inp = 128 * int(torch.randint(1, 4, (1,), generator=g))
        w = torch.randn(out, inp, generator=g)
        qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group, sym=sym))
        # GPTQ layout (rows = input dim of the transposed codes)
        packed = pack_rows(qw.codes.T.contiguous(), bits)
        assert torch.equal(
            torch.from_numpy(unpack_rows_bitstream(packed.numpy(), bits, inp)).T, qw.codes
        )
        # compressed-tensors layout (4 and 8 bit are the ones it exports)
        if bits in (4, 8):
            signed = (qw.codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
            back = unpack_from_int32(pack_to_int32(signed, bits), bits, torch.Size(qw.codes.shape))
            assert torch.equal(back, signed)
        idx = qw.g_idx.long()
        deq = qw.scale[:, idx] * (qw.codes.float() - qw.zero[:, idx])
        assert torch.equal(deq, qw.dequantize())


def _gguf_run(tmp_path, tok, *, hidden=64, tied=False, name="emb", **kw):
    model = tiny_model("llama", vocab=len(tok), layers=1, hidden=hidden)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model, res = slimkit.quantize(model, slimkit.RTNConfig(**kw), random_ids(2, 16, len(tok)))
    d = tmp_path / name
    slimkit.save_quantized(model, tok, d, res)
    return d


@pytest.mark.parametrize(
    "hidden,tied,kw,choice,want",
    [
        # llama.cpp's rule: the output matrix (or a tied embedding) Q6_K when its width divides
        # by 256, else Q8_0; Q8_0 in a Q8_0 file; an untied embedding in the file's own type
        (64, True, dict(wbits=4, group_size=32), "llama.cpp", {"token_embd.weight": "Q8_0"}),
        (256, True, dict(wbits=4, group_size=32), "llama.cpp", {"token_embd.weight": "Q6_K"}),
        (256, True, dict(wbits=8, group_size=32, sym=True), "llama.cpp", {"token_embd.weight": "Q8_0"}),
        (256, False, dict(wbits=4, group_size=32, sym=True), "llama.cpp",
         {"token_embd.weight": "Q4_0", "output.weight": "Q6_K"}),
        (64, False, dict(wbits=4, group_size=32), "q8_0",
         {"token_embd.weight": "Q8_0", "output.weight": "Q8_0"}),
        (64, False, dict(wbits=4, group_size=32), "f16",
         {"token_embd.weight": "F16", "output.weight": "F16"}),
    ],
    ids=["tied-w64", "tied-w256", "q8_0-file", "untied-q4_0", "q8_0", "f16"],
)  # fmt: skip
def test_gguf_embedding_and_output_types_follow_llama_cpp(
    tmp_path, tiny_tokenizer, hidden, tied, kw, choice, want
):
    """Catches an export that keeps the embedding in F16 (files larger than llama.cpp's own for
    the same type: 124.9 vs 98.4 MB for SmolLM2 Q4_1) or picks another type than llama.cpp's
    quantizer, and a reference that does not dequantize them as a reader does (verify must pass
    with bit-identical logits)."""
    import gguf

    run = _gguf_run(tmp_path, tiny_tokenizer, hidden=hidden, tied=tied, **kw)
    out = tmp_path / "m.gguf"
    r = export(run, out, ExportConfig(format="gguf", verify=True, gguf_embeddings=choice))
    v = r["verify"]
    assert v["passed"] and v["max_abs_logit_diff_vs_reference"] == 0.0
    t = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert {k: t[k].tensor_type.name for k in want} == want
    assert ("output.weight" in t) == (not tied)


def test_gguf_q8_0_embedding_blocks_match_a_hand_computation(tmp_path, tiny_tokenizer):
    """Q8_0 as llama.cpp's quantize_row_q8_0_ref writes it, computed here from its definition:
    per block of 32 values d = max|x| / 127 (stored fp16) and q = roundf(x * (1 / d)) (int8), read from the
    file's bytes. Catches a wrong block layout, scale or rounding of the embedding."""
    import gguf

    run = _gguf_run(tmp_path, tiny_tokenizer, hidden=64, tied=True, wbits=4, group_size=32)
    out = tmp_path / "m.gguf"
    export(run, out, ExportConfig(format="gguf"))
    raw = np.asarray(
        {t.name: t for t in gguf.GGUFReader(str(out)).tensors}["token_embd.weight"].data
    )
    emb = load_quantized(run).model.model.embed_tokens.weight.detach().half().float().numpy()
    x = emb.reshape(-1, 32).astype(np.float32)
    d = np.abs(x).max(1) / 127
    inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
    v = x * inv[:, None].astype(np.float32)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # C roundf: halves away from 0
    blocks = raw.reshape(-1, 34)
    assert np.array_equal(blocks[:, :2].copy().view(np.float16)[:, 0], d.astype(np.float16))
    assert np.array_equal(blocks[:, 2:].copy().view(np.int8), q)


def test_gguf_quantized_embedding_makes_the_file_smaller_by_the_embedding_bytes(
    tmp_path, tiny_tokenizer
):
    """The default file is smaller than the F16-embedding one by exactly the embedding's F16 bytes
    minus its Q8_0 bytes (34 per 32 values), up to GGUF's 32-byte tensor alignment."""
    run = _gguf_run(tmp_path, tiny_tokenizer, hidden=64, tied=True, wbits=4, group_size=32)
    a, b = tmp_path / "q.gguf", tmp_path / "f.gguf"
    export(run, a, ExportConfig(format="gguf"))
    export(run, b, ExportConfig(format="gguf", gguf_embeddings="f16"))
    n = len(tiny_tokenizer) * 64
    saved = b.stat().st_size - a.stat().st_size
    assert abs(saved - (2 * n - n // 32 * 34)) <= 32


def test_bench_threads_default_to_the_idle_cores(monkeypatch):
    """Catches a fixed thread count on a busy machine (llama.cpp's timings then swing by an
    order of magnitude) and a count of 0 when the load exceeds the cores."""
    import os

    from slimkit.export import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for load, want in ((0.2, 4), (1.6, 2), (3.4, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert runtime.default_threads() == want, load
    assert runtime.BenchConfig().threads == 0
    with pytest.raises(SlimkitError, match="threads"):
        runtime.BenchConfig(threads=-1)


def test_bench_without_llama_cpp_names_the_portable_build(monkeypatch, tmp_path):
    """Catches an install hint that drifts from the Makefile's `llamacpp` target (a user copying
    it would get a -march=native build that can die with an illegal instruction)."""
    import re
    import sys

    from slimkit.export import runtime

    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert re.search(r"^LLAMACPP_CMAKE := (.*)$", make, re.M).group(1) == runtime.PORTABLE_CMAKE
    assert "llama-cpp-python==0.3.36" in re.search(r"^LLAMACPP := (.*)$", make, re.M).group(1)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(SlimkitError, match="make llamacpp") as e:
        runtime.bench_gguf(tmp_path / "m.gguf")
    assert runtime.PORTABLE_CMAKE in str(e.value)
