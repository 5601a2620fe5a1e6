"""The weight-matching objective: the summed squared distance between two state dicts (docs/DESIGN.md §2),
``Σ_t ‖θ_model,t − θ_ref,t‖²`` over the floating tensors both hold."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

StateDict = Mapping[str, torch.Tensor]


def squared_distances(a: StateDict, b: StateDict, keys: Iterable[str] | None = None) -> dict[str, float]:
    """``‖a_t − b_t‖²`` per floating tensor ``t`` both hold (float32 math: the reduction is pairwise, accurate to ~1e-7)."""
    out = {}
    for k in a if keys is None else keys:
        if k in b and a[k].is_floating_point():
            out[k] = float(torch.linalg.vector_norm(a[k].float() - b[k].float())) ** 2
    return out


def state_distance(a: StateDict, b: StateDict, keys: Iterable[str] | None = None) -> float:
    """``sqrt(Σ_t ‖a_t − b_t‖²)`` over floating tensors."""
    return math.sqrt(sum(squared_distances(a, b, keys).values()))


def state_norm(a: StateDict) -> float:
    """``sqrt(Σ_t ‖a_t‖²)`` over floating tensors."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.float())) ** 2 for t in a.values() if t.is_floating_point()))
