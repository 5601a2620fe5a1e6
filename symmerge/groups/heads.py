"""Per-head attention symmetries (docs/DESIGN.md §1), for all heads of a layer at once, with GQA/MQA.

Query head ``h`` reads key/value head ``h // r`` (``r = H / H_kv``, HF's ``repeat_kv``). One
:class:`HeadTransform` combines a KV-head permutation (KV head ``g`` of the result is input KV head
``kv_perm[g]``, moving its query group along), a query-head permutation that stays inside each group, and per KV
head ``g``: a QK rotation ``R_g`` with per-dimension scale ``a_g`` and a VO rotation ``S_g`` with scale ``c_g``,
applied to K/V head ``g`` and to every query head of its group:

    W_Q^h → diag(a) R^T W_Q^h    b_Q^h → b_Q^h R diag(a)    W_K → diag(a)^{-1} R^T W_K    b_K → b_K R diag(a)^{-1}
    W_V   → diag(c) S^T W_V      b_V   → b_V S diag(c)      W_O^h → W_O^h S diag(c)^{-1}  (b_O unchanged)

``q k^T`` and ``v W_O^{hT}`` are unchanged because ``R R^T = S S^T = I`` and the diagonal scales cancel (any
diagonal scale is in GL(d_h)). With ``general=True`` (learned matching), ``R`` and ``S`` may be any
invertible matrices ``A``, ``B``: the Q side takes ``A^T``, the K side ``A^{-1}``, the V side ``B^T`` and the
O side ``B^{-T}`` (``q A A^{-1} k^T = q k^T``, ``W_O B^{-T} B^T v = W_O v``): the full GL(d_h) of each KV head.
Under RoPE, ``R`` must be a rotation of each rotary plane and ``a`` constant on it (:func:`rope_planes`); with
partial rotary, the dimensions RoPE leaves alone (:func:`rope_free_dims`) take any orthogonal ``R`` block and one
scale (``q → q A``, ``k → k A^{-T}`` on that block is exact); the spec says which (``AttentionGroup.rope``,
``rotary_dim``, ``rope_interleaved``). :func:`rope_order` lists a head's dimensions as the solvers see them: the
planes' first dimensions, their second ones, then the unrotated ones (:func:`to_rope_order`, :func:`from_rope_order`).

Models of different widths (docs/DESIGN.md §1): ``perm`` and ``kv_perm`` may be *semi-permutations* into more heads
than the input has, ``EMPTY`` (−1) entries being zero heads (zero Q, K, V rows and biases, zero O columns). A zero
head's scores are all 0, so it attends uniformly — to zero values, through zero O columns: it adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from symmerge.groups.ffn import EMPTY, is_identity, take
from symmerge.spec.base import AttentionGroup, Slot, StateView


@dataclass
class HeadTensors:
    """Canonical per-head blocks of one attention layer (missing biases are zeros)."""

    q: torch.Tensor  # (H, d_h, d)
    q_bias: torch.Tensor  # (H, d_h)
    k: torch.Tensor  # (H_kv, d_h, d)
    k_bias: torch.Tensor  # (H_kv, d_h)
    v: torch.Tensor  # (H_kv, d_h, d)
    v_bias: torch.Tensor  # (H_kv, d_h)
    o: torch.Tensor  # (H, d, d_h): head h's columns of W_O

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    def to_device(self, device: torch.device | str) -> HeadTensors:
        """Every block on ``device`` (the same tensors when they are there already)."""
        return HeadTensors(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[1]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class HeadTransform:
    perm: torch.Tensor  # (H,) long: query head h of the result is input query head perm[h]
    kv_perm: torch.Tensor  # (H_kv,) long; perm[h] // r == kv_perm[h // r]
    qk_rotation: torch.Tensor  # (H_kv, d_h, d_h)
    qk_scale: torch.Tensor  # (H_kv, d_h)
    vo_rotation: torch.Tensor  # (H_kv, d_h, d_h)
    vo_scale: torch.Tensor  # (H_kv, d_h)
    general: bool = False  # rotations are any invertible matrices (GL(d_h)): K and O sides use the inverse

    @classmethod
    def identity(cls, num_heads: int, head_dim: int, dtype: torch.dtype = torch.float32, num_kv_heads: int | None = None) -> HeadTransform:
        kv = num_kv_heads or num_heads
        eye = torch.eye(head_dim, dtype=dtype).expand(kv, head_dim, head_dim).clone()
        ones = torch.ones(kv, head_dim, dtype=dtype)
        return cls(torch.arange(num_heads), torch.arange(kv), eye, ones, eye.clone(), ones.clone())

    @classmethod
    def embedding(cls, num_heads_in: int, num_heads: int, head_dim: int, num_kv_heads_in: int | None = None,
                  num_kv_heads: int | None = None, dtype: torch.dtype = torch.float32) -> HeadTransform:
        """The identity semi-permutation of ``num_heads_in`` heads into ``num_heads``: KV head ``g`` to slot ``g``,
        the remaining KV heads (and their query groups) empty; no rotation."""
        kv_in, kv = num_kv_heads_in or num_heads_in, num_kv_heads or num_heads
        x = cls.identity(num_heads, head_dim, dtype, kv)
        x.kv_perm = torch.cat([torch.arange(kv_in), torch.full((kv - kv_in,), EMPTY)])
        x.perm = group_permutation(x.kv_perm, None, num_heads // kv)
        return x

    @property
    def empty(self) -> torch.Tensor:
        """Boolean mask of the query-head slots no input head fills (a semi-permutation's zero heads)."""
        return self.perm < 0

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> HeadTransform:
        """Rotations and scales as ``dtype``; with ``device``, every tensor (the permutations too) moved there."""
        return replace(
            self,
            perm=self.perm if device is None else self.perm.to(device),
            kv_perm=self.kv_perm if device is None else self.kv_perm.to(device),
            qk_rotation=self.qk_rotation.to(dtype=dtype, device=device),
            qk_scale=self.qk_scale.to(dtype=dtype, device=device),
            vo_rotation=self.vo_rotation.to(dtype=dtype, device=device),
            vo_scale=self.vo_scale.to(dtype=dtype, device=device),
        )


def group_permutation(kv_perm: torch.Tensor, within: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Query-head permutation from a KV-head permutation and, per output group, a permutation of its ``r`` members
    (``within``: (H_kv, r), default identity): ``perm[g·r + j] = kv_perm[g]·r + within[g, j]``; an ``EMPTY`` KV
    slot empties its whole query group."""
    if within is None:
        within = torch.arange(group_size).expand(len(kv_perm), group_size)
    perm = kv_perm[:, None] * group_size + within
    return torch.where(kv_perm[:, None] < 0, EMPTY, perm).reshape(-1)


def split_heads(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(H·d_h, ...) → (H, d_h, ...)."""
    return w.reshape(num_heads, w.shape[0] // num_heads, *w.shape[1:])


def split_head_columns(w_o: torch.Tensor, num_heads: int) -> torch.Tensor:
    """W_O (d, H·d_h) → (H, d, d_h)."""
    d = w_o.shape[0]
    return w_o.reshape(d, num_heads, -1).permute(1, 0, 2)


def rope_planes(head_dim: int, rotary_dim: int = 0, interleaved: bool = False) -> torch.Tensor:
    """(r/2, 2) index pairs of the planes RoPE rotates in a head, ``r = rotary_dim or head_dim`` (its first ``r``
    dimensions): HF's ``rotate_half`` layout pairs dimension ``i`` with ``i + r/2``; the interleaved one
    (``rotate_every_two``: GPT-J, Cohere) pairs ``2i`` with ``2i + 1``."""
    half = (rotary_dim or head_dim) // 2
    i = torch.arange(half)
    return torch.stack([2 * i, 2 * i + 1], dim=1) if interleaved else torch.stack([i, i + half], dim=1)


def rope_free_dims(head_dim: int, rotary_dim: int = 0) -> torch.Tensor:
    """The dimensions of a head RoPE does not rotate (partial rotary: the last ``d_h − rotary_dim``; none when the
    whole head is rotated)."""
    return torch.arange(rotary_dim or head_dim, head_dim)


def rope_order(head_dim: int, rotary_dim: int = 0, interleaved: bool = False) -> torch.Tensor:
    """(d_h,) the head's dimensions reordered so that plane ``i`` is ``(i, i + r/2)`` and the unrotated dimensions
    come last (``r = rotary_dim or head_dim``): the identity for full ``rotate_half`` RoPE."""
    planes = rope_planes(head_dim, rotary_dim, interleaved)
    return torch.cat([planes[:, 0], planes[:, 1], rope_free_dims(head_dim, rotary_dim)])


def to_rope_order(x: torch.Tensor, order: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` with its head-dimension axis ``dim`` in :func:`rope_order` (the same tensor when that is the identity)."""
    return x if is_identity(order) else x.index_select(dim, order.to(x.device))


def from_rope_order(rotation: torch.Tensor, scale: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A QK rotation (B, d_h, d_h) and scale (B, d_h) found in :func:`rope_order` coordinates, in the head's own:
    ``R[order[i], order[j]] = R'[i, j]``, ``a[order[i]] = a'[i]`` (then ``(R^T W)[order] = R'^T W[order]``)."""
    if is_identity(order):
        return rotation, scale
    order = order.to(rotation.device)
    r = torch.empty_like(rotation)
    r[:, order[:, None], order[None, :]] = rotation
    a = torch.empty_like(scale)
    a[:, order] = scale
    return r, a


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor, free: torch.Tensor | None, head_dim: int, rotary_dim: int = 0,
                  interleaved: bool = False) -> torch.Tensor:
    """Block rotations (B, d_h, d_h) of a RoPE head from per-plane ``cos, sin`` (B, r/2) and, with partial rotary,
    the orthogonal block ``free`` (B, d_h − r, d_h − r) of the unrotated dimensions: the group element
    :func:`plane_rotation_matrix` builds for the whole-head ``rotate_half`` layout."""
    r = plane_rotation_matrix(cos, sin)
    if free is not None and free.shape[-1]:
        r = block_diagonal(r, free.to(r.dtype))
    return from_rope_order(r, r.new_ones(r.shape[0], head_dim), rope_order(head_dim, rotary_dim, interleaved))[0]


def block_diagonal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``[[a, 0], [0, b]]`` of (B, m, m) and (B, n, n)."""
    top = torch.cat([a, a.new_zeros(*a.shape[:-1], b.shape[-1])], -1)
    return torch.cat([top, torch.cat([b.new_zeros(*b.shape[:-1], a.shape[-1]), b], -1)], -2)


def plane_rotation_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Block rotations (B, d_h, d_h) from per-plane ``cos, sin`` (B, d_h/2): plane ``(i, i + d_h/2)`` is rotated by
    ``[[cos, −sin], [sin, cos]]``, everything else zero."""
    b, half = cos.shape
    r = torch.zeros(b, 2 * half, 2 * half, dtype=cos.dtype, device=cos.device)
    i = torch.arange(half, device=cos.device)
    r[:, i, i] = cos
    r[:, i + half, i + half] = cos
    r[:, i, i + half] = -sin
    r[:, i + half, i] = sin
    return r


def read_heads(view: StateView, group: AttentionGroup) -> HeadTensors:
    h, kv = group.num_heads, group.kv_heads

    def bias(slot: Slot | None, like: torch.Tensor) -> torch.Tensor:
        return split_heads(view.get(slot), like.shape[0]) if slot else like.new_zeros(like.shape[:2])

    q = split_heads(view.get(group.q), h)
    k, v = split_heads(view.get(group.k), kv), split_heads(view.get(group.v), kv)
    o = split_head_columns(view.get(group.o), h)
    return HeadTensors(q, bias(group.q_bias, q), k, bias(group.k_bias, k), v, bias(group.v_bias, v), o)


def head_blocks(group: AttentionGroup, t: HeadTensors) -> list[tuple[Slot, torch.Tensor]]:
    """Each slot of ``group`` with the canonical tensor ``t`` writes into it."""
    out = [(slot, value.reshape(-1, value.shape[-1])) for slot, value in ((group.q, t.q), (group.k, t.k), (group.v, t.v))]
    out += [(slot, value.reshape(-1)) for slot, value in ((group.q_bias, t.q_bias), (group.k_bias, t.k_bias), (group.v_bias, t.v_bias)) if slot]
    return out + [(group.o, t.o.permute(1, 0, 2).reshape(t.o.shape[1], -1))]


def write_heads(view: StateView, group: AttentionGroup, t: HeadTensors) -> None:
    for slot, value in head_blocks(group, t):
        view.set(slot, value)


def transform_heads(t: HeadTensors, x: HeadTransform) -> HeadTensors:
    """Apply ``x`` to every head at once (batched matmuls, no loop over heads)."""
    x = x.to(t.q.dtype, t.q.device)
    r = t.group_size
    p, pk = x.perm, x.kv_perm

    def per_query(m: torch.Tensor) -> torch.Tensor:  # a per-KV-head quantity for every query head
        return m.repeat_interleave(r, dim=0)

    def rows(w: torch.Tensor, rot: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # diag(s) R^T W (scaled in place)
        return (rot.transpose(-1, -2) @ w).mul_(s.unsqueeze(-1))

    def bias(b: torch.Tensor, rot: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # b R diag(s)
        return s * (b.unsqueeze(1) @ rot).squeeze(1)

    # K and O sides: R^{-T} (= R for a rotation) so that every pair of sides cancels
    rk = torch.linalg.inv(x.qk_rotation).transpose(-1, -2) if x.general else x.qk_rotation
    rv = torch.linalg.inv(x.vo_rotation).transpose(-1, -2) if x.general else x.vo_rotation
    rq, aq = per_query(x.qk_rotation), per_query(x.qk_scale)
    so, co = per_query(rv), per_query(x.vo_scale)
    # an identity head assignment (fine-tunes) selects nothing: the tensors themselves, not index_select copies
    head_perm = (lambda w: w) if is_identity(p) else (lambda w: take(w, p))  # noqa: E731
    kv_perm = (lambda w: w) if is_identity(pk) else (lambda w: take(w, pk))  # noqa: E731
    return HeadTensors(
        q=rows(head_perm(t.q), rq, aq),
        q_bias=bias(head_perm(t.q_bias), rq, aq),
        k=rows(kv_perm(t.k), rk, 1 / x.qk_scale),
        k_bias=bias(kv_perm(t.k_bias), rk, 1 / x.qk_scale),
        v=rows(kv_perm(t.v), x.vo_rotation, x.vo_scale),
        v_bias=bias(kv_perm(t.v_bias), x.vo_rotation, x.vo_scale),
        o=(head_perm(t.o) @ so).div_(co.unsqueeze(1)),
    )
