"""What moves: per-architecture symmetry specs (which tensor, which axis, which block, which group), and the
checks that two checkpoints share one spec."""

from symmerge.spec.base import AttentionGroup, FFNGroup, ModelSpec, Norm, ResidualGroup, Slot, StateView
from symmerge.spec.compat import check_compatible, check_compatible_shapes, check_same_shape, untied_head
from symmerge.spec.families import SPEC_BUILDERS, spec_for

__all__ = [
    "AttentionGroup", "FFNGroup", "ModelSpec", "Norm", "ResidualGroup", "SPEC_BUILDERS", "Slot", "StateView",
    "check_compatible", "check_compatible_shapes", "check_same_shape", "spec_for", "untied_head",
]
