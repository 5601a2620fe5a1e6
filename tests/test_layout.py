"""The package's shape: no import hides inside a function (outside the CLI, which keeps start-up fast), so the
import graph that import-linter checks is the real one; and the module names do not shadow the API's functions."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import symmerge
from symmerge.lazy import LazyModule, lazy_module

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


# ------------------------------------------------------------------ start-up cost (symmerge/lazy.py)

def _modules_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    return set(out.stdout.split())


def test_the_command_line_starts_without_torch():
    """``symmerge --help`` and every refusal before work starts must not wait ~2 s for torch (package
    ``__getattr__``)."""
    loaded = _modules_after("import symmerge.cli")
    assert "symmerge" in loaded and "torch" not in loaded and "transformers" not in loaded


def test_a_merge_without_alignment_imports_neither_transformers_nor_scipy():
    """Importing the whole merge and alignment stack leaves transformers (~1 s) and scipy.optimize (~0.4 s)
    unimported until something uses them; the negative control shows the probe does see them."""
    stack = "import symmerge, symmerge.merge.engine, symmerge.alignment, symmerge.evaluate, symmerge.zoo"
    loaded = _modules_after(stack)
    assert "torch" in loaded and "transformers" not in loaded and "scipy" not in loaded
    used = _modules_after(stack + "\nimport symmerge.io.hf as hf\nhf.transformers.AutoConfig")
    assert "transformers" in used


def test_a_lazy_module_is_the_module_once_used():
    sys.modules.pop("colorsys", None)  # a small stdlib module nothing here needs
    lazy = lazy_module("colorsys")
    assert isinstance(lazy, LazyModule) and "colorsys" not in sys.modules  # bound, not imported
    assert lazy.rgb_to_hsv is importlib.import_module("colorsys").rgb_to_hsv
    assert "hls_to_rgb" in dir(lazy) and lazy_module("colorsys") is sys.modules["colorsys"]
    with pytest.raises(ModuleNotFoundError, match="no_such_library_xyz"):
        lazy_module("no_such_library_xyz.sub")
    with pytest.raises(AttributeError):
        symmerge.no_such_name  # noqa: B018
