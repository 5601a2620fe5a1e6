"""What moves: per-architecture symmetry specs (which tensor, which axis, which block, which group)."""

from symmerge.spec.base import (
    TENSOR_GROUPS,
    AttentionGroup,
    FFNGroup,
    ModelSpec,
    Slot,
    StateView,
    check_same_shape,
)
from symmerge.spec.families import (
    REFUSED,
    SPEC_BUILDERS,
    SUPPORTED_FAMILIES,
    FamilyTable,
    spec_for,
)

__all__ = [
    "REFUSED", "SPEC_BUILDERS", "SUPPORTED_FAMILIES", "TENSOR_GROUPS", "AttentionGroup", "FFNGroup", "FamilyTable", "ModelSpec", "Slot",
    "StateView", "check_same_shape", "spec_for",
]
