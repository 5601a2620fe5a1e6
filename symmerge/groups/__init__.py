"""How it moves: group actions on canonical tensors, whole-model transforms, and random group elements.

A :class:`ModelTransform` maps each group of a :class:`~symmerge.spec.ModelSpec` to one element: an FFN
permutation (index vector) or a :class:`HeadTransform`. ``apply_transform`` is function-preserving by
construction for every element, which the test suite proves per family.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from symmerge.errors import SymmergeError
from symmerge.groups.ffn import FFNTensors, permute_ffn, read_ffn, write_ffn
from symmerge.groups.heads import (
    HeadTensors, HeadTransform, group_permutation, plane_rotation_matrix, read_heads, rope_planes, transform_heads, write_heads,
)
from symmerge.groups.residual import apply_residual, fold_norms, random_residual
from symmerge.spec.base import AttentionGroup, FFNGroup, ModelSpec, ResidualGroup, StateView

SYMMETRY_CLASSES = ("ffn", "qk", "vo", "scale", "heads", "residual")
"""ffn: FFN neuron permutation; qk / vo: per-head rotations; scale: per-head QK and VO rescaling (of whichever of
qk / vo is on, or both when neither is); heads: head permutation (whole Q, K, V, O head blocks together);
residual: one orthogonal map of the residual stream shared by all layers (norms folded first)."""

PER_LAYER_CLASSES = SYMMETRY_CLASSES[:5]
"""What ``all`` means: every per-layer class. ``residual`` is opt-in, since folding the norms rewrites the
parametrisation of every model involved (gains become 1, a tied LM head is untied)."""


def parse_symmetries(value: str | Iterable[str] | None) -> frozenset[str]:
    """``"ffn,qk,vo"`` / ``["ffn", "qk"]`` / ``"all"`` / ``"none"`` → a validated set of class names."""
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


def require_residual(spec: ModelSpec) -> ResidualGroup:
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


def apply_to_group(view: StateView, group: FFNGroup | AttentionGroup, transform: ModelTransform) -> None:
    """Apply ``transform``'s element for ``group`` (if it has one) to the tensors in ``view``."""
    if isinstance(group, FFNGroup):
        if group.name in transform.ffn:
            write_ffn(view, group, permute_ffn(read_ffn(view, group), transform.ffn[group.name]))
    elif group.name in transform.heads:
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


def random_orthogonal(n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed elements of O(n) (reflections included): QR of a Gaussian with the sign fix."""
    q, r = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def random_plane_rotation(head_dim: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Random rotations of each RoPE plane ``(i, i + d_h/2)`` (no reflections: they do not commute with RoPE)."""
    angles = torch.rand(batch, head_dim // 2, generator=generator, dtype=torch.float64) * 2 * math.pi
    return plane_rotation_matrix(torch.cos(angles), torch.sin(angles))


def random_transform(spec: ModelSpec, symmetries: str | Iterable[str] | None = "all", seed: int = 0,
                     max_scale: float = 2.0) -> ModelTransform:
    """A seeded random element of the chosen symmetry classes (scales log-uniform in [1/max_scale, max_scale])."""
    chosen = parse_symmetries(symmetries)
    g = torch.Generator().manual_seed(seed)
    out = ModelTransform()
    if "residual" in chosen:
        out.residual = random_residual(require_residual(spec), g)
    if "ffn" in chosen:
        out.ffn = {grp.name: torch.randperm(grp.width, generator=g) for grp in spec.ffn}
    if chosen & {"qk", "vo", "scale", "heads"}:
        for grp in spec.attention:
            h, kv, dh = grp.num_heads, grp.kv_heads, grp.head_dim
            r = h // kv
            x = HeadTransform.identity(h, dh, torch.float64, kv)
            log_max = math.log(max_scale)

            def scales(n: int) -> torch.Tensor:
                return torch.exp((torch.rand(kv, n, generator=g, dtype=torch.float64) * 2 - 1) * log_max)

            if "heads" in chosen:
                x.kv_perm = torch.randperm(kv, generator=g)
                within = torch.stack([torch.randperm(r, generator=g) for _ in range(kv)])
                x.perm = group_permutation(x.kv_perm, within, r)
            if "qk" in chosen and not grp.qk_fixed:
                x.qk_rotation = random_plane_rotation(dh, kv, g) if grp.rope else random_orthogonal(dh, kv, g)
            if "vo" in chosen:
                x.vo_rotation = random_orthogonal(dh, kv, g)
            if "scale" in chosen:
                # one scale per head, or per rotary plane under RoPE (each plane's score term is preserved alone)
                if not grp.qk_fixed:  # per-head q/k norms: no QK rescaling is a symmetry
                    x.qk_scale = scales(dh // 2).repeat(1, 2) if grp.rope else scales(1).expand(kv, dh).clone()
                x.vo_scale = scales(1).expand(kv, dh).clone()
            out.heads[grp.name] = x
    return out


__all__ = [
    "PER_LAYER_CLASSES", "SYMMETRY_CLASSES", "FFNTensors", "HeadTensors", "HeadTransform", "ModelTransform", "apply_to_group", "apply_transform",
    "group_permutation", "parse_symmetries", "random_orthogonal", "random_transform", "read_ffn", "read_heads", "rope_planes",
]
