"""The ``slimkit`` command line. Thin: each module below registers its commands (a config
dataclass plus the one public function it calls); ``slimkit.core.commands`` builds every parser,
the run options, ``--recipe`` / ``--preset`` and the one-line errors (exit status 2).

A new command or command group is a registration in a module listed here."""

from __future__ import annotations

import importlib

from slimkit.core.commands import main as _main

COMMAND_MODULES = (
    "slimkit.cli.llm",
    "slimkit.cli.tinylm",
    "slimkit.cli.distill",
    "slimkit.cli.sam",
    "slimkit.cli.lvm",
    "slimkit.cli.clip",
    "slimkit.cli.sr",
)
for _module in COMMAND_MODULES:
    importlib.import_module(_module)


def main(argv: list[str] | None = None) -> int:
    """``slimkit ARGS...``; returns the exit status (0, or 2 for bad input)."""
    return _main(argv)


__all__ = ["main"]
