import copy

import pytest
import torch

from slimkit.llm.block_maps import block_map_for, get_blocks, get_module, weight_of
from slimkit.quant.api import quantize
from slimkit.quant.methods import RTNConfig, SmoothQuantConfig
from slimkit.quant.methods.smoothquant import fold_scales, smooth_scales
from tests.conftest import random_ids, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt", "gpt2"])
def test_folding_preserves_the_function_in_fp64(family):
    model = tiny_model(family).double()
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    bm = block_map_for(model)
    g = torch.Generator().manual_seed(0)
    for block in get_blocks(model, bm):
        for norm, consumers in bm.smooth:
            mods = [get_module(block, c) for c in consumers]
            amax = (
                torch.rand(
                    weight_of(mods[0], bm.transposed).shape[1], generator=g, dtype=torch.float64
                )
                * 10
            )
            s = smooth_scales(amax, [weight_of(m, bm.transposed) for m in mods], 0.5)
            fold_scales(get_module(block, norm), mods, s, bm.transposed)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)


def test_smoothquant_helps_w4a8_with_outlier_channels():
    """Activation outliers injected function-preservingly (norm weight up, consumer columns down):
    per-token A8 suffers, and SmoothQuant migrates the outliers into the weights."""
    model = tiny_model("llama", layers=2, hidden=64)
    with torch.no_grad():
        for block in model.model.layers:
            for norm, consumers in (
                (
                    block.input_layernorm,
                    [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj],
                ),
                (block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj]),
            ):
                s = torch.ones(64)
                s[[3, 17, 40]] = 60.0
                norm.weight.mul_(s)
                for m in consumers:
                    m.weight.div_(s)
    ids = random_ids(8, 32)
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    def err(cfg):
        m, _ = quantize(copy.deepcopy(model), cfg, ids)
        with torch.no_grad():
            return float((m(input_ids=ids).logits - ref).pow(2).mean())

    e_rtn = err(RTNConfig(wbits=8, group_size=-1, sym=True, abits=4))
    e_sq = err(SmoothQuantConfig(wbits=8, abits=4, alpha=0.5))
    assert e_sq < 0.5 * e_rtn
