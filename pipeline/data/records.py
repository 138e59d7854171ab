"""What every input source yields: ``Record``s grouped into ordered ``Unit``s.

A ``Unit`` is one output shard's worth of input. Output shard ``i`` of a split holds exactly
unit ``i``, so rank ``r`` of ``W`` can process units ``i % W == r`` and any world size writes
the same files. A source kind (``coco.py``, ``flickr.py``, ``csv_input.py``, ``wds_input.py``)
implements ``SourceKind``; ``sources.py`` registers the kinds and picks one for a spec.

This module is the leaf of ``kdpipe.data``: the record types, the layouts every kind tests for
(``EXPECTED_LAYOUTS``, ``caption_splits``), the missing-image report every kind gives
(``describe_missing``, ``check_missing``) and ``ErrorCounter``, the webdataset handler of both
tar readers (input tars here, cache shards in ``kdpipe.cachereader``). It imports no kind.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol, runtime_checkable

from ..errors import BadValue, MissingInput, UnknownName

log = logging.getLogger("kdpipe")

EXPECTED_LAYOUTS = (
    "expected a COCO-style directory (ROOT/annotations/captions_<split>.json with images in "
    "ROOT/<split>/), an image folder with Karpathy's split file (--split-file dataset_coco.json, "
    "dataset_flickr30k.json or dataset_flickr8k.json), a .csv/.tsv file of image paths and captions, "
    "WebDataset tars (shard.tar, a directory of *.tar, or a brace pattern such "
    "as shards/{00000..00009}.tar), a pipe: URL (pipe:cat shard.tar), Parquet files of image bytes "
    "and captions (a.parquet, shards/*.parquet, a directory of them or of train/ and val/ folders of "
    "them), a Hugging Face dataset folder written by save_to_disk, a labelled image folder (ROOT/CLASS/IMAGE, or "
    "ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE) or CIFAR-10/100 python batches (cifar-10-batches-py/, "
    "cifar-100-python/); "
    "for a small synthetic dataset run `kdpipe make-shapes data/shapes`"
)
MISSING_SHOWN = 5  # missing images named in a message


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
    """What a ``DATASETS`` entry provides: a spec test, the input options it reads and a constructor.

    ``options`` names the keyword arguments of ``open_source`` the kind takes besides
    ``shard_size`` (e.g. ``split_file``); ``open_source`` passes exactly those and refuses an
    option the user set that no opened kind reads.
    """

    name: ClassVar[str]
    options: ClassVar[frozenset[str]]

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool: ...

    def __call__(self, spec: str, *, shard_size: int, **options: Any) -> Source: ...


def chunk_units(records: list[Record], shard_size: int, split: str) -> list[Unit]:
    """Consecutive chunks of ``shard_size`` records, in the given (sorted) order."""
    if shard_size < 1:
        raise BadValue(f"shard_size must be >= 1, got {shard_size}")
    units = []
    for index, start in enumerate(range(0, len(records), shard_size)):
        chunk = FixedRecords(records[start : start + shard_size])
        units.append(Unit(index, f"{split}[{start}:{start + len(chunk)}]", chunk, len(chunk)))
    return units


class RecordSplits:
    """What a kind whose splits are record lists in memory shares of ``Source`` (coco, flickr, image
    folders): ``_records`` {split: [Record]} in order, cut into units of ``shard_size`` on demand."""

    _records: dict[str, list[Record]]
    shard_size: int

    def splits(self) -> list[str]:
        return list(self._records)

    def records(self, split: str) -> list[Record]:
        if split not in self._records:
            raise UnknownName(f"unknown split {split!r}; valid: {', '.join(self._records)}")
        return self._records[split]

    def units(self, split: str) -> list[Unit]:
        return chunk_units(self.records(split), self.shard_size, split)


class UnitSplits:
    """What a kind whose units are built up front shares of ``Source`` (parquet, hf, cifar):
    ``_units`` {split: [Unit]}."""

    _units: dict[str, list[Unit]]

    def splits(self) -> list[str]:
        return list(self._units)

    def units(self, split: str) -> list[Unit]:
        if split not in self._units:
            raise UnknownName(f"unknown split {split!r}; valid: {', '.join(self._units)}")
        return list(self._units[split])


def describe_missing(what: str, missing: list[str], total: int, where: str = "") -> str:
    """'WHAT N of M images not found WHERE (first 5: a, b, ...)': the count and the first few names."""
    shown = ", ".join(missing[:MISSING_SHOWN])
    first = f"first {MISSING_SHOWN}: " if len(missing) > MISSING_SHOWN else ""
    return f"{what} {len(missing)} of {total} images not found{' ' + where if where else ''} ({first}{shown})"


def check_missing(message: str, n_missing: int, total: int, skip: bool) -> None:
    """Refuse an input that names images not on disk (``message`` from ``describe_missing``),
    before any teacher work, unless ``skip`` (then a warning); refused whenever none exist."""
    if n_missing == 0:
        return
    if n_missing == total:
        raise MissingInput(f"{message}: none of its images exist; check the paths")
    if not skip:
        raise MissingInput(f"{message}; pass --skip-missing to extract without them")
    log.warning("%s; skipped (--skip-missing)", message)


def caption_splits(root: Path) -> list[str]:
    """Split names with a COCO ``captions_{split}.json`` file under ``root/annotations``.

    Here rather than in ``coco.py`` because the tar kind tests it too: a directory of tars
    that also holds caption files is COCO-style, not tar input.
    """
    files = sorted((root / "annotations").glob("captions_*.json"))
    return [f.stem[len("captions_") :] for f in files]


class ErrorCounter:
    """A webdataset handler that counts bad samples by exception type and keeps going, without
    sleeping (webdataset's ``warn_and_continue`` sleeps 0.5 s per error).

    ``what`` names a sample in log lines; the first ``log_first`` errors are logged as they
    happen. ``max_consecutive`` errors with no success in between (see ``watch``) raise
    ``RuntimeError``, since an endless stream of bad samples would hang a reader; ``None``: no limit.
    """

    def __init__(self, what: str = "sample", log_first: int = 0, max_consecutive: int | None = None) -> None:
        self.what = what
        self.log_first = log_first
        self.max_consecutive = max_consecutive
        self.counts: Counter[str] = Counter()
        self.first: str | None = None  # "Type: message" of the first error, for a summary line
        self.consecutive = 0
        self.reported = 0

    def __call__(self, exn: Exception) -> bool:
        name = type(exn).__name__
        self.counts[name] += 1
        self.consecutive += 1
        if self.first is None:
            self.first = f"{name}: {exn.args[0] if exn.args else exn}"
        if self.total() <= self.log_first:
            log.warning("skipped a bad %s (%s: %s)", self.what, name, str(exn)[:200])
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise RuntimeError(f"{self.consecutive} bad {self.what}s in a row; last: {exn}") from exn
        return True  # continue with the next sample

    def total(self) -> int:
        return sum(self.counts.values())

    def watch(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Wrap a per-sample function so a success resets the consecutive-error count."""

        def wrapped(sample: Any) -> Any:
            out = fn(sample)
            self.consecutive = 0
            return out

        return wrapped

    def take(self) -> int:
        """Errors since the last call."""
        new, self.reported = self.total() - self.reported, self.total()
        return new
