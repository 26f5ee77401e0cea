"""Run directories: everything is written under ``OUT.partial/`` and renamed to ``OUT`` at the end.

A crashed run leaves only ``OUT.partial/`` (holding its resume checkpoint), never a half-written
``OUT``. Next to every artifact: ``config.yaml`` (resolved), ``report.json`` (metrics, timings,
peak memory, versions, data fingerprint), ``README.md`` (model card) and ``run.log``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit")


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) / 1024**2


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("slimkit", "torch", "transformers", "safetensors", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_json(path: str | Path, data: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunDir:
    """The output directory of one run.

    Args:
        out: final directory; must not exist unless ``overwrite`` (or ``resume``, which reuses
            ``OUT.partial`` left by an interrupted run).
        resume: continue from ``OUT.partial`` if it exists.
        overwrite: replace an existing ``OUT`` at the end of a successful run.

    Example:
        >>> rd = RunDir("runs/x")            # doctest: +SKIP
        >>> rd.path / "model.safetensors"     # write here ...
        >>> rd.commit()                       # ... then rename to runs/x
    """

    def __init__(self, out: str | Path, *, resume: bool = False, overwrite: bool = False):
        self.final = Path(out)
        self.path = self.partial_of(out)
        self.resumed = False
        if self.final.exists() and not overwrite:
            raise SlimkitError(
                f"output {self.final} already exists; choose another --out or pass --overwrite"
            )
        if self.path.exists():
            if resume:
                self.resumed = True
            else:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self._handler = logging.FileHandler(self.path / "run.log")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._handler.setLevel(logging.DEBUG)
        if log.level == logging.NOTSET or log.level > logging.DEBUG:
            log.setLevel(logging.DEBUG)
        log.addHandler(self._handler)
        log.info("run directory %s (resumed=%s)", self.path, self.resumed)

    @staticmethod
    def partial_of(out: str | Path) -> Path:
        """Where a run writes before it is complete (``OUT.partial``)."""
        final = Path(out)
        return final.with_name(final.name + ".partial")

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    def commit(self, *, keep_checkpoint: bool = False) -> Path:
        """Move the finished run into place (atomic rename on one filesystem)."""
        log.removeHandler(self._handler)
        self._handler.close()
        if not keep_checkpoint and self.checkpoint_dir.exists():
            shutil.rmtree(self.checkpoint_dir)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return self.final

    def abandon(self) -> None:
        """Remove the partial directory (used when the failure was bad input, not a crash)."""
        log.removeHandler(self._handler)
        self._handler.close()
        shutil.rmtree(self.path, ignore_errors=True)
