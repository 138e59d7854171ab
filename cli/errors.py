"""What a failed command prints: an error the user can fix as a short message, a bug with its traceback.

- ``kdpipe.errors.UserError`` (a bad option, a missing file, a cache of another teacher, a full disk:
  the message says what to do) and the OS errors that name a path (``FileNotFoundError``, ...):
  the message, exit code 2.
- Any other OS error, and a failed write that h5py or torch.save report as a ``RuntimeError`` (the
  errno is in its chain): told as a failed write (what, how much was needed, how much is free), exit 2.
- Out of memory (``torch.OutOfMemoryError`` on a GPU, the CPU allocator's ``RuntimeError``,
  ``MemoryError``, a DataLoader worker killed by the kernel): one line naming the options that
  lower memory and their values, exit 2.
- Anything else is a bug: it propagates, and Python's (typer's) traceback is printed, exit code 1.

``kdpipe -v COMMAND`` prints the traceback of a handled error too, above its message.
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
from typing import Any, Iterator

import typer
from rich.markup import escape

from kdpipe.errors import UserError, WriteFailed, human_bytes, storage_errno
from kdpipe.progress import console

# OS errors whose message names the path: shown as they are.
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# The options that lower memory, in the order they are suggested; a command names those it has.
MEMORY_OPTIONS = ("batch_size", "batch_sizes", "eval_batch_size", "workers")
# torch's CPU allocator raises a plain RuntimeError; a DataLoader worker that the kernel's
# out-of-memory killer ended surfaces as one too.
_CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
_WORKER_KILLED = "is killed by signal: Killed"
_TRIED = re.compile(r"tried to allocate (\d+ bytes|[\d.]+ ?[KMGT]i?B)", re.IGNORECASE)

_verbose = False


def set_verbose(on: bool) -> None:
    """``kdpipe -v``: show the traceback of handled errors too (the app's callback sets it)."""
    global _verbose
    _verbose = on


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A command's body: a known error prints its message and exits with code 2; a bug propagates."""
    try:
        yield
    except Exception as err:
        lines = explain(err)
        if lines is None:
            raise
        report(err, lines)
        raise typer.Exit(code=2) from None


def explain(err: Exception) -> list[str] | None:
    """The lines to print for an error the user can act on; None for a bug."""
    if isinstance(err, (UserError, *PATH_ERRORS)):
        return str(err).splitlines() or [type(err).__name__]
    if out_of_memory(err):
        return [memory_hint(err)]
    code = storage_errno(err)
    if code is not None:  # a failed write outside kdpipe's own writers (errors.writing)
        return WriteFailed(_filename(err), code).lines()
    if isinstance(err, OSError):
        return [str(err)]
    return None


def report(err: Exception, lines: list[str]) -> None:
    """With -v the traceback, then the message: 'error: ' and its first line, the others indented.

    Out of memory and OS errors outside kdpipe's writers may come from a bug too: without -v, their
    message says how to see the traceback."""
    if _verbose:
        console.print("".join(traceback.format_exception(err)), markup=False, highlight=False, soft_wrap=True, end="")
    elif not isinstance(err, UserError):
        lines = [*lines[:-1], f"{lines[-1]} (`kdpipe -v ...` shows the traceback)"]
    console.print(f"[bold red]error:[/] {escape(lines[0])}", soft_wrap=True)  # one line each, whatever the width
    for line in lines[1:]:
        console.print(f"  {escape(line)}", soft_wrap=True)


def out_of_memory(err: Exception) -> bool:
    torch = sys.modules.get("torch")  # not imported: no tensor was ever allocated
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(sign in str(err) for sign in (_CPU_OOM, _WORKER_KILLED))


def memory_hint(err: Exception) -> str:
    """'out of memory on the GPU (allocating 2.00 GiB): lower --batch-size (now 64) or --workers (now 2)'."""
    torch = sys.modules.get("torch")
    where = "the GPU" if torch is not None and isinstance(err, torch.OutOfMemoryError) else "the CPU (RAM)"
    tried = _TRIED.search(str(err))
    size = tried.group(1) if tried else None
    if size and size.endswith("bytes"):
        size = human_bytes(int(size.split()[0]))
    params = _command_params()
    knobs = [f"--{name.replace('_', '-')} (now {_shown(params[name])})" for name in MEMORY_OPTIONS if name in params]
    lower = " or ".join(knobs) if knobs else "the batch size"
    if _WORKER_KILLED in str(err):
        return f"a DataLoader worker was killed, most likely by the kernel for want of memory: lower {lower}"
    allocating = f" (allocating {size})" if size else ""
    return f"out of memory on {where}{allocating}: lower {lower}"


def _command_params() -> dict[str, Any]:
    """The running command's parameter values ({} outside a command, or with a typer that runs on click
    itself: then the hint names the options without their values)."""
    try:  # recent typer runs on its own copy of click; the running command's context is that copy's
        from typer._click.globals import get_current_context  # noqa: PLC0415
    except ImportError:
        return {}
    ctx = get_current_context(silent=True)
    return dict(ctx.params) if ctx is not None else {}


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _filename(err: BaseException) -> str | None:
    """The file an OS error in ``err``'s chain names, if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.filename:
            return str(current.filename)
        current = current.__cause__ or current.__context__
    return None
