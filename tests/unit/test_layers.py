"""Layers point one way: what each top-level package may import, read from the source with ``ast``.

``models/`` is the shared base (model families, image preprocessing, the artifact format);
``training/`` and ``services/`` both build on it and meet only through the exported artifact; the load
tools and the tests share ``services/local_server.py`` instead of importing each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in ``path``, including imports inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def offending_imports(package: str, forbidden: set[str]) -> dict[str, list[str]]:
    """``{file: [forbidden packages it imports]}`` over every .py file under ``package``."""
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return {str(path.relative_to(ROOT)): sorted(hits) for path in files
            if (hits := imported_packages(path) & forbidden)}


@pytest.mark.parametrize(("package", "forbidden"), [
    ("training", {"services", "load", "tests"}),
    ("services", {"training", "load", "tests"}),
    ("models", {"training", "services", "load", "tests"}),
    ("load", {"tests"}),
])
def test_package_does_not_import_the_layers_it_must_not(package, forbidden):
    assert offending_imports(package, forbidden) == {}


def test_the_scanner_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import os.path\n\ndef f():\n    from services.artifacts import load_stored_model\n"
                      "    from . import sibling\n")
    assert imported_packages(source) == {"os", "services"}
