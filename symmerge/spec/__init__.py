"""What moves: per-architecture symmetry specs (which tensor, which axis, which block, which group), families as
tables of tensor-name templates, and the checks that two checkpoints share one spec."""

from symmerge.spec.base import TENSOR_GROUPS, AttentionGroup, FFNGroup, ModelSpec, Norm, ResidualGroup, Slot, StateView
from symmerge.spec.compat import (
    check_compatible,
    check_compatible_shapes,
    check_embeddable,
    check_floating,
    check_same_shape,
    config_differences,
    lent_head,
    resized_keys,
    tied_head,
    untied_head,
    widths_differ,
)
from symmerge.spec.families import REFUSED, SPEC_BUILDERS, SUPPORTED_FAMILIES, FamilyTable, spec_for
from symmerge.spec.layers import LAYER_COUNT_KEYS, infer_layers, layer_structure
from symmerge.spec.modules import (
    MODULAR_ARCHITECTURES,
    Module,
    architecture_name,
    module_keys,
    module_layers,
    module_of,
    modules_of,
    stated_depth,
)

__all__ = [
    "LAYER_COUNT_KEYS", "REFUSED", "SPEC_BUILDERS", "SUPPORTED_FAMILIES", "TENSOR_GROUPS", "AttentionGroup", "FFNGroup", "FamilyTable", "ModelSpec",
    "Norm", "ResidualGroup", "Slot", "StateView", "check_compatible", "check_compatible_shapes", "check_same_shape", "check_embeddable", "check_floating",
    "config_differences", "resized_keys", "widths_differ",
    "infer_layers", "layer_structure", "spec_for",
    "MODULAR_ARCHITECTURES", "Module", "architecture_name", "module_keys", "module_layers", "module_of", "modules_of", "stated_depth",
    "lent_head", "tied_head", "untied_head",
]
