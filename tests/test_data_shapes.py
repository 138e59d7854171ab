"""The shapes world generator and the `kdpipe make-shapes` command."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdpipe.cli.main import app
from kdpipe.data.shapes import COLOURS, SHAPES, Obj, _relation, make_shapes

from conftest import SHAPES_SIZE, SHAPES_TRAIN, SHAPES_VAL


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, kind: str, split: str) -> dict:
    return json.loads((root / "annotations" / f"{kind}_{split}.json").read_text())


def test_layout_and_counts(shapes_root: Path) -> None:
    for split, n in (("train", SHAPES_TRAIN), ("val", SHAPES_VAL)):
        caps, labels = load(shapes_root, "captions", split), load(shapes_root, "labels", split)
        assert len(caps["images"]) == n == len(list((shapes_root / split).glob("*.jpg")))
        assert labels["classnames"] == list(SHAPES)
        assert set(labels["labels"]) == {str(img["id"]) for img in caps["images"]}
    assert json.loads((shapes_root / "classnames.json").read_text()) == list(SHAPES)
    train_ids = {img["id"] for img in load(shapes_root, "captions", "train")["images"]}
    val_ids = {img["id"] for img in load(shapes_root, "captions", "val")["images"]}
    assert not train_ids & val_ids


def test_same_seed_same_bytes_and_prefix_stable(tmp_path: Path, shapes_root: Path) -> None:
    make_shapes(tmp_path / "a", 6, 3, size=SHAPES_SIZE, seed=0)
    make_shapes(tmp_path / "b", 6, 3, size=SHAPES_SIZE, seed=0)
    make_shapes(tmp_path / "c", 6, 3, size=SHAPES_SIZE, seed=1)
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    images_a = {k: v for k, v in a.items() if k.endswith(".jpg")}
    assert all(c[k] != v for k, v in images_a.items() if k.startswith("train/"))
    # Image i of train depends only on (seed, split, i): the first 6 of the 24-image world match.
    big = tree_digest(shapes_root)
    assert all(big[k] == v for k, v in images_a.items() if k.startswith("train/"))


def test_captions_are_varied_and_true(shapes_root: Path) -> None:
    caps = load(shapes_root, "captions", "train")
    labels = load(shapes_root, "labels", "train")["labels"]
    per_image: dict[int, list[str]] = {}
    for ann in caps["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["caption"])
    for img in caps["images"]:
        texts = per_image[img["id"]]
        main = img["objects"][0]
        assert 5 <= len(texts) <= 6 and len(set(texts)) == len(texts)
        assert labels[str(img["id"])] == SHAPES.index(main["shape"])
        assert sum(main["shape"] in t for t in texts) >= 3  # the class is named often, not always
        assert any(main["colour"] in t for t in texts)
        assert any(t.split()[0] in ("a", "an") for t in texts)
        assert not any(" a a" in t or " a o" in t or t.startswith("a i") for t in texts)  # articles
        if len(img["objects"]) == 2:
            assert any(img["objects"][1]["shape"] in t for t in texts)
            assert img["objects"][1]["radius"] < main["radius"]  # the label is the largest object's shape
    # Non-trivial retrieval: some captions are shared between images, yet the full caption sets differ.
    counts = Counter(a["caption"] for a in caps["annotations"])
    assert max(counts.values()) >= 2
    assert len({tuple(v) for v in per_image.values()}) == len(per_image)
    assert len({img["objects"][0]["shape"] for img in caps["images"]}) >= 5
    assert sum(len(img["objects"]) == 2 for img in caps["images"]) >= 5


def test_pixels_match_metadata(shapes_root: Path) -> None:
    """The main object's colour is at its recorded centre (filled shapes): captions tell the truth."""
    caps = load(shapes_root, "captions", "train")
    checked = 0
    for img in caps["images"]:
        main = img["objects"][0]
        if main["shape"] in ("ring", "star", "cross"):  # hole or thin arms at the centre
            continue
        pixels = np.asarray(Image.open(shapes_root / "train" / img["file_name"]), dtype=np.float32)
        assert pixels.shape == (SHAPES_SIZE, SHAPES_SIZE, 3)
        x, y = round(main["x"] * SHAPES_SIZE), round(main["y"] * SHAPES_SIZE)
        patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
        assert np.abs(patch - np.array(COLOURS[main["colour"]])).max() < 45, (img["file_name"], patch)
        checked += 1
    assert checked >= 8


def test_relation_words() -> None:
    left = Obj(0, "red", 0.1, 0.2, 0.5, "left", 0.0)
    right = Obj(1, "blue", 0.1, 0.8, 0.5, "right", 0.0)
    top = Obj(2, "green", 0.1, 0.5, 0.2, "top", 0.0)
    assert _relation(left, right) == "to the left of" and _relation(right, left) == "to the right of"
    assert _relation(top, Obj(3, "red", 0.1, 0.5, 0.8, "bottom", 0.0)) == "above"


def test_fast_enough(tmp_path: Path) -> None:
    start = time.perf_counter()
    summary = make_shapes(tmp_path, 300, 0, size=64)
    # ~1 ms per image on one core; the bound is loose for a busy CI machine.
    assert time.perf_counter() - start < 6.0
    assert summary["images"] == {"train": 300, "val": 0} and not (tmp_path / "val").exists()


@pytest.mark.parametrize("kwargs", [dict(n_train=0, n_val=1), dict(n_train=2, n_val=-1), dict(n_train=2, n_val=1, size=8)])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_shapes(tmp_path, **kwargs)


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    help_result = runner.invoke(app, ["make-shapes", "--help"])
    assert help_result.exit_code == 0 and "--train" in help_result.output and "COCO" in help_result.output
    assert runner.invoke(app, ["make-shapes", str(tmp_path / "x"), "--bogus"]).exit_code != 0
    assert runner.invoke(app, ["make-shapes", str(tmp_path / "x"), "--train", "0"]).exit_code != 0
    ok = runner.invoke(app, ["make-shapes", str(tmp_path / "w"), "--train", "3", "--val", "2", "--size", "32", "--seed", "5"])
    assert ok.exit_code == 0, ok.output
    assert len(list((tmp_path / "w" / "val").glob("*.jpg"))) == 2
    assert Image.open(next((tmp_path / "w" / "train").glob("*.jpg"))).size == (32, 32)
