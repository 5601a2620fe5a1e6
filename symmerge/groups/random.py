"""Random group elements, seeded: the scrambles that function-preservation and recovery tests (and demos) use."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch

from symmerge.groups.heads import (
    HeadTransform,
    group_permutation,
    plane_rotation_matrix,
    rope_order,
    rope_rotation,
)
from symmerge.groups.residual import embed_centered
from symmerge.groups.transform import ModelTransform, parse_symmetries, require_residual
from symmerge.spec.base import AttentionGroup, ModelSpec, ResidualGroup


def random_orthogonal(n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed elements of O(n) (reflections included): QR of a Gaussian with the sign fix."""
    q, r = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def random_plane_rotation(head_dim: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Random rotations of each RoPE plane ``(i, i + d_h/2)`` (no reflections: they do not commute with RoPE)."""
    angles = torch.rand(batch, head_dim // 2, generator=generator, dtype=torch.float64) * 2 * math.pi
    return plane_rotation_matrix(torch.cos(angles), torch.sin(angles))


def random_rope_rotation(group: AttentionGroup, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Random elements of a RoPE head's QK rotation group: a rotation of each rotary plane (in the group's layout)
    and, with partial rotary, a Haar element of O(d_h − r) on the unrotated dimensions."""
    dh, rotated = group.head_dim, group.rotated_dims
    angles = torch.rand(batch, rotated // 2, generator=generator, dtype=torch.float64) * 2 * math.pi
    free = random_orthogonal(dh - rotated, batch, generator) if rotated < dh else None
    return rope_rotation(torch.cos(angles), torch.sin(angles), free, dh, group.rotary_dim, group.rope_interleaved)


def rope_scale(group: AttentionGroup, scales: torch.Tensor) -> torch.Tensor:
    """(B, d_h) QK scales from one scale per rotary plane and, with partial rotary, one more for the unrotated
    dimensions ((B, r/2 [+ 1]), in that order)."""
    dh, rotated = group.head_dim, group.rotated_dims
    canonical = scales[:, : rotated // 2].repeat(1, 2)
    if rotated < dh:
        canonical = torch.cat([canonical, scales[:, -1:].expand(-1, dh - rotated)], 1)
    out = torch.empty_like(canonical)
    out[:, rope_order(dh, group.rotary_dim, group.rope_interleaved)] = canonical
    return out


def random_transform(spec: ModelSpec, symmetries: str | Iterable[str] | None = "all", seed: int = 0,
                     max_scale: float = 2.0) -> ModelTransform:
    """A seeded random element of the chosen symmetry classes (scales log-uniform in [1/max_scale, max_scale])."""
    chosen = parse_symmetries(symmetries)
    try:  # torch's own message names neither the argument nor the call
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r:.40}") from None
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
                x.qk_rotation = random_rope_rotation(grp, kv, g) if grp.rope else random_orthogonal(dh, kv, g)
            if "vo" in chosen:
                x.vo_rotation = random_orthogonal(dh, kv, g)
            if "scale" in chosen:
                # one scale per head, or per rotary plane under RoPE (each plane's score term is preserved alone) and
                # one for the unrotated dimensions of partial rotary
                if not grp.qk_fixed:  # per-head q/k norms: no QK rescaling is a symmetry
                    planes = grp.rotated_dims // 2 + (grp.rotated_dims < dh)
                    x.qk_scale = rope_scale(grp, scales(planes)) if grp.rope else scales(1).expand(kv, dh).clone()
                x.vo_scale = scales(1).expand(kv, dh).clone()
            out.heads[grp.name] = x
    return out


def random_residual(residual: ResidualGroup, generator: torch.Generator) -> torch.Tensor:
    d = residual.width
    if residual.kind == "permutation":
        return torch.eye(d, dtype=torch.float64)[:, torch.randperm(d, generator=generator)]
    if residual.kind == "centered":
        return embed_centered(random_orthogonal(d - 1, 1, generator)[0])
    return random_orthogonal(d, 1, generator)[0]
