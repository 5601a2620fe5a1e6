"""The residual-stream map ``Q`` (docs/DESIGN.md §2): its closed form given a correlation, the coordinate descent
that alternates it with the per-layer elements, and where that descent starts."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from symmerge.groups import ModelTransform, require_residual
from symmerge.groups.residual import anchor_group, centered_basis, embed_centered, residual_correlation
from symmerge.groups.stream import TransformedState
from symmerge.match.fit import Fit
from symmerge.match.lap import solve_lap
from symmerge.match.objective import squared_distance, state_distance
from symmerge.match.per_layer import ATTENTION_CLASSES, fit_per_layer
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
                   per_layer: frozenset[str], device: torch.device | None = None) -> torch.Tensor | None:
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
    return solve_residual(residual_correlation(model, reference, anchors, device), anchors.kind)


def _distances(views: list[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor]) -> list[float]:
    """``state_distance(view, reference)`` of every view in one pass, in step (views over one lazily transformed
    source then compute each of its units once), in the first view's key order."""
    sq = [0.0] * len(views)
    for k in views[0]:
        if k in reference and views[0][k].is_floating_point():
            r = reference[k].float()
            for i, v in enumerate(views):
                sq[i] += squared_distance(v[k], r)
    return [math.sqrt(x) for x in sq]


def residual_descent(
    ref_f: Mapping[str, torch.Tensor], model_f: Mapping[str, torch.Tensor], spec: ModelSpec, per_layer: frozenset[str], *,
    start: torch.Tensor | None = None, progress: bool = False, model_name: str = "model", max_iter: int = 20, rtol: float = 1e-7,
    deadline: float | None = None, device: torch.device | None = None, executor: Any = None, folded: bool = True,
    label: str = "",
) -> Fit:
    """Coordinate descent over the residual map ``Q`` and the per-layer elements ``T`` on *folded* states
    (``folded=False``: raw states, folded unit by unit on the fly).

    ``Q`` acts on the residual axis of every tensor and ``T`` on the other axis, so they commute: the ``Q`` step is
    an exact Procrustes given ``T`` (on ``T(model)``), the ``T`` step the usual per-layer fit on ``Q(model)``. A step
    is kept only if it lowers the distance, so the objective never increases. Round 0 uses ``start`` as its ``Q``
    when given (``None``: solved from the full correlation with every per-layer element at the identity).
    ``Fit.history`` holds the distance after each accepted step and ``Fit.steps`` the element reached by each.

    ``deadline`` (a ``time.perf_counter()`` value): the first round always runs; a further round starts only if the
    last round's duration still fits before it. Stopping early returns the best element so far (every kept step
    lowered the distance). ``device``: where the correlation, its SVD and the per-layer fits run; ``executor``:
    where the per-layer fits run (:func:`~symmerge.match.per_layer.fit_per_layer`). ``progress``: one bar for the
    whole descent (``label`` names the start), its total growing by one round's groups as each round begins.

    Streamed (bounded memory): every state it builds is a :class:`~symmerge.groups.stream.TransformedState`,
    computed one unit of tensors at a time — the correlation accumulated tensor by tensor, ``Q`` and the per-layer
    elements applied unit by unit when read — so memory holds a few units per model, never a transformed copy of a
    model, whatever its size. The values are those of the whole-model functions (same operations, same tensors).
    """
    residual = require_residual(spec)
    fold = not folded
    ref_v, model_v = TransformedState(ref_f, spec, fold=fold), TransformedState(model_f, spec, fold=fold)
    transform, details, seconds = ModelTransform(), {}, {"residual": 0.0, "ffn": 0.0, "attention": 0.0}
    history, steps, round_seconds, out_of_time = [state_distance(model_v, ref_v)], [], [], False
    bar = tqdm(total=0, desc=f"aligning {model_name}" + (f" ({label})" if label else ""), unit="group", disable=not progress, leave=False)
    for i in range(max_iter):
        if deadline is not None and round_seconds and time.perf_counter() + round_seconds[-1] > deadline:
            out_of_time = True
            break
        begin = time.perf_counter()
        per_layer_only = ModelTransform(ffn=transform.ffn, heads=transform.heads)
        if i == 0 and start is not None:
            q = start
        else:
            moved = TransformedState(model_f, spec, per_layer_only, fold=fold)
            q = solve_residual(residual_correlation(moved, ref_v, residual, device), residual.kind)
        rotated = TransformedState(model_f, spec, ModelTransform(residual=q), fold=fold)
        seconds["residual"] += time.perf_counter() - begin
        bar.set_postfix_str(f"round {i + 1}", refresh=False)
        fresh = fit_per_layer(ref_v, rotated, spec, per_layer, progress=progress, model_name=model_name, device=device,
                              executor=executor, bar=None if executor is not None else bar)
        for k in ("ffn", "attention"):
            seconds[k] += fresh.seconds[k]
        candidate, cand_details = fresh.transform, fresh.details
        q_only, full = _distances([TransformedState(rotated, spec, per_layer_only), TransformedState(rotated, spec, candidate)], ref_v)
        round_seconds.append(time.perf_counter() - begin)
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
    bar.close()
    details = {**details, "residual": {"round_seconds": [round(t, 4) for t in round_seconds], "stopped_by_max_seconds": out_of_time}}
    return Fit(transform, details, seconds, folded_reference=ref_v, history=history, steps=steps)


def fit_with_residual(
    reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec, symmetries: frozenset[str], *,
    progress: bool = False, model_name: str = "model", max_iter: int = 20, rtol: float = 1e-7, max_seconds: float | None = None,
    device: torch.device | None = None, executor: Any = None,
) -> Fit:
    """The residual map and the per-layer elements together (docs/DESIGN.md §2): both models' norms are folded
    (lazily, unit by unit: ``reference`` and ``model`` may be memory-mapped), then :func:`residual_descent` runs
    from two starts — the identity and :func:`anchored_start` — and the one that ends at the lower distance (the
    objective) is kept, so the result is never worse than either start alone.
    ``details["residual"]``: iterations, the distance history, the start kept and each start's final distance,
    seconds per round and whether ``max_seconds`` (one budget for both descents) stopped it.
    """
    require_residual(spec)
    per_layer = symmetries - {"residual"}
    begin = time.perf_counter()
    ref_f, model_f = TransformedState(reference, spec, fold=True), TransformedState(model, spec, fold=True)
    deadline = None if max_seconds is None else begin + max_seconds
    starts = {"identity": None, "anchored": anchored_start(ref_f, model_f, spec, per_layer, device)}
    anchor_seconds = time.perf_counter() - begin
    runs = {name: residual_descent(reference, model, spec, per_layer, start=q0, progress=progress, model_name=model_name,
                                   max_iter=max_iter, rtol=rtol, deadline=deadline, device=device, executor=executor, folded=False,
                                   label=f"residual descent, {name} start")
            for name, q0 in starts.items() if name == "identity" or q0 is not None}
    kept = min(runs, key=lambda name: runs[name].history[-1])  # ties keep the identity start (listed first)
    fit = runs[kept]
    fit.seconds = {k: sum(run.seconds[k] for run in runs.values()) for k in ("residual", "ffn", "attention")}
    fit.seconds["residual"] += anchor_seconds
    fit.details = {**fit.details, "residual": {
        "iterations": len(fit.history) - 1, "distance_history": [round(h, 6) for h in fit.history], "start": kept,
        "final_distance": {name: run.history[-1] for name, run in runs.items()},
        "round_seconds": fit.details["residual"]["round_seconds"],
        "stopped_by_max_seconds": any(run.details["residual"]["stopped_by_max_seconds"] for run in runs.values())}}
    return fit
