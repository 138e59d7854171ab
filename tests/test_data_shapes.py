"""The shapes world generator and the `kdpipe make-shapes` command."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdpipe.cli.main import app
from kdpipe.data.shapes import (BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Obj, Slot, _apart, _relation,
                                make_shapes, shared_caption_share)

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


def captions_by_image(root: Path, split: str) -> list[list[str]]:
    """Each image's captions, in image order."""
    caps = load(root, "captions", split)
    per_image: dict[int, list[str]] = {img["id"]: [] for img in caps["images"]}
    for ann in caps["annotations"]:
        per_image[ann["image_id"]].append(ann["caption"])
    return list(per_image.values())


def test_same_seed_same_bytes_and_prefix_stable(tmp_path: Path, shapes_root: Path) -> None:
    make_shapes(tmp_path / "a", 6, 3, size=SHAPES_SIZE, seed=0)
    make_shapes(tmp_path / "b", 6, 3, size=SHAPES_SIZE, seed=0)
    make_shapes(tmp_path / "c", 6, 3, size=SHAPES_SIZE, seed=1)
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert a == b  # images, captions and labels
    images_a = {k: v for k, v in a.items() if k.endswith(".jpg")}
    assert all(c[k] != v for k, v in images_a.items() if k.startswith("train/"))
    # Image i of a split depends only on (seed, split, i): the first images of the 24 + 12 world match,
    # pixels and captions, although val ids (and so file names) start later there.
    big = tree_digest(shapes_root)
    assert all(big[k] == v for k, v in images_a.items() if k.startswith("train/"))
    for split, n in (("train", 6), ("val", 3)):
        assert captions_by_image(tmp_path / "a", split) == captions_by_image(shapes_root, split)[:n]
    small_val, big_val = (sorted(d.glob("*.jpg")) for d in (tmp_path / "a" / "val", shapes_root / "val"))
    assert [p.read_bytes() for p in small_val] == [p.read_bytes() for p in big_val[:3]]


def in_cell(x: float, y: float, cell: str) -> bool:
    """(x, y) lies in the third of the image, both ways, that the grid cell names."""
    (cx, cy), _ = POSITIONS[cell]
    return abs(x - cx) < 1 / 6 and abs(y - cy) < 1 / 6


def test_captions_are_varied_and_true(shapes_root: Path) -> None:
    caps = load(shapes_root, "captions", "train")
    labels = load(shapes_root, "labels", "train")["labels"]
    per_image = dict(zip((img["id"] for img in caps["images"]), captions_by_image(shapes_root, "train")))
    for img in caps["images"]:
        texts, objs = per_image[img["id"]], img["objects"]
        main = objs[0]
        assert 5 <= len(texts) <= 6 and len(set(texts)) == len(texts)
        assert labels[str(img["id"])] == SHAPES.index(main["shape"])
        assert all(main["shape"] in t for t in texts) and any(main["colour"] in t for t in texts)
        assert any(img["background"] in t for t in texts) and any(POSITIONS[main["position"]][1] in t for t in texts)
        assert not any(" a a" in t or " a o" in t or " a i" in t for t in texts)  # articles
        for t in texts:  # every attribute a caption names is one of this image's
            words = t.replace(",", " ").replace(":", " ").split()
            assert {w for w in words if w in COLOURS} <= {o["colour"] for o in objs}, t
            assert {w for w in words if w in SHAPES} <= {o["shape"] for o in objs}, t
            assert {w for w in words if w in SIZES} <= {o["size"] for o in objs}, t
            assert {w for w in words if w in BACKGROUNDS} <= {img["background"]}, t
        for o in objs:  # the cell and size words are exact for the drawn geometry
            assert in_cell(o["x"], o["y"], o["position"]), o
            assert o["radius"] == pytest.approx(SIZES[o["size"]], rel=0.05), o
        if len(objs) == 2:
            assert all(objs[1]["shape"] in t for t in texts)
            assert objs[1]["radius"] < main["radius"]  # the label is the largest object's shape
            assert objs[1]["position"] != main["position"]
            assert math.dist((main["x"], main["y"]), (objs[1]["x"], objs[1]["y"])) > main["radius"] + objs[1]["radius"]
    assert len({img["objects"][0]["shape"] for img in caps["images"]}) >= 5
    assert len({img["background"] for img in caps["images"]}) >= 4
    assert sum(len(img["objects"]) == 2 for img in caps["images"]) >= 5


def test_twins_differ_only_in_their_shapes(shapes_root: Path) -> None:
    """Images 2k and 2k+1 share background, colours, sizes and cells, and differ in the label shape: a negative
    that only the shape tells apart, so a contrastive teacher has to read shapes."""
    images = load(shapes_root, "captions", "train")["images"]
    layouts = set()
    for a, b in zip(images[0::2], images[1::2]):
        slots = [[(o["colour"], o["size"], o["position"]) for o in img["objects"]] for img in (a, b)]
        assert a["background"] == b["background"] and slots[0] == slots[1]
        assert a["objects"][0]["shape"] != b["objects"][0]["shape"]
        assert a["objects"][0]["x"] != b["objects"][0]["x"]  # each image has its own jitter
        layouts.add((a["background"], str(slots[0])))
    assert len(layouts) == len(images) // 2


def test_a_small_second_object_always_fits() -> None:
    """sample_layout relies on it: for every main slot some other cell holds a small object apart from it."""
    for cell in POSITIONS:
        for size in ("medium", "large"):
            main = Slot("red", size, cell)
            assert any(_apart(main, Slot("blue", "small", other)) for other in POSITIONS if other != cell), main
    assert not _apart(Slot("red", "large", "left"), Slot("blue", "small", "centre"))  # adjacent cells would touch


def test_shared_caption_share_on_hand_made_captions() -> None:
    captions = [["a red star", "a blue ring"], ["A red star.", "a green cross"], ["a blue  ring", "a white circle"], []]
    # "a red star" is image 0's and 1's (case and full stop aside), "a blue ring" 0's and 2's: 4 of 6
    assert shared_caption_share(captions) == pytest.approx(4 / 6)
    assert shared_caption_share([["a star", "a star"], ["a ring"]]) == 0.0  # repeated within one image only
    assert shared_caption_share([["a star"], ["a star"]]) == 1.0
    assert shared_caption_share([]) == 0.0 and shared_caption_share([[], []]) == 0.0


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The issue's measurement: a 500-image val split at the default size (~1 s)."""
    root = tmp_path_factory.mktemp("held-out")
    return root, make_shapes(root, 1, 500, seed=0)


def test_held_out_captions_pick_out_their_image(held_out: tuple[Path, dict]) -> None:
    """At most 5% of 500 val captions are word for word another image's caption (was 60%), and none is
    shared by more than two images."""
    root, summary = held_out
    per_image = captions_by_image(root, "val")
    share = shared_caption_share(per_image)
    assert share <= 0.05, share
    assert summary["shared_captions"]["val"] == pytest.approx(share, abs=1e-4)
    owners: dict[str, set[int]] = {}
    for n, texts in enumerate(per_image):
        for t in texts:
            owners.setdefault(t, set()).add(n)
    assert max(len(v) for v in owners.values()) <= 2
    labels = np.bincount(list(load(root, "labels", "val")["labels"].values()), minlength=len(SHAPES))
    assert labels.min() >= 0.6 * 500 / len(SHAPES), labels  # zero-shot classes stay balanced


def test_captions_fit_the_shapes_teachers_context(held_out: tuple[Path, dict]) -> None:
    """No caption is cut by the 32-token text context of shapes-vit (open_clip's tokenizer, SOT and EOT included)."""
    import open_clip

    from kdpipe.weights import resolve_arch

    name = resolve_arch("shapes-vit").open_clip_name
    context = open_clip.get_model_config(name)["text_cfg"]["context_length"]
    texts = [t for caps in captions_by_image(held_out[0], "val") for t in caps]
    lengths = (open_clip.get_tokenizer(name)(texts, context_length=77) != 0).sum(dim=1)
    assert context == 32 and int(lengths.max()) <= context, texts[int(lengths.argmax())]


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
    def at(cell: str) -> Obj:  # the relation comes from the grid cells, not the jittered centres
        return Obj(0, "red", "small", 0.1, 0.5, 0.5, cell, 0.0)

    assert _relation(at("left"), at("right")) == "to the left of"
    assert _relation(at("right"), at("left")) == "to the right of"
    assert _relation(at("top"), at("bottom")) == "above" and _relation(at("bottom left"), at("top left")) == "below"
    assert _relation(at("top left"), at("centre")) == "to the left of"  # a diagonal takes the horizontal word


def test_a_train_only_world(tmp_path: Path) -> None:
    # (its speed, ~1 ms per image on one core, is not asserted here: timings belong in benchmarks/)
    summary = make_shapes(tmp_path, 300, 0, size=64)
    assert summary["images"] == {"train": 300, "val": 0} and not (tmp_path / "val").exists()
    assert len(list((tmp_path / "train").iterdir())) == 300


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
    assert "captions shared with another image: train" in " ".join(ok.output.split()) and "val" in ok.output
    assert len(list((tmp_path / "w" / "val").glob("*.jpg"))) == 2
    assert Image.open(next((tmp_path / "w" / "train").glob("*.jpg"))).size == (32, 32)
