"""Parameter distance between two models, total and per tensor group (embeddings, attention, FFN, norms, head)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from symmerge.spec import ModelSpec

GROUPS = ("embeddings", "attention", "ffn", "norms", "head", "other")


def tensor_group(key: str, spec: ModelSpec | None) -> str:
    """Which group a tensor belongs to: the spec decides attention and FFN, names decide the rest."""
    if spec is not None:
        for group in spec.attention:
            if key in {s.key for s in group.slots()}:
                return "attention"
        for group in spec.ffn:
            if key in {s.key for s in group.slots()}:
                return "ffn"
    low = key.lower()
    if "norm" in low or ".ln_" in low or low.startswith("ln_"):
        return "norms"
    if any(p in low for p in ("embed", "wte.", "wpe.", "cls_token", "position_embeddings", "patch")):
        return "embeddings"
    if any(p in low for p in ("lm_head", "classifier", "pooler", "cls.", "score.")):
        return "head"
    if any(p in low for p in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(p in low for p in ("mlp", "intermediate", "output.dense", "fc1", "fc2")):
        return "ffn"
    return "other"


def grouped_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: ModelSpec | None) -> dict[str, float]:
    """``{"total": ‖a − b‖, group: ‖a_g − b_g‖ ...}`` over the floating tensors both hold."""
    sq = dict.fromkeys(GROUPS, 0.0)
    for key, t in a.items():
        if key in b and t.is_floating_point():
            sq[tensor_group(key, spec)] += float(torch.linalg.vector_norm(t.float() - b[key].float())) ** 2
    out = {"total": math.sqrt(sum(sq.values()))}
    out.update({g: math.sqrt(v) for g, v in sq.items() if v > 0})
    return out
