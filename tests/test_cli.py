import json
import subprocess
import sys

import pytest
import yaml

from slimkit.cli import main

SMALL = ["--group-size", "32", "--n-calib", "4", "--calib-seq-len", "32", "--batch-size", "2"]


def test_quantize_then_eval_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["quantize", str(tiny_model_dir), "--method", "gptq", "--wbits", "4", "--group-size", "32",
               *SMALL, "--ppl", "wiki-offline", "--seq-len", "64", "--max-windows", "3", "--eval-fp", "--out", str(out)])  # fmt: skip
    assert rc == 0
    for f in (
        "model.safetensors",
        "quant_state.safetensors",
        "quantization.json",
        "config.yaml",
        "report.json",
        "README.md",
        "run.log",
    ):
        assert (out / f).is_file(), f
    assert not (tmp_path / "run.partial").exists()
    report = json.loads((out / "report.json").read_text())
    ev = report["eval"]["wiki-offline"]
    assert ev["quant"]["n_windows"] == 3 and ev["fp"]["ppl"] > 1
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        cfg["method"] == "gptq"
        and cfg["quant"]["group_size"] == 32
        and cfg["calibration"]["n_calib"] == 4
    )
    assert "fake-quant" in (out / "README.md").read_text().lower()
    capsys.readouterr()
    assert (
        main(["eval", str(out), "--ppl", "wiki-offline", "--seq-len", "64", "--max-windows", "3"])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"ppl {ev['quant']['ppl']:.4f}" in printed  # the saved model reproduces the run's number


def test_recipe_and_w4a8_reload_keeps_activation_quantizers(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "smoothquant",
                "wbits": 4,
                "abits": 8,
                "alpha": 0.6,
                "n_calib": 4,
                "calib_seq_len": 32,
            }
        )
    )
    out = tmp_path / "sq"
    assert main(["quantize", str(tiny_model_dir), "--recipe", str(recipe), "--group-size", "-1",
                 "--ppl", "wiki-offline", "--seq-len", "64", "--max-windows", "2", "--out", str(out)]) == 0  # fmt: skip
    meta = json.loads((out / "quantization.json").read_text())
    assert (
        meta["method"] == "smoothquant"
        and meta["activations"]["bits"] == 8
        and meta["config"]["alpha"] == 0.6
    )
    ppl = json.loads((out / "report.json").read_text())["eval"]["wiki-offline"]["quant"]["ppl"]
    capsys.readouterr()
    main(["eval", str(out), "--ppl", "wiki-offline", "--seq-len", "64", "--max-windows", "2"])
    assert f"ppl {ppl:.4f}" in capsys.readouterr().out


def test_list(capsys):
    for what, expect in (
        ("methods", "gptq"),
        ("models", "smollm2-135m"),
        ("datasets", "bbc-news"),
        ("families", "gpt2"),
    ):
        assert main(["list", what]) == 0
        assert expect in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "awqq"], "unknown method 'awqq'"),
        (["--wbits", "9"], "--wbits must be an integer in 2..8"),
        (["--wbits", "1"], "--wbits must be an integer in 2..8"),
        (["--abits", "12"], "--abits must be an integer in 2..8"),
        (["--group-size", "48"], "group size 48 does not divide the input width 64"),
        (["--calib", "file:/nonexistent/data.txt"], "data file not found"),
        (["--calib", "nope"], "unknown dataset 'nope'"),
        (["--n-calib", "100000"], "need"),
        (["--n-calib", "0"], "--n-calib must be >= 1"),
    ],
)
def test_bad_input_one_message_nonzero_exit_no_output(
    tiny_model_dir, tmp_path, capsys, args, message
):
    out = tmp_path / "bad"
    base = [
        "quantize",
        str(tiny_model_dir),
        "--n-calib",
        "4",
        "--calib-seq-len",
        "32",
        "--group-size",
        "32",
    ]
    rc = main([*base, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("error:") == 1
    assert not out.exists() and not (tmp_path / "bad.partial").exists()


def test_missing_model_and_empty_calibration(tmp_path, tiny_model_dir, capsys):
    assert main(["quantize", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert (
        main(
            [
                "quantize",
                str(tiny_model_dir),
                "--group-size",
                "32",
                "--calib",
                f"file:{empty}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "has 0 tokens" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_existing_output_is_not_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["quantize", str(tiny_model_dir), *SMALL, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slimkit", "quantize", "x", "--method", "nope", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "unknown method 'nope'" in r.stderr


def test_static_per_tensor_activations_survive_save_and_reload(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "static"
    assert main(["quantize", str(tiny_model_dir), "--method", "rtn", *SMALL, "--abits", "6",
                 "--act-granularity", "per-tensor", "--ppl", "wiki-offline", "--seq-len", "64",
                 "--max-windows", "2", "--out", str(out)]) == 0  # fmt: skip
    from safetensors.torch import load_file

    ranges = {
        k: v
        for k, v in load_file(out / "quant_state.safetensors").items()
        if k.endswith("act_absmax")
    }
    assert len(ranges) == 21 and all(float(v) > 0 for v in ranges.values())
    ppl = json.loads((out / "report.json").read_text())["eval"]["wiki-offline"]["quant"]["ppl"]
    capsys.readouterr()
    main(["eval", str(out), "--ppl", "wiki-offline", "--seq-len", "64", "--max-windows", "2"])
    assert f"ppl {ppl:.4f}" in capsys.readouterr().out


def test_lm_eval_tasks_without_the_harness_say_how_to_get_it(tiny_model_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed")
    assert main(["eval", str(tiny_model_dir), "--tasks", "hellaswag"]) == 2
    assert "pip install 'slimkit[eval]'" in capsys.readouterr().err
