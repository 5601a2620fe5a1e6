"""What moves: per-architecture symmetry specs (which tensor, which axis, which block, which group)."""

from symmerge.spec.base import AttentionGroup, FFNGroup, ModelSpec, Slot, StateView, check_same_shape
from symmerge.spec.families import SPEC_BUILDERS, spec_for

__all__ = ["AttentionGroup", "FFNGroup", "ModelSpec", "Slot", "StateView", "SPEC_BUILDERS", "check_same_shape", "spec_for"]
