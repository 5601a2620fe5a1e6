"""Parameter settings as mergekit writes them: scalars, gradients, and tensor-name filters.

A setting is one of

- a scalar: ``0.5``, ``true``, ``"l1"``;
- a gradient: a list of N anchors spread evenly over a slice's layers (``[0, 0.5, 1]``); layer ``i`` of a slice
  of ``n`` layers sits at ``t = i / (n − 1)`` (``t = 1`` for a one-layer slice; ``t = 0`` for the tensors outside
  the layers: embeddings, final norm, head) and takes the linear interpolation of the two anchors around
  ``t · (N − 1)``; a list of words or booleans picks ``anchors[int(t · (N − 1))]``;
- a filtered list: ``[{filter: self_attn, value: ...}, {filter: mlp, value: ...}, {value: ...}]``: the first entry
  whose ``filter`` occurs in the tensor's name (or has no filter, or ``"*"``) gives the value, itself a scalar or a
  gradient; none matching: the setting is not given for that tensor. A single ``{filter, value}`` mapping is a
  one-entry list.

Where a value comes from follows mergekit's precedence, highest first: a slice source's (or a model's) own
``parameters``, the output slice's ``parameters``, the recipe's top-level ``parameters``; then the method's default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from symmerge.errors import shorten

MAX_ANCHORS = 4096


def _scalar(v: Any) -> bool:
    if isinstance(v, bool) or isinstance(v, str):
        return not isinstance(v, str) or len(v) <= 80
    if isinstance(v, (int, float)):
        try:
            return math.isfinite(float(v))
        except OverflowError:
            return False
    return False


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_setting(value: Any, where: str) -> Any:
    """``value`` if it is a well-formed setting, else ``ValueError`` naming ``where``; mappings are normalised to
    ``{"filter": str | None, "value": ...}``."""
    if value is None or _scalar(value):
        return value
    if isinstance(value, Mapping):
        return [_condition(value, where)]
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: an empty list is not a value (a gradient needs at least one anchor)")
        if len(value) > MAX_ANCHORS:
            raise ValueError(f"{where}: {len(value)} anchors (at most {MAX_ANCHORS})")
        if all(_scalar(v) for v in value):
            return value
        if all(isinstance(v, Mapping) for v in value):
            return [_condition(v, where) for v in value]
    raise ValueError(f"{where} must be a number, true/false, a word, a list of them (a gradient over the layers) or a "
                     f"list of {{filter: NAME, value: ...}}, got {shorten(value)}")


def _condition(entry: Mapping, where: str) -> dict:
    extra = set(entry) - {"filter", "value"}
    if extra:
        # an early mergekit example wrote pattern: for filter:; mergekit ignores the key, so that entry matches every tensor
        hint = ": write filter (mergekit ignores pattern, so its entry would apply to every tensor)" if "pattern" in extra else ""
        raise ValueError(f"{where}: unknown key {shorten(sorted(map(str, extra))[0])} in a filtered value (keys: filter, value){hint}")
    if "value" not in entry:
        raise ValueError(f"{where}: a filtered entry needs a value")
    f = entry.get("filter")
    if f is not None and (not isinstance(f, str) or len(f) > 200):
        raise ValueError(f"{where}: filter is a part of a tensor name such as self_attn or mlp, got {shorten(f)}")
    inner = entry["value"]
    if not (_scalar(inner) or isinstance(inner, list) and inner and len(inner) <= MAX_ANCHORS and all(_scalar(v) for v in inner)):
        raise ValueError(f"{where}: a filtered value is a number, a word or a gradient (a list of numbers), got {shorten(inner)}")
    return {"filter": f, "value": inner}


def leaves(setting: Any) -> Iterable[Any]:
    """Every scalar a setting can produce as is (the anchors of gradients; interpolations lie between them)."""
    if isinstance(setting, list):
        for v in setting:
            yield from leaves(v["value"]) if isinstance(v, dict) else (v,)
    elif setting is not None:
        yield setting


def is_plain(setting: Any) -> bool:
    """A scalar: the same value for every tensor."""
    return not isinstance(setting, list)


def has_gradient(setting: Any) -> bool:
    """Whether the setting's value can depend on ``t`` (a layer's place in its slice): a gradient of two or more
    different anchors, itself or under a filter."""
    if not isinstance(setting, list):
        return False
    if setting and isinstance(setting[0], dict):
        return any(has_gradient(cond["value"]) for cond in setting)
    return any(v != setting[0] for v in setting)


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for the tensor ``tensor_name`` at position ``t`` ∈ [0, 1] of its slice, or ``None``
    when a filtered list has no entry for it."""
    if not isinstance(setting, list):
        return setting
    if setting and isinstance(setting[0], dict):
        for cond in setting:
            f = cond["filter"]
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate(cond["value"], tensor_name, t)
        return None
    n = len(setting)
    if not all(_numeric(v) for v in setting):
        return setting[int(t * (n - 1))]
    scaled = t * (n - 1)
    i0 = int(scaled)
    i1 = min(n - 1, i0 + 1)
    frac = scaled - i0
    if frac == 0:
        return setting[i0]
    return (1 - frac) * setting[i0] + frac * setting[i1]


def resolve(key: str, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float) -> Any:
    """The first value of ``key`` found in ``scopes`` (highest precedence first) for this tensor, or ``None``."""
    for scope in scopes:
        if scope and key in scope:
            value = evaluate(scope[key], tensor_name, t)
            if value is not None:
                return value
    return None


def layer_position(index: int, length: int) -> float:
    """mergekit's ``t`` of the ``index``-th layer of a slice of ``length`` layers."""
    return index / (length - 1) if length > 1 else 1.0
