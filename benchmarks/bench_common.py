"""Helpers shared by the benchmark scripts: subprocess runs, machine description, mean ± std."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str]) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-5000:])
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}")
    return r


def slimkit_logged(args: list[str], log: Path, threads: int | None = None) -> float:
    """One `slimkit` process with its output in ``log``; returns wall seconds, exits on failure."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(
            slimkit_cmd(*args), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): slimkit {' '.join(args)}; see {log}")
    return time.time() - t0


def slimkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "slimkit", *args]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    import torch

    gpu = (
        f"GPU {torch.cuda.get_device_name()} (runs use it), "
        if torch.cuda.is_available()
        else "no GPU, "
    )
    return (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}), {gpu}"
        f"torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}."
    )


def seed_list(text: str) -> list[int]:
    """argparse type of ``--seeds``: comma-separated integers ("0,1,2")."""
    import argparse

    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes comma-separated integers, e.g. 0,1,2 (got {text!r})"
        ) from None


def mean_std(vals, fmt: str = "{:.2f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def run_quantize(
    model: str, method: str, flags: list[str], out: Path, *, seed: int, n_calib: int,
    seq_len: int, eval_windows: int, corpora: tuple[str, ...], calib_seq_len: int | None = None,
    extra: list[str] | None = None, keep_weights: bool = True, resume: bool = False,
) -> dict:  # fmt: skip
    """One `slimkit quantize` process (calibrated on wiki-offline, evaluated on ``corpora``);
    returns perplexities, quantization seconds, peak RSS and the exact command. With
    ``keep_weights=False`` the run directory keeps its report and logs but not its weights
    (about 0.6 GB per SmolLM2 run; a ladder of a hundred runs would otherwise fill a disk).
    With ``resume=True`` a run whose ``OUT.partial`` a killed process left continues from its
    last checkpoint (``--resume``; the reported seconds include the checkpointed windows)."""
    import json

    cmd = slimkit_cmd(
        "quantize", model, "--method", method, *flags, "--calib", "wiki-offline",
        "--n-calib", str(n_calib), "--calib-seq-len", str(calib_seq_len or seq_len), "--seed", str(seed),
        "--ppl", ",".join(corpora), "--seq-len", str(seq_len), "--max-windows", str(eval_windows),
        "--out", str(out), "--overwrite", *(["--resume"] if resume else []), *(extra or []),
    )  # fmt: skip
    t0 = time.time()
    sh(cmd)
    wall = time.time() - t0
    rep = json.loads((out / "report.json").read_text())
    if not keep_weights:
        for f in out.rglob("*.safetensors"):
            f.unlink()
    return {
        "ppl": {c: rep["eval"][c]["quant"]["ppl"] for c in corpora},
        "seconds": rep["quantize_seconds"],
        "process_seconds": wall,
        "peak_rss_gb": rep["peak_rss_gb"],
        "calib_fingerprint": rep["calib_fingerprint"],
        "eval_fingerprint": {c: rep["eval"][c]["quant"]["eval_fingerprint"] for c in corpora},
        "command": "slimkit " + " ".join(cmd[3:]),
        **({"resumed_at_window": rep["resumed_at_window"]} if rep.get("resumed_at_window") else {}),
    }


def eval_fp(model: str, out_json: Path, *, seq_len: int, eval_windows: int, corpora) -> dict:
    import json

    sh(slimkit_cmd("eval", model, "--ppl", ",".join(corpora), "--seq-len", str(seq_len),
                   "--max-windows", str(eval_windows), "--json", str(out_json)))  # fmt: skip
    res = json.loads(out_json.read_text())["results"]
    return {"ppl": {c: res[c]["ppl"] for c in corpora}, "seconds": 0.0, "peak_rss_gb": None,
            "eval_fingerprint": {c: res[c]["eval_fingerprint"] for c in corpora}}  # fmt: skip


def sync_readme(key: str, text: str, readme: Path = ROOT / "README.md") -> bool:
    """Replace the block of ``readme`` between ``<!-- key:begin -->`` and ``<!-- key:end -->``
    with ``text`` (so a copied results table cannot go stale); False if there are no markers."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    doc = readme.read_text()
    i, j = doc.find(begin), doc.find(end)
    if i < 0 or j < i:
        return False
    readme.write_text(doc[: i + len(begin)] + "\n" + text.strip("\n") + "\n" + doc[j:])
    return True


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[plot]): no plot", flush=True)
        return None
    return plt
