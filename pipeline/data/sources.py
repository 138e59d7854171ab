"""Which source reads a spec: the ``DATASETS`` registry of source kinds and ``open_source``.

The kinds (``coco.CocoSource``, ``wds_input.WdsSource``, ``parquet_input.ParquetSource``,
``hf_disk.HfDiskSource``) know nothing of this registry; they are registered here, so the import
arrows point one way (sources -> kinds -> records). A kind's ``options`` names the keyword
arguments of ``open_source`` it reads besides ``shard_size``; it is passed exactly those, and an
option the user set that the input's kind does not read is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import BadValue, MissingInput
from ..registry import Registry
from .coco import CocoSource
from .hf_disk import HfDiskSource
from .parquet_input import ParquetSource
from .records import EXPECTED_LAYOUTS, Source, SourceKind
from .wds_input import WdsSource

log = logging.getLogger("kdpipe")

DATASETS: Registry[SourceKind] = Registry("dataset kind")
DATASETS.register("coco")(CocoSource)
DATASETS.register("wds")(WdsSource)
DATASETS.register("parquet")(ParquetSource)
DATASETS.register("hf")(HfDiskSource)

# Every input option with its default: one set to anything else must be read by the input's kind.
OPTION_DEFAULTS: dict[str, Any] = {"split_file": None, "keep_leaky": False, "image_column": None,
                                   "caption_column": None, "label_column": None}


def open_source(
    spec: str, *, shard_size: int = 1000, split_file: str | None = None, keep_leaky: bool = False,
    image_column: str | None = None, caption_column: str | None = None, label_column: str | None = None,
) -> Source:
    """Open the input named by ``spec``; the kind is chosen from its layout.

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` for a layout
    no registered kind recognises; both messages say which layouts are expected.
    """
    spec = str(spec)
    matching = [name for name in DATASETS.names() if DATASETS.get(name).matches(spec, split_file=split_file)]
    if not matching:
        _raise_unrecognised(spec)
    if len(matching) > 1:  # the kinds' tests are disjoint; this guards future entries
        raise ValueError(f"{spec}: ambiguous input, matches {', '.join(matching)}")
    log.debug("data %s: %s input", spec, matching[0])
    kind = DATASETS.get(matching[0])
    options = dict(split_file=split_file, keep_leaky=keep_leaky, image_column=image_column,
                   caption_column=caption_column, label_column=label_column)
    refuse_unused(spec, matching[0], options)
    return kind(spec, shard_size=shard_size, **{k: v for k, v in options.items() if k in kind.options})


def refuse_unused(spec: str, kind_name: str, options: dict[str, Any]) -> None:
    """Refuse an option set away from its default that the ``kind_name`` input does not read."""
    for name, value in options.items():
        if value != OPTION_DEFAULTS[name] and name not in DATASETS.get(kind_name).options:
            readers = [k for k in DATASETS.names() if name in DATASETS.get(k).options]
            raise BadValue(f"{spec}: --{name.replace('_', '-')} does not apply to {kind_name} input; "
                           f"it applies to {', '.join(readers)} input")


def _raise_unrecognised(spec: str) -> None:
    if not Path(spec).exists():
        raise MissingInput(f"{spec}: no such file or directory; {EXPECTED_LAYOUTS}")
    raise BadValue(f"{spec}: unrecognised input layout; {EXPECTED_LAYOUTS}")
