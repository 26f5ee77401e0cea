import pytest
import torch

from slimkit.quant.methods.gptq import gptq_quantize
from slimkit.quant.quantizer import QuantSpec, quantize_weight


def _correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scales = torch.linspace(0.2, 3.0, d)
    return (torch.randn(n, d, generator=g) * scales) @ mix


def _out_err(x, w, w_hat):
    return float((x @ (w - w_hat).T).pow(2).mean())


@pytest.mark.parametrize("bits,group", [(4, -1), (3, 16), (2, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(bits, group, act_order):
    torch.manual_seed(1)
    w = torch.randn(48, 64)
    x = _correlated_inputs()
    H = 2 / x.shape[0] * x.T @ x
    spec = QuantSpec(bits=bits, group_size=group)
    rtn = quantize_weight(w, spec).dequantize()
    gq = gptq_quantize(w, H, spec, act_order=act_order, block_size=16)
    assert _out_err(x, w, gq.dequantize()) < 0.8 * _out_err(x, w, rtn)


def test_identity_hessian_equals_rtn():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    for spec in (QuantSpec(4, -1), QuantSpec(3, 16), QuantSpec(4, 32, sym=True)):
        gq = gptq_quantize(w, torch.eye(64), spec, act_order=False)
        assert torch.equal(gq.codes, quantize_weight(w, spec).codes)


def test_huge_dampening_equals_rtn_up_to_ties():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    x = _correlated_inputs(d=64)
    H = x.T @ x / x.shape[0]
    spec = QuantSpec(4, 16)
    gq = gptq_quantize(w, H, spec, damp=1e8, act_order=False)
    same = (gq.codes == quantize_weight(w, spec).codes).float().mean()
    assert same > 0.999


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_groups_are_consistent(static_groups):
    torch.manual_seed(4)
    w = torch.randn(8, 64)
    x = _correlated_inputs(d=64)
    H = x.T @ x / x.shape[0]
    gq = gptq_quantize(w, H, QuantSpec(4, 16), act_order=True, static_groups=static_groups)
    # every group index used exactly group_size times; static groups keep contiguous groups
    assert torch.equal(torch.bincount(gq.g_idx.long()), torch.full((4,), 16))
    if static_groups:
        assert torch.equal(gq.g_idx, (torch.arange(64) // 16).to(torch.int32))
    assert gq.dequantize().shape == w.shape
    assert _out_err(x, w, gq.dequantize()) < _out_err(
        x, w, quantize_weight(w, QuantSpec(4, 16)).dequantize()
    )


def test_dead_inputs_are_zeroed():
    w = torch.randn(4, 32)
    H = torch.eye(32)
    H[5, 5] = 0
    gq = gptq_quantize(w, H, QuantSpec(4, -1), act_order=False)
    assert torch.allclose(
        gq.dequantize()[:, 5], torch.zeros(4), atol=float(gq.scale.max()) / 2 + 1e-6
    )
