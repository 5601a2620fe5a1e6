"""The residual-stream map ``Q`` (docs/DESIGN.md §2): its closed form given a correlation, the coordinate descent
that alternates it with the per-layer elements, and where that descent starts."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from symmerge.groups import ModelTransform, apply_transform, require_residual
from symmerge.groups.residual import anchor_group, apply_residual, centered_basis, embed_centered, fold_norms, residual_correlation
from symmerge.match.fit import Fit
from symmerge.match.lap import solve_lap
from symmerge.match.objective import state_distance
from symmerge.match.per_layer import ATTENTION_CLASSES, fit_per_layer
from symmerge.match.procrustes import procrustes
from symmerge.spec import ModelSpec


def solve_residual(m: torch.Tensor, kind: str) -> torch.Tensor:
    """The residual map ``Q`` maximising ``tr(Q^T M)`` in its group: orthogonal Procrustes; for ``centered``,
    Procrustes on the complement of the all-ones direction (``Q 1 = 1``); for ``permutation``, an exact LAP."""
    if kind == "permutation":
        return torch.eye(m.shape[0], dtype=torch.float64)[:, torch.from_numpy(solve_lap(m.T))]
    if kind == "centered":
        v = centered_basis(m.shape[0])
        return embed_centered(procrustes(v.T @ m @ v))
    return procrustes(m)


def moved_keys(spec: ModelSpec, per_layer: frozenset[str]) -> set[str]:
    """The tensors the chosen per-layer classes can move (FFN groups for ``ffn``; attention groups for any of
    ``qk, vo, scale, heads``)."""
    keys: set[str] = set()
    if "ffn" in per_layer:
        keys |= {s.key for g in spec.ffn for s in g.slots()}
    if per_layer & ATTENTION_CLASSES:
        keys |= {s.key for g in spec.attention for s in g.slots()}
    return keys


def anchored_start(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                   per_layer: frozenset[str]) -> torch.Tensor | None:
    """The first residual map solved only from the slots no chosen per-layer group moves (both states folded).

    Solved from the full correlation before any neuron or head is matched, the per-layer terms (readers and
    writers of every layer) compare unmatched neurons and heads: noise with trace ≈ 0 that swamps the few terms
    whose other axis already corresponds — embeddings, position tables, patch projection, CLS token, classifier or
    LM head, writer and norm biases (:func:`symmerge.groups.residual.anchor_group`). ``None`` when that would be the
    identity start anyway (no per-layer class chosen) or no such slot exists."""
    moved = moved_keys(spec, per_layer)
    anchors = anchor_group(spec.residual, moved) if moved else None
    if anchors is None:
        return None
    return solve_residual(residual_correlation(model, reference, anchors), anchors.kind)


def residual_descent(
    ref_f: Mapping[str, torch.Tensor], model_f: Mapping[str, torch.Tensor], spec: ModelSpec, per_layer: frozenset[str], *,
    start: torch.Tensor | None = None, progress: bool = False, model_name: str = "model", max_iter: int = 20, rtol: float = 1e-7,
) -> Fit:
    """Coordinate descent over the residual map ``Q`` and the per-layer elements ``T`` on *folded* states.

    ``Q`` acts on the residual axis of every tensor and ``T`` on the other axis, so they commute: the ``Q`` step is
    an exact Procrustes given ``T`` (on ``T(model)``), the ``T`` step the usual per-layer fit on ``Q(model)``. A step
    is kept only if it lowers the distance, so the objective never increases. Round 0 uses ``start`` as its ``Q``
    when given (``None``: solved from the full correlation with every per-layer element at the identity).
    ``Fit.history`` holds the distance after each accepted step and ``Fit.steps`` the element reached by each.
    """
    residual = require_residual(spec)
    transform, details, seconds = ModelTransform(), {}, {"residual": 0.0, "ffn": 0.0, "attention": 0.0}
    history, steps = [state_distance(model_f, ref_f)], []
    for i in range(max_iter):
        begin = time.perf_counter()
        per_layer_only = ModelTransform(ffn=transform.ffn, heads=transform.heads)
        if i == 0 and start is not None:
            q = start
        else:
            q = solve_residual(residual_correlation(apply_transform(model_f, spec, per_layer_only), ref_f, residual), residual.kind)
        rotated = apply_residual(model_f, residual, q)
        seconds["residual"] += time.perf_counter() - begin
        fresh = fit_per_layer(ref_f, rotated, spec, per_layer, progress=progress, model_name=model_name)
        for k in ("ffn", "attention"):
            seconds[k] += fresh.seconds[k]
        candidate, cand_details = fresh.transform, fresh.details
        q_only = state_distance(apply_transform(rotated, spec, per_layer_only), ref_f)
        full = state_distance(apply_transform(rotated, spec, candidate), ref_f)
        if full > q_only:  # the fresh per-layer fit is no better: keep the previous one
            candidate, cand_details, full = per_layer_only, details, q_only
        if full >= history[-1]:
            break
        improvement = history[-1] - full
        transform = ModelTransform(ffn=candidate.ffn, heads=candidate.heads, residual=q)
        details = cand_details
        history.append(full)
        steps.append(transform)
        if improvement <= rtol * history[0]:
            break
    return Fit(transform, details, seconds, folded_reference=dict(ref_f), history=history, steps=steps)


def fit_with_residual(
    reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec, symmetries: frozenset[str], *,
    progress: bool = False, model_name: str = "model", max_iter: int = 20, rtol: float = 1e-7,
) -> Fit:
    """The residual map and the per-layer elements together (docs/DESIGN.md §2): both models' norms are folded,
    then :func:`residual_descent` runs from two starts — the identity and :func:`anchored_start` — and the one that
    ends at the lower distance (the objective) is kept, so the result is never worse than either start alone.
    ``details["residual"]``: iterations, the distance history, the start kept and each start's final distance.
    """
    residual = require_residual(spec)
    per_layer = symmetries - {"residual"}
    ref_f, model_f = fold_norms(reference, residual), fold_norms(model, residual)
    begin = time.perf_counter()
    starts = {"identity": None, "anchored": anchored_start(ref_f, model_f, spec, per_layer)}
    anchor_seconds = time.perf_counter() - begin
    runs = {name: residual_descent(ref_f, model_f, spec, per_layer, start=q0, progress=progress, model_name=model_name,
                                   max_iter=max_iter, rtol=rtol)
            for name, q0 in starts.items() if name == "identity" or q0 is not None}
    kept = min(runs, key=lambda name: runs[name].history[-1])  # ties keep the identity start (listed first)
    fit = runs[kept]
    fit.seconds = {k: sum(run.seconds[k] for run in runs.values()) for k in ("residual", "ffn", "attention")}
    fit.seconds["residual"] += anchor_seconds
    fit.details = {**fit.details, "residual": {
        "iterations": len(fit.history) - 1, "distance_history": [round(h, 6) for h in fit.history], "start": kept,
        "final_distance": {name: run.history[-1] for name, run in runs.items()}}}
    return fit
