import copy

import pytest
import torch

from slimkit import SlimkitError
from slimkit.llm.pipeline import BlockwisePipeline
from slimkit.prune import PRUNE_METHODS, MagnitudeConfig, SparseGPTConfig, WandaConfig, prune
from slimkit.prune.magnitude import magnitude_prune_weight
from slimkit.prune.sparsegpt import sparsegpt_prune_weight
from slimkit.prune.wanda import Wanda, wanda_prune_weight
from slimkit.quant.api import quantize
from slimkit.quant.methods import GPTQConfig
from slimkit.quant.obs import Sparsity
from tests.conftest import FAMILIES, random_ids, tiny_model


def _layer_case(seed=0, out=48, inp=64, n=2048):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    scales = torch.logspace(-1, 1, inp)[torch.randperm(inp, generator=g)]  # uneven input channels
    x = (
        torch.randn(n, inp, generator=g)
        * scales
        @ (torch.eye(inp) + torch.randn(inp, inp, generator=g) / inp)
    )
    return w, x


def _nonzeros_per_group(w, m):
    return (w != 0).reshape(w.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("sparsity", ["0.5", "0.3", "2:4", "4:8"])
def test_exact_sparsity_patterns(sparsity):
    w, x = _layer_case()
    sp = Sparsity.parse(sparsity)
    sq = x.pow(2).sum(0)
    H = 2 / x.shape[0] * x.T @ x
    outs = {
        "magnitude": magnitude_prune_weight(w, sp),
        "wanda": wanda_prune_weight(w, sq, sp),
        "sparsegpt": sparsegpt_prune_weight(w, H, sp, block_size=16)[0],
    }
    for name, p in outs.items():
        if sp.is_nm:
            assert torch.all(_nonzeros_per_group(p, sp.m) == sp.n), name
        elif name == "wanda":  # per output row
            assert torch.all((p == 0).sum(1) == int(64 * sp.ratio)), name
        else:  # per layer (magnitude) / per block of columns (sparsegpt)
            assert (p == 0).sum() == pytest.approx(w.numel() * sp.ratio, abs=48), name


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_layer_output(sparsity):
    w, x = _layer_case(seed=1)
    sp = Sparsity.parse(sparsity)
    H = 2 / x.shape[0] * x.T @ x

    def err(p):
        return float((x @ (w - p).T).pow(2).mean())

    e_mag = err(magnitude_prune_weight(w, sp))
    e_wanda = err(wanda_prune_weight(w, x.pow(2).sum(0), sp))
    e_sgpt = err(sparsegpt_prune_weight(w, H, sp)[0])
    assert e_wanda < e_mag and e_sgpt < e_mag
    assert e_sgpt < e_wanda  # the weight update helps on top of the mask


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged():
    w, x = _layer_case(seed=2)
    H = 2 / x.shape[0] * x.T @ x
    assert torch.allclose(sparsegpt_prune_weight(w, H, Sparsity(0.0))[0], w, atol=1e-5)


def test_wanda_with_constant_norms_is_per_row_magnitude():
    w, _ = _layer_case(seed=3)
    sp = Sparsity(0.5)
    assert torch.equal(
        wanda_prune_weight(w, torch.full((64,), 7.0), sp), magnitude_prune_weight(w, sp, "row")
    )


def test_masks_are_applied_before_the_next_block_sees_its_inputs():
    model = tiny_model("llama", layers=2)
    ids = random_ids(4, 16)
    seen = []

    class Spy(Wanda):
        def on_window(self, win):
            seen.append(win.inputs_q.all().clone())
            super().on_window(win)

    BlockwisePipeline(model, ids).run(Spy(WandaConfig(sparsity="0.5")))
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    h = model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    assert torch.allclose(seen[1], captured["x"], atol=1e-5)  # block 1 saw the pruned block 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [m for m in PRUNE_METHODS.names() if m != "structured"])
def test_every_pruner_on_every_family(family, method):
    model = tiny_model(family)
    ids = random_ids(4, 16)
    cfg = PRUNE_METHODS.meta(method)["config"](sparsity="2:4", batch_size=2)
    model, report = prune(model, cfg, ids)
    assert report["sparsity"]["overall_in_pruned_layers"] == pytest.approx(0.5, abs=1e-6)
    for name in report["sparsity"]["per_layer"]:
        w = dict(model.named_modules())[name].weight.data
        w = w.t() if family == "gpt2" else w
        assert torch.all(_nonzeros_per_group(w, 4) == 2), name


def test_joint_sparsegpt_quantization_and_gptq_after_pruning_keep_the_mask():
    ids = random_ids(4, 16)
    m, rep = prune(
        tiny_model("llama"), SparseGPTConfig(sparsity="2:4", wbits=4, group_size=32), ids
    )
    for name, rec in rep.records.items():
        w = rec.dequantize()
        assert torch.all(_nonzeros_per_group(w, 4) <= 2), name
        assert torch.equal(w, dict(m.named_modules())[name].weight.data)
    m, _ = prune(tiny_model("llama"), WandaConfig(sparsity="2:4"), ids)
    m, res = quantize(m, GPTQConfig(wbits=4, group_size=32, keep_zeros=True), ids)
    for name, rec in res.records.items():
        assert torch.all(_nonzeros_per_group(rec.dequantize(), 4) <= 2), name


def test_bad_sparsity():
    for bad, msg in [
        ("1.5", "in \\[0, 1\\)"),
        ("4:2", "0 < N < M"),
        ("half", "neither a ratio"),
        ("2:x", "integers"),
    ]:
        with pytest.raises(SlimkitError, match=msg):
            WandaConfig(sparsity=bad)
    with pytest.raises(SlimkitError, match="M=3 to divide the input width 64"):
        prune(tiny_model("llama"), MagnitudeConfig(sparsity="1:3"))
    with pytest.raises(SlimkitError, match="needs calibration data"):
        prune(tiny_model("llama"), WandaConfig())
    prune(copy.deepcopy(tiny_model("llama")), MagnitudeConfig())  # magnitude needs no data


def test_cli_prune_then_quantize(tiny_model_dir, tmp_path):
    import json

    from slimkit.cli import main

    small = [
        "--n-calib",
        "4",
        "--calib-seq-len",
        "32",
        "--batch-size",
        "2",
        "--ppl",
        "wiki-offline",
        "--seq-len",
        "64",
        "--max-windows",
        "2",
    ]
    out = tmp_path / "sgpt24w4"
    assert (
        main(
            [
                "prune",
                str(tiny_model_dir),
                "--method",
                "sparsegpt",
                "--sparsity",
                "2:4",
                "--then",
                "gptq",
                "--wbits",
                "4",
                *small,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "sparsegpt" and "2:4 + W4" in rep["scheme"]  # one joint pass
    assert json.loads((out / "sparsity.json").read_text())["overall_in_pruned_layers"] >= 0.5
    assert (out / "quant_state.safetensors").is_file()
    out2 = tmp_path / "wanda-rtn"
    assert (
        main(
            [
                "prune",
                str(tiny_model_dir),
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--then",
                "gptq",
                "--wbits",
                "4",
                "--group-size",
                "32",
                *small,
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["method"] == "wanda+gptq" and len(rep2["steps"]) == 2
    from safetensors.torch import load_file

    state = load_file(out2 / "model.safetensors")
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert float((q == 0).float().mean()) >= 0.5  # GPTQ after pruning kept the zeros
    assert "Pruned" in (out2 / "README.md").read_text()


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt", "gpt2"])
def test_structured_ffn_pruning_gives_a_smaller_model_transformers_loads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimkit.prune import StructuredConfig

    model = tiny_model(family)
    ids = random_ids(4, 16)
    dense = sum(p.numel() for p in model.parameters())
    key = {
        "llama": "intermediate_size",
        "qwen3": "intermediate_size",
        "opt": "ffn_dim",
        "gpt2": "n_inner",
    }[family]
    hidden = model.config.hidden_size if family != "gpt2" else model.config.n_embd
    width = getattr(model.config, key) or 4 * hidden
    removed = width // 4
    model, report = prune(model, StructuredConfig(sparsity="0.25", batch_size=2), ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    n = sum(p.numel() for p in loaded.parameters())
    assert n == report["parameters"] < dense
    assert getattr(loaded.config, key) == width - removed
    per_channel = hidden * (3 if family in ("llama", "qwen3") else 2) + (
        1 if family in ("opt", "gpt2") else 0
    )
    assert dense - n == 2 * removed * per_channel  # 2 blocks
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_structured_at_zero_keeps_the_function():
    from slimkit.prune import StructuredConfig

    model = tiny_model("llama")
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model, _ = prune(model, StructuredConfig(sparsity="0.0"), ids)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6)


def test_structured_keeps_the_most_important_channels():
    """A channel made dominant (large down-projection column) must survive."""
    from slimkit.prune import StructuredConfig

    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 100
    column = model.model.layers[0].mlp.down_proj.weight[:, 5].detach().clone()
    model, _ = prune(model, StructuredConfig(sparsity="0.9", score="magnitude"))
    kept = model.model.layers[0].mlp.down_proj.weight.detach()
    assert kept.shape[1] == 128 - 115
    assert any(torch.equal(kept[:, j], column) for j in range(kept.shape[1]))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_structured_head_pruning_removes_whole_kv_groups(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimkit.prune import StructuredConfig

    model = tiny_model(family)  # 4 query heads sharing 2 key/value heads
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dense = sum(p.numel() for p in model.parameters())
    ids = random_ids(4, 16)
    model, report = prune(model, StructuredConfig(sparsity="0.0", heads=0.5, batch_size=2), ids)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    n = sum(p.numel() for p in loaded.parameters())
    # per block: q and o lose 2 heads x hd x hidden each, k and v one head x hd x hidden each
    assert dense - n == 2 * (2 * 2 * hd + 2 * hd) * c.hidden_size == dense - report["parameters"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_structured_head_pruning_keeps_the_important_group():
    from slimkit.prune import StructuredConfig

    model = tiny_model("llama", layers=1)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # group 0 = query heads 0-1 = o_proj input columns 0..31
        attn.o_proj.weight[:, :32] *= 100
    q_kept = attn.q_proj.weight[:32].detach().clone()
    k_kept = attn.k_proj.weight[:16].detach().clone()
    model, _ = prune(model, StructuredConfig(sparsity="0.0", heads=0.5, score="magnitude"))
    assert torch.equal(attn.q_proj.weight, q_kept) and torch.equal(attn.k_proj.weight, k_kept)
    with pytest.raises(SlimkitError, match="smallest step"):
        prune(tiny_model("llama"), StructuredConfig(sparsity="0.0", heads=0.2, score="magnitude"))
    with pytest.raises(SlimkitError, match="Llama family"):
        prune(tiny_model("opt"), StructuredConfig(sparsity="0.0", heads=0.5, score="magnitude"))


def test_rotation_after_pruning_is_refused_before_any_work(tiny_model_dir, tmp_path):
    """A rotated weight is dense: --rotate after pruning would silently undo the sparsity."""
    from slimkit.core.errors import SlimkitError
    from slimkit.prune import WandaConfig
    from slimkit.quant.methods import RTNConfig
    from slimkit.workflows.llm import compress_run
    from slimkit.workflows.run_config import CalibConfig

    for kw in ({"rotate": "random"}, {"rotate_down": "random"}):
        with pytest.raises(SlimkitError, match="dense"):
            compress_run(
                str(tiny_model_dir),
                [WandaConfig(sparsity="0.5"), RTNConfig(wbits=4, group_size=32, **kw)],
                CalibConfig(n_calib=2, calib_seq_len=16),
                out=tmp_path / "x",
            )
    assert not (tmp_path / "x").exists()
