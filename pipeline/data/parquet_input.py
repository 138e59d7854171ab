"""Parquet files of image bytes and captions as input (img2dataset's ``--output_format parquet``,
Hugging Face Parquet exports); the columns are described in ``tables.py``.

The spec is a ``.parquet`` file, a glob (``shards/*.parquet``) or a directory. A directory
holding ``*.parquet`` files is one split, ``train``; a directory whose sub-folders ``train/``,
``val/`` (or ``validation/``) and ``test/`` hold them has those splits (``validation`` is
named ``val`` in the cache). Files are read in sorted order; each file's rows are cut into
units of ``shard_size`` rows (a unit never spans two files), so the units and their contents
depend only on the files and ``shard_size``. A unit reads only the row groups it overlaps.

A directory that also holds tars is WebDataset input: img2dataset writes a metadata
``.parquet`` (without images) next to each tar it writes.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import BadValue, MissingInput
from .records import Record, Unit, caption_splits
from .tables import (SPLIT_NAMES, Columns, TableSplits, classlabel_names, pick_columns, require_pyarrow,
                     schema_features, table_records)

log = logging.getLogger("kdpipe")

SUFFIX = ".parquet"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(SUFFIX))


def split_folders(root: Path) -> dict[str, Path]:
    """Cache split name -> sub-folder of ``root`` holding Parquet files (train/, val/, validation/, test/)."""
    found: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name in SPLIT_NAMES):
        if parquet_files(sub):
            split = SPLIT_NAMES[sub.name]
            if split in found:
                raise BadValue(f"{root}: both {found[split].name}/ and {sub.name}/ would be the {split} split; keep one")
            found[split] = sub
    return found


def is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


@dataclass(frozen=True)
class RowRange:
    """Picklable reader of rows ``start:stop`` of one Parquet file."""

    file: str
    start: int
    stop: int
    columns: Columns

    def __call__(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.file) as parquet:
            groups, first = groups_covering(parquet.metadata, self.start, self.stop)
            table = parquet.read_row_groups(groups, columns=self.columns.names())
        rows = table.slice(self.start - first, self.stop - self.start)
        return iter(table_records(rows, self.columns, f"{Path(self.file).stem}-", self.start, Path(self.file).parent))


def groups_covering(metadata, start: int, stop: int) -> tuple[list[int], int]:  # noqa: ANN001 (pyarrow's)
    """Indices of the row groups that hold rows ``start:stop`` and the first row of the first one."""
    groups, first, offset = [], None, 0
    for index in range(metadata.num_row_groups):
        rows = metadata.row_group(index).num_rows
        if offset < stop and offset + rows > start:
            groups.append(index)
            first = offset if first is None else first
        offset += rows
    return groups, (start if first is None else first)


class ParquetSource(TableSplits):
    """Parquet input (``DATASETS`` entry "parquet"); see the module docstring for the layouts."""

    name = "parquet"
    options = frozenset({"image_column", "caption_column", "label_column"})

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        path = Path(spec)
        if path.is_dir():
            if any(p.name.endswith(TAR_SUFFIXES) for p in path.iterdir()) or caption_splits(path):
                return False
            return bool(parquet_files(path)) or bool(split_folders(path))
        return spec.endswith(SUFFIX) and "{" not in spec  # a brace pattern is tar syntax

    def __init__(self, spec: str, *, shard_size: int = 1000, image_column: str | None = None,
                 caption_column: str | None = None, label_column: str | None = None) -> None:
        require_pyarrow("Parquet input")
        if shard_size < 1:
            raise BadValue(f"shard_size must be >= 1, got {shard_size}")
        self.spec, self.shard_size = spec, shard_size
        self.asked = dict(image=image_column, caption=caption_column, label=label_column)
        self._files = self._split_files(spec)
        self._classnames: list[str] | None = None
        self._units = {split: self._split_units(split, files) for split, files in self._files.items()}

    def _split_files(self, spec: str) -> dict[str, list[Path]]:
        path = Path(spec)
        if path.is_dir():
            return {"train": parquet_files(path)} if parquet_files(path) else dict(
                (split, parquet_files(folder)) for split, folder in split_folders(path).items())
        files = sorted(Path(p) for p in glob.glob(spec)) if is_glob(spec) else [path]
        if not files or not all(f.is_file() for f in files):
            raise MissingInput(f"{spec}: no Parquet file there; pass a .parquet file, a glob such as "
                               "shards/*.parquet, or a directory of them")
        return {"train": files}

    def _split_units(self, split: str, files: list[Path]) -> list[Unit]:
        import pyarrow.parquet as pq

        units: list[Unit] = []
        for file in files:
            try:
                parquet = pq.ParquetFile(file)
            except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
                raise BadValue(f"{file}: not a readable Parquet file ({err})") from err
            with parquet:
                columns = pick_columns(parquet.schema_arrow, str(file), **self.asked)
                self._classnames = self._classnames or classlabel_names(schema_features(parquet.schema_arrow), columns.label)
                n_rows = parquet.metadata.num_rows
            for start in range(0, n_rows, self.shard_size):
                stop = min(start + self.shard_size, n_rows)
                units.append(Unit(len(units), f"{file.name}[{start}:{stop}]", RowRange(str(file), start, stop, columns),
                                  stop - start))
        return units

    def report(self) -> dict:
        return {"files": {s: len(f) for s, f in self._files.items()},
                "records": {s: sum(u.size or 0 for u in units) for s, units in self._units.items()}}
