"""Per-head attention symmetries (DESIGN §1), for all heads of a layer at once.

One :class:`HeadTransform` combines, per output head ``g``: a head permutation (head ``g`` is built from input head
``perm[g]``), a QK rotation ``R_g`` with scale ``a_g`` and a VO rotation ``S_g`` with scale ``c_g``:

    W_Q → a R^T W_Q     b_Q → a b_Q R      W_K → R^T W_K / a    b_K → b_K R / a
    W_V → c S^T W_V     b_V → c b_V S      W_O → W_O S / c      (b_O unchanged)

``q k^T`` and ``v W_O^T`` are unchanged because ``R R^T = S S^T = I`` (reflections allowed) and the scales cancel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from symmerge.spec.base import AttentionGroup, Slot, StateView


@dataclass
class HeadTensors:
    """Canonical per-head blocks of one attention layer (missing biases are zeros)."""

    q: torch.Tensor  # (H, d_h, d)
    q_bias: torch.Tensor  # (H, d_h)
    k: torch.Tensor
    k_bias: torch.Tensor
    v: torch.Tensor
    v_bias: torch.Tensor
    o: torch.Tensor  # (H, d, d_h): head h's columns of W_O

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[1]


@dataclass
class HeadTransform:
    perm: torch.Tensor  # (H,) long
    qk_rotation: torch.Tensor  # (H, d_h, d_h)
    qk_scale: torch.Tensor  # (H,)
    vo_rotation: torch.Tensor  # (H, d_h, d_h)
    vo_scale: torch.Tensor  # (H,)

    @classmethod
    def identity(cls, num_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> HeadTransform:
        eye = torch.eye(head_dim, dtype=dtype).expand(num_heads, head_dim, head_dim).clone()
        ones = torch.ones(num_heads, dtype=dtype)
        return cls(torch.arange(num_heads), eye, ones, eye.clone(), ones.clone())

    def to(self, dtype: torch.dtype) -> HeadTransform:
        return replace(
            self,
            qk_rotation=self.qk_rotation.to(dtype),
            qk_scale=self.qk_scale.to(dtype),
            vo_rotation=self.vo_rotation.to(dtype),
            vo_scale=self.vo_scale.to(dtype),
        )


def split_heads(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(H·d_h, ...) → (H, d_h, ...)."""
    return w.reshape(num_heads, w.shape[0] // num_heads, *w.shape[1:])


def split_head_columns(w_o: torch.Tensor, num_heads: int) -> torch.Tensor:
    """W_O (d, H·d_h) → (H, d, d_h)."""
    d = w_o.shape[0]
    return w_o.reshape(d, num_heads, -1).permute(1, 0, 2)


def read_heads(view: StateView, group: AttentionGroup) -> HeadTensors:
    h = group.num_heads

    def bias(slot: Slot | None, like: torch.Tensor) -> torch.Tensor:
        return split_heads(view.get(slot), h) if slot else like.new_zeros(like.shape[:2])

    q, k, v = (split_heads(view.get(s), h) for s in (group.q, group.k, group.v))
    o = split_head_columns(view.get(group.o), h)
    return HeadTensors(q, bias(group.q_bias, q), k, bias(group.k_bias, k), v, bias(group.v_bias, v), o)


def write_heads(view: StateView, group: AttentionGroup, t: HeadTensors) -> None:
    for slot, value in ((group.q, t.q), (group.k, t.k), (group.v, t.v)):
        view.set(slot, value.reshape(-1, value.shape[-1]))
    for slot, value in ((group.q_bias, t.q_bias), (group.k_bias, t.k_bias), (group.v_bias, t.v_bias)):
        if slot:
            view.set(slot, value.reshape(-1))
    view.set(group.o, t.o.permute(1, 0, 2).reshape(t.o.shape[1], -1))


def transform_heads(t: HeadTensors, x: HeadTransform) -> HeadTensors:
    """Apply ``x`` to every head at once (batched matmuls, no loop over heads)."""
    x = x.to(t.q.dtype)
    p = x.perm
    rt, st = x.qk_rotation.transpose(-1, -2), x.vo_rotation.transpose(-1, -2)
    a, c = x.qk_scale, x.vo_scale

    def rows(w: torch.Tensor, r_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # s · R^T W
        return s[:, None, None] * (r_t @ w[p])

    def bias(b: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # s · b R
        return s[:, None] * (b[p].unsqueeze(1) @ r).squeeze(1)

    return HeadTensors(
        q=rows(t.q, rt, a),
        q_bias=bias(t.q_bias, x.qk_rotation, a),
        k=rows(t.k, rt, 1 / a),
        k_bias=bias(t.k_bias, x.qk_rotation, 1 / a),
        v=rows(t.v, st, c),
        v_bias=bias(t.v_bias, x.vo_rotation, c),
        o=(t.o[p] @ x.vo_rotation) / c[:, None, None],
    )
