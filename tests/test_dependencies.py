"""What kdpipe imports is what it declares: every third-party import of `pipeline/` and `cli/` is a
dependency in pyproject.toml (an optional one only when imported inside a function), and nothing
needs Python 3.11's tomllib without the tomli fallback (requires-python is >= 3.10).

Every test imports from an environment where the undeclared package happens to be installed
(huggingface_hub comes with open_clip, braceexpand with webdataset), so only reading the import
statements finds what a user's `pip install kdpipe` may lack.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Iterator

from kdpipe.config import read_toml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("pipeline", "cli")  # installed as kdpipe
EVERY_SOURCE = (*PACKAGE, "tests", "benchmarks")


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them: Pillow, open_clip_torch -> pillow, open-clip-torch."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    """'torch>=2.4', "tomli>=1.1; python_version < '3.11'" -> {'torch', 'tomli'}."""
    return {normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group()) for r in requirements}


def imports(folders: tuple[str, ...]) -> Iterator[tuple[str, int, str, bool]]:
    """(file, line, top-level module, imported inside a function?) for each absolute import statement."""
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            yield from _imports_in(tree, path.relative_to(ROOT).as_posix(), in_function=False)


def _imports_in(node: ast.AST, file: str, in_function: bool) -> Iterator[tuple[str, int, str, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield file, child.lineno, alias.name.split(".")[0], in_function
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            yield file, child.lineno, child.module.split(".")[0], in_function
        inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports_in(child, file, inside)


def distributions(module: str, installed: dict[str, list[str]]) -> set[str]:
    """The distributions that provide top-level ``module`` (its own name when none is installed here)."""
    return {normalise(d) for d in installed.get(module, [module])}


def test_every_third_party_import_is_a_declared_dependency():
    project = read_toml(ROOT / "pyproject.toml")["project"]
    core = requirement_names(project["dependencies"])
    extras = set().union(*(requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()
                           if name != "dev"))  # what a user can ask for; dev is for this repository's tests
    installed = packages_distributions()
    undeclared = []
    for file, line, module, lazy in imports(PACKAGE):
        if module in sys.stdlib_module_names or module == "kdpipe":
            continue
        allowed = core | extras if lazy else core  # an optional package is imported where it is used
        if not distributions(module, installed) & allowed:
            where = "a dependency or an extra" if lazy else "a dependency (imported at module level)"
            undeclared.append(f"{file}:{line} imports {module}, not {where} in pyproject.toml")
    assert not undeclared, "\n".join(undeclared)


def test_the_scan_sees_lazy_and_guarded_imports():
    """The walk above finds what it must judge: a function's optional import and a try/except fallback."""
    found = {(file, module): lazy for file, _, module, lazy in imports(PACKAGE)}
    assert found[("pipeline/measure.py", "onnxruntime")] is True
    assert found[("pipeline/weights.py", "huggingface_hub")] is False
    assert found[("pipeline/config.py", "tomli")] is False


def test_tomllib_is_imported_only_with_the_tomli_fallback():
    """Python 3.10 has no tomllib: each `import tomllib` sits in a try whose handler imports tomli."""
    bare = []
    for folder in EVERY_SOURCE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _falls_back_to_tomli(t)
                       for stmt in t.body for n in ast.walk(stmt)}
            bare += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree) if _imports_tomllib(n)
                     and id(n) not in guarded]
    assert not bare, f"import tomllib without `except ModuleNotFoundError: import tomli as tomllib`: {bare}"


def _imports_tomllib(node: ast.AST) -> bool:
    return (isinstance(node, ast.Import) and any(a.name == "tomllib" for a in node.names)) or (
        isinstance(node, ast.ImportFrom) and node.module == "tomllib")


def _falls_back_to_tomli(node: ast.Try) -> bool:
    return any(isinstance(n, ast.Import) and any(a.name == "tomli" for a in n.names)
               for handler in node.handlers for n in ast.walk(handler))


def test_every_source_file_parses_as_python_3_10():
    """requires-python says 3.10: no syntax newer than it (``except*``, ``type X = ...``, PEP 695 generics).
    (The grammar only: what the standard library offers is covered by the tomllib check above.)"""
    assert read_toml(ROOT / "pyproject.toml")["project"]["requires-python"] == ">=3.10"
    newer = []
    for folder in ("pipeline", "cli", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            try:
                ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
            except SyntaxError as err:
                newer.append(f"{path.relative_to(ROOT)}:{err.lineno}: {err.msg}")
    assert not newer, "\n".join(newer)
