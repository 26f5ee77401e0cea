import pytest

from slimkit import SlimkitError
from slimkit.llm.models import load_model, resolve_model_path


def test_embedded_smollm2_loads_and_quantizes():
    """The embedded default: dequantized once into the cache, then a real RTN W3 run."""
    import torch

    from slimkit import RTNConfig, perplexity, quantize
    from slimkit.data import eval_windows

    model, tok = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    windows = eval_windows(tok, "wiki-offline", 128, max_windows=2)
    fp = perplexity(model, windows)["ppl"]
    assert 3 < fp < 60
    with pytest.raises(SlimkitError, match="does not divide the input width 576"):
        quantize(model, RTNConfig(wbits=4, group_size=128))
    model, _ = quantize(model, RTNConfig(wbits=3, group_size=64))
    q = perplexity(model, windows)["ppl"]
    assert fp < q < 10 * fp and torch.isfinite(torch.tensor(q))


def test_hub_id_offline_fails_with_one_message():
    with pytest.raises(SlimkitError, match="could not load model 'HuggingFaceTB/SmolLM2-135M'"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_missing_directory():
    with pytest.raises(SlimkitError, match="not found"):
        resolve_model_path("./no/such/dir")
