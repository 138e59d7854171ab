"""Records from Arrow tables: the columns Parquet files and saved Hugging Face datasets share.

A table input has an image column, a caption column and optionally a label and a key column.
Column names default to the conventions of the tools that write such tables: img2dataset's
``--output_format parquet`` writes ``key``, ``jpg`` (image bytes) and ``txt`` (plus ``caption``);
a Hugging Face dataset has an ``image`` column (an ``Image`` feature, stored as a
``{bytes, path}`` struct) and a ``caption``/``captions``/``text`` column and often a ``label``
(a ``ClassLabel``). The first name of each candidate list that the table has is used;
``--image-column`` / ``--caption-column`` / ``--label-column`` name one explicitly.

Accepted types: image = binary (encoded bytes) or a struct with a binary ``bytes`` field (and a
string ``path`` used when the bytes are null); caption = a string or a list of strings;
label = an integer (a negative label, Hugging Face's "no label", becomes ``None``); a default-named
label column of another type is not read, a named one is refused.

pyarrow is an optional dependency (``pip install 'kdpipe[parquet]'``), imported where used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadValue
from .records import Record, UnitSplits

ArrowSchema = Any  # pyarrow.Schema / pyarrow.Table: pyarrow is optional, so not imported for annotations
ArrowTable = Any
IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp")  # img2dataset first, then Hugging Face's "image"
CAPTION_COLUMNS = ("txt", "caption", "captions", "text")  # img2dataset's txt (= its caption column), then HF
LABEL_COLUMNS = ("label", "cls")
KEY_COLUMN = "key"  # img2dataset's sample key; without it keys are the file name and row number
# How a split folder or a DatasetDict split is named in the cache (the trainer validates on "val").
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


@dataclass(frozen=True)
class Columns:
    """The table columns a source reads; ``label``/``key`` are None when the table has none."""

    image: str
    caption: str
    label: str | None = None
    key: str | None = None

    def names(self) -> list[str]:
        return [c for c in (self.image, self.caption, self.label, self.key) if c is not None]


def require_pyarrow(what: str) -> None:
    """Raise a one-line error naming the extra when pyarrow is missing."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise BadValue(f"{what} needs the pyarrow package: pip install 'kdpipe[parquet]'") from None


def pick_columns(
    schema: ArrowSchema, where: str, image: str | None = None, caption: str | None = None, label: str | None = None
) -> Columns:
    """The columns of ``schema`` to read (named or found among the defaults), type-checked.

    ``where`` names the file in errors. Raises ``BadValue`` naming the column and the table's
    columns when one is missing, or the column and the type expected when a type is wrong.
    """
    names = list(schema.names)
    image_col = _find(names, image, IMAGE_COLUMNS, "image", "--image-column", where)
    caption_col = _find(names, caption, CAPTION_COLUMNS, "caption", "--caption-column", where)
    label_col = label if label is not None else _integer_label(schema)
    if label is not None and label not in names:
        _missing(names, label, "label", where)
    columns = Columns(image_col, caption_col, label_col, KEY_COLUMN if KEY_COLUMN in names else None)
    check_types(schema, columns, where)
    return columns


def _find(names: list[str], asked: str | None, defaults: tuple[str, ...], what: str, flag: str, where: str) -> str:
    if asked is not None:
        if asked not in names:
            _missing(names, asked, what, where)
        return asked
    found = next((c for c in defaults if c in names), None)
    if found is None:
        raise BadValue(f"{where}: no {what} column (looked for {', '.join(defaults)}; name one with {flag}); "
                       f"its columns are {', '.join(names)}")
    return found


def _integer_label(schema: ArrowSchema) -> str | None:
    """The first default label column of an integer type: a string "label" is not a class index."""
    import pyarrow as pa

    return next((c for c in LABEL_COLUMNS if c in schema.names and pa.types.is_integer(schema.field(c).type)), None)


def _missing(names: list[str], column: str, what: str, where: str) -> None:
    raise BadValue(f"{where}: no {what} column {column!r}; its columns are {', '.join(names)}")


def check_types(schema: ArrowSchema, columns: Columns, where: str) -> None:
    """Refuse a column whose Arrow type the reader cannot turn into a Record field."""
    import pyarrow as pa

    def is_binary(t: pa.DataType) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    def is_string(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    image = schema.field(columns.image).type
    if not (is_binary(image) or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
                                 and is_binary(image.field("bytes").type))):
        _wrong(columns.image, image, "binary image bytes or a {bytes: binary, path: string} struct", where)
    caption = schema.field(columns.caption).type
    is_list = pa.types.is_list(caption) or pa.types.is_large_list(caption)
    if not (is_string(caption) or (is_list and is_string(caption.value_type))):
        _wrong(columns.caption, caption, "a string or a list of strings", where)
    if columns.label is not None and not pa.types.is_integer(schema.field(columns.label).type):
        _wrong(columns.label, schema.field(columns.label).type, "an integer", where)


def _wrong(column: str, found: Any, expected: str, where: str) -> None:
    raise BadValue(f"{where}: column {column!r} is {found}; expected {expected}")


def table_records(table: ArrowTable, columns: Columns, key_prefix: str, first_row: int, root: Path) -> list[Record]:
    """One Record per row of ``table`` (rows ``first_row``.. of their file or split).

    Without a key column the key is ``{key_prefix}{row:09d}``. An image struct whose bytes are
    null is read from its ``path`` (relative paths from ``root``); a null image gives a Record
    without image, which extract skips and counts.
    """
    images = table.column(columns.image).to_pylist()
    captions = table.column(columns.caption).to_pylist()
    labels = table.column(columns.label).to_pylist() if columns.label else [None] * len(images)
    keys = table.column(columns.key).to_pylist() if columns.key else [None] * len(images)
    records = []
    for row, (image, caption, label, key) in enumerate(zip(images, captions, labels, keys)):
        data, path = _image(image, root)
        records.append(Record(
            key=str(key) if key is not None else f"{key_prefix}{first_row + row:09d}",
            captions=_captions(caption),
            label=int(label) if label is not None and label >= 0 else None,
            path=path, data=data))  # fmt: skip
    return records


def _image(value: bytes | dict | None, root: Path) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an image cell: raw bytes, or a {bytes, path} struct (bytes win)."""
    if value is None or isinstance(value, bytes):
        return value, None
    if value.get("bytes") is not None:
        return value["bytes"], None
    path = value.get("path")
    return None, (str(root / path) if path else None)


def _captions(value: str | list[str | None] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(c for c in value if c is not None)


def classlabel_names(features: dict[str, Any], column: str | None) -> list[str] | None:
    """Class names of a Hugging Face ``ClassLabel`` feature (features as in dataset_info.json)."""
    feature = features.get(column) if column else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(n) for n in feature["names"]]
    return None


def schema_features(schema: ArrowSchema) -> dict[str, Any]:
    """The Hugging Face features a Parquet file written by ``datasets`` keeps in its metadata ({} if none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return {}
    try:
        return json.loads(raw).get("info", {}).get("features", {}) or {}
    except ValueError:
        return {}


class TableSplits(UnitSplits):
    """What the two table inputs (``parquet``, ``hf``) share of ``SourceKind``: their units are built up
    front, per split, into ``_units``, and a ClassLabel column's names into ``_classnames``."""

    _classnames: list[str] | None

    def classnames(self) -> list[str] | None:
        return self._classnames
