"""`--config FILE.toml` for every stage command: the file's settings, overridden by the options given.

A command passes every option it has (converted to its config's field types); this module asks the
running command's click context which of them the user set (command line or environment) rather
than left at their defaults. Those are the flags, the rest the command's defaults, and
``kdpipe.config.resolve`` merges: the command's defaults < the file < the flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

import typer
from typer.core import TyperCommand

from kdpipe import config

try:  # recent typer runs on its own copy of click: the running command's context is that copy's
    from typer._click.globals import get_current_context
except ImportError:  # older typer runs on click itself
    from click import get_current_context

T = TypeVar("T")

CONFIG_HELP = ("TOML file of settings for this command, one key per field of its config, mostly named as "
               "the option (batch-size = 32 or batch_size = 32; an unknown key is an error that lists the "
               "valid ones). Precedence: defaults < the file < options given here.")
# Compared by name: the ParameterSource enum belongs to whichever click typer runs on.
_NOT_GIVEN = ("DEFAULT", "DEFAULT_MAP")


def config_option() -> Any:
    """The ``--config FILE.toml`` option (a fresh typer.Option per command)."""
    return typer.Option(None, "--config", help=CONFIG_HELP)


def given(ctx: typer.Context) -> set[str]:
    """Names of the command's parameters the user set (command line or environment), not left at default."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if source is not None and source.name not in _NOT_GIVEN}


def stage_config(cls: type[T], config_file: Optional[Path], values: Mapping[str, Any],
                 params: Mapping[str, str] | None = None) -> T:
    """The stage's config: the command's defaults < ``config_file`` < the options the user gave.

    Call it from a running command. ``values``: field name -> value of the option behind it (None: not
    set); ``params``: field name -> the option's parameter name where the two differ (``progress`` ->
    ``no_progress``).
    """
    explicit, params = given(get_current_context()), params or {}
    flags = {k: v for k, v in values.items() if params.get(k, k) in explicit}
    defaults = {k: v for k, v in values.items() if k not in flags}
    return config.resolve(cls, flags=flags, files=[config_file] if config_file is not None else [],
                          defaults=defaults)


def bare_value(option: str, value: str) -> type[TyperCommand]:
    """A command class on which ``option`` may be given without its value, then meaning ``value``.

    Typer has no option with an optional value (it dropped click's ``flag_value``), so the command
    completes its arguments before parsing them (``with_bare_value``). Use it as
    ``app.command(name, cls=bare_value("--resume", "yes"))``.
    """

    class BareValueCommand(TyperCommand):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            return super().parse_args(ctx, with_bare_value(args, option, value))

    return BareValueCommand


def with_bare_value(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``value`` after each bare ``option``: one that is last or followed by another option.

    ``--resume --max-steps 3`` -> ``--resume yes --max-steps 3``; ``--resume auto`` and
    ``--resume=auto`` are left as they are.
    """
    out = []
    for arg, following in zip(args, args[1:] + [None]):
        out.append(arg)
        if arg == option and (following is None or following.startswith("-")):
            out.append(value)
    return out
