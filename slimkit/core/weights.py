"""Reading weight files that someone handed you, with one clear message when they are bad.

- ``.safetensors``: the header is checked before the file is opened, so a truncated or
  random-bytes file is named as such instead of surfacing as a safetensors (Rust) error.
- anything else (``.pth``, ``.pt``, ``.bin``): ``torch.load(weights_only=True)``. A pickle that
  holds more than tensors and plain containers is refused, never executed.

Example:
    >>> from slimkit.core.weights import load_state_dict
    >>> sd = load_state_dict("runs/teacher/model.safetensors")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError

_MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers too


def check_safetensors(path: str | Path) -> None:
    """Raise :class:`SlimkitError` unless ``path`` is a complete safetensors file.

    Reads only the 8-byte length and the JSON header, then checks that the file holds every byte
    the header describes (a download or copy cut short fails here)."""
    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"weights file {p} does not exist")
    size = p.stat().st_size
    bad = f"{p} is not a safetensors file"
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SlimkitError(f"{bad} ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise SlimkitError(f"{bad}, or it is truncated (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise SlimkitError(f"{bad} (its header is not a safetensors index)") from None
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise SlimkitError(
            f"{p} is truncated: its header describes {need} bytes, the file has {size}"
        )


def _load_pickle(p: Path, *, mmap: bool = False):
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's advice to allowlist it is left out
        what = f"it would call {found.group(1)}" if found else "custom objects"
        raise SlimkitError(
            f"{p} is a pickle that holds more than tensors ({what}); slimkit reads checkpoints "
            "with weights_only=True and never unpickles objects: save a plain state dict or "
            "safetensors"
        ) from None
    except Exception as e:  # not a torch.save file: zip / pickle / EOF errors of every kind
        if mmap and "mmap" in str(e):  # the legacy (non-zip) format cannot be memory-mapped
            return _load_pickle(p)
        raise SlimkitError(
            f"{p} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})"
        ) from None


def check_weights_file(path: str | Path) -> None:
    """Validate a weights file without loading its tensors into memory (safetensors: the header;
    a torch pickle: ``weights_only=True`` with memory-mapped storages)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        check_safetensors(p)
    else:
        _load_pickle(p, mmap=True)


def load_state_dict(path: str | Path) -> dict:
    """The object stored in a weights file (a state dict for every file slimkit reads), loaded
    on the CPU; bad files raise :class:`SlimkitError`."""
    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"checkpoint {p} does not exist")
    if p.suffix != ".safetensors":
        return _load_pickle(p)
    from safetensors.torch import load_file

    check_safetensors(p)
    try:
        return load_file(str(p))
    except Exception as e:  # a header that passed the checks can still be inconsistent
        raise SlimkitError(f"{p} is not a valid safetensors file ({str(e)[:160]})") from None
