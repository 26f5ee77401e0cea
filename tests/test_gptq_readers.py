"""slimkit's GPTQ exports read by a GPTQ reader that is not slimkit's: gptqmodel's own loader and
torch kernel, and transformers' GPTQ path (optimum + gptqmodel), on the CPU.

Skipped where gptqmodel is not installed (it is not part of ``make``; ``make gptqmodel``
installs the pinned CPU build). The independent readers written from the format descriptions,
which run everywhere, are in test_mutations.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

gptqmodel = pytest.importorskip("gptqmodel")

import slimkit  # noqa: E402
from slimkit.export import ExportConfig, export, load_quantized  # noqa: E402
from slimkit.export.base import LOGIT_TOL, reference_model  # noqa: E402
from slimkit.export.gptq import GPTQExporter  # noqa: E402
from slimkit.quant.methods import config_class  # noqa: E402

# name -> (quantization settings, the checkpoint format the default export writes)
CASES = {
    "sym-w4-g32": (dict(method="rtn", wbits=4, group_size=32, sym=True), "gptq"),
    "asym-w4-g32": (dict(method="rtn", wbits=4, group_size=32), "gptq_v2"),
    "asym-w3-channel": (dict(method="rtn", wbits=3, group_size=-1), "gptq_v2"),
    "asym-w2-g64": (dict(method="rtn", wbits=2, group_size=64), "gptq_v2"),
    "asym-w8-g32": (dict(method="rtn", wbits=8, group_size=32), "gptq_v2"),
    # act-order: g_idx is a permutation of the groups, desc_act true in the config
    "gptq-act-order-asym-w4-g32": (
        dict(method="gptq", wbits=4, group_size=32, act_order=True, static_groups=False),
        "gptq_v2",
    ),
}


@pytest.fixture(autouse=True)
def no_torch_compile():
    """gptqmodel wraps its dequantization in torch.compile, which on the CPU compiles C++ for
    every layer shape (minutes on two cores); eager mode computes the same fp16 products."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _run(tmp_path, tok, kw):
    kw = dict(kw)
    cfg = config_class(kw.pop("method"))(**kw)
    model = tiny_model("llama", vocab=len(tok), layers=1)
    model, res = slimkit.quantize(model, cfg, random_ids(4, 32, len(tok)))
    slimkit.save_quantized(model, tok, tmp_path / "run", res)
    return tmp_path / "run"


def _reference(run, cfg):
    """slimkit's model with the stored fp16 scales (fp32 arithmetic) and its quantized layers."""
    qm = load_quantized(run)
    return reference_model(qm, GPTQExporter(), cfg).eval(), qm


def _relative_logit_diff(model, ref, ids) -> float:
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    return ((got - want).abs().max() / want.std()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_gptqmodel_loads_slimkit_gptq_exactly(tmp_path, tiny_tokenizer, case):
    """gptqmodel's own loader (GPTQModel.load, torch kernel, fp16) reads slimkit's export: every
    quantized linear dequantizes to exactly slimkit's weight (fp16 scales x (code - zero),
    rounded to fp16 as the kernel computes it), and the logits match slimkit's within fp16
    arithmetic. Catches v1 / v2 zero-point offsets that slimkit's own reader mirrors (the
    asymmetric v1 default that gptqmodel refused, v2 zeros written as zero - 1), packing order,
    3-bit words straddling, g_idx / desc_act, and config keys gptqmodel does not read."""
    from gptqmodel import BACKEND, GPTQModel

    kw, fmt = CASES[case]
    run = _run(tmp_path, tiny_tokenizer, kw)
    cfg = ExportConfig(format="gptq")
    assert export(run, tmp_path / "g", cfg)["checkpoint_format"] == fmt
    ref, qm = _reference(run, cfg)
    if "act-order" in case:
        assert any(qm.act_order(n) for n in qm.layers)  # the case is really exercised
    gm = GPTQModel.load(
        str(tmp_path / "g"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16
    )
    modules = dict(gm.model.named_modules())
    for name, qw in qm.layers.items():
        got = modules[name].dequantize_weight().float().T  # gptqmodel keeps (in, out)
        want = GPTQExporter().reference_weight(qw, cfg).half().float()
        assert torch.equal(got, want), (name, (got - want).abs().max().item())
    ids = random_ids(2, 16, len(tiny_tokenizer))
    assert _relative_logit_diff(gm.model, ref, ids) <= LOGIT_TOL / 2


def test_transformers_from_pretrained_loads_slimkit_gptq(tmp_path, tiny_tokenizer):
    """A plain ``AutoModelForCausalLM.from_pretrained(dir)`` (transformers' GPTQ quantizer, which
    goes through optimum and gptqmodel) loads slimkit's symmetric v1, asymmetric v2 (default)
    and asymmetric v1 (--checkpoint-format gptq: transformers reads it, gptqmodel's own loader
    refuses it) exports on the CPU with slimkit's logits."""
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    ids = random_ids(2, 16, len(tiny_tokenizer))
    for sym, fmt in ((True, "auto"), (False, "auto"), (False, "gptq")):
        run = _run(
            tmp_path / f"{sym}-{fmt}",
            tiny_tokenizer,
            dict(method="rtn", wbits=4, group_size=32, sym=sym),
        )
        cfg = ExportConfig(format="gptq", checkpoint_format=fmt)
        out = tmp_path / f"{sym}-{fmt}" / "g"
        export(run, out, cfg)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
        assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
        ref, _ = _reference(run, cfg)
        assert _relative_logit_diff(model, ref, ids) <= LOGIT_TOL / 2, (sym, fmt)
