"""What labelled inputs share: class names from a class-names file, and captions made from a class name.

A labelled set (an image folder, CIFAR) has one class per image and no captions. Every image gets
the captions ``class_captions`` builds from its class name with ``CAPTION_TEMPLATES``, so the
cache keeps its usual caption embeddings (fit-whitening, the text side of the losses) next to the
label. The teacher's logits over the class prompts are not stored: they are the stored image
embedding times the prompt-ensemble classifier of prompts.h5 (see ``kdpipe.train``'s ``--labels``).

Class-names files (``read_classnames``) are shared with ``kdpipe.zeroshot``'s ``folder:`` datasets.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadValue, MissingInput

CLASSNAMES_FILE = "classnames.txt"  # next to a folder's class folders: their class names
CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.")  # one caption per template


def class_captions(classname: str) -> tuple[str, ...]:
    """"cat" -> ("a photo of a cat.", "a picture of a cat."): the captions of an image of that class."""
    return tuple(t.format(classname) for t in CAPTION_TEMPLATES)


def folder_classname(folder: str) -> str:
    """A class folder's name as a class name: underscores read as spaces ("aquarium_fish" -> "aquarium fish")."""
    return folder.replace("_", " ")


def read_classnames(path: Path, folders: list[str]) -> list[str]:
    """A class-names file -> one name per folder, in ``folders``' order.

    Two forms: one name per line in the folders' sorted order (``folders`` is sorted), or
    ``folder<TAB>name`` lines in any order (lines for folders that are not there are ignored, so
    one file serves every subset). Blank lines are skipped; names are kept as written.
    """
    if not path.is_file():
        raise MissingInput(f"class-names file {path} does not exist (one name per line, or folder<TAB>name lines)")
    lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    tabbed = [n for n, line in lines if "\t" in line]
    if not tabbed:
        return _names_in_order(path, [line.strip() for _, line in lines], folders)
    plain = [n for n, line in lines if "\t" not in line]
    if plain:
        raise BadValue(f"{path} line {plain[0]}: no tab, but line {tabbed[0]} is folder<TAB>name; "
                       "write every line in one form (a name per line, or folder<TAB>name)")
    return _names_by_folder(path, lines, folders)


def _names_in_order(path: Path, names: list[str], folders: list[str]) -> list[str]:
    if len(names) != len(folders):
        shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise BadValue(f"{path} has {len(names)} class names for {len(folders)} class folders: expected one name "
                       f"per line in the folders' sorted order ({shown}), or folder<TAB>name lines")
    return names


def _names_by_folder(path: Path, lines: list[tuple[int, str]], folders: list[str]) -> list[str]:
    found: dict[str, tuple[int, str]] = {}
    for n, line in lines:
        folder, _, name = (part.strip() for part in line.partition("\t"))
        if not folder or not name:
            raise BadValue(f"{path} line {n}: expected folder<TAB>name, got {line!r}")
        if folder in found:
            raise BadValue(f"{path} line {n}: folder {folder!r} is already named on line {found[folder][0]}")
        found[folder] = (n, name)
    missing = [f for f in folders if f not in found]
    if missing:
        raise BadValue(f"{path} names no class for folder {missing[0]!r}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [found[f][1] for f in folders]


def refuse_empty_classes(root: Path, classes: list[str], counts: dict[str, int], extensions: tuple[str, ...]) -> None:
    """A class folder without an image file is an error naming it (and how many more there are)."""
    empty = [c for c in classes if not counts.get(c)]
    if empty:
        more = f" (and {len(empty) - 1} more empty class folders)" if len(empty) > 1 else ""
        raise MissingInput(f"class folder {root / empty[0]} holds no image files ({', '.join(extensions)}){more}")
