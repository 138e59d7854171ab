"""kdpipe.config: TOML file + flags -> a stage's config dataclass, and `--config` on every stage command."""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from typer.testing import CliRunner

from kdpipe import config
from kdpipe.cli.main import app
from kdpipe.extract import ExtractConfig
from kdpipe.train import resolve_config
from kdpipe.whiten import WhitenConfig


@dataclass
class Inner:
    depth: int
    name: str = "x"


@dataclass
class Small:
    lr: float = 0.1
    epochs: int = 3
    name: str = "a"
    root: Path = Path("r")
    sizes: tuple[int, ...] = (1, 64)
    pair: tuple[float, float] = (0.8, 1.0)
    tags: list[str] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    inner: Inner | None = None
    flag: bool = False
    label: str = field(default="all", metadata=config.toml_as(str))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- precedence


def test_defaults_then_caller_defaults_then_files_in_order_then_flags(tmp_path):
    a = write(tmp_path / "a.toml", "lr = 0.5\nepochs = 7\nname = 'from-a'\n")
    b = write(tmp_path / "b.toml", "epochs = 9\n")
    cfg = config.resolve(Small, flags={"name": "flag", "lr": None}, files=[a, b],
                         defaults={"lr": 0.2, "flag": True, "epochs": 4})
    # name: flag > file; lr: file > caller default (a None flag is "not given"); epochs: later file wins;
    # flag: caller default > dataclass default; sizes: dataclass default
    assert (cfg.name, cfg.lr, cfg.epochs, cfg.flag, cfg.sizes) == ("flag", 0.5, 9, True, (1, 64))


def test_a_real_stage_config_takes_file_values_under_flags(tmp_path):
    f = write(tmp_path / "w.toml", 'cache = "C"\nmode = "joint"\neps-rel = 0.001\ncheck_train = false\n')
    cfg = config.resolve(WhitenConfig, flags={"mode": "image"}, files=[f])
    assert (cfg.cache, cfg.mode, cfg.eps_rel, cfg.check_train, cfg.method) == ("C", "image", 0.001, False, "zca")


def test_train_keeps_its_run_config_layer_and_reads_views_used_0(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write(run / "config.toml", 'student = "resnet18"\nepochs = 4\nviews_used = 0\ncache = "C"\n')
    user = write(tmp_path / "u.toml", "epochs = 6\nlr = 1\n")
    cfg = resolve_config({"out": str(run), "resume": True, "batch_size": 8}, user)
    assert (cfg.student, cfg.epochs, cfg.lr, cfg.views_used, cfg.batch_size) == ("resnet18", 6, 1.0, "0", 8)
    assert isinstance(cfg.lr, float)
    assert resolve_config({"out": str(run), "batch_size": 8}, user).student == "mobilenetv3"  # no resume


# --------------------------------------------------------------------------- what a file's values become


def test_file_values_are_converted_where_toml_cannot_say_the_type(tmp_path):
    f = write(tmp_path / "s.toml", 'lr = 1\nroot = "some/dir"\nsizes = [1, 8]\npair = [0.5, 1]\ntags = ["x"]\n'
                                   'label = 0\n[options.hinton]\nT = 2.0\n[inner]\ndepth = 2\n')
    cfg = config.resolve(Small, files=[f])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.root == Path("some/dir") and cfg.sizes == (1, 8) and cfg.pair == (0.5, 1.0) and cfg.tags == ["x"]
    assert cfg.label == "0" and cfg.options == {"hinton": {"T": 2.0}} and cfg.inner == Inner(depth=2)


STAGE_CONFIGS = [
    ("kdpipe.extract", "ExtractConfig", {"teacher": "t", "data": "d", "out": "o", "splits": ["val"]}),
    ("kdpipe.whiten", "WhitenConfig", {"cache": "c", "eval_split": "val"}),
    ("kdpipe.train", "TrainConfig", {"cache": "c", "out": "o", "loss_options": {"hinton": {"T": 2.0}},
                                     "mean": [0.5, 0.5, 0.5], "image_size": 32}),
    ("kdpipe.evaluate", "EvalConfig", {"run": "r", "zeroshot": ["cifar10:x"]}),
    ("kdpipe.bench", "BenchConfig", {"runs": ["a", "b"], "threads": 2}),
    ("kdpipe.pretrain", "PretrainConfig", {"data": "d", "out": "o", "warmup": 3}),
    ("kdpipe.report", "ReportConfig", {"runs": ["a"]}),
    ("kdpipe.demo", "DemoConfig", {"timings": {"extract": 1.5}}),
    ("kdpipe.data.shapes", "ShapesConfig", {"out": Path("w")}),
]


@pytest.mark.parametrize("module, name, values", STAGE_CONFIGS)
def test_every_stage_config_round_trips_through_a_toml_file(tmp_path, module, name, values):
    """Each field type of every stage's config can be written in TOML and read back as the same value."""
    cls = getattr(importlib.import_module(module), name)
    cfg = cls(**values)
    data = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    f = write(tmp_path / "c.toml", tomli_w.dumps(data))
    assert config.resolve(cls, files=[f]) == cfg


@pytest.mark.parametrize("line, key, expected", [
    ('epochs = "3"', "epochs", "int"),
    ("epochs = 2.5", "epochs", "int"),
    ("epochs = true", "epochs", "int"),  # a bool is an int in Python, not in TOML
    ("lr = false", "lr", "float"),
    ("flag = 1", "flag", "bool"),
    ("name = 3", "name", "str"),
    ("sizes = [1, 'x']", "sizes", "tuple[int, ...]"),
    ("pair = [0.5]", "pair", "tuple[float, float]"),
    ("tags = 'x'", "tags", "list[str] | None"),
    ("options = {hinton = 2}", "options", "dict[str, dict[str, Any]]"),
])
def test_a_value_of_the_wrong_type_names_the_key_the_file_and_the_type(tmp_path, line, key, expected):
    f = write(tmp_path / "bad.toml", line + "\n")
    with pytest.raises(config.ConfigError) as err:
        config.resolve(Small, files=[f])
    message = str(err.value)
    assert message.startswith(f"{f}: {key} = ") and message.endswith(f", expected {expected}")


def test_a_wrong_type_in_a_real_stage_file_is_refused(tmp_path):
    f = write(tmp_path / "t.toml", 'batch_size = "64"\n')
    with pytest.raises(ValueError, match=re.escape(f"{f}: batch_size = '64' is a str, expected int")):
        resolve_config({}, f)


def test_an_unknown_key_names_the_key_the_file_and_the_valid_keys(tmp_path):
    f = write(tmp_path / "u.toml", "epochs = 2\nbatchsize = 8\n")
    with pytest.raises(config.ConfigError) as err:
        config.resolve(Small, files=[f])
    assert str(err.value) == (f"{f}: unknown setting(s) ['batchsize']; valid: epochs, flag, inner, label, lr, "
                              "name, options, pair, root, sizes, tags")


def test_errors_inside_a_nested_table_and_missing_required_settings(tmp_path):
    f = write(tmp_path / "n.toml", "[inner]\nname = 'y'\n")
    with pytest.raises(config.ConfigError, match=re.escape(f"{f}: in table inner: Inner: missing setting(s) depth")):
        config.resolve(Small, files=[f])
    with pytest.raises(config.ConfigError, match=r"ExtractConfig: missing setting\(s\) data, out"):
        config.resolve(ExtractConfig, flags={"teacher": "tiny-clip"})


def test_a_missing_or_malformed_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.toml does not exist"):
        config.resolve(Small, files=[tmp_path / "nope.toml"])
    f = write(tmp_path / "broken.toml", "lr = = 1\n")
    with pytest.raises(config.ConfigError, match="broken.toml is not valid TOML"):
        config.resolve(Small, files=[f])


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def captured(monkeypatch) -> dict[str, Any]:
    """Stage runs replaced by a recorder of the config they are given."""
    import kdpipe.evaluate
    import kdpipe.extract
    import kdpipe.whiten

    seen: dict[str, Any] = {}

    def recorder(name: str, result: Any):
        def run(cfg):
            seen[name] = cfg
            return result
        return run

    monkeypatch.setattr(kdpipe.whiten, "run", recorder("whiten", {"modes": {}, "whitening": "w.h5"}))
    monkeypatch.setattr(kdpipe.extract, "run", recorder("extract", {}))
    monkeypatch.setattr(kdpipe.evaluate, "run", recorder("eval", None))
    return seen


def test_fit_whitening_takes_the_file_and_a_flag_overrides_it(tmp_path, captured):
    f = write(tmp_path / "w.toml", f'cache = "{tmp_path / "cache"}"\nmode = "joint"\neps-rel = 0.01\n'
                                   "progress = false\n")
    result = CliRunner().invoke(app, ["fit-whitening", "--config", str(f), "--mode", "text"])
    assert result.exit_code == 0, result.output
    cfg = captured["whiten"]
    assert (Path(cfg.cache), cfg.mode, cfg.eps_rel, cfg.progress, cfg.method) == (tmp_path / "cache", "text",
                                                                                   0.01, False, "zca")
    # the argument beats the file too; without --config, the command's own defaults
    result = CliRunner().invoke(app, ["fit-whitening", str(tmp_path / "c2"), "--config", str(f)])
    assert result.exit_code == 0 and Path(captured["whiten"].cache) == tmp_path / "c2"
    result = CliRunner().invoke(app, ["fit-whitening", str(tmp_path / "c3")])
    assert result.exit_code == 0 and (captured["whiten"].mode, captured["whiten"].eps_rel) == ("all", 1e-4)


def test_extract_required_settings_may_come_from_the_file(tmp_path, captured):
    f = write(tmp_path / "e.toml", f'teacher = "tiny-clip"\ndata = "D"\nout = "{tmp_path / "o"}"\nviews = 2\n'
                                   'splits = ["val"]\nworkers = 0\n')
    result = CliRunner().invoke(app, ["extract", "--config", str(f), "--views", "3", "--split", "train"])
    assert result.exit_code == 0, result.output
    cfg = captured["extract"]
    assert (cfg.teacher, cfg.data, cfg.views, cfg.splits, cfg.workers, cfg.batch_size) == (
        "tiny-clip", "D", 3, ["train"], 0, 64)
    result = CliRunner().invoke(app, ["extract", "--teacher", "tiny-clip"])
    assert result.exit_code == 2 and "missing setting(s) data, out" in flat(result.output)


def test_a_renamed_flag_overrides_the_file_only_when_given(tmp_path, captured):
    f = write(tmp_path / "v.toml", "progress = false\nbatch-size = 8\n")
    assert CliRunner().invoke(app, ["eval", "r", "--config", str(f)]).exit_code == 0
    assert (captured["eval"].progress, captured["eval"].batch_size) == (False, 8)
    f = write(tmp_path / "v.toml", "progress = true\n")
    assert CliRunner().invoke(app, ["eval", "r", "--config", str(f), "--no-progress"]).exit_code == 0
    assert captured["eval"].progress is False


def test_bad_config_files_exit_2_with_the_message(tmp_path, captured):
    f = write(tmp_path / "w.toml", "cache = 'C'\nmodes = 'joint'\n")
    result = CliRunner().invoke(app, ["fit-whitening", "--config", str(f)])
    assert result.exit_code == 2 and "unknown setting(s) ['modes']; valid: cache" in flat(result.output)
    f = write(tmp_path / "w.toml", "cache = 'C'\neps_rel = 'small'\n")
    result = CliRunner().invoke(app, ["fit-whitening", "--config", str(f)])
    assert result.exit_code == 2 and "eps_rel = 'small' is a str, expected float" in flat(result.output)
    result = CliRunner().invoke(app, ["fit-whitening", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "does not exist" in flat(result.output)


SHAPES_SUMMARY = {"root": "W", "images": {"train": 1, "val": 1}, "captions": {"train": 5}, "classnames": ["c"],
                  "seconds": 0.0, "shared_captions": {"train": 0.0}}
PRETRAIN_SUMMARY = {"reused": True, "arch": "a", "steps": 1, "final_loss": 0.0, "config": "c", "weights": "w"}


@pytest.mark.parametrize("command, module, result, text, args, expected", [
    ("make-shapes", "kdpipe.data.shapes", SHAPES_SUMMARY, 'out = "W"\nn_train = 5\nsize = 32\n', ["--size", "48"],
     {"out": Path("W"), "n_train": 5, "size": 48, "n_val": 500}),
    ("train", "kdpipe.train", {"rank": 1}, 'student = "tiny"\ncache = "C"\nout = "O"\nepochs = 3\n',
     ["--epochs", "5"], {"student": "tiny", "cache": "C", "epochs": 5, "lr": 1e-3}),
    ("eval", "kdpipe.evaluate", None, 'run = "R"\nsplit = "test"\nbatch-size = 8\n', ["--batch-size", "16"],
     {"run": "R", "split": "test", "batch_size": 16, "workers": 0}),
    ("bench", "kdpipe.bench", None, 'runs = ["A", "B"]\nbatch_sizes = [1, 8]\niters = 3\n', ["--iters", "4"],
     {"runs": ["A", "B"], "batch_sizes": (1, 8), "iters": 4, "warmup": 5}),
    ("report", "kdpipe.report", {"markdown": "", "path": "p"}, 'runs = ["A"]\nout = "r.md"\n', ["B"],
     {"runs": [Path("B")], "out": "r.md"}),
    ("pretrain-teacher", "kdpipe.pretrain", PRETRAIN_SUMMARY, 'data = "D"\nout = "T"\nsteps = 7\nlr = 0.01\n',
     ["--lr", "0.02"], {"data": "D", "out": "T", "steps": 7, "lr": 0.02, "arch": "shapes-vit"}),
    ("demo", "kdpipe.demo", {"markdown": ""}, "quick = true\nseed = 3\n", ["--workers", "0"],
     {"quick": True, "seed": 3, "workers": 0, "out": "data/demo"}),
])
def test_each_stage_command_takes_its_config_file_under_its_flags(tmp_path, monkeypatch, command, module, result,
                                                                  text, args, expected):
    seen = []
    monkeypatch.setattr(f"{module}.run", lambda cfg: seen.append(cfg) or result)
    f = write(tmp_path / "c.toml", text)
    outcome = CliRunner().invoke(app, [command, "--config", str(f), *args])
    assert outcome.exit_code == 0, outcome.output
    assert {k: getattr(seen[0], k) for k in expected} == expected


@pytest.mark.parametrize("command", ["make-shapes", "extract", "fit-whitening", "train", "eval", "bench", "report",
                                     "pretrain-teacher", "demo"])
def test_every_stage_command_documents_config(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--config" in result.output
    text = flat(re.sub("[│╭╮╰╯─]", " ", result.output))  # help panels: borders between wrapped lines
    assert "Precedence: defaults < the file < options given here" in text
