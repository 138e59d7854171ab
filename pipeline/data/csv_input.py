"""A CSV or TSV file of image paths and captions, as open_clip's training script reads it.

One row per (image, caption), with a header naming the columns. The column names and the
separator are open_clip's options: ``--csv-img-key`` (default ``filepath``), ``--csv-caption-key``
(default ``title``), ``--csv-separator``. open_clip's separator default is a tab whatever the file
is called; here it is a tab for ``.tsv`` and a comma for ``.csv``, and a ``.csv`` whose header
holds both columns only when split at tabs (as open_clip writes and reads them) is read as
tab-separated. Two differences from open_clip, both on purpose: rows naming the same image
become the captions of one image (grouped by the image's resolved path, images and captions
in first-seen order), and a relative path is resolved against the CSV's folder, not the
working directory.

A single CSV is the ``train`` split (``open_source``'s ``val_data`` / ``val_fraction`` add a
``val``). Keys are the images' first-seen order, zero-padded (``000000000``, ``000000001``, ...).
Images the file names but the disk lacks stop the run before any teacher work (count and
first few) unless ``skip_missing``.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from ..errors import BadValue, MissingInput, UnknownName
from .records import Record, Unit, check_missing, chunk_units, describe_missing

log = logging.getLogger("kdpipe")

CSV_SUFFIXES = (".csv", ".tsv")
IMG_KEY, CAPTION_KEY = "filepath", "title"  # open_clip's defaults
SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ","}  # spellings a shell passes easily


def separator_for(path: Path, given: str | None) -> str:
    """The separator asked for (``\\t`` and ``tab`` mean a tab), else tab for .tsv, comma otherwise."""
    if given is None:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    sep = SEPARATOR_NAMES.get(given, given)
    if len(sep) != 1:
        raise BadValue(f"--csv-separator {given!r}: expected one character (or \\t, tab, comma)")
    return sep


def header_fields(line: str, sep: str) -> list[str]:
    return next(csv.reader([line], delimiter=sep), [])


def pick_separator(path: Path, header: str, sep: str, keys: tuple[str, str]) -> str:
    """``sep``, unless the header holds ``keys`` only when split at tabs (open_clip's default)."""
    wanted = set(keys)
    if sep == "," and not wanted <= set(header_fields(header, ",")) and wanted <= set(header_fields(header, "\t")):
        log.info("%s: columns are tab-separated (open_clip's default): reading it with --csv-separator '\\t'", path)
        return "\t"
    return sep


Row = tuple[int, str, str]  # (line number, image cell, caption cell)


def read_rows(path: Path, img_key: str, caption_key: str, separator: str | None) -> tuple[list[Row], str]:
    """(line number, image cell, caption cell) of every row, and the separator used (``separator``,
    else the file's default, see ``pick_separator``); refuses missing columns and bad rows."""
    sep = separator_for(path, separator)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            if separator is None:
                sep = pick_separator(path, f.readline(), sep, (img_key, caption_key))
                f.seek(0)
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, None) or []
            keys = {"--csv-img-key": img_key, "--csv-caption-key": caption_key}
            columns = _column_indices(path, header, keys, sep)
            rows = [_row(path, reader.line_num, row, header, columns, img_key, sep) for row in reader if row]
    except UnicodeDecodeError as err:
        raise BadValue(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise BadValue(f"{path}: not readable as CSV ({err})") from err
    if not rows:
        raise BadValue(f"{path}: no rows under its header; expected one row per (image, caption)")
    return rows, sep


def _row(path: Path, line: int, row: list[str], header: list[str], columns: tuple[int, int], img_key: str,
         sep: str) -> Row:
    if len(row) != len(header):
        raise BadValue(f"{path}:{line}: {len(row)} fields, the header has {len(header)} "
                       f"(separator {sep!r}; --csv-separator sets it)")
    image, caption = row[columns[0]].strip(), row[columns[1]]
    if not image:
        raise BadValue(f"{path}:{line}: empty {img_key!r}; expected an image path")
    return line, image, caption


def _column_indices(path: Path, header: list[str], keys: dict[str, str], sep: str) -> tuple[int, int]:
    """Positions of the image and caption columns; a missing one names the file, column and columns."""
    for flag, key in keys.items():
        if key not in header:
            have = ", ".join(map(repr, header)) or "none"
            raise BadValue(f"{path}: no column {key!r} ({flag}); its columns: {have} "
                           f"(separator {sep!r}; --csv-separator sets it)")
    img_key, caption_key = keys.values()
    return header.index(img_key), header.index(caption_key)


def group_by_image(rows: list[Row], folder: Path) -> dict[str, tuple[str, list[str]]]:
    """Resolved image path -> (its first cell and line, for messages; its captions in row order),
    in first-seen order. Relative paths resolve against ``folder``."""
    images: dict[str, tuple[str, list[str]]] = {}
    for line, image, caption in rows:
        path = os.path.normpath(folder / image)
        images.setdefault(path, (f"{image} (line {line})", []))[1].append(caption)
    return images


class CsvSource:
    """A CSV/TSV of image paths and captions (``DATASETS`` entry "csv"); a single split ``train``."""

    name = "csv"
    options = frozenset({"csv_img_key", "csv_caption_key", "csv_separator", "skip_missing"})

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        # a local file: pipe: URLs, brace patterns and ::-joined lists are tar specs
        remote_or_many = spec.startswith("pipe:") or "{" in spec or "::" in spec
        return spec.lower().endswith(CSV_SUFFIXES) and not remote_or_many and not Path(spec).is_dir()

    def __init__(self, spec: str, *, shard_size: int = 1000, csv_img_key: str = IMG_KEY,
                 csv_caption_key: str = CAPTION_KEY, csv_separator: str | None = None,
                 skip_missing: bool = False) -> None:
        self.path = Path(spec)
        if not self.path.is_file():
            raise MissingInput(f"{spec}: no such CSV file; expected a .csv/.tsv with a header naming the "
                               f"image column ({csv_img_key!r}) and the caption column ({csv_caption_key!r})")
        rows, sep = read_rows(self.path, csv_img_key, csv_caption_key, csv_separator)
        images = group_by_image(rows, self.path.parent)
        missing = [path for path in images if not os.path.isfile(path)]
        message = describe_missing(f"{self.path} names", [images[p][0] for p in missing], len(images))
        check_missing(message, len(missing), len(images), skip_missing)
        absent = set(missing)
        # keys before dropping missing images, so an image's key never depends on another's absence
        records = [Record(f"{i:09d}", tuple(captions), path=path)
                   for i, (path, (_, captions)) in enumerate(images.items()) if path not in absent]
        self._units = chunk_units(records, shard_size, "train")
        self._report = {"rows": len(rows), "images": len(images), "not_found": len(missing), "separator": sep,
                        "columns": {"image": csv_img_key, "caption": csv_caption_key}}

    def splits(self) -> list[str]:
        return ["train"]

    def units(self, split: str) -> list[Unit]:
        if split != "train":
            raise UnknownName(f"unknown split {split!r}; valid: train (a CSV is one split; --val-data or "
                              "--val-fraction adds val)")
        return list(self._units)

    def classnames(self) -> list[str] | None:
        return None

    def report(self) -> dict:
        return dict(self._report)
