"""Every registry entry is covered: a new teacher config or input kind is tested the moment it is registered.

Students and losses have their own parametrized tests over the whole registry
(tests/test_students.py, tests/test_losses.py). Here: every shipped teacher config loads (random
init, offline), encodes images and texts into its embedding space and fingerprints itself; every
input kind opens its fixture through ``open_source`` and yields decodable, captioned records. A
new input kind without a fixture in ``INPUT_FIXTURES`` fails with a message saying so.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from kdpipe.data import DATASETS, open_source
from kdpipe.teachers import load_teacher
from kdpipe.weights import TEACHERS

from test_data_sources import write_tar
from test_table_inputs import shapes_records, write_hf_disk, write_img2dataset


def _coco(shapes_root: Path, tmp_path: Path) -> str:
    return str(shapes_root)


def _wds(shapes_root: Path, tmp_path: Path) -> str:
    write_tar(tmp_path / "shard-00000.tar", 0, 6)
    return str(tmp_path / "shard-00000.tar")


def _parquet(shapes_root: Path, tmp_path: Path) -> str:
    return str(write_img2dataset(tmp_path / "00000.parquet", shapes_records(shapes_root, "train", 6)))


def _hf(shapes_root: Path, tmp_path: Path) -> str:
    return str(write_hf_disk(tmp_path / "saved", {"train": shapes_records(shapes_root, "train", 6)}))


# input kind -> a builder of a small input of that kind (a spec `open_source` accepts)
INPUT_FIXTURES: dict[str, Callable[[Path, Path], str]] = {"coco": _coco, "wds": _wds, "parquet": _parquet, "hf": _hf}


@pytest.mark.parametrize("kind", DATASETS.names())
def test_every_input_kind_opens_its_fixture(kind: str, shapes_root: Path, tmp_path: Path) -> None:
    assert kind in INPUT_FIXTURES, f"input kind {kind!r} has no fixture: add a builder to INPUT_FIXTURES"
    source = open_source(INPUT_FIXTURES[kind](shapes_root, tmp_path))
    assert source.name == kind
    split = source.splits()[0]
    records = [r for unit in source.units(split) for r in unit.records()]
    assert records and all(r.captions for r in records if r.path or r.data)
    first = next(r for r in records if r.path or r.data)
    image = Image.open(first.path) if first.path else Image.open(io.BytesIO(first.data))
    assert min(image.size) > 0


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
