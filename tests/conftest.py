"""Shared fixtures: tiny shapes worlds generated once per test session; tiny-clip's cache of one, and
the same cache with a second teacher added."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cache_factory import add_teacher_b, teacher_b_config, tiny_extract, tiny_world as make_tiny_world
from kdpipe.data.shapes import make_shapes

SHAPES_TRAIN, SHAPES_VAL, SHAPES_SIZE = 24, 12, 64


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes world in COCO layout: 24 train + 12 val images at 64 px, seed 0. Treat as read-only."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, SHAPES_TRAIN, SHAPES_VAL, size=SHAPES_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cache_factory.tiny_world``: 20 train + 6 val shapes at 64 px, seed 3. Treat as read-only."""
    return make_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def tiny_cache(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-clip's cache of ``tiny_world`` (``cache_factory.tiny_extract``: 3 views, shards of 8, prompts.h5).
    Read-only: copy it before changing anything (a re-run of the same extract is a no-op)."""
    return tiny_extract(tiny_world, tmp_path_factory.mktemp("tiny_cache") / "c")


@pytest.fixture(scope="session")
def one_teacher_cache(tiny_cache: Path) -> Path:
    """``tiny_cache`` under the name the several-teacher tests use (format 1: one teacher). Read-only."""
    return tiny_cache


@pytest.fixture(scope="session")
def two_teacher_cache(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_cache`` with teacher "b" (tiny-clip at 48 px, D = 24) added, with its own prompts.h5. Read-only."""
    root = tmp_path_factory.mktemp("two_teachers")
    out = root / "c"
    shutil.copytree(tiny_cache, out)
    add_teacher_b(out, teacher_b_config(root / "b.json"), prompts=True)
    return out


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its models are tiny, and on a shared 2-core machine extra OpenMP threads only wait on each other."""
    from kdpipe.runtime import torch_threads  # noqa: PLC0415  (torch: only the tests that use it)

    with torch_threads(1):
        yield
