"""Turn library errors into a clean one-line message and a non-zero exit (no traceback)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import typer
from rich.markup import escape

from kdpipe.progress import console

# Errors that mean "bad input from the user": shown as one line, exit code 2.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError, PermissionError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        console.print(f"[bold red]error:[/] {escape(str(message))}")
        raise typer.Exit(code=2) from None
