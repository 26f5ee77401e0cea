"""Resume checkpoints of the shared trainer: atomic as a whole, and never unpickled.

Layout under ``RUN.partial/checkpoint/``::

    step-00000040/            one complete checkpoint (a directory renamed into place)
        model.safetensors     the trained module (shared tensors such as tied embeddings kept once)
        ema.safetensors       the weight average, when the run keeps one
        state.pt              optimizer, scheduler, RNG and the method's own state: plain
                              containers of tensors and numbers, read with weights_only=True

A checkpoint is written to ``step-N.tmp/`` and renamed to ``step-N/`` only when every file is on
disk, then the older ones are deleted, so a kill at any moment leaves at least one complete
checkpoint and never a mix of two. ``torch.load(weights_only=True)`` refuses any pickle that
would build an object (the classic code-execution payload) without running it.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit")
_STEP = re.compile(r"^step-(\d{8})$")
LEGACY = ("last.pt",)  # pickled whole-state checkpoints of earlier slimkit versions


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((int(m[1]), p) for p in ckpt_dir.iterdir() if (m := _STEP.match(p.name)))
    return found[-1][1] if found else None


def save(ckpt_dir: Path, step: int, model: nn.Module, state: dict, ema: nn.Module | None) -> Path:
    """Write checkpoint ``step`` atomically and delete the older ones."""
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if ema is not None:
        save_model(ema, str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    if final.exists():  # a rolled-back run reaching the same step again
        shutil.rmtree(final)
    tmp.rename(final)
    for p in ckpt_dir.iterdir():
        if p != final and (_STEP.match(p.name) or p.name.endswith(".tmp") or p.name in LEGACY):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return final


def refuse_legacy(ckpt_dir: Path) -> None:
    for name in LEGACY:
        if (ckpt_dir / name).exists():
            raise SlimkitError(
                f"{ckpt_dir / name} is a pickled checkpoint (written by an older slimkit or placed "
                "there by someone else); it is not loaded because unpickling can run code. "
                "Start the run again without --resume."
            )


def load(path: Path, model: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
    """Load checkpoint directory ``path`` into ``model`` (and ``ema``); return its plain state."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise SlimkitError(
            f"cannot resume from {path}: state.pt is not a plain tensor checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); nothing in it was executed"
        ) from None
    try:
        load_model(model, str(path / "model.safetensors"), device="cpu")
        if ema is not None:
            load_model(ema, str(path / "ema.safetensors"), device="cpu")
    except Exception as e:  # safetensors raises its own error types for torn or foreign files
        raise SlimkitError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    return state
