"""The package's shape: no import hides inside a function (outside the CLI, which keeps start-up fast), so the
import graph that import-linter checks is the real one; and the module names do not shadow the API's functions."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import symmerge

PACKAGE = Path(symmerge.__file__).parent


def imports_inside_functions(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """``file:line`` (relative to ``root``) of every import statement nested in a function body."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    found.append(f"{path.relative_to(root)}:{inner.lineno}")
    return found


def test_no_import_inside_a_function_outside_the_cli():
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) if p.name != "cli.py" for hit in imports_inside_functions(p)]
    assert offenders == []


def test_the_check_finds_a_nested_import(tmp_path):
    """Negative control: the AST walk does see an import inside a function."""
    f = tmp_path / "probe.py"
    f.write_text("import sys\n\ndef f():\n    import os\n    return os\n")
    assert imports_inside_functions(f, tmp_path) == ["probe.py:4"]


def test_align_is_a_function_and_alignment_its_module():
    assert callable(symmerge.align) and importlib.import_module("symmerge.alignment").align is symmerge.align
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("symmerge.align")
