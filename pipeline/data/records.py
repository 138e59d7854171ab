"""What every input source yields: ``Record``s grouped into ordered ``Unit``s.

A ``Unit`` is one output shard's worth of input. Output shard ``i`` of a split holds exactly
unit ``i``, so rank ``r`` of ``W`` can process units ``i % W == r`` and any world size writes
the same files. Source kinds live in the ``DATASETS`` registry; ``open_source(spec)`` picks
one by looking at the spec (a COCO-style directory, tar files, or a ``pipe:`` URL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

from ..registry import Registry

log = logging.getLogger("kdpipe")

EXPECTED_LAYOUTS = (
    "expected a COCO-style directory (ROOT/annotations/captions_<split>.json with images in "
    "ROOT/<split>/), WebDataset tars (shard.tar, a directory of *.tar, or a brace pattern such "
    "as shards/{00000..00009}.tar) or a pipe: URL (pipe:cat shard.tar); "
    "for a small synthetic dataset run `kdpipe make-shapes data/shapes`"
)


@dataclass(frozen=True)
class Record:
    """One input image with its captions. Exactly one of ``path`` / ``data`` is normally set."""

    key: str  # unique image id within the source, e.g. "000000391895"
    captions: tuple[str, ...]  # raw captions; extract drops empty ones
    label: int | None = None  # class index when the source has labels
    path: str | None = None  # image file on disk ...
    data: bytes | None = None  # ... or encoded image bytes (tar input)


class FixedRecords:
    """A picklable reader over records already in memory (directory sources)."""

    def __init__(self, records: Iterable[Record]) -> None:
        self.records = tuple(records)

    def __call__(self) -> Iterable[Record]:
        return self.records

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class Unit:
    """One output shard's worth of input.

    ``reader`` is a picklable zero-argument callable returning the records (so a unit can be
    sent to a worker process); ``size`` is the record count when known without reading.
    """

    index: int
    name: str  # for logs, e.g. "train[0:1000]" or the tar URL
    reader: Callable[[], Iterable[Record]]
    size: int | None = None

    def records(self) -> Iterator[Record]:
        return iter(self.reader())


@runtime_checkable
class Source(Protocol):
    name: str

    def splits(self) -> list[str]: ...

    def units(self, split: str) -> list[Unit]: ...

    def classnames(self) -> list[str] | None: ...

    def report(self) -> dict: ...


class SourceKind(Protocol):
    """What a ``DATASETS`` entry provides: a spec test and a constructor."""

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool: ...

    def __call__(self, spec: str, *, shard_size: int, split_file: str | None, keep_leaky: bool) -> Source: ...


DATASETS: Registry[SourceKind] = Registry("dataset kind")


def chunk_units(records: list[Record], shard_size: int, split: str) -> list[Unit]:
    """Consecutive chunks of ``shard_size`` records, in the given (sorted) order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    units = []
    for index, start in enumerate(range(0, len(records), shard_size)):
        chunk = FixedRecords(records[start : start + shard_size])
        units.append(Unit(index, f"{split}[{start}:{start + len(chunk)}]", chunk, len(chunk)))
    return units


def open_source(
    spec: str, *, shard_size: int = 1000, split_file: str | None = None, keep_leaky: bool = False
) -> Source:
    """Open the input named by ``spec``; the kind is chosen from its layout.

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` for a layout
    no registered kind recognises; both messages say which layouts are expected.
    """
    from . import coco, wds_input  # noqa: F401  (registers the kinds)

    spec = str(spec)
    matching = [name for name in DATASETS.names() if DATASETS.get(name).matches(spec, split_file=split_file)]
    if not matching:
        _raise_unrecognised(spec)
    if len(matching) > 1:  # the kinds' tests are disjoint; this guards future entries
        raise ValueError(f"{spec}: ambiguous input, matches {', '.join(matching)}")
    log.debug("data %s: %s input", spec, matching[0])
    kind = DATASETS.get(matching[0])
    return kind(spec, shard_size=shard_size, split_file=split_file, keep_leaky=keep_leaky)


def _raise_unrecognised(spec: str) -> None:
    from pathlib import Path

    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such file or directory; {EXPECTED_LAYOUTS}")
    raise ValueError(f"{spec}: unrecognised input layout; {EXPECTED_LAYOUTS}")
