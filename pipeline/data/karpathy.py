"""Karpathy's split files, shared by the COCO and Flickr kinds.

``dataset_coco.json``, ``dataset_flickr30k.json`` and ``dataset_flickr8k.json`` hold
``{"images": [{"filename", "split", "sentences": [{"raw"}, ...], ...}], "dataset": NAME}``.
COCO's entries also carry ``cocoid`` and ``filepath`` (``train2014``/``val2014``); Flickr's have
neither (their images sit in one folder). ``split`` is train, restval, val or test: restval joins
train, as is usual (COCO's "113k" train is Karpathy train + restval; the Flickr files have no
restval). Leakage guard: an image id in val or test is removed from train unless the user keeps it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BadValue, MissingInput
from .records import Record, describe_missing

log = logging.getLogger("kdpipe")

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
HELD_OUT = ("val", "test")
ENTRY_FIELDS = "filename, split, sentences[*].raw"
HEAD_BYTES = 1 << 20  # COCO's file is ~140 MB; its first entry (with a cocoid) is in the first KBs


@dataclass(frozen=True)
class SplitEntry:
    """One image of a split file."""

    split: str  # train (Karpathy train + restval), val or test
    filepath: str  # folder under ROOT ("" in Flickr's files)
    filename: str
    captions: tuple[str, ...]
    cocoid: int | None  # COCO's image id; None in Flickr's files


def is_coco_split_file(split_file: str) -> bool:
    """Whether a split file is COCO's: its entries carry ``cocoid``, Flickr's never do.

    Reads the file's head only (every COCO entry has a cocoid). A file that cannot be read counts
    as COCO's: the COCO kind reports it as missing, as it always has.
    """
    try:
        with open(split_file, "rb") as f:
            return b'"cocoid"' in f.read(HEAD_BYTES)
    except OSError:
        return True


def read_split_file(split_file: Path, expected: str) -> list[SplitEntry]:
    """Every entry of a split file; ``expected`` names the file the user should pass (in messages)."""
    if not split_file.is_file():
        raise MissingInput(f"split file {split_file} not found; expected {expected}")
    try:
        data = json.loads(split_file.read_text())
    except ValueError as err:
        raise BadValue(f"{split_file}: not JSON ({err}); expected {expected}") from err
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise BadValue(f'{split_file}: no "images" list; expected {expected}')
    return [_entry(img, split_file, i) for i, img in enumerate(images)]


def _entry(img: Any, split_file: Path, index: int) -> SplitEntry:
    where = f"{split_file}: images[{index}]"
    if not isinstance(img, dict) or not all(k in img for k in ("filename", "split", "sentences")):
        raise BadValue(f"{where} lacks one of {ENTRY_FIELDS}; expected Karpathy's fields ({ENTRY_FIELDS})")
    split = KARPATHY_SPLITS.get(img["split"])
    if split is None:
        raise BadValue(f"{where}: unknown split {img['split']!r}; expected {sorted(KARPATHY_SPLITS)}")
    try:
        captions = tuple(s["raw"] for s in img["sentences"])
    except (KeyError, TypeError) as err:
        raise BadValue(f'{where}: a sentence without "raw"; expected {ENTRY_FIELDS}') from err
    cocoid = int(img["cocoid"]) if "cocoid" in img else None
    return SplitEntry(split, img.get("filepath", ""), img["filename"], captions, cocoid)


class ImageFinder:
    """Finds an image under ROOT by relative path, else by file name (or another name) in sub-directories."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, str] | None = None

    def find(self, filepath: str, filename: str, *other_names: str) -> str | None:
        direct = self.root / filepath / filename
        if direct.is_file():
            return str(direct)
        index = self._index()
        return next((index[n] for n in (filename, *other_names) if n in index), None)

    def _index(self) -> dict[str, str]:
        # Built once, only when a direct lookup fails (e.g. 2014 names against 2017 folders).
        if self._by_name is None:
            self._by_name = {}
            for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name != "annotations"):
                with os.scandir(sub) as entries:
                    for entry in entries:
                        self._by_name.setdefault(entry.name, entry.path)
        return self._by_name


def records_by_split(
    entries: list[SplitEntry], to_record: Callable[[SplitEntry], Record | None]
) -> tuple[dict[str, list[Record]], list[SplitEntry]]:
    """Records per split (sorted by key; a repeated key keeps its last entry) and the entries
    whose image ``to_record`` did not find (it returns None for them)."""
    splits: dict[str, dict[str, Record]] = {"train": {}, "val": {}, "test": {}}
    not_found = []
    for entry in entries:
        record = to_record(entry)
        if record is None:
            not_found.append(entry)
        else:
            splits[entry.split][record.key] = record
    return {name: sorted(recs.values(), key=lambda r: r.key) for name, recs in splits.items()}, not_found


def not_found_message(split_file: Path, root: Path, not_found: list[SplitEntry], total: int) -> str:
    """'FILE names N of M images not found under ROOT (first: ...)'."""
    names = [str(Path(e.filepath) / e.filename) for e in not_found]
    return describe_missing(f"{split_file} names", names, total, f"under {root}")


def remove_leaks(splits: dict[str, list[Record]]) -> tuple[list[Record], int]:
    """``train`` without any image key that is also in ``val`` or ``test``; returns the count removed."""
    held_out = {r.key for name in HELD_OUT for r in splits.get(name, [])}
    kept = [r for r in splits["train"] if r.key not in held_out]
    return kept, len(splits["train"]) - len(kept)


def leakage_guard(splits: dict[str, list[Record]], keep_leaky: bool) -> int:
    """Remove val/test images from ``splits["train"]`` in place unless ``keep_leaky``; the count
    removed (logged either way)."""
    removed = 0
    if not keep_leaky:
        splits["train"], removed = remove_leaks(splits)
    log.info("leakage guard: %s %d Karpathy val/test images from train", "kept" if keep_leaky else "removed", removed)
    return removed
