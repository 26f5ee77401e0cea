"""One registry of compression methods, dispatch on the config type, and the result object."""

import copy
import json

import pytest
import torch

import slimkit
from slimkit import SlimkitError
from slimkit.llm.compress import (
    COMPRESSION_METHODS,
    CompressionResult,
    method_for_config,
    register_compression_method,
)
from slimkit.llm.pipeline import BlockwiseMethod, PipelineFields
from slimkit.prune import PRUNE_METHODS
from slimkit.quant.methods import METHODS
from tests.conftest import random_ids, tiny_model


def test_one_registry_holds_every_quantization_and_pruning_method():
    """Catches a method registered in only one of two parallel registries (the CLI's method list
    and the Python dispatch would then disagree)."""
    from slimkit.sam.tinysam.quant import SAM_QUANT_METHODS

    assert COMPRESSION_METHODS.names() == sorted(
        METHODS.names() + PRUNE_METHODS.names() + SAM_QUANT_METHODS.names()
    )
    assert SAM_QUANT_METHODS.names() == ["q-tinysam"]
    assert {"gptq", "cbq", "awq", "rtn", "smoothquant"} <= set(METHODS.names())
    assert {"wanda", "sparsegpt", "magnitude"} <= set(PRUNE_METHODS.names())
    for name in METHODS.names():
        assert COMPRESSION_METHODS.meta(name)["kind"] == "quantization"
        assert method_for_config(METHODS.meta(name)["config"]()) == name
    for name in PRUNE_METHODS.names():
        assert COMPRESSION_METHODS.meta(name)["kind"] == "pruning"
    with pytest.raises(SlimkitError, match="unknown method 'wanda'"):
        METHODS.get("wanda")  # each view keeps its own kind and message
    with pytest.raises(SlimkitError, match="unknown pruning method 'gptq'"):
        PRUNE_METHODS.get("gptq")


def test_a_method_registered_once_is_seen_by_its_kind_and_by_compress():
    """A new kind (e.g. a SAM quantizer) registers once; its kind's view and the config-type
    dispatch see it, the other kinds do not."""
    from dataclasses import dataclass

    @dataclass
    class ToyConfig(PipelineFields):
        pass

    @register_compression_method("toy", ToyConfig, kind="toy", help="for this test")
    class Toy(BlockwiseMethod):
        pass

    try:
        toys = COMPRESSION_METHODS.where("toy method", kind="toy")
        assert toys.names() == ["toy"] and "toy" not in METHODS and "toy" not in PRUNE_METHODS
        assert method_for_config(ToyConfig()) == "toy" and Toy.method_name == "toy"
        with pytest.raises(SlimkitError, match="no entry point runs toy methods"):
            slimkit.compress(tiny_model(), ToyConfig())
    finally:
        COMPRESSION_METHODS._items.pop("toy")
        COMPRESSION_METHODS._meta.pop("toy")


def test_compress_dispatches_on_the_config_type():
    """Catches slimkit.compress sending a config to the wrong kind's entry point."""
    ids = random_ids(4, 16)
    base = tiny_model("llama")
    cfg = slimkit.GPTQConfig(wbits=4, group_size=32, batch_size=2)
    a, ra = slimkit.compress(copy.deepcopy(base), cfg, ids)
    b, rb = slimkit.quantize(copy.deepcopy(base), cfg, ids)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ra.records.keys() == rb.records.keys() and ra.sparsity is None
    _, rp = slimkit.compress(copy.deepcopy(base), slimkit.WandaConfig(sparsity="2:4"), ids)
    assert rp.sparsity["method"] == "wanda" and rp.quantization is None
    assert rp["sparsity"]["overall_in_pruned_layers"] == pytest.approx(0.5)

    class NotAConfig:
        pass

    with pytest.raises(SlimkitError, match="no compression method takes a NotAConfig"):
        slimkit.compress(base, NotAConfig())
    with pytest.raises(SlimkitError, match="no quantization method takes a WandaConfig"):
        slimkit.quantize(base, slimkit.WandaConfig())


def test_the_result_rides_beside_the_model_not_on_it(tmp_path, tiny_tokenizer):
    """Catches results stored as attributes on the model (a deep copy, a second quantization or a
    pruning step silently carried or replaced them) and a report that is no longer JSON."""
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    model, res = slimkit.quantize(model, slimkit.RTNConfig(wbits=4, group_size=32))
    assert isinstance(res, CompressionResult) and res["n_quantized_linears"] == len(res.records)
    assert not hasattr(model, "_slimkit_quant")
    assert "records" not in json.loads(json.dumps(res))  # the report: JSON, without tensors
    with pytest.raises(SlimkitError, match="no quantization result"):
        slimkit.save_quantized(model, tiny_tokenizer, tmp_path / "a", dict(res))
    slimkit.save_quantized(model, tiny_tokenizer, tmp_path / "b", res)
    saved = json.loads((tmp_path / "b" / "quantization.json").read_text())
    assert saved["method"] == "rtn" and set(saved["layers"]) == set(res.records)
