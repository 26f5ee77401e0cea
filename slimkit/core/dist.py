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
    td.init_process_group(backend=backend)
    return True


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
