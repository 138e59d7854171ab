"""Shared fixtures: a tiny shapes world generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe.data.shapes import make_shapes

SHAPES_TRAIN, SHAPES_VAL, SHAPES_SIZE = 24, 12, 64


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes world in COCO layout: 24 train + 12 val images at 64 px, seed 0. Treat as read-only."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, SHAPES_TRAIN, SHAPES_VAL, size=SHAPES_SIZE, seed=0)
    return root
