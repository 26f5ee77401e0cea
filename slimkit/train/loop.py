"""The one training loop of slimkit.

A method supplies a :class:`TrainTask` (its model, its batches, its loss, what to do after a step
and what to write at the end); :class:`Trainer` owns everything else:

- the run directory (``OUT.partial`` renamed to ``OUT`` at the end; rank 0 writes), with
  ``config.yaml`` written first, ``metrics.jsonl`` (one line per step), ``loss.png``,
  ``report.json``, a ``README.md`` model card and ``run.log``;
- device placement and torch.distributed: under ``torchrun`` each rank computes its slice of the
  global batch and the trainer averages the gradients of every trained parameter across ranks
  with one all-reduce per optimizer step (the same average DDP computes, but it also works for
  losses that call sub-modules directly, such as SAM's encoder and decoder, and for parameters a
  rank did not use), buffers are broadcast from rank 0 before every step (as DDP does);
- gradient accumulation (the task returns several micro-batches), bf16 autocast, gradient-norm
  clipping, an exponential moving average of the weights;
- NaN / Inf detection: a non-finite loss or gradient norm on any rank rolls every rank back to
  the last good state (the last checkpoint, or the start) and halves the learning rate; after
  ``max_rollbacks`` the run stops with a message and keeps its last checkpoint for ``--resume``;
- checkpoints every N steps (and whenever the task asks, e.g. at the end of an epoch), atomic as
  a whole and read back without unpickling (:mod:`slimkit.train.checkpoint`); ``--resume``
  restores model, optimizer, scheduler, RNG and the task's state, so a resumed run reproduces an
  uninterrupted one bit for bit;
- progress with an ETA on the console at least every ``log_seconds``.

Why not accelerate: its ``Accelerator`` wraps the model in DDP, which only averages gradients of
a loss computed through the wrapper's ``forward``; half of slimkit's trainers compute losses from
sub-modules. What accelerate would remove here (autocast, accumulation) is a few lines of plain
torch, and the explicit all-reduce keeps the loop readable in one file.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core import dist
from slimkit.core.config import load_yaml, save_yaml, to_dict
from slimkit.core.errors import SlimkitError
from slimkit.core.rundir import RunDir, peak_rss_gb, versions, write_json
from slimkit.train import checkpoint
from slimkit.train.rollback import RollbackBudget

log = logging.getLogger("slimkit")
PRECISIONS = ("fp32", "bf16")


@dataclass
class LoopOptions:
    """How the shared loop runs; each trainer fills it from its own config.

    Args:
        total_steps: optimizer steps of the whole run.
        clip_grad: gradient-norm clip (0 = off; the norm is still computed and checked).
        precision: ``fp32`` or ``bf16`` (autocast around the loss).
        ema: decay of the weight average kept beside the model (0 = none).
        checkpoint_every: write a resume checkpoint every N steps (0 = only when the task asks).
        max_rollbacks: non-finite steps tolerated (each rolls back and halves the learning rate).
        log_seconds: longest silence on the console between progress lines.
    """

    total_steps: int
    clip_grad: float = 0.0
    precision: str = "fp32"
    ema: float = 0.0
    checkpoint_every: int = 0
    max_rollbacks: int = 3
    log_seconds: float = 20.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SlimkitError(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.total_steps < 1:
            raise SlimkitError(f"the run has {self.total_steps} steps; it needs at least one")


class TrainTask:
    """What a method supplies to :class:`Trainer`. Subclasses set ``kind`` and ``model`` and
    override the methods below; ``ema_of`` names the sub-module whose average is kept (default:
    ``model``), e.g. the student inside a distillation wrapper."""

    kind = "train"
    model: nn.Module
    ema_of: nn.Module | None = None

    def optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """The optimizer and the per-step learning-rate scheduler (or None)."""
        raise NotImplementedError

    def loop_options(self) -> LoopOptions:
        """How :class:`Trainer` runs this task (steps, clipping, precision, checkpoints)."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list[Any]:
        """This rank's micro-batches of optimizer step ``step`` (0-based); one for no
        accumulation. Their losses are averaged (each is divided by their number)."""
        raise NotImplementedError

    def loss(self, micro: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch and its named parts (floats, for the logs)."""
        raise NotImplementedError

    def after_step(self, step: int, record: dict, trainer: Trainer) -> bool:
        """Called on every rank after step ``step``; return True to checkpoint now. The default
        appends ``{"step": step + 1, "loss": ...}`` to :attr:`history`."""
        self.history.append({"step": step + 1, "loss": record["loss"]})
        return False

    @property
    def history(self) -> list[dict]:
        """Per-step records for the report; kept in :meth:`state_dict`, so a resumed run's
        history is the uninterrupted one's."""
        if "_history" not in self.__dict__:
            self._history: list[dict] = []
        return self._history

    @history.setter
    def history(self, records: list[dict]) -> None:
        self._history = records

    def state_dict(self) -> dict:
        """The task's own resumable state (plain containers of tensors and numbers); the
        default keeps :attr:`history`."""
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        """Write the artifacts into ``path`` (rank 0; None elsewhere) and return the report."""
        return {}


def _np_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.copy()), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_np_state(s: dict) -> None:
    np.random.set_state((s["name"], s["keys"].numpy(), s["pos"], s["has_gauss"], s["cached"]))


def _total_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class Trainer:
    """Run ``task`` with ``optimizer`` (and an optional per-step ``scheduler``) into ``out``.

    Example:
        >>> Trainer(task, opt, sched, LoopOptions(total_steps=100), device=torch.device("cpu"),
        ...         out="runs/x", config=cfg).fit()            # doctest: +SKIP
    """

    def __init__(self, task: TrainTask, optimizer: torch.optim.Optimizer, scheduler, options: LoopOptions,
                 *, device: torch.device, out: str | Path, config: Any, resume: bool = False,
                 overwrite: bool = False, command: str = ""):  # fmt: skip
        self.task, self.opt, self.sched, self.o = task, optimizer, scheduler, options
        self.device, self.out, self.config = device, Path(out), config
        self.resume, self.overwrite, self.command = resume, overwrite, command
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        src = task.ema_of if task.ema_of is not None else task.model
        self.ema_src = src
        self.ema = copy.deepcopy(src).eval().requires_grad_(False) if options.ema else None
        self.budget = RollbackBudget(options.max_rollbacks)
        self.resumed_at: int | None = None
        self.step = 0
        self.t0 = time.time()

    # ---- state -------------------------------------------------------------------------
    def _state(self, step: int) -> dict:
        st = {
            "step": step,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict() if self.sched is not None else {},
            "task": self.task.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": _np_state(),
                    "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]},
        }  # fmt: skip
        if torch.cuda.is_available():
            st["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def _snapshot(self, step: int) -> dict:
        return copy.deepcopy(
            {
                **self._state(step),
                "model": self.task.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
            }
        )

    def _restore(self, st: dict, *, with_weights: bool) -> None:
        st = copy.deepcopy(st)  # the optimizer keeps references to what it loads
        if with_weights:
            self.task.model.load_state_dict(st["model"])
            if self.ema is not None:
                self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        if self.sched is not None:
            self.sched.load_state_dict(st["sched"])
        self.task.load_state_dict(st["task"])
        rng = st["rng"]
        torch.set_rng_state(rng["torch"])
        _set_np_state(rng["numpy"])
        random.setstate((3, tuple(int(x) for x in rng["python"]), rng["python_pos"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ---- one step ----------------------------------------------------------------------
    def _average_gradients(self) -> None:
        world = dist.world_size()
        grads = []
        for p in self.params:
            if p.grad is None:  # unused on this rank: contributes zero, as DDP counts it
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce_sum(flat)
        flat /= world
        i = 0
        for g in grads:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()

    def _broadcast_buffers(self) -> None:
        for b in self.task.model.buffers():
            dist.broadcast(b.data)

    def _one_step(self, step: int) -> dict | None:
        """Forward, backward, checks and the optimizer step; None if the step was not finite."""
        bf16 = self.o.precision == "bf16"
        if dist.is_dist():
            self._broadcast_buffers()
        micro = self.task.micro_batches(step)
        self.opt.zero_grad(set_to_none=True)
        total, parts = 0.0, {}
        for mb in micro:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, p = self.task.loss(mb)
                loss = loss / len(micro)
            loss.backward()
            total += float(loss.detach())
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v / len(micro)
        world = dist.world_size()
        if dist.is_dist():
            self._average_gradients()
        loss_all = dist.all_reduce_sum(torch.tensor([total])).item() / world
        if self.o.clip_grad:
            norm = nn.utils.clip_grad_norm_(self.params, self.o.clip_grad)
        else:
            norm = _total_norm(self.params)
        norm = float(norm)
        if not (math.isfinite(loss_all) and math.isfinite(norm)):
            log.warning("step %d: non-finite loss %s / gradient norm %s (%s)", step + 1,
                        loss_all, norm, parts)  # fmt: skip
            return None
        lr = self.opt.param_groups[0]["lr"]  # the learning rate of this step
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        if self.ema is not None:
            d = self.o.ema
            with torch.no_grad():
                for pe, ps in zip(
                    self.ema.state_dict().values(), self.ema_src.state_dict().values()
                ):
                    if pe.is_floating_point():
                        pe.mul_(d).add_(ps.detach(), alpha=1 - d)
                    else:
                        pe.copy_(ps)
        rec = {"step": step + 1, "loss": loss_all, "lr": lr, "grad_norm": norm}
        rec.update({f"loss_{k}": v for k, v in parts.items()})
        return rec

    # ---- the run -----------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``total_steps`` and commit the run directory; return the report."""
        rank0 = dist.rank() == 0
        rd = None
        if rank0:
            rd = RunDir(self.out, resume=self.resume, overwrite=self.overwrite)
        try:
            report = self._fit(rd)
        except SlimkitError:
            if rd is not None and checkpoint.latest(rd.checkpoint_dir) is None:
                rd.abandon()  # nothing worth resuming: leave no OUT.partial behind
            raise
        dist.barrier()
        return report

    def _check_config(self, path: Path) -> None:
        cfg = to_dict(self.config)
        f = path / "config.yaml"
        if f.is_file() and self.resume:
            old = load_yaml(f)
            diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
            if diff:
                k, (a, b) = next(iter(diff.items()))
                raise SlimkitError(
                    f"cannot resume: the checkpoint was made with {k}={a!r}, this run asks for "
                    f"{k}={b!r}; resume with the same options or start again without --resume"
                )
        save_yaml(cfg, f)

    def _fit(self, rd: RunDir | None) -> dict:
        o, task = self.o, self.task
        rank0 = rd is not None
        partial = RunDir.partial_of(self.out)
        ckdir = partial / "checkpoint"
        if rank0:
            self._check_config(rd.path)
        dist.barrier()
        if dist.is_dist():  # every rank starts from rank 0's weights, as DDP does
            for t in [*task.model.parameters(), *task.model.buffers()]:
                dist.broadcast(t.data)
        start = 0
        if self.resume:
            checkpoint.refuse_legacy(ckdir)
            found = checkpoint.latest(ckdir)
            if found is not None:
                st = checkpoint.load(found, task.model, self.ema)
                self._restore(st, with_weights=False)
                start = int(st["step"])
                self.budget.count = int(st.get("rollbacks", 0))
                self.resumed_at = start
                log.info("resumed from %s (step %d of %d)", found, start, o.total_steps)
        metrics = partial / "metrics.jsonl"
        if rank0:
            kept = []
            if start and metrics.is_file():
                kept = [ln for ln in metrics.read_text().splitlines()
                        if json.loads(ln).get("step", 0) <= start]  # fmt: skip
            metrics.write_text("".join(ln + "\n" for ln in kept))
        snapshot = self._snapshot(start)
        t0 = last_log = self.t0 = time.time()
        step = start
        while step < o.total_steps:
            self.step = step
            rec = self._one_step(step)
            if rec is None:
                if self.budget.spend():
                    raise SlimkitError(
                        f"the loss or gradient is not finite at step {step + 1} after "
                        f"{o.max_rollbacks} roll-backs with halved learning rates; lower the "
                        "learning rate (--lr) and start again"
                    )
                failed_lr = self.opt.param_groups[0]["lr"]
                self._restore(snapshot, with_weights=True)
                self.budget.scale_lr(self.opt, self.sched)
                log.warning("rolled back to step %d and halved the learning rate (roll-back %d of "
                            "at most %d)", snapshot["step"], self.budget.count, o.max_rollbacks)  # fmt: skip
                if rank0:
                    with metrics.open("a") as f:
                        f.write(json.dumps({"event": "rollback", "at_step": step + 1,
                                            "to_step": snapshot["step"], "lr": failed_lr}) + "\n")  # fmt: skip
                step = snapshot["step"]
                continue
            rec["seconds"] = time.time() - t0
            if rank0:
                with metrics.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            done = step + 1
            now = time.time()
            if rank0:
                if done == start + 1 or now - last_log >= o.log_seconds or done == o.total_steps:
                    eta = (now - t0) / (done - start) * (o.total_steps - done)
                    log.info("step %d/%d loss %.4f lr %.3g | %.2f s/step, ETA %.0f s", done,
                             o.total_steps, rec["loss"], rec["lr"], (now - t0) / (done - start), eta)  # fmt: skip
                    last_log = now
            want = task.after_step(step, rec, self)
            if done < o.total_steps and (
                want or (o.checkpoint_every and done % o.checkpoint_every == 0)
            ):
                snapshot = self._snapshot(done)
                if rank0:
                    st = self._state(done)
                    st["rollbacks"] = self.budget.count
                    checkpoint.save(ckdir, done, task.model, st, self.ema)
            step = done
        seconds = self.loop_seconds = time.time() - t0
        report = task.finish(rd.path if rank0 else None, self)
        if not rank0:
            return report
        steps_run = o.total_steps - start
        report.update(
            {
                "kind": report.get("kind", task.kind),
                "command": self.command,
                "seconds": report.get("seconds", seconds),
                "steps_per_second": steps_run / max(seconds, 1e-9),
                "rollbacks": self.budget.count,
                "resumed_at_step": self.resumed_at,
                "device": str(self.device),
                "world_size": dist.world_size(),
                "peak_rss_gb": peak_rss_gb(),
                "versions": versions(),
            }
        )
        write_json(rd.path / "report.json", report)
        from slimkit.train.card import plot_losses, write_card

        plot_losses(metrics, rd.path / "loss.png")
        write_card(rd.path, report, to_dict(self.config))
        report["out"] = str(rd.commit())
        return report


def run_task(task_cls: type[TrainTask], cfg: Any, *, out: str | Path, resume: bool = False,
             overwrite: bool = False, command: str = "") -> dict:  # fmt: skip
    """Build ``task_cls(cfg, device)`` on the device ``cfg.device`` names (inputs are checked
    and models built before the run directory exists), train, commit ``out``; return the report."""
    device = dist.resolve_device(cfg.device)
    task = task_cls(cfg, device)
    opt, sched = task.optimizer()
    return Trainer(task, opt, sched, task.loop_options(), device=device, out=out, config=cfg,
                   resume=resume, overwrite=overwrite, command=command).fit()  # fmt: skip
