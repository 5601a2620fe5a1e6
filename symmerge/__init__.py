"""symmerge: align transformer checkpoints through the symmetries of their parameter space, then merge them.

    >>> import symmerge
    >>> result = symmerge.align(reference_model, other_model, symmetries="ffn,qk,vo,scale,heads")
    >>> result.state_dict, result.report.relative_after

The flow is spec (what moves) → groups (how it moves) → match (which element) → alignment → merge → evaluate;
docs/DESIGN.md explains each layer and its math.
"""

from symmerge._version import __version__
from symmerge.alignment import Alignment, AlignmentReport, ManyAlignment, align, align_many, apply_random_symmetry
from symmerge.errors import SymmergeError
from symmerge.groups import SYMMETRY_CLASSES, ModelTransform, apply_transform, random_transform
from symmerge.match import state_distance
from symmerge.spec import ModelSpec, spec_for

__all__ = [
    "Alignment", "AlignmentReport", "ManyAlignment", "ModelSpec", "align_many", "ModelTransform", "SYMMETRY_CLASSES", "SymmergeError", "__version__", "align",
    "apply_random_symmetry", "apply_transform", "random_transform", "spec_for", "state_distance",
]
