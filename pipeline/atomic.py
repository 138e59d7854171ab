"""Crash-safe file writes: a reader sees the old file or the whole new one, never half of one.

A write that fails for a reason of the disk (full, quota, read-only) raises ``errors.WriteFailed``
naming the file; its temporary file is removed and the old file, if any, is left as it was.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import writing


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    """This host's short name, as the temporary files' names carry it (no dots: they separate the parts)."""
    return socket.gethostname().split(".")[0]


_TEMP = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def temp_beside(path: Path) -> tuple[int, Path]:
    """An open temporary file in path's folder, named ``.NAME.HOST-PID.RANDOM.tmp`` (see ``sweep_orphans``)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would make every output (checkpoints too) unreadable to others
    return fd, Path(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_orphans(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers (``kill -9``, a lost node) left under ``folder``.

    Only files written by a process of this host that no longer runs are removed: a live writer's
    (another rank's) and another host's are left alone. Returns the removed paths.
    """
    host, removed = _host(), []
    for path in Path(folder).rglob(".*.tmp"):
        m = _TEMP.match(path.name)
        if m and m["host"] == host and not _alive(int(m["pid"])) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The temporary name starts with '.' and ends with '.tmp', so globs for real outputs skip it;
    it is removed if ``write`` fails, and by ``sweep_orphans`` once its writer was killed. A disk
    failure raises ``WriteFailed`` (``needed``: the bytes the file takes, when the caller knows).
    """
    path = Path(path)
    with writing(path, needed):  # creating the folder or the temporary file can fail on a full disk too
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        with writing(path, needed):
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp (and safetensors) create 0600 files
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())
