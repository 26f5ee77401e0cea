"""The block-wise pipeline on a model that is not a causal LM: its capture step comes from the
model adapter (the block map's ``feed``), so a ViT image encoder (SAM's) is quantized by the same
pipeline and methods as an LLM."""

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import encoder_block_map
from slimkit.llm.pipeline import BlockwisePipeline, PipelineOptions
from slimkit.quant.methods.gptq import GPTQ, GPTQConfig
from slimkit.quant.methods.rtn import RTN, RTNConfig
from slimkit.quant.methods.smoothquant import SmoothQuant, SmoothQuantConfig
from slimkit.sam.model import ImageEncoderViT


def _encoder(seed=0):
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=32, patch=8, dim=32, depth=2, heads=2, out_chans=16,
                          window=2, global_blocks=(1,))  # fmt: skip
    with torch.no_grad():
        enc.pos_embed.normal_(0, 0.1)
    return enc.eval()


def _images(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _bmap(enc):
    return encoder_block_map(enc, "blocks", pre_blocks=("patch_embed", "pos_embed"))


def test_encoder_adapter_finds_the_linears_of_a_vit_block():
    # catches: a walk that misses the attention's fused qkv or the MLP's linears
    names = [g[0] for g in _bmap(_encoder()).sequential]
    assert names == ["attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"]


def test_capture_caches_exactly_what_block_zero_receives():
    # catches: a capture step that still feeds token ids (or anything but the adapter's feed),
    # or caches the wrong tensor / shape for a 4-D (B, H, W, C) block input
    enc, imgs = _encoder(), _images()
    seen = []
    h = enc.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        enc(imgs)
    h.remove()
    pipe = BlockwisePipeline(enc, imgs, PipelineOptions(batch_size=4), block_map=_bmap(enc))
    store = pipe.capture()
    assert pipe.act_shape() == (4, 4, 32)
    torch.testing.assert_close(store.get(0, 6), seen[0], rtol=0, atol=0)


def _out_err(enc, ref, imgs):
    with torch.no_grad():
        return float((enc(imgs) - ref).pow(2).mean())


def test_gptq_on_a_vit_encoder_lands_on_the_grid_and_beats_rtn():
    # catches: GPTQ statistics gathered from the wrong inputs (then it does not beat RTN),
    # and weights that are not written back on the 4-bit grid
    imgs = _images(16)
    ref_model = _encoder()
    with torch.no_grad():
        ref = ref_model(imgs)
    errs = {}
    for name, method in (("rtn", RTN(RTNConfig(wbits=3, group_size=16))),
                         ("gptq", GPTQ(GPTQConfig(wbits=3, group_size=16)))):  # fmt: skip
        enc = _encoder()
        pipe = BlockwisePipeline(enc, imgs, PipelineOptions(batch_size=8), block_map=_bmap(enc))
        pipe.run(method)
        assert set(pipe.records) == {
            f"blocks.{b}.{n}"
            for b in range(2)
            for n in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
        }
        w = enc.blocks[0].mlp.lin1.weight.detach()
        for row in w.reshape(-1, 16)[:20]:  # each group of 16 holds at most 2**3 levels
            assert row.unique().numel() <= 8
        errs[name] = _out_err(enc, ref, imgs)
    assert 0 < errs["gptq"] < errs["rtn"]


def test_smoothquant_on_an_encoder_skips_the_fold_it_cannot_make_and_says_so(caplog):
    # catches: a method reading an LLM config the encoder does not have, or smoothing scales
    # applied without a declared exact fold (the output would then drift far beyond W8A8's error)
    enc, imgs = _encoder(), _images(8)
    with torch.no_grad():
        ref = enc(imgs)
    pipe = BlockwisePipeline(enc, imgs, block_map=_bmap(enc))
    with caplog.at_level("WARNING", logger="slimkit"):
        pipe.run(SmoothQuant(SmoothQuantConfig(wbits=8, abits=16)))
    assert "smoothing skipped" in caplog.text
    assert len(pipe.records) == 8
    assert _out_err(enc, ref, imgs) < 1e-3 * float(ref.pow(2).mean())


def test_bad_encoder_inputs_are_refused_in_one_line():
    enc = _encoder()
    with pytest.raises(SlimkitError, match="calibration inputs"):
        BlockwisePipeline(enc, torch.zeros(0, 3, 32, 32), block_map=_bmap(enc))
    with pytest.raises(SlimkitError, match="ModuleList of blocks at 'layers'"):
        encoder_block_map(enc, "layers")
