"""img2dataset-style WebDataset tars as input.

Each sample is ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``) + ``KEY.txt`` (caption) + an
optional ``KEY.json`` with more captions (a ``"captions"`` list and/or a ``"caption"`` string;
duplicates of the ``.txt`` caption are dropped) + an optional ``KEY.cls`` (integer label).
The spec is a local ``.tar``, a directory of ``*.tar``, a brace pattern
(``shards/{00000..00009}.tar``), a ``pipe:`` URL (``pipe:curl -s https://.../{0..9}.tar``) or
several of these joined by ``::``. One input tar is one unit (``shard_size`` does not apply).

Tar input has a single split, ``train``: to extract a held-out split from tars, open it as a
separate source. Image bytes are kept encoded in ``Record.data``; nothing is decoded here
(and never a pickle). Read errors are counted and logged per tar rather than handled with
webdataset's ``warn_and_continue``, which sleeps half a second per bad sample.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..errors import BadValue, MissingInput, UnknownName
from .records import EXPECTED_LAYOUTS, ErrorCounter, Record, Unit, caption_splits

log = logging.getLogger("kdpipe")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def sample_captions(sample: dict[str, Any], errors: ErrorCounter) -> tuple[str, ...]:
    """The ``.txt`` caption, then ``.json`` "captions"/"caption", in order, without repeats."""
    captions: list[str] = []
    if "txt" in sample:
        captions.append(sample["txt"].decode("utf-8", errors="replace").strip())
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as err:
            errors(err)
            meta = {}
        if isinstance(meta, dict):
            extra = meta.get("captions") or []
            captions += [c for c in ([*extra] if isinstance(extra, list) else [extra]) if isinstance(c, str)]
            if isinstance(meta.get("caption"), str):
                captions.append(meta["caption"])
    return tuple(dict.fromkeys(c.strip() for c in captions))


def sample_to_record(sample: dict[str, Any], errors: ErrorCounter) -> Record:
    """A grouped tar sample as a Record; a sample without an image gets ``data=None``."""
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode().strip())
        except ValueError as err:
            errors(err)
    return Record(key=sample["__key__"], captions=sample_captions(sample, errors), label=label, data=data)


class TarReader:
    """Picklable reader of one tar (local path or ``pipe:`` URL); ``errors`` counts read errors."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.errors = 0

    def __call__(self) -> Iterator[Record]:
        counter = ErrorCounter(f"sample of {self.url}")  # logged once per tar, below
        try:
            with gopen(self.url, "rb") as stream:
                files = tar_file_expander([{"url": self.url, "stream": stream}], handler=counter)
                for sample in group_by_keys(files, handler=counter):
                    yield sample_to_record(sample, counter)
        except OSError as err:  # e.g. a pipe: command that exits non-zero
            raise RuntimeError(f"reading {self.url} failed: {err}") from err
        finally:
            self.errors += counter.total()
            if counter.total():
                log.warning("%s: %d read errors %s, first: %s", self.url, counter.total(), dict(counter.counts), counter.first)


def expand_spec(spec: str) -> list[str]:
    """Tar URLs named by ``spec``: ``::``-separated parts, each brace-expanded (or a directory)."""
    urls: list[str] = []
    for part in spec.split("::"):
        if Path(part).is_dir():
            urls += sorted(str(p) for p in Path(part).iterdir() if p.name.endswith(TAR_SUFFIXES))
        else:
            urls += list(braceexpand(part))
    local_missing = [u for u in urls if not u.startswith("pipe:") and not Path(u).is_file()]
    if local_missing:
        raise MissingInput(
            f"{spec}: {len(local_missing)} of {len(urls)} tars not found (first: {local_missing[0]}); "
            "pass existing .tar files, a brace pattern over existing files, or a pipe: URL"
        )
    if not urls:
        raise BadValue(f"{spec}: names no tar files; {EXPECTED_LAYOUTS}")
    return urls


class WdsSource:
    """WebDataset tars (``DATASETS`` entry "wds"); a single split ``train``, one unit per tar."""

    name = "wds"
    options = frozenset({"split_file", "keep_leaky"})  # split_file only to refuse it with a tar-specific message

    @staticmethod
    def matches(spec: str, *, split_file: str | None = None) -> bool:
        if spec.startswith("pipe:") or "::" in spec or ("{" in spec and "}" in spec):
            return True
        path = Path(spec)
        if path.is_dir():
            return any(p.name.endswith(TAR_SUFFIXES) for p in path.iterdir()) and not caption_splits(path)
        return spec.endswith(TAR_SUFFIXES)

    def __init__(self, spec: str, *, shard_size: int = 1000, split_file: str | None = None, keep_leaky: bool = False):
        if split_file is not None:
            raise BadValue(f"{spec}: a split file applies to COCO-style directories, not to tar input")
        self.spec = spec
        self.urls = expand_spec(spec)
        self._units = [Unit(i, url, TarReader(url)) for i, url in enumerate(self.urls)]

    def splits(self) -> list[str]:
        return ["train"]

    def units(self, split: str) -> list[Unit]:
        if split != "train":
            raise UnknownName(f"unknown split {split!r}; valid: train (tar input has one split)")
        return list(self._units)

    def classnames(self) -> list[str] | None:
        return None

    def report(self) -> dict:
        """Tar count and read errors seen so far in this process."""
        return {"tars": len(self.urls), "read_errors": sum(u.reader.errors for u in self._units)}
