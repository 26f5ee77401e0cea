"""llama.cpp's scale search (``--clip llama.cpp``, the default on GGUF grids) against llama.cpp.

The reference is llama.cpp's own quantizer. ``tests/data/kquant_llamacpp.npz`` holds the bytes
that ``ggml_quantize_chunk`` (llama-cpp-python 0.3.36's libggml, no importance matrix) wrote for
fixed fp16 weights. ``tests/data/make_kquant_reference.py`` regenerates it. Where
llama-cpp-python is installed, a second test quantizes fresh random weights with it live.

Mutations of ``slimkit/quant/kquant_search.py`` that ``test_k_quants_are_llama_cpps_values``
catches (each was applied, the test failed, the file was restored):

1. ``make_qkx2``: drop the ``this_min > 0`` clamp (``pos`` always False). Fails on Q2_K, Q4_K
   and Q5_K.
2. Q4_K / Q5_K weights ``|x|`` without ``rms(x)``. Fails on Q4_K and Q5_K.
3. ``make_q3``: no refinement passes (``range(0)``). Fails on Q3_K.
4. ``make_qx_rmse1``: no step search (``range(-9, -9)``). Fails on Q6_K.
5. Super-block scale codes from the fp16 d (``round(scale / d)``) instead of ``63 / max_scale``.
   Fails on Q4_K / Q5_K.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.quant import gguf_grids as G

DATA = Path(__file__).parent / "data" / "kquant_llamacpp.npz"
K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def _dequant(raw: np.ndarray, name: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, name.upper()))


def _ours(w: np.ndarray, name: str, clip: str = "llama.cpp") -> tuple[np.ndarray, np.ndarray]:
    raw, values = G.quantize_tensor(torch.from_numpy(w.astype(np.float32)), name, clip)
    return raw, values.numpy()


@pytest.fixture(scope="module")
def ref():
    return np.load(DATA)


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quants_are_llama_cpps_values(ref, name):
    """Every weight slimkit stores equals the value in llama.cpp's file, and slimkit's bytes
    dequantize (through gguf's own dequantizer) to exactly those values."""
    w = ref["weights"]
    raw, values = _ours(w, name)
    theirs = _dequant(ref[name], name)
    assert np.array_equal(values, theirs)
    assert np.array_equal(_dequant(raw, name), theirs)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_take_llama_cpps_scales(ref, name):
    """Q4_0 .. Q8_0: the fp16 block scale (and Q4_1 / Q5_1's min) bytes equal llama.cpp's. The
    codes are rounded on the stored fp16 grid (llama.cpp rounds on its fp32 step), so a few
    differ; the error is never larger than llama.cpp's."""
    w = ref["weights"].astype(np.float32)
    raw, values = _ours(w, name)
    t = G.ggml_type(name)
    head = 4 if t.offset else 2
    ours = raw.reshape(-1, t.block_bytes)[:, :head]
    theirs = ref[name].reshape(-1, t.block_bytes)[:, :head]
    assert np.array_equal(ours, theirs)
    err = ((values - w) ** 2).sum()
    assert err <= ((_dequant(ref[name], name) - w) ** 2).sum() * (1 + 1e-6)


@pytest.mark.parametrize("name", K_TYPES)
def test_the_search_beats_the_plain_range(ref, name):
    """Ordering: llama.cpp's search stores a smaller weight error than slimkit's min-max fit."""
    w = ref["weights"].astype(np.float32)
    err = {c: ((_ours(w, name, c)[1] - w) ** 2).sum() for c in ("llama.cpp", "minmax")}
    assert err["llama.cpp"] < err["minmax"]


@pytest.mark.parametrize("name", ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1", "q5_1"))
def test_live_llama_cpp_on_fresh_weights(name):
    """Where llama-cpp-python is installed: fresh random weights, compared to its libggml."""
    pytest.importorskip("llama_cpp")
    import sys

    sys.path.insert(0, str(DATA.parent))
    from make_kquant_reference import ggml_quantizer

    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 768, generator=g) * torch.rand(48, 1, generator=g) * 0.1
    w = (w + 0.02 * torch.randn(48, 768, generator=g) ** 3).half().float().numpy()
    theirs = _dequant(ggml_quantizer()(w, name), name)
    values = _ours(w, name)[1]
    if name in K_TYPES:
        assert np.array_equal(values, theirs)
    else:
        assert ((values - w) ** 2).sum() <= ((theirs - w) ** 2).sum() * (1 + 1e-6)


def test_clip_auto_is_the_search_on_gguf_grids_only():
    from slimkit.quant.methods.rtn import RTNConfig

    assert RTNConfig(grid="llama.cpp:q4_k_m").clip == "llama.cpp"
    assert RTNConfig(grid="gguf:q3_k").weight_spec().clip == "llama.cpp"
    assert RTNConfig(wbits=4).clip == "minmax"
    assert RTNConfig(grid="gguf:q4_k", clip="minmax").clip == "minmax"
    with pytest.raises(SlimkitError, match="needs --grid"):
        RTNConfig(wbits=4, clip="llama.cpp")


def test_rtn_on_a_gguf_grid_stores_llama_cpps_values(ref):
    """The method path: RTN's config on a GGUF grid (clip auto) quantizes a weight to the values
    of llama.cpp's own file."""
    from slimkit.quant.methods.rtn import RTNConfig
    from slimkit.quant.quantizer import quantize_weight

    w = torch.from_numpy(ref["weights"].astype(np.float32))
    qw = quantize_weight(w, RTNConfig(grid="gguf:q4_k").weight_spec())
    assert np.array_equal(qw.dequantize().numpy(), _dequant(ref["q4_k"], "q4_k"))
