"""The roll-back budget for non-finite steps, shared by every training loop of slimkit: the
shared :class:`~slimkit.train.loop.Trainer` and CBQ's per-window reconstruction.

A loop that meets a non-finite loss, gradient or parameter restores its last good state, calls
:meth:`RollbackBudget.spend` and, while the budget lasts, lowers its learning rate with
:meth:`RollbackBudget.scale_lr`; what happens when the budget is exhausted is the loop's call
(the trainer stops with a message, CBQ keeps the window's last good state).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RollbackBudget:
    """At most ``max_rollbacks`` roll-backs, each scaling the learning rate by ``factor``.

    Example:
        >>> b = RollbackBudget(max_rollbacks=1)
        >>> b.spend(), b.spend(), b.count
        (False, True, 2)
    """

    def __init__(self, max_rollbacks: int = 3, factor: float = 0.5, count: int = 0):
        self.max_rollbacks = max_rollbacks
        self.factor = factor
        self.count = count

    def spend(self) -> bool:
        """Count one roll-back; True when that exceeds the budget."""
        self.count += 1
        return self.count > self.max_rollbacks

    def scale_lr(self, opt: torch.optim.Optimizer, sched=None) -> None:
        """Scale every parameter group's learning rate (and a scheduler's base rates)."""
        for g in opt.param_groups:
            g["lr"] *= self.factor
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * self.factor for b in sched.base_lrs]


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an Inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
