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
from collections.abc import Iterator
from contextlib import contextmanager
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


def check_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an output path before any work is done: an existing ``out`` (unless
    ``overwrite``), or a place where nothing can be created (a parent that is a file, a
    read-only directory or file system). Returns ``out`` as a Path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimkitError(f"output {out} already exists; choose another --out or pass --overwrite")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SlimkitError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimkitError(f"cannot write {out}: {parent} is not writable")
    return out


def _mkdir(path: Path, out: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # permission, read-only file system, a file in the way, disk full
        raise SlimkitError(
            f"cannot write {out}: {e.strerror or e} ({e.filename or path})"
        ) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(
    out: str | Path, *, overwrite: bool = False, directory: bool = True
) -> Iterator[Path]:
    """Write an output under ``OUT.partial`` and move it to ``OUT`` only when the block finishes.

    Yields the temporary path (a fresh directory when ``directory``, else a file path to create).
    Bad input (:class:`SlimkitError`) removes the temporary output; any other failure (a crash,
    a kill) leaves at most ``OUT.partial``, never a half-written ``OUT``.

    Example:
        >>> with atomic_output("models/child") as tmp:     # doctest: +SKIP
        ...     model.save_pretrained(tmp)
    """
    out = check_output(out, overwrite=overwrite)
    tmp = out.with_name(out.name + ".partial")
    _remove(tmp)
    _mkdir(tmp if directory else tmp.parent, out)
    try:
        yield tmp
    except SlimkitError:
        _remove(tmp)
        raise
    _remove(out)
    os.replace(tmp, out)


class RunDir:
    """The output directory of one run.

    Args:
        out: final directory; must not exist unless ``overwrite`` (or ``resume``, which reuses
            ``OUT.partial`` left by an interrupted run).
        resume: continue from ``OUT.partial`` if it exists.
        overwrite: replace an existing ``OUT`` at the end of a successful run.

    Used as a context manager, a :class:`SlimkitError` raised inside the block before any
    checkpoint was written (bad input found late: an unavailable device, non-finite weights)
    removes ``OUT.partial`` again; a crash, or an error after a checkpoint, keeps it for
    ``--resume``.

    Example:
        >>> with RunDir("runs/x") as rd:          # doctest: +SKIP
        ...     (rd.path / "model.safetensors")    # write here ...
        ...     rd.commit()                        # ... then rename to runs/x
    """

    def __init__(self, out: str | Path, *, resume: bool = False, overwrite: bool = False):
        self.final = Path(out)
        self.path = self.partial_of(out)
        self.resumed = False
        self.closed = False
        check_output(self.final, overwrite=overwrite)
        if self.path.exists():
            if resume:
                self.resumed = True
            else:
                shutil.rmtree(self.path)
        _mkdir(self.path, self.final)
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

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if (
            exc_type is not None
            and issubclass(exc_type, SlimkitError)
            and not self.closed
            and not self.has_checkpoint()
        ):
            self.abandon()
        return False

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    def has_checkpoint(self) -> bool:
        """Whether anything a ``--resume`` could continue from has been written."""
        d = self.checkpoint_dir
        return d.is_dir() and any(d.iterdir())

    def _close_log(self) -> None:
        log.removeHandler(self._handler)
        self._handler.close()
        self.closed = True

    def commit(self, *, keep_checkpoint: bool = False) -> Path:
        """Move the finished run into place (atomic rename on one filesystem)."""
        self._close_log()
        if not keep_checkpoint and self.checkpoint_dir.exists():
            shutil.rmtree(self.checkpoint_dir)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return self.final

    def abandon(self) -> None:
        """Remove the partial directory (used when the failure was bad input, not a crash)."""
        self._close_log()
        shutil.rmtree(self.path, ignore_errors=True)
