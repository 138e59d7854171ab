"""Crash-safe file writes: a reader sees the old file or the whole new one, never half of one.

A write that fails for a reason of the disk (full, quota, read-only) raises ``errors.WriteFailed``
naming the file; its temporary file is removed and the old file, if any, is left as it was.
"""

from __future__ import annotations

import json
import os
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


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The temporary name starts with '.' and ends with '.tmp', so globs for real outputs skip it;
    it is removed if ``write`` fails. A disk failure raises ``WriteFailed`` (``needed``: the bytes
    the file takes, when the caller knows).
    """
    path = Path(path)
    with writing(path, needed):  # creating the folder or the temporary file can fail on a full disk too
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
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
