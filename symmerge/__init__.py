"""symmerge: align transformer checkpoints through the symmetries of their parameter space, then merge them.

    >>> import symmerge
    >>> result = symmerge.align(reference_model, other_model, symmetries="ffn,qk,vo,scale,heads")
    >>> result.state_dict, result.report.relative_after

The flow is spec (what moves) → groups (how it moves) → match (which element) → merge.
"""

from symmerge.align import Alignment, AlignmentReport, align, state_distance
from symmerge.errors import SymmergeError
from symmerge.groups import SYMMETRY_CLASSES, ModelTransform, apply_transform, random_transform
from symmerge.spec import ModelSpec, spec_for

__version__ = "0.1.0"


def apply_random_symmetry(model, *, symmetries="all", seed: int = 0, config=None, max_scale: float = 2.0):
    """A seeded random element of the chosen symmetry classes applied to ``model`` (a module or a state dict with
    ``config``): a new state dict that computes exactly the same function. For tests and demos."""
    from symmerge.align import as_state_and_config

    state, cfg = as_state_and_config(model, config)
    if cfg is None:
        raise SymmergeError("pass the model's config to scramble a plain state dict")
    spec = spec_for(cfg, state.keys())
    return apply_transform(state, spec, random_transform(spec, symmetries, seed=seed, max_scale=max_scale))


__all__ = [
    "Alignment", "AlignmentReport", "ModelSpec", "ModelTransform", "SYMMETRY_CLASSES", "SymmergeError", "align",
    "apply_random_symmetry", "apply_transform", "random_transform", "spec_for", "state_distance",
]
