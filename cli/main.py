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


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging, and the traceback of "
                                 "every error (an error you can fix is otherwise one short message)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print kdpipe's version and exit."),
) -> None:
    errors.set_verbose(verbose)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


for _module in (cmd_data, cmd_extract, cmd_whiten, cmd_train, cmd_eval, cmd_bench, cmd_export, cmd_demo):
    _module.register(app)

if __name__ == "__main__":
    app()
