"""Attention matching: head permutation, per-head QK/VO rotation and rescaling, all heads at once.

Model ``1`` (the one being aligned) is mapped onto reference ``2``. Per head the QK objective is

    ‖a R^T W_Q1 − W_Q2‖² + ‖a b_Q1 R − b_Q2‖² + ‖R^T W_K1 / a − W_K2‖² + ‖b_K1 R / a − b_K2‖²

(and the VO one alike with ``W_V, b_V`` on the ``a`` side and ``W_O`` head columns on the ``1/a`` side).
Stacking each side's tensors into row blocks ``X`` (scaled by ``a``) and ``Y`` (scaled by ``1/a``), it only depends
on the d_h×d_h cross-correlations ``M_X = X_1 X_2^T``, ``M_Y = Y_1 Y_2^T`` and the norms ``‖X_1‖², ‖Y_1‖²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from symmerge.groups.heads import HeadTensors, HeadTransform, transform_heads
from symmerge.match.lap import solve_lap
from symmerge.match.procrustes import best_scale, nuclear_norm, procrustes


@dataclass(frozen=True)
class Side:
    """One rotation group's statistics for every head: ``M_X, M_Y`` (H, d_h, d_h); ``‖X_1‖², ‖Y_1‖²`` (H,)."""

    m_x: torch.Tensor
    m_y: torch.Tensor
    x_sq: torch.Tensor
    y_sq: torch.Tensor


def qk_blocks(t: HeadTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks ``X = [W_Q | b_Q]``, ``Y = [W_K | b_K]`` per head: (H, d_h, d+1) each."""
    return torch.cat([t.q, t.q_bias.unsqueeze(-1)], -1), torch.cat([t.k, t.k_bias.unsqueeze(-1)], -1)


def vo_blocks(t: HeadTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks ``X = [W_V | b_V]`` (H, d_h, d+1) and ``Y = W_O^{h T}`` (H, d_h, d)."""
    return torch.cat([t.v, t.v_bias.unsqueeze(-1)], -1), t.o.transpose(-1, -2)


def side_statistics(model_blocks: tuple[torch.Tensor, torch.Tensor], reference_blocks: tuple[torch.Tensor, torch.Tensor]) -> Side:
    (x1, y1), (x2, y2) = model_blocks, reference_blocks
    return Side(
        m_x=(x1 @ x2.transpose(-1, -2)).double(),
        m_y=(y1 @ y2.transpose(-1, -2)).double(),
        x_sq=x1.double().square().sum((-1, -2)),
        y_sq=y1.double().square().sum((-1, -2)),
    )


def pair_scores(model_blocks: tuple[torch.Tensor, torch.Tensor], reference_blocks: tuple[torch.Tensor, torch.Tensor], rotate: bool) -> torch.Tensor:
    """``score[g, h]`` = best ``tr(R^T (M_X + M_Y))`` for reference head ``g`` and model head ``h``: the nuclear norm
    with rotation (DESIGN §2: the exact joint optimum over head permutations and rotations), the trace without."""
    (x1, y1), (x2, y2) = model_blocks, reference_blocks
    h, dh = x1.shape[:2]
    # One GEMM for every head pair: rows of [X | Y] of all model heads against those of all reference heads.
    z1 = torch.cat([x1, y1], -1).reshape(h * dh, -1)
    z2 = torch.cat([x2, y2], -1).reshape(h * dh, -1)
    m = (z2 @ z1.T).reshape(h, dh, h, dh).permute(0, 2, 3, 1)  # [g, h] = M_X + M_Y of model head h vs reference g
    # float32 singular values: the scores only rank head pairs, and the true pair of a planted permutation wins by
    # orders of magnitude more than float32 round-off
    return nuclear_norm(m).double() if rotate else torch.diagonal(m, dim1=-2, dim2=-1).sum(-1).double()


def objective(side: Side, r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``‖a R^T X_1 − X_2‖² + ‖R^T Y_1 / a − Y_2‖²`` minus the constant ``‖X_2‖² + ‖Y_2‖²``, per head."""
    tx = (r * side.m_x).sum((-1, -2))  # tr(R^T M_X)
    ty = (r * side.m_y).sum((-1, -2))
    return a**2 * side.x_sq - 2 * a * tx + side.y_sq / a**2 - 2 * ty / a


def rotation_and_scale(side: Side, rotate: bool, scale: bool, max_iter: int = 100, rtol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Minimise the per-head objective over ``R ∈ O(d_h)`` (if ``rotate``) and ``a > 0`` (if ``scale``).

    Alternates the two exact block minimisations (Procrustes of ``a M_X + M_Y / a``; the quartic), so the
    objective never increases; stops when the total improves by less than ``rtol`` relative. Returns ``R``
    (H, d_h, d_h), ``a`` (H,) and the objective after each step (summed over heads).
    """
    h, dh, _ = side.m_x.shape
    r = torch.eye(dh, dtype=torch.float64).expand(h, dh, dh).clone()
    a = torch.ones(h, dtype=torch.float64)
    history = [objective(side, r, a).sum().item()]
    for _ in range(max_iter if (rotate and scale) else 1):
        if rotate:
            r = procrustes(a[:, None, None] * side.m_x + side.m_y / a[:, None, None])
        if scale:
            tx, ty = (r * side.m_x).sum((-1, -2)), (r * side.m_y).sum((-1, -2))
            a = best_scale(side.x_sq, tx, ty, side.y_sq)
        history.append(objective(side, r, a).sum().item())
        if history[-2] - history[-1] <= rtol * max(abs(history[-1]), 1.0):
            break
    return r, a, history


def match_heads(reference: HeadTensors, model: HeadTensors, *, qk: bool, vo: bool, scale: bool, heads: bool) -> tuple[HeadTransform, dict]:
    """The :class:`HeadTransform` that brings ``model``'s heads closest to ``reference``'s, and details for the report.

    ``scale`` rescales whichever of QK/VO is rotated (both when neither is). Head permutation is solved first and
    exactly (H×H assignment on per-pair scores), then rotation and scale per matched pair.
    """
    h, dh = model.num_heads, model.head_dim
    x = HeadTransform.identity(h, dh, torch.float64)
    details: dict = {}
    if heads:
        scores = pair_scores(qk_blocks(model), qk_blocks(reference), qk) + pair_scores(vo_blocks(model), vo_blocks(reference), vo)
        x.perm = torch.from_numpy(solve_lap(scores))
        details["heads_moved"] = int((x.perm != torch.arange(h)).sum())
        model = transform_heads(model, _perm_only(x.perm, h, dh))
    scale_qk = scale and (qk or not vo)
    scale_vo = scale and (vo or not qk)
    for name, blocks, rotate, rescale in (("qk", qk_blocks, qk, scale_qk), ("vo", vo_blocks, vo, scale_vo)):
        if not (rotate or rescale):
            continue
        side = side_statistics(blocks(model), blocks(reference))
        r, a, history = rotation_and_scale(side, rotate, rescale)
        setattr(x, f"{name}_rotation", r)
        setattr(x, f"{name}_scale", a)
        details[f"{name}_iterations"] = len(history) - 1
        details[f"{name}_objective_decrease"] = history[0] - history[-1]
        if any(b > a_ + 1e-9 * max(abs(a_), 1.0) for a_, b in zip(history, history[1:])):
            raise AssertionError(f"internal: {name} objective increased during alternation: {history}")
    return x, details


def _perm_only(perm: torch.Tensor, h: int, dh: int) -> HeadTransform:
    x = HeadTransform.identity(h, dh)
    x.perm = perm
    return x
