"""How it moves: group actions on canonical tensors, whole-model transforms, and random group elements.

A :class:`ModelTransform` maps each group of a :class:`~symmerge.spec.ModelSpec` to one element: an FFN
permutation (index vector) or a :class:`HeadTransform`. ``apply_transform`` is function-preserving by
construction for every element, which the test suite proves per family.
"""

from symmerge.groups.ffn import FFNTensors, permute_ffn, read_ffn, write_ffn
from symmerge.groups.heads import (
    HeadTensors,
    HeadTransform,
    group_permutation,
    plane_rotation_matrix,
    read_heads,
    rope_free_dims,
    rope_order,
    rope_planes,
    rope_rotation,
    transform_heads,
)
from symmerge.groups.random import (
    random_orthogonal,
    random_plane_rotation,
    random_residual,
    random_rope_rotation,
    random_transform,
)
from symmerge.groups.residual import apply_residual, fold_norms
from symmerge.groups.transform import (
    AUTO,
    PER_LAYER_CLASSES,
    SYMMETRY_CLASSES,
    UNMATCHED_RULES,
    ModelTransform,
    after_embedding,
    apply_to_group,
    apply_transform,
    embedding_transform,
    fill_empty_slots,
    is_auto,
    parse_symmetries,
    require_residual,
    resolve_symmetries,
)

__all__ = [
    "PER_LAYER_CLASSES", "SYMMETRY_CLASSES", "UNMATCHED_RULES", "FFNTensors", "HeadTensors", "HeadTransform", "ModelTransform", "apply_residual",
    "after_embedding", "apply_to_group", "apply_transform", "embedding_transform", "fill_empty_slots",
    "fold_norms", "group_permutation", "parse_symmetries", "permute_ffn", "resolve_symmetries", "is_auto", "AUTO",
    "plane_rotation_matrix", "random_orthogonal", "random_plane_rotation", "random_residual", "random_rope_rotation",
    "random_transform", "read_ffn", "read_heads", "require_residual", "rope_free_dims", "rope_order", "rope_planes", "rope_rotation",
    "transform_heads", "write_ffn",
]
