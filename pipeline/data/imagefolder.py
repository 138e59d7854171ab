"""A labelled image folder (torchvision's ImageFolder layout): the class is the image's folder.

Layouts::

    ROOT/CLASS/IMAGE                 one split, train (--val-fraction adds a val)
    ROOT/train/CLASS/IMAGE           splits from the split folders: train, val (or validation) and test
    ROOT/val/CLASS/IMAGE
    ROOT/classnames.txt              optional: the classes' names (``labelled.read_classnames``'s two forms)

Image files are those torchvision's ImageFolder reads (``IMG_EXTENSIONS``). Classes are the
class folders of ``train`` (sorted, as ImageFolder numbers them); another split may lack a class
but not add one. Without a class-names file a class is named after its folder, underscores read
as spaces. Every image gets the captions ``labelled.class_captions`` builds from its class name.

A split's images are ordered by a hash of their path under the split folder (so a shard holds
every class, not one, and the order does not depend on the file system), then keyed by their
place in that order (``000000000``, ...). An empty class folder is an error naming it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from ..errors import BadValue
from .labelled import CLASSNAMES_FILE, class_captions, folder_classname, read_classnames, refuse_empty_classes
from .records import Record, RecordSplits, caption_splits

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}  # folder -> split name
LAYOUT = "ROOT/CLASS/IMAGE, or ROOT/train/CLASS/IMAGE with ROOT/val/CLASS/IMAGE"


def image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: PLC0415  (torchvision: only this kind pays)

    return tuple(IMG_EXTENSIONS)


def is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(image_extensions())


def class_folders(folder: Path) -> list[Path]:
    """The sorted sub-folders of ``folder`` (hidden ones left out, as ImageFolder does)."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def has_class_images(folder: Path) -> bool:
    """Whether some sub-folder of ``folder`` holds an image file (stops at the first one found)."""
    return any(is_image(f) for d in class_folders(folder) for f in d.iterdir())


def split_folders(root: Path) -> dict[str, Path]:
    """{split: folder} when ROOT holds a train/ split folder, else {"train": ROOT}."""
    if not (root / "train").is_dir():
        return {"train": root}
    found = {SPLIT_FOLDERS[p.name]: p for p in class_folders(root) if p.name in SPLIT_FOLDERS}
    return dict(sorted(found.items(), key=lambda item: list(SPLIT_FOLDERS.values()).index(item[0])))


def mixed_order(paths: list[Path], folder: Path) -> list[Path]:
    """``paths`` ordered by a hash of their path under ``folder``: every class in every shard, any file system."""
    return sorted(paths, key=lambda p: hashlib.sha1(p.relative_to(folder).as_posix().encode()).hexdigest())


def split_records(folder: Path, classes: list[str], names: list[str]) -> list[Record]:
    """Records of one split folder; its class folders must be among ``classes`` and hold images."""
    index = {c: i for i, c in enumerate(classes)}
    present = [d.name for d in class_folders(folder)]
    unknown = [c for c in present if c not in index]
    if unknown:
        raise BadValue(f"class folder {folder / unknown[0]} is not a class of the train split "
                       f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); expected the train split's "
                       "class folders only")
    images = [f for c in present for f in (folder / c).iterdir() if is_image(f)]
    refuse_empty_classes(folder, present, Counter(f.parent.name for f in images), image_extensions())
    return [Record(f"{i:09d}", class_captions(names[index[f.parent.name]]), label=index[f.parent.name], path=str(f))
            for i, f in enumerate(mixed_order(images, folder))]


class ImageFolderSource(RecordSplits):
    """A labelled image folder (``DATASETS`` entry "imagefolder"); see the module docstring for the layout."""

    name = "imagefolder"
    options: frozenset[str] = frozenset()

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        # A COCO root has caption files and a Flickr folder a split file; both may hold image folders too.
        root = Path(spec)
        if split_file is not None or not root.is_dir() or caption_splits(root) or any(root.glob("*.tar")):
            return False
        return has_class_images(root / "train" if (root / "train").is_dir() else root)

    def __init__(self, spec: str, *, shard_size: int = 1000) -> None:
        self.root, self.shard_size = Path(spec), shard_size
        folders = split_folders(self.root)
        self.classes = [d.name for d in class_folders(folders["train"])]
        names_file = self.root / CLASSNAMES_FILE
        has_names = names_file.is_file()
        self._classnames = (read_classnames(names_file, self.classes) if has_names
                            else [folder_classname(c) for c in self.classes])
        self._records = {split: split_records(folder, self.classes, self._classnames)
                         for split, folder in folders.items()}
        self._report = {"classes": len(self.classes), "class_names": str(names_file) if has_names else "folder names",
                        "records": {s: len(r) for s, r in self._records.items()}}

    def classnames(self) -> list[str] | None:
        return list(self._classnames)

    def report(self) -> dict:
        return dict(self._report)
