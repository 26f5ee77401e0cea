"""The shared training loop: every slimkit trainer is a :class:`TrainTask` run by :class:`Trainer`.

Trainers register themselves in :data:`TRAINERS` (name -> config class, entry function and the
options of a seconds-long smoke run), so the tests of resume, roll-back and torchrun run for
every trainer without being written again.
"""

from slimkit.core.registry import Registry
from slimkit.train.loop import LoopOptions, Trainer, TrainTask, run_task

TRAINERS = Registry("trainer")


def discover() -> list[str]:
    """Import every module named ``train`` (``slimkit.<pillar>.train``) so that its trainers register; return the
    registered names. (Plugin discovery at run time: the foundation imports no pillar statically.)"""
    import importlib
    import pkgutil

    import slimkit

    for m in pkgutil.walk_packages(slimkit.__path__, "slimkit."):
        if m.name.rsplit(".", 1)[-1] == "train":
            importlib.import_module(m.name)
    return TRAINERS.names()


__all__ = ["TRAINERS", "LoopOptions", "TrainTask", "Trainer", "discover", "run_task"]
