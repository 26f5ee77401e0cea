import argparse
import dataclasses
from pathlib import Path

import pytest

from slimkit import SlimkitError
from slimkit.core.config import add_arguments, from_args, from_dict, load_yaml, save_yaml, to_dict
from slimkit.quant.methods import METHODS, GPTQConfig, SmoothQuantConfig, config_class


@pytest.mark.parametrize("method", METHODS.names())
def test_config_yaml_cli_round_trip(method, tmp_path):
    cls = config_class(method)
    cfg = cls(wbits=3, group_size=64)
    path = tmp_path / "c.yaml"
    save_yaml(to_dict(cfg), path)
    assert from_dict(cls, load_yaml(path)) == cfg
    p = argparse.ArgumentParser()
    add_arguments(p, cls)
    ns = p.parse_args(["--wbits", "2", "--no-sym"])
    merged = from_args(cls, ns, to_dict(cfg))
    assert merged == dataclasses.replace(cfg, wbits=2, sym=False)  # typed flags override the recipe


def test_every_field_is_a_flag():
    p = argparse.ArgumentParser()
    add_arguments(p, SmoothQuantConfig)
    flags = {a.dest for a in p._actions}
    assert {f.name for f in dataclasses.fields(SmoothQuantConfig)} <= flags


def test_unknown_recipe_key_names_the_allowed_ones():
    with pytest.raises(SlimkitError, match="unknown key\\(s\\) \\['wbit'\\].*'wbits'"):
        from_dict(GPTQConfig, {"wbit": 4})


def test_invalid_values():
    with pytest.raises(SlimkitError, match="--damp must be > 0"):
        GPTQConfig(damp=0)
    with pytest.raises(SlimkitError, match="--alpha must be in"):
        SmoothQuantConfig(alpha=2)
    with pytest.raises(SlimkitError, match="unknown clip method"):
        GPTQConfig(clip="percentile")


@pytest.mark.parametrize(
    "recipe",
    sorted((Path(__file__).resolve().parents[1] / "recipes" / "cbq").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_quantize_recipes_build_their_configs(recipe):
    """Every key of a shipped recipe is an option of its method / calibration / evaluation
    config (a misspelt key would fail here, not on a user's machine)."""
    from slimkit.core.config import split_recipe
    from slimkit.workflows.run_config import CalibConfig, EvalConfig

    data = load_yaml(recipe)
    cls = config_class(data.pop("method"))
    q, c, e = split_recipe(data, [cls, CalibConfig, EvalConfig])
    cfg = from_dict(cls, q)
    from_dict(CalibConfig, c)  # raises on a bad calibration key or value
    from_dict(EvalConfig, e)
    assert {k: getattr(cfg, k) for k in q} == q
