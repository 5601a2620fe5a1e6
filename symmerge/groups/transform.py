"""Whole-model transforms: the symmetry classes by name, one element per group of a spec, and applying it.

A :class:`ModelTransform` maps each group of a :class:`~symmerge.spec.ModelSpec` to one element: an FFN
permutation (index vector), a :class:`~symmerge.groups.heads.HeadTransform`, and optionally the residual map.
``apply_transform`` is function-preserving by construction for every element, which the test suite proves per
family.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from symmerge.errors import SymmergeError
from symmerge.groups.ffn import is_identity, permute_ffn, read_ffn, write_ffn
from symmerge.groups.heads import (
    HeadTransform,
    read_heads,
    transform_heads,
    write_heads,
)
from symmerge.groups.residual import apply_residual, fold_norms
from symmerge.spec.base import (
    AttentionGroup,
    FFNGroup,
    ModelSpec,
    ResidualGroup,
    StateView,
)

SYMMETRY_CLASSES = ("ffn", "qk", "vo", "scale", "heads", "residual")
"""ffn: FFN neuron permutation; qk / vo: per-head rotations; scale: per-head QK and VO rescaling (of whichever of
qk / vo is on, or both when neither is); heads: head permutation (whole Q, K, V, O head blocks together);
residual: one orthogonal map of the residual stream shared by all layers (norms folded first)."""

PER_LAYER_CLASSES = SYMMETRY_CLASSES[:5]
"""What ``all`` means: every per-layer class. ``residual`` is opt-in, since folding the norms rewrites the
parametrisation of every model involved (gains become 1, a tied LM head is untied)."""


def parse_symmetries(value: str | Iterable[str] | None) -> frozenset[str]:
    """``"ffn,qk,vo"`` / ``["ffn", "qk"]`` / ``"all"`` / ``"none"`` → a validated set of class names."""
    if is_auto(value):
        raise SymmergeError("symmetries auto resolves per model family: pass a spec (resolve_symmetries), or name the classes")
    if value is None or value == "all":
        return frozenset(PER_LAYER_CLASSES)
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if names in ([], ["none"]):
        return frozenset()
    if "all" in names:
        names = [n for n in names if n != "all"] + list(PER_LAYER_CLASSES)
    unknown = [n for n in names if n not in SYMMETRY_CLASSES]
    if unknown:
        raise SymmergeError(f"unknown symmetry {unknown[0]!r}; choose from {', '.join(SYMMETRY_CLASSES)}, all or none")
    return frozenset(names)


AUTO = "auto"


def is_auto(value: object) -> bool:
    return isinstance(value, str) and value.strip() == AUTO


def resolve_symmetries(value: str | Iterable[str] | None, spec: ModelSpec) -> frozenset[str]:
    """``auto``: every per-layer class, plus the residual map where the family's residual group is a rotation group
    (pre-LN LayerNorm and RMSNorm models; not post-LN, whose residual symmetries are permutations only, nor families
    without one). Anything else: :func:`parse_symmetries`."""
    if is_auto(value):
        residual = spec.residual is not None and spec.residual.kind != "permutation"
        return frozenset(PER_LAYER_CLASSES) | ({"residual"} if residual else frozenset())
    return parse_symmetries(value)


def require_residual(spec: ModelSpec) -> ResidualGroup:
    """The spec's residual group, or a one-line error saying why this model has none."""
    if spec.residual is None and spec.no_residual:
        raise SymmergeError(f"residual-stream alignment is not available for this {spec.family} model: {spec.no_residual}")
    if spec.residual is None:
        raise SymmergeError(
            f"residual-stream alignment is not available for this {spec.family} model: it needs the head that reads the stream "
            "(decoder LMs, ViT image classifiers, BERT/RoBERTa/DeBERTa-v2 sequence classifiers); a bare encoder's output is the stream itself"
        )
    return spec.residual


@dataclass
class ModelTransform:
    """One group element per group of a spec (groups left out are the identity)."""

    ffn: dict[str, torch.Tensor] = field(default_factory=dict)  # group name → perm (d_ff,)
    heads: dict[str, HeadTransform] = field(default_factory=dict)  # group name → per-head transform
    residual: torch.Tensor | None = None  # (d, d); applied after folding the norms


IDENTITY_ATOL = 1e-12
"""A rotation or scale within this of the identity (entry by entry) is the identity: float64 round-off of an SVD or
quartic whose exact answer is the identity (a model matched to a copy of itself). Applying one would move a weight
by ~1e-12 of its row's size: below float32's resolution, except at entries (near) zero."""


def is_identity_heads(x: HeadTransform, atol: float = IDENTITY_ATOL) -> bool:
    """Whether ``x`` is the identity: permutations exactly, rotations and scales within ``atol``."""
    eye = torch.eye(x.qk_rotation.shape[-1], dtype=x.qk_rotation.dtype)
    return (is_identity(x.perm) and is_identity(x.kv_perm) and all(
        bool(((t - target).abs() <= atol).all()) for t, target in ((x.qk_rotation, eye), (x.vo_rotation, eye), (x.qk_scale, 1), (x.vo_scale, 1))))


def is_identity_element(group: FFNGroup | AttentionGroup, transform: ModelTransform) -> bool:
    """Whether ``transform`` leaves ``group``'s tensors as they are: no element for it, or an identity one."""
    if isinstance(group, FFNGroup):
        return group.name not in transform.ffn or is_identity(transform.ffn[group.name])
    return group.name not in transform.heads or is_identity_heads(transform.heads[group.name])


def apply_to_group(view: StateView, group: FFNGroup | AttentionGroup, transform: ModelTransform) -> None:
    """Apply ``transform``'s element for ``group`` to the tensors in ``view``; nothing when it has none or it is the
    identity (:func:`is_identity_element`: fine-tunes of one base, whose neurons and heads still correspond)."""
    if is_identity_element(group, transform):
        return
    if isinstance(group, FFNGroup):
        write_ffn(view, group, permute_ffn(read_ffn(view, group), transform.ffn[group.name]))
    else:
        write_heads(view, group, transform_heads(read_heads(view, group), transform.heads[group.name]))


def apply_transform(state: Mapping[str, torch.Tensor], spec: ModelSpec, transform: ModelTransform) -> dict[str, torch.Tensor]:
    """A new state dict with ``transform`` applied; tensors no group touches are shared, not copied."""
    if transform.residual is not None:
        residual = require_residual(spec)
        state = apply_residual(fold_norms(state, residual), residual, transform.residual)
    view = StateView(state)
    for group in spec.groups():
        apply_to_group(view, group, transform)
    return dict(view.state)
