"""Console logging and progress bars (tqdm), quiet on non-zero ranks."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

from slimkit.core import dist


def setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("slimkit")
    if any(getattr(h, "_slimkit_console", False) for h in logger.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h._slimkit_console = True  # type: ignore[attr-defined]
    h.setFormatter(logging.Formatter("[slimkit] %(message)s"))
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)  # run.log gets everything; the console gets INFO unless verbose
    h.setLevel(logging.DEBUG if verbose else logging.INFO)
    if dist.rank() != 0:
        h.setLevel(logging.WARNING)


def progress(iterable=None, **kw):
    """A tqdm bar that only rank 0 shows."""
    kw.setdefault("disable", dist.rank() != 0)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
