"""A Hugging Face dataset saved with ``save_to_disk`` as input (local folders only).

Layouts: a ``Dataset`` folder (``dataset_info.json`` + ``state.json`` + ``data-*.arrow``) is one
split, ``train``; a ``DatasetDict`` folder (``dataset_dict.json`` and one such folder per split)
has its splits, ``validation`` named ``val`` in the cache (the trainer validates on ``val``).
Columns are described in ``tables.py``; an ``Image`` feature is read as its stored bytes, never
decoded here, and a ``ClassLabel`` label column gives the class names.

Read with the ``datasets`` package (``pip install 'kdpipe[hf]'``), imported where used: its
``load_from_disk`` memory-maps the Arrow files and owns their layout (the ``state.json``
fields, indices files of older versions), which kdpipe then does not have to track. Each unit
(``shard_size`` consecutive rows of a split) re-opens the folder in the process that reads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import BadValue
from .records import Record, Unit
from .tables import SPLIT_NAMES, Columns, TableSplits, pick_columns, require_pyarrow, table_records

log = logging.getLogger("kdpipe")

DICT_FILE = "dataset_dict.json"  # what save_to_disk writes for a DatasetDict
DATASET_FILES = ("dataset_info.json", "state.json")  # ... and for a Dataset


def is_dataset_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in DATASET_FILES)


def split_folders(root: Path) -> dict[str, Path]:
    """Cache split name -> the saved Dataset folder of that split."""
    if not (root / DICT_FILE).is_file():
        return {"train": root}
    folders: dict[str, Path] = {}
    for name in json.loads((root / DICT_FILE).read_text())["splits"]:
        split = SPLIT_NAMES.get(name, name)
        if split in folders:
            raise BadValue(f"{root / DICT_FILE}: splits {folders[split].name} and {name} would both be {split!r}")
        folders[split] = root / name
    return folders


def load_dataset_folder(folder: Path) -> Any:
    """``datasets.load_from_disk`` of one Dataset folder, or a one-line error naming the extra."""
    try:
        import datasets
    except ImportError:
        raise BadValue("Hugging Face dataset input needs the datasets package: pip install 'kdpipe[hf]'") from None
    dataset = datasets.load_from_disk(str(folder))
    if not isinstance(dataset, datasets.Dataset):
        raise BadValue(f"{folder}: expected one saved split (a Dataset), found {type(dataset).__name__}")
    return dataset


def classlabel_names(dataset: Any, column: str | None) -> list[str] | None:
    """The names of a ``ClassLabel`` label column (None for plain integers or no label)."""
    import datasets

    feature = dataset.features.get(column) if column else None
    return [str(n) for n in feature.names] if isinstance(feature, datasets.ClassLabel) else None


@dataclass(frozen=True)
class SplitRows:
    """Picklable reader of rows ``start:stop`` of one saved split."""

    folder: str
    start: int
    stop: int
    columns: Columns

    def __call__(self) -> Iterator[Record]:
        dataset = load_dataset_folder(Path(self.folder)).select_columns(self.columns.names())
        table = dataset.with_format("arrow")[self.start : self.stop]  # raw storage: image bytes stay encoded
        return iter(table_records(table, self.columns, f"{Path(self.folder).name}-", self.start, Path(self.folder)))


class HfDiskSource(TableSplits):
    """A ``save_to_disk`` folder (``DATASETS`` entry "hf"); see the module docstring."""

    name = "hf"
    options = frozenset({"image_column", "caption_column", "label_column"})

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        path = Path(spec)
        return path.is_dir() and ((path / DICT_FILE).is_file() or is_dataset_folder(path))

    def __init__(self, spec: str, *, shard_size: int = 1000, image_column: str | None = None,
                 caption_column: str | None = None, label_column: str | None = None) -> None:
        require_pyarrow("Hugging Face dataset input")
        if shard_size < 1:
            raise BadValue(f"shard_size must be >= 1, got {shard_size}")
        self.spec, self.shard_size = spec, shard_size
        asked = dict(image=image_column, caption=caption_column, label=label_column)
        self._classnames: list[str] | None = None
        self._rows: dict[str, int] = {}
        self._units = {split: self._split_units(split, folder, asked)
                       for split, folder in split_folders(Path(spec)).items()}

    def _split_units(self, split: str, folder: Path, asked: dict[str, str | None]) -> list[Unit]:
        dataset = load_dataset_folder(folder)
        columns = pick_columns(dataset.data.schema, str(folder), **asked)
        self._classnames = self._classnames or classlabel_names(dataset, columns.label)
        self._rows[split] = n_rows = len(dataset)
        return [Unit(i, f"{split}[{start}:{min(start + self.shard_size, n_rows)}]",
                     SplitRows(str(folder), start, min(start + self.shard_size, n_rows), columns),
                     min(start + self.shard_size, n_rows) - start)
                for i, start in enumerate(range(0, n_rows, self.shard_size))]

    def report(self) -> dict:
        return {"records": dict(self._rows)}
