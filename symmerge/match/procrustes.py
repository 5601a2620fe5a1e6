"""Orthogonal Procrustes and the quartic rescaling step, batched over heads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads limited to ``n`` (at least 1) for the calls inside, then restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def single_threaded() -> contextlib.AbstractContextManager[None]:
    """Small batched SVDs/eigensolvers gain nothing from a second thread and collapse under contention
    on a shared 2-core machine, while the GEMMs around them do gain: limit threads for these calls only."""
    return torch_threads(1)


def procrustes(m: torch.Tensor, proper: bool = False) -> torch.Tensor:
    """``R = U V^T`` from ``M = U Σ V^T``: the maximiser of ``tr(R^T M)`` over O(k) (reflections allowed).

    ``m``: (..., k, k). This is Theorem 4.1 of Zhang et al. (2025): with ``M = X_1 X_2^T``, ``R`` minimises
    ``‖R^T X_1 − X_2‖_F``. ``proper=True`` restricts to rotations SO(k) (Kabsch: flip the last singular
    direction when ``det(U V^T) < 0``), as RoPE planes require.
    """
    with single_threaded():
        u, _, vh = torch.linalg.svd(m)
    if proper:
        d = torch.sign(torch.linalg.det(u @ vh))
        u = torch.cat([u[..., :-1], u[..., -1:] * d[..., None, None]], dim=-1)
    return u @ vh


def plane_score(m: torch.Tensor) -> torch.Tensor:
    """``max tr(R^T M)`` over rotations ``R`` of each RoPE plane ``(i, i + k/2)`` (block SO(2)), for (..., k, k):
    per plane ``sqrt((m_ii + m_jj)² + (m_ji − m_ij)²)``, summed."""
    half = m.shape[-1] // 2
    i = torch.arange(half)
    return plane_score_of_entries(torch.stack([m[..., i, i], m[..., i, i + half], m[..., i + half, i], m[..., i + half, i + half]], -2))


def plane_score_of_entries(e: torch.Tensor) -> torch.Tensor:
    """:func:`plane_score` from the only entries of ``M`` it reads, ``e`` (..., 4, k/2): per plane ``i``,
    ``(m_ii, m_i,i+k/2, m_i+k/2,i, m_i+k/2,i+k/2)``."""
    a, b, c, d = e.unbind(-2)
    return torch.sqrt((a + d) ** 2 + (c - b) ** 2).sum(-1)


def nuclear_norm(m: torch.Tensor) -> torch.Tensor:
    """``‖M‖_* = max_R tr(R^T M)`` over O(k), for (..., k, k) → (...).

    Computed as ``Σ_i sqrt(λ_i(M^T M))``: a symmetric eigensolver is twice as fast as ``svdvals`` here.
    """
    with single_threaded():
        return torch.linalg.eigvalsh(m.transpose(-1, -2) @ m).clamp_min(0).sqrt().sum(-1)


def best_scale(x_sq: torch.Tensor, x_dot: torch.Tensor, y_dot: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """Per head, the ``a > 0`` minimising ``f(a) = a² x_sq − 2 a x_dot + y_sq / a² − 2 y_dot / a`` (+ const).

    That is ``‖a X_1 − X_2‖² + ‖Y_1 / a − Y_2‖²`` with ``x_sq = ‖X_1‖²``, ``x_dot = ⟨X_1, X_2⟩``,
    ``y_sq = ‖Y_1‖²``, ``y_dot = ⟨Y_1, Y_2⟩``. ``f'(a) = 0`` times ``a³/2`` is the quartic (docs/DESIGN.md §2)

        x_sq a⁴ − x_dot a³ + y_dot a − y_sq = 0,

    solved for all heads at once through the eigenvalues of its (H, 4, 4) companion matrices; of the positive
    real roots, the one with the lowest ``f`` wins. ``f → ∞`` at both ends of (0, ∞) when ``x_sq, y_sq > 0``, so
    a positive root always exists; degenerate heads (a zero block) keep ``a = 1``.
    """
    device = x_sq.device
    x_sq, x_dot, y_dot, y_sq = (t.detach().cpu().double().numpy() for t in (x_sq, x_dot, y_dot, y_sq))
    h = x_sq.shape[0]
    ok = (x_sq > 0) & (y_sq > 0)
    lead = np.where(ok, x_sq, 1.0)
    companion = np.zeros((h, 4, 4))
    companion[:, 1:, :3] = np.eye(3)
    # monic a⁴ + c3 a³ + c2 a² + c1 a + c0 with c3 = −x_dot/x_sq, c2 = 0, c1 = y_dot/x_sq, c0 = −y_sq/x_sq
    companion[:, 0, 0] = x_dot / lead
    companion[:, 0, 2] = -y_dot / lead
    companion[:, 0, 3] = y_sq / lead
    roots = np.linalg.eigvals(companion)  # (H, 4)
    real = roots.real
    usable = (np.abs(roots.imag) <= 1e-7 * np.maximum(1.0, np.abs(real))) & (real > 0)
    a = np.where(usable, real, 1.0)
    f = a**2 * x_sq[:, None] - 2 * a * x_dot[:, None] + y_sq[:, None] / a**2 - 2 * y_dot[:, None] / a
    f = np.where(usable, f, np.inf)
    best = a[np.arange(h), f.argmin(1)]
    best = np.where(ok & usable.any(1), best, 1.0)
    return torch.from_numpy(best).to(device)  # (4×4 eigenproblems: numpy on the CPU, whatever the device)
