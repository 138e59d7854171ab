"""Flickr30k and Flickr8k: an image folder with Karpathy's split file.

Layout::

    IMAGES/1000092795.jpg ...                  # --data IMAGES (the images, or a folder holding their folder)
    dataset_flickr30k.json                     # --split-file: images[*].filename, split, sentences[*].raw

``flickr30k-images/`` (Flickr30k) and ``Flicker8k_Dataset/`` (Flickr8k) are the folders the
downloads unpack to; an image is looked for as ``IMAGES/{filename}``, else by file name in
IMAGES' sub-directories, so their parent folder works as well. Splits: ``train`` (Karpathy's train,
and restval if a file has any), ``val`` and ``test`` (Flickr30k: 29000 / 1014 / 1000 images,
Flickr8k: 6000 / 1000 / 1000). Keys are the file names without extension (Flickr's photo ids).
The leakage guard is COCO's: a key in val or test is removed from train unless ``keep_leaky``.
Images the split file names but the disk lacks stop the run (count and first few) unless
``skip_missing``; images on disk that the split file does not name are not used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .karpathy import (
    ImageFinder,
    SplitEntry,
    is_coco_split_file,
    leakage_guard,
    not_found_message,
    read_split_file,
    records_by_split,
)
from .records import Record, RecordSplits, check_missing

log = logging.getLogger("kdpipe")

EXPECTED = "Karpathy's dataset_flickr30k.json or dataset_flickr8k.json"


def flickr_key(filename: str) -> str:
    """``1000092795.jpg`` -> ``1000092795`` (dots would split a cache sample's name in its tar)."""
    return Path(filename).stem.replace(".", "_")


class FlickrSource(RecordSplits):
    """Flickr30k / Flickr8k (``DATASETS`` entry "flickr"); see the module docstring for the layout."""

    name = "flickr"
    options = frozenset({"split_file", "keep_leaky", "skip_missing"})

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        # A split file without cocoids is Flickr's; a folder of tars is wds input (which refuses the file).
        root = Path(spec)
        if split_file is None or not root.is_dir() or any(root.glob("*.tar")):
            return False
        return not is_coco_split_file(split_file)

    def __init__(self, spec: str, *, shard_size: int = 1000, split_file: str | None = None,
                 keep_leaky: bool = False, skip_missing: bool = False) -> None:
        if split_file is None:
            raise ValueError("FlickrSource needs a split file")  # matches() never picks it without one
        self.root, self.split_file, self.shard_size = Path(spec), Path(split_file), shard_size
        entries = read_split_file(self.split_file, EXPECTED)
        finder = ImageFinder(self.root)
        splits, not_found = records_by_split(entries, lambda entry: self._record(entry, finder))
        check_missing(not_found_message(self.split_file, self.root, not_found, len(entries)), len(not_found),
                      len(entries), skip_missing)
        removed = leakage_guard(splits, keep_leaky)
        self._records = {name: recs for name, recs in splits.items() if recs}
        self._report = {"split_file": str(self.split_file), "leakage_removed": removed, "keep_leaky": keep_leaky,
                        "not_found": len(not_found), "records": {s: len(r) for s, r in self._records.items()}}

    @staticmethod
    def _record(entry: SplitEntry, finder: ImageFinder) -> Record | None:
        path = finder.find(entry.filepath, entry.filename)
        return None if path is None else Record(flickr_key(entry.filename), entry.captions, path=path)

    def classnames(self) -> list[str] | None:
        return None

    def report(self) -> dict:
        return dict(self._report)
