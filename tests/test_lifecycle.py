"""How kdpipe processes end: no orphan DataLoader workers after SIGKILL, SIGTERM / SIGUSR1 preemption
(checkpoint, exit 0, resume), and ``--resume auto``.

The end-to-end tests run ``kdpipe`` in a process group of its own (``start_new_session``), as a
scheduler does, and signal it. Where a test needs a stage to be busy when the signal comes, the
command runs with one of its functions slowed down (``_slowed``: a long training step, a slow teacher).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache_factory import make_fake_cache, write_coco
from kdpipe import config, extract, runtime, store, trainstate
from kdpipe import train as T
from kdpipe.cli.main import app
from kdpipe.cli.options import with_bare_value

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STARTUP = 240  # s: importing torch and open_clip on a loaded 2-core machine is slow


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie has ended (only its exit status waits to be collected)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``."""
    kids = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid and _alive(int(entry.name)):
            kids.append(int(entry.name))
    return kids


def _wait_for(what, timeout: float, proc: subprocess.Popen, log: Path, step: float = 0.05):
    """Poll ``what()`` until it returns something truthy; fail if ``proc`` ends first or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) too early:\n{log.read_text()[-3000:]}")
        time.sleep(step)
    pytest.fail(f"timed out after {timeout} s:\n{log.read_text()[-3000:]}")


def _slow_kdpipe(module: str, function: str, seconds: float) -> str:
    """Python source of ``kdpipe`` (arguments from its command line) with ``module.function`` sleeping
    ``seconds`` before each call."""
    return (f"import time\nimport {module} as m\nreal = m.{function}\n"
            f"def slow(*args, **kwargs):\n    time.sleep({seconds})\n    return real(*args, **kwargs)\n"
            f"m.{function} = slow\nfrom kdpipe.cli.main import app\napp(prog_name='kdpipe')\n")


def _slowed(module: str, function: str, seconds: float) -> list[str]:
    """The start of a ``kdpipe`` command line (arguments follow) with ``module.function`` slowed down."""
    return [sys.executable, "-c", _slow_kdpipe(module, function, seconds)]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """``cmd`` in a new session (its own process group), stdout and stderr to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _reap_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the test's process group (orphans keep their group), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after ``seconds`` (checked every 0.1 s; [] as soon as all are gone)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _describe(pids: list[int]) -> str:
    """State, parent and resident memory of each pid (why it was kept alive)."""
    out = []
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        out.append(f"{pid}: " + ", ".join(line for line in status if line.startswith(("State", "PPid", "VmRSS")))
                   + f", waiting in {wchan}")
    return "; ".join(out)


def _kill_parent_and_check_workers(cmd: list[str], tmp_path: Path, settle: float) -> None:
    """Start ``cmd``, wait until it has two worker processes, SIGKILL it alone: its workers must be gone in 10 s."""
    log = tmp_path / "log.txt"
    proc = _start(cmd, log)
    try:
        workers = _wait_for(lambda: (k := _children(proc.pid)) and len(k) >= 2 and k, STARTUP, proc, log)
        time.sleep(settle)  # let the workers fill the queue while the parent is busy
        workers = _children(proc.pid)
        assert len(workers) >= 2, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, as the OOM killer or `kill -9 PID` does
        proc.wait(timeout=30)
        left = _gone_within(workers, 10)
        assert not left, f"workers alive 10 s after their parent was killed: {_describe(left)}"
    finally:
        _reap_group(proc)


def _noise_coco(root: Path, n: int, size: int) -> Path:
    """A COCO-layout train split of ``n`` noise images: their stored JPEGs are large (~20 kB at 128 px)."""
    rng = np.random.default_rng(0)
    images = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        images[f"{i:03d}.png"] = buf.getvalue()
    write_coco(root, images, {name: [f"noise image {name}"] for name in images})
    return root


@linux_only
@pytest.mark.slow
def test_killed_extract_leaves_no_worker_behind(tmp_path):
    """The case torch's own watchdog misses: a batch of large JPEGs fills the worker -> parent pipe while
    the parent runs the teacher; the parent is killed; the worker's queue thread then waits forever to
    finish writing (it and its sibling hold the pipe's read end), keeping the worker alive and its memory."""
    data = _noise_coco(tmp_path / "noise", 64, 128)  # 2 shards of 4 batches of ~160 kB, one shard per worker
    cmd = _slowed("kdpipe.extract", "embed_batch", 2.0) + [
        "extract", "--teacher", "tiny-clip", "--data", str(data), "--out", str(tmp_path / "cache"), "--device", "cpu",
        "--workers", "2", "--batch-size", "8", "--shard-size", "32", "--views", "2", "--no-prompts"]
    _kill_parent_and_check_workers(cmd, tmp_path, settle=1.5)


@linux_only
@pytest.mark.slow
def test_killed_train_leaves_no_worker_behind(tmp_path):
    """Train batches are small (pixels travel in shared memory), so torch's own watchdog also ends these
    workers, within its 5 s poll: a guard for the training loaders, not a reproduction of the leak."""
    cache = make_fake_cache(tmp_path / "cache", n_train=96, n_val=16, dim=16, shard_size=16)
    cmd = _slowed("kdpipe.train", "train_step", 0.5) + [
        "train", "--student", "tiny", "--cache", str(cache), "--out", str(tmp_path / "run"), "--device", "cpu",
        "--workers", "2", "--batch-size", "8", "--epochs", "2", "--losses", "fd=1", "--no-progress"]
    _kill_parent_and_check_workers(cmd, tmp_path, settle=0.5)


def test_a_worker_dies_with_its_parent_ignores_stop_signals_then_runs_the_loader_s_own_init():
    """``WorkerInit`` in a forked child (it changes the process it runs in): PR_GET_PDEATHSIG, the
    SIGTERM / SIGUSR1 dispositions, and the composed init's call."""
    read, write = os.pipe()
    init = runtime.WorkerInit(then=lambda worker_id: os.write(write, f"then {worker_id}\n".encode()))
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running any of pytest's cleanup
        try:
            init(3)
            if sys.platform.startswith("linux"):
                import ctypes

                got = ctypes.c_int()
                ctypes.CDLL(None).prctl(2, ctypes.byref(got), 0, 0, 0)  # PR_GET_PDEATHSIG
                os.write(write, f"pdeathsig {got.value}\n".encode())
            ignored = all(signal.getsignal(s) is signal.SIG_IGN for s in runtime.STOP_SIGNALS)
            os.write(write, f"ignored {ignored}\n".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        lines = f.read().splitlines()
    assert "then 3" in lines and "ignored True" in lines
    if sys.platform.startswith("linux"):
        assert f"pdeathsig {int(signal.SIGKILL)}" in lines
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # this process is untouched


# --------------------------------------------------------------------------- stop requests


def test_stop_signals_only_set_the_request_and_the_old_handlers_come_back():
    before = {s: signal.getsignal(s) for s in runtime.STOP_SIGNALS}
    with runtime.stop_requests() as request:
        assert not request and request.signal is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one named
        assert request and request.signal == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in runtime.STOP_SIGNALS} == before


def test_a_stop_that_a_stage_did_not_act_on_reaches_the_enclosing_request():
    """A loop of stages (the benchmarks, the demo) hears a SIGTERM that came after a stage's last safe point."""
    before = signal.getsignal(signal.SIGTERM)
    with runtime.stop_requests() as outer:
        with runtime.stop_requests() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner and not outer
        assert outer and outer.signal == "SIGTERM"
        with runtime.stop_requests() as quiet:  # no signal: nothing passed on
            pass
        assert not quiet and outer.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def _any_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    try:
        info, cpu = runtime.DistInfo(rank, 3, rank), torch.device("cpu")
        results = [runtime.any_rank(rank == 1, info, cpu), runtime.any_rank(False, info, cpu)]
        Path(out_dir, f"rank{rank}").write_text(repr(results))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_to_stop_when_any_one_of_them_is_asked(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_any_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True,
                       start_method="fork")
    assert [(tmp_path / f"rank{r}").read_text() for r in range(3)] == ["[True, False]"] * 3
    assert runtime.any_rank(True, runtime.DistInfo(), torch.device("cpu"))  # one process: its own flag


def test_the_demo_ends_at_a_stage_a_stop_signal_ended():
    from kdpipe import demo

    cfg = demo.DemoConfig(out="unused")
    assert demo.stage(cfg, "train a", False, lambda: {"step": 12, "stopped": None}) == {"step": 12, "stopped": None}
    with pytest.raises(demo.Stopped, match="extract stopped by SIGUSR1"):
        demo.stage(cfg, "extract", False, lambda: {"stopped": "SIGUSR1"})


def test_the_demo_ends_after_a_stage_that_finished_despite_a_stop_signal():
    """A SIGTERM after a stage's last safe point (e.g. during its final writes): the stage's outputs are
    complete, and the demo stops there instead of starting the next stage."""
    from kdpipe import demo

    def finishes_anyway():
        with runtime.stop_requests():  # the stage's own handler, as every stage installs
            os.kill(os.getpid(), signal.SIGTERM)
        return {"step": 5, "stopped": None}

    cfg = demo.DemoConfig(out="unused")
    with pytest.raises(demo.Stopped, match="pretrain finished; stopped by SIGTERM before the next stage"):
        demo.stage(cfg, "pretrain", False, finishes_anyway)
    assert cfg.timings["pretrain"] >= 0  # its time is recorded: it finished


# --------------------------------------------------------------------------- train: --resume auto, SIGTERM


DIM, BATCH = 16, 8


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    """48 train samples in 3 shards (6 steps per epoch at batch 8), 16 val."""
    return make_fake_cache(tmp_path_factory.mktemp("life") / "cache", n_train=48, n_val=16, dim=DIM,
                           views=2, captions=2, shard_size=16)


def _train_args(cache: Path, out: Path, workers: int = 0) -> list[str]:
    return ["train", "--student", "tiny", "--cache", str(cache), "--out", str(out), "--epochs", "2",
            "--batch-size", str(BATCH), "--workers", str(workers), "--log-every", "1", "--lr", "0.002",
            "--warmup-steps", "2", "--losses", "fd=7.8,crd=1,icl=1", "--device", "cpu", "--no-progress"]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in T.read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_bare_resume_is_yes_and_a_value_is_kept():
    assert with_bare_value(["--out", "R", "--resume"], "--resume", "yes") == ["--out", "R", "--resume", "yes"]
    assert with_bare_value(["--resume", "--max-steps", "3"], "--resume", "yes") == ["--resume", "yes", "--max-steps",
                                                                                   "3"]
    for kept in (["--resume", "auto"], ["--resume=auto"], ["--out", "R"]):
        assert with_bare_value(kept, "--resume", "yes") == kept


def test_resume_auto_starts_fresh_on_an_empty_out_and_continues_a_run(train_cache, tmp_path):
    runner, out = CliRunner(), tmp_path / "run"
    res = runner.invoke(app, _train_args(train_cache, out) + ["--resume", "auto", "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    assert _steps(out) == [1, 2]
    # the same command again continues the run (its own config.toml: only --out is needed)
    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "auto", "--max-steps", "3"])
    assert res.exit_code == 0, res.output
    assert _steps(out) == [1, 2, 3] and "trained 3 steps" in res.output
    # plain --resume is unchanged: an error without a checkpoint
    res = runner.invoke(app, _train_args(train_cache, tmp_path / "empty") + ["--resume"])
    assert res.exit_code == 2 and "no checkpoint" in res.output, res.output


def test_resume_in_a_config_file_may_be_true_or_auto(tmp_path):
    for text, value in (("resume = true\n", True), ('resume = "auto"\n', "auto")):
        (tmp_path / "c.toml").write_text(text)
        assert config.resolve(T.TrainConfig, files=[tmp_path / "c.toml"]).resume == value
    assert T.continues("auto", tmp_path) is False and T.continues(True, tmp_path) is True
    with pytest.raises(ValueError, match="auto"):
        T.continues("maybe", tmp_path)


def _train_cfg(cache: Path, out: Path, **kw) -> T.TrainConfig:
    base = dict(student="tiny", cache=str(cache), out=str(out), epochs=2, batch_size=BATCH, workers=0, log_every=1,
                lr=2e-3, warmup_steps=2, losses="fd=7.8,crd=1,icl=1", device="cpu", progress=False)
    return T.TrainConfig(**{**base, **kw})


def test_a_stop_signal_checkpoints_that_step_once_and_resume_auto_ends_like_an_uninterrupted_run(
        train_cache, tmp_path, monkeypatch):
    """The signal comes during step 6, the first epoch's last: its validation and checkpoint are due anyway."""
    T.run(_train_cfg(train_cache, tmp_path / "whole"))
    real, calls = T.train_step, []

    def step(setup, batch):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(setup, batch)

    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(T, "train_step", step)
        result = T.run(_train_cfg(train_cache, out))
    assert result["stopped"] == "SIGTERM" and result["step"] == 6 and len(calls) == 6
    assert trainstate.read_checkpoint(out / "checkpoints/latest.pt")["position"] == {"epoch": 1, "batch": 0, "step": 6}
    assert not (out / "checkpoints/previous.pt").exists()  # written once, not again for the stop
    assert not (out / "student-last.safetensors").exists() and not (out / "student.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run put the handler back

    result = T.run(_train_cfg(train_cache, out, resume="auto"))
    assert result["stopped"] is None and result["step"] == 12 and _steps(out) == list(range(1, 13))
    a, b = load_file(str(tmp_path / "whole/student-last.safetensors")), load_file(str(out / "student-last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@linux_only
@pytest.mark.slow
def test_sigterm_stops_train_with_a_checkpoint_and_resume_auto_ends_like_an_uninterrupted_run(train_cache, tmp_path):
    """SIGTERM to the whole process group (main process and its DataLoader worker), as a scheduler sends it."""
    runner = CliRunner()
    whole = tmp_path / "whole"
    res = runner.invoke(app, _train_args(train_cache, whole, workers=1))
    assert res.exit_code == 0, res.output

    out, log = tmp_path / "stopped", tmp_path / "log.txt"
    proc = _start(_slowed("kdpipe.train", "train_step", 0.3) + _train_args(train_cache, out, workers=1), log)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and len(_steps(out)) >= 3, STARTUP, proc, log)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        _reap_group(proc)
    text = log.read_text()
    step = trainstate.read_checkpoint(out / "checkpoints/latest.pt")["position"]["step"]
    assert 3 <= step < 12 and _steps(out)[-1] == step
    assert f"stopped by SIGTERM after step {step}, checkpoint saved; resume with: kdpipe train --out {out} " \
           "--resume auto" in text, text[-3000:]
    assert "trained" not in text and not (out / "student-last.safetensors").exists()

    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "auto"])
    assert res.exit_code == 0 and "trained 12 steps" in res.output, res.output
    assert _steps(out) == list(range(1, 13))
    a, b = load_file(str(whole / "student-last.safetensors")), load_file(str(out / "student-last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _rank_of(pid: int) -> int | None:
    """The RANK torchrun gave process ``pid`` (from its environment)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


@linux_only
@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_both_after_the_same_step(train_cache, tmp_path):
    """Only rank 1 is signalled: rank 0 learns it from the per-step all_reduce, both checkpoint the same
    step and exit 0 (a rank that went on alone would hang in its next collective)."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(_torchrun_train(train_cache, out, tmp_path), log)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and len(_steps(out)) >= 2, STARTUP, proc, log)
        rank1 = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
        os.kill(rank1, signal.SIGTERM)
        assert proc.wait(timeout=STARTUP) == 0, log.read_text()[-3000:]
    finally:
        _reap_group(proc)
    state = trainstate.read_checkpoint(out / "checkpoints/latest.pt")
    step = state["position"]["step"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and 2 <= step < 12 and _steps(out)[-1] == step
    text = log.read_text()
    assert text.count(f"stopped by another rank's stop signal after step {step}") == 1, text[-3000:]


def _torchrun_train(cache: Path, out: Path, tmp_path: Path) -> list[str]:
    """``torchrun`` (2 processes) of ``kdpipe train`` with a slow step (0.3 s), batch 4 per rank."""
    script = tmp_path / "slow_kdpipe.py"
    script.write_text(_slow_kdpipe("kdpipe.train", "train_step", 0.3))
    args = _train_args(cache, out)
    args[args.index("--batch-size") + 1] = "4"  # 6 steps per epoch on each of the 2 ranks
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]


@linux_only
@pytest.mark.slow
def test_killed_torchrun_leaves_no_rank_behind(train_cache, tmp_path):
    """torchrun starts each rank in a session of its own: killing torchrun alone reaches no rank."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(_torchrun_train(train_cache, out, tmp_path), log)
    ranks = []
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and len(_steps(out)) >= 2, STARTUP, proc, log)
        ranks = _children(proc.pid)
        assert sorted(_rank_of(pid) for pid in ranks) == [0, 1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = _gone_within(ranks, 10)
        assert not left, f"ranks alive 10 s after torchrun was killed: {_describe(left)}"
    finally:
        _reap_group(proc)
        for pid in ranks:  # their own sessions: the group kill does not reach them
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- extract: SIGTERM


def _extract_args(data: Path, out: Path, workers: int) -> list[str]:
    return ["extract", "--teacher", "tiny-clip", "--data", str(data), "--out", str(out), "--views", "2",
            "--batch-size", "4", "--shard-size", "4", "--workers", str(workers), "--device", "cpu"]


def _samples(cache: Path) -> dict[str, dict]:
    found = {}
    for split in ("train", "val"):
        for path in store.open_cache(cache).shard_paths(split, "tar"):
            for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                found[s["__key__"]] = s
    return found


@linux_only
@pytest.mark.slow
def test_sigterm_stops_extract_with_a_consistent_cache_and_a_rerun_completes_it(shapes_root, tmp_path):
    out, log = tmp_path / "cache", tmp_path / "log.txt"
    proc = _start(_slowed("kdpipe.extract", "embed_batch", 0.5) + _extract_args(shapes_root, out, workers=1), log)
    try:
        _wait_for(lambda: (out / "train" / "shard-000001.json").exists(), STARTUP, proc, log)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        _reap_group(proc)
    text = log.read_text()
    assert f"stopped by SIGTERM: {out} holds the finished shards; re-run the same command to resume" in text, text
    cache = store.open_cache(out, verify="sha256")  # every listed shard is whole
    listed = [e["name"] for e in cache.manifest["splits"]["train"]["shards"]]
    written = sorted(p.stem for p in (out / "train").glob("shard-*.json"))
    assert listed == written and 2 <= len(listed) < 6  # 24 train images, 4 per shard
    assert "val" not in cache.manifest["splits"] and not (out / store.PROMPTS).exists()

    res = CliRunner().invoke(app, _extract_args(shapes_root, out, workers=0))  # the same command resumes
    assert res.exit_code == 0, res.output
    whole = tmp_path / "whole"
    extract.run(extract.ExtractConfig(teacher="tiny-clip", data=str(shapes_root), out=str(whole), views=2,
                                      batch_size=4, shard_size=4, workers=0, device="cpu", progress=False))
    got, want = _samples(out), _samples(whole)
    assert sorted(got) == sorted(want) and len(want) == 36
    for key, sample in want.items():
        assert got[key]["img.npy"] == sample["img.npy"] and got[key]["txt.npy"] == sample["txt.npy"], key
    assert _shards(out) == _shards(whole)


def _shards(cache: Path) -> dict[str, list[tuple[str, int, int]]]:
    """(name, images, captions) of every shard the manifest lists, per split (after a sha256 check)."""
    splits = store.open_cache(cache, verify="sha256").manifest["splits"]
    return {split: [(e["name"], e["count"], e["captions"]) for e in info["shards"]] for split, info in splits.items()}
