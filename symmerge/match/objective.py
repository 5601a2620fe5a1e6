"""The weight-matching objective: the summed squared distance between two state dicts (docs/DESIGN.md §2),
``Σ_t ‖θ_model,t − θ_ref,t‖²`` over the floating tensors both hold."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

StateDict = Mapping[str, torch.Tensor]


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖²`` of two tensors (float32 math: the reduction is pairwise, accurate to ~1e-7)."""
    return float(torch.linalg.vector_norm(a.float() - b.float())) ** 2


def squared_distances(a: StateDict, b: StateDict, keys: Iterable[str] | None = None) -> dict[str, float]:
    """``‖a_t − b_t‖²`` per floating tensor ``t`` both hold (:func:`squared_distance`)."""
    return {k: squared_distance(a[k], b[k]) for k in (a if keys is None else keys) if k in b and a[k].is_floating_point()}


def report_distances(model: StateDict, reference: StateDict, aligned: StateDict, partner: StateDict,
                     moved: Iterable[str], known: Mapping[str, tuple[float, float]] | None = None) -> tuple[dict[str, float], dict[str, float], float]:
    """An alignment report's three sums in one pass over the tensors, in ``aligned``'s key order (unit order for a
    lazily transformed state): ``‖θ_model − θ_ref‖²`` per tensor (before), ``‖T(θ_model) − θ_partner‖²`` for the
    ``moved`` tensors and the before value for the rest (after; identity elements and untouched tensors do not
    change), and ``Σ ‖θ_ref‖²`` over every floating tensor of ``reference``. The same values as
    :func:`squared_distances` and :func:`state_norm` (same float32 reductions), but every tensor is read once
    instead of in three separate passes. (At 7B, where the two checkpoints do not fit in memory together, the
    report stayed disk-bound all the same: 124 s with three passes, 137 s with one, on a machine running slower.)
    ``known``: ``(before, ‖θ_ref‖²)`` per key already measured by the matcher while it read the tensors
    (``Fit.distances``): those tensors are not read for the before sum (nor at all, unless moved)."""
    moved = set(moved)
    known = known or {}
    before, after, ref_sq = {}, {}, 0.0
    for k in aligned:
        if k in known:
            before[k] = known[k][0]
            ref_sq += known[k][1]
        elif k in model and k in reference and model[k].is_floating_point():
            r = reference[k].float()
            before[k] = squared_distance(model[k], r)
            ref_sq += float(torch.linalg.vector_norm(r)) ** 2
        if k in moved and k in partner and partner[k].is_floating_point():
            after[k] = squared_distance(aligned[k], partner[k])
        elif k in before:
            after[k] = before[k]
    for k in reference:
        if k not in before and reference[k].is_floating_point():
            ref_sq += float(torch.linalg.vector_norm(reference[k].float())) ** 2
    return before, after, ref_sq


def state_distance(a: StateDict, b: StateDict, keys: Iterable[str] | None = None) -> float:
    """``sqrt(Σ_t ‖a_t − b_t‖²)`` over floating tensors."""
    return math.sqrt(sum(squared_distances(a, b, keys).values()))


def state_norm(a: StateDict) -> float:
    """``sqrt(Σ_t ‖a_t‖²)`` over floating tensors."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.float())) ** 2 for t in a.values() if t.is_floating_point()))
