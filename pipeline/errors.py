"""Errors the user can fix, told apart from bugs.

A ``UserError`` means the command cannot run as asked, for a reason its message explains and the
user can act on: a bad option, a missing file, a cache made by another teacher, a full disk. The
command line prints the message (one line; a few for a failed write), exits with code 2, and shows
the traceback only with ``-v``. Any other exception is a bug and keeps Python's traceback.

Each subclass also inherits the builtin exception it stands for, so ``except ValueError`` (or
``pytest.raises(KeyError)``) still catches it. Raise them where the message speaks to the user;
keep plain ``ValueError`` / ``RuntimeError`` for internal invariants (one that fires is a bug).

Disk problems: ``writing(path)`` turns a failed write (disk full, over quota, file too large,
read-only, I/O error) into ``WriteFailed``, which says what was written, how much it needed and
how much is free; the stage that knows adds what is kept and how to continue.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """The command cannot run as asked; the message says why and what to do."""


class BadValue(UserError, ValueError):
    """An option, setting or input holds a value that cannot work; the message names it and what would."""


class UnknownName(UserError, KeyError):
    """A name that is not registered (student, teacher, loss, split, ...); the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError's own str() would print the message in quotes
        return str(self.args[0]) if self.args else ""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the command reads does not exist: data, weights, cache, run, checkpoint, config."""


class AlreadyExists(UserError, FileExistsError):
    """The output already holds something else; the message says how to replace it or write elsewhere."""


class CannotRun(UserError, RuntimeError):
    """The command cannot go on here for a reason outside the code: no CUDA device, weights neither
    cached nor downloadable, a training run whose loss stopped being finite."""


# --------------------------------------------------------------------------- disk problems

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # the ones that free space cures
# h5py and torch.save report a failed write as a RuntimeError raised while closing the file; the
# errno is then only in the exception chain, or in the text (HDF5: "errno = 28", safetensors: "os error 28").
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|os error (\d+)")


def storage_errno(err: BaseException) -> int | None:
    """The errno of a disk problem (``STORAGE_ERRNOS``) behind ``err``, its causes or contexts; else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if not code:
            found = _ERRNO_IN_TEXT.search(str(current))
            code = int(found.group(1) or found.group(2)) if found else None
        if code in STORAGE_ERRNOS:
            return code
        current = current.__cause__ or current.__context__
    return None


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the disk that holds ``path`` (its nearest existing folder), None if unknown."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as df -H)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


class WriteFailed(UserError, OSError):
    """Writing ``path`` failed for a reason of the disk: full, over quota, file too large, read-only, I/O.

    ``needed``: bytes the write needed when known (``needed_for`` says of what, e.g. "shard-000003 (tar +
    h5)"); ``free``: bytes free on that disk. The stage that knows sets ``kept`` (what is complete and
    safe) and ``resume`` (how to continue) before re-raising it.
    """

    def __init__(self, path: str | Path | None, code: int, needed: int | None = None,
                 needed_for: str = "this file") -> None:
        super().__init__(code, os.strerror(code))
        self.path = None if path is None else Path(path)
        self.needed, self.needed_for = needed, needed_for
        self.kept: str | None = None
        self.resume: str | None = None

    @property
    def free(self) -> int | None:
        """Bytes free on the disk of ``path`` now (read when the message is shown: after the failed file's
        temporary was removed, so it is what a re-run would find)."""
        return None if self.path is None else free_bytes(self.path)

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        """The message: what failed, then space, kept and next lines where they are known."""
        name = errno.errorcode.get(self.errno, str(self.errno))
        what = f"writing {self.path}" if self.path is not None else "a write"
        lines = [f"{what} failed: {self.strerror} ({name})"]
        if self.errno in SPACE_ERRNOS:
            needed = f"about {human_bytes(self.needed)} for {self.needed_for}" if self.needed else "unknown"
            free = "unknown" if self.free is None else human_bytes(self.free)
            lines.append(f"needed: {needed}; free on that disk: {free}")
        if self.kept:
            lines.append(f"kept: {self.kept}")
        if self.resume:
            lines.append(f"next: {self.resume}")
        return lines


@contextlib.contextmanager
def writing(path: str | Path, needed: int | None = None, needed_for: str = "this file") -> Iterator[None]:
    """Turn a disk failure inside the block into ``WriteFailed`` naming ``path``; other errors pass as they are."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as err:
        code = storage_errno(err)
        if code is None:
            raise
        raise WriteFailed(path, code, needed, needed_for) from err


@contextlib.contextmanager
def on_write_failure(describe: Callable[[], tuple[str, str]]) -> Iterator[None]:
    """Complete a ``WriteFailed`` raised in the block with ``describe()``: (what is kept, how to continue).

    ``describe`` runs only on failure, so it may look at the disk (which shards are complete, which
    checkpoint is intact) without slowing the run.
    """
    try:
        yield
    except WriteFailed as err:
        err.kept, err.resume = describe()
        raise
