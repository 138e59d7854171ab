"""Which source reads a spec: the ``DATASETS`` registry of source kinds and ``open_source``.

The kinds (``coco.CocoSource``, ``csv_input.CsvSource``, ``flickr.FlickrSource``,
``wds_input.WdsSource``, ``parquet_input.ParquetSource``, ``hf_disk.HfDiskSource``, and the labelled
``imagefolder.ImageFolderSource`` and ``cifar.CifarSource``) know nothing
of this registry; they are registered here, so the import arrows point one way (sources -> kinds
-> records). A kind's ``options`` names the keyword arguments of ``open_source`` it reads besides
``shard_size``; it is passed exactly those, and an option the user set that the input's kind does
not read is refused. ``open_source`` also adds a held-out ``val`` split to an input that has only
``train`` (``heldout``), whatever its kind.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import BadValue, MissingInput
from ..registry import Registry
from .cifar import CifarSource
from .coco import CocoSource
from .csv_input import CAPTION_KEY, IMG_KEY, CsvSource
from .flickr import FlickrSource
from .heldout import HashSplit, WithVal, check_fraction
from .hf_disk import HfDiskSource
from .imagefolder import ImageFolderSource
from .parquet_input import ParquetSource
from .records import EXPECTED_LAYOUTS, Source, SourceKind
from .wds_input import WdsSource

log = logging.getLogger("kdpipe")

DATASETS: Registry[SourceKind] = Registry("dataset kind")
DATASETS.register("coco")(CocoSource)
DATASETS.register("csv")(CsvSource)
DATASETS.register("flickr")(FlickrSource)
DATASETS.register("wds")(WdsSource)
DATASETS.register("parquet")(ParquetSource)
DATASETS.register("hf")(HfDiskSource)
DATASETS.register("imagefolder")(ImageFolderSource)
DATASETS.register("cifar")(CifarSource)

# The input options a kind may take (its ``options``), with their defaults: one set to anything
# else must be read by the input's kind (or by --val-data's), else it is refused.
OPTION_DEFAULTS: dict[str, Any] = {"split_file": None, "keep_leaky": False, "skip_missing": False,
                                   "csv_img_key": IMG_KEY, "csv_caption_key": CAPTION_KEY, "csv_separator": None,
                                   "image_column": None, "caption_column": None, "label_column": None}
TRAIN_ONLY_OPTIONS = frozenset({"split_file", "keep_leaky"})  # they shape the training input's splits only


def open_source(
    spec: str, *, shard_size: int = 1000, split_file: str | None = None, keep_leaky: bool = False,
    skip_missing: bool = False, csv_img_key: str = IMG_KEY, csv_caption_key: str = CAPTION_KEY,
    csv_separator: str | None = None, val_data: str | None = None, val_fraction: float | None = None,
    image_column: str | None = None, caption_column: str | None = None, label_column: str | None = None,
) -> Source:
    """Open the input named by ``spec``; the kind is chosen from its layout.

    ``val_data`` (another input, read as its kind's ``train``) or ``val_fraction`` (a hash of each
    sample's key) adds a ``val`` split to an input that has only ``train``. Raises
    ``FileNotFoundError`` for a path that does not exist and ``ValueError`` for a layout no
    registered kind recognises, both saying which layouts are expected, or for an option that
    does not apply to the input.
    """
    spec = str(spec)
    options = dict(split_file=split_file, keep_leaky=keep_leaky, skip_missing=skip_missing,
                   csv_img_key=csv_img_key, csv_caption_key=csv_caption_key, csv_separator=csv_separator,
                   image_column=image_column, caption_column=caption_column, label_column=label_column)
    if val_data is not None and val_fraction is not None:
        raise BadValue("--val-data and --val-fraction both define the val split; pass one of them")
    if val_fraction is not None:
        check_fraction(val_fraction)
    kind = pick_kind(spec, split_file)
    val_kind = None if val_data is None else pick_kind(str(val_data), None)
    refuse_unused(spec, options, kind, val_kind)
    source = kind(spec, shard_size=shard_size, **taken(kind, options))
    if val_data is None and val_fraction is None:
        return source
    require_train_only(spec, source, "--val-data" if val_data is not None else "--val-fraction")
    if val_fraction is not None:
        return HashSplit(source, val_fraction)
    assert val_kind is not None and val_data is not None
    val_options = {k: v for k, v in options.items() if k not in TRAIN_ONLY_OPTIONS}
    val = val_kind(str(val_data), shard_size=shard_size, **taken(val_kind, val_options))
    require_train_only(str(val_data), val, "--val-data")
    return WithVal(source, val, str(val_data))


def pick_kind(spec: str, split_file: str | None) -> SourceKind:
    """The one registered kind whose layout test accepts ``spec``."""
    matching = [name for name in DATASETS.names() if DATASETS.get(name).matches(spec, split_file=split_file)]
    if not matching:
        _raise_unrecognised(spec)
    if len(matching) > 1:  # the kinds' tests are disjoint; this guards future entries
        raise ValueError(f"{spec}: ambiguous input, matches {', '.join(matching)}")
    log.debug("data %s: %s input", spec, matching[0])
    return DATASETS.get(matching[0])


def taken(kind: SourceKind, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``kind`` reads."""
    return {name: value for name, value in options.items() if name in kind.options}


def refuse_unused(spec: str, options: dict[str, Any], kind: SourceKind, val_kind: SourceKind | None) -> None:
    """Refuse an option the user set that neither the input's kind nor --val-data's reads."""
    used = set(kind.options) | (set(val_kind.options) - TRAIN_ONLY_OPTIONS if val_kind is not None else set())
    for name, value in options.items():
        if value != OPTION_DEFAULTS[name] and name not in used:
            readers = [k for k in DATASETS.names() if name in DATASETS.get(k).options]
            flag = "--" + name.replace("_", "-")
            raise BadValue(f"{spec}: {flag} does not apply to {kind.name} input; it applies to "
                           f"{', '.join(readers)} input")


def require_train_only(spec: str, source: Source, flag: str) -> None:
    if source.splits() != ["train"]:
        raise BadValue(f"{spec}: {flag} adds a val split to input that has only train (CSV, tars); "
                       f"this {source.name} input has the splits {', '.join(source.splits())}")


def _raise_unrecognised(spec: str) -> None:
    if not Path(spec).exists():
        raise MissingInput(f"{spec}: no such file or directory; {EXPECTED_LAYOUTS}")
    raise BadValue(f"{spec}: unrecognised input layout; {EXPECTED_LAYOUTS}")
