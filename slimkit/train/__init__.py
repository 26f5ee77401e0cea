"""The shared training loop: every slimkit trainer is a :class:`TrainTask` run by :class:`Trainer`.

Trainers register themselves in :data:`TRAINERS` (name -> config class, entry function and the
options of a seconds-long smoke run), so the tests of resume, roll-back and torchrun run for
every trainer without being written again.
"""

from slimkit.core.registry import Registry
from slimkit.train.loop import LoopOptions, Trainer, TrainTask

TRAINERS = Registry("trainer")

__all__ = ["TRAINERS", "LoopOptions", "TrainTask", "Trainer"]
