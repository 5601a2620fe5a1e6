"""Third-party modules imported on first use, so that a command pays only for the libraries it touches.

``import transformers`` costs about 1 s and ``import scipy.optimize`` about 0.4 s on the development machine
(``python -X importtime``), more than a TIES merge of two 168M models spends merging; most commands never call
either (a ``merge`` with ``alignment: none``, ``inspect``, ``--help``). A module bound with :func:`lazy_module` is a
stand-in whose first attribute access imports the real module; later accesses go straight to it.

Only *third-party* libraries are deferred this way: symmerge's own modules import each other at the top, so the
import graph that import-linter checks (``pyproject.toml``) stays the real one (``tests/test_layout.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


class LazyModule(types.ModuleType):
    """Stands in for the module ``name`` until an attribute is read; then imports it and forwards to it."""

    def __init__(self, name: str):
        super().__init__(name, f"{name} (imported on first use)")
        self.__dict__["_lazy_module"] = None

    def _load(self) -> types.ModuleType:
        module = self.__dict__["_lazy_module"]
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_lazy_module"] = module
        return module

    def __getattr__(self, attr: str):  # called only for attributes this stand-in lacks, i.e. all of the module's
        return getattr(self._load(), attr)

    def __dir__(self):
        return dir(self._load())

    def __repr__(self) -> str:
        state = "loaded" if self.__dict__["_lazy_module"] is not None else "not loaded yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_module(name: str) -> types.ModuleType:
    """The module ``name`` itself when it is already imported, else a :class:`LazyModule` for it. The name must
    exist (checked without importing it, so a missing dependency still fails at import time with its usual error)."""
    if name in sys.modules:
        return sys.modules[name]
    top = name.partition(".")[0]
    if top not in sys.modules and importlib.util.find_spec(top) is None:
        raise ModuleNotFoundError(f"No module named {top!r}", name=top)
    return LazyModule(name)


__all__ = ["LazyModule", "lazy_module"]
