"""Exact linear assignment (maximise total similarity).

Backend: ``lapx``'s ``lapjvr`` on a float32 cost, the fastest exact solver measured on this class of problem: on the
twelve FFN similarity matrices of two independently initialised BERT-base models (n = 3072) it took 4.2 CPU s against
``lapjvh``'s 5.1 (median of 6 interleaved runs on a 2-core Zen 3, assignments identical in every run), and it was
never slower than ``lapjvh`` on float32 FFN costs from n = 1536 to 14336 in the project's earlier solver survey (Zen 4);
every exact solver reaches the same optimum, so the choice is speed only.
``scipy.optimize.linear_sum_assignment`` is the fallback when lapx is not installed.
"""

from __future__ import annotations

import numpy as np
import torch

from symmerge.lazy import lazy_module

optimize = lazy_module("scipy.optimize")  # ~0.4 s to import; only rectangular costs and the no-lapx fallback use it

try:  # lapx installs the module ``lap``
    from lap import lapjvr as _lapjv
except ImportError:  # pragma: no cover - exercised only without lapx
    _lapjv = None


def lap_backend() -> str:
    return "lapx.lapjvr" if _lapjv is not None else "scipy.linear_sum_assignment"


def identity_is_optimal(similarity: np.ndarray) -> bool:
    """Whether the identity provably maximises ``Σ_i S[i, σ(i)]``, read off in O(n²) without solving: when every
    diagonal entry is the maximum of its row, ``Σ_i S[i, σ(i)] ≤ Σ_i max_j S[i, j] = Σ_i S[i, i]`` for every
    permutation ``σ``; the same bound holds by columns. (Fine-tunes of one base: their FFN neurons still
    correspond, and this skips the LAP.)"""
    diagonal = np.diagonal(similarity)
    return bool((diagonal >= similarity.max(axis=1)).all() or (diagonal >= similarity.max(axis=0)).all())


def solve_lap(similarity: torch.Tensor | np.ndarray, backend: str | None = None, overwrite: bool = False,
              with_total: bool = False) -> np.ndarray | tuple[np.ndarray, float]:
    """``col_for_row`` maximising ``Σ_i similarity[i, col_for_row[i]]`` over permutations (square input). The
    identity is returned without solving when :func:`identity_is_optimal` proves it optimal (and on ties with it).

    More rows than columns (m × n, m > n: a narrow model's n neurons into a wide reference's m): the optimal
    injective assignment of every column to its own row, the semi-permutation of GLMC (Theus et al. 2025), with
    ``-1`` (``EMPTY``) for the m − n rows left without a column; solved by scipy, which handles rectangular costs.

    ``backend``: ``"lapx"`` or ``"scipy"`` to force one (default: the fastest available). ``overwrite``: the
    caller no longer needs a float32 ``similarity``, which then becomes the solver's cost in place (negated) instead
    of a copy: one d_ff² matrix less per solve in flight (485 MB at LLaMA-7B's d_ff = 11008). ``with_total``: also
    return ``Σ_i similarity[i, col_for_row[i]]`` (float64, over the assigned rows), read before or, in place, from
    the negated cost.
    """
    s = similarity.detach().cpu().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    if s.ndim != 2 or s.shape[0] < s.shape[1]:
        raise ValueError(f"solve_lap needs a square matrix or one with more rows than columns, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("solve_lap: the similarity matrix holds NaN or Inf")
    sign = 1.0  # -1 once the cost is s negated in place
    if s.shape[0] > s.shape[1]:
        rows, cols = optimize.linear_sum_assignment(s, maximize=True)
        col_for_row = np.full(s.shape[0], -1, dtype=np.int64)
    elif identity_is_optimal(s):
        rows = cols = np.arange(s.shape[0], dtype=np.int64)
        col_for_row = rows
    else:
        use_lapx = _lapjv is not None if backend is None else backend == "lapx"
        if use_lapx:
            # lapjv-family solvers minimise, and are 3-6x slower on full-precision float64 costs (measured in benchmarks/lap_solvers.py).
            in_place = overwrite and s.dtype == np.float32 and s.flags.writeable
            sign = -1.0 if in_place else 1.0
            rows, cols = _lapjv(np.negative(s, out=s) if in_place else np.negative(s, dtype=np.float32), return_cost=False)
        else:
            rows, cols = optimize.linear_sum_assignment(s, maximize=True)
        col_for_row = np.empty(s.shape[0], dtype=np.int64)
    col_for_row[rows] = cols
    if not with_total:
        return col_for_row
    return col_for_row, sign * float(s[rows, cols].sum(dtype=np.float64))
