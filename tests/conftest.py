"""Shared fixtures: tiny shapes worlds generated once per test session, and tiny-clip's cache of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_factory import tiny_extract, tiny_world as make_tiny_world
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
