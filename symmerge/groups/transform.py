"""Whole-model transforms: the symmetry classes by name, one element per group of a spec, and applying it.

A :class:`ModelTransform` maps each group of a :class:`~symmerge.spec.ModelSpec` to one element: an FFN
permutation (index vector), a :class:`~symmerge.groups.heads.HeadTransform`, and optionally the residual map.
``apply_transform`` is function-preserving by construction for every element, which the test suite proves per
family.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from symmerge.errors import SymmergeError
from symmerge.groups.ffn import embedding, is_identity, permute_ffn, read_ffn, write_ffn
from symmerge.groups.heads import (
    HeadTransform,
    head_blocks,
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
    if value is not None and not isinstance(value, str):  # a list, set or generator (read once: kept as a list)
        items = list(value) if isinstance(value, Iterable) else None
        if items is None or not all(isinstance(v, str) for v in items):
            raise TypeError(f"symmetries must be a string such as 'all,residual' or a list of class names, got {value!r:.80}")
        value = items
    if is_auto(value):
        raise SymmergeError("symmetries auto resolves per model family: pass a spec (resolve_symmetries), or name the classes")
    if value is None or value == "all":
        return frozenset(PER_LAYER_CLASSES)
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if isinstance(value, str) and not names:  # -s "" is a slip (an unset shell variable), not a choice of none
        raise SymmergeError(f"empty symmetries {value!r}: name the classes (e.g. all,residual), none or auto")
    if names in ([], ["none"]):
        return frozenset()
    if AUTO in names:  # is_auto caught auto alone
        raise SymmergeError(f"symmetries {','.join(names)}: auto stands alone (it picks the classes per family); give auto, "
                            "or name the classes (e.g. all,residual)")
    if "all" in names:
        names = [n for n in names if n != "all"] + list(PER_LAYER_CLASSES)
    unknown = [n for n in names if n not in SYMMETRY_CLASSES]
    if unknown:
        raise SymmergeError(f"unknown symmetry {unknown[0]!r}; choose from {', '.join(SYMMETRY_CLASSES)}, all, none or auto")
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
    """One group element per group of a spec (groups left out are the identity).

    ``source``: the spec of the model the element applies to when it is narrower than the reference's (fewer FFN
    neurons or heads): its elements are then semi-permutations into the reference's widths (docs/DESIGN.md §1),
    read through ``source``'s groups and written through the reference's. ``None``: the model has the reference's
    shape."""

    ffn: dict[str, torch.Tensor] = field(default_factory=dict)  # group name → perm (d_ff of the reference,)
    heads: dict[str, HeadTransform] = field(default_factory=dict)  # group name → per-head transform
    residual: torch.Tensor | None = None  # (d, d); applied after folding the norms
    source: ModelSpec | None = None

    def source_group(self, group: FFNGroup | AttentionGroup) -> FFNGroup | AttentionGroup:
        """The model's own group of the reference's ``group`` (the same group unless the model is narrower)."""
        if self.source is None:
            return group
        return next(g for g in self.source.groups() if g.name == group.name)

    def empty_slots(self, group: FFNGroup | AttentionGroup) -> torch.Tensor | None:
        """The neurons (FFN) or query heads (attention) of ``group`` the model leaves empty, as a boolean mask;
        ``None`` when it fills every one."""
        element = self.ffn.get(group.name) if isinstance(group, FFNGroup) else self.heads.get(group.name)
        if element is None:
            return None
        mask = element.empty if isinstance(element, HeadTransform) else element < 0
        return mask if bool(mask.any()) else None


IDENTITY_ATOL = 1e-12
"""A rotation or scale within this of the identity (entry by entry) is the identity: float64 round-off of an SVD or
quartic whose exact answer is the identity (a model matched to a copy of itself). Applying one would move a weight
by ~1e-12 of its row's size: below float32's resolution, except at entries (near) zero."""


def is_identity_heads(x: HeadTransform, atol: float = IDENTITY_ATOL) -> bool:
    """Whether ``x`` is the identity: permutations exactly, rotations and scales within ``atol``."""
    eye = torch.eye(x.qk_rotation.shape[-1], dtype=x.qk_rotation.dtype, device=x.qk_rotation.device)
    return (is_identity(x.perm) and is_identity(x.kv_perm) and all(
        bool(((t - target).abs() <= atol).all()) for t, target in ((x.qk_rotation, eye), (x.vo_rotation, eye), (x.qk_scale, 1), (x.vo_scale, 1))))


def is_identity_element(group: FFNGroup | AttentionGroup, transform: ModelTransform) -> bool:
    """Whether ``transform`` leaves ``group``'s tensors as they are: no element for it, or an identity one."""
    if isinstance(group, FFNGroup):
        return group.name not in transform.ffn or is_identity(transform.ffn[group.name])
    return group.name not in transform.heads or is_identity_heads(transform.heads[group.name])


def apply_to_group(view: StateView, group: FFNGroup | AttentionGroup, transform: ModelTransform) -> None:
    """Apply ``transform``'s element for ``group`` (if it has one) to the tensors in ``view``; a semi-permutation
    grows the tensors to the reference's shape. Nothing when the element is the identity (:func:`is_identity_element`:
    fine-tunes of one base, whose neurons and heads still correspond; a semi-permutation never is one)."""
    if is_identity_element(group, transform):
        return
    source = transform.source_group(group)
    if isinstance(group, FFNGroup):
        if group.name not in transform.ffn:
            return
        out = permute_ffn(read_ffn(view, source), transform.ffn[group.name])
        values = [*zip(group.inputs, out.in_weights), *zip(group.input_biases, out.in_biases), *zip(group.outputs, out.out_weights)]
        if source.width != group.width:
            view.reallocate(values)
        write_ffn(view, group, out)
    elif group.name in transform.heads:
        out = transform_heads(read_heads(view, source), transform.heads[group.name])
        if source.num_heads != group.num_heads:
            view.reallocate(head_blocks(group, out))
        write_heads(view, group, out)


def fill_value(values: list[torch.Tensor], empty: list[torch.Tensor | None], weights: list[float], axis: int = 0) -> list[torch.Tensor]:
    """Each model's tensor with its empty slots (``empty[i]``, a boolean mask along ``axis``; ``None``: none) set to
    the ``weights``-weighted mean of the models that fill that slot. A weighted average of the results then equals,
    slot by slot, the weighted average over the models that have the slot: with ``W_h`` the weight of those that
    have it and ``W_e`` of those that do not, ``(Σ_h w x + W_e x̄) / (W_h + W_e) = x̄`` for ``x̄ = Σ_h w x / W_h``."""
    n = values[0].shape[axis]
    have = torch.stack([torch.ones(n, dtype=torch.bool) if m is None else ~m.cpu() for m in empty]).to(values[0].dtype)  # (models, n)
    w = have * torch.tensor(weights, dtype=values[0].dtype)[:, None]
    shape = [1] * values[0].dim()
    shape[axis] = n
    total = sum(wi.view(shape).to(v.device) * v for wi, v in zip(w, values))
    mean = total / w.sum(0).clamp(min=torch.finfo(values[0].dtype).tiny).view(shape).to(values[0].device)
    return [v if m is None else torch.where(m.view(shape).to(v.device), mean, v) for v, m in zip(values, empty)]


UNMATCHED_RULES = ("mean", "inputs", "zero")
"""What a narrower model contributes to a neuron or head it lacks, in a merge (docs/DESIGN.md §3): ``mean`` fills
both sides of the empty slot (the slot is averaged over the models that have it: kept unchanged for two models);
``inputs`` fills the input side only (W_in rows and biases; Q, K, V), leaving the output side (W_out columns; O
columns) zero, so the slot's contribution to the output is scaled by the weight of the models that have it, as in
an ensemble of the models; ``zero`` fills nothing (both sides averaged with zeros)."""


def fill_empty_slots(states: list[dict[str, torch.Tensor]], group: FFNGroup | AttentionGroup, transforms: list[ModelTransform | None],
                     weights: list[float] | None = None, rule: str = "mean") -> None:
    """Merge semantics for models of different widths (docs/DESIGN.md §3): ``states`` hold one group's tensors of
    every model, aligned into the reference's widths; a narrower model's empty (zero) neurons or heads would
    shrink the average of a slot only the wider models have (both sides halved, for two models). Fill them, in
    place, per ``rule`` (:data:`UNMATCHED_RULES`) with the weighted mean of the models that have the slot
    (:func:`fill_value`): ``mean`` on both sides, so that averaging merges take each slot over the models that have
    it; ``inputs`` on the input side only. Non-positive weights count as equal weights."""
    if rule not in UNMATCHED_RULES:
        raise SymmergeError(f"unmatched must be one of {', '.join(UNMATCHED_RULES)}, got {rule!r}")
    if rule == "zero":
        return
    masks = [None if t is None else t.empty_slots(group) for t in transforms]
    if all(m is None for m in masks):
        return
    w = list(weights) if weights is not None and all(x > 0 for x in weights) else [1.0] * len(states)
    views = [StateView(s) for s in states]
    if isinstance(group, FFNGroup):
        parts = [read_ffn(v, group) for v in views]
        sides = (("in_weights", 0), ("in_biases", 0)) + ((("out_weights", 1),) if rule == "mean" else ())
        for field_name, axis in sides:
            for k in range(len(getattr(parts[0], field_name))):
                filled = fill_value([getattr(p, field_name)[k] for p in parts], masks, w, axis)
                for p, value in zip(parts, filled):
                    getattr(p, field_name)[k] = value
        for v, m, p in zip(views, masks, parts):
            if m is not None:
                write_ffn(v, group, p)
    else:
        heads = [read_heads(v, group) for v in views]
        kv_masks = [None if m is None else t.heads[group.name].kv_perm < 0 for m, t in zip(masks, transforms)]
        sides = (("q", masks), ("q_bias", masks), ("k", kv_masks), ("k_bias", kv_masks), ("v", kv_masks), ("v_bias", kv_masks))
        for name, mask in sides + ((("o", masks),) if rule == "mean" else ()):
            for h, value in zip(heads, fill_value([getattr(h, name) for h in heads], mask, w)):
                setattr(h, name, value)
        for v, m, h in zip(views, masks, heads):
            if m is not None:
                write_heads(v, group, h)
    for s, v, m in zip(states, views, masks):
        if m is not None:
            s.update(v.state)


def after_embedding(embedding: ModelTransform, transform: ModelTransform) -> ModelTransform:
    """``transform``, found for a narrower model already grown by ``embedding`` (:func:`embedding_transform`), as one
    element of the narrow model: slot ``j`` holds ``embedding``'s slot ``transform[j]``, i.e. narrow neuron
    ``embedding[transform[j]]`` (−1 stays −1: a permutation of an embedded model, zero neurons included, is a
    semi-permutation of the narrow one). Rotations, scales and the residual map carry over."""
    ffn = dict(embedding.ffn)
    for name, perm in transform.ffn.items():
        ffn[name] = embedding.ffn[name][perm] if name in embedding.ffn else perm
    heads = dict(embedding.heads)
    for name, x in transform.heads.items():
        e = embedding.heads.get(name)
        heads[name] = x if e is None else replace(x, perm=e.perm[x.perm], kv_perm=e.kv_perm[x.kv_perm])
    return ModelTransform(ffn, heads, transform.residual, embedding.source)


def embedding_transform(reference: ModelSpec, model: ModelSpec) -> ModelTransform:
    """The identity semi-permutation of a narrower ``model`` into ``reference``'s widths: neuron / head ``i`` to slot
    ``i``, the rest empty (zero). What merging models of different widths without alignment means."""
    out = ModelTransform(source=model)
    for group, own in zip(reference.ffn, model.ffn):
        if own.width != group.width:
            out.ffn[group.name] = embedding(own.width, group.width)
    for group, own in zip(reference.attention, model.attention):
        if own.num_heads != group.num_heads:
            out.heads[group.name] = HeadTransform.embedding(own.num_heads, group.num_heads, group.head_dim, own.kv_heads, group.kv_heads)
    return out


def apply_transform(state: Mapping[str, torch.Tensor], spec: ModelSpec, transform: ModelTransform) -> dict[str, torch.Tensor]:
    """A new state dict with ``transform`` applied; tensors no group touches are shared, not copied. ``spec`` is
    the reference's: a narrower model's transform names its own spec (``transform.source``)."""
    if transform.residual is not None and transform.source is not None:
        # a narrower model: grow it by the per-layer elements first, then fold and map the residual stream at the
        # reference's shape. Both orders give the same tensors: the per-layer elements act on the neuron / head
        # axis, norm folding and the residual map on the residual axis (a zero reader row stays zero when folded).
        grown = apply_transform(state, spec, replace(transform, residual=None))
        return apply_transform(grown, spec, ModelTransform(residual=transform.residual))
    if transform.residual is not None:
        residual = require_residual(spec)
        state = apply_residual(fold_norms(state, residual), residual, transform.residual)
    view = StateView(state)
    for group in spec.groups():
        apply_to_group(view, group, transform)
    return dict(view.state)
