"""Attention matching: head permutation, per-head QK/VO rotation and rescaling, all heads at once.

Model ``1`` (the one being aligned) is mapped onto reference ``2``. Per KV head the QK objective is

    Σ_{h in group} ‖a R^T [W_Q1^h | b_Q1^h] − [W_Q2^h | b_Q2^h]‖² + ‖R^T [W_K1 | b_K1] / a − [W_K2 | b_K2]‖²

(and the VO one alike with ``[W_V | b_V]`` on the ``a`` side and the group's ``W_O^h`` head columns on the ``1/a``
side). Stacking each side's tensors into row blocks ``X`` (scaled by ``a``) and ``Y`` (scaled by ``1/a``), it only
depends on the d_h×d_h cross-correlations ``M_X = X_1 X_2^T``, ``M_Y = Y_1 Y_2^T`` and the norms ``‖X_1‖², ‖Y_1‖²``.
Under RoPE the QK problem splits into one 2×2 problem per rotary plane, solved over SO(2) × R>0, and with
partial rotary one more problem on the unrotated dimensions, solved over O(d_h − r) × R>0: the objective is a sum
over these blocks, so each is solved exactly on its own. Other layouts (interleaved planes, partial rotary) are
solved in :func:`~symmerge.groups.heads.rope_order` coordinates, where plane ``i`` is ``(i, i + r/2)`` and the
unrotated dimensions come last; the element is mapped back (:func:`~symmerge.groups.heads.from_rope_order`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from symmerge.groups.ffn import is_identity
from symmerge.groups.heads import (
    HeadTensors,
    HeadTransform,
    block_diagonal,
    from_rope_order,
    group_permutation,
    plane_rotation_matrix,
    rope_order,
    to_rope_order,
    transform_heads,
)
from symmerge.match.certificate import CERTIFY_FRACTIONS, UNIT_ROUNDOFF, diagonal_dominates, feature_columns
from symmerge.match.device import CPU
from symmerge.match.lap import solve_lap
from symmerge.match.objective import squared_distance
from symmerge.match.procrustes import best_scale, nuclear_norm, plane_score, plane_score_of_entries, procrustes

Parts = tuple[torch.Tensor, ...]
"""Column blocks of one side's features, (B, d_h, k_t) each: its correlations are the sums over the parts (a bias
is a part of one column, instead of a concatenated copy of the weight beside it)."""
Blocks = tuple[Parts, Parts]


def _parts(x: torch.Tensor | Parts) -> Parts:
    return x if isinstance(x, tuple) else (x,)


def _each(x: torch.Tensor | Parts, fn: Callable[[torch.Tensor], torch.Tensor]) -> Parts:
    """``fn`` (a reshaping of the rows) applied to every part."""
    return tuple(fn(part) for part in _parts(x))


def _select(blocks: Blocks, index: Any) -> Blocks:
    """Both sides' parts indexed alike (some blocks, or some rows of every block)."""
    return tuple(tuple(part[index] for part in _parts(side)) for side in blocks)


def _correlation(x1: torch.Tensor | Parts, x2: torch.Tensor | Parts) -> torch.Tensor:
    """``Σ_t X1_t X2_tᵀ`` per block (B, d_h, d_h), float32."""
    p1, p2 = _parts(x1), _parts(x2)
    m = p1[0] @ p2[0].transpose(-1, -2)
    for a, b in zip(p1[1:], p2[1:]):
        m.baddbmm_(a, b.transpose(-1, -2))
    return m


@dataclass(frozen=True)
class Side:
    """One rotation group's statistics for every block: ``M_X, M_Y`` (B, k, k); ``‖X_1‖², ‖Y_1‖²`` (B,)."""

    m_x: torch.Tensor
    m_y: torch.Tensor
    x_sq: torch.Tensor
    y_sq: torch.Tensor


def _group_rows(per_query: torch.Tensor, group_size: int) -> torch.Tensor:
    """(H, d_h, D) → (H_kv, d_h, r·D): the rows a KV head's transform acts on, across its query group."""
    h, dh, dd = per_query.shape
    return per_query.reshape(h // group_size, group_size, dh, dd).permute(0, 2, 1, 3).reshape(h // group_size, dh, group_size * dd)


def qk_blocks(t: HeadTensors) -> Blocks:
    """Per KV head, ``X`` = the group's ``[W_Q | b_Q]`` rows (H_kv, d_h, r(d+1)) and ``Y = [W_K | b_K]`` (H_kv, d_h, d+1),
    as parts (no concatenated copy: at LLaMA-7B four 67 MB copies a layer, ~0.15 s at one thread)."""
    r = t.group_size
    return (_group_rows(t.q, r), _group_rows(t.q_bias.unsqueeze(-1), r)), (t.k, t.k_bias.unsqueeze(-1))


def vo_blocks(t: HeadTensors, o_rows: Callable[[HeadTensors], torch.Tensor] | None = None) -> Blocks:
    """Per KV head, ``X = [W_V | b_V]`` (H_kv, d_h, d+1) and ``Y`` = the group's ``W_O^{hT}`` (H_kv, d_h, r·d), as
    parts. ``o_rows``: gives ``W_O^{hT}`` contiguous (default :func:`output_rows`; a caller that already made it
    passes its own)."""
    return (t.v, t.v_bias.unsqueeze(-1)), (_group_rows((o_rows or output_rows)(t), t.group_size),)


def to_planes(blocks: Blocks) -> Blocks:
    """(B, d_h, D) row blocks → (B·d_h/2, 2, D): rows ``(i, i + d_h/2)`` of every RoPE plane."""
    def split(x: torch.Tensor) -> torch.Tensor:
        b, dh, dd = x.shape
        return x.reshape(b, 2, dh // 2, dd).permute(0, 2, 1, 3).reshape(b * dh // 2, 2, dd)

    return _each(blocks[0], split), _each(blocks[1], split)


def side_statistics(model_blocks: Blocks, reference_blocks: Blocks) -> Side:
    (x1, y1), (x2, y2) = model_blocks, reference_blocks
    return Side(
        m_x=_correlation(x1, x2).double(),
        m_y=_correlation(y1, y2).double(),
        x_sq=head_squared_norms(list(_parts(x1))),
        y_sq=head_squared_norms(list(_parts(y1))),
    )


def _plane_entries(m: torch.Tensor) -> torch.Tensor:
    """(B, d_h, d_h) per-head correlations → (B·d_h/2, 2, 2): plane ``i``'s entries at rows and columns
    ``(i, i + d_h/2)``, as :func:`to_planes` orders the planes."""
    b, dh, _ = m.shape
    half = dh // 2
    # m[b, p·half + i, q·half + j] → [b, p, i, q, j]; a plane keeps i = j
    return m.reshape(b, 2, half, 2, half).diagonal(dim1=2, dim2=4).permute(0, 3, 1, 2).reshape(b * half, 2, 2)


def _plane_squared_norms(x: torch.Tensor | Parts) -> torch.Tensor:
    """(B, d_h, D) parts → (B·d_h/2,): each plane's two rows' squared norms, summed (:func:`head_squared_norms` of a
    plane)."""
    b, dh, _ = _parts(x)[0].shape
    rows = sum(torch.linalg.vector_norm(part, dim=-1).double().square() for part in _parts(x))
    return rows.reshape(b, 2, dh // 2).sum(1).reshape(-1)


def plane_statistics(model_blocks: Blocks, reference_blocks: Blocks) -> Side:
    """``side_statistics(to_planes(model_blocks), to_planes(reference_blocks))`` without the plane-ordered copies of
    the blocks: one batched GEMM per side gives every head's whole d_h×d_h correlation, and each RoPE plane reads
    its 2×2 entries from it. At LLaMA-7B the copies (a strided gather of 4 × 16.8M floats) took ~1 s a layer at one
    thread, the GEMMs (4.3 GFLOP) a few hundredths; the entries are the same dot products, summed in another order."""
    (x1, y1), (x2, y2) = model_blocks, reference_blocks
    return Side(
        m_x=_plane_entries(_correlation(x1, x2)).double(),
        m_y=_plane_entries(_correlation(y1, y2)).double(),
        x_sq=_plane_squared_norms(x1),
        y_sq=_plane_squared_norms(y1),
    )


def objective(side: Side, r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``‖a R^T X_1 − X_2‖² + ‖R^T Y_1 / a − Y_2‖²`` minus the constant ``‖X_2‖² + ‖Y_2‖²``, per block."""
    tx = (r * side.m_x).sum((-1, -2))  # tr(R^T M_X)
    ty = (r * side.m_y).sum((-1, -2))
    return a**2 * side.x_sq - 2 * a * tx + side.y_sq / a**2 - 2 * ty / a


def rotation_and_scale(side: Side, rotate: bool, scale: bool, proper: bool = False, max_iter: int = 100,
                       rtol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Minimise the per-block objective over ``R ∈ O(k)`` (SO(k) if ``proper``; if ``rotate``) and ``a > 0`` (if
    ``scale``).

    Alternates the two exact block minimisations (Procrustes of ``a M_X + M_Y / a``; the quartic), so the
    objective never increases; stops when the total improves by less than ``rtol`` relative. Returns ``R``
    (B, k, k), ``a`` (B,) and the objective after each step (summed over blocks).
    """
    b, k, _ = side.m_x.shape
    r = torch.eye(k, dtype=torch.float64, device=side.m_x.device).expand(b, k, k).clone()
    a = torch.ones(b, dtype=torch.float64, device=side.m_x.device)
    history = [objective(side, r, a).sum().item()]
    for _ in range(max_iter if (rotate and scale) else 1):
        if rotate:
            r = procrustes(a[:, None, None] * side.m_x + side.m_y / a[:, None, None], proper=proper)
        if scale:
            tx, ty = (r * side.m_x).sum((-1, -2)), (r * side.m_y).sum((-1, -2))
            a = best_scale(side.x_sq, tx, ty, side.y_sq)
        history.append(objective(side, r, a).sum().item())
        if history[-2] - history[-1] <= rtol * max(abs(history[-1]), 1.0):
            break
    return r, a, history


def rotation_score(m: torch.Tensor, kind: str) -> torch.Tensor:
    """Best ``tr(R^T M)`` over the rotation group, from :func:`pair_statistics` of that kind: O(k) (nuclear norm of
    the whole block), RoPE planes (from the plane entries), or none (the trace, from the diagonal)."""
    if kind == "orthogonal":
        return nuclear_norm(m)
    if kind == "planes":
        return plane_score_of_entries(m)
    rotated = partial_rotary_dims(kind)
    if rotated:  # plane entries (4·r/2), then the unrotated block (f²), flattened
        free = round((m.shape[-1] - 2 * rotated) ** 0.5)
        return (plane_score_of_entries(m[..., : 2 * rotated].unflatten(-1, (4, rotated // 2)))
                + nuclear_norm(m[..., 2 * rotated:].unflatten(-1, (free, free))))
    return m.sum(-1)


def partial_rotary_kind(rotated: int) -> str:
    """The QK kind of a partial-rotary head in :func:`~symmerge.groups.heads.rope_order` coordinates: RoPE planes
    ``(i, i + r/2)`` on its first ``r = rotated`` dimensions, any orthogonal map on the rest."""
    return f"planes:{rotated}"


def partial_rotary_dims(kind: str) -> int:
    """``r`` of a :func:`partial_rotary_kind` (0 for every other kind)."""
    return int(kind.split(":")[1]) if kind.startswith("planes:") else 0


def pair_correlations(model: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``M[g, h] = model_h reference_g^T`` for every pair of heads: (G, H, d_h, d_h), one GEMM."""
    h, dh, dd = model.shape
    g = reference.shape[0]
    m = reference.reshape(g * dh, dd) @ model.reshape(h * dh, dd).T
    return m.reshape(g, dh, h, dh).permute(0, 2, 3, 1)


def _pair_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out[g, h, i] = x[h, i] · y[g, i]`` for (H, n, D) and (G, n, D): one batched GEMM over ``i``."""
    return torch.bmm(y.transpose(0, 1), x.permute(1, 2, 0)).permute(1, 2, 0)


def pair_statistics(model: torch.Tensor, reference: torch.Tensor, kind: str) -> torch.Tensor:
    """What :func:`rotation_score` of ``kind`` reads of every pair's ``M[g, h]`` (:func:`pair_correlations`); all of
    it is linear in ``M``, so sums over parts and heads can be taken on it. ``orthogonal``: the whole d_h×d_h
    blocks. ``planes`` (RoPE): per plane ``i`` only ``M_ii, M_i,i+k/2, M_i+k/2,i, M_i+k/2,i+k/2``, (G, H, 4, k/2),
    2·d_h dot products per pair instead of d_h² (64x fewer flops at LLaMA's d_h = 128, where the query/key blocks
    took ~137 GFLOP per part and layer). :func:`partial_rotary_kind`: the plane entries of the first ``r`` dimensions
    and the whole block of the rest, flattened into (G, H, 2r + (d_h − r)²). ``none``: the diagonal, (G, H, d_h)."""
    if kind == "orthogonal":
        return pair_correlations(model, reference)
    rotated = partial_rotary_dims(kind)
    if rotated:
        planes = pair_statistics(model[:, :rotated], reference[:, :rotated], "planes")
        free = pair_correlations(model[:, rotated:].contiguous(), reference[:, rotated:].contiguous())
        return torch.cat([planes.flatten(-2), free.flatten(-2)], -1)
    if kind == "planes":
        half = model.shape[1] // 2
        xa, xb, ya, yb = model[:, :half], model[:, half:], reference[:, :half], reference[:, half:]
        return torch.stack([_pair_dots(xa, ya), _pair_dots(xa, yb), _pair_dots(xb, ya), _pair_dots(xb, yb)], -2)
    return _pair_dots(model, reference)


HEAD_SAMPLE = 1
"""Reference heads whose scores against every model head are computed in full before the head certificate is
tried: when one of them prefers another head than its own (independent models), the certificate is not tried."""


def transposed_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.transpose(-1, -2).contiguous()`` of a (B, m, n) stack, the same values. Head-split columns of a row-major
    matrix (``W_O`` → (H, d, d_h), strides (d_h, H·d_h, 1)) are transposed as that one 2-D matrix: ~5x faster than
    torch's copy of the 3-D view (0.05 against 0.25 s for LLaMA-7B's ``W_O`` at one thread)."""
    b, m, n = x.shape
    if x.stride() == (n, b * n, 1) and not x.transpose(-1, -2).is_contiguous():
        return x.permute(1, 0, 2).reshape(m, b * n).T.contiguous().view(b, n, m)
    return x.transpose(-1, -2).contiguous()


def output_rows(t: HeadTensors) -> torch.Tensor:
    """Each head's rows of ``W_O^T`` (H, d_h, d), contiguous (:func:`transposed_contiguous`)."""
    return transposed_contiguous(t.o)


def _side_parts(t: HeadTensors, side: str, o_rows: Callable[[HeadTensors], torch.Tensor] = output_rows) -> list[torch.Tensor]:
    """A side's per-head feature blocks (H, d_h, k_t), contiguous, whose correlations sum to the side's ``M`` (the
    bias columns as blocks of their own: no concatenated copy)."""
    if side == "qk":
        return [x.contiguous() for x in (t.q, t.q_bias.unsqueeze(-1), t.k, t.k_bias.unsqueeze(-1))]
    return [t.v.contiguous(), t.v_bias.unsqueeze(-1).contiguous(), o_rows(t)]


def head_squared_norms(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per block ``‖X_h‖_F²`` over the parts (B, d_h, k_t), float64: row norms in float32, their squares summed in
    float64 (no float64 copy of the blocks)."""
    if not parts:
        return torch.zeros(())
    return sum(torch.linalg.vector_norm(x, dim=-1).double().square().sum(-1) for x in parts)


def _score_of_blocks(m: torch.Tensor, kind: str) -> torch.Tensor:
    """:func:`rotation_score` from whole d_h×d_h blocks ``M`` (..., d_h, d_h)."""
    m = m.double()
    if kind == "orthogonal":
        return nuclear_norm(m)
    if kind == "planes":
        return plane_score(m)
    rotated = partial_rotary_dims(kind)
    if rotated:
        return plane_score(m[..., :rotated, :rotated]) + nuclear_norm(m[..., rotated:, rotated:])
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def _pair_scores(model_parts: list[torch.Tensor], reference_parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    """(G, H) :func:`rotation_score` of every pair of heads, summed over the blocks first."""
    stats = sum(pair_statistics(x, y, kind) for x, y in zip(model_parts, reference_parts))
    return rotation_score(stats.double(), kind)


def heads_certified_identity(reference: HeadTensors, model: HeadTensors, qk_kind: str, vo_kind: str,
                             o_rows: Callable[[HeadTensors], torch.Tensor] = output_rows) -> bool:
    """Whether the identity head assignment is proven optimal for :func:`match_head_permutation`'s scores without
    computing the whole-block correlations of every pair of heads (fine-tunes of one base: their heads still
    correspond; the correlations of an ``orthogonal`` side cost ~2·H²·d_h²·d flops, 137 GFLOP per part and layer at
    LLaMA-7B).

    The score of a pair is ``Σ_side rotation_score(M_side[g, h])``. Sides of kind ``planes`` and ``none`` read few
    entries and are computed in full. For an ``orthogonal`` side, ``M = M_k + M_{>k}`` splits over the features;
    ``‖M‖_* ≤ √rank(M_k) ‖M_k‖_F + ‖X_h^{>k}‖_F ‖Y_g^{>k}‖_F`` (Hölder), so summing the first ``k`` features
    (``CERTIFY_FRACTIONS``) bounds every off-diagonal score from above, while the ``H`` diagonal scores are computed
    exactly from whole blocks. If the diagonal dominates its rows or columns after a potential
    (:func:`~symmerge.match.certificate.diagonal_dominates`) — net of float32's rounding, bounded per side by
    ``2√d_h (K+2)u ‖X_h‖ ‖Y_g‖`` (entries of ``M`` within ``(K+2)u ‖x‖ ‖y‖``, and ``‖E‖_* ≤ √d_h ‖E‖_F``), counted
    for this computation and for the full one — the identity maximises the exact scores and the float32 ones the
    solver would get. Tried only for one query head per KV head and equal head counts (GQA's nested assignments
    and semi-permutations are solved as before), and only when ``HEAD_SAMPLE`` reference heads' full rows already
    prefer their own head."""
    h, dh = model.num_heads, model.head_dim
    if model.group_size != 1 or reference.group_size != 1 or reference.num_heads != h or h < 2:
        return False
    kinds = {"qk": qk_kind, "vo": vo_kind}
    parts = {s: (_side_parts(model, s, o_rows), _side_parts(reference, s, o_rows)) for s in kinds}
    x_norm = torch.zeros(h, dtype=torch.float64, device=model.q.device)  # reference heads (rows g): squared, then the norm
    y_norm = torch.zeros_like(x_norm)  # model heads (columns h)
    diag = torch.zeros_like(x_norm)
    exact = torch.zeros(h, h, dtype=torch.float64, device=model.q.device)  # the cheap sides, in full
    rounding = 0.0
    for side, kind in kinds.items():
        mp, rp = parts[side]
        y_norm += head_squared_norms(mp)
        x_norm += head_squared_norms(rp)
        features = sum(x.shape[-1] for x in mp)
        rounding = max(rounding, 2 * dh**0.5 * (features + 2) * UNIT_ROUNDOFF)
        if kind != "orthogonal":  # every pair's score, the diagonal's among them (no whole-block correlations)
            scores = _pair_scores(mp, rp, kind)
            exact += scores
            diag += scores.diagonal()
        else:
            diag += _score_of_blocks(sum(torch.bmm(x, y.transpose(-1, -2)) for x, y in zip(mp, rp)), kind)
    x_norm, y_norm = x_norm.sqrt(), y_norm.sqrt()
    slack = 2 * rounding * torch.outer(x_norm, y_norm)  # this computation's rounding and the full one's
    diag = diag - slack.diagonal()
    orthogonal = [s for s, k in kinds.items() if k == "orthogonal"]
    if not orthogonal:  # nothing expensive to skip: match_head_permutation computes these scores anyway
        return False
    sample = torch.arange(min(HEAD_SAMPLE, h), device=model.q.device)
    rows = exact[sample] + sum(_pair_scores(parts[s][0], [y[sample] for y in parts[s][1]], "orthogonal") for s in orthogonal)
    rows[torch.arange(len(sample)), sample] = -torch.inf
    rows = rows + slack[sample]
    half_sq = 0.5 * y_norm.square()
    if not any(bool((d >= r.amax(1)).all()) for d, r in ((diag[sample], rows), (diag[sample] - half_sq[sample], rows - half_sq))):
        return False
    for fraction in CERTIFY_FRACTIONS:
        bound = exact + slack
        for s in orthogonal:
            mp, rp = parts[s]
            total = sum(x.shape[-1] for x in mp)
            upto = max(int(total * fraction), 1)
            partial = sum(pair_correlations(x, y) for x, y in zip(feature_columns(mp, 0, upto, dim=2), feature_columns(rp, 0, upto, dim=2)))
            rest_model = head_squared_norms(feature_columns(mp, upto, total, dim=2)).sqrt()
            rest_ref = head_squared_norms(feature_columns(rp, upto, total, dim=2)).sqrt()
            # ‖M_k‖_* ≤ √rank ‖M_k‖_F: a bound instead of H² eigensolves (as costly as the correlations they would read)
            rank = min(dh, upto)
            bound = bound + rank**0.5 * frobenius_upper_bound(partial) + torch.outer(rest_ref, rest_model)
        bound.fill_diagonal_(-torch.inf)
        if diagonal_dominates(bound, diag, x_norm, y_norm):
            return True
    return False


def frobenius_upper_bound(m: torch.Tensor) -> torch.Tensor:
    """``‖M‖_F`` of each trailing (k, k) block, float64, never below the exact value, from the float32 norm (at
    LLaMA-7B's 32 × 32 head pairs 6 ms at one thread, against 130 ms through a float64 copy): the computed sum of
    ``n`` float32 squares is within ``γ_n = nu / (1 − nu)`` of the exact one in any summation order (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §3.1), less what squares below float32's smallest normal lose
    (each under ``2^-126``), and the square root adds one rounding. An overflow gives ``inf``: no certificate."""
    n = m.shape[-1] * m.shape[-2]
    gamma = n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)
    computed = torch.linalg.vector_norm(m, dim=(-1, -2)).double() / (1 - UNIT_ROUNDOFF)
    return (computed.square() / (1 - gamma) + n * 2.0**-126).sqrt() * (1 + 2.0**-50)  # the last: this line's own float64 rounding


def head_squared_distance(a: HeadTensors, b: HeadTensors) -> float:
    """``Σ ‖a_t − b_t‖²`` over a layer's head tensors (queries, keys, values, their biases, the output projection)."""
    return sum(squared_distance(getattr(a, f), getattr(b, f)) for f in ("q", "q_bias", "k", "k_bias", "v", "v_bias", "o"))


def match_head_permutation(reference: HeadTensors, model: HeadTensors, qk_kind: str, vo_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, kv_perm)`` assigning model heads to reference heads before rotation.

    The score of a pair is the best ``tr(R^T M)`` its rotation group allows (docs/DESIGN.md §2): with one head per KV group
    this H×H assignment on nuclear norms is the exact joint optimum over head permutations and rotations. With GQA,
    each candidate KV pair first matches its ``r`` query heads (r×r assignment on the query heads' own scores) and
    is then scored with its whole group, followed by an H_kv×H_kv assignment. A reference with more heads than the
    model (same group size) gets a semi-permutation: a rectangular assignment, ``EMPTY`` (−1) for the slots left
    empty (docs/DESIGN.md §2).
    """
    r = model.group_size
    kv, kv_ref = model.num_kv_heads, reference.num_kv_heads
    mq = pair_statistics(torch.cat([model.q, model.q_bias.unsqueeze(-1)], -1), torch.cat([reference.q, reference.q_bias.unsqueeze(-1)], -1), qk_kind)
    mo = pair_statistics(model.o.transpose(-1, -2), reference.o.transpose(-1, -2), vo_kind)
    mk = pair_statistics(torch.cat([model.k, model.k_bias.unsqueeze(-1)], -1), torch.cat([reference.k, reference.k_bias.unsqueeze(-1)], -1), qk_kind)
    mv = pair_statistics(torch.cat([model.v, model.v_bias.unsqueeze(-1)], -1), torch.cat([reference.v, reference.v_bias.unsqueeze(-1)], -1), vo_kind)
    if r == 1:
        scores = rotation_score(mq + mk, qk_kind) + rotation_score(mv + mo, vo_kind)
        perm = torch.from_numpy(solve_lap(scores.double().cpu()))
        return perm, perm.clone()
    # query-pair scores, grouped: [g_ref, g_model, j_ref, j_model]
    q_scores = (rotation_score(mq, qk_kind) + rotation_score(mo, vo_kind)).reshape(kv_ref, r, kv, r).permute(0, 2, 1, 3)
    mq4 = mq.reshape(kv_ref, r, kv, r, *mq.shape[2:]).permute(0, 2, 1, 3, *range(4, mq.dim() + 2))
    mo4 = mo.reshape(kv_ref, r, kv, r, *mo.shape[2:]).permute(0, 2, 1, 3, *range(4, mo.dim() + 2))
    within = np.empty((kv_ref, kv, r), dtype=np.int64)
    kv_scores = torch.empty(kv_ref, kv, dtype=torch.float64, device=mq.device)
    for gr in range(kv_ref):
        for gm in range(kv):
            within[gr, gm] = solve_lap(q_scores[gr, gm].double().cpu())
            j = torch.arange(r)
            sel = torch.from_numpy(within[gr, gm])
            kv_scores[gr, gm] = (rotation_score(mk[gr, gm] + mq4[gr, gm, j, sel].sum(0), qk_kind)
                                 + rotation_score(mv[gr, gm] + mo4[gr, gm, j, sel].sum(0), vo_kind)).double()
    kv_perm = torch.from_numpy(solve_lap(kv_scores.cpu()))
    chosen = torch.from_numpy(np.stack([within[g, int(kv_perm[g])] if kv_perm[g] >= 0 else np.arange(r) for g in range(kv_ref)]))
    return group_permutation(kv_perm, chosen, r), kv_perm


def match_heads(reference: HeadTensors, model: HeadTensors, *, qk: bool, vo: bool, scale: bool, heads: bool,
                rope: bool = False, qk_fixed: bool = False, device: torch.device | str | None = None, rotary_dim: int = 0,
                rope_interleaved: bool = False) -> tuple[HeadTransform, dict]:
    """The :class:`HeadTransform` that brings ``model``'s heads closest to ``reference``'s, and details for the report.

    ``scale`` rescales whichever of QK/VO is rotated (both when neither is). ``rope``: QK may only rotate (and
    scale) each rotary plane — ``rotary_dim`` leading dimensions of each head (0: all), in ``rotate_half`` planes or
    ``rope_interleaved`` ones — and rotate (and scale) the unrotated rest as one block. Head permutation is solved first (exactly for MHA), then rotation and scale per
    matched KV head, all heads at once. ``qk_fixed``: no QK rotation or rescaling is a symmetry of this layer
    (Qwen3's per-head q/k norms), so QK stays the identity whatever ``qk`` and ``scale`` ask; ``scale`` then
    rescales VO. ``device``: where the correlations, SVDs and quartics run (default: the CPU); the head
    assignments are LAPs on the CPU, and the element is returned on the CPU.
    """
    if device is not None:
        reference, model = reference.to_device(device), model.to_device(device)
    h, kv, dh = reference.num_heads, reference.num_kv_heads, reference.head_dim
    scale_qk = scale and (qk or not vo) and not qk_fixed
    scale_vo = scale and (vo or not qk or qk_fixed)
    qk = qk and not qk_fixed
    rotated = rotary_dim or dh
    # RoPE heads are solved in rope_order coordinates (planes (i, i + r/2), the unrotated dimensions last)
    order = rope_order(dh, rotary_dim, rope_interleaved) if rope and (qk or scale_qk) else torch.arange(dh)
    reference, model = _in_rope_order(reference, order), _in_rope_order(model, order)
    # a narrower model (fewer heads): a semi-permutation into the reference's heads, the identity embedding
    # unless the heads class is on
    x = HeadTransform.embedding(model.num_heads, h, dh, model.num_kv_heads, kv, torch.float64)
    details: dict = {}
    qk_kind = (("planes" if rotated == dh else partial_rotary_kind(rotated)) if rope else "orthogonal") if qk else "none"
    vo_kind = "orthogonal" if vo else "none"
    made: list[tuple[HeadTensors, torch.Tensor]] = []

    def o_rows(t: HeadTensors) -> torch.Tensor:  # made once per head state, for the certificate and the VO statistics
        for owner, rows in made:
            if owner is t:
                return rows
        made.append((t, output_rows(t)))
        return made[-1][1]

    if heads and not heads_certified_identity(reference, model, qk_kind, vo_kind, o_rows):  # else x's identity stands
        x.perm, x.kv_perm = match_head_permutation(reference, model, qk_kind, vo_kind)
    if heads:
        details["heads_moved"] = int((x.perm != torch.arange(h)).sum())
    if model.num_heads != h or not is_identity(x.perm):
        only_perm = HeadTransform.identity(h, dh, num_kv_heads=kv)
        only_perm.perm, only_perm.kv_perm = x.perm, x.kv_perm
        permuted = transform_heads(model, only_perm)
        if model.num_heads == h:  # what the assignment alone lowers (the rotations' decreases start from it)
            details["heads_objective_decrease"] = head_squared_distance(model, reference) - head_squared_distance(permuted, reference)
        model = permuted
    filled = x.kv_perm >= 0  # empty (zero) KV heads keep the identity: nothing to rotate
    for name, blocks, rotate, rescale in (("qk", qk_blocks, qk, scale_qk), ("vo", lambda t: vo_blocks(t, o_rows), vo, scale_vo)):
        if not (rotate or rescale):
            continue
        planes = rope and name == "qk"
        model_blocks, reference_blocks = blocks(model), blocks(reference)
        if not bool(filled.all()):
            kept = filled.to(model.q.device)
            model_blocks, reference_blocks = _select(model_blocks, kept), _select(reference_blocks, kept)
        n = int(filled.sum())
        # the objective is a sum over these row blocks (RoPE: the planes, then the unrotated dimensions), each
        # solved exactly on its own
        blocks_of_rows = [(0, rotated, True), (rotated, dh, False)] if planes else [(0, dh, False)]
        rs, scales, histories = [], [], []
        for start, stop, in_planes in blocks_of_rows:
            if stop <= start:
                continue
            part = stop - start
            side = (plane_statistics if in_planes else side_statistics)(
                _select(model_blocks, (slice(None), slice(start, stop))), _select(reference_blocks, (slice(None), slice(start, stop))))
            r, a, history = rotation_and_scale(side, rotate, rescale, proper=in_planes)
            if in_planes:  # back from (H_kv·r/2, 2, 2) plane rotations to (H_kv, r, r) block rotations
                r = r.reshape(n, part // 2, 2, 2)
                r = plane_rotation_matrix(r[..., 0, 0], r[..., 1, 0])
                a = a.reshape(n, part // 2).repeat(1, 2)
            else:
                a = a[:, None].expand(n, part).clone()
            rs.append(r)
            scales.append(a)
            histories.append(history)
        r = block_diagonal(*rs) if len(rs) == 2 else rs[0]
        a = torch.cat(scales, 1)
        if planes:
            r, a = from_rope_order(r, a, order)
        full_r = getattr(x, f"{name}_rotation").to(r.device)
        full_a = getattr(x, f"{name}_scale").to(a.device)
        full_r[filled.to(r.device)], full_a[filled.to(a.device)] = r, a
        setattr(x, f"{name}_rotation", full_r)
        setattr(x, f"{name}_scale", full_a)
        details[f"{name}_iterations"] = max(len(history) - 1 for history in histories)
        details[f"{name}_objective_decrease"] = sum(history[0] - history[-1] for history in histories)
        for history in histories:
            if any(b > a_ + 1e-9 * max(abs(a_), 1.0) for a_, b in zip(history, history[1:])):
                raise AssertionError(f"internal: {name} objective increased during alternation: {history}")
    return x.to(torch.float64, CPU), details


def _in_rope_order(t: HeadTensors, order: torch.Tensor) -> HeadTensors:
    """``t`` with the query and key dimensions of every head in :func:`~symmerge.groups.heads.rope_order` (the
    same object when that is the identity; V and O are untouched)."""
    if is_identity(order):
        return t
    return replace(t, q=to_rope_order(t.q, order), q_bias=to_rope_order(t.q_bias, order), k=to_rope_order(t.k, order),
                   k_bias=to_rope_order(t.k_bias, order))
