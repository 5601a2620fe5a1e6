"""What every matcher returns, and the registry of matchers by name.

A matcher finds the group element bringing ``model`` closest to ``reference`` by its own criterion — weights
(data-free), activations or a learned midpoint loss — and has one signature::

    matcher(reference, model, spec, symmetries, *, config=None, calibration=None, progress=False,
            model_name="model", learn_steps=200, max_seconds=None, device=None, executor=None,
            learn_seconds=None, learn_path="random") -> Fit

``reference`` and ``model`` are state dicts of one ``spec``; ``symmetries`` a validated set of class names;
``max_seconds`` a time budget for iterative searches (the residual descent), ``None`` for none; ``device`` the
``torch.device`` the math runs on (:mod:`symmerge.match.device`; LAPs on the CPU, the element returned on the CPU);
``executor`` where weight matching's per-layer fits run (:mod:`symmerge.match.distributed`), ``None`` for here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.groups import ModelTransform


@dataclass
class Fit:
    """A matcher's result.

    ``transform``: the group element (apply it with :func:`symmerge.groups.apply_transform`).
    ``details``: per group name, what the report shows (neurons moved, rotation angles, ...).
    ``seconds``: per stage. ``folded_reference``: with the residual class, the reference with its norms folded
    — the parametrisation the transformed model is compared in (``None`` otherwise); weight matching returns it
    as a lazily folded mapping (:class:`~symmerge.groups.stream.TransformedState`), computed unit by unit.
    ``history``: the objective after each accepted step of an iterative matcher (residual descent, learning), and
    ``steps`` the element after each of them (where the matcher records them). ``distances``: per tensor key,
    ``(‖θ_model − θ_ref‖², ‖θ_ref‖²)`` of the models as given, where the matcher measured them while it read the
    tensors (the report reuses them instead of reading both models again).
    """

    transform: ModelTransform
    details: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    folded_reference: Mapping[str, torch.Tensor] | None = None
    history: list[float] = field(default_factory=list)
    steps: list[ModelTransform] = field(default_factory=list)  # the element after each accepted step (history[i + 1])
    distances: dict[str, tuple[float, float]] = field(default_factory=dict)


Matcher = Callable[..., Fit]
MATCHERS: dict[str, Matcher] = {}


def matcher(name: str) -> Callable[[Matcher], Matcher]:
    """Register a matcher under ``name`` (``--match NAME`` on the command line)."""
    def register(fn: Matcher) -> Matcher:
        MATCHERS[name] = fn
        return fn
    return register


def get_matcher(name: Any) -> Matcher:
    if name not in MATCHERS:
        raise SymmergeError(f"match must be one of {', '.join(MATCHERS)}, got {name!r}")
    return MATCHERS[name]
