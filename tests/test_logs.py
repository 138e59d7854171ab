"""What a run says while it runs: plain progress and training lines off a terminal, one line per
validation, curves.png at each validation, the TensorBoard / W&B sinks, and which library lines the
CLI shows (open_clip's INFO lines and its random-init warning only with -v)."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from cache_factory import make_fake_cache
from kdpipe import progress, runlog
from kdpipe import train as T
from kdpipe.cli.main import app

DIM, N_TRAIN, N_VAL, BATCH = 16, 48, 16, 8  # 6 steps per epoch


@pytest.fixture(autouse=True)
def _one_thread_and_logging_restored():
    """One intra-op thread (tiny models, shared cores); the CLI's logging setup undone afterwards."""
    threads, root, kd = torch.get_num_threads(), logging.getLogger(), logging.getLogger("kdpipe")
    saved = (root.level, list(root.handlers), kd.level)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    kd.setLevel(saved[2])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return make_fake_cache(tmp_path_factory.mktemp("logs") / "cache", n_train=N_TRAIN, n_val=N_VAL, dim=DIM,
                           views=2, captions=2, shard_size=24)


def _cfg(cache: Path, out: Path, **kw) -> T.TrainConfig:
    base = dict(student="tiny", cache=str(cache), out=str(out), epochs=2, batch_size=BATCH, workers=0,
                log_every=1, bn_samples=8, val_samples=N_VAL, val_every=4, progress=False, warmup_steps=2,
                device="cpu", losses="fd=7.8,crd=1,icl=1")
    return T.TrainConfig(**{**base, **kw})


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kdpipe"]


# --------------------------------------------------------------------------- plain progress


def test_plain_progress_prints_each_tenth_every_n_seconds_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="kdpipe")
    clock = Clock()
    with progress.PlainProgress("img", every_s=30.0, clock=clock) as bar:
        task = bar.add_task("extract train", total=1000, info="")
        for _ in range(4):  # 4 x 20 items, 10 s apart: 80 items = 8 %, 40 s: one line, at 30 s
            clock.t += 10
            bar.update(task, advance=20, info="shard 0")
        clock.t += 1
        bar.update(task, advance=30)  # 110 items: crosses 10 %
        clock.t += 1
        bar.update(task, advance=10)  # 12 %, 2 s after the last line: nothing
        clock.t += 10
        bar.update(task, advance=880)  # 100 %
        clock.t += 5
        bar.update(task, advance=0, info="done")  # same count, 5 s later: only at the end if not shown
    lines = _messages(caplog)
    assert lines == [
        "extract train: 60/1,000 img (6%), 2.0 img/s, elapsed 0:00:30, ETA 0:07:50, shard 0",
        "extract train: 110/1,000 img (11%), 2.7 img/s, elapsed 0:00:41, ETA 0:05:32, shard 0",
        "extract train: 1,000/1,000 img (100%), 19.2 img/s, elapsed 0:00:52, ETA 0:00:00, shard 0",
    ]


def test_plain_progress_unknown_total_resumed_count_final_line_and_disable(caplog):
    caplog.set_level(logging.INFO, logger="kdpipe")
    clock = Clock()
    with progress.PlainProgress("samples", every_s=60.0, clock=clock) as bar:
        a = bar.add_task("stream", total=None, info="")
        b = bar.add_task("train", total=100, completed=50, info="")  # a resumed run: its rate is this session's
        clock.t += 10
        bar.update(a, advance=7)
        bar.advance(b, 4)
    assert _messages(caplog) == ["stream: 7 samples, 0.7 samples/s, elapsed 0:00:10",
                                 "train: 54/100 samples (54%), 0.4 samples/s, elapsed 0:00:10, ETA 0:01:55"]
    caplog.clear()
    with progress.PlainProgress("samples", disable=True, clock=clock) as bar:
        bar.update(bar.add_task("x", total=10, info=""), advance=10)
    assert _messages(caplog) == []


def test_make_progress_is_a_live_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(progress, "console", Console(file=io.StringIO(), force_terminal=True))
    assert isinstance(progress.make_progress("img"), Progress) and progress.interactive()
    monkeypatch.setattr(progress, "console", Console(file=io.StringIO(), force_terminal=False))
    assert isinstance(progress.make_progress("img"), progress.PlainProgress) and not progress.interactive()


def test_every_stage_bar_is_plain_lines_in_a_log(cache_dir, tmp_path):
    """fit-whitening through the CLI, output captured (not a terminal): one plain line per tenth."""
    result = CliRunner().invoke(app, ["fit-whitening", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert re.search(r"INFO +fit   train: 1/2 shards \(50%\), [\d.,]+ shards/s, elapsed 0:00:\d\d, ETA", result.output)
    assert "fit   train: 2/2 shards (100%)" in result.output and "━" not in result.output


# --------------------------------------------------------------------------- training lines


def test_step_lines_every_n_steps_with_window_means_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="kdpipe")
    clock = Clock()
    lines = progress.StepLines("train", stop=10, every=4, samples_per_step=32, start=2, clock=clock)
    for step in range(3, 11):
        clock.t += 2.0  # 0.5 s of it the step's own, the rest validation, checkpoints, ...
        loss = float("nan") if step == 4 else float(step)
        lines.add(step, 0.5, loss, {"clip": loss / 2, "fd": 1.0}, lr=1e-3 * step, epoch=step // 6)
    assert _messages(caplog) == [
        # steps 3, 4 (4 is non-finite: left out of the means): 64 samples in 1 s; 2 s per step, 6 to go
        "train step 4/10 (40%) ep 0: loss 3.0000 (clip 1.5000, fd 1.0000), lr 4.00e-03, 64.0 samples/s, ETA 0:00:12",
        "train step 8/10 (80%) ep 1: loss 6.5000 (clip 3.2500, fd 1.0000), lr 8.00e-03, 64.0 samples/s, ETA 0:00:04",
        "train step 10/10 (100%) ep 1: loss 9.5000 (clip 4.7500, fd 1.0000), lr 1.00e-02, 64.0 samples/s, "
        "ETA 0:00:00",
    ]


def test_line_every_is_about_a_hundred_lines_a_multiple_of_the_metrics_interval():
    assert progress.line_every(100_000, 10) == 1000
    assert progress.line_every(1234, 10) == 20
    assert progress.line_every(24, 10) == 10 and progress.line_every(24, 1) == 1
    assert progress.duration(3725.4) == "1:02:05" and progress.duration(float("inf")) == "?"


@pytest.mark.slow
def test_train_in_a_log_file_prints_step_and_validation_lines(cache_dir, tmp_path):
    """`kdpipe train` as a batch job would run it: stdout and stderr to a pipe, not a terminal."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdpipe.cli", "train", "--student", "tiny", "--cache", str(cache_dir), "--out",
           str(out), "--epochs", "1", "--batch-size", str(BATCH), "--workers", "0", "--device", "cpu",
           "--losses", "fd=7.8,crd=1,icl=1", "--print-every", "2", "--val-every", "3", "--warmup-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    number = r"-?[\d.]+"
    for step in (2, 4, 6):
        assert re.search(rf"INFO +train step {step}/6 \(\d+%\) ep 0: loss {number} \(fd_img {number}, crd {number}, "
                         rf"icl {number}\), lr {number}e[-+]\d+, {number} samples/s, ETA \d+:\d\d:\d\d\n", log), log
    assert len(re.findall(r"train step \d+/6", log)) == 3  # every 2 steps, no more
    for step in (3, 6):
        assert re.search(rf"INFO +val step {step}: R@1 i2t [\d.]+, t2i [\d.]+; cos {number}; best {number} "
                         rf"\(step [36]\)\n", log), log
    assert "━" not in log  # no rich bar drawn into the file


def test_each_validation_has_its_line_on_a_terminal_too_and_redraws_the_curves(cache_dir, tmp_path, monkeypatch,
                                                                               caplog):
    caplog.set_level(logging.INFO, logger="kdpipe")
    monkeypatch.setattr(progress, "console", Console(file=io.StringIO(), force_terminal=True))
    drawn: list[tuple[int, int]] = []  # (val rows, last val step) in metrics.jsonl when curves.png was drawn
    original = T.plot_curves

    def spy(run_dir: Path):
        path = original(run_dir)
        val = [r for r in T.read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "val"]
        assert path is not None and path.stat().st_size > 0
        drawn.append((len(val), val[-1]["step"]))
        return path

    monkeypatch.setattr(T, "plot_curves", spy)
    T.run(_cfg(cache_dir, tmp_path / "run", max_steps=8))
    assert drawn[:2] == [(1, 4), (2, 8)]  # then once more at the end, with the same rows
    lines = _messages(caplog)
    vals = [m for m in lines if m.startswith("val step")]
    assert [re.match(r"val step (\d+): R@1 i2t [\d.]+, t2i [\d.]+; cos -?[\d.]+; best -?[\d.]+ \(step [48]\)$",
                     m).group(1) for m in vals] == ["4", "8"]
    assert not [m for m in lines if m.startswith("train step")]  # the live bar says it on a terminal


def test_a_run_stopped_after_a_validation_already_has_its_curves(cache_dir, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_ckpt", killed)  # the first checkpoint comes right after the first validation
    with pytest.raises(KeyboardInterrupt):
        T.run(_cfg(cache_dir, tmp_path / "run"))
    assert (tmp_path / "run/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- sinks


class FakeWandb(types.ModuleType):
    """Records what kdpipe asks of wandb (never installed in the tests)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self
        return types.SimpleNamespace(log=lambda data, step: fake.logged.append((data, step)),
                                     finish=lambda: setattr(fake, "finished", fake.finished + 1))


def test_tensorboard_and_wandb_get_the_metrics_rows(cache_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    T.run(_cfg(cache_dir, out, max_steps=6, log="tensorboard,wandb"))
    rows = T.read_metrics(out / "metrics.jsonl")
    train, val = [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "val"]
    assert len(train) == 6 and [r["step"] for r in val] == [4, 6]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/terms/crd", "train/crd_scale", "val/i2t_R@1",
            "val/t2i_R@1", "val/cos"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.step for e in events.Scalars("val/cos")] == [4, 6]
    assert [e.value for e in events.Scalars("val/cos")] == pytest.approx([r["val_cos"] for r in val], rel=1e-6)

    (init,) = fake.inits  # offline: no key, no network, no waiting
    assert init["mode"] == "offline" and Path(init["dir"]) == out and init["config"]["log"] == "tensorboard,wandb"
    assert [step for _, step in fake.logged] == [r["step"] for r in rows]
    assert [data for data, _ in fake.logged] == [runlog.scalars(r) for r in rows] and fake.finished == 1
    assert fake.logged[0][0]["train/loss"] == pytest.approx(rows[0]["loss"])
    assert fake.logged[-1][0]["val/i2t_R@1"] == pytest.approx(rows[-1]["val_i2t_R@1"])


def test_wandb_mode_set_by_the_user_wins(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    runlog.open_sinks("wandb", tmp_path, {"lr": 1.0}, None)
    assert fake.inits == [{"project": "kdpipe", "name": tmp_path.name, "dir": str(tmp_path), "config": {"lr": 1.0},
                           "mode": "online"}]


def test_a_missing_sink_package_is_one_line_naming_the_extra(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    result = CliRunner().invoke(app, ["train", "--student", "tiny", "--cache", str(cache_dir), "--out",
                                      str(tmp_path / "run"), "--device", "cpu", "--log", "wandb"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == "error: --log wandb needs the wandb package: pip install 'kdpipe[wandb]'"
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="unknown --log mlflow; valid: tensorboard, wandb"):
        runlog.parse_sinks("tensorboard,mlflow")
    assert runlog.parse_sinks("none") == [] and runlog.parse_sinks(" wandb, tensorboard,wandb") == ["wandb", "tensorboard"]


def test_scalars_flatten_the_rows():
    row = {"kind": "train", "step": 3, "epoch": 0, "lr": 1e-3, "loss": 2.5, "terms": {"clip": 1.0, "fd": 1.5},
           "clip_scale": 14.0}
    assert runlog.scalars(row) == {"train/epoch": 0.0, "train/lr": 1e-3, "train/loss": 2.5, "train/terms/clip": 1.0,
                                   "train/terms/fd": 1.5, "train/clip_scale": 14.0}
    assert runlog.scalars({"kind": "val", "step": 3, "val_cos": 0.5}) == {"val/cos": 0.5}


# --------------------------------------------------------------------------- library lines


def test_open_clip_info_and_its_random_init_warning_only_with_verbose(shapes_root, tmp_path):
    runner = CliRunner()
    args = ["pretrain-teacher", "--data", str(shapes_root), "--arch", "tiny-clip", "--steps", "2",
            "--batch-size", "8", "--device", "cpu", "--val-every", "1", "--print-every", "1"]
    quiet = runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    assert quiet.exit_code == 0, quiet.output
    assert "Parsing model identifier" not in quiet.output and "Instantiating model" not in quiet.output
    assert "No pretrained weights loaded" not in quiet.output
    assert re.search(r"INFO +pretraining tiny-clip on 24 train images", quiet.output)  # kdpipe's own INFO lines
    for step in (1, 2):  # pretrain-teacher's own training lines, in a log
        assert re.search(rf"INFO +pretrain step {step}/2 \({50 * step}%\): loss [\d.]+, lr [\d.]+e[-+]\d+, "
                         r"[\d.,]+ samples/s, ETA \d+:\d\d:\d\d\n", quiet.output), quiet.output
    assert re.search(r"INFO +pretrain step 1: val R@1 i2t [\d.]+, t2i [\d.]+; zero-shot top-1 [\d.]+ \(chance 0.125\)\n",
                     quiet.output), quiet.output
    verbose = runner.invoke(app, ["-v"] + args + ["--out", str(tmp_path / "b")])
    assert verbose.exit_code == 0, verbose.output
    assert "Parsing model identifier" in verbose.output and "No pretrained weights loaded" in verbose.output


def test_extract_shows_kdpipe_s_info_and_warnings_but_not_open_clip_s_info(shapes_root, tmp_path):
    result = CliRunner().invoke(app, ["extract", "--teacher", "tiny-clip", "--data", str(shapes_root), "--out",
                                      str(tmp_path / "cache"), "--views", "2", "--store-size", "48", "--workers", "0",
                                      "--device", "cpu", "--split", "val", "--no-prompts"])
    assert result.exit_code == 0, result.output
    assert re.search(r"INFO +teacher tiny-clip\b.*: dim \d+", result.output), result.output
    assert re.search(r"WARNING +--store-size 48: the smallest random views", result.output)
    assert "Parsing model identifier" not in result.output and "Loaded built-in" not in result.output


def test_a_teacher_random_on_purpose_warns_only_with_verbose(tmp_path, caplog):
    """bench rebuilds the teacher's architecture with random weights on purpose: kdpipe's and
    open_clip's random-weights warnings become DEBUG lines there (a config-JSON teacher: both fire)."""
    from cache_factory import teacher_config
    from kdpipe import bench
    from kdpipe.teachers import load_teacher

    path = str(teacher_config(tmp_path / "teacher.json", "shortest"))
    cfg = bench.BenchConfig(runs=[], teacher=path)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="kdpipe")
    load_teacher(path, allow_random_init=True)  # anywhere else: both warn
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HAS RANDOM WEIGHTS" in m for m in warned) and any("No pretrained weights" in m for m in warned)
    caplog.clear()
    bench.build_teacher(cfg, None, torch.device("cpu"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("for the benchmark: random init" in r.getMessage() for r in caplog.records)  # said once, plainly
    caplog.clear()
    caplog.set_level(logging.DEBUG)  # -v: shown, as DEBUG lines
    caplog.set_level(logging.DEBUG, logger="kdpipe")
    bench.build_teacher(cfg, None, torch.device("cpu"))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("HAS RANDOM WEIGHTS" in m for m in debug) and any("No pretrained weights" in m for m in debug)
    assert logging.getLogger().filters == [] and logging.getLogger("kdpipe").filters == []  # nothing left behind

