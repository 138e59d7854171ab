"""`kdpipe train`: distil a student from a cache (the teacher is never loaded).

Its options are ``TrainConfig``'s fields (``kdpipe.trainconfig``: each one's help and default
there), one flag per field (``cli.options.with_settings``). Precedence: the defaults <
RUN/config.toml (with --resume) < --config FILE.toml < the flags given on the command line.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from .errors import user_errors
from .options import bare_value, config_option, with_settings
from kdpipe.progress import console
from kdpipe.trainconfig import TrainConfig, config_toml, resolve_config


class Resume(str, Enum):
    """``--resume`` [yes|no|auto]; the bare flag means yes."""

    yes = "yes"
    no = "no"
    auto = "auto"


RESUME = {Resume.yes: True, Resume.no: False, Resume.auto: "auto"}  # -> TrainConfig.resume


def train(
    flags: dict[str, Any],
    config: Optional[Path] = config_option(),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved settings as TOML (what "
                                      "RUN/config.toml would hold) and exit without training."),
) -> None:
    """Distil STUDENT from the teacher embeddings cached in CACHE; writes OUT/ (config, metrics, student)."""
    with user_errors():
        cfg = resolve_config(flags, config)
    if print_config:
        typer.echo(config_toml(cfg), nl=False)
        return
    from kdpipe.train import run  # torch: only when training

    with user_errors():
        result = run(cfg)
    if result["rank"] != 0:  # under torchrun only rank 0 reports
        return
    if result["stopped"]:
        console.print(f"[yellow]stopped[/] by {result['stopped']} after step {result['step']}, checkpoint saved; "
                      f"resume with: kdpipe train --out {escape(result['run'])} --resume auto", soft_wrap=True)
        return
    if result["stopped"]:
        console.print(f"[yellow]stopped[/] by {result['stopped']} after step {result['step']}, checkpoint saved; "
                      f"resume with: kdpipe train --out {escape(result['run'])} --resume auto", soft_wrap=True)
        return
    val = result["val"] or {}
    shown = ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in val.items() if k != "val_images")
    console.print(f"[green]trained[/] {result['step']} steps; val: {shown or 'n/a'}")
    best = result["best"].get("step")
    console.print(f"student: {result['run']}/student.json; weights student-last.safetensors (step {result['step']})"
                  + ("" if best in (None, result["step"]) else f" and student-best.safetensors (step {best}, "
                     "best validation score; what eval and bench use by default)"))


def register(app: typer.Typer) -> None:
    app.command("train", cls=bare_value("--resume", "yes"))(with_settings(TrainConfig, train))
