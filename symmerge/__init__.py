"""symmerge: align transformer checkpoints through the symmetries of their parameter space, then merge them.

    >>> import symmerge
    >>> result = symmerge.align(reference_model, other_model, symmetries="ffn,qk,vo,scale,heads")
    >>> result.state_dict, result.report.relative_after

The flow is spec (what moves) → groups (how it moves) → match (which element) → alignment → merge → evaluate;
docs/DESIGN.md explains each layer and its math.

The names below are resolved on first use (PEP 562 ``__getattr__``): ``import symmerge.errors`` (what the command
line needs to start, and ``symmerge --help``) does not pay for importing torch and every layer.
"""

from __future__ import annotations

import importlib

from symmerge._version import __version__
from symmerge.errors import SymmergeError

#: public name → the module that defines it
_EXPORTS = {
    "Alignment": "symmerge.alignment", "AlignmentReport": "symmerge.alignment", "ManyAlignment": "symmerge.alignment",
    "align": "symmerge.alignment", "align_many": "symmerge.alignment", "apply_random_symmetry": "symmerge.alignment",
    "SYMMETRY_CLASSES": "symmerge.groups", "ModelTransform": "symmerge.groups", "apply_transform": "symmerge.groups",
    "random_transform": "symmerge.groups",
    "state_distance": "symmerge.match",
    "ModelSpec": "symmerge.spec", "spec_for": "symmerge.spec",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'symmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["SymmergeError", "__version__", *_EXPORTS]
