import pytest
import torch

from slimkit import SlimkitError
from slimkit.quant.activations import ActSpec, quantize_activation
from slimkit.quant.quantizer import QuantSpec, fake_quant, fit_params, quantize, quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 0, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_and_error_bound(bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(12, 64)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    qw = quantize_weight(w, spec)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    w_hat = qw.dequantize()
    idx = qw.g_idx.long()
    scale = qw.scale[:, idx].expand_as(w)
    zero = qw.zero[:, idx].expand_as(w)
    # codes -> values -> codes with the same parameters is exact
    assert torch.equal(quantize(w_hat, scale, zero, bits).to(torch.uint8), qw.codes)
    # every weight inside the grid's range is within half a step of its grid point
    lo, hi = scale * (0 - zero), scale * (2**bits - 1 - zero)
    inside = (w >= lo - 1e-6) & (w <= hi + 1e-6)
    if not sym:  # the asymmetric min-max grid ends within half a step of the range ends
        inside[:] = True
    assert torch.all((w - w_hat).abs()[inside] <= scale[inside] / 2 + 1e-5)


def test_symmetric_zero_point_and_zero_exact():
    w = torch.randn(4, 32)
    w[:, 3] = 0
    qw = quantize_weight(w, QuantSpec(bits=4, group_size=-1, sym=True))
    assert torch.all(qw.zero == 8)
    assert torch.all(qw.dequantize()[:, 3] == 0)  # zero is on the grid


def test_all_zero_row_maps_to_unit_range():
    s, z = fit_params(torch.zeros(2, 8), QuantSpec(bits=4))
    assert torch.allclose(s, torch.full_like(s, 2 / 15))


def test_mse_clip_beats_minmax_in_its_norm():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[0, 0] = 20.0  # an outlier makes min-max wasteful
    errs = {}
    for clip in ("minmax", "mse"):
        w_hat = quantize_weight(w, QuantSpec(bits=3, group_size=-1, clip=clip)).dequantize()
        errs[clip] = ((w - w_hat).abs() ** 2.4).sum(dim=1)
    assert torch.all(errs["mse"] <= errs["minmax"] + 1e-6)
    assert errs["mse"][0] < errs["minmax"][0]


def test_ste_gradient_is_identity_inside_range():
    x = torch.tensor([-0.9, -0.3, 0.0, 0.5, 0.8, 5.0], requires_grad=True)
    s, z = torch.tensor(2 / 15), torch.tensor(8.0)  # grid [-8s, 7s] = [-1.07, 0.93]
    fake_quant(x, s, z, 4).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 1, 1, 1, 0]))  # clamped: no gradient


def test_per_token_activation_quant_error_bound():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 64)
    xq = quantize_activation(x, ActSpec(bits=8))
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((x - xq).abs() <= step / 2 + 1e-6)
    xa = quantize_activation(x, ActSpec(bits=4, sym=False))
    assert (
        (x - xa).abs().amax(-1, keepdim=True)
        <= (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    ).all()


@pytest.mark.parametrize("bad", [1, 9, 16])
def test_bits_out_of_range(bad):
    with pytest.raises(SlimkitError, match="2..8"):
        QuantSpec(bits=bad)


def test_group_size_must_divide():
    with pytest.raises(SlimkitError, match="does not divide the input width 576"):
        quantize_weight(torch.randn(4, 576), QuantSpec(bits=4, group_size=128))
