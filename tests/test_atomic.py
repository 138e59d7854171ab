"""Atomic writes: a `kill -9` mid-write leaves the old file and an orphan temporary file, which the
next run of the same command removes; a live writer's temporary file and another host's are kept."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kdpipe.atomic import atomic_write_bytes, sweep_orphans, temp_beside

WRITER = """
import sys, time
from pathlib import Path
from kdpipe.atomic import atomic_write
def slow(tmp):
    tmp.write_bytes(b"half")
    Path(sys.argv[2]).touch()  # now mid-write
    time.sleep(60)
atomic_write(sys.argv[1], slow)
"""


def _writer(target: Path, flag: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(flag)])
    deadline = time.monotonic() + 60
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert flag.exists(), "the writer never reached its write"
    return proc


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def test_kill_9_mid_write_keeps_the_old_file_and_the_sweep_removes_the_orphan(tmp_path):
    target = tmp_path / "sub" / "manifest.json"
    atomic_write_bytes(target, b"old")
    proc = _writer(target, tmp_path / "mid")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = _temps(tmp_path)
    assert target.read_bytes() == b"old" and len(orphans) == 1
    assert orphans[0].name.startswith(".manifest.json.") and f"-{proc.pid}." in orphans[0].name
    assert sweep_orphans(tmp_path) == orphans
    assert _temps(tmp_path) == [] and target.read_bytes() == b"old"


def test_a_live_writers_and_another_hosts_temporary_files_are_kept(tmp_path):
    target = tmp_path / "shard.json"
    proc = _writer(target, tmp_path / "mid")
    try:
        fd, mine = temp_beside(tmp_path / "own.json")  # this (live) process's own
        os.close(fd)
        elsewhere = tmp_path / f".x.json.{socket.gethostname().split('.')[0]}x-1.abc.tmp"  # another host's name
        elsewhere.touch()
        unrelated = tmp_path / ".notes.tmp"  # not an atomic write's name
        unrelated.touch()
        before = _temps(tmp_path)
        assert len(before) == 4
        assert sweep_orphans(tmp_path) == []
        assert _temps(tmp_path) == before
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert [p.name for p in sweep_orphans(tmp_path)] == [p.name for p in before if f"-{proc.pid}." in p.name]


def test_outputs_are_readable_by_others_as_ordinary_files(tmp_path):
    """mkstemp creates 0600 files: checkpoints written through it were private to their owner."""
    from kdpipe import trainstate

    atomic_write_bytes(tmp_path / "a.json", b"{}")
    path = trainstate.save_checkpoint(tmp_path / "run", {"step": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert path.stat().st_mode & 0o777 == 0o644
