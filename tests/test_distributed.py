import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import free_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_gptq_under_torchrun_matches_one_process(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _run([sys.executable, "tests/dist_gptq_worker.py", str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
          "tests/dist_gptq_worker.py", str(two), str(tmp_path / "ckpt")], tmp_path)  # fmt: skip
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # both ranks' activation streams are in the last checkpoint, and only its files are left
    # (catches a rank writing into a directory another rank has already renamed or deleted)
    files = json.loads((tmp_path / "ckpt" / "progress.json").read_text())["files"]
    streams = [tmp_path / "ckpt" / files["streams"].format(rank=r) for r in (0, 1)]
    assert all(p.is_file() for p in streams)
    left = {p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    named = {tmp_path / "ckpt" / f for f in [*files["blocks"].values(), files["method"]]}
    assert left == named | set(streams) | {tmp_path / "ckpt" / "progress.json"}
