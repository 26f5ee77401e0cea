"""Config dataclasses <-> dict / YAML <-> command-line flags, from one definition.

A method's config is a plain dataclass. Field metadata carries the help text and, for string
fields, the allowed values: ``field(default="minmax", metadata={"help": ..., "choices": [...]})``.
The CLI flags, the YAML recipe keys and the Python keyword arguments are the field names, so they
cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from slimkit.core.errors import SlimkitError


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        t = args[0]
    return t


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (YAML-safe values only)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def from_dict(cls: type, values: dict[str, Any], *, where: str = "config") -> Any:
    """Build ``cls`` from a dict, rejecting unknown keys with the list of allowed ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SlimkitError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; allowed: {sorted(names)}"
        )
    try:
        return cls(**values)
    except TypeError as e:
        raise SlimkitError(f"{where}: {e}") from None


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"recipe file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SlimkitError(f"recipe {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SlimkitError(f"recipe {p} must be a mapping of config keys to values")
    return data


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()
) -> None:
    """Add one ``--flag`` per dataclass field (``group_size`` -> ``--group-size``).

    Defaults are left as ``None`` in argparse so that only flags the user typed override a recipe.
    """
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", "")
        help_ = f"{help_} (default: {default})" if help_ else f"default: {default}"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_}
        if t is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        group.add_argument(flag, type=t if t in (int, float, str) else str, **kw)


def from_args(cls: type, ns: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """Merge a recipe dict (``base``) with the flags the user typed, then build ``cls``."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    return from_dict(cls, values, where="options")


def split_recipe(
    recipe: dict,
    classes: Sequence[type],
    *,
    extra: Sequence[str] = ("method", "model"),
    what: str = "recipe key",
) -> list[dict]:
    """Share a recipe's keys out over ``classes``: each key goes to the first class that has a
    field of that name. ``extra`` names the other keys the caller accepts (only for the message
    of an unknown key)."""
    parts: list[dict] = [{} for _ in classes]
    for k, v in recipe.items():
        for i, c in enumerate(classes):
            if k in {f.name for f in dataclasses.fields(c)}:
                parts[i][k] = v
                break
        else:
            allowed = sorted({f.name for c in classes for f in dataclasses.fields(c)} | set(extra))
            raise SlimkitError(f"{what} {k!r} is not an option of this method; allowed: {allowed}")
    return parts


# Presets are owned by the configs: a config class may define
#     PRESETS: ClassVar[dict[str, dict]] = {"fast": {"epochs": 1, "n_calib": 32}, ...}
# whose values may set fields of the configs it is used with (CBQ's presets also set the
# calibration size). A preset named on the command line (`--preset`), in a YAML recipe (`preset:`)
# or in Python (`from_preset`) resolves through `resolve_preset`, so the three cannot differ.


def preset_names(classes: Sequence[type]) -> list[str]:
    """The presets that any of ``classes`` defines."""
    return sorted({n for c in classes for n in getattr(c, "PRESETS", {})})


def resolve_preset(name: str, classes: Sequence[type]) -> list[dict]:
    """The values preset ``name`` gives each of ``classes`` (one dict per class).

    Where two classes set one key, the earlier class wins: a command lists its method config
    before the calibration config, so CBQ's `demo` calibration length beats the generic one.
    Keys of classes not asked for are left out: ``resolve_preset("fast", [CBQConfig])`` gives
    CBQ's epochs without the calibration size.

    Example:
        >>> from slimkit.workflows.run_config import CalibConfig
        >>> resolve_preset("demo", [CalibConfig])
        [{'n_calib': 16, 'calib_seq_len': 512}]
    """
    names = preset_names(classes)
    if name not in names:
        where = ", ".join(c.__name__ for c in classes) or "this command"
        if not names:
            raise SlimkitError(f"preset {name!r}: {where} has no presets")
        raise SlimkitError(
            f"unknown preset {name!r} for {where}; choose one of: {', '.join(names)}"
        )
    merged: dict[str, Any] = {}
    for c in reversed(classes):
        merged.update(getattr(c, "PRESETS", {}).get(name, {}))
    fields = {f.name for c in classes for f in dataclasses.fields(c)}
    return split_recipe({k: v for k, v in merged.items() if k in fields}, classes)


def from_preset(name: str, *classes: type, **overrides: Any) -> Any:
    """Python side of presets: build ``classes`` from preset ``name``; keyword arguments override
    it (each goes to the class that has that field). One class gives one config, several a tuple.

    Example:
        >>> from slimkit.workflows.run_config import CalibConfig
        >>> from_preset("fast", CalibConfig, seed=1).n_calib
        32
    """
    parts = resolve_preset(name, classes)
    extra = split_recipe(overrides, classes, extra=(), what="from_preset keyword")
    cfgs = tuple(
        from_dict(c, {**p, **o}, where=f"preset {name!r}")
        for c, p, o in zip(classes, parts, extra, strict=True)
    )
    return cfgs[0] if len(cfgs) == 1 else cfgs
