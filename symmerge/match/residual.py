"""The residual-stream map ``Q`` (docs/DESIGN.md §2): its closed form given a correlation, and the coordinate
descent that alternates it with the per-layer elements."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from symmerge.groups import ModelTransform, apply_transform, require_residual
from symmerge.groups.residual import apply_residual, centered_basis, embed_centered, fold_norms, residual_correlation
from symmerge.match.fit import Fit
from symmerge.match.lap import solve_lap
from symmerge.match.objective import state_distance
from symmerge.match.per_layer import fit_per_layer
from symmerge.match.procrustes import procrustes
from symmerge.spec import ModelSpec


def solve_residual(m: torch.Tensor, kind: str) -> torch.Tensor:
    """The residual map ``Q`` maximising ``tr(Q^T M)`` in its group: orthogonal Procrustes; for ``centered``,
    Procrustes on the complement of the all-ones direction (``Q 1 = 1``); for ``permutation``, an exact LAP.
    The SVD runs where ``m`` is (the LAP on the CPU); ``Q`` is returned on the CPU."""
    if kind == "permutation":
        return torch.eye(m.shape[0], dtype=torch.float64)[:, torch.from_numpy(solve_lap(m.T.cpu()))]
    if kind == "centered":
        v = centered_basis(m.shape[0]).to(m.device)
        return embed_centered(procrustes(v.T @ m @ v).cpu())
    return procrustes(m).cpu()


def fit_with_residual(
    reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec, symmetries: frozenset[str], *,
    progress: bool = False, model_name: str = "model", max_iter: int = 20, rtol: float = 1e-7, max_seconds: float | None = None,
    device: torch.device | None = None, executor: Any = None,
) -> Fit:
    """Coordinate descent over the residual map ``Q`` and the per-layer elements ``T``.

    Both models' norms are folded first. ``Q`` acts on the residual axis of every tensor and ``T`` on the other
    axis, so they commute: the ``Q`` step is an exact Procrustes given ``T`` (on ``T(model)``), the ``T`` step the
    usual per-layer fit on ``Q(model)``. A step is kept only if it lowers the distance, so the objective never
    increases. ``Fit.history`` holds the distance after each accepted step; ``Fit.folded_reference`` the
    reference the distance is measured to.

    ``max_seconds``: a time budget for the descent. The first round always runs; a further round starts only if
    the time spent so far plus the last round's duration fits the budget. Stopping early returns the best element
    so far (every kept step lowered the distance). ``details["residual"]["round_seconds"]``: seconds per round.
    ``device``: where the correlation, its SVD and the per-layer fits run; ``executor``: where the per-layer fits
    run (:func:`~symmerge.match.per_layer.fit_per_layer`).
    """
    residual = require_residual(spec)
    per_layer = symmetries - {"residual"}
    ref_f, model_f = fold_norms(reference, residual), fold_norms(model, residual)
    transform, details, seconds = ModelTransform(), {}, {"residual": 0.0, "ffn": 0.0, "attention": 0.0}
    history = [state_distance(model_f, ref_f)]
    began, round_seconds, out_of_time = time.perf_counter(), [], False
    for _ in range(max_iter):
        if max_seconds is not None and round_seconds and time.perf_counter() - began + round_seconds[-1] > max_seconds:
            out_of_time = True
            break
        start = time.perf_counter()
        per_layer_only = ModelTransform(ffn=transform.ffn, heads=transform.heads)
        q = solve_residual(residual_correlation(apply_transform(model_f, spec, per_layer_only), ref_f, residual, device), residual.kind)
        rotated = apply_residual(model_f, residual, q)
        seconds["residual"] += time.perf_counter() - start
        fresh = fit_per_layer(ref_f, rotated, spec, per_layer, progress=progress, model_name=model_name, device=device,
                              executor=executor)
        for k in ("ffn", "attention"):
            seconds[k] += fresh.seconds[k]
        candidate, cand_details = fresh.transform, fresh.details
        q_only = state_distance(apply_transform(rotated, spec, per_layer_only), ref_f)
        full = state_distance(apply_transform(rotated, spec, candidate), ref_f)
        round_seconds.append(time.perf_counter() - start)
        if full > q_only:  # the fresh per-layer fit is no better: keep the previous one
            candidate, cand_details, full = per_layer_only, details, q_only
        if full >= history[-1]:
            break
        improvement = history[-1] - full
        transform = ModelTransform(ffn=candidate.ffn, heads=candidate.heads, residual=q)
        details = cand_details
        history.append(full)
        if improvement <= rtol * history[0]:
            break
    details = {**details, "residual": {"iterations": len(history) - 1, "distance_history": [round(h, 6) for h in history],
                                       "round_seconds": [round(t, 4) for t in round_seconds], "stopped_by_max_seconds": out_of_time}}
    return Fit(transform, details, seconds, folded_reference=ref_f, history=history)
