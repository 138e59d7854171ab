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
removed from ``train`` and the count is reported (``keep_leaky=True`` keeps them).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

from ..errors import BadValue, MissingInput, UnknownName
from .records import Record, Unit, caption_splits, chunk_units

log = logging.getLogger("kdpipe")

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


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


class ImageFinder:
    """Finds an image under ROOT by relative path, else by file name or id in sub-directories."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, str] | None = None

    def find(self, filepath: str, filename: str, image_id: int) -> str | None:
        direct = self.root / filepath / filename
        if direct.is_file():
            return str(direct)
        index = self._index()
        return index.get(filename) or index.get(f"{image_key(image_id)}{Path(filename).suffix}")

    def _index(self) -> dict[str, str]:
        # Built once, only when a direct lookup fails (e.g. 2014 names against 2017 folders).
        if self._by_name is None:
            self._by_name = {}
            for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name != "annotations"):
                with os.scandir(sub) as entries:
                    for entry in entries:
                        self._by_name.setdefault(entry.name, entry.path)
        return self._by_name


def read_karpathy(split_file: Path, root: Path, labels: dict[int, int]) -> tuple[dict[str, list[Record]], int]:
    """Records per Karpathy split (train = train + restval) and how many images were not found."""
    data = json.loads(split_file.read_text())
    finder = ImageFinder(root)
    splits: dict[str, dict[str, Record]] = {"train": {}, "val": {}, "test": {}}
    not_found = 0
    for img in data["images"]:
        split = KARPATHY_SPLITS.get(img["split"])
        if split is None:
            raise BadValue(f"{split_file}: unknown split {img['split']!r}; expected {sorted(KARPATHY_SPLITS)}")
        path = finder.find(img.get("filepath", ""), img["filename"], img["cocoid"])
        if path is None:
            not_found += 1
            continue
        key = image_key(img["cocoid"])
        captions = tuple(s["raw"] for s in img["sentences"])
        splits[split][key] = Record(key, captions, labels.get(int(img["cocoid"])), path)
    return {name: sorted(recs.values(), key=lambda r: r.key) for name, recs in splits.items()}, not_found


def remove_leaks(splits: dict[str, list[Record]]) -> tuple[list[Record], int]:
    """``train`` without any image id that is also in ``val`` or ``test``; returns the count removed."""
    held_out = {r.key for name in ("val", "test") for r in splits.get(name, [])}
    kept = [r for r in splits["train"] if r.key not in held_out]
    return kept, len(splits["train"]) - len(kept)


class CocoSource:
    """A COCO-style directory (``DATASETS`` entry "coco"); see the module docstring for the layout."""

    name = "coco"
    options = frozenset({"split_file", "keep_leaky"})

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        # With a split file the annotations are optional: captions come from the split file.
        root = Path(spec)
        if not root.is_dir():
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
        if not split_file.is_file():
            raise MissingInput(f"split file {split_file} not found; expected Karpathy's dataset_coco.json")
        splits, not_found = read_karpathy(split_file, self.root, labels)
        if not_found:
            log.warning("split file: %d images not found under %s (skipped)", not_found, self.root)
        if not any(splits.values()):
            raise MissingInput(f"none of the images in {split_file} were found under {self.root}")
        if not splits["train"]:
            splits["train"] = self._annotation_train(labels)
        removed = 0
        if not keep_leaky:
            splits["train"], removed = remove_leaks(splits)
        log.info("leakage guard: %s %d Karpathy val/test images from train", "kept" if keep_leaky else "removed", removed)
        self._report.update(split_file=str(split_file), leakage_removed=removed, keep_leaky=keep_leaky, not_found=not_found)
        return {name: recs for name, recs in splits.items() if recs}

    def _annotation_train(self, labels: dict[int, int]) -> list[Record]:
        candidates = [s for s in caption_splits(self.root) if s.startswith("train")]
        if not candidates:
            return []
        log.info("split file lists no train images: using annotation split %s as train", candidates[0])
        return read_caption_split(self.root, candidates[0], labels)

    def splits(self) -> list[str]:
        return list(self._records)

    def records(self, split: str) -> list[Record]:
        if split not in self._records:
            raise UnknownName(f"unknown split {split!r}; valid: {', '.join(self._records)}")
        return self._records[split]

    def units(self, split: str) -> list[Unit]:
        return chunk_units(self.records(split), self.shard_size, split)

    def classnames(self) -> list[str] | None:
        return self._classnames

    def report(self) -> dict:
        return dict(self._report)
