"""Options shared by the stage commands: `--config FILE.toml`, and options built from a config dataclass.

A command passes every option it has (converted to its config's field types); this module asks the
running command's click context which of them the user set (command line or environment) rather
than left at their defaults. Those are the flags, the rest the command's defaults, and
``kdpipe.config.resolve`` merges: the command's defaults < the file < the flags.

``with_settings(cls, command)`` makes a command's options from the fields of config dataclass
``cls`` (``kdpipe.config.setting`` holds each one's help, short flag and minimum), so a new field is
a new flag with no command-line code. Each field ``name`` is the option ``--name`` with dashes, as
in a config file, and takes:

- a bool: ``--name/--no-name``;
- an int, float, str or path: its value;
- a list or tuple: a comma list, ``--mean 0.48,0.46,0.41``;
- a dict: ``KEY=VALUE``, repeatable (``--loss-options hinton.T=2 --loss-options crd.learn_scale=false``):
  the key may be dotted for a nested table, the value is read as TOML (a bare word is a string).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

import typer
from typer.core import TyperCommand

from kdpipe import config

T = TypeVar("T")

CONFIG_HELP = ("TOML file of settings for this command, one key per field of its config, mostly named as "
               "the option (batch-size = 32 or batch_size = 32; an unknown key is an error that lists the "
               "valid ones). Precedence: defaults < the file < options given here.")
# Compared by name: the ParameterSource enum belongs to whichever click typer runs on.
_NOT_GIVEN = ("DEFAULT", "DEFAULT_MAP")
_SCALARS = (int, float, str)


def config_option() -> Any:
    """The ``--config FILE.toml`` option (a fresh typer.Option per command)."""
    return typer.Option(None, "--config", help=CONFIG_HELP)


def given(ctx: typer.Context) -> set[str]:
    """Names of the command's parameters the user set (command line or environment), not left at default."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if source is not None and source.name not in _NOT_GIVEN}


def stage_config(ctx: typer.Context, cls: type[T], config_file: Optional[Path], values: Mapping[str, Any],
                 params: Mapping[str, str] | None = None) -> T:
    """The stage's config: the command's defaults < ``config_file`` < the options the user gave.

    ``ctx``: the running command's context; ``values``: field name -> value of the option behind it
    (None: not set); ``params``: field name -> the option's parameter name where the two differ
    (``progress`` -> ``no_progress``).
    """
    explicit, params = given(ctx), params or {}
    flags = {k: v for k, v in values.items() if params.get(k, k) in explicit}
    defaults = {k: v for k, v in values.items() if k not in flags}
    return config.resolve(cls, flags=flags, files=[config_file] if config_file is not None else [],
                          defaults=defaults)


# --------------------------------------------------------------------------- options from a config dataclass


def with_settings(cls: type, command: Callable[..., None]) -> Callable[..., None]:
    """``command`` as a typer command with one option per field of config dataclass ``cls``.

    ``command(flags, **own)`` keeps its own parameters (``--config`` ...); ``flags`` is what the
    user set of ``cls``'s options (field name -> value of the field's type), for ``config.resolve``
    to put above the files. Options left alone are not in it: the dataclass default they show is
    the lowest layer anyway.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
    clash = sorted(set(fields) & ({p.name for p in own} | {"ctx"}))
    if clash:
        raise TypeError(f"{command.__name__}: parameters {clash} are also fields of {cls.__name__}")

    def run(ctx: typer.Context, **values: Any) -> None:
        flags = {name: _field_value(cls, name, hints[name], values[name]) for name in given(ctx) if name in fields}
        command(flags=flags, **{p.name: values[p.name] for p in own})

    # typer builds a command's options from its signature (inspect.signature, which reads
    # __signature__) and its type hints (__annotations__): give run both, generated.
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    params = [context, *(_parameter(f, hints[f.name]) for f in fields.values()),
              *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own)]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__name__, run.__qualname__, run.__doc__ = command.__name__, command.__qualname__, command.__doc__
    return run


def _parameter(f: dataclasses.Field, tp: Any) -> inspect.Parameter:
    """Field ``f`` (of type ``tp``) as a keyword parameter whose default is its typer option."""
    base = _without_none(tp)
    flag, default = "--" + f.name.replace("_", "-"), _default(f)
    short = [f.metadata[config.SHORT]] if config.SHORT in f.metadata else []
    extra: dict[str, Any] = {}
    if base is bool:
        annotation, decls = bool, [f"{flag}/--no-{flag[2:]}", *short]
    elif get_origin(base) is dict:
        annotation, decls, extra["metavar"] = Optional[list[str]], [flag, *short], "KEY=VALUE"
        default = None  # repeatable: none given is the empty table
    elif get_origin(base) in (list, tuple):
        annotation, decls, extra["metavar"] = Optional[str], [flag, *short], "A,B,..."
        default = ",".join(str(v) for v in default) if default is not None else None
    elif set(get_args(base)) == {bool, str}:  # a word, or true/false from a file (train's --resume yes|no|auto)
        annotation, decls = Optional[str], [flag, *short]
    elif base in _SCALARS or (isinstance(base, type) and issubclass(base, PurePath)):
        annotation, decls = Optional[base], [flag, *short]
        if config.MINIMUM in f.metadata:
            extra["min"] = f.metadata[config.MINIMUM]
    else:
        raise TypeError(f"field {f.name}: no command-line option for type {tp}; give it one in cli/options.py")
    option = typer.Option(default, *decls, help=f.metadata.get(config.HELP, ""),
                          show_default=default not in (None, ""), **extra)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _without_none(tp: Any) -> Any:
    """``X | None`` -> X; any other annotation as it is."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _field_value(cls: type, name: str, tp: Any, raw: Any) -> Any:
    """An option's value as field ``name`` holds it: comma lists and KEY=VALUE items parsed, types checked."""
    base, flag = _without_none(tp), "--" + name.replace("_", "-")
    try:
        if get_origin(base) is dict:
            value: Any = functools.reduce(_merge, (config.read_assignment(item) for item in raw or []), {})
        elif get_origin(base) in (list, tuple):
            value = None if raw is None else [config.read_value(item.strip()) for item in raw.split(",")]
        else:
            return raw  # typer made it an int, float, str, path or bool already
        return None if value is None else config.check(cls, {name: value}, source=flag)[name]
    except config.ConfigError as err:
        raise typer.BadParameter(str(err).removeprefix(f"{flag}: "), param_hint=flag) from None


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, nested tables merged key by key (``--x hinton.T=2 --x hinton.alpha=1`` sets both)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
