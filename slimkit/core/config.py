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


def split_recipe(recipe: dict, classes: list[type]) -> list[dict]:
    parts = [{} for _ in classes]
    for k, v in recipe.items():
        for i, c in enumerate(classes):
            if k in {f.name for f in dataclasses.fields(c)}:
                parts[i][k] = v
                break
        else:
            allowed = sorted(
                {f.name for c in classes for f in dataclasses.fields(c)} | {"method", "model"}
            )
            raise SlimkitError(
                f"recipe key {k!r} is not an option of this method; allowed: {allowed}"
            )
    return parts


def parse_run_command(argv: list[str], prog: str, cfg_cls: type, description: str):
    """The shared command line of the trainers: ``--recipe`` YAML (flags override it), ``--out``,
    ``--resume``, ``--overwrite``, ``-v`` and one flag per field of ``cfg_cls``.
    Returns (namespace, config); logging is set up."""
    from slimkit.core.logs import setup_logging

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    recipe = load_yaml(known.recipe) if known.recipe else {}
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--recipe", help="YAML file of option: value pairs (flags override it)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT.partial's last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p, cfg_cls)
    ns = p.parse_args(argv)
    setup_logging(ns.verbose)
    (part,) = split_recipe(recipe, [cfg_cls])
    return ns, from_args(cfg_cls, ns, part)
