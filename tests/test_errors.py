"""Errors: the user errors (one message, exit 2, traceback with -v) against bugs (traceback, exit 1);
a full disk explained (what was written, space needed and free, what is kept, re-run resumes)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_factory import make_fake_cache
from kdpipe import config, errors, extract, store, trainstate
from kdpipe.atomic import atomic_write
from kdpipe.cli.main import app
from kdpipe.errors import BadValue, CannotRun, MissingInput, UnknownName, UserError, WriteFailed
from kdpipe.export import ExportError
from kdpipe.registry import Registry

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


def flat(text: str) -> str:
    return " ".join(text.split())


def error_block(output: str) -> list[str]:
    """The lines from 'error:' to the end of the output."""
    lines = output.rstrip("\n").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    return lines[start:]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@contextlib.contextmanager
def file_size_limit(n_bytes: int) -> Iterator[None]:
    """Files cannot grow past ``n_bytes`` (RLIMIT_FSIZE): writes fail with EFBIG, as they fail on a full disk
    (ENOSPC), through the same layers (Python file, tarfile, h5py, torch.save)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# --------------------------------------------------------------------------- the taxonomy


@pytest.mark.parametrize("cls, builtin", [(BadValue, ValueError), (UnknownName, KeyError),
                                          (MissingInput, FileNotFoundError), (errors.AlreadyExists, FileExistsError),
                                          (CannotRun, RuntimeError), (config.ConfigError, ValueError),
                                          (store.CacheError, RuntimeError), (ExportError, ValueError)])
def test_user_errors_are_still_the_builtin_they_replace(cls, builtin):
    err = cls("what is wrong; what to do")
    assert isinstance(err, UserError) and isinstance(err, builtin)
    assert str(err) == "what is wrong; what to do"  # a KeyError's str() would add quotes


def test_registry_unknown_name_is_a_user_error_listing_the_valid_ones():
    reg: Registry[int] = Registry("widget")
    reg.register("b")(1)
    reg.register("a")(2)
    with pytest.raises(UnknownName) as info:
        reg.get("c")
    assert isinstance(info.value, KeyError) and str(info.value) == "unknown widget 'c'; valid: a, b"


def test_storage_errno_finds_the_disk_error_in_a_chain_or_in_hdf5_text():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save
    except RuntimeError as err:
        assert errors.storage_errno(err) == errno.ENOSPC
    hdf5 = RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 122, ...)")
    assert errors.storage_errno(hdf5) == errno.EDQUOT
    assert errors.storage_errno(OSError(errno.ENOENT, "No such file or directory")) is None
    assert errors.storage_errno(ValueError("errno = 2")) is None


# --------------------------------------------------------------------------- writers: a failed write


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "out" / "table.json"
    atomic_write(path, lambda tmp: tmp.write_text("old"))

    def half_then_full(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 1000)  # part of the file reached the disk
        raise ENOSPC

    with pytest.raises(WriteFailed) as info:
        atomic_write(path, half_then_full, needed=5_000_000)
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.path == path
    assert err.needed == 5_000_000 and err.free is not None and err.free > 0
    lines = err.lines()
    assert lines[0] == f"writing {path} failed: No space left on device (ENOSPC)"
    assert lines[1].startswith("needed: about 5.0 MB for this file; free on that disk: ")
    assert path.read_text() == "old" and temp_files(tmp_path) == []


def test_real_failed_writes_through_tarfile_and_torch_save_become_write_failed(tmp_path):
    """Not simulated: the kernel refuses to grow the files (EFBIG), and each writer reports it its own way
    (tarfile an OSError, torch.save a RuntimeError with the OSError in its context). h5py is left out: under
    RLIMIT_FSIZE it crashes while closing the file (with ENOSPC on a real full disk it raises; checked by hand)."""
    dim = 1024  # 8 samples: about 150 kB of embeddings in the tar
    samples = [store.CachedSample(f"k{i}", b"j" * 20_000, [], np.ones((4, dim), np.float16), np.ones((5, dim), np.float16),
                                  np.ones(4, np.float32), np.ones(5, np.float32), list("abcde")) for i in range(8)]
    state = {"position": {"step": 7}, "model": {"w": torch.zeros(100_000)}}
    trainstate.save_checkpoint(tmp_path / "run", {"position": {"step": 3}, "model": {"w": torch.zeros(10)}})
    failures = {}
    with file_size_limit(64 * 1024):
        for name, write in (("tar", lambda: store.write_shard(tmp_path / "train", 0, samples, dim)),
                            ("pt", lambda: trainstate.save_checkpoint(tmp_path / "run", state))):
            with pytest.raises(WriteFailed) as info:
                write()
            failures[name] = info.value
    assert {n: e.errno for n, e in failures.items()} == {"tar": errno.EFBIG, "pt": errno.EFBIG}
    assert failures["tar"].path == tmp_path / "train" / "shard-000000.tar"
    assert failures["tar"].needed == store.shard_bytes(samples) > 8 * (20_000 + 2 * 9 * dim * 2)
    assert failures["pt"].needed == 400_000 and failures["pt"].path.name == trainstate.LATEST
    assert not (tmp_path / "train" / "shard-000000.tar").exists() and temp_files(tmp_path) == []
    assert trainstate.describe_kept(tmp_path / "run")[1] == 3  # the old latest.pt is intact


# --------------------------------------------------------------------------- kdpipe extract: disk full


def _extract_args(shapes_root: Path, out: Path) -> list[str]:
    return ["extract", "--teacher", "tiny-clip", "--allow-random-init", "--data", str(shapes_root), "--out", str(out),
            "--device", "cpu", "--views", "2", "--batch-size", "8", "--workers", "0", "--shard-size", "8",
            "--split", "train", "--no-prompts"]


def _full_disk_at_shard(monkeypatch, k: int) -> None:
    """The k-th shard's tar (0-based) fails with ENOSPC after part of it reached the disk."""
    real, calls = store._write_tar, []

    def write_tar(path: Path, samples: list) -> None:
        calls.append(path)
        if len(calls) == k + 1:
            path.write_bytes(b"\0" * 4096)
            raise ENOSPC
        real(path, samples)

    monkeypatch.setattr(store, "_write_tar", write_tar)


def test_extract_disk_full_says_what_is_kept_and_a_rerun_resumes(shapes_root, tmp_path, monkeypatch):
    out, runner = tmp_path / "cache", CliRunner()
    _full_disk_at_shard(monkeypatch, 1)
    result = runner.invoke(app, _extract_args(shapes_root, out))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    block = error_block(result.output)
    assert 3 <= len(block) <= 5, block
    assert block[0] == f"error: writing {out / 'train' / 'shard-000001.tar'} failed: No space left on device (ENOSPC)"
    assert block[1].startswith("  needed: about ") and "for shard-000001 (tar + h5); free on that disk:" in block[1]
    assert f"1 of 3 shards of split train are complete and listed in {out / 'manifest.json'}" in block[2]
    assert "re-run the same command" in block[3] and "keeps the complete shards" in block[3]
    # what is left is a valid cache holding the finished shard, and nothing half-written
    cache = store.open_cache(out, verify="sha256")
    assert [s["name"] for s in cache.manifest["splits"]["train"]["shards"]] == ["shard-000000"]
    assert temp_files(out) == [] and not (out / "train" / "shard-000001.tar").exists()
    first = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    # -v: the same message, with the traceback above it (the disk is full at the next shard written)
    monkeypatch.undo()
    _full_disk_at_shard(monkeypatch, 0)
    result = runner.invoke(app, ["-v", *_extract_args(shapes_root, out)])
    assert result.exit_code == 2 and "Traceback" in result.output and "OSError: [Errno 28]" in result.output
    assert error_block(result.output)[0].endswith("failed: No space left on device (ENOSPC)")
    # space freed: the same command completes the cache and keeps the shard it had
    monkeypatch.undo()
    result = runner.invoke(app, _extract_args(shapes_root, out))
    assert result.exit_code == 0, result.output
    cache = store.open_cache(out, verify="sha256")
    assert cache.count("train") == 24 and len(cache.manifest["splits"]["train"]["shards"]) == 3
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == first


# --------------------------------------------------------------------------- bugs, bad options, memory


def _failing_extract(monkeypatch, err: BaseException) -> None:
    def run(cfg):
        raise err

    monkeypatch.setattr(extract, "run", run)


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), RuntimeError("an internal invariant broke"),
                                 KeyError("missing_key"), ValueError("shapes disagree")])
def test_a_bug_keeps_its_traceback_and_exit_code_1(bug, tmp_path, monkeypatch):
    _failing_extract(monkeypatch, bug)
    result = CliRunner().invoke(app, _extract_args(tmp_path, tmp_path / "out"))
    assert result.exit_code == 1 and result.exception is bug  # typer prints Python's traceback
    assert "error:" not in result.output


def test_a_bad_option_is_one_line_exit_2_and_its_traceback_with_v(shapes_root, tmp_path):
    args = ["extract", "--teacher", "no-such-teacher", "--data", str(shapes_root), "--out", str(tmp_path / "x"),
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert error_block(result.output) == [error_block(result.output)[0]]  # one line
    assert error_block(result.output)[0].startswith("error: unknown teacher 'no-such-teacher'; shipped: ")
    result = CliRunner().invoke(app, ["-v", *args])
    assert result.exit_code == 2 and "Traceback" in result.output and "UnknownName" in result.output
    assert error_block(result.output)[0].startswith("error: unknown teacher 'no-such-teacher'")


def test_unknown_student_is_one_line_exit_2(tmp_path):
    cache = make_fake_cache(tmp_path / "cache", n_train=16, n_val=8)
    result = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                      "--student", "nope", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(error_block(result.output)) == 1 and "unknown student 'nope'" in result.output


def test_out_of_memory_names_the_options_to_lower(tmp_path, monkeypatch):
    _failing_extract(monkeypatch, torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB of which 1.2 GiB "
        "is free. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF"))
    result = CliRunner().invoke(app, _extract_args(tmp_path, tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = "error: out of memory on the GPU (allocating 2.00 GiB): lower --batch-size (now 8) or --workers (now 0)"
    assert error_block(result.output) == [f"{message} (`kdpipe -v ...` shows the traceback)"]
    result = CliRunner().invoke(app, ["-v", *_extract_args(tmp_path, tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" in result.output and error_block(result.output) == [message]
    _failing_extract(monkeypatch, RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 281474976710656 bytes. Error code 12 (Cannot allocate memory)"))
    result = CliRunner().invoke(app, _extract_args(tmp_path, tmp_path / "out"))
    assert result.exit_code == 2
    assert error_block(result.output)[0].startswith("error: out of memory on the CPU (RAM) (allocating 281.5 TB)")
    _failing_extract(monkeypatch, RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. "))
    result = CliRunner().invoke(app, _extract_args(tmp_path, tmp_path / "out"))
    assert result.exit_code == 2 and error_block(result.output)[0].startswith(
        "error: a DataLoader worker was killed, most likely by the kernel for want of memory: lower --batch-size (now 8)")


def test_a_disk_error_from_a_library_writer_is_explained_too(tmp_path, monkeypatch):
    """h5py's way: a RuntimeError raised on close, the OSError naming the file in its context."""
    def run(cfg):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "elsewhere.h5"))
        except OSError:
            raise RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 28)")

    monkeypatch.setattr(extract, "run", run)
    result = CliRunner().invoke(app, _extract_args(tmp_path, tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    block = error_block(result.output)
    assert block[0] == f"error: writing {tmp_path / 'elsewhere.h5'} failed: No space left on device (ENOSPC)"
    assert block[1].startswith("  needed: unknown; free on that disk: ")


# --------------------------------------------------------------------------- kdpipe train: disk full


def test_train_disk_full_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    cache = make_fake_cache(tmp_path / "cache", n_train=32, n_val=8, shard_size=16)
    out, runner = tmp_path / "run", CliRunner()
    (tmp_path / "c.toml").write_text("bn_samples = 8\nval_samples = 8\nckpt_every = 1\n")
    args = ["train", "--cache", str(cache), "--out", str(out), "--student", "tiny", "--batch-size", "8",
            "--epochs", "1", "--workers", "0", "--losses", "fd=1", "--device", "cpu", "--no-progress",
            "--config", str(tmp_path / "c.toml")]
    real_save, calls = torch.save, []

    def save(obj, f, *a, **kw):  # the third checkpoint (step 3) meets a full disk
        calls.append(obj["position"]["step"])
        if len(calls) == 3:
            f.write(b"\0" * 4096)
            raise ENOSPC
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    block = error_block(result.output)
    assert block[0] == (f"error: writing {out / 'checkpoints' / 'latest.pt'} failed: No space left on device "
                        "(ENOSPC)")
    assert "for this checkpoint; free on that disk:" in block[1]
    assert block[2] == f"  kept: the last checkpoint, step 2, is intact ({out / 'checkpoints' / 'latest.pt'})"
    assert block[3] == "  next: free some space, then re-run the same command with --resume: it continues from step 2"
    assert temp_files(out) == [] and "Traceback" not in result.output
    monkeypatch.undo()
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "student.json").read_text())
    assert spec["checkpoints"]["last"]["step"] == 4
