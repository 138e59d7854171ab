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
    assert DATASETS.names() == ["coco", "hf", "parquet", "wds"]
    with pytest.raises(KeyError, match="coco, hf, parquet, wds"):
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
    assert "1 images not found" in caplog.text and "removed 0" in caplog.text


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


def test_wds_truncated_tar_counts_errors_without_sleeping(tars, tmp_path: Path, caplog) -> None:
    folder, keys = tars
    data = (folder / "shard-00001.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    source = open_source(str(cut))
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        (records,) = records_of(source)
    assert time.perf_counter() - start < 0.4  # warn_and_continue would sleep 0.5 s
    assert 0 < len(records) < len(keys[1])
    assert [r.key for r in records] == keys[1][: len(records)]
    assert source.report()["read_errors"] >= 1 and "read errors" in caplog.text


def test_wds_errors(tars, tmp_path: Path) -> None:
    folder, _ = tars
    with pytest.raises(ValueError, match="split file"):
        open_source(str(folder / "shard-00000.tar"), split_file="dataset_coco.json")
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
