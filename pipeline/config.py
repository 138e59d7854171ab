"""Stage settings from a TOML file and flags, checked against the stage's config dataclass.

Every stage has a config dataclass (``ExtractConfig``, ``TrainConfig``, ...); ``resolve`` builds
one from three sources. Precedence, lowest first:

    the dataclass's own defaults < ``defaults`` (a caller's, e.g. the CLI's option defaults)
    < each TOML file, in order < ``flags`` (what the user set explicitly)

A TOML file is flat: one key per field, dashes allowed (``batch-size = 16`` sets ``batch_size``);
a dict field (``loss_options``) is a table. Errors are ``ConfigError`` (a ``ValueError``, a user error): an
unknown key names the key, the file and the valid keys; a value of the wrong type names the key,
the file, the value and the type the field holds. TOML cannot say every Python type, so a file's
value is converted where that is unambiguous: str -> Path, array -> tuple, int -> float, table ->
nested config dataclass. A field may declare its own conversion of file values with
``field(metadata=toml_as(fn))`` (``views_used = 0`` read as ``"0"``).

A field declared with ``setting(default, help, short=..., minimum=...)`` also says what the command
line shows for it (help text, short flag, smallest value): the CLI builds a stage's options from its
fields, so each setting is defined once, here in its dataclass. ``dumps`` writes a config back as
the TOML these files hold.

None in ``flags`` or ``defaults`` means "not set" (TOML has no null either), so a caller passes
every option and lets this module sort out which were given.
"""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import MISSING
from pathlib import Path, PurePath
from typing import Any, Callable, Iterable, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

try:  # Python 3.11+; on 3.10 the `tomli` backport (a dependency there) has the same API
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

import tomli_w

from .errors import BadValue, MissingInput

T = TypeVar("T")

# dataclass field metadata keys
TOML_AS = "kdpipe.config.toml_as"  # converts a file's value first
HELP = "kdpipe.config.help"  # the command-line option's help text
SHORT = "kdpipe.config.short"  # its short name, e.g. "-e"
MINIMUM = "kdpipe.config.minimum"  # the smallest value the option takes
_NOT = object()  # "this value is not of that type" (None is a value)


class ConfigError(BadValue):
    """A config file or setting that does not fit the stage's config dataclass."""


def toml_as(convert: Callable[[Any], Any]) -> dict[str, Any]:
    """Field metadata: apply ``convert`` to a file's value before the type check."""
    return {TOML_AS: convert}


def setting(default: Any = MISSING, help: str = "", *, short: str | None = None, minimum: float | None = None,
            factory: Callable[[], Any] | None = None, convert: Callable[[Any], Any] | None = None) -> Any:
    """A config dataclass field with what the command line shows for it.

    ``default`` (or ``factory`` for a mutable one) as in ``dataclasses.field``; ``help`` the
    option's help text; ``short`` its short flag ("-e"); ``minimum`` the smallest value it takes;
    ``convert`` applied to a file's value first (``toml_as``).
    """
    metadata: dict[str, Any] = {HELP: help, **(toml_as(convert) if convert else {})}
    if short:
        metadata[SHORT] = short
    if minimum is not None:
        metadata[MINIMUM] = minimum
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- reading


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict, dashes in top-level keys turned into underscores; nothing checked."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return {k.replace("-", "_"): v for k, v in raw.items()}


def read_value(text: str) -> Any:
    """A value as TOML reads it (``0.5`` a float, ``3`` an int, ``true`` a bool), else ``text`` itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_assignment(text: str) -> dict[str, Any]:
    """``"hinton.T=2"`` -> {"hinton": {"T": 2}}: a TOML key (dotted for a nested table) = a value as
    ``read_value`` reads it. Raises ConfigError when there is no ``=`` or the key is not a TOML key."""
    key, sep, value = (part.strip() for part in text.partition("="))
    if not sep or not key:
        raise ConfigError(f"expected KEY=VALUE (e.g. hinton.T=2), got {text!r}")
    quoted = json.dumps(value, ensure_ascii=False)  # a TOML string: a bare word is read as one
    for line in (f"{key} = {value}", f"{key} = {quoted}"):
        try:
            return tomllib.loads(line)
        except tomllib.TOMLDecodeError:
            continue
    raise ConfigError(f"{key!r} is not a TOML key (letters, digits, _ and -; dotted for a table), in {text!r}")


def load(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file for config dataclass ``cls``, keys and types checked, values converted."""
    return check(cls, read_toml(path), source=str(path))


def check(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` (field name -> value, as TOML gives them) checked against ``cls``'s fields.

    Raises ConfigError naming ``source`` on an unknown key or a value of the wrong type.
    """
    hints, known = get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {unknown}; valid: {', '.join(sorted(known))}")
    checked = {}
    for key, value in values.items():
        convert = known[key].metadata.get(TOML_AS)
        try:
            out = _as_type(convert(value) if convert else value, hints[key])
        except ConfigError as err:  # in a nested table: say which
            raise ConfigError(f"{source}: in table {key}: {err}") from None
        if out is _NOT:
            raise ConfigError(f"{source}: {key} = {value!r} is a {type(value).__name__}, expected "
                              f"{_describe(hints[key])}")
        checked[key] = out
    return checked


def _as_type(value: Any, tp: Any) -> Any:
    """``value`` as an instance of annotation ``tp`` (converted where TOML cannot say it), or _NOT."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return next((out for out in (_as_type(value, a) for a in args) if out is not _NOT), _NOT)
    if origin in (list, tuple, dict):
        return _as_container(value, origin, args)
    if dataclasses.is_dataclass(tp):
        return _build(tp, check(tp, value, source=tp.__name__)) if isinstance(value, dict) else _NOT
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NOT
    if tp is int:  # bool is an int in Python, not in TOML
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return tp(value) if isinstance(value, (str, PurePath)) else _NOT
    return value if isinstance(tp, type) and isinstance(value, tp) else _NOT


def _as_container(value: Any, origin: type, args: tuple[Any, ...]) -> Any:
    """A list, tuple (fixed length or ``...``) or dict whose items fit ``args``, or _NOT."""
    if origin is dict:
        if not isinstance(value, dict):
            return _NOT
        key_t, value_t = args or (Any, Any)
        out = {_as_type(k, key_t): _as_type(v, value_t) for k, v in value.items()}
        return _NOT if _NOT in out or _NOT in out.values() else out
    if not isinstance(value, (list, tuple)):
        return _NOT
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            return _NOT
        items = [_as_type(v, a) for v, a in zip(value, args)]
    else:
        items = [_as_type(v, args[0] if args else Any) for v in value]
    return _NOT if _NOT in items else origin(items)


def _describe(tp: Any) -> str:
    """An annotation as a reader would write it: int, str | None, list[float]."""
    return tp.__name__ if isinstance(tp, type) and not get_args(tp) else str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- writing


def dumps(cfg: Any, leave_out: Iterable[str] = ()) -> str:
    """Config dataclass ``cfg`` as a TOML file that ``load`` reads back to it.

    None values are left out (TOML has no null: a missing key is the default), as are the
    fields named in ``leave_out``; paths are written as strings.
    """
    skip = set(leave_out)
    return tomli_w.dumps({k: _plain(v) for k, v in dataclasses.asdict(cfg).items()
                          if v is not None and k not in skip})


def _plain(value: Any) -> Any:
    """``value`` with every path turned into its string (TOML has no path type)."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- merging


def resolve(cls: type[T], flags: Mapping[str, Any] | None = None, files: Iterable[str | Path] = (),
            defaults: Mapping[str, Any] | None = None) -> T:
    """An instance of config dataclass ``cls``: defaults < ``defaults`` < each of ``files`` < ``flags``.

    ``flags`` and ``defaults`` map field names to values (None: not set) and are trusted to hold the
    right types (the caller built them); file values are checked. A field without a default that no
    source sets raises ConfigError.
    """
    merged = _set_only(cls, defaults or {}, "defaults")
    for path in files:
        merged.update(load(cls, path))
    merged.update(_set_only(cls, flags or {}, "flags"))
    return _build(cls, merged)


def _build(cls: type[T], values: dict[str, Any]) -> T:
    """``cls(**values)``, or ConfigError naming the fields without a default that ``values`` lacks."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing setting(s) {', '.join(missing)}: give them on the "
                          "command line or in the config file")
    return cls(**values)


def _set_only(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` without its None entries; a key that is not a field of ``cls`` raises."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {unknown}; valid: {', '.join(sorted(names))}")
    return {k: v for k, v in values.items() if v is not None}
