"""Every registry entry is covered: a new teacher config or input kind is tested the moment it is registered.

Students and losses have their own parametrized tests over the whole registry
(tests/test_students.py, tests/test_losses.py). Here: every shipped teacher config loads (random
init, offline), encodes images and texts into its embedding space and fingerprints itself; every
input kind opens its fixture through ``open_source`` and yields decodable, captioned records, and
(slow) goes through every stage: extract with the tiny teacher, fit-whitening, train, eval. A new
input kind without a fixture in ``INPUT_FIXTURES`` fails with a message saying so.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdpipe.cli.main import app
from kdpipe.data import DATASETS, open_source
from kdpipe.teachers import load_teacher
from kdpipe.weights import TEACHERS

from test_data_sources import captioned_csv, write_flickr, write_tar
from test_labelled_inputs import labelled_folder, write_cifar
from test_table_inputs import shapes_records, write_hf_disk, write_hf_parquet, write_img2dataset

InputFixture = tuple[str, dict[str, Any]]  # a spec and open_source's keyword arguments (extract's flags)


def _coco(shapes_root: Path, tmp_path: Path) -> InputFixture:
    return str(shapes_root), {}


def _csv(shapes_root: Path, tmp_path: Path) -> InputFixture:
    val = captioned_csv(tmp_path / "csv", "val.tsv", 6, first=100, sep="\t")
    return str(captioned_csv(tmp_path / "csv", "train.csv", 24)), {"val_data": str(val)}


def _flickr(shapes_root: Path, tmp_path: Path) -> InputFixture:
    images, split_file = write_flickr(tmp_path / "flickr", {"train": list(range(20)), "val": [20, 21, 22, 23],
                                                            "test": [24, 25]})
    return str(images), {"split_file": str(split_file)}


def _wds(shapes_root: Path, tmp_path: Path) -> InputFixture:
    for shard in range(4):
        write_tar(tmp_path / f"shard-{shard:05d}.tar", 100 * shard, 12)
    return str(tmp_path / "shard-{00000..00003}.tar"), {"val_fraction": 0.25}


def _parquet(shapes_root: Path, tmp_path: Path) -> InputFixture:
    # train/ in HF's layout (every caption of an image in a list: enough rows to whiten 32-dim text),
    # val/ in img2dataset's (one caption a row): both layouts in one input
    write_hf_parquet(tmp_path / "parquet" / "train" / "00000.parquet", shapes_records(shapes_root, "train", 24))
    write_img2dataset(tmp_path / "parquet" / "val" / "00000.parquet", shapes_records(shapes_root, "val", 6))
    return str(tmp_path / "parquet"), {}


def _hf(shapes_root: Path, tmp_path: Path) -> InputFixture:
    splits = {"train": shapes_records(shapes_root, "train", 24), "validation": shapes_records(shapes_root, "val", 6)}
    return str(write_hf_disk(tmp_path / "saved", splits)), {}


# input kind -> a builder of a small input of that kind, with a held-out split; fit-whitening
# needs more train rows (images x views, captions) than the tiny teacher's 32 dimensions
def _imagefolder(shapes_root: Path, tmp_path: Path) -> InputFixture:
    return str(labelled_folder(tmp_path / "folder", train=8, val=2)), {}  # 2 captions per image


def _cifar(shapes_root: Path, tmp_path: Path) -> InputFixture:
    return str(write_cifar(tmp_path / "cifar", "cifar10", train_per_file=4, test=4)), {}


INPUT_FIXTURES: dict[str, Callable[[Path, Path], InputFixture]] = {
    "cifar": _cifar, "coco": _coco, "csv": _csv, "flickr": _flickr, "hf": _hf, "imagefolder": _imagefolder,
    "parquet": _parquet, "wds": _wds}


def _fixture(kind: str, shapes_root: Path, tmp_path: Path) -> InputFixture:
    assert kind in INPUT_FIXTURES, f"input kind {kind!r} has no fixture: add a builder to INPUT_FIXTURES"
    return INPUT_FIXTURES[kind](shapes_root, tmp_path)


@pytest.mark.parametrize("kind", DATASETS.names())
def test_every_input_kind_opens_its_fixture(kind: str, shapes_root: Path, tmp_path: Path) -> None:
    spec, options = _fixture(kind, shapes_root, tmp_path)
    source = open_source(spec, **options)
    assert source.name == kind and "val" in source.splits()
    split = source.splits()[0]
    records = [r for unit in source.units(split) for r in unit.records()]
    assert records and all(r.captions for r in records if r.path or r.data)
    first = next(r for r in records if r.path or r.data)
    image = Image.open(first.path) if first.path else Image.open(io.BytesIO(first.data))
    assert min(image.size) > 0


def _flags(options: dict[str, Any]) -> list[str]:
    return [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def _invoke(args: list[Any]) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", DATASETS.names())
def test_every_input_kind_goes_through_every_stage(kind: str, shapes_root: Path, tmp_path: Path) -> None:
    """extract (tiny teacher) -> fit-whitening -> train (tiny student) -> eval, unchanged for every kind:
    the held-out split is extracted, validated on while training and scored by eval."""
    spec, options = _fixture(kind, shapes_root, tmp_path)
    cache, run = tmp_path / "cache", tmp_path / "run"
    _invoke(["extract", "--teacher", "tiny-clip", "--data", spec, "--out", cache, "--views", "2", "--store-size", "32",
             "--shard-size", "8", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--no-prompts",
             *_flags(options)])
    splits = json.loads((cache / "manifest.json").read_text())["splits"]
    assert splits["train"]["count"] >= 6 and splits["val"]["count"] >= 2, splits
    _invoke(["fit-whitening", cache])
    assert (cache / "whitening.h5").is_file()
    _invoke(["train", "--student", "tiny", "--cache", cache, "--out", run, "--max-steps", "2", "--batch-size", "4",
             "--workers", "0", "--device", "cpu", "--no-progress", "--val-every", "2", "--warmup-steps", "0",
             "--bn-samples", "4"])
    val_rows = [row for line in (run / "metrics.jsonl").read_text().splitlines()
                if (row := json.loads(line))["kind"] == "val"]
    assert val_rows and all(math.isfinite(v) for v in val_rows[-1].values() if isinstance(v, float))
    _invoke(["eval", run, "--device", "cpu", "--no-progress"])
    report = json.loads((run / "eval.json").read_text())
    assert report["split"] == "val" and report["dataset"]["split"] == "val"
    recall = {k: v for k, v in report["metrics"].items() if "R@1" in k or "r@1" in k.lower()}
    assert recall and all(0 <= v["student"] <= 1 and 0 <= v["teacher"] <= 1 for v in recall.values()), report


@pytest.mark.parametrize("name", TEACHERS.names())
def test_every_shipped_teacher_loads_encodes_and_fingerprints(name: str) -> None:
    teacher = load_teacher(name, allow_random_init=True)
    size = teacher.fingerprint["preprocess"]["size"]
    with torch.no_grad():
        img = teacher.encode_images(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
        txt = teacher.encode_texts(["a photo of a red circle", "a blue square"])
    assert img.shape == txt.shape == (2, teacher.embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert teacher.fingerprint["name"] == name and teacher.fingerprint["embed_dim"] == teacher.embed_dim
