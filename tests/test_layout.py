"""The repository's layout rules: what may import what, and what the wheel ships."""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_FILES = sorted((REPO_ROOT / "bench").glob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Every module named by an import statement in ``path``, at any depth."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # bench/ is no package: a relative import could only reach tests/
                names.append("." * node.level + (node.module or ""))
            elif node.module is not None:
                names.append(node.module)
    return names


def test_bench_files_exist() -> None:
    assert BENCH_FILES, "no bench/*.py found"


@pytest.mark.parametrize("path", BENCH_FILES, ids=[p.name for p in BENCH_FILES])
def test_bench_does_not_import_tests(path: Path) -> None:
    """Benchmarks take their servers and data from devtools/, never from tests/."""
    offending = [
        name
        for name in imported_modules(path)
        if name == "tests" or name.startswith(("tests.", "."))
    ]
    assert not offending, f"{path.relative_to(REPO_ROOT)} imports {offending}"


def test_devtools_is_not_in_the_wheel() -> None:
    """devtools/ starts throwaway servers: it must never be a package of the distribution."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    include = find.get("include", ["*"])
    assert include, "an empty include list would pick up every package"
    matching = [pattern for pattern in include if fnmatch.fnmatchcase("devtools", pattern)]
    assert not matching, f"devtools matches {matching} in [tool.setuptools.packages.find]"
