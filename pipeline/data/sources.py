"""Which source reads a spec: the ``DATASETS`` registry of source kinds and ``open_source``.

The kinds (``coco.CocoSource``, ``wds_input.WdsSource``) know nothing of this registry; they
are registered here, so the import arrows point one way (sources -> kinds -> records).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import BadValue, MissingInput
from ..registry import Registry
from .coco import CocoSource
from .records import EXPECTED_LAYOUTS, Source, SourceKind
from .wds_input import WdsSource

log = logging.getLogger("kdpipe")

DATASETS: Registry[SourceKind] = Registry("dataset kind")
DATASETS.register("coco")(CocoSource)
DATASETS.register("wds")(WdsSource)


def open_source(
    spec: str, *, shard_size: int = 1000, split_file: str | None = None, keep_leaky: bool = False
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
    return kind(spec, shard_size=shard_size, split_file=split_file, keep_leaky=keep_leaky)


def _raise_unrecognised(spec: str) -> None:
    if not Path(spec).exists():
        raise MissingInput(f"{spec}: no such file or directory; {EXPECTED_LAYOUTS}")
    raise BadValue(f"{spec}: unrecognised input layout; {EXPECTED_LAYOUTS}")
