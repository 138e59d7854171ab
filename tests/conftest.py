"""Shared fixtures: a tiny shapes world generated once per test session; caches of one and two teachers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cache_factory import add_teacher_b, extract_cfg, teacher_b_config
from kdpipe.data.shapes import make_shapes

SHAPES_TRAIN, SHAPES_VAL, SHAPES_SIZE = 24, 12, 64


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes world in COCO layout: 24 train + 12 val images at 64 px, seed 0. Treat as read-only."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, SHAPES_TRAIN, SHAPES_VAL, size=SHAPES_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def teacher_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes world of 20 train + 6 val images at 64 px, seed 3 (the several-teacher caches' input)."""
    root = tmp_path_factory.mktemp("teacher_world")
    make_shapes(root, 20, 6, size=64, seed=3)
    return root


@pytest.fixture(scope="session")
def one_teacher_cache(teacher_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-clip's cache of ``teacher_world`` (format 1: 3 views, shards of 8). Treat as read-only."""
    from kdpipe.extract import run  # noqa: PLC0415

    out = tmp_path_factory.mktemp("one_teacher") / "c"
    run(extract_cfg(teacher_world, out))
    return out


@pytest.fixture(scope="session")
def two_teacher_cache(one_teacher_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``one_teacher_cache`` with teacher "b" (tiny-clip at 48 px, D = 24) added. Treat as read-only."""
    root = tmp_path_factory.mktemp("two_teachers")
    out = root / "c"
    shutil.copytree(one_teacher_cache, out)
    add_teacher_b(out, teacher_b_config(root / "b.json"))
    return out
