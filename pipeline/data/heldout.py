"""A held-out ``val`` split for input that has only ``train`` (CSV, tars).

Two ways, both applied by ``open_source`` over any kind:

- ``WithVal``: another input (``--val-data``) is ``val``; its units are its own train units.
- ``HashSplit``: a fraction of the samples (``--val-fraction``) is ``val``, picked by a hash of each
  sample's key (``in_held_out``). The choice is a pure function of the key, so re-runs, any world
  size and any number of workers pick the same images. Unit ``i`` of the input becomes unit ``i``
  of both splits (each keeps its own side of the hash), so output shard ``i`` of ``train`` and of
  ``val`` hold fixed sets of samples, whichever process writes them. Each input unit is read
  once per split: for tars that means every tar is read twice (the encoded bytes only; nothing
  is decoded for the samples a split leaves out).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator

from ..errors import BadValue, UnknownName
from .records import FixedRecords, Record, Source, Unit

SPLITS = ("train", "val")


def in_held_out(key: str, fraction: float) -> bool:
    """Whether the sample ``key`` is in the held-out ``fraction``: the first 8 bytes of
    sha256(key), read as a number in [0, 1), below ``fraction``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class OneSide:
    """A picklable reader: the records of ``reader`` on one side of the hash split."""

    def __init__(self, reader: Callable[[], Iterable[Record]], fraction: float, held_out: bool) -> None:
        self.reader, self.fraction, self.held_out = reader, fraction, held_out

    def __call__(self) -> Iterator[Record]:
        return (r for r in self.reader() if in_held_out(r.key, self.fraction) == self.held_out)


def one_side(unit: Unit, split: str, fraction: float) -> Unit:
    """Unit ``unit.index`` of ``split``: the records of ``unit`` on that side. Records already in
    memory are filtered now (the unit's size stays known); others as they are read."""
    reader = OneSide(unit.reader, fraction, held_out=split == "val")
    name = f"{split} of {unit.name}"
    if isinstance(unit.reader, FixedRecords):
        kept = FixedRecords(reader())
        return Unit(unit.index, name, kept, len(kept))
    return Unit(unit.index, name, reader)


def check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise BadValue(f"--val-fraction {fraction}: expected a number between 0 and 1 (e.g. 0.01)")


def _check_split(split: str, how: str) -> None:
    if split not in SPLITS:
        raise UnknownName(f"unknown split {split!r}; valid: train, val ({how})")


class HashSplit:
    """``source``'s train split as ``train`` and ``val`` by the hash of each key (``--val-fraction``)."""

    def __init__(self, source: Source, fraction: float) -> None:
        check_fraction(fraction)
        self.source, self.fraction, self.name = source, fraction, source.name
        self._units: dict[str, list[Unit]] = {}

    def splits(self) -> list[str]:
        return list(SPLITS)

    def units(self, split: str) -> list[Unit]:
        _check_split(split, f"val is --val-fraction {self.fraction} of the input")
        if split not in self._units:  # extract asks several times; filtering in-memory records once is enough
            self._units[split] = [one_side(u, split, self.fraction) for u in self.source.units("train")]
        return list(self._units[split])

    def classnames(self) -> list[str] | None:
        return self.source.classnames()

    def report(self) -> dict:
        return {**self.source.report(), "val_fraction": self.fraction, "val_by": "sha256 of the sample key"}


class WithVal:
    """``train``'s train split as ``train`` and ``val``'s train split as ``val`` (``--val-data``)."""

    def __init__(self, train: Source, val: Source, val_spec: str) -> None:
        if train.classnames() != val.classnames():
            raise BadValue(f"--val-data {val_spec}: its class names differ from the training input's")
        self.train, self.val, self.val_spec, self.name = train, val, val_spec, train.name

    def splits(self) -> list[str]:
        return list(SPLITS)

    def units(self, split: str) -> list[Unit]:
        _check_split(split, f"val is --val-data {self.val_spec}")
        return (self.train if split == "train" else self.val).units("train")

    def classnames(self) -> list[str] | None:
        return self.train.classnames()

    def report(self) -> dict:
        return {**self.train.report(), "val_data": {"spec": self.val_spec, "kind": self.val.name,
                                                    "report": self.val.report()}}

