"""The built wheel holds every module of the source tree, under the `kdpipe` name.

pyproject.toml maps folders to import names (`pipeline/` -> `kdpipe`, `cli/` -> `kdpipe.cli`) and
lists the packages explicitly, so a new sub-package left out of that list would pass every other
test (they import from the source tree) and be missing from what users install.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pipeline": "kdpipe", "cli": "kdpipe/cli"}


def expected_members() -> set[str]:
    """Wheel paths of every .py and shipped .json file in the source folders."""
    members = set()
    for folder, prefix in SOURCES.items():
        for path in (ROOT / folder).rglob("*"):
            if "__pycache__" in path.parts or path.suffix not in (".py", ".json"):
                continue
            rel = path.relative_to(ROOT / folder)
            if folder == "pipeline" and rel.parts[0] == "cli":
                continue
            members.add(f"{prefix}/{rel.as_posix()}")
    return members


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("kdpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_members()
    assert "kdpipe/model_configs/shapes-vit.json" in expected and "kdpipe/cli/main.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"left out of the wheel (add the package to pyproject's `packages`): {missing}"
    strays = sorted(n for n in names if n.split("/")[0] in ("pipeline", "cli"))
    assert not strays, f"generic top-level names in the wheel: {strays}"
