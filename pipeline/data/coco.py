"""COCO-style captioned image directories (real COCO and the shapes world).

Layout::

    ROOT/annotations/captions_{split}.json   # {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
    ROOT/annotations/labels_{split}.json     # optional: {"classnames": [...], "labels": {image_id: int}}
    ROOT/{split}/{file_name}

Split names are whatever caption files exist (``train2017``/``val2017``, or ``train``/``val``).
Keys are zero-padded image ids (``f"{id:012d}"``), so sorted keys are sorted ids.

With a Karpathy split file (``dataset_coco.json``) the splits become ``train`` (Karpathy
train + restval), ``val`` and ``test``, captions come from the split file's sentences and
images are looked up as ``ROOT/{filepath}/{filename}``, falling back to a search of ROOT's
sub-directories by file name or image id (COCO 2017 renamed ``COCO_val2014_000000391895.jpg``
to ``000000391895.jpg``). If the split file lists no train/restval images, ``train`` is the
annotation split whose name starts with "train". Leakage guard: the Karpathy 5k test images
come from val2014, most of which is inside train2017, so by default every val/test image id is
removed from ``train`` and the count is reported (``keep_leaky=True`` keeps them). Images the
split file names but the disk lacks are skipped with a warning (count and first few). Reading the
split file and the leakage guard are ``karpathy.py``'s, shared with the Flickr kind.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from ..errors import BadValue, MissingInput
from .karpathy import (
    ImageFinder,
    SplitEntry,
    is_coco_split_file,
    leakage_guard,
    not_found_message,
    read_split_file,
    records_by_split,
)
from .records import Record, RecordSplits, caption_splits

log = logging.getLogger("kdpipe")


def image_key(image_id: int) -> str:
    return f"{int(image_id):012d}"


def read_labels(root: Path) -> tuple[list[str] | None, dict[int, int]]:
    """Class names and image id -> label from every ``labels_*.json`` (they must agree)."""
    classnames: list[str] | None = None
    labels: dict[int, int] = {}
    for file in sorted((root / "annotations").glob("labels_*.json")):
        data = json.loads(file.read_text())
        if classnames is not None and data["classnames"] != classnames:
            raise BadValue(f"{file}: class names differ from the other labels_*.json files")
        classnames = list(data["classnames"])
        labels.update({int(k): int(v) for k, v in data["labels"].items()})
    return classnames, labels


def read_caption_split(root: Path, split: str, labels: dict[int, int]) -> list[Record]:
    """Records of one COCO caption file, sorted by key; captions in annotation order."""
    data = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[int(ann["image_id"])].append(ann["caption"])
    records = [
        Record(
            key=image_key(img["id"]),
            captions=tuple(captions.get(int(img["id"]), ())),
            label=labels.get(int(img["id"])),
            path=str(root / split / img["file_name"]),
        )
        for img in data["images"]
    ]
    return sorted(records, key=lambda r: r.key)


def karpathy_record(entry: SplitEntry, finder: ImageFinder, labels: dict[int, int]) -> Record | None:
    """A COCO split-file entry as a Record keyed by its cocoid; None when its image is not found.

    COCO 2017 renamed ``COCO_val2014_000000391895.jpg`` to ``000000391895.jpg``: the id's name is
    looked for too.
    """
    cocoid = entry.cocoid
    assert cocoid is not None, "CocoSource refuses split-file entries without a cocoid"
    key = image_key(cocoid)
    path = finder.find(entry.filepath, entry.filename, f"{key}{Path(entry.filename).suffix}")
    return None if path is None else Record(key, entry.captions, labels.get(cocoid), path)


class CocoSource(RecordSplits):
    """A COCO-style directory (``DATASETS`` entry "coco"); see the module docstring for the layout."""

    name = "coco"
    options = frozenset({"split_file", "keep_leaky"})

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        # With a split file the annotations are optional: captions come from the split file.
        # Flickr's split files are the Flickr kind's.
        root = Path(spec)
        if not root.is_dir() or (split_file is not None and not is_coco_split_file(split_file)):
            return False
        has_tars = any(root.glob("*.tar"))  # a directory of tars is wds input
        return bool(caption_splits(root)) or (split_file is not None and not has_tars)

    def __init__(self, spec: str, *, shard_size: int = 1000, split_file: str | None = None, keep_leaky: bool = False):
        self.root = Path(spec)
        self.shard_size = shard_size
        self._classnames, labels = read_labels(self.root)
        self._report: dict = {}
        if split_file is None:
            self._records = {s: read_caption_split(self.root, s, labels) for s in caption_splits(self.root)}
        else:
            self._records = self._karpathy(Path(split_file), labels, keep_leaky)
        self._report["records"] = {s: len(r) for s, r in self._records.items()}

    def _karpathy(self, split_file: Path, labels: dict[int, int], keep_leaky: bool) -> dict[str, list[Record]]:
        entries = read_split_file(split_file, "Karpathy's dataset_coco.json (or, with a Flickr image folder, "
                                              "dataset_flickr30k.json / dataset_flickr8k.json)")
        no_id = [e.filename for e in entries if e.cocoid is None]
        if no_id:
            raise BadValue(f"{split_file}: {len(no_id)} entries without a cocoid (first: {no_id[0]}); "
                           "COCO's split file gives every image its cocoid")
        finder = ImageFinder(self.root)
        splits, not_found = records_by_split(entries, lambda entry: karpathy_record(entry, finder, labels))
        if not any(splits.values()):
            raise MissingInput(f"none of the images in {split_file} were found under {self.root}")
        if not_found:  # COCO skips them: a split file may well name more of COCO than is on disk
            log.warning("%s (skipped)", not_found_message(split_file, self.root, not_found, len(entries)))
        if not splits["train"]:
            splits["train"] = self._annotation_train(labels)
        removed = leakage_guard(splits, keep_leaky)
        self._report.update(split_file=str(split_file), leakage_removed=removed, keep_leaky=keep_leaky,
                            not_found=len(not_found))
        return {name: recs for name, recs in splits.items() if recs}

    def _annotation_train(self, labels: dict[int, int]) -> list[Record]:
        candidates = [s for s in caption_splits(self.root) if s.startswith("train")]
        if not candidates:
            return []
        log.info("split file lists no train images: using annotation split %s as train", candidates[0])
        return read_caption_split(self.root, candidates[0], labels)

    def classnames(self) -> list[str] | None:
        return self._classnames

    def report(self) -> dict:
        return dict(self._report)
