"""Align one model to a reference: spec → matcher.fit → groups.apply → report.

:func:`align` brings a model into a reference's basis without changing what it computes: it reads the spec,
asks the chosen matcher (:data:`symmerge.match.MATCHERS`) for a group element, applies it, and reports the
distance per group before and after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.groups import SYMMETRY_CLASSES, ModelTransform, apply_transform, parse_symmetries, random_transform
from symmerge.groups.residual import can_unfold, unfold_norms, with_untied_head
from symmerge.match import get_matcher, squared_distances, state_norm
from symmerge.spec import ModelSpec, check_compatible, check_same_shape, spec_for, untied_head

StateDict = Mapping[str, torch.Tensor]


@dataclass
class GroupReport:
    name: str
    kind: str  # "ffn" | "attention"
    distance_before: float  # ‖θ_model − θ_ref‖ over the tensors this group touches
    distance_after: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AlignmentReport:
    symmetries: tuple[str, ...]
    groups: list[GroupReport]
    distance_before: float  # over every tensor both state dicts hold
    distance_after: float
    reference_norm: float
    seconds: dict[str, float]
    matching: dict[str, Any] = field(default_factory=dict)  # how the element was found (e.g. learned-matching losses)

    @property
    def relative_before(self) -> float:
        return self.distance_before / max(self.reference_norm, 1e-30)

    @property
    def relative_after(self) -> float:
        return self.distance_after / max(self.reference_norm, 1e-30)

    def table(self) -> str:
        """Per-group distances before → after, then the totals and stage times."""
        lines = [f"{'group':<24} {'before':>12} {'after':>12}  details"]
        for g in self.groups:
            detail = ", ".join(f"{k}={_fmt(v)}" for k, v in g.details.items())
            lines.append(f"{g.name:<24} {g.distance_before:>12.5g} {g.distance_after:>12.5g}  {detail}")
        lines.append(
            f"{'whole model':<24} {self.distance_before:>12.5g} {self.distance_after:>12.5g}  "
            f"relative {self.relative_before:.4g} → {self.relative_after:.4g}"
        )
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


@dataclass
class Alignment:
    """The result of :func:`align`: the aligned state dict, the group element that produced it, and a report."""

    state_dict: dict[str, torch.Tensor]
    transform: ModelTransform
    report: AlignmentReport
    spec: ModelSpec
    folded_reference: dict[str, torch.Tensor] | None = None  # residual class: the reference with its norms folded
    folded: bool = False  # state_dict is still folded (the reference has a zero norm gain): merge it with folded_reference

    @property
    def merge_partner(self) -> dict[str, torch.Tensor] | None:
        """What to average ``state_dict`` with when it is folded (``folded_reference``); ``None`` when it lives in
        the reference's own parametrisation and the reference itself is the partner."""
        return self.folded_reference if self.folded else None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def as_state_and_config(model: Any, config: Any = None) -> tuple[StateDict, Any]:
    """Accept an ``nn.Module`` with ``.config`` (a Hugging Face model) or a plain state dict plus ``config``."""
    if isinstance(model, torch.nn.Module):
        return model.state_dict(), config if config is not None else getattr(model, "config", None)
    if isinstance(model, Mapping):
        return model, config
    raise TypeError(f"expected a state dict or an nn.Module, got {type(model).__name__}")


def align(
    reference: Any,
    model: Any,
    *,
    symmetries: str | Iterable[str] | None = "all",
    config: Any = None,
    spec: ModelSpec | None = None,
    progress: bool = False,
    model_name: str = "model",
    match: str = "weights",
    calibration: list | None = None,
    learn_steps: int = 200,
    learn_seconds: float | None = None,
    learn_path: str = "random",
) -> Alignment:
    """Bring ``model`` into ``reference``'s basis without changing what ``model`` computes.

    ``reference``, ``model``: Hugging Face modules or state dicts (then pass the HF ``config``, an object or the
    config.json dict, or a ready ``spec``). ``symmetries``: any of ``ffn, qk, vo, scale, heads, residual``
    (comma-separated or a list), ``"all"`` (the per-layer classes, default) or ``"none"``. ``match``:
    ``"weights"`` (data-free), ``"activations"`` (cross-correlations of activations on ``calibration``, a list of
    model-input batches) or ``"learned"`` (weight matching refined for ``learn_steps`` steps to lower the midpoint
    model's loss on ``calibration``, batches with labels; ``learn_seconds`` caps its time; ``learn_path``: ``"random"``
    points of the path, default, or ``"midpoint"``). Returns an :class:`Alignment`; ``model`` is not modified.
    """
    chosen = parse_symmetries(symmetries)
    ref_state, ref_config = as_state_and_config(reference, config)
    model_state, model_config = as_state_and_config(model, config)
    if spec is None:
        if ref_config is None:
            raise SymmergeError("pass the model's config (or a spec) to align plain state dicts")
        spec = spec_for(ref_config, ref_state.keys())
        if model_config is not None and model_config is not ref_config:
            check_same_shape(spec, spec_for(model_config, model_state.keys()), model_name)
    check_compatible(ref_state, model_state, model_name, untied_head(spec, chosen))

    fit = get_matcher(match)(ref_state, model_state, spec, chosen, config=ref_config if ref_config is not None else model_config,
                             calibration=calibration, progress=progress, model_name=model_name, learn_steps=learn_steps,
                             learn_seconds=learn_seconds, learn_path=learn_path)
    transform, details, seconds, folded = fit.transform, fit.details, dict(fit.seconds), fit.folded_reference
    start = time.perf_counter()
    aligned = apply_transform(model_state, spec, transform)
    # the residual class folds norms: unfold with the reference's gains, so the aligned model lives in the
    # reference's own parametrisation (merge it with the reference itself), unless a zero gain forbids it
    still_folded = folded is not None and not can_unfold(ref_state, spec.residual)
    if folded is not None and not still_folded:
        aligned = unfold_norms(aligned, spec.residual, ref_state)
    seconds["apply"] = time.perf_counter() - start
    start = time.perf_counter()
    before = squared_distances(model_state, ref_state)
    if folded is None:
        after = dict(before)  # tensors no group touched are unchanged
        after.update(squared_distances(aligned, ref_state, spec.touched_keys() & before.keys()))
    else:  # the residual map touches every tensor (a head folding untied is compared with the tied embedding)
        after = squared_distances(aligned, folded if still_folded else with_untied_head(ref_state, spec.residual))
    groups = []
    for kind, group_list in (("ffn", spec.ffn), ("attention", spec.attention)):
        for group in group_list:
            keys = {s.key for s in group.slots()}
            groups.append(GroupReport(group.name, kind, math.sqrt(sum(before[k] for k in keys)),
                                      math.sqrt(sum(after[k] for k in keys)), details.get(group.name, {})))
    if folded is not None:
        keys = spec.residual.keys() & before.keys()
        groups.append(GroupReport("residual", "residual", math.sqrt(sum(before[k] for k in keys)),
                                  math.sqrt(sum(after[k] for k in keys)), details.get("residual", {})))
    report = AlignmentReport(
        symmetries=tuple(s for s in SYMMETRY_CLASSES if s in chosen),
        groups=groups,
        distance_before=math.sqrt(sum(before.values())),
        distance_after=math.sqrt(sum(after.values())),
        reference_norm=state_norm(ref_state),
        seconds=seconds,
        matching={"method": match, **({"learned": details["learned"]} if "learned" in details else {})},
    )
    seconds["report"] = time.perf_counter() - start
    return Alignment(aligned, transform, report, spec, folded, still_folded)


def apply_random_symmetry(model: Any, *, symmetries: str | Iterable[str] | None = "all", seed: int = 0, config: Any = None,
                          max_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """A seeded random element of the chosen symmetry classes applied to ``model`` (a module or a state dict with
    ``config``): a new state dict that computes exactly the same function. For tests and demos."""
    state, cfg = as_state_and_config(model, config)
    if cfg is None:
        raise SymmergeError("pass the model's config to scramble a plain state dict")
    spec = spec_for(cfg, state.keys())
    return apply_transform(state, spec, random_transform(spec, symmetries, seed=seed, max_scale=max_scale))
