"""Certificates that the identity assignment is optimal, read off part of a similarity matrix (docs/DESIGN.md §3,
"Identity for fine-tunes of one base").

Both the FFN neuron assignment (:func:`symmerge.match.ffn.ffn_similarity_or_identity`) and the head assignment
(:func:`symmerge.match.attention.heads_certified_identity`) maximise ``Σ_i S[i, σ(i)]`` over permutations, where every
entry ``S[i, j]`` is a sum over features. Summing only the first ``k`` features and bounding the rest by
Cauchy–Schwarz (Hölder for nuclear norms) gives an upper bound on every off-diagonal entry; the diagonal is computed
exactly (cheap: ``n`` pairs instead of ``n²``). When every diagonal entry beats its row's (or column's) bounds —
after a potential, see :func:`diagonal_dominates` — no permutation beats the identity, and the solver need not run.
"""

from __future__ import annotations

import torch

CERTIFY_FRACTIONS = (1 / 64, 1 / 16, 1 / 4)
"""Shares of the features summed before each attempt to certify the identity (then the rest is summed anyway).
The sums accumulate, so a certificate that fails every attempt costs a quarter of the GEMM whatever the ladder;
the first rung is small because the bound needs few features when rows are far apart relative to the fine-tuning
change (for i.i.d. rows of K features, about ``k ≳ 20`` of them: the largest of n² partial dot products must stay
below ``k/K`` of a squared norm)."""
CERTIFY_SAMPLE = 64
"""Rows whose similarity is computed in full first: an off-diagonal entry above its diagonal there (independent
models) means the identity is not optimal by rows, and the certificate is not tried at all."""
CERTIFY_MARGIN = 1e-3
"""Relative slack demanded on top of the rounding bound: the certificate only claims clear cases."""
UNIT_ROUNDOFF = 2.0**-24  # float32


def feature_columns(blocks: list[torch.Tensor], lo: int, hi: int, dim: int = 1) -> list[torch.Tensor]:
    """The slices along ``dim`` of the concatenated feature blocks that cover features ``[lo, hi)``."""
    out, start = [], 0
    for x in blocks:
        stop = start + x.shape[dim]
        if stop > lo and start < hi:
            out.append(x.narrow(dim, max(lo - start, 0), min(hi, stop) - max(lo, start)))
        start = stop
    return out


def row_dots(x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``Σ_k x[i, k] y[i, k]`` per row of two (n, k) blocks. A row-major block is one contraction; the transposed
    view of a row-major matrix (``W_out^T``) is summed over chunks of its stored rows, because torch's reductions
    across the strided axis ran ~10x slower (0.66 s against 0.05 s for a 4096 × 11008 float32 block). A row-major
    pair is multiplied and summed along its rows: ~4x faster than ``einsum("ij,ij->i")`` (batched 1×k GEMVs) on
    512 × 4096 blocks at one thread."""
    if x.stride(-1) == 1 and y.stride(-1) == 1:
        return (x * y).sum(-1)
    xt, yt = x.T, y.T
    out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, xt.shape[0], chunk):
        out += (xt[i : i + chunk] * yt[i : i + chunk]).sum(0)
    return out


def dominates_by_margin(diag: torch.Tensor, top: torch.Tensor) -> bool:
    """Whether every diagonal entry beats its competitors' maximum ``top`` by the relative ``CERTIFY_MARGIN``."""
    return bool((diag >= top + CERTIFY_MARGIN * (diag.abs() + top.abs())).all())


def diagonal_dominates(bound: torch.Tensor, diag: torch.Tensor, x_norm: torch.Tensor, y_norm: torch.Tensor) -> bool:
    """Whether every row's diagonal beats the rest of its row, ``S[i, i] − v_i ≥ bound[i, j] − v_j`` (``j ≠ i``; the
    caller fills ``bound``'s diagonal with −inf, and ``bound`` is used as scratch: it is shifted in place, no
    n×n copy), or every column's the rest of its column (``u`` on rows), by a
    relative ``CERTIFY_MARGIN``, for one of two potentials: none, or half the squared norms (``v = ½‖y‖²``,
    ``u = ½‖x‖²``: then ``S[i, j] − v_j`` is ``−½‖x_i − y_j‖²`` plus a row constant for inner products, and
    ``−½ min_R ‖R y_j − x_i‖²`` for nuclear norms — the form rows of very different norms need). Then for any
    permutation ``σ``, ``Σ_i S[i, σ(i)] = Σ_i (S[i, σ(i)] − v_σ(i)) + Σ_j v_j ≤ Σ_i S[i, i]``: the identity is
    optimal for every ``S ≤ bound`` with that diagonal, whatever the potential."""
    if dominates_by_margin(diag, bound.amax(1)) or dominates_by_margin(diag, bound.amax(0)):
        return True
    v, u = 0.5 * y_norm.square().to(bound.dtype), 0.5 * x_norm.square().to(bound.dtype)
    if dominates_by_margin(diag - v.to(diag.dtype), bound.sub_(v[None, :]).amax(1)):
        return True
    return dominates_by_margin(diag - u.to(diag.dtype), bound.add_(v[None, :]).sub_(u[:, None]).amax(0))


DOMINANCE_ROWS = 64
"""Rows of the bound formed at a time by :func:`diagonal_dominates_blocked` (cache-sized, instead of an n×n copy)."""


def diagonal_dominates_blocked(s: torch.Tensor, x_rest: torch.Tensor, y_rest: torch.Tensor, rounding: float, diag: torch.Tensor,
                               x_norm: torch.Tensor, y_norm: torch.Tensor) -> bool:
    """:func:`diagonal_dominates` of ``bound = s + x_rest y_restᵀ + rounding · x_norm y_normᵀ`` (diagonal −inf),
    without forming ``bound``: its rows are formed ``DOMINANCE_ROWS`` at a time, with the same elementwise
    operations in the same order (the same float32 entries, so the same decision), and the four maxima
    :func:`diagonal_dominates` compares (by rows and by columns, without and with the half-squared-norm potentials)
    are taken in that one pass. ``s`` is not modified."""
    n = s.shape[0]
    v, u = 0.5 * y_norm.square().to(s.dtype), 0.5 * x_norm.square().to(s.dtype)
    row_max, row_max_v = torch.empty(n, dtype=s.dtype, device=s.device), torch.empty(n, dtype=s.dtype, device=s.device)
    col_max = torch.full((s.shape[1],), -torch.inf, dtype=s.dtype, device=s.device)
    col_max_u = col_max.clone()
    for lo in range(0, n, DOMINANCE_ROWS):
        part = slice(lo, lo + DOMINANCE_ROWS)
        bound = torch.addr(s[part], x_rest[part], y_rest)
        bound.addr_(x_norm[part], y_norm, alpha=rounding)
        i = torch.arange(bound.shape[0], device=s.device)
        bound[i, i + lo] = -torch.inf
        row_max[part] = bound.amax(1)
        torch.maximum(col_max, bound.amax(0), out=col_max)
        row_max_v[part] = bound.sub_(v[None, :]).amax(1)
        torch.maximum(col_max_u, bound.add_(v[None, :]).sub_(u[part, None]).amax(0), out=col_max_u)
    return (dominates_by_margin(diag, row_max) or dominates_by_margin(diag, col_max) or dominates_by_margin(diag - v.to(diag.dtype), row_max_v)
            or dominates_by_margin(diag - u.to(diag.dtype), col_max_u))
