"""Cached block activations, in RAM or memory-mapped on disk when they do not fit."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("slimkit")


def available_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


class ActivationStore:
    """``n`` activations of shape ``shape`` (float32), addressable by sample ranges.

    Args:
        n: number of samples.
        shape: per-sample shape, e.g. (seq_len, hidden).
        disk_dir: if given, the store is a memory-mapped file in this directory (removed when
            the store is garbage-collected); otherwise one tensor in RAM.
    """

    def __init__(self, n: int, shape: tuple[int, ...], disk_dir: str | Path | None = None):
        self.n, self.shape = n, tuple(shape)
        self._path: str | None = None
        if disk_dir is None:
            self._data = torch.empty((n, *self.shape), dtype=torch.float32)
        else:
            Path(disk_dir).mkdir(parents=True, exist_ok=True)
            fd, self._path = tempfile.mkstemp(suffix=".f32", dir=disk_dir)
            os.close(fd)
            mm = np.memmap(self._path, dtype=np.float32, mode="w+", shape=(n, *self.shape))
            self._data = torch.from_numpy(mm)

    @property
    def on_disk(self) -> bool:
        return self._path is not None

    def get(self, i0: int, i1: int) -> torch.Tensor:
        return self._data[i0:i1].clone() if self.on_disk else self._data[i0:i1]

    def set(self, i0: int, i1: int, value: torch.Tensor) -> None:
        self._data[i0:i1] = value.detach().to("cpu", torch.float32)

    def all(self) -> torch.Tensor:
        return self._data

    def __del__(self) -> None:
        if getattr(self, "_path", None):
            try:
                del self._data
                os.remove(self._path)
            except (OSError, AttributeError):
                pass
