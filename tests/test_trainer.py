"""The shared trainer, tested once for every registered trainer (slimkit.train.TRAINERS):
exact resume after a kill, a planted pickle refused on --resume, NaN roll-back, torchrun = one
process, and the run directory's files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Crash, crash_on_call, free_port
from safetensors.torch import load_file

from slimkit.core.config import save_yaml, to_dict
from slimkit.core.errors import SlimkitError
from slimkit.train import TRAINERS, Trainer, discover
from slimkit.train.card import read_metrics

ROOT = Path(__file__).resolve().parents[1]
NAMES = discover()


def _run(name: str, tmp_path: Path, out: str, **kw) -> dict:
    cfg = TRAINERS.meta(name)["tiny"](tmp_path)
    return TRAINERS.get(name)(cfg, out=tmp_path / out, **kw)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("*.safetensors"))
    assert files, f"no weights in {d}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def _losses(d: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(d / "metrics.jsonl")]


def test_every_trainer_is_registered():
    # a trainer module that forgot to register would silently escape every test below
    assert {"train-classifier", "distill", "train-lm", "sam-train"} <= set(NAMES)
    assert {"lvm-tokenizer", "lvm-train", "lvm-distill"} <= set(NAMES)
    assert {"sr-rrdb", "sr-diffusion"} <= set(
        NAMES
    )  # a pillar without __init__.py is not discovered


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_a_kill_is_bit_identical(name, tmp_path, monkeypatch):
    full = _run(name, tmp_path, "full")
    steps = len(_losses(Path(full["out"])))
    # kill in the last step: at least one checkpoint exists by then for every tiny run
    crash_on_call(monkeypatch, Trainer, "_one_step", steps)
    with pytest.raises(Crash):
        _run(name, tmp_path, "cut")
    monkeypatch.undo()
    assert (tmp_path / "cut.partial" / "checkpoint").is_dir()
    cut = _run(name, tmp_path, "cut", resume=True)
    assert cut["resumed_at_step"] is not None and 0 < cut["resumed_at_step"] < steps
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics of the resumed run continue the killed one's, step for step
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")
    assert not (tmp_path / "cut" / "checkpoint").exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file: code execution
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["last.pt", "step-00000002/state.pt"])
def test_a_planted_pickle_is_refused_without_running(name, where, tmp_path):
    cfg = TRAINERS.meta(name)["tiny"](tmp_path)
    ckpt = tmp_path / "run.partial" / "checkpoint" / where
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    ckpt.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    save_yaml(to_dict(cfg), tmp_path / "run.partial" / "config.yaml")
    with pytest.raises(SlimkitError, match="pickle|not a plain tensor checkpoint"):
        TRAINERS.get(name)(cfg, out=tmp_path / "run", resume=True)
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", NAMES)
def test_a_nan_mid_training_is_rolled_back(name, tmp_path, monkeypatch):
    cfg = TRAINERS.meta(name)["tiny"](tmp_path)  # (prerequisites such as a teacher first)
    task_cls = TRAINERS.meta(name)["task"]
    original = task_cls.loss
    calls = {"n": 0}

    def poisoned(self, micro):
        loss, parts = original(self, micro)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(task_cls, "loss", poisoned)
    rep = TRAINERS.get(name)(cfg, out=tmp_path / "run")
    out = Path(rep["out"])
    assert rep["rollbacks"] == 1
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in rows if "event" in r]
    assert event["at_step"] == 3 and event["to_step"] < 3
    assert all(torch.isfinite(v).all() for v in _weights(out).values() if v.is_floating_point())
    # the failed step runs again at half its learning rate
    again = {r["step"]: r["lr"] for r in rows[rows.index(event) + 1 :] if "step" in r}
    assert again[event["at_step"]] == pytest.approx(event["lr"] / 2)


def test_a_loss_that_stays_nan_stops_with_a_message_and_no_partial(tmp_path, monkeypatch):
    task_cls = TRAINERS.meta("sam-train")["task"]
    original = task_cls.loss
    monkeypatch.setattr(task_cls, "loss", lambda self, m: (original(self, m)[0] * float("nan"), {}))
    with pytest.raises(SlimkitError, match="not finite at step 1 after 3 roll-backs"):
        _run("sam-train", tmp_path, "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize("name", NAMES)
def test_run_directory_files(name, tmp_path):
    rep = _run(name, tmp_path, "run")
    out = Path(rep["out"])
    for f in ("config.yaml", "report.json", "README.md", "run.log", "metrics.jsonl", "loss.png"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    steps = _losses(out)
    assert report["rollbacks"] == 0 and report["steps_per_second"] > 0 and len(steps) > 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(
        range(1, len(steps) + 1)
    )
    assert "```yaml" in (out / "README.md").read_text()


def test_resume_with_other_options_is_refused(tmp_path, monkeypatch):
    cfg = TRAINERS.meta("sam-train")["tiny"](tmp_path)
    crash_on_call(monkeypatch, Trainer, "_one_step", 4)
    with pytest.raises(Crash):
        TRAINERS.get("sam-train")(cfg, out=tmp_path / "run")
    monkeypatch.undo()
    cfg.lr = cfg.lr * 2
    with pytest.raises(SlimkitError, match="cannot resume: the checkpoint was made with lr="):
        TRAINERS.get("sam-train")(cfg, out=tmp_path / "run", resume=True)
    assert (tmp_path / "run.partial" / "checkpoint").is_dir()  # the checkpoint is kept


@pytest.mark.parametrize("name", NAMES)
def test_two_gloo_processes_match_one(name, tmp_path):
    """Each rank computes its half of every global batch; the averaged gradients give the same
    losses as one process on the whole batch."""
    cfg = TRAINERS.meta(name)["tiny"](tmp_path)
    save_yaml(to_dict(cfg), tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = [str(ROOT / "tests" / "dist_train_worker.py"), name, str(tmp_path / "cfg.yaml")]
    one = [sys.executable, *worker, str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", *worker, str(tmp_path / "two")]  # fmt: skip
    for cmd in (one, two):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert json.loads((tmp_path / "two" / "report.json").read_text())["world_size"] == 2
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-3
