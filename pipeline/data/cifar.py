"""CIFAR-10 / CIFAR-100 python batches, as the CIFAR site ships them (and torchvision downloads them).

Layouts (``--data`` is the batches folder or the folder holding it)::

    cifar-10-batches-py/batches.meta            {"label_names": [10 names]}
    cifar-10-batches-py/data_batch_1 .. _5      {"data": uint8 [N, 3072], "labels": [N]}  -> train
    cifar-10-batches-py/test_batch              the same                                  -> val
    cifar-100-python/meta                       {"fine_label_names": [100 names]}
    cifar-100-python/train, test                {"data": uint8 [N, 3072], "fine_labels": [N]}  -> train, val

Each file is a pickle (``encoding="latin1"`` reads Python 2's). A row of ``data`` is a 32x32 RGB
image, channel-major (1024 red, 1024 green, 1024 blue values), stored as PNG bytes in the record.
Class names are the meta file's, underscores read as spaces (CLIP's spelling, so the ``cifar10``
and ``cifar100`` prompt sets match them). Every image gets the captions ``labelled.class_captions``
builds from its class name. Keys are the image's place in its split (``000000000``, ...). A file
that is missing, not a pickle, or without the expected keys is an error naming it.
"""

from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadValue, MissingInput
from .labelled import class_captions, folder_classname
from .records import Record, Unit, UnitSplits

SIDE = 32  # CIFAR images are 32x32 RGB


@dataclass(frozen=True)
class Layout:
    """One CIFAR variant: its folder name, meta file and key, label key and files per split."""

    name: str
    folder: str
    meta: str
    names_key: str
    labels_key: str
    splits: dict[str, tuple[str, ...]]


LAYOUTS = (
    Layout("cifar10", "cifar-10-batches-py", "batches.meta", "label_names", "labels",
           {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "val": ("test_batch",)}),
    Layout("cifar100", "cifar-100-python", "meta", "fine_label_names", "fine_labels",
           {"train": ("train",), "val": ("test",)}),
)
EXPECTED = "; ".join(f"{l.folder}/ with {l.meta} and {', '.join(f for fs in l.splits.values() for f in fs)}"
                     for l in LAYOUTS)


def find_layout(root: Path) -> tuple[Path, Layout] | None:
    """(batches folder, its layout) for ROOT being a batches folder or holding one, else None."""
    for layout in LAYOUTS:
        for folder in (root, root / layout.folder):
            if (folder / layout.meta).is_file() or (folder.name == layout.folder and folder.is_dir()):
                return folder, layout
    return None


def load_pickle(path: Path, expected: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict; a missing or unreadable file is an error naming it and ``expected``."""
    if not path.is_file():
        raise MissingInput(f"{path} not found; expected {expected}")
    try:
        with path.open("rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise BadValue(f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err}); "
                       f"expected {expected}") from err
    if not isinstance(data, dict):
        raise BadValue(f"{path}: holds a {type(data).__name__}, expected a dict ({expected})")
    return data


def read_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 rows [N, 3072], int64 labels [N]), checked."""
    expected = f"a dict with 'data' (uint8 [N, {3 * SIDE * SIDE}]) and {labels_key!r} ([N] class indices)"
    batch = load_pickle(path, expected)
    missing = [k for k in ("data", labels_key) if k not in batch]
    if missing:
        raise BadValue(f"{path}: no {' or '.join(map(repr, missing))} key (it has {sorted(batch)}); "
                       f"expected {expected}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[labels_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or len(labels) != len(data):
        raise BadValue(f"{path}: 'data' is {data.dtype} {list(data.shape)} with {len(labels)} labels; "
                       f"expected {expected}")
    return data, labels


@functools.lru_cache(maxsize=1)
def _cached_batch(path: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The last batch read, kept: a worker reads a file's units one after another."""
    return read_batch(Path(path), labels_key)


def png_bytes(row: np.ndarray) -> bytes:
    """A CIFAR row (3072 uint8, channel-major) -> PNG bytes of the 32x32 RGB image."""
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(row.reshape(3, SIDE, SIDE).transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class BatchRows:
    """A picklable reader of rows [start, stop) of one batch file, as Records (keys from ``first_key``)."""

    path: str
    labels_key: str
    start: int
    stop: int
    first_key: int
    classnames: tuple[str, ...]

    def __call__(self) -> list[Record]:
        data, labels = _cached_batch(self.path, self.labels_key)
        return [Record(f"{self.first_key + i - self.start:09d}", class_captions(self.classnames[labels[i]]),
                       label=int(labels[i]), data=png_bytes(data[i])) for i in range(self.start, self.stop)]


class CifarSource(UnitSplits):
    """CIFAR-10 / CIFAR-100 python batches (``DATASETS`` entry "cifar"); splits train and val (the test batch)."""

    name = "cifar"
    options: frozenset[str] = frozenset()

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        root = Path(spec)
        return split_file is None and root.is_dir() and find_layout(root) is not None

    def __init__(self, spec: str, *, shard_size: int = 1000) -> None:
        if shard_size < 1:
            raise BadValue(f"shard_size must be >= 1, got {shard_size}")
        found = find_layout(Path(spec))
        if found is None:
            raise MissingInput(f"{spec}: no CIFAR batches folder; expected {EXPECTED}")
        self.folder, self.layout = found
        meta = self.folder / self.layout.meta
        names = load_pickle(meta, f"the {self.layout.name} meta file, a dict with {self.layout.names_key!r}")
        if self.layout.names_key not in names:
            raise BadValue(f"{meta}: no {self.layout.names_key!r} key (it has {sorted(names)}); "
                           "expected the class names")
        self._classnames = tuple(folder_classname(str(n)) for n in names[self.layout.names_key])
        self._units = {split: self._split_units(split, files, shard_size)
                       for split, files in self.layout.splits.items()}

    def _split_units(self, split: str, files: tuple[str, ...], shard_size: int) -> list[Unit]:
        """Units of ``shard_size`` rows, never spanning two files (a unit reads one file)."""
        units, key = [], 0
        for file in files:
            path = self.folder / file
            _, labels = read_batch(path, self.layout.labels_key)
            bad = labels[(labels < 0) | (labels >= len(self._classnames))]
            if bad.size:
                raise BadValue(f"{path}: label {int(bad[0])} is outside the {len(self._classnames)} classes of "
                               f"{self.folder / self.layout.meta}")
            for start in range(0, len(labels), shard_size):
                stop = min(start + shard_size, len(labels))
                reader = BatchRows(str(path), self.layout.labels_key, start, stop, key, self._classnames)
                units.append(Unit(len(units), f"{split}[{key}:{key + stop - start}] ({file})", reader, stop - start))
                key += stop - start
        return units

    def classnames(self) -> list[str] | None:
        return list(self._classnames)

    def report(self) -> dict:
        return {"variant": self.layout.name, "folder": str(self.folder), "classes": len(self._classnames),
                "records": {s: sum(u.size or 0 for u in units) for s, units in self._units.items()}}
