"""Decoder families without a hand-written block map: the map inferred from the model, Gemma's
(1 + w) norms and per-layer-type block inputs, and a sweep that quantizes a tiny random model of
every enrolled transformers model type with every method, saves it and reloads it.

Families are enrolled by model type in ``SWEEP`` (built from a tiny config, no hub); a family
that cannot be supported goes in ``REFUSED`` with the words its refusal must contain.
"""

import copy

import pytest
import torch

from slimkit import SlimkitError
from slimkit.export import ExportConfig, export
from slimkit.llm.block_maps import block_map_for, get_module
from slimkit.llm.folds import norm_factor_offset
from slimkit.llm.infer_map import infer_block_map
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline, PipelineOptions
from slimkit.quant.api import load_saved, quantize, save_quantized
from slimkit.quant.methods import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig
from slimkit.quant.methods.cbq.config import CBQConfig
from slimkit.quant.methods.smoothquant import fold_scales
from slimkit.quant.rotation import rotate_model
from tests.conftest import random_ids, tiny_model

H = 64


def family_config(mt: str, vocab: int = 256):
    import transformers as tf

    base = dict(
        vocab_size=vocab,
        hidden_size=H,
        intermediate_size=2 * H,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    sliding = dict(head_dim=16, sliding_window=8)
    if mt == "gemma":
        return tf.GemmaConfig(**base, head_dim=16)
    if mt == "gemma2":
        return tf.Gemma2Config(**base, **sliding)
    if mt == "gemma3_text":  # sliding, full, sliding: block 0's inputs are wrong for block 1
        types = ["sliding_attention", "full_attention", "sliding_attention"]
        return tf.Gemma3TextConfig(**{**base, "num_hidden_layers": 3}, **sliding, layer_types=types)
    if mt == "phi3":
        return tf.Phi3Config(**base, pad_token_id=0)
    if mt == "gpt_neox":
        return tf.GPTNeoXConfig(**{k: v for k, v in base.items() if k != "num_key_value_heads"})
    if mt == "olmo2":
        return tf.Olmo2Config(**base, pad_token_id=0)
    if mt == "mixtral":
        return tf.MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2)
    if mt == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=H,
            shared_expert_intermediate_size=H,
        )  # fmt: skip
    if mt == "gpt_oss":
        return tf.GptOssConfig(**{**base, "intermediate_size": H}, head_dim=16, num_local_experts=4)
    if mt == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=H
        )
    raise ValueError(mt)


def family_model(mt: str, seed: int = 0, vocab: int = 256):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = family_config(mt, vocab)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


SWEEP = [
    "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2", "mixtral", "qwen2_moe",
    "qwen3_moe",
]  # fmt: skip
# biased fused experts (GPT-OSS) are not of the form the per-expert loop reproduces
REFUSED = {"gpt_oss": "fused-experts module of an unknown form"}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}  # attention / MLP outputs pass a norm first
FIELDS = (
    "blocks", "sequential", "smooth", "smooth_linear", "inspect", "score_linears",
    "residual_writers", "transposed",
)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "opt", "gpt2"])
def test_inferred_map_equals_the_hand_written_one(family):
    """Catches an inference that groups, pairs or orders linears differently from the maps the
    supported families were validated with (e.g. a norm paired with the wrong linears, a
    fused q/k/v not recognised as a score linear, q/k/v taken for residual writers)."""
    m = tiny_model(family)
    hand = block_map_for(m)
    inferred = infer_block_map(m)
    for f in FIELDS:
        assert getattr(inferred, f) == getattr(hand, f), f
    exists = [p for p in hand.pre_blocks + hand.post_blocks if get_module(m, p) is not None]
    assert list(inferred.pre_blocks + inferred.post_blocks) == exists


def test_only_exact_linear_folds_are_kept():
    """gate -> down and q -> o have matching widths, so only the trial fold tells them from
    up -> down and v -> o; OPT's fc1 -> fc2 goes through a ReLU, which takes positive scales but
    not every scale. Catches a fold check that accepts every shape-compatible pair."""
    pairs = infer_block_map(tiny_model("llama")).smooth_linear
    assert [p[:2] for p in pairs] == [
        ("self_attn.v_proj", "self_attn.o_proj"),
        ("mlp.up_proj", "mlp.down_proj"),
    ]
    assert infer_block_map(tiny_model("opt")).smooth_linear == (
        ("self_attn.v_proj", "self_attn.out_proj", "attn"),
    )


def test_post_ln_opt_has_no_norm_fold():
    """OPT-350m's post-LN blocks read the residual directly: no norm fold may be inferred."""
    m = tiny_model("opt")
    m.config.do_layer_norm_before = False
    for layer in m.model.decoder.layers:
        layer.do_layer_norm_before = False
    assert infer_block_map(m).smooth == ()


@pytest.mark.parametrize("mt", ["gemma2", "gemma3_text"])
def test_gemma_norm_pairs_and_post_norms(mt):
    """Gemma-2/3: q/k/v read input_layernorm, gate/up read pre_feedforward_layernorm
    (post_attention_layernorm normalises the attention output: Llama's pairing would be wrong);
    o_proj / down_proj reach the residual only through post-norms."""
    bm = block_map_for(family_model(mt))
    assert dict(bm.smooth) == {
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    }
    assert bm.residual_writers == ()
    assert bm.post_norms == (
        ("self_attn.o_proj", "post_attention_layernorm"),
        ("mlp.down_proj", "post_feedforward_layernorm"),
    )


def test_gemma_norm_fold_updates_one_plus_w():
    """Gemma's RMSNorm computes x * (1 + w): a fold must write w <- (1 + w) / s - 1. Catches the
    Llama update w <- w / s (the block's output moves) and a wrong offset probe."""
    m = family_model("gemma3_text")
    block = m.model.layers[0]
    with torch.no_grad():
        block.input_layernorm.weight.normal_(0, 0.3)
    norm = block.input_layernorm
    assert norm_factor_offset(norm) == 1.0
    assert norm_factor_offset(tiny_model("llama").model.layers[0].input_layernorm) == 0.0
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = m(ids).logits
        s = torch.rand(H, generator=torch.Generator().manual_seed(0)) + 0.5
        fold_scales(
            norm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj], s, False
        )
        out = m(ids).logits
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


def test_rotation_on_gemma_and_refused_behind_post_norms():
    """Gemma (no post-norms): the residual rotation preserves the function only if the norms
    are reset to w = 0 (their factor 1 + w = 1), not 1; Phi-3's fused qkv rotates like q/k/v.
    Gemma-2/3 and OLMo-2 are refused, naming the post-norms."""
    for mt in ("gemma", "phi3"):
        m = family_model(mt)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.normal_(0, 0.3)
        ids = random_ids(2, 16)
        with torch.no_grad():
            ref = m(ids).logits
            rotate_model(m, "random", seed=0)
            out = m(ids).logits
        target = 0.0 if mt == "gemma" else 1.0
        assert (m.model.layers[0].input_layernorm.weight == target).all(), mt
        assert (out - ref).abs().max() < 1e-3 * ref.abs().max(), mt
    for mt in sorted(POST_NORM):
        with pytest.raises(SlimkitError, match="post-norms"):
            rotate_model(family_model(mt), "random")


@pytest.mark.parametrize("mt", ["gemma2", "gemma3_text"])
def test_block_inputs_are_captured_per_layer_type(mt):
    """Sliding-window and full-attention blocks take different masks (and, in Gemma-3, rotary
    tables): the pipeline's stream must equal the model's own hidden states. Catches block 0's
    inputs replayed for every block (the full-attention block then sees a sliding mask). CBQ's
    windowed forward calls blocks through the same ``call_block``."""
    m = family_model(mt)
    ids = random_ids(3, 32)
    with torch.no_grad():
        want = m(ids, output_hidden_states=True).hidden_states[-1]
    pipe = BlockwisePipeline(m, ids, PipelineOptions(batch_size=2)).run(BlockwiseMethod())
    with torch.no_grad():
        got = m.model.norm(pipe.outputs.all())
    assert set(pipe.type_inputs) == {"sliding_attention", "full_attention"}
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("mt", sorted(REFUSED))
def test_unsupported_family_is_refused_naming_what_is_missing(mt):
    """Fused experts of a form the per-expert loop does not reproduce (biases, other
    activations) would be quantized wrongly or only half: refused, naming the module."""
    with pytest.raises(SlimkitError, match=REFUSED[mt]):
        quantize(family_model(mt), RTNConfig(wbits=4, group_size=16))


def test_moe_experts_are_quantized_one_by_one():
    """Each expert's slice of the fused [experts, out, in] tensor is a linear of its own, in its
    own GPTQ group (it reads only the tokens routed to it), and the MoE block still computes
    what transformers computes. Catches experts left in full precision and experts grouped
    together (one Hessian for tokens that never reach most of them)."""
    m = family_model("mixtral")
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = m(ids).logits
    bm = block_map_for(m)
    experts = [g for g in bm.sequential if "experts" in g[0]]
    assert experts == [(f"mlp.experts.{r}.{e}",) for r in ("gate_up", "down") for e in range(4)]
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, ref, atol=1e-5)  # the per-expert loop is exact
    with pytest.raises(SlimkitError, match="IndexAddBackward"):  # the routed sum is no linear
        rotate_model(m, "random")


def test_an_expert_no_token_reaches_falls_back_to_rtn_and_is_reported():
    """Expert 3's router row is 0 and rows 0 / 1 are v / -v: one of them always scores >= 0, so
    with top-1 routing no token reaches expert 3. Its Hessian is zero: GPTQ must round it to
    nearest (not zero its weights, as a zero Hessian's dead columns would) and the report must
    name it."""
    m = family_model("mixtral")
    for layer in m.model.layers:
        layer.mlp.gate.top_k = 1
        w = layer.mlp.gate.weight.data
        v = torch.randn(w.shape[1])
        w[0], w[1], w[3] = v, -v, 0
    rtn, _ = quantize(copy.deepcopy(m), RTNConfig(wbits=3, group_size=16))
    gptq, result = quantize(m, GPTQConfig(wbits=3, group_size=16), random_ids(8, 32))
    names = [f"model.layers.{i}.mlp.experts.{r}.3" for i in range(2) for r in ("down", "gate_up")]
    assert result["rtn_fallback"] == names
    for i in range(2):
        e_rtn, e_gptq = rtn.model.layers[i].mlp.experts, gptq.model.layers[i].mlp.experts
        assert torch.equal(e_gptq.down_proj[3], e_rtn.down_proj[3])
        assert torch.equal(e_gptq.gate_up_proj[3], e_rtn.gate_up_proj[3])
        assert not torch.equal(e_gptq.down_proj[0], e_rtn.down_proj[0])  # seen: GPTQ's own


def _methods():
    return {
        "rtn": RTNConfig(wbits=3, group_size=16),
        "gptq": GPTQConfig(wbits=3, group_size=16, batch_size=4),
        "awq": AWQConfig(wbits=3, group_size=16, batch_size=4),
        "smoothquant": SmoothQuantConfig(wbits=8, abits=8, batch_size=4),
        "cbq": CBQConfig(wbits=3, group_size=16, epochs=1, train_batch_size=4, batch_size=4),
    }


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("mt", SWEEP)
def test_family_sweep(mt, tmp_path, one_thread, tiny_tokenizer):
    """Every method on a tiny random model of the family: finite output near the FP model's,
    GPTQ and AWQ not worse than RTN, saved and reloaded by transformers to the same logits.
    Catches a family whose inferred map breaks a method (a fold that changes the function, a
    linear left out, block inputs of the wrong layer type) or whose save does not reload."""
    fp = family_model(mt, vocab=len(tiny_tokenizer))
    calib = random_ids(8, 32, seed=1)
    ev = calib[:4]  # in-sample: where GPTQ and AWQ minimise their error on random models
    with torch.no_grad():
        ref = fp(ev).logits
    errs = {}
    for name, cfg in _methods().items():
        model, result = quantize(copy.deepcopy(fp), cfg, calib)
        with torch.no_grad():
            out = model(ev).logits
        assert torch.isfinite(out).all(), name
        errs[name] = _rel_err(out, ref)
        n_linears = len(block_map_for(fp).linears()) * fp.config.num_hidden_layers
        assert result["n_quantized_linears"] == n_linears, name  # no linear left out
        if name in ("gptq", "smoothquant"):  # one weight-only and one W8A8 format round trip
            d = tmp_path / name
            save_quantized(model, tiny_tokenizer, d, result)
            back, _, meta = load_saved(str(d))
            with torch.no_grad():
                assert (back(ev).logits - out).abs().max() < 1e-4, name
    # a packed format (4-bit compressed-tensors), read back and checked by the exporter
    model, result = quantize(copy.deepcopy(fp), RTNConfig(wbits=4, group_size=16))
    save_quantized(model, tiny_tokenizer, tmp_path / "w4", result)
    if mt in MOE:
        with pytest.raises(SlimkitError, match="fused mixture-of-experts"):
            export(tmp_path / "w4", tmp_path / "ct", ExportConfig(format="compressed-tensors"))
    else:
        fmt = ExportConfig(format="compressed-tensors", verify=True)
        v = export(tmp_path / "w4", tmp_path / "ct", fmt)["verify"]
        assert v["passed"] and v["codes_identical"], v
    assert errs["smoothquant"] < 0.01, errs  # W8A8
    assert max(errs.values()) < 0.5, errs
    assert errs["gptq"] <= errs["rtn"] * 1.05, errs
    assert errs["awq"] <= errs["rtn"] * 1.05, errs


def test_bos_starts_every_window_where_asked(tiny_tokenizer):
    """Gemma needs <bos> at position 0 of every sequence: with ``bos`` each calibration and
    evaluation window is <bos> + the next stream tokens (no token lost or repeated); a tokenizer
    of another family keeps the unchanged windows."""
    from slimkit.data.text import bos_prefix, calibration_windows, eval_windows

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.bos_token_id
    assert bos_prefix(tok) == []  # not a Gemma tokenizer
    plain = eval_windows(tok, "wiki-offline", 16, max_windows=3)
    ev = eval_windows(tok, "wiki-offline", 16, max_windows=3, bos=True)
    assert (ev[:, 0] == bos).all() and (plain[:, 0] != bos).all()
    assert ev[:, 1:].reshape(-1).tolist() == plain.reshape(-1)[:45].tolist()
    cal = calibration_windows(tok, "wiki-offline", 3, 16, bos=True)
    assert (cal[:, 0] == bos).all() and (cal[:, 1:] != bos).all()
    assert torch.equal(calibration_windows(tok, "wiki-offline", 3, 16)[0, :15], cal[0, 1:])


def test_cli_quantizes_a_gemma3_checkpoint(tmp_path, tiny_tokenizer):
    """The user's report: ``slimkit quantize DIR --method gptq`` (and cbq) on a Gemma-3
    checkpoint stopped with 'unsupported model family'."""
    from slimkit.cli import main

    src = tmp_path / "gemma3"
    m = family_model("gemma3_text")
    m.resize_token_embeddings(len(tiny_tokenizer))
    m.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    small = ["--wbits", "4", "--group-size", "16", "--n-calib", "4", "--calib-seq-len", "32"]
    for method in ("gptq", "cbq"):
        extra = ["--epochs", "1"] if method == "cbq" else []
        out = tmp_path / method
        assert (
            main(["quantize", str(src), "--method", method, *small, *extra, "--out", str(out)]) == 0
        )
        assert (out / "quant_state.safetensors").is_file()
