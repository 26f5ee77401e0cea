"""Subcommands from registrations: a command is its config dataclass(es) plus the one public
function it calls, so flags, YAML recipe keys and Python keyword arguments all come from the same
dataclass fields (``slimkit.core.config``).

A command module registers its commands; nothing here knows a method:

    @command("train", group="sam", configs=["slimkit.sam.train:SamTrainConfig"],
             run=("out", "resume", "overwrite"), help="train a small promptable model")
    def sam_train(inv):
        from slimkit.sam.train import train_sam

        train_sam(*inv.configs, **inv.run_kwargs)  # out=, resume=, overwrite=, command=
        return 0

Every command gets, from here and not from its own code: one ``--flag`` per config field,
``--recipe`` (YAML; flags override it; ``preset:`` picks a preset), ``--preset`` when a config
defines ``PRESETS``, the run options it names (``--out``, ``--resume``, ``--overwrite``), ``-v``,
``--help``, and one clear line with exit status 2 for bad input (``SlimkitError``). A command group
(``slimkit sam predict``) is a group name given at registration.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from slimkit.core.config import (
    add_arguments,
    from_args,
    load_yaml,
    preset_names,
    resolve_preset,
    split_recipe,
)
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

RUN_OPTIONS = {
    "out": "run directory to create",
    "resume": "continue an interrupted run from OUT.partial",
    "overwrite": "replace OUT if it exists",
}


@dataclass(frozen=True)
class Arg:
    """An argument of one command that is not a config field: an input (``model``), an extra
    output (``--json``) or a selector (``--method``) whose value picks the command's configs.

    ``kwargs`` go to ``argparse.add_argument``. A recipe key of the same name sets the default.
    ``values`` lists what a selector accepts (for the enrolled tests; validation stays with the
    registry the selector names, so an unknown value gets that registry's message). ``output``
    marks a file the command writes (``--json``, ``--plot``): a path where nothing can be written
    is refused before the command starts."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    selects: bool = False
    values: Callable[[], list[str]] | None = None
    output: bool = False

    @property
    def dest(self) -> str:
        if "dest" in self.kwargs:
            return self.kwargs["dest"]
        name = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return name.lstrip("-").replace("-", "_")

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")


def arg(*flags: str, selects: bool = False, values: Callable[[], list[str]] | None = None,
        output: bool = False, **kwargs: Any) -> Arg:  # fmt: skip
    """``arg("--json", output=True, help="also write the results here")``; see ``Arg``."""
    return Arg(tuple(flags), kwargs, selects, values, output)


def check_outputs(inv: Invocation) -> None:
    """Refuse, before any work, an output file (``output=True`` arguments, and ``--out``) whose
    place cannot be written: a read-only directory, a parent that is a file. Whether an existing
    ``--out`` may be replaced is the command's own rule (``--overwrite``)."""
    from slimkit.core.rundir import check_output

    paths = [getattr(inv.ns, a.dest) for a in inv.command.args if a.output]
    if "out" in inv.command.run:
        paths.append(inv.ns.out)
    for p in paths:
        if p:
            check_output(p, overwrite=True)


ConfigSpec = Sequence["type | str"] | Callable[..., Sequence["type | str"]]


def _resolve(spec: type | str) -> type:
    """A config class, or ``"module:Class"`` imported on use (``slimkit --help`` stays fast)."""
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)
    return spec


@dataclass
class Command:
    """One subcommand. ``configs`` is a list of config classes (or ``"module:Class"``), or a
    function of the selectors' values returning one (``quantize --method cbq`` -> CBQConfig,
    CalibConfig, EvalConfig). ``func(inv)`` calls the public function and returns the exit code."""

    name: str
    func: Callable[[Invocation], int]
    group: str | None = None
    configs: ConfigSpec = ()
    args: Sequence[Arg] = ()
    run: Sequence[str] = ()
    out_help: str = RUN_OPTIONS["out"]
    out_default: str | None = None
    help: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        bad = sorted(set(self.run) - set(RUN_OPTIONS))
        if bad:
            raise ValueError(f"command {self.name!r}: unknown run options {bad}")

    @property
    def path(self) -> tuple[str, ...]:
        return (self.group, self.name) if self.group else (self.name,)

    @property
    def prog(self) -> str:
        return "slimkit " + " ".join(self.path)

    @property
    def selectors(self) -> list[Arg]:
        return [a for a in self.args if a.selects]

    def config_classes(self, **selected: Any) -> list[type]:
        specs = self.configs(**selected) if callable(self.configs) else self.configs
        return [_resolve(s) for s in specs]

    def variants(self) -> list[dict[str, Any]]:
        """Selector values to enrol in tests: the defaults, then each selector's every value."""
        base = {a.dest: a.kwargs.get("default") for a in self.selectors}
        out = [base]
        for a in self.selectors:
            out += [
                {**base, a.dest: v} for v in (a.values() if a.values else []) if v != base[a.dest]
            ]
        return out

    def parser(self, classes: Sequence[type], defaults: dict[str, Any] | None = None):
        """The argparse parser of this command for the chosen config classes."""
        defaults = defaults or {}
        p = argparse.ArgumentParser(prog=self.prog, description=self.description or self.help)
        for a in self.args:
            kw = dict(a.kwargs)
            if a.values is not None:
                one_of = "one of: " + ", ".join(a.values())
                kw["help"] = f"{kw['help']}; {one_of}" if kw.get("help") else one_of
            if a.dest in defaults and defaults[a.dest] is not None:  # from the recipe
                kw["default"] = defaults[a.dest]
                if a.positional:
                    kw.setdefault("nargs", "?")
                kw.pop("required", None)
            p.add_argument(*a.flags, **kw)
        if classes:
            p.add_argument(
                "--recipe",
                help="YAML file of option: value pairs (flags override it; `preset: NAME` "
                "picks a preset)",
            )
        names = preset_names(classes)
        if names:
            p.add_argument(
                "--preset",
                choices=names,
                help="named settings of the configs below (the recipe and flags override it)",
            )
        for opt in self.run:
            if opt == "out":
                kw = {"default": self.out_default} if self.out_default else {"required": True}
                p.add_argument("--out", help=self.out_help, **kw)
            else:
                p.add_argument(f"--{opt}", action="store_true", help=RUN_OPTIONS[opt])
        p.add_argument("-v", "--verbose", action="store_true", help="debug messages on stderr")
        seen: set[str] = set()
        for cls in classes:  # a field two configs share is one flag feeding both
            add_arguments(p, cls, skip=tuple(seen))
            seen |= {f.name for f in dataclasses.fields(cls)}
        return p

    def parse(self, argv: Sequence[str]) -> Invocation:
        """Read ``argv`` (recipe, preset, flags) into an ``Invocation``; runs nothing."""
        argv = list(argv)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--recipe")
        for a in self.selectors:
            pre.add_argument(*a.flags, dest=a.dest, default=None)
        known, _ = pre.parse_known_args(argv)
        recipe = load_yaml(known.recipe) if known.recipe else {}
        selected = {
            a.dest: getattr(known, a.dest) or recipe.get(a.dest) or a.kwargs.get("default")
            for a in self.selectors
        }
        classes = self.config_classes(**selected)
        if recipe and not classes:
            raise SlimkitError(f"{self.prog} takes no recipe (it has no config)")
        arg_keys = {a.dest for a in self.args}
        ns = self.parser(classes, {**recipe, **selected}).parse_args(argv)
        from slimkit.core.logs import setup_logging

        setup_logging(ns.verbose)
        parts = split_recipe(
            {k: v for k, v in recipe.items() if k not in arg_keys | {"preset"}},
            classes,
            extra=sorted(arg_keys | {"preset"}),
        )
        preset = getattr(ns, "preset", None) or recipe.get("preset")
        if preset:  # preset < recipe < flags
            parts = [
                {**p, **q} for p, q in zip(resolve_preset(preset, classes), parts, strict=True)
            ]
        return Invocation(self, argv, ns, classes, parts)


@dataclass
class Invocation:
    """A parsed command line: the namespace, the chosen config classes and, per class, the values
    that the preset and the recipe give it (flags are applied when a config is built)."""

    command: Command
    argv: list[str]
    ns: argparse.Namespace
    classes: list[type]
    parts: list[dict]

    def config(self, cls: type, base: dict[str, Any] | None = None) -> Any:
        """Build ``cls`` from ``base`` < preset and recipe < flags."""
        part = self.parts[self.classes.index(cls)]
        return from_args(cls, self.ns, {**(base or {}), **part})

    @cached_property
    def configs(self) -> tuple:
        return tuple(self.config(c) for c in self.classes)

    @property
    def command_line(self) -> str:
        """What was typed, as saved in a run's config.yaml and model card."""
        return self.command.prog + " " + shlex.join(self.argv)

    @property
    def run_kwargs(self) -> dict[str, Any]:
        """``out=``, ``resume=``, ``overwrite=`` (those the command has) and ``command=``."""
        kw = {o: getattr(self.ns, o) for o in self.command.run}
        return {**kw, "command": self.command_line}


@dataclass
class Group:
    name: str
    help: str = ""
    commands: Registry = field(default_factory=lambda: Registry("command"))

    def usage(self) -> str:
        return _listing(f"slimkit {self.name}", self.commands)


COMMANDS = Registry("command")  # top level: Command or Group


def group(name: str, help: str = "") -> Group:
    """Register the command group ``slimkit NAME ...`` (registering it again returns it)."""
    if name in COMMANDS:
        g = COMMANDS.get(name)
        if not isinstance(g, Group):
            raise ValueError(f"{name!r} is a command, not a group")
        return g
    return COMMANDS.register(name, Group(name, help))


def command(name: str, *, group: str | None = None, **kw: Any) -> Callable:
    """Decorator: register ``func(inv) -> exit code`` as ``slimkit [GROUP] NAME``."""

    def add(func: Callable[[Invocation], int]) -> Callable[[Invocation], int]:
        cmd = Command(name, func, group=group, **kw)
        reg = globals()["group"](group).commands if group else COMMANDS
        reg.register(name, cmd)
        return func

    return add


def all_commands() -> list[Command]:
    """Every registered command, groups expanded."""
    out = []
    for _, c in COMMANDS.items():
        out += [s for _, s in c.commands.items()] if isinstance(c, Group) else [c]
    return out


def _listing(prog: str, reg: Registry) -> str:
    lines = [f"usage: {prog} {{{','.join(reg.names())}}} ...   ({prog} COMMAND --help for its options)", ""]  # fmt: skip
    for name, c in reg.items():
        lines.append(f"  {name:20s}{c.help}")
    return "\n".join(lines)


def find(argv: Sequence[str]) -> tuple[Command | Group, list[str]]:
    """The command (or group, when ``argv`` stops at one) that ``argv`` names, and the rest."""
    argv = list(argv)
    node: Command | Group = COMMANDS.get(argv[0])
    rest = argv[1:]
    if isinstance(node, Group) and rest and not rest[0].startswith("-"):
        try:
            node, rest = node.commands.get(rest[0]), rest[1:]
        except SlimkitError as e:
            raise SlimkitError(f"{e} (slimkit {node.name} COMMAND)") from None
    return node, rest


def parse(argv: Sequence[str]) -> Invocation:
    """Parse a full command line (``["sam", "train", "--out", "r"]``) without running it."""
    node, rest = find(argv)
    if isinstance(node, Group):
        raise SlimkitError(f"name a command: {node.usage().splitlines()[0]}")
    return node.parse(rest)


def main(argv: Sequence[str] | None = None) -> int:
    """``slimkit ...``: dispatch to the registered command; bad input -> one line, exit 2."""
    from slimkit.core import dist

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_listing("slimkit", COMMANDS))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        node, rest = find(argv)
        if isinstance(node, Group):
            if rest and rest[0] in ("-h", "--help"):
                print(node.usage())
                return 0
            print(node.usage(), file=sys.stderr)
            raise SlimkitError(f"name a {node.name} command: {', '.join(node.commands.names())}")
        dist.init_from_env()
        inv = node.parse(rest)
        check_outputs(inv)
        return node.func(inv)
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_dist():
            import torch.distributed as td

            td.destroy_process_group()
