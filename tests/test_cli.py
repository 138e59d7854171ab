"""The command line itself: help without torch, --version, `train`'s options generated from TrainConfig
(every field a flag, defaults on screen, --print-config), and README's list of commands."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cache_factory import make_fake_cache
from kdpipe import config
from kdpipe.cli.main import app
from kdpipe.cli.options import with_settings
from kdpipe.config import read_toml, setting
from kdpipe.trainconfig import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [c.name for c in app.registered_commands]
HEAVY = ("torch", "open_clip", "timm", "torchvision", "h5py", "numpy")
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}  # rich wraps and cuts help at the terminal's width


def flat(text: str) -> str:
    """Help output with rich's panel borders and line wrapping undone."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


@functools.cache
def train_options() -> dict[str, Any]:
    """The click options of `kdpipe train`, by parameter name (TrainConfig's field names)."""
    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


# --------------------------------------------------------------------------- help and version


def test_help_of_kdpipe_and_of_every_command_imports_no_torch():
    """`kdpipe --help` and `kdpipe CMD --help` load the CLI only: no stage module, no torch."""
    script = (
        "import json, sys\n"
        "from kdpipe.cli.main import app\n"
        f"heavy = {HEAVY!r}\n"
        "seen = {}\n"
        f"for args in [[]] + [[c] for c in {COMMANDS!r}]:\n"
        "    try:\n"
        "        app(args + ['--help'], prog_name='kdpipe')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (args, exit.code)\n"
        "    seen[' '.join(args) or 'kdpipe'] = sorted(m for m in heavy if m in sys.modules)\n"
        "print(json.dumps(seen))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) == len(COMMANDS) + 1 and len(COMMANDS) >= 10
    assert {cmd: mods for cmd, mods in seen.items() if mods} == {}


def test_version_prints_the_installed_distribution_s_version():
    done = subprocess.run([sys.executable, "-m", "kdpipe.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"kdpipe {importlib.metadata.version('kdpipe')}\n"


def test_readme_names_every_command():
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in COMMANDS if not re.search(rf"\bkdpipe {re.escape(c)}\b", readme)]
    assert not missing, f"README.md never shows `kdpipe {missing[0]}` (one line in 'The commands')"


# --------------------------------------------------------------------------- train: one flag per field


def test_every_train_setting_is_a_flag_with_its_dataclass_default():
    for f in dataclasses.fields(TrainConfig):
        option = train_options()[f.name]
        assert f"--{f.name.replace('_', '-')}" in option.opts, f.name
        assert option.help and option.help == f.metadata.get(config.HELP), (
            f"TrainConfig.{f.name} has no help text: declare it as {f.name}: T = setting(DEFAULT, 'what it does') "
            "(kdpipe.config.setting), the text `kdpipe train --help` shows")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        if isinstance(default, dict):
            assert option.default is None and option.multiple, f.name  # repeatable KEY=VALUE, empty default
        else:
            assert option.default == shown and option.show_default == (shown not in (None, "")), f.name
    # short names kept from the hand-written options
    shorts = {f.name: train_options()[f.name].opts for f in dataclasses.fields(TrainConfig)}
    assert {k: [o for o in v if not o.startswith("--")] for k, v in shorts.items() if len(v) > 1} == {
        "student": ["-s"], "cache": ["-c"], "out": ["-o"], "losses": ["-l"], "epochs": ["-e"],
        "batch_size": ["-b"], "workers": ["-w"]}


def test_train_help_shows_the_settings_that_were_toml_only_with_their_defaults():
    result = CliRunner().invoke(app, ["train", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for flag, default in (("--min-lr-ratio", "0.0"), ("--grad-clip", "0.0"), ("--mask-ratio", "0.75"),
                          ("--shuffle-buffer", "1000"), ("--val-samples", "1000"), ("--bn-samples", "256"),
                          ("--max-nonfinite", "5"), ("--verify", "size"), ("--losses", "clip=1,crd=1,icl=1,fd=7.8125")):
        assert re.search(rf"{flag} .*?\[default: {re.escape(default)}\]", text), flag
    for flag in ("--ckpt-every", "--mean A,B,...", "--std A,B,...", "--loss-options KEY=VALUE",
                 "--student-kwargs KEY=VALUE", "--text-student-kwargs KEY=VALUE", "--print-config"):
        assert flag in text, flag


@dataclass
class Toy:
    """A config as another engineer might extend it: plain fields, no command-line code anywhere."""

    name: str = "a"
    steps: int = setting(3, "Steps.", short="-n", minimum=1)
    rate: float | None = None
    tags: list[str] = field(default_factory=list)
    sizes: tuple[int, ...] = (1, 64)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    on: bool = True
    added_later: int = 7  # a new field: a flag with nothing else to write


def _toy_app(seen: list) -> typer.Typer:
    toy = typer.Typer()

    def command(flags: dict[str, Any], extra: str = typer.Option("x", "--extra")) -> None:
        """A toy command."""
        seen.append((flags, extra))

    toy.command("go")(with_settings(Toy, command))
    toy.command("other")(lambda: None)  # two commands: `go` stays a sub-command
    return toy


def test_with_settings_gives_each_field_a_flag_and_passes_only_those_given():
    seen: list = []
    toy = _toy_app(seen)
    result = CliRunner().invoke(toy, ["go", "--added-later", "9", "-n", "4", "--rate", "0.5", "--tags", "a,b",
                                      "--sizes", "1,8", "--options", "hinton.T=2", "--options", "hinton.alpha=1",
                                      "--options", "crd.mode=soft", "--no-on", "--extra", "y"])
    assert result.exit_code == 0, result.output
    flags, extra = seen[-1]
    assert flags == {"added_later": 9, "steps": 4, "rate": 0.5, "tags": ["a", "b"], "sizes": (1, 8),
                     "options": {"hinton": {"T": 2, "alpha": 1}, "crd": {"mode": "soft"}}, "on": False}
    assert extra == "y" and isinstance(flags["rate"], float)
    assert CliRunner().invoke(toy, ["go"]).exit_code == 0 and seen[-1] == ({}, "x")  # defaults are not flags


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps"),  # typer's own range check; its wording varies between versions
    (["--options", "T=2"], "--options: options = {'T': 2} is a dict, expected dict[str, dict[str, Any]]"),
    (["--options", "hinton.T"], "--options: expected KEY=VALUE (e.g. hinton.T=2), got 'hinton.T'"),
    (["--sizes", "1,x"], "--sizes: sizes = [1, 'x'] is a list, expected tuple[int, ...]"),
])
def test_with_settings_refuses_a_bad_value_naming_the_flag(args, message):
    result = CliRunner().invoke(_toy_app([]), ["go", *args], env=WIDE)
    assert result.exit_code == 2 and message in flat(result.output).replace("Invalid value for ", ""), result.output


# --------------------------------------------------------------------------- train: --print-config


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_print_config_keeps_the_precedence_and_trains_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "config.toml", 'cache = "C"\nstudent = "resnet18"\nepochs = 4\nlr = 0.5\ngrad_clip = 2.0\n')
    user = _write(tmp_path / "u.toml", "epochs = 6\nlr = 0.25\n[loss_options.hinton]\nT = 4.0\n")
    args = ["train", "-o", str(run), "--resume", "--config", str(user), "--print-config", "--lr", "0.125",
            "--mean", "0.5,0.5,0.5", "--loss-options", "hinton.T=2", "--min-lr-ratio", "0.1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = read_toml(_write(tmp_path / "printed.toml", result.output))
    # defaults < RUN/config.toml (--resume) < --config < flags
    assert (printed["batch_size"], printed["student"], printed["grad_clip"], printed["epochs"], printed["lr"],
            printed["min_lr_ratio"], printed["mean"], printed["loss_options"]) == (
        64, "resnet18", 2.0, 6, 0.125, 0.1, [0.5, 0.5, 0.5], {"hinton": {"T": 2}})
    assert "resume" not in printed and "max_steps" not in printed  # as RUN/config.toml: no null, no resume
    assert sorted(run.iterdir()) == [run / "config.toml"]  # nothing trained, nothing written


def test_print_config_is_what_the_run_writes_and_every_new_flag_reaches_training(tmp_path):
    cache = make_fake_cache(tmp_path / "cache", n_train=16, n_val=8, dim=16, views=2, captions=2, shard_size=16)
    out = tmp_path / "run"
    args = ["train", "-s", "tiny", "-c", str(cache), "-o", str(out), "-b", "8", "-w", "0", "--max-steps", "2",
            "--device", "cpu", "--no-progress", "--losses", "fd=1,hinton=1", "--loss-options", "hinton.T=2",
            "--min-lr-ratio", "0.1", "--grad-clip", "1", "--shuffle-buffer", "4", "--val-samples", "4",
            "--bn-samples", "4", "--ckpt-every", "1", "--max-nonfinite", "2", "--verify", "none",
            "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--mask-ratio", "0.5"]
    printed = CliRunner().invoke(app, [*args, "--print-config"])
    assert printed.exit_code == 0 and not out.exists(), printed.output
    trained = CliRunner().invoke(app, args)
    assert trained.exit_code == 0, trained.output
    assert (out / "config.toml").read_text() == printed.output
    spec = json.loads((out / "student.json").read_text())
    assert spec["losses"]["options"] == {"hinton": {"T": 2}}
    assert spec["mean"] == [0.5, 0.5, 0.5] and spec["std"] == [0.25, 0.25, 0.25]
