"""Labelled inputs to `extract`: image folders and CIFAR-10/100 python batches (kdpipe.data.imagefolder,
kdpipe.data.cifar). Their trip through every stage is test_registries.py's; `train --labels` is test_taskkd.py's."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdpipe.data import open_source
from kdpipe.data.labelled import class_captions
from kdpipe.prompts import CIFAR10_CLASSNAMES, CIFAR100_CLASSNAMES

CLASS_COLOURS = {"red_square": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_image_folder(root: Path, per_class: dict[str, int], colours: dict[str, tuple] = CLASS_COLOURS) -> Path:
    """ROOT/CLASS/i.png (or .jpg for odd i): noisy images around each class's colour."""
    rng = np.random.default_rng(len(str(root)))
    for c, n in per_class.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.clip(np.array(colours[c]) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def labelled_folder(root: Path, train: int = 8, val: int = 2) -> Path:
    """ROOT/train/CLASS and ROOT/val/CLASS for the three CLASS_COLOURS classes."""
    write_image_folder(root / "train", dict.fromkeys(CLASS_COLOURS, train))
    write_image_folder(root / "val", dict.fromkeys(CLASS_COLOURS, val))
    return root


def cifar_rows(labels: list[int], seed: int) -> np.ndarray:
    """[N, 3072] uint8 CIFAR rows: channel-major 32x32, the class index in the red channel's first pixel."""
    rows = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    rows[:, 0] = labels
    return rows


def write_cifar(root: Path, variant: str = "cifar10", train_per_file: int = 5, test: int = 8) -> Path:
    """A CIFAR python-batches folder under ROOT, as the CIFAR site's tarballs unpack (pickled dicts)."""
    if variant == "cifar10":
        folder, k = root / "cifar-10-batches-py", len(CIFAR10_CLASSNAMES)
        files = {f"data_batch_{i}": train_per_file for i in range(1, 6)} | {"test_batch": test}
        meta, names_key, labels_key = "batches.meta", "label_names", "labels"
        names = list(CIFAR10_CLASSNAMES)
    else:
        folder, k = root / "cifar-100-python", len(CIFAR100_CLASSNAMES)
        files = {"train": 5 * train_per_file, "test": test}
        meta, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
        names = [n.replace(" ", "_") for n in CIFAR100_CLASSNAMES]  # the meta file spells them with underscores
    folder.mkdir(parents=True)
    with (folder / meta).open("wb") as f:
        pickle.dump({names_key: names}, f)
    for seed, (name, n) in enumerate(files.items()):
        labels = [(seed * 7 + i) % k for i in range(n)]
        with (folder / name).open("wb") as f:
            pickle.dump({"data": cifar_rows(labels, seed), labels_key: labels, "filenames": [f"{i}.png" for i in range(n)]}, f)
    return root


def records(source, split: str) -> list:
    return [r for unit in source.units(split) for r in unit.records()]


# ---------------------------------------------------------------- image folders


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / "pets", train=4, val=2)
    source = open_source(str(root), shard_size=5)
    assert source.name == "imagefolder" and source.splits() == ["train", "val"]
    assert source.classnames() == ["blue", "green", "red square"]  # sorted folders, underscores as spaces
    train = records(source, "train")
    assert [r.key for r in train] == [f"{i:09d}" for i in range(12)] and len(source.units("train")) == 3
    assert sorted(r.label for r in train) == [0] * 4 + [1] * 4 + [2] * 4
    assert {r.label for r in train[:5]} == {0, 1, 2}  # hash order: a shard holds every class
    for r in train:
        assert Path(r.path).parent.name == ["blue", "green", "red_square"][r.label]
        assert r.captions == class_captions(source.classnames()[r.label])
    assert len(records(source, "val")) == 6


def test_image_folder_single_split_and_class_names_file(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "flat", {"blue": 2, "green": 1})
    (root / "classnames.txt").write_text("navy\nleaf green\n")
    source = open_source(str(root))
    assert source.splits() == ["train"] and source.classnames() == ["navy", "leaf green"]
    assert sorted(r.captions[0] for r in records(source, "train")) == [
        "a photo of a leaf green.", "a photo of a navy.", "a photo of a navy."]
    with_val = open_source(str(root), val_fraction=0.5)  # train-only: --val-fraction adds a val split
    assert with_val.splits() == ["train", "val"]


def test_image_folder_errors_name_the_folder(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / "a", train=1, val=1)
    (root / "train" / "purple").mkdir()
    with pytest.raises(FileNotFoundError, match=f"class folder {root / 'train' / 'purple'} holds no image files"):
        open_source(str(root))
    (root / "train" / "purple").rmdir()
    write_image_folder(root / "val", {"green": 1}, {"green": (0, 0, 0)})
    (root / "val" / "cyan").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "cyan" / "x.png")
    with pytest.raises(ValueError, match=f"class folder {root / 'val' / 'cyan'} is not a class of the train split"):
        open_source(str(root))


def test_coco_roots_stay_coco(shapes_root: Path) -> None:
    """The shapes world's train/ holds images (not class folders) beside caption files: COCO, not a folder."""
    assert open_source(str(shapes_root)).name == "coco"


# ---------------------------------------------------------------- CIFAR python batches


@pytest.mark.parametrize("variant, names", [("cifar10", CIFAR10_CLASSNAMES), ("cifar100", CIFAR100_CLASSNAMES)])
def test_cifar_batches_become_train_and_val(tmp_path: Path, variant: str, names: tuple) -> None:
    root = write_cifar(tmp_path, variant, train_per_file=3, test=4)
    for spec in (root, next(root.iterdir())):  # the root torchvision writes under, or the batches folder itself
        source = open_source(str(spec), shard_size=2)
        assert source.name == "cifar" and source.splits() == ["train", "val"]
        assert source.classnames() == list(names)  # CLIP's spelling: the cifar prompt sets match
    train = records(source, "train")
    assert [r.key for r in train] == [f"{i:09d}" for i in range(15)]
    from kdpipe.data import decode_image

    for r in train + records(source, "val"):
        image = decode_image(r.data)
        assert image.size == (32, 32) and image.getpixel((0, 0))[0] == r.label  # row -> HWC, label kept
        assert r.captions == class_captions(names[r.label])
    if variant == "cifar10":  # a unit never spans two batch files
        assert [u.size for u in source.units("train")] == [2, 1] * 5


def _pickle(path: Path, obj) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def test_cifar_errors_name_the_file_and_what_was_expected(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, "cifar10", train_per_file=2, test=2) / "cifar-10-batches-py"
    _pickle(folder / "data_batch_3", {"labels": [0, 1]})
    with pytest.raises(ValueError, match=rf"{folder / 'data_batch_3'}: no 'data' key \(it has \['labels'\]\); "
                                         r"expected a dict with 'data' \(uint8 \[N, 3072\]\) and 'labels'"):
        open_source(str(folder))
    _pickle(folder / "data_batch_3", {"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]})
    with pytest.raises(ValueError, match=rf"{folder / 'data_batch_3'}: 'data' is float32 \[2, 3072\]"):
        open_source(str(folder))
    _pickle(folder / "data_batch_3", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    with pytest.raises(ValueError, match=rf"{folder / 'data_batch_3'}: label 10 is outside the 10 classes"):
        open_source(str(folder))
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=rf"{folder / 'data_batch_3'}: not a readable CIFAR pickle"):
        open_source(str(folder))
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{folder / 'data_batch_3'} not found; expected a dict with 'data'"):
        open_source(str(folder))
    (folder / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{folder / 'batches.meta'} not found; expected the cifar10 meta "
                                                r"file, a dict with 'label_names'"):
        open_source(str(folder))
