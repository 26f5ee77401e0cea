"""The registered command line (slimkit.core.commands): every test below enrols from the command
registry, so a newly registered command or group is checked without a new test."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

import slimkit.cli  # noqa: F401  (registers the commands)
from slimkit.cli import main
from slimkit.core import commands
from slimkit.core.commands import Group, all_commands, arg, command
from slimkit.core.config import from_dict, from_preset, load_yaml, save_yaml, to_dict

ROOT = Path(__file__).resolve().parents[1]


def _variants():
    """(command, selector values) for every command and every value of its selectors."""
    out = []
    for cmd in all_commands():
        for sel in cmd.variants():
            flags = [x for k, v in sel.items() if v for x in (f"--{k.replace('_', '-')}", v)]
            out.append(pytest.param(cmd, flags, sel, id=" ".join([*cmd.path, *flags])))
    return out


VARIANTS = _variants()


def _required_args(cmd, tmp_path) -> list[str]:
    """Placeholder values for a command's required inputs (parsing touches no file)."""
    argv = []
    for a in cmd.args:
        if a.positional and a.kwargs.get("nargs") != "?":
            argv.append("x")
        elif a.kwargs.get("required"):
            argv += [a.flags[-1], "1" if a.kwargs.get("type") in (int, float) else "x"]
    if "out" in cmd.run and not cmd.out_default:
        argv += ["--out", str(tmp_path / "out")]
    return argv


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("cmd,flags,sel", VARIANTS)
def test_every_command_help_exits_0_and_lists_every_config_field(cmd, flags, sel, capsys):
    """Catches a command whose --help crashes, or a config field with no flag."""
    with pytest.raises(SystemExit) as e:
        main([*cmd.path, *flags, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {cmd.prog}")
    classes = cmd.config_classes(**sel)
    wanted = {_flag(f.name) for c in classes for f in dataclasses.fields(c)}
    wanted |= {"-v"} | {f"--{o}" for o in cmd.run}
    wanted |= {"--recipe"} if classes else set()
    listed = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))
    assert wanted <= listed, sorted(wanted - listed)


def _configs():
    seen = {}
    for cmd in all_commands():
        for sel in cmd.variants():
            for c in cmd.config_classes(**sel):
                seen.setdefault(c.__qualname__, c)
    return [pytest.param(c, id=n) for n, c in sorted(seen.items())]


@pytest.mark.parametrize("cls", _configs())
def test_every_registered_config_round_trips_through_yaml(cls, tmp_path):
    """to_dict -> YAML -> from_dict gives the same config (catches a field type YAML changes,
    e.g. a tuple read back as a list, or a __post_init__ that rewrites a value it was given)."""
    cfg = cls()
    save_yaml(to_dict(cfg), tmp_path / "c.yaml")
    assert from_dict(cls, load_yaml(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("cmd,flags,sel", [v for v in VARIANTS if v.values[0].configs])
def test_a_recipe_of_the_defaults_builds_the_defaults(cmd, flags, sel, tmp_path):
    """A recipe holding every config key of a command parses into exactly those configs
    (catches a key the mechanism routes to the wrong config or refuses)."""
    classes = cmd.config_classes(**sel)
    recipe = {}
    for c in reversed(classes):  # a key two configs share goes to the first, as in split_recipe
        recipe.update(to_dict(c()))
    save_yaml(recipe, tmp_path / "r.yaml")
    inv = cmd.parse([*flags, *_required_args(cmd, tmp_path), "--recipe", str(tmp_path / "r.yaml")])
    assert inv.configs == tuple(c() for c in classes)


def _preset_cases():
    out = []
    for cmd, flags, sel in (v.values for v in VARIANTS):
        classes = cmd.config_classes(**sel)
        for name in sorted({n for c in classes for n in getattr(c, "PRESETS", {})}):
            out.append(pytest.param(cmd, flags, sel, name, id=" ".join([*cmd.path, *flags, name])))
    return out


@pytest.mark.parametrize("cmd,flags,sel,name", _preset_cases())
def test_a_preset_resolves_the_same_from_cli_yaml_and_python(cmd, flags, sel, name, tmp_path):
    """Catches presets merged in one place only (the CLI once merged its own table with CBQ's,
    so Python and YAML users got different settings for the same preset name)."""
    need = _required_args(cmd, tmp_path)
    from_cli = cmd.parse([*flags, *need, "--preset", name]).configs
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"preset": name}))
    from_yaml = cmd.parse([*flags, *need, "--recipe", str(tmp_path / "r.yaml")]).configs
    classes = cmd.config_classes(**sel)
    python = from_preset(name, *classes)
    assert from_cli == from_yaml == (python if len(classes) > 1 else (python,))
    for c in classes:  # every preset key is a field of some config of the command
        keys = set(getattr(c, "PRESETS", {}).get(name, {}))
        assert keys <= {f.name for k in classes for f in dataclasses.fields(k)}, (c, keys)


def test_preset_precedence_method_over_calibration_recipe_and_flags_over_preset(tmp_path):
    from slimkit.quant.methods import CBQConfig
    from slimkit.workflows.run_config import CalibConfig

    cbq, calib = from_preset("demo", CBQConfig, CalibConfig, wbits=3)
    assert (cbq.epochs, cbq.wbits) == (CBQConfig.PRESETS["demo"]["epochs"], 3)
    assert calib.calib_seq_len == CBQConfig.PRESETS["demo"]["calib_seq_len"] != 512  # CBQ's wins
    assert from_preset("demo", CalibConfig).calib_seq_len == 512  # the generic one alone
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"preset": "paper", "n_calib": 7}))
    inv = commands.parse(["quantize", "m", "--method", "cbq", "--recipe", str(tmp_path / "r.yaml"),
                          "--calib-seq-len", "64", "--out", str(tmp_path / "o")])  # fmt: skip
    q, c, _ = inv.configs
    assert (q.epochs, q.lr_round, c.n_calib, c.calib_seq_len) == (20, 1e-3, 7, 64)


def test_unknown_preset_and_unknown_recipe_key_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"preset": "turbo"}))
    assert main(["train-lm", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "preset 'turbo'" in capsys.readouterr().err
    assert main(["quantize", "m", "--recipe", str(tmp_path / "r.yaml"), "--out", "o"]) == 2
    assert "unknown preset 'turbo'" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"wbit": 4}))
    assert main(["quantize", "m", "--recipe", str(tmp_path / "r.yaml"), "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "recipe key 'wbit'" in err and err.count("error:") == 1
    assert not (tmp_path / "o").exists()


def test_unknown_command_or_group_command_prints_the_choices_and_exits_2(capsys):
    """`slimkit sam --help` used to exit 2 with a usage that left out `train`."""
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nope'" in err and all(
        c in err for c in ("quantize", "sam", "train-lm")
    )
    assert main(["sam", "nope"]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown command 'nope'" in err
        and "cache-embeddings, distill, eval, everything, predict, quantize, train" in err
    )
    assert main(["sam"]) == 2
    assert "predict" in capsys.readouterr().err
    for argv in ([], ["--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert all(f"  {c.path[0]} " in out for c in all_commands()), out
    for name, node in commands.COMMANDS.items():
        if isinstance(node, Group):
            assert main([name, "--help"]) == 0
            out = capsys.readouterr().out
            assert all(f"  {c} " in out for c in node.commands.names()), out


@pytest.fixture
def scratch_group():
    yield "scratch"
    commands.COMMANDS._items.pop("scratch", None)
    commands.COMMANDS._meta.pop("scratch", None)


def test_a_new_group_is_one_registration(scratch_group, tmp_path, capsys):
    """A command group (the next `sr`, `clip`, `lvm`) needs no parser code: its flags, run
    options, recipe and help come from the registration."""

    @dataclasses.dataclass
    class ToyConfig:
        steps: int = dataclasses.field(default=3, metadata={"help": "optimizer steps"})
        mode: str = dataclasses.field(default="a", metadata={"choices": ["a", "b"]})

    seen = {}

    @command("train", group=scratch_group, configs=[ToyConfig], run=("out", "resume", "overwrite"),
             args=[arg("--tag", default="t")], help="toy trainer")  # fmt: skip
    def toy_train(inv):
        seen.update(cfg=inv.configs[0], **inv.run_kwargs, tag=inv.ns.tag)
        return 0

    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"mode": "b", "steps": 9, "tag": "r"}))
    argv = ["--recipe", str(tmp_path / "r.yaml"), "--steps", "5", "--out", "o", "--resume"]
    assert main([scratch_group, "train", *argv]) == 0
    assert seen == {"cfg": ToyConfig(steps=5, mode="b"), "out": "o", "resume": True,
                    "overwrite": False, "command": "slimkit scratch train " + shlex.join(argv),
                    "tag": "r"}  # fmt: skip
    assert main([scratch_group, "--help"]) == 0 and "toy trainer" in capsys.readouterr().out
    for bad in (["--mode", "c", "--out", "o"], ["--steps", "1"]):  # a bad choice; no --out
        with pytest.raises(SystemExit) as e:  # argparse's usage error, as for every command
            main([scratch_group, "train", *bad])
        assert e.value.code == 2
    assert "invalid choice: 'c'" in capsys.readouterr().err


def _readme_commands():
    """Every `slimkit ...` command of the code blocks of the README and docs/*.md (where the
    method write-ups live), and the complete inline ones."""
    text = "\n".join(
        p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    )
    found, buf, fence = [], "", False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fence = not fence
            continue
        if fence and (buf or re.match(r"\s*(torchrun .*-m slimkit |slimkit )", line)):
            buf = f"{buf} {line.strip()}".strip()
            if buf.endswith("\\"):
                buf = buf[:-1]
                continue
            found.append(buf)
            buf = ""
    found += [m for m in re.findall(r"`(slimkit [^`\n]*--out[^`\n]*)`", text)
              if not re.search(r"\s[A-Z]\b", m)]  # fmt: skip
    argvs = []
    for c in found:
        words = shlex.split(c.split(" | ")[0], comments=True)
        argvs.append(words[words.index("slimkit") + 1 :] if words[0] == "slimkit" else
                     words[words.index("-m") + 2 :])  # fmt: skip
    return argvs


README_COMMANDS = _readme_commands()


def test_readme_has_commands_for_every_top_level_command():
    assert len(README_COMMANDS) > 30
    assert {"quantize", "prune", "export", "distill", "train-lm", "sam"} <= {a[0] for a in README_COMMANDS}  # fmt: skip


@pytest.mark.parametrize("argv", README_COMMANDS, ids=" ".join)
def test_every_readme_command_parses_and_builds_its_configs(argv, monkeypatch):
    """Catches a README command that a flag rename, a registration change or a recipe edit
    broke (parsing and config validation only; nothing runs)."""
    monkeypatch.chdir(ROOT)  # the README's recipe paths are relative to the repository
    inv = commands.parse(argv)
    assert len(inv.configs) == len(inv.classes)


def test_demo_runs_what_its_recorded_command_line_says():
    """`make demo` builds its configs in Python and records a `slimkit quantize` line in the run
    directory; catches the two drifting apart (e.g. a preset resolved differently)."""
    from slimkit.workflows.demo import DEMO_ARGS, demo_configs

    inv = commands.parse(["quantize", *shlex.split(DEMO_ARGS), "--out", "o"])
    assert inv.configs == demo_configs()


def test_prune_then_quantize_gives_wbits_to_the_quantizer():
    """`prune --method sparsegpt --then rtn --wbits 4` used to set --wbits to 16 for both steps
    and stop with "--wbits must be an integer in 2..8 (got 16)"."""
    from slimkit.cli.llm import prune_steps

    def steps(*argv):
        return prune_steps(commands.parse(["prune", "m", *argv, "--out", "o"]))

    sgpt, rtn = steps("--method", "sparsegpt", "--sparsity", "0.5", "--then", "rtn", "--wbits", "3")
    assert (type(sgpt).__name__, sgpt.wbits, type(rtn).__name__, rtn.wbits) == (
        "SparseGPTConfig", 16, "RTNConfig", 3)  # fmt: skip
    (joint,) = steps("--method", "sparsegpt", "--then", "gptq", "--wbits", "3")
    assert (type(joint).__name__, joint.wbits) == ("SparseGPTConfig", 3)  # one joint pass
    wanda, gptq = steps("--method", "wanda", "--then", "gptq", "--wbits", "3")
    assert gptq.keep_zeros and gptq.wbits == 3
