"""Parameter distance between two models, total and per tensor group (embeddings, attention, FFN, norms, head):
the groups come from the spec (:meth:`symmerge.spec.ModelSpec.tensor_groups`), never from tensor names."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from symmerge.match import squared_distances
from symmerge.spec import TENSOR_GROUPS, ModelSpec


def grouped_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, float]:
    """``{"total": ‖a − b‖, group: ‖a_g − b_g‖ ...}`` over the floating tensors both hold."""
    group_of = spec.tensor_groups(a.keys())
    sq = dict.fromkeys(TENSOR_GROUPS, 0.0)
    for key, d in squared_distances(a, b).items():
        sq[group_of[key]] += d
    out = {"total": math.sqrt(sum(sq.values()))}
    out.update({g: math.sqrt(v) for g, v in sq.items() if v > 0})
    return out
