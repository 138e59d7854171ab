"""Input sources: COCO layout (+ Karpathy split file), WebDataset tars, ``open_source`` dispatch."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdpipe.data import DATASETS, SHAPES, Record, decode_image, open_source
from kdpipe.data.coco import CocoSource
from kdpipe.data.heldout import in_held_out
from kdpipe.data.records import ErrorCounter
from kdpipe.data.wds_input import WdsSource

from conftest import SHAPES_TRAIN, SHAPES_VAL


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 16), fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def all_keys(source, split: str) -> list[str]:
    return [r.key for u in source.units(split) for r in u.records()]


# ---------------------------------------------------------------- dispatch


def test_registry_and_errors(tmp_path: Path) -> None:
    assert DATASETS.names() == ["cifar", "coco", "csv", "flickr", "hf", "imagefolder", "parquet", "wds"]
    with pytest.raises(KeyError, match="cifar, coco, csv, flickr, hf, imagefolder, parquet, wds"):
        DATASETS.get("imagenet")
    with pytest.raises(FileNotFoundError, match=r"annotations/captions_<split>\.json"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unrecognised input layout.*make-shapes"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="2 of 2 tars not found"):
        open_source(str(tmp_path / "shard-{0..1}.tar"))


# ---------------------------------------------------------------- COCO layout: the shapes world


def test_a_directory_of_tars_with_caption_files_is_coco_not_ambiguous(shapes_root: Path, tmp_path: Path) -> None:
    """The tar kind defers to the COCO kind's layout test, so exactly one kind matches."""
    root = tmp_path / "both"
    (root / "annotations").mkdir(parents=True)
    for f in (shapes_root / "annotations").glob("captions_*.json"):
        (root / "annotations" / f.name).write_bytes(f.read_bytes())
    (root / "stray.tar").write_bytes(b"")
    assert [n for n in DATASETS.names() if DATASETS.get(n).matches(str(root))] == ["coco"]
    assert open_source(str(root)).name == "coco"
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "a.tar").write_bytes(b"")
    assert open_source(str(tmp_path / "tars")).name == "wds"


def test_shapes_world_as_coco(shapes_root: Path) -> None:
    source = open_source(str(shapes_root), shard_size=10)
    assert isinstance(source, CocoSource) and source.name == "coco"
    assert source.splits() == ["train", "val"]
    assert source.classnames() == list(SHAPES)
    assert source.report()["records"] == {"train": SHAPES_TRAIN, "val": SHAPES_VAL}
    train = source.units("train")
    assert [u.index for u in train] == [0, 1, 2] and [u.size for u in train] == [10, 10, 4]
    records = [r for u in train for r in u.records()]
    assert all(r.label is not None and 0 <= r.label < len(SHAPES) for r in records)
    assert all(Path(r.path).is_file() and r.data is None and len(r.captions) >= 5 for r in records)
    assert not set(all_keys(source, "train")) & set(all_keys(source, "val"))
    with pytest.raises(KeyError, match="valid: train, val"):
        source.units("test")


@pytest.mark.parametrize("shard_size", [1, 7, 24, 1000])
def test_units_cover_keys_once_and_are_stable(shapes_root: Path, shard_size: int) -> None:
    first = open_source(str(shapes_root), shard_size=shard_size)
    again = open_source(str(shapes_root), shard_size=shard_size)
    keys = all_keys(first, "train")
    assert len(keys) == len(set(keys)) == SHAPES_TRAIN
    assert keys == sorted(keys) == all_keys(again, "train")
    units = first.units("train")
    assert len(units) == -(-SHAPES_TRAIN // shard_size)
    # Units travel to worker processes.
    clone = pickle.loads(pickle.dumps(units[-1]))
    assert list(clone.records()) == list(units[-1].records())


# ---------------------------------------------------------------- COCO layout: official format + Karpathy


def write_coco(root: Path, splits: dict[str, list[int]]) -> None:
    """COCO 2017 layout: captions_{split}.json in the official format, 12-digit file names."""
    (root / "annotations").mkdir(parents=True)
    ann_id = 0
    for split, ids in splits.items():
        (root / split).mkdir()
        images, annotations = [], []
        for image_id in ids:
            name = f"{image_id:012d}.jpg"
            (root / split / name).write_bytes(jpeg_bytes(image_id))
            images.append({"id": image_id, "file_name": name, "height": 16, "width": 24, "license": 1})
            for k in range(5 + image_id % 2):
                annotations.append({"id": ann_id, "image_id": image_id, "caption": f"image {image_id} caption {k}"})
                ann_id += 1
        annotations.reverse()  # order in the file must not matter for keys; captions keep file order
        data = {"info": {}, "licenses": [], "images": images[::-1], "annotations": annotations}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))


def karpathy_entry(image_id: int, split: str) -> dict:
    """An entry as in dataset_coco.json: COCO 2014 path and file name."""
    folder = "val2014" if split in ("val", "test", "restval") else "train2014"
    return {"cocoid": image_id, "split": split, "filepath": folder, "filename": f"COCO_{folder}_{image_id:012d}.jpg",
            "sentences": [{"raw": f"karpathy {image_id} s{k}", "tokens": []} for k in range(5)]}  # fmt: skip


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_coco(root, {"train2017": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "val2017": [11, 12, 13, 14]})
    return root


def test_official_coco_format(coco_root: Path) -> None:
    source = open_source(str(coco_root), shard_size=4)
    assert source.splits() == ["train2017", "val2017"]
    assert source.classnames() is None
    records = [r for u in source.units("train2017") for r in u.records()]
    assert [r.key for r in records] == [f"{i:012d}" for i in range(1, 11)]
    first = records[0]
    assert first.label is None and first.path == str(coco_root / "train2017" / "000000000001.jpg")
    assert first.captions == tuple(f"image 1 caption {k}" for k in (5, 4, 3, 2, 1, 0))  # file order, 6 captions
    assert decode_image(first.path).size == (24, 16)


def test_karpathy_full_split_file(coco_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train + restval -> train; 2014 file names found in 2017 folders by image id; missing images counted."""
    entries = [karpathy_entry(i, "train") for i in (1, 2, 3)] + [karpathy_entry(i, "restval") for i in (4, 5, 6)]
    entries += [karpathy_entry(11, "val"), karpathy_entry(12, "val"), karpathy_entry(13, "test"), karpathy_entry(99, "test")]
    split_file = tmp_path / "dataset_coco.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        source = open_source(str(coco_root), split_file=str(split_file))
    assert source.splits() == ["train", "val", "test"]
    assert all_keys(source, "train") == [f"{i:012d}" for i in range(1, 7)]
    assert all_keys(source, "test") == ["000000000013"]
    record = next(source.units("val")[0].records())
    assert record.captions == tuple(f"karpathy 11 s{k}" for k in range(5))
    assert record.path == str(coco_root / "val2017" / "000000000011.jpg")
    assert source.report() | {"records": None} == {
        "split_file": str(split_file), "leakage_removed": 0, "keep_leaky": False, "not_found": 1, "records": None}  # fmt: skip
    assert "1 of 10 images not found" in caplog.text and "COCO_val2014_000000000099.jpg" in caplog.text
    assert "removed 0" in caplog.text


@pytest.mark.parametrize("keep_leaky", [False, True])
def test_karpathy_leakage_guard(coco_root: Path, tmp_path: Path, keep_leaky: bool, caplog) -> None:
    """A split file with only val/test: train is train2017, minus the val/test ids it contains."""
    entries = [karpathy_entry(i, "val") for i in (2, 11)] + [karpathy_entry(i, "test") for i in (5, 7, 12)]
    split_file = tmp_path / "karpathy_eval.json"
    split_file.write_text(json.dumps({"images": entries}))
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        source = open_source(str(coco_root), split_file=str(split_file), keep_leaky=keep_leaky)
    train = set(all_keys(source, "train"))
    leaked = {f"{i:012d}" for i in (2, 5, 7)}
    if keep_leaky:
        assert source.report()["leakage_removed"] == 0 and leaked <= train and len(train) == 10
    else:
        assert source.report()["leakage_removed"] == 3 and not leaked & train and len(train) == 7
        assert "leakage guard: removed 3" in caplog.text
    assert all_keys(source, "test") == ["000000000005", "000000000007", "000000000012"]


def test_karpathy_errors(coco_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        open_source(str(coco_root), split_file=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [karpathy_entry(1, "train") | {"split": "holdout"}]}))
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        open_source(str(coco_root), split_file=str(bad))
    nowhere = tmp_path / "nowhere.json"
    nowhere.write_text(json.dumps({"images": [karpathy_entry(500, "test")]}))
    with pytest.raises(FileNotFoundError, match="none of the images"):
        open_source(str(coco_root), split_file=str(nowhere))


# ---------------------------------------------------------------- WebDataset tars


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, first: int, n: int) -> list[str]:
    """img2dataset-style samples: jpg + txt + json; some png, some with extra captions, one without image."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            key = f"{i:09d}"
            keys.append(key)
            if i % 5 != 4:
                add_file(tar, f"{key}.png" if i % 3 == 2 else f"{key}.jpg", jpeg_bytes(i, fmt="PNG" if i % 3 == 2 else "JPEG"))
            add_file(tar, f"{key}.txt", f" caption {i} \n".encode())
            meta = {"key": key, "caption": f"caption {i}", "status": "success"}
            if i % 2:
                meta["captions"] = [f"caption {i}", f"extra {i}"]
            add_file(tar, f"{key}.json", json.dumps(meta).encode())
            add_file(tar, f"{key}.cls", str(i % 3).encode())
    return keys


@pytest.fixture
def tars(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    folder = tmp_path / "shards"
    folder.mkdir()
    return folder, [write_tar(folder / f"shard-{s:05d}.tar", 10 * s, 6) for s in range(3)]


def records_of(source) -> list[list[Record]]:
    return [list(u.records()) for u in source.units("train")]


def test_wds_single_tar(tars) -> None:
    folder, keys = tars
    source = open_source(str(folder / "shard-00000.tar"))
    assert isinstance(source, WdsSource) and source.splits() == ["train"] and source.classnames() is None
    (records,) = records_of(source)
    assert [r.key for r in records] == keys[0]
    by_key = {r.key: r for r in records}
    assert by_key["000000000"].captions == ("caption 0",)  # json "caption" duplicates the txt
    assert by_key["000000001"].captions == ("caption 1", "extra 1")
    assert by_key["000000000"].label == 0 and by_key["000000002"].label == 2
    assert decode_image(by_key["000000002"].data).format == "PNG"
    assert decode_image(by_key["000000001"].data).size == (24, 16)
    assert by_key["000000004"].data is None and by_key["000000004"].path is None  # no image: extract skips it
    assert source.report() == {"tars": 1, "read_errors": 0}


def test_wds_brace_pipe_and_directory_agree(tars) -> None:
    folder, keys = tars
    brace = open_source(str(folder / "shard-{00000..00002}.tar"), shard_size=2)  # shard_size does not apply
    piped = open_source(f"pipe:cat {folder}/shard-{{00000..00002}}.tar")
    directory = open_source(str(folder))
    joined = open_source(f"{folder}/shard-00000.tar::{folder}/shard-{{00001..00002}}.tar")
    expected = records_of(brace)
    assert [[r.key for r in unit] for unit in expected] == keys
    assert [u.index for u in brace.units("train")] == [0, 1, 2]
    for other in (piped, directory, joined):
        assert records_of(other) == expected
    clone = pickle.loads(pickle.dumps(brace.units("train")[1]))
    assert list(clone.records()) == expected[1]


def test_wds_truncated_tar_counts_errors_without_sleeping(tars, tmp_path: Path, caplog, monkeypatch) -> None:
    folder, keys = tars
    data = (folder / "shard-00001.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    source = open_source(str(cut))
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # warn_and_continue would sleep 0.5 s per error
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        (records,) = records_of(source)
    assert sleeps == []
    assert 0 < len(records) < len(keys[1])
    assert [r.key for r in records] == keys[1][: len(records)]
    assert source.report()["read_errors"] >= 1 and "read errors" in caplog.text


def test_wds_errors(tars, tmp_path: Path) -> None:
    folder, _ = tars
    with pytest.raises(ValueError, match="--split-file does not apply to wds input"):
        open_source(str(folder / "shard-00000.tar"), split_file="dataset_coco.json")
    with pytest.raises(ValueError, match="--keep-leaky does not apply to wds input; it applies to coco, flickr"):
        open_source(str(folder / "shard-00000.tar"), keep_leaky=True)
    with pytest.raises(KeyError, match="one split"):
        open_source(str(folder / "shard-00000.tar")).units("val")
    with pytest.raises(FileNotFoundError, match="1 of 3 tars not found"):
        open_source(str(folder / "shard-{00001..00003}.tar"))
    failing = open_source(f"pipe:cat {tmp_path}/missing.tar 2>/dev/null")
    with pytest.raises(RuntimeError, match="missing.tar"):
        records_of(failing)


def test_error_counter_counts_by_type_logs_the_first_and_stops_an_endless_run(caplog) -> None:
    counter = ErrorCounter("cache sample", log_first=2, max_consecutive=4)
    ok = counter.watch(lambda x: x * 2)
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        assert counter(ValueError("bad json")) and counter(KeyError("jpg")) and counter(ValueError("again"))
    assert counter.counts == {"ValueError": 2, "KeyError": 1} and counter.total() == 3
    assert counter.first == "ValueError: bad json"
    assert caplog.text.count("skipped a bad cache sample") == 2  # log_first
    assert counter.take() == 3 and counter.take() == 0
    assert ok(5) == 10 and counter.consecutive == 0  # a success resets the run of errors
    for _ in range(3):
        counter(OSError("x"))
    with pytest.raises(RuntimeError, match="4 bad cache samples in a row"):
        counter(OSError("x"))
    unlimited = ErrorCounter()  # the input tars' reader: never raises, logs a summary itself
    for _ in range(2000):
        unlimited(OSError("x"))
    assert unlimited.total() == 2000


# ---------------------------------------------------------------- CSV / TSV (open_clip's conventions)


def write_images(folder: Path, names: list[str], seed: int = 0, size: tuple[int, int] = (40, 32)) -> None:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg_bytes(seed + i, size))


def write_csv(path: Path, rows: list[tuple[str, str]], sep: str = ",", header: tuple[str, str] = ("filepath", "title"),
              extra_column: bool = True) -> Path:
    """A CSV as open_clip reads it: a header, one row per (image, caption); an extra column it ignores."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow([*header, "url"] if extra_column else list(header))
        for image, caption in rows:
            writer.writerow([image, caption, "http://x"] if extra_column else [image, caption])
    return path


def captioned_csv(folder: Path, name: str, n_images: int, first: int = 0, sep: str = ",") -> Path:
    """``n_images`` images under folder/images/, two captions each (rows interleaved: grouping must not
    rely on adjacent rows), one caption with the separator inside (quoted)."""
    names = [f"images/img_{first + i}.jpg" for i in range(n_images)]
    write_images(folder, names, seed=first)
    rows = [(n, f"a photo number {first + i}") for i, n in enumerate(names)]
    rows += [(n, f"second caption, of image {first + i}") for i, n in enumerate(names)]
    return write_csv(folder / name, rows, sep=sep)


def test_csv_groups_rows_by_image_in_first_seen_order(tmp_path: Path) -> None:
    spec = captioned_csv(tmp_path / "data", "train.csv", 5)
    source = open_source(str(spec), shard_size=2)
    assert source.name == "csv" and source.splits() == ["train"] and source.classnames() is None
    units = source.units("train")
    assert [u.size for u in units] == [2, 2, 1]
    assert [u.name for u in units] == ["train[0:2]", "train[2:4]", "train[4:5]"]
    records = [r for u in units for r in u.records()]
    assert [r.key for r in records] == [f"{i:09d}" for i in range(5)]
    assert records[3].captions == ("a photo number 3", "second caption, of image 3")
    assert records[3].path == str(tmp_path / "data" / "images" / "img_3.jpg")  # relative to the CSV's folder
    assert decode_image(records[3].path).size == (40, 32)
    assert source.report() == {"rows": 10, "images": 5, "not_found": 0, "separator": ",",
                               "columns": {"image": "filepath", "caption": "title"}}
    assert list(pickle.loads(pickle.dumps(units[1])).records()) == records[2:4]


def test_csv_separator_and_column_options(tmp_path: Path, caplog) -> None:
    """.tsv is tab-separated; a tab-separated .csv (open_clip's default) is recognised by its header;
    --csv-separator and the column keys are open_clip's options."""
    folder = tmp_path / "d"
    write_images(folder, ["a.jpg", "b.jpg"])
    rows = [("a.jpg", "one"), ("b.jpg", "two"), ("a.jpg", "three")]
    tsv = write_csv(folder / "x.tsv", rows, sep="\t")
    tab_csv = write_csv(folder / "tab.csv", rows, sep="\t")
    semi = write_csv(folder / "semi.csv", rows, sep=";", header=("image", "text"), extra_column=False)
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        sources = [open_source(str(tsv)), open_source(str(tab_csv)),
                   open_source(str(semi), csv_separator=";", csv_img_key="image", csv_caption_key="text")]
    assert "tab.csv: columns are tab-separated" in caplog.text
    for source in sources:
        (unit,) = source.units("train")
        assert [r.captions for r in unit.records()] == [("one", "three"), ("two",)]
    assert open_source(str(tsv), csv_separator="\\t").report()["separator"] == "\t"
    bom = folder / "excel.csv"  # Excel writes a byte-order mark before the header
    bom.write_bytes(b"\xef\xbb\xbf" + tab_csv.read_bytes())
    (unit,) = open_source(str(bom)).units("train")
    assert [r.captions for r in unit.records()] == [("one", "three"), ("two",)]
    (folder / "latin1.csv").write_bytes("filepath,title\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv: not UTF-8 text"):
        open_source(str(folder / "latin1.csv"))
    assert open_source(str(tab_csv), csv_separator="tab").report()["separator"] == "\t"


def test_csv_errors_name_the_file_the_line_and_what_was_expected(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    write_images(folder, ["a.jpg"])
    spec = write_csv(folder / "t.csv", [("a.jpg", "cap")])
    with pytest.raises(ValueError, match=r"t\.csv: no column 'caption' \(--csv-caption-key\); its columns: "
                                         r"'filepath', 'title', 'url'"):
        open_source(str(spec), csv_caption_key="caption")
    with pytest.raises(ValueError, match="no column 'image' .--csv-img-key."):
        open_source(str(spec), csv_img_key="image")
    with pytest.raises(ValueError, match="expected one character"):
        open_source(str(spec), csv_separator="||")
    (folder / "short.csv").write_text("filepath,title\na.jpg,ok\nb.jpg\n")
    with pytest.raises(ValueError, match=r"short\.csv:3: 1 fields, the header has 2"):
        open_source(str(folder / "short.csv"))
    (folder / "blank.csv").write_text("filepath,title\n ,a caption\n")
    with pytest.raises(ValueError, match=r"blank\.csv:2: empty 'filepath'"):
        open_source(str(folder / "blank.csv"))
    (folder / "empty.csv").write_text("filepath,title\n")
    with pytest.raises(ValueError, match=r"empty\.csv: no rows"):
        open_source(str(folder / "empty.csv"))
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such CSV file"):
        open_source(str(folder / "nope.csv"))
    with pytest.raises(ValueError, match="--csv-img-key does not apply to coco input; it applies to csv"):
        open_source(str(write_coco_dir(tmp_path / "coco")), csv_img_key="image")


def write_coco_dir(root: Path) -> Path:
    write_coco(root, {"train2017": [1, 2]})
    return root


def test_csv_missing_images_stop_before_any_work_unless_skipped(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "d"
    names = [f"i{k}.jpg" for k in range(8)]
    write_images(folder, names[:2])  # 6 of 8 are missing
    spec = write_csv(folder / "t.csv", [(n, f"caption {n}") for n in names])
    with pytest.raises(FileNotFoundError, match=r"t\.csv names 6 of 8 images not found \(first 5: i2\.jpg \(line 4\), "
                                                r"i3\.jpg \(line 5\), .*i6\.jpg \(line 8\)\); pass --skip-missing"):
        open_source(str(spec))
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        source = open_source(str(spec), skip_missing=True)
    assert "6 of 8 images not found" in caplog.text and "skipped (--skip-missing)" in caplog.text
    # keys stay those of the full file: an image's key does not depend on another image's absence
    assert all_keys(source, "train") == ["000000000", "000000001"] and source.report()["not_found"] == 6
    nothing = write_csv(folder / "none.csv", [("gone.jpg", "x")])
    with pytest.raises(FileNotFoundError, match="none of its images exist"):
        open_source(str(nothing), skip_missing=True)


# ---------------------------------------------------------------- Flickr30k / Flickr8k (Karpathy's split file)


def flickr_entry(n: int, split: str) -> dict:
    """An entry as in dataset_flickr30k.json: no cocoid, no filepath."""
    return {"filename": f"{1000 + n}.jpg", "imgid": n, "split": split, "sentids": [5 * n + k for k in range(5)],
            "sentences": [{"raw": f"flickr {n} s{k}", "tokens": [], "imgid": n, "sentid": 5 * n + k}
                          for k in range(5)]}


def write_flickr(root: Path, splits: dict[str, list[int]], on_disk: list[int] | None = None,
                 name: str = "dataset_flickr30k.json") -> tuple[Path, Path]:
    """(the image folder, the split file): ROOT/flickr30k-images/{1000+n}.jpg and ROOT/NAME."""
    images = root / "flickr30k-images"
    numbers = [n for ns in splits.values() for n in ns]
    write_images(images, [f"{1000 + n}.jpg" for n in (numbers if on_disk is None else on_disk)])
    entries = [flickr_entry(n, split) for split, ns in splits.items() for n in ns]
    (root / name).write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return images, root / name


def test_flickr_split_file(tmp_path: Path, caplog) -> None:
    images, split_file = write_flickr(tmp_path, {"train": [3, 1, 2], "restval": [4], "val": [5, 6], "test": [7]})
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        source = open_source(str(images), split_file=str(split_file), shard_size=3)
    assert source.name == "flickr" and source.splits() == ["train", "val", "test"]
    assert all_keys(source, "train") == ["1001", "1002", "1003", "1004"]  # restval joins train; sorted keys
    assert [u.size for u in source.units("train")] == [3, 1]
    assert all_keys(source, "val") == ["1005", "1006"] and all_keys(source, "test") == ["1007"]
    record = next(source.units("test")[0].records())
    assert record.captions == tuple(f"flickr 7 s{k}" for k in range(5)) and record.path == str(images / "1007.jpg")
    assert source.report() == {"split_file": str(split_file), "leakage_removed": 0, "keep_leaky": False,
                               "not_found": 0, "records": {"train": 4, "val": 2, "test": 1}}
    assert "leakage guard: removed 0" in caplog.text
    # the folder that holds the image folder works too (the download's own layout)
    assert all_keys(open_source(str(tmp_path), split_file=str(split_file)), "val") == ["1005", "1006"]


@pytest.mark.parametrize("keep_leaky", [False, True])
def test_flickr_leakage_guard(tmp_path: Path, keep_leaky: bool) -> None:
    """An image listed in train and in test (a hand-made split file) leaves train, as with COCO."""
    images, split_file = write_flickr(tmp_path, {"train": [1, 2, 3], "test": [2], "val": [4]})
    source = open_source(str(images), split_file=str(split_file), keep_leaky=keep_leaky)
    assert ("1002" in all_keys(source, "train")) == keep_leaky
    assert source.report()["leakage_removed"] == (0 if keep_leaky else 1)
    assert all_keys(source, "test") == ["1002"]


def test_flickr_errors(tmp_path: Path, caplog) -> None:
    images, split_file = write_flickr(tmp_path, {"train": list(range(8)), "val": [8]}, on_disk=[0, 1, 8])
    with pytest.raises(FileNotFoundError, match=r"dataset_flickr30k\.json names 6 of 9 images not found under "
                                                r".*flickr30k-images \(first 5: 1002\.jpg, 1003\.jpg, .*1006\.jpg\); "
                                                "pass --skip-missing"):
        open_source(str(images), split_file=str(split_file))
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        source = open_source(str(images), split_file=str(split_file), skip_missing=True)
    assert all_keys(source, "train") == ["1000", "1001"] and source.report()["not_found"] == 6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [flickr_entry(0, "holdout")]}))
    with pytest.raises(ValueError, match=r"bad\.json: images\[0\]: unknown split 'holdout'"):
        open_source(str(images), split_file=str(bad))
    bad.write_text(json.dumps({"images": [flickr_entry(0, "train"), {"filename": "x.jpg", "split": "train"}]}))
    with pytest.raises(ValueError, match=r"bad\.json: images\[1\] lacks one of filename, split, sentences"):
        open_source(str(images), split_file=str(bad))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r'bad\.json: no "images" list'):
        open_source(str(images), split_file=str(bad))
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):  # a missing file: COCO's message, as before
        open_source(str(images), split_file=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="--skip-missing does not apply to coco input; it applies to csv, flickr"):
        open_source(str(write_coco_dir(tmp_path / "coco")), skip_missing=True)


def test_flickr_and_coco_split_files_pick_their_own_kind(coco_root: Path, tmp_path: Path) -> None:
    """COCO's split file on a COCO root stays COCO input; Flickr's on a folder is Flickr input, even
    next to COCO's annotations."""
    coco_file = tmp_path / "dataset_coco.json"
    coco_file.write_text(json.dumps({"images": [karpathy_entry(1, "train"), karpathy_entry(11, "test")]}))
    assert open_source(str(coco_root), split_file=str(coco_file)).name == "coco"
    _, flickr_file = write_flickr(tmp_path / "f", {"train": [1], "test": [2]})
    (tmp_path / "f" / "annotations").mkdir()
    (tmp_path / "f" / "annotations" / "captions_train.json").write_text('{"images": [], "annotations": []}')
    assert open_source(str(tmp_path / "f"), split_file=str(flickr_file)).name == "flickr"


# ---------------------------------------------------------------- a held-out split for train-only input


def test_val_fraction_is_a_pure_function_of_the_key(tars) -> None:
    """Each tar gives unit i of train and unit i of val; the split is the key's hash alone, so
    another grouping of the same samples (one tar, a directory, a brace pattern) picks the same keys."""
    folder, keys = tars
    source = open_source(str(folder), val_fraction=0.4)
    assert source.splits() == ["train", "val"] and source.name == "wds"
    train, val = ([[r.key for r in u.records()] for u in source.units(s)] for s in ("train", "val"))
    assert [u.index for u in source.units("val")] == [0, 1, 2]
    for unit_keys, t, v in zip(keys, train, val, strict=True):  # each tar's samples, on exactly one side, in tar order
        assert sorted(t + v) == unit_keys and not set(t) & set(v)
        assert t == [k for k in unit_keys if k in t] and v == [k for k in unit_keys if k in v]
    flat_val = [k for v in val for k in v]
    assert flat_val == [k for ks in keys for k in ks if in_held_out(k, 0.4)]
    assert 2 <= len(flat_val) <= 14  # 18 keys at 0.4: not a degenerate side
    again = open_source(f"{folder}/shard-{{00000..00002}}.tar", val_fraction=0.4)
    assert [[r.key for r in u.records()] for u in again.units("val")] == val
    clone = pickle.loads(pickle.dumps(source.units("val")[1]))  # a worker process gets units pickled
    assert [r.key for r in clone.records()] == val[1]
    assert source.report()["val_fraction"] == 0.4
    # the hash itself: fixed values, so a change of function (which would move images between
    # splits of existing caches) fails here
    assert [in_held_out(f"{i:09d}", 0.5) for i in range(8)] == HASH_SIDES_AT_HALF
    assert not in_held_out("x", 0.0) and in_held_out("x", 0.999999)


# in_held_out(f"{i:09d}", 0.5) for i in 0..7: sha256's first 8 bytes of each key, below 2**63 or not
HASH_SIDES_AT_HALF = [False, True, True, False, False, False, False, False]


def test_val_fraction_on_a_csv_keeps_unit_sizes(tmp_path: Path) -> None:
    spec = captioned_csv(tmp_path / "d", "t.csv", 10)
    source = open_source(str(spec), shard_size=4, val_fraction=0.5)
    for split in ("train", "val"):
        units = source.units(split)
        assert [u.size for u in units] == [len(list(u.records())) for u in units]
    every = sorted(all_keys(source, "train") + all_keys(source, "val"))
    assert every == [f"{i:09d}" for i in range(10)]


def test_val_data_is_another_input(tars, tmp_path: Path) -> None:
    folder, keys = tars
    source = open_source(str(folder / "shard-00000.tar"), val_data=str(folder / "shard-{00001..00002}.tar"))
    assert source.splits() == ["train", "val"]
    assert all_keys(source, "train") == keys[0] and all_keys(source, "val") == keys[1] + keys[2]
    assert source.report()["val_data"]["kind"] == "wds"
    csv_train = captioned_csv(tmp_path / "c", "train.csv", 3)
    csv_val = captioned_csv(tmp_path / "c", "val.tsv", 2, first=50, sep="\t")
    mixed = open_source(str(csv_train), val_data=str(csv_val))
    assert [r.path for u in mixed.units("val") for r in u.records()] == [
        str(tmp_path / "c" / "images" / f"img_{50 + i}.jpg") for i in range(2)]
    tar_with_csv_val = open_source(str(folder / "shard-00000.tar"), val_data=str(csv_val), csv_caption_key="title")
    assert tar_with_csv_val.report()["val_data"]["kind"] == "csv"


def test_held_out_errors(tars, coco_root: Path, tmp_path: Path) -> None:
    folder, _ = tars
    tar = str(folder / "shard-00000.tar")
    with pytest.raises(ValueError, match="pass one of them"):
        open_source(tar, val_data=tar, val_fraction=0.1)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"--val-fraction {bad}: expected a number between 0 and 1"):
            open_source(tar, val_fraction=bad)
    with pytest.raises(ValueError, match=r"--val-fraction adds a val split to input that has only train .*"
                                         "this coco input has the splits train2017, val2017"):
        open_source(str(coco_root), val_fraction=0.1)
    with pytest.raises(ValueError, match="--val-data adds a val split.*train2017, val2017"):
        open_source(tar, val_data=str(coco_root))
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_source(tar, val_data=str(tmp_path / "nope"))
    with pytest.raises(KeyError, match="valid: train, val"):
        open_source(tar, val_fraction=0.1).units("test")
