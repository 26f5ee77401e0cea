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
    """``auto``: this rank's GPU when CUDA is available, else the CPU; or an explicit
    ``cpu`` / ``cuda`` / ``cuda:N`` (a clear error when that device does not exist)."""
    from slimkit.core.errors import SlimkitError

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.startswith("cuda"):
        raise SlimkitError(f"--device must be auto, cpu, cuda or cuda:N (got {spec!r})")
    if not torch.cuda.is_available():
        raise SlimkitError(f"--device {spec}: CUDA is not available here (use --device cpu)")
    dev = torch.device(spec)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise SlimkitError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


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
