"""The ``kdpipe`` command: one sub-command per stage, each registered by its own module."""

from __future__ import annotations

import logging

import typer
from rich.logging import RichHandler

from . import cmd_bench, cmd_data, cmd_demo, cmd_eval, cmd_export, cmd_extract, cmd_train, cmd_whiten, errors
from kdpipe.progress import console

app = typer.Typer(
    name="kdpipe",
    help="Distil CLIP teachers into small students from cached teacher embeddings.\n\n"
    "Stages: make-shapes -> extract -> fit-whitening -> train -> eval -> bench -> export (or: demo).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    """--version: the installed distribution's version (imported here: importlib.metadata takes ~0.1 s)."""
    if value:
        from importlib.metadata import version

        typer.echo(f"kdpipe {version('kdpipe')}")
        raise typer.Exit()


class PlainLogHandler(logging.Handler):
    """Records as whole plain lines on the console (rich's handler pads and wraps them to its width)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.out(self.format(record), highlight=False)
        except Exception:  # noqa: BLE001  (logging's contract: a failing handler reports, never raises)
            self.handleError(record)


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging (other libraries' INFO lines, "
                                 "open_clip's, included), and the traceback of every error (an error you can fix "
                                 "is otherwise one short message)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print kdpipe's version and exit."),
) -> None:
    errors.set_verbose(verbose)
    setup_logging(verbose)


def setup_logging(verbose: bool) -> None:
    """kdpipe's lines from INFO up; other libraries' (open_clip logs on the root logger) from WARNING
    up, unless ``verbose``: everything from DEBUG. A terminal gets rich's handler; a file or a pipe (a
    SLURM log) whole, unwrapped lines with the time."""
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = PlainLogHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("kdpipe").setLevel(logging.DEBUG if verbose else logging.INFO)


for _module in (cmd_data, cmd_extract, cmd_whiten, cmd_train, cmd_eval, cmd_bench, cmd_export, cmd_demo):
    _module.register(app)

if __name__ == "__main__":
    app()
