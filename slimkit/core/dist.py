"""torch.distributed helpers. Everything degrades to a no-op in a single process.

Entry points call :func:`init_from_env` so that ``torchrun --nproc_per_node=N -m slimkit ...``
works: gloo on CPU, nccl when every rank has an accelerator.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def init_from_env() -> bool:
    """Initialise the process group when launched by torchrun; return True if distributed."""
    if is_dist():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per rank: NCCL refuses two ranks on one device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    td.init_process_group(backend=backend)
    return True


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: this rank's accelerator (CUDA, XPU, MPS ... as ``torch.accelerator`` reports it)
    when there is one, else the CPU; or an explicit ``cpu`` / ``cuda`` / ``cuda:N`` (or another
    accelerator type), with a clear error when that device does not exist here."""
    from slimkit.core.errors import SlimkitError

    spec = (spec or "auto").strip().lower()
    acc = _accelerator()
    if spec == "auto":
        if acc is None:
            return torch.device("cpu")
        spec = acc.type
    if spec == "cpu":
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise SlimkitError(f"--device must be auto, cpu, cuda or cuda:N (got {spec!r})") from None
    if acc is None or acc.type != dev.type:
        have = f"this machine has {acc.type}" if acc is not None else "only the CPU here"
        raise SlimkitError(
            f"--device {spec}: {dev.type.upper()} is not available ({have}; use --device auto or cpu)"
        )
    count = torch.accelerator.device_count()
    if dev.index is None:
        acc_mod = torch.accelerator
        index = getattr(acc_mod, "current_device_index", None) or acc_mod.current_device_idx
        dev = torch.device(dev.type, index())
    if dev.index >= count:
        raise SlimkitError(f"--device {spec}: only {count} {dev.type} device(s)")
    return dev


def _accelerator() -> torch.device | None:
    """The accelerator torch sees, or None (CPU only)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return torch.device("cuda") if torch.cuda.is_available() else None  # torch < 2.6


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        td.all_reduce(t, op=td.ReduceOp.MAX)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        td.broadcast(t, src=src)
    return t


def barrier() -> None:
    if is_dist():
        td.barrier()


def shard(items: list, *, r: int | None = None, n: int | None = None) -> list:
    """The contiguous slice of ``items`` that this rank owns (every item to exactly one rank)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    per, extra = divmod(len(items), n)
    start = r * per + min(r, extra)
    return items[start : start + per + (1 if r < extra else 0)]
