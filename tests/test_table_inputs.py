"""Parquet and saved Hugging Face datasets as extract input: layouts, units, columns, errors, end to end.

Fixtures are written from the shapes world: img2dataset's Parquet layout (key, jpg, txt, caption),
Hugging Face's (an ``image`` {bytes, path} struct, a list of captions, a ClassLabel label) and a
``save_to_disk`` DatasetDict with train/validation splits.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kdpipe.cli.main import app
from kdpipe.data import open_source
from kdpipe.data.records import Record
from kdpipe.data.shapes import SHAPES
from kdpipe.errors import BadValue, MissingInput


def shapes_records(shapes_root: Path, split: str, n: int | None = None) -> list[Record]:
    source = open_source(str(shapes_root))
    return [r for unit in source.units(split) for r in unit.records()][:n]


def write_img2dataset(path: Path, records: list[Record], row_group_size: int = 1000) -> Path:
    """A Parquet shard as img2dataset --output_format parquet writes it (failed downloads: jpg null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "key": [r.key for r in records],
        "jpg": [Path(r.path).read_bytes() for r in records],
        "txt": [r.captions[0] for r in records],
        "caption": [r.captions[0] for r in records],
        "status": ["success"] * len(records),
    })  # fmt: skip
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_hf_parquet(path: Path, records: list[Record]) -> Path:
    """Hugging Face's layout: image {bytes, path} struct, list-of-strings captions, integer label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "image": [{"bytes": Path(r.path).read_bytes(), "path": None} for r in records],
        "captions": [list(r.captions) for r in records],
        "label": pa.array([r.label for r in records], pa.int64()),
    })  # fmt: skip
    pq.write_table(table, path)
    return path


def write_hf_disk(root: Path, splits: dict[str, list[Record]]) -> Path:
    """A DatasetDict saved with save_to_disk: an Image feature, a list of captions and a ClassLabel."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
                                  "label": datasets.ClassLabel(names=list(SHAPES))})
    parts = {name: datasets.Dataset.from_dict(
        {"image": [{"bytes": Path(r.path).read_bytes(), "path": None} for r in recs],
         "caption": [list(r.captions) for r in recs], "label": [r.label for r in recs]}, features=features)
        for name, recs in splits.items()}  # fmt: skip
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return root


def read_all(spec: str, split: str = "train", **options) -> list[Record]:
    return [r for unit in open_source(spec, **options).units(split) for r in unit.records()]


# --------------------------------------------------------------------------- Parquet


def test_img2dataset_parquet_units_are_n_rows_read_across_row_groups(shapes_root, tmp_path):
    recs = shapes_records(shapes_root, "train", 10)
    write_img2dataset(tmp_path / "00000.parquet", recs[:7], row_group_size=3)
    write_img2dataset(tmp_path / "00001.parquet", recs[7:], row_group_size=3)
    source = open_source(str(tmp_path), shard_size=4)
    assert source.name == "parquet" and source.splits() == ["train"]
    units = source.units("train")
    # a unit never spans two files: 7 rows -> 4 + 3, 3 rows -> 3
    assert [(u.index, u.name, u.size) for u in units] == [
        (0, "00000.parquet[0:4]", 4), (1, "00000.parquet[4:7]", 3), (2, "00001.parquet[0:3]", 3)]
    got = [r for u in units for r in u.records()]
    assert [r.key for r in got] == [r.key for r in recs]  # img2dataset's key column
    assert [r.data for r in got] == [Path(r.path).read_bytes() for r in recs]
    assert [r.captions for r in got] == [(r.captions[0],) for r in recs]  # txt, not also caption
    assert all(r.label is None and r.path is None for r in got)
    assert source.report() == {"files": {"train": 2}, "records": {"train": 10}}
    # a unit's reader goes to a DataLoader worker: it pickles and reads the same rows there
    assert [r.key for r in pickle.loads(pickle.dumps(units[1].reader))()] == [r.key for r in recs[4:7]]


def test_a_file_and_a_glob_are_inputs_and_a_failed_download_has_no_image(shapes_root, tmp_path):
    recs = shapes_records(shapes_root, "train", 4)
    path = write_img2dataset(tmp_path / "shards" / "a.parquet", recs[:2])
    write_img2dataset(tmp_path / "shards" / "b.parquet", recs[2:])
    assert [r.key for r in read_all(str(path))] == [r.key for r in recs[:2]]
    assert [r.key for r in read_all(str(tmp_path / "shards" / "*.parquet"))] == [r.key for r in recs]
    # img2dataset writes jpg = null for a failed download: no image, extract skips it
    table = pq.read_table(path).set_column(1, "jpg", pa.array([None, Path(recs[1].path).read_bytes()], pa.binary()))
    pq.write_table(table, path)
    assert [r.data is None for r in read_all(str(path))] == [True, False]


def test_hf_parquet_struct_images_caption_lists_labels_and_classlabel_names(shapes_root, tmp_path):
    recs = shapes_records(shapes_root, "train", 3)
    path = write_hf_parquet(tmp_path / "d.parquet", recs)
    got = read_all(str(path))
    assert [r.captions for r in got] == [r.captions for r in recs] and len(recs[0].captions) >= 5
    assert [r.label for r in got] == [r.label for r in recs]
    assert [r.key for r in got] == ["d-000000000", "d-000000001", "d-000000002"]  # no key column: file and row
    assert got[0].data == Path(recs[0].path).read_bytes()
    # an image given by path only (bytes null) is read from the file, relative to the Parquet file
    (tmp_path / "img.jpg").write_bytes(Path(recs[0].path).read_bytes())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF's Image storage
    table = pa.table({"image": pa.array([{"bytes": None, "path": "img.jpg"}], image_type), "text": ["a caption"]})
    pq.write_table(table, tmp_path / "paths.parquet")
    (only,) = read_all(str(tmp_path / "paths.parquet"))
    assert only.path == str(tmp_path / "img.jpg") and only.data is None and only.captions == ("a caption",)


def test_parquet_classnames_come_from_the_hugging_face_metadata(shapes_root, tmp_path):
    recs = shapes_records(shapes_root, "train", 2)
    table = pq.read_table(write_hf_parquet(tmp_path / "x" / "d.parquet", recs))
    meta = {"info": {"features": {"label": {"_type": "ClassLabel", "names": list(SHAPES)}}}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}), tmp_path / "x" / "d.parquet")
    assert open_source(str(tmp_path / "x")).classnames() == list(SHAPES)


def test_split_folders_become_splits_validation_is_val(shapes_root, tmp_path):
    write_img2dataset(tmp_path / "train" / "00000.parquet", shapes_records(shapes_root, "train", 5))
    write_img2dataset(tmp_path / "validation" / "00000.parquet", shapes_records(shapes_root, "val", 3))
    source = open_source(str(tmp_path), shard_size=2)
    assert source.splits() == ["train", "val"]
    assert [u.size for u in source.units("val")] == [2, 1]
    (tmp_path / "val").mkdir()
    write_img2dataset(tmp_path / "val" / "00000.parquet", shapes_records(shapes_root, "val", 3))
    with pytest.raises(BadValue, match="both val/ and validation/ would be the val split"):
        open_source(str(tmp_path))


def test_tars_next_to_parquet_are_tar_input(shapes_root, tmp_path):
    """img2dataset writes a metadata .parquet (no images) next to each tar it writes."""
    from test_data_sources import write_tar

    write_tar(tmp_path / "00000.tar", 0, 3)
    pq.write_table(pa.table({"key": ["0"], "url": ["http://x"]}), tmp_path / "00000.parquet")
    assert open_source(str(tmp_path)).name == "wds"


def test_column_errors_name_the_file_the_column_and_what_was_expected(shapes_root, tmp_path):
    recs = shapes_records(shapes_root, "train", 2)
    path = str(write_img2dataset(tmp_path / "a.parquet", recs))
    with pytest.raises(BadValue, match=r"a\.parquet: no image column 'pixels'; its columns are key, jpg, txt, caption, status"):
        open_source(path, image_column="pixels")
    with pytest.raises(BadValue, match=r"a\.parquet: no caption column 'title'; its columns are key, jpg"):
        open_source(path, caption_column="title")
    with pytest.raises(BadValue, match=r"column 'status' is string; expected an integer"):
        open_source(path, label_column="status")
    # a default-named label column that is not an integer is not a class index: not read, not refused
    pq.write_table(pq.read_table(path).append_column("label", pa.array(["cat", "dog"])), tmp_path / "l.parquet")
    assert [r.label for r in read_all(str(tmp_path / "l.parquet"))] == [None, None]
    with pytest.raises(BadValue, match=r"column 'key' is string; expected binary image bytes"):
        open_source(path, image_column="key")
    pq.write_table(pa.table({"jpg": [b"x"], "txt": [3]}), tmp_path / "b.parquet")
    with pytest.raises(BadValue, match=r"b\.parquet: column 'txt' is int64; expected a string or a list of strings"):
        open_source(str(tmp_path / "b.parquet"))
    pq.write_table(pa.table({"url": ["u"], "txt": ["c"]}), tmp_path / "c.parquet")  # img2dataset metadata only
    with pytest.raises(BadValue, match=r"c\.parquet: no image column \(looked for jpg, image.*--image-column\); "
                                       r"its columns are url, txt"):
        open_source(str(tmp_path / "c.parquet"))
    with pytest.raises(MissingInput, match="no Parquet file"):
        open_source(str(tmp_path / "none" / "*.parquet"))


def test_column_options_are_refused_by_inputs_that_do_not_read_them(shapes_root, tmp_path):
    with pytest.raises(BadValue, match="--image-column does not apply to coco input; it applies to hf, parquet input"):
        open_source(str(shapes_root), image_column="jpg")
    path = str(write_img2dataset(tmp_path / "a.parquet", shapes_records(shapes_root, "train", 1)))
    with pytest.raises(BadValue, match="--split-file does not apply to parquet input"):
        open_source(path, split_file="dataset_coco.json")


# --------------------------------------------------------------------------- save_to_disk


def test_saved_dataset_dict_splits_records_and_classnames(shapes_root, tmp_path):
    train, val = shapes_records(shapes_root, "train", 5), shapes_records(shapes_root, "val", 3)
    root = write_hf_disk(tmp_path / "dd", {"train": train, "validation": val})
    source = open_source(str(root), shard_size=2)
    assert source.name == "hf" and source.splits() == ["train", "val"]
    assert source.classnames() == list(SHAPES)
    assert [(u.name, u.size) for u in source.units("train")] == [("train[0:2]", 2), ("train[2:4]", 2), ("train[4:5]", 1)]
    got = [r for u in source.units("val") for r in u.records()]
    assert [r.captions for r in got] == [r.captions for r in val]
    assert [r.label for r in got] == [r.label for r in val]
    assert [r.data for r in got] == [Path(r.path).read_bytes() for r in val]
    assert [r.key for r in got] == ["validation-000000000", "validation-000000001", "validation-000000002"]
    assert list(pickle.loads(pickle.dumps(source.units("val")[0].reader))()) == got[:2]
    # one saved split (a Dataset folder) is the train split
    single = open_source(str(root / "validation"))
    assert single.splits() == ["train"] and len(list(single.units("train")[0].records())) == 3
    with pytest.raises(BadValue, match="dd/train: no caption column 'title'; its columns are image, caption, label"):
        open_source(str(root), caption_column="title")


# --------------------------------------------------------------------------- CLI (end to end: test_registries.py)


def test_cli_names_a_missing_column_in_one_line_before_the_teacher_loads(shapes_root, tmp_path):
    path = write_img2dataset(tmp_path / "a.parquet", shapes_records(shapes_root, "train", 2))
    result = CliRunner().invoke(app, ["extract", "--teacher", "tiny-clip", "--data", str(path), "--out",
                                      str(tmp_path / "c"), "--caption-column", "title", "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{path}: no caption column 'title'; its columns are key, jpg, txt, caption, status" in " ".join(result.output.split())
    assert not (tmp_path / "c").exists()
