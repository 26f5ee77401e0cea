"""Bad input at the foundation: every case gets one line on stderr and exit status 2 (or a
SlimkitError from the API), nothing half-written, and nothing expensive done first."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Crash, crash_on_call, random_ids, tiny_model
from safetensors.torch import load_file

import slimkit
from slimkit.cli import main
from slimkit.core.errors import SlimkitError
from slimkit.core.rundir import RunDir, atomic_output

SMALL = ["--group-size", "32", "--n-calib", "4", "--calib-seq-len", "32"]


@pytest.fixture(autouse=True)
def fresh_console_log():
    """The console handler writes to the stderr of the test that created it; give each test its
    own, so that a closed capture stream does not print a logging traceback into this one."""
    import logging

    logger = logging.getLogger("slimkit")
    for h in [h for h in logger.handlers if getattr(h, "_slimkit_console", False)]:
        logger.removeHandler(h)
    yield


def refused(capsys, args: list[str], message: str) -> str:
    """Run the CLI; it must exit 2 with exactly one error line holding ``message``."""
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err, err
    return err


def no_output(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- weight files: truncated, random bytes, pickles that run code ------------------------------


def write_payload(marker: str) -> None:
    """What a malicious checkpoint would run when unpickled: leaves a marker file."""
    Path(marker).write_text("executed")


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (write_payload, (self.marker,))


@pytest.fixture(scope="module")
def pickled(tmp_path_factory, tiny_model_dir):
    """A model directory whose pytorch_model.bin, and a .pth, each hold a code payload."""
    root = tmp_path_factory.mktemp("pickled")
    marker = root / "EXECUTED"
    d = copy_model(tiny_model_dir, root / "model")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save({**sd, "payload": Payload(marker)}, d / "pytorch_model.bin")
    torch.save({"state_dict": {"payload": Payload(marker)}}, root / "weights.pth")
    return {"dir": d, "pth": root / "weights.pth", "marker": marker}


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_corrupt_safetensors_model_is_one_line_for_quantize_and_eval(
    tiny_model_dir, tmp_path, capsys, how
):
    # bug: safetensors' Rust error surfaced as a traceback from transformers
    d = copy_model(tiny_model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))
    message = "is truncated" if how == "truncated" else "is not a safetensors file"
    out = tmp_path / "q"
    refused(capsys, ["quantize", str(d), *SMALL, "--out", str(out)], message)
    assert no_output(out)
    refused(capsys, ["eval", str(d), "--ppl", "wiki-offline"], message)


def test_corrupt_safetensors_sam_checkpoint_is_one_line(tmp_path, capsys):
    # bug: `sam predict` on a cut-short model.safetensors gave a safetensors traceback
    from PIL import Image
    from safetensors.torch import save_file

    from slimkit.sam.model import build_sam

    run = tmp_path / "sam-run"
    run.mkdir()
    (run / "sam_config.json").write_text(json.dumps({"arch": "vit_mini"}))
    save_file(build_sam("vit_mini").state_dict(), run / "model.safetensors")
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) - 100])
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    args = ["sam", "predict", str(img), "--checkpoint", str(run / "model.safetensors"),
            "--point", "4,4", "--out", str(tmp_path / "m.png")]  # fmt: skip
    refused(capsys, args, "is truncated")


@pytest.mark.parametrize(
    "command",
    [
        "quantize",
        "eval",
        "generate",
        "inherit",
        "train-lm",
        "compress-tokenizer",
        "analyze-collapse",
    ],
)
def test_pickled_model_directory_is_refused_in_one_line_without_running_it(
    pickled, tmp_path, capsys, command
):
    # bug: weights_only=True refused the pickle, but as a transformers traceback
    d, out = str(pickled["dir"]), str(tmp_path / "o")
    args = {
        "quantize": ["quantize", d, *SMALL, "--out", out],
        "eval": ["eval", d, "--ppl", "wiki-offline"],
        "generate": ["generate", d, "--prompt", "The city"],
        "inherit": ["inherit", d, "--score", "l1", "--out", out],
        "train-lm": ["train-lm", "--init", d, "--steps", "2", "--out", out],
        "compress-tokenizer": ["compress-tokenizer", d, "--vocab", "300", "--out", out],
        "analyze-collapse": ["analyze-collapse", d],
    }[command]
    refused(capsys, args, "weights_only=True")
    assert not pickled["marker"].exists()


@pytest.mark.parametrize("command", ["train-classifier", "distill", "cka"])
def test_pickled_pth_for_init_or_teacher_is_refused_in_one_line(pickled, tmp_path, capsys, command):
    # bug: a pickled .pth given to --init / --teacher / cka came back as an UnpicklingError traceback
    pth, out = str(pickled["pth"]), str(tmp_path / "o")
    args = {
        "train-classifier": ["train-classifier", "--init", pth, "--epochs", "1", "--out", out],
        "distill": [
            "distill",
            "--teacher",
            pth,
            "--teacher-arch",
            "tiny-resnet",
            "--epochs",
            "1",
            "--out",
            out,
        ],  # fmt: skip
        "cka": [
            "cka",
            "--teacher",
            pth,
            "--teacher-arch",
            "tiny-resnet",
            "--student",
            pth,
            "--student-arch",
            "tiny-resnet",
        ],  # fmt: skip
    }[command]
    refused(capsys, args, "weights_only=True")
    assert not pickled["marker"].exists()


def test_plain_pickled_state_dict_model_still_loads(tiny_model_dir, tmp_path):
    # the checks must not refuse a legitimate pytorch_model.bin (tensors only)
    d = copy_model(tiny_model_dir, tmp_path / "bin")
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    model, _ = slimkit.load_model(str(d))
    assert sum(p.numel() for p in model.parameters()) > 0


# -- config.json: unknown model type, custom code ----------------------------------------------


def edit_config(d: Path, **changes) -> None:
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


def test_unknown_model_type_is_one_line(tiny_model_dir, tmp_path, capsys):
    # bug: transformers' ValueError traceback ("does not recognize this architecture")
    d = copy_model(tiny_model_dir, tmp_path / "m")
    edit_config(d, model_type="llama9000")
    out = tmp_path / "q"
    refused(capsys, ["quantize", str(d), *SMALL, "--out", str(out)], "'llama9000' is not known")
    assert no_output(out)


def test_config_that_needs_custom_code_asks_for_trust_remote_code(tiny_model_dir, tmp_path, capsys):
    # bug: transformers' ValueError traceback instead of naming trust_remote_code
    d = copy_model(tiny_model_dir, tmp_path / "m")
    edit_config(d, model_type="mine", auto_map={"AutoConfig": "configuration_mine.MineConfig",
                "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"})  # fmt: skip
    err = refused(capsys, ["eval", str(d), "--ppl", "wiki-offline"], "needs trust_remote_code")
    assert "modeling_mine.MineForCausalLM" in err
    with pytest.raises(SlimkitError, match="trust_remote_code"):
        slimkit.load_model(str(d))


# -- outputs: read-only places, existing directories, atomic writes ----------------------------


def test_out_below_a_file_is_one_line_for_every_writer(tiny_model_dir, tmp_path, capsys):
    # bug: an OSError traceback (mkdir) when --out cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = str(blocker / "sub" / "o")
    for args in (
        ["quantize", str(tiny_model_dir), *SMALL, "--out", out],
        ["inherit", str(tiny_model_dir), "--score", "l1", "--out", out],
        ["compress-tokenizer", str(tiny_model_dir), "--vocab", "300", "--out", out],
    ):
        refused(capsys, args, "is not a directory")


def test_read_only_out_directory_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # bug: an OSError traceback for --out inside a read-only directory. Root writes anywhere, so
    # the read-only file system's answer is simulated for the run directory's mkdir.
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # a real read-only directory where permissions apply
        ro.chmod(0o555)
        try:
            refused(capsys, ["quantize", str(tiny_model_dir), *SMALL, "--out", str(ro / "o")],
                    "is not writable")  # fmt: skip
        finally:
            ro.chmod(0o755)
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *a, **k):
        if ro in self.parents:
            raise OSError(30, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(SlimkitError, match="Read-only file system"):
        RunDir(ro / "o")
    with pytest.raises(SlimkitError, match="Read-only file system"):
        with atomic_output(ro / "x"):
            pass


def quantized_run(tmp_path: Path, tok) -> Path:
    model = tiny_model("llama", vocab=len(tok), layers=2)
    model, result = slimkit.quantize(
        model, slimkit.RTNConfig(wbits=4, group_size=32), random_ids(2, 16, len(tok))
    )
    slimkit.save_quantized(model, tok, tmp_path / "run", result)
    return tmp_path / "run"


def test_export_into_existing_directory_needs_overwrite(tmp_path, tiny_tokenizer, capsys):
    # bug (reported): export wrote into an existing non-empty --out without --overwrite
    run = quantized_run(tmp_path, tiny_tokenizer)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["export", str(run), "--format", "compressed-tensors", "--out", str(out)]
    refused(capsys, args, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_export_killed_during_verify_leaves_no_final_directory(tmp_path, tiny_tokenizer):
    # bug: the export was renamed into place before --verify ran, so a kill during verification
    # left an unverified export under the final name
    from slimkit.export import ExportConfig, export
    from slimkit.export.gptq import GPTQExporter

    run = quantized_run(tmp_path, tiny_tokenizer)
    out = tmp_path / "g"
    with pytest.MonkeyPatch.context() as mp:
        crash_on_call(mp, GPTQExporter, "load", 1)  # the reload is part of --verify
        with pytest.raises(Crash):
            export(run, out, ExportConfig(format="gptq", verify=True))
    assert not out.exists()
    r = export(run, out, ExportConfig(format="gptq", verify=True))
    assert r["verify"]["passed"] and json.loads((out / "export.json").read_text())["verify"]
    assert not out.with_name("g.partial").exists()


@pytest.mark.parametrize("command", ["inherit", "compress-tokenizer"])
def test_inherit_and_compress_tokenizer_refuse_existing_out(
    tiny_model_dir, tmp_path, capsys, command
):
    # bug: both wrote into an existing non-empty --out with exit 0
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = {
        "inherit": ["inherit", str(tiny_model_dir), "--score", "l1", "--layers", "2"],
        "compress-tokenizer": [
            "compress-tokenizer",
            str(tiny_model_dir),
            "--vocab",
            "300",
            "--tokenizer-only",
        ],  # fmt: skip
    }[command] + ["--out", str(out)]
    refused(capsys, args, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    if command == "inherit":
        assert main([*args, "--overwrite"]) == 0
        assert (out / "inherit.json").is_file() and not (out / "keep.txt").exists()


def test_inherit_shows_progress(tiny_model_dir, tmp_path, capsys):
    # bug: inherit was silent from start to end
    assert main(["inherit", str(tiny_model_dir), "--score", "l1", "--layers", "2",
                 "--out", str(tmp_path / "child")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "loading the parent" in err and "inheriting 2 of 3 blocks" in err
    assert "copying blocks" in err and "writing" in err


# -- validation before the first expensive step -------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--calib-seq-len", "100000"],
            "--calib-seq-len 100000 is longer than the model's context",
        ),
        (["--ppl", "wiki-offline", "--seq-len", "4096"], "--seq-len 4096 is longer than"),
        (["--ppl", "wiki-offlin"], "unknown dataset 'wiki-offlin'"),
        (["--ppl", "file:/nonexistent/eval.txt"], "data file not found"),
    ],
)
def test_refused_before_the_model_is_compressed(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                args, message):  # fmt: skip
    # bug: a too-long --calib-seq-len started the run; an unknown --ppl corpus was refused only
    # after the whole quantization
    import slimkit.workflows.llm as wf

    def must_not_run(*a, **k):
        raise AssertionError("compression started before the input was checked")

    monkeypatch.setattr(wf, "_apply", must_not_run)
    out = tmp_path / "o"
    base = ["quantize", str(tiny_model_dir), "--group-size", "32", "--n-calib", "4"]
    refused(capsys, [*base, *(["--calib-seq-len", "32"] if "--calib-seq-len" not in args else []),
                     *args, "--out", str(out)], message)  # fmt: skip
    assert no_output(out)


def test_eval_refuses_windows_longer_than_the_context(tiny_model_dir, capsys):
    # bug: perplexity windows past max_position_embeddings were evaluated without a word
    refused(capsys, ["eval", str(tiny_model_dir), "--ppl", "wiki-offline", "--seq-len", "4096"],
            "--seq-len 4096 is longer than the model's context of 2048 tokens")  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu_leaves_no_partial(tiny_model_dir, tmp_path, capsys):
    # bug: OUT.partial was left behind when the pipeline found the device missing
    out = tmp_path / "o"
    refused(capsys, ["quantize", str(tiny_model_dir), *SMALL, "--device", "cuda", "--out", str(out)],
            "not available")  # fmt: skip
    assert no_output(out)


def test_bad_input_found_after_the_run_directory_exists_removes_it(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    # bug: a SlimkitError raised once OUT.partial existed (before any checkpoint) left it behind
    import slimkit.workflows.llm as wf

    def late_refusal(*a, **k):
        raise SlimkitError("refused late")

    monkeypatch.setattr(wf, "_apply", late_refusal)
    out = tmp_path / "o"
    refused(capsys, ["quantize", str(tiny_model_dir), *SMALL, "--out", str(out)], "refused late")
    assert no_output(out)


def test_run_dir_context_keeps_what_resume_needs(tmp_path):
    with pytest.raises(SlimkitError):
        with RunDir(tmp_path / "a") as rd:
            raise SlimkitError("bad input")
    assert not rd.path.exists()
    with pytest.raises(SlimkitError):  # a checkpoint exists: kept for --resume
        with RunDir(tmp_path / "b") as rd:
            rd.checkpoint_dir.mkdir()
            (rd.checkpoint_dir / "progress.json").write_text("{}")
            raise SlimkitError("failed after a checkpoint")
    assert rd.path.exists()
    with pytest.raises(Crash):  # a crash is not bad input: kept
        with RunDir(tmp_path / "c") as rd:
            raise Crash
    assert rd.path.exists()
    with RunDir(tmp_path / "d") as rd:
        rd.commit()
    assert (tmp_path / "d").is_dir() and not rd.path.exists()


def nan_model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    d = copy_model(tiny_model_dir, tmp_path / "nan")
    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    m.save_pretrained(d)
    return d


@pytest.mark.parametrize("method", ["cbq", "gptq"])
def test_nan_weights_are_refused_before_the_run(tiny_model_dir, tmp_path, capsys, method):
    # bug: NaN weights left OUT.partial behind, and CBQ told the user to "increase --damp",
    # a flag CBQ does not have
    d = nan_model_dir(tmp_path, tiny_model_dir)
    out = tmp_path / "o"
    err = refused(capsys, ["quantize", str(d), "--method", method, *SMALL, "--out", str(out)],
                  "model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf")  # fmt: skip
    assert "--damp" not in err and no_output(out)


def test_nan_hessian_names_the_real_cause_not_damp():
    # bug: a NaN Hessian (from NaN weights or activations) was reported as "increase --damp",
    # which no dampening fixes and CBQ, whose GPTQ start reaches this code, does not have
    from slimkit.quant.obs import inverse_factor

    H = torch.eye(8)
    H[2, 2] = float("nan")
    with pytest.raises(SlimkitError, match="not finite") as e:
        inverse_factor(torch.randn(4, 8), H, damp=0.01, act_order=False)
    assert "--damp" not in str(e.value)
    with pytest.raises(SlimkitError, match="--rounding-init nearest"):  # finite, indefinite
        inverse_factor(torch.randn(4, 8), -torch.eye(8), damp=0.01, act_order=False)


@pytest.mark.parametrize(
    "args",
    [
        ["analyze-collapse", "no-such-model", "--json", "{bad}/profiles.json"],
        ["analyze-collapse", "no-such-model", "--plot", "{bad}/collapse.png"],
        ["cka", "--teacher", "no-such-run", "--student", "no-such-run", "--plot", "{bad}/cka.png"],
        ["eval", "no-such-model", "--json", "{bad}/eval.json"],
        ["sam", "predict", "no-such.png", "--random-weights", "--out", "{bad}/mask.png"],
    ],
    ids=["collapse-json", "collapse-plot", "cka-plot", "eval-json", "sam-predict-out"],
)
def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(args, tmp_path, capsys):
    # bug: --json / --plot / sam predict --out were opened only after the model ran (minutes),
    # then failed with an OSError traceback. The check comes first, so the bad model path given
    # here is never reached: the one error line names the output.
    (tmp_path / "a-file").write_text("x")
    bad = str(tmp_path / "a-file")
    refused(capsys, [a.replace("{bad}", bad) for a in args], "cannot write")
