"""A tiny name -> builder registry (timm's ``register_model`` idea), one per pluggable kind."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders. Unknown names raise ``UnknownName`` (a ``KeyError``) listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            for n in (name, *aliases):
                if n in self._entries:
                    raise ValueError(f"{self.kind} {n!r} is registered twice")
                self._entries[n] = obj
            return obj

        return wrap

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise UnknownName(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
