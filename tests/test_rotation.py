"""Rotation front end: R1 (residual stream) and R4 (down-projection input) keep the function,
save / load, refusals, and the effect on 4-bit activations with outlier channels."""

import copy

import pytest
import torch

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.quant.api import attach_saved_activation_quantizers, quantize
from slimkit.quant.methods import AWQConfig, RTNConfig
from slimkit.quant.outliers import inject_outliers
from slimkit.quant.rotation import attach_down_rotation, orthogonal, rotate_model
from tests.conftest import random_ids, tiny_config, tiny_model


@pytest.mark.parametrize("kind,n", [("random", 48), ("hadamard", 64)])
def test_rotations_are_orthogonal_and_seeded(kind, n):
    q = orthogonal(n, kind, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal(n, kind, seed=3))
    assert not torch.equal(q, orthogonal(n, kind, seed=4))
    with pytest.raises(SlimkitError, match="power-of-two"):
        orthogonal(48, "hadamard")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_residual_and_down_rotations_keep_the_logits(family, tied):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval().double()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
    rotate_model(model, "hadamard", seed=1)
    attach_down_rotation(model, "random", seed=1)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert all(torch.equal(b.input_layernorm.weight, torch.ones(64)) for b in model.model.layers)
    with torch.no_grad():
        out = model(ids).logits
    # transformers computes RMSNorm in fp32 even in an fp64 model: fp32 round-off
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), float((out - ref).abs().max())


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_layernorm_families_take_the_down_rotation_but_refuse_the_residual_one(family):
    model = tiny_model(family)
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
    attach_down_rotation(model, "random")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-5, rtol=0)
    with pytest.raises(SlimkitError, match="RMSNorm"):
        rotate_model(model, "random")


def test_rotation_rescues_4bit_activations_with_outlier_channels():
    model = tiny_model("llama", layers=2)
    inject_outliers(model, fraction=0.05, k=50, seed=0)
    ids = random_ids(8, 32)
    with torch.no_grad():
        ref = model(ids).logits

    def err(**kw):
        m, _ = quantize(copy.deepcopy(model), RTNConfig(wbits=8, group_size=-1, abits=4, **kw))
        with torch.no_grad():
            return float((m(ids).logits - ref).pow(2).mean())

    plain, r1, r14 = err(), err(rotate="random"), err(rotate="random", rotate_down="random")
    assert r1 < 0.5 * plain and r14 < plain


def test_down_rotation_run_saves_loads_and_refuses_export(tmp_path, tiny_tokenizer):
    from slimkit.export import ExportConfig, export
    from slimkit.llm.models import load_model

    model = tiny_model("llama", layers=2, vocab=len(tiny_tokenizer))
    ids = random_ids(4, 32, len(tiny_tokenizer))
    cfg = AWQConfig(wbits=4, group_size=32, abits=8, rotate="random", rotate_down="random")
    q, res = quantize(model, cfg, ids)
    slimkit.save_quantized(q, tiny_tokenizer, tmp_path / "run", res)
    loaded, _ = load_model(str(tmp_path / "run"))
    meta = attach_saved_activation_quantizers(loaded, tmp_path / "run")
    assert meta["config"]["rotate_down"] == "random"
    with torch.no_grad():  # (a reloaded run matches to fp32 round-off, rotation or not)
        assert torch.allclose(loaded(ids).logits, q(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(SlimkitError, match="rotate-down"):
        export(tmp_path / "run", tmp_path / "x", ExportConfig(format="gptq"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("abits", [16, 8])
def test_a_reloaded_run_runs_its_own_attention_and_is_bit_identical(
    tmp_path, tiny_tokenizer, attn, abits
):
    """Bug: config.json does not keep the attention implementation, so a run quantized with eager
    attention came back with transformers' default (sdpa). Their fp32 round-off differs (~1e-7),
    and with 8-bit activations one code at a rounding tie flipped: logits off by ~1e-3, which
    failed the test above on some machines. The reload must be the same computation, bit for bit."""
    from slimkit.llm.models import load_model

    model = tiny_model("llama", layers=2, vocab=len(tiny_tokenizer))
    model.set_attn_implementation(attn)
    ids = random_ids(4, 32, len(tiny_tokenizer))
    cfg = AWQConfig(wbits=4, group_size=32, abits=abits, rotate="random", rotate_down="random")
    q, res = quantize(model, cfg, ids)
    slimkit.save_quantized(q, tiny_tokenizer, tmp_path / "run", res)
    loaded, _ = load_model(str(tmp_path / "run"))
    assert loaded.config._attn_implementation == "sdpa"  # what from_pretrained picks by itself
    meta = attach_saved_activation_quantizers(loaded, tmp_path / "run")
    assert meta["attn_implementation"] == attn == loaded.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_rotated_run_without_down_rotation_exports(tmp_path, tiny_tokenizer):
    from slimkit.export import ExportConfig, export

    model = tiny_model("llama", layers=2, vocab=len(tiny_tokenizer))
    q, res = quantize(model, RTNConfig(wbits=4, group_size=32, rotate="random"))
    slimkit.save_quantized(q, tiny_tokenizer, tmp_path / "run", res)
    r = export(tmp_path / "run", tmp_path / "g", ExportConfig(format="gptq", verify=True))
    assert r["verify"]["passed"] and r["verify"]["max_abs_logit_diff_vs_reference"] == 0.0


def test_rotated_tied_model_exports_to_gguf_with_its_own_output_head(tmp_path, tiny_tokenizer):
    """R1 unties a tied head (the head reads the rotated stream, the embedding writes it): the GGUF
    file must carry output.weight and reload to the reference logits."""
    import gguf
    from transformers import AutoModelForCausalLM

    from slimkit.export import ExportConfig, export

    cfg = tiny_config("llama", layers=2, vocab=len(tiny_tokenizer))
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    q, res = quantize(model, RTNConfig(wbits=4, group_size=32, rotate="random"))
    assert not q.config.tie_word_embeddings
    slimkit.save_quantized(q, tiny_tokenizer, tmp_path / "run", res)
    r = export(tmp_path / "run", tmp_path / "m.gguf", ExportConfig(format="gguf", verify=True))
    assert r["verify"]["passed"] and r["verify"]["max_abs_logit_diff_vs_reference"] == 0.0
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert "output.weight" in names and "token_embd.weight" in names


def test_rotation_flags_are_validated():
    with pytest.raises(SlimkitError, match="--rotate-down"):
        RTNConfig(rotate_down="hadamrd")


def test_rotation_of_a_pangu_pi_model_turns_its_augmented_shortcut_too():
    """PanGu-pi's augmented shortcut writes into the residual beside o_proj (block map's
    residual_writers): forgetting it would change the function."""
    from slimkit.tinylm.pangu_pi import PanguPiConfig, PanguPiForCausalLM

    torch.manual_seed(0)
    cfg = PanguPiConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, as_ratio=8,
    )  # fmt: skip
    model = PanguPiForCausalLM(cfg).eval().double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "as_up" in n:  # initialised at zero: make the shortcut matter
                p.normal_(0, 0.2)
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
    rotate_model(model, "random", seed=0)
    attach_down_rotation(model, "random", seed=0)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-5, rtol=0)


def test_check_rotation_refuses_up_front_what_cannot_be_applied():
    from slimkit.quant.rotation import check_rotation

    llama = tiny_model("llama", hidden=48)  # 48 and FFN 96: no Hadamard of that size
    check_rotation(llama, "random", "random")
    with pytest.raises(SlimkitError, match="power-of-two"):
        check_rotation(llama, "hadamard", "none")
    with pytest.raises(SlimkitError, match="power-of-two"):
        check_rotation(llama, "none", "hadamard")
    with pytest.raises(SlimkitError, match="RMSNorm"):
        check_rotation(tiny_model("opt"), "random", "none")
