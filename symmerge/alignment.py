"""Align one model to a reference: spec → matcher.fit → groups.apply → report.

:func:`align` brings a model into a reference's basis without changing what it computes: it reads the spec,
asks the chosen matcher (:data:`symmerge.match.MATCHERS`) for a group element, applies it, and reports the
distance per group before and after.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.groups import (
    AUTO,
    SYMMETRY_CLASSES,
    ModelTransform,
    after_embedding,
    apply_transform,
    embedding_transform,
    is_auto,
    parse_symmetries,
    random_transform,
    resolve_symmetries,
)
from symmerge.groups.ffn import is_identity
from symmerge.groups.residual import can_unfold, unfold_norms, with_untied_head
from symmerge.groups.stream import TransformedState
from symmerge.groups.transform import is_identity_element
from symmerge.io.stream import stream_into
from symmerge.match import get_matcher, resolve_device, squared_distances, state_distance, state_norm
from symmerge.match.fit import Fit
from symmerge.match.objective import report_distances
from symmerge.match.per_layer import MIN_GAIN, fit_gain
from symmerge.spec import (
    ModelSpec,
    check_compatible,
    check_embeddable,
    check_floating,
    check_same_shape,
    resized_keys,
    spec_for,
    untied_head,
    widths_differ,
)

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
        if "near_identity" in self.matching:
            lines.append(f"not applied: {self.matching['near_identity']['reason']}")
        return "\n".join(lines)


@dataclass
class Alignment:
    """The result of :func:`align`: the aligned state dict, the group element that produced it, and a report."""

    state_dict: Mapping[str, torch.Tensor]  # a dict, or for memory-mapped inputs a TransformedState (computed when read)
    transform: ModelTransform
    report: AlignmentReport
    spec: ModelSpec
    folded_reference: Mapping[str, torch.Tensor] | None = None  # residual class: the reference with its norms folded
    folded: bool = False  # state_dict is still folded (the reference has a zero norm gain): merge it with folded_reference
    fed: bool = False  # the sink align was given has received state_dict (in the report's pass)

    @property
    def merge_partner(self) -> dict[str, torch.Tensor] | None:
        """What to average ``state_dict`` with when it is folded (``folded_reference``); ``None`` when it lives in
        the reference's own parametrisation and the reference itself is the partner."""
        return self.folded_reference if self.folded else None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def as_state_and_config(model: Any, config: Any = None) -> tuple[StateDict, Any]:
    """Accept an ``nn.Module`` with ``.config`` (a Hugging Face model) or a plain state dict plus ``config``. Anything
    else is a ``TypeError`` that says what to pass, raised here rather than as an attribute error deep in a matcher
    (a dict of numpy arrays) or as a missing ``model_type`` (a config given as a name or a path)."""
    if isinstance(config, (str, bytes, os.PathLike, int, float)):
        raise TypeError(f"config must be a transformers config or a config.json dict, got {type(config).__name__} "
                        f"{config!r:.80}: load it with transformers.AutoConfig.from_pretrained")
    if isinstance(model, torch.nn.Module):
        return model.state_dict(), config if config is not None else getattr(model, "config", None)
    if isinstance(model, Mapping):
        # a plain dict's values are in memory: check them (a lazy mapping's are read on access, and are tensors)
        bad = next((k for k, v in model.items() if not isinstance(v, torch.Tensor)), None) if isinstance(model, dict) else None
        if bad is not None:
            raise TypeError(f"state dict entry {bad!r} is a {type(model[bad]).__name__}, not a torch.Tensor: "
                            "convert it (torch.from_numpy for numpy arrays)")
        return model, config
    hint = (": load the folder first (transformers' from_pretrained, or safetensors.torch.load_file), or use the symmerge command line"
            if isinstance(model, (str, os.PathLike)) else "")
    raise TypeError(f"expected a state dict or an nn.Module, got {type(model).__name__}{hint}")


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
    max_seconds: float | None = None,
    device: str | torch.device | None = "cpu",
    ray: Any = None,
    model_spec: ModelSpec | None = None,
    sink: Callable[[str, torch.Tensor], None] | None = None,
    feed_if: Callable[[ModelTransform], bool] | None = None,
) -> Alignment:
    """Bring ``model`` into ``reference``'s basis without changing what ``model`` computes.

    ``reference``, ``model``: Hugging Face modules or state dicts (then pass the HF ``config``, an object or the
    config.json dict, or a ready ``spec``). ``symmetries``: any of ``ffn, qk, vo, scale, heads, residual``
    (comma-separated or a list), ``"all"`` (the per-layer classes, default), ``"none"``, or ``"auto"`` (per family:
    ``all,residual`` where the residual group is a rotation group, else ``all``; with weight matching, the residual
    map is kept only if it lowers the distance by ``AUTO_MARGIN`` over ``all`` alone). ``match``:
    ``"weights"`` (data-free), ``"activations"`` (cross-correlations of activations on ``calibration``, a list of
    model-input batches) or ``"learned"`` (weight matching refined for ``learn_steps`` steps to lower the midpoint
    model's loss on ``calibration``, batches with labels; ``learn_seconds`` caps its time; ``learn_path``: ``"random"``
    points of the path, default, or ``"midpoint"``). ``max_seconds``: a time budget for the residual
    coordinate descent (it stops before a round that would exceed it and keeps the best element so far).
    ``device``: ``"cpu"`` (default), ``"cuda"`` or ``"auto"``: where the matcher's GEMMs, SVDs, quartics and
    statistics run (the LAPs always run on the CPU; the result is on the CPU). ``ray``: a
    :class:`symmerge.match.distributed.RayExecutor` (e.g. ``RayExecutor("auto")``, ``pip install 'symmerge[ray]'``)
    to run weight matching's per-layer fits as Ray tasks, with the same result; ``device`` then refers to the
    cluster's workers. ``model_spec``: the model's own spec, when it is narrower than the reference (fewer FFN
    neurons or heads; read from the model's config when both configs are given): the model is then embedded into
    the reference's widths by semi-permutations (docs/DESIGN.md §1), by weight matching (with the residual class:
    grown by the identity embedding first, then aligned as a same-shape model). Returns an :class:`Alignment`;
    ``model`` is not modified. A ``model`` that is a mapping but
    not a dict (a memory-mapped :class:`~symmerge.io.stream.LazyState`) is aligned lazily: ``state_dict`` is then a
    :class:`~symmerge.groups.stream.TransformedState`, computed one group of tensors at a time when read (write it
    with :func:`~symmerge.io.stream.save_streamed`), with the same values as the in-memory path. ``sink``: called once
    with every ``(key, aligned tensor)``, in ``state_dict``'s order (a :class:`~symmerge.io.stream.ShardWriter`'s
    ``add``); where the report is measured in one pass over the aligned tensors, the sink is fed in that pass, so a
    lazily aligned model is computed once for both (``seconds["report"]`` then includes the sink's time).
    ``feed_if``: feed ``sink`` only if this holds of the fitted element (``Alignment.fed`` says whether it was fed;
    :func:`_auto_weights`' speculative write). With ``auto`` (residual class, weight matching), a sink with a
    ``restart()`` method (a :class:`~symmerge.io.stream.ShardWriter`) is fed in the per-layer candidate's report pass
    when that candidate permutes nothing (a fine-tune), and restarted in the rare case the residual map is then fitted
    and kept: the fine-tune's aligned tensors are computed once, not once for the report and again for the write.
    """
    auto = is_auto(symmetries)
    chosen = None if auto else parse_symmetries(symmetries)
    device = resolve_device(device) if ray is None else ray.resolve_device(device)
    ref_state, ref_config = as_state_and_config(reference, config)
    model_state, model_config = as_state_and_config(model, config)
    if spec is None:
        if ref_config is None:
            raise SymmergeError("pass the model's config (or a spec) to align plain state dicts")
        spec = spec_for(ref_config, ref_state.keys())
        if model_spec is None and model_config is not None and model_config is not ref_config:
            model_spec = spec_for(model_config, model_state.keys())
    wider = model_spec is not None and widths_differ(spec, model_spec)
    if wider:
        check_embeddable(spec, model_spec, model_name)
        if "residual" in (resolve_symmetries(AUTO, spec) if auto else chosen):
            return _align_embedded(ref_state, model_state, spec, model_spec, symmetries if auto else chosen, config=ref_config,
                                   match=match, progress=progress, model_name=model_name, max_seconds=max_seconds, device=device, ray=ray,
                                   sink=sink)
        return _fed(_align_narrower(ref_state, model_state, spec, model_spec, chosen, auto=auto, match=match, progress=progress,
                                    model_name=model_name, device=device), sink)
    if model_spec is not None:
        check_same_shape(spec, model_spec, model_name)
    if auto or chosen:
        check_floating(spec, ref_state, "the reference")
        check_floating(spec, model_state, model_name)
    if auto:
        chosen = resolve_symmetries(symmetries, spec)
        if "residual" in chosen and match == "weights":
            return _auto_weights(reference, model, chosen, sink, config=config, spec=spec, progress=progress, model_name=model_name,
                                 max_seconds=max_seconds, device=device, ray=ray)
    check_compatible(ref_state, model_state, model_name, untied_head(spec, chosen))

    fit = get_matcher(match)(ref_state, model_state, spec, chosen, config=ref_config if ref_config is not None else model_config,
                             calibration=calibration, progress=progress, model_name=model_name, learn_steps=learn_steps,
                             learn_seconds=learn_seconds, learn_path=learn_path, max_seconds=max_seconds, device=device, executor=ray)
    transform, details, seconds, folded = fit.transform, fit.details, dict(fit.seconds), fit.folded_reference
    snapped_gain = _near_identity_gain(fit, ref_state, model_state, spec) if match == "weights" and folded is None else None
    if snapped_gain is not None:  # fine-tunes of one base: keep the model as it is, as merge does (MIN_GAIN)
        transform = ModelTransform()
    in_memory = isinstance(model_state, dict)
    if folded is not None and in_memory:
        folded = dict(folded)
    start = time.perf_counter()
    # the residual class folds norms: unfold with the reference's gains, so the aligned model lives in the
    # reference's own parametrisation (merge it with the reference itself), unless a zero gain forbids it
    still_folded = folded is not None and not can_unfold(ref_state, spec.residual)
    unfold_with = ref_state if folded is not None and not still_folded else None
    if in_memory:
        aligned = apply_transform(model_state, spec, transform)
        if unfold_with is not None:
            aligned = unfold_norms(aligned, spec.residual, unfold_with)
    else:  # memory-mapped (LazyState): computed unit by unit when read, so writing it streams (io.stream.save_streamed)
        aligned = TransformedState(model_state, spec, transform, fold=transform.residual is not None, unfold_with=unfold_with)
    seconds["apply"] = time.perf_counter() - start
    start = time.perf_counter()
    if folded is None:  # tensors no group touched are unchanged, and so are those of identity elements (fine-tunes)
        partner = ref_state
        moved = {s.key for g in spec.groups() if not is_identity_element(g, transform) for s in g.slots()}
    else:  # the residual map touches every tensor (a head folding untied is compared with the tied embedding)
        partner = folded if still_folded else (with_untied_head(ref_state, spec.residual) if isinstance(ref_state, dict)
                                               else TransformedState(ref_state, spec, untie=True))
        moved = set(aligned)
    feed = sink if sink is not None and (feed_if is None or feed_if(transform)) else None
    _announce(feed, aligned)
    before, after, ref_sq = report_distances(model_state, ref_state, aligned, partner, moved, known=fit.distances, sink=feed)
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
        reference_norm=math.sqrt(ref_sq),
        seconds=seconds,
        matching={"method": match, **({"learned": details["learned"]} if "learned" in details else {})},
    )
    if snapped_gain is not None:
        report.matching["near_identity"] = {
            "gain": snapped_gain, "min_gain": MIN_GAIN, "applied": False,
            "reason": f"the fitted rotations and scales lower the distance by {snapped_gain:.2%} <= {MIN_GAIN:.0%} and nothing is permuted "
                      "(fine-tunes of one base): the model is kept as it is"}
    seconds["report"] = time.perf_counter() - start
    return Alignment(aligned, transform, report, spec, folded, still_folded, fed=feed is not None)


def _near_identity_gain(fit: Fit, ref_state: StateDict, model_state: StateDict, spec: ModelSpec) -> float | None:
    """The fit's gain when its element is within tolerance of the identity — it permutes nothing (the certificates'
    verdict on fine-tunes of one base) and its rotations and scales lower the distance by no more than
    ``MIN_GAIN`` (:func:`~symmerge.match.per_layer.fit_gain`, read off the fit: nothing is applied to
    measure it) — else ``None``. Such an element only fits fine-tuning noise, and applying it would cost a pass of
    rotations over every attention tensor and change every one of their bits; ``merge`` keeps such models as they
    are by the same rule (docs/DESIGN.md §3), so aligning then averaging is the merge."""
    transform = fit.transform
    if not permutes_nothing(transform) or all(is_identity_element(g, transform) for g in spec.groups()):
        return None
    gain = fit_gain(ref_state, model_state, spec, fit)
    return gain if gain <= MIN_GAIN else None


def _fed(result: Alignment, sink: Callable[[str, torch.Tensor], None] | None) -> Alignment:
    """``result``, its aligned tensors handed to ``sink`` (:func:`align`'s paths whose report is not one pass over
    them: a narrower model, ``auto``'s candidate when it was not fed in its report's pass); the pass's time is
    ``seconds["write"]``."""
    if sink is not None and not result.fed:
        start = time.perf_counter()
        _announce(sink, result.state_dict)
        stream_into(result.state_dict, sink)
        result.report.seconds["write"] = result.report.seconds.get("write", 0.0) + time.perf_counter() - start
        result.fed = True
    return result


def _announce(sink: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Tell a sink that takes announcements (a :class:`~symmerge.io.stream.ShardWriter`'s ``expect``) which tensors
    ``state`` will hand it, where ``state`` knows without computing them (``layout``): the writer then puts every
    tensor's bytes in their place at once instead of copying each shard's data behind its header at the end."""
    expect, layout = getattr(sink, "expect", None), getattr(state, "layout", None)
    if callable(expect) and callable(layout):
        planned = layout()
        if planned is not None:
            expect(planned)


def permutes_nothing(transform: ModelTransform) -> bool:
    """Whether every FFN and head assignment of ``transform`` is the identity (rotations and scales aside): what
    the certificates find for fine-tunes of one base, whose per-layer fit then gains next to nothing."""
    return (transform.residual is None and transform.source is None and all(is_identity(p) for p in transform.ffn.values())
            and all(is_identity(h.perm) and is_identity(h.kv_perm) for h in transform.heads.values()))


def _align_embedded(ref_state: StateDict, model_state: StateDict, spec: ModelSpec, model_spec: ModelSpec, symmetries: Any, *,
                    match: str, **options: Any) -> Alignment:
    """A narrower model with the residual class (or ``auto`` where it includes it): grown to the reference's shape
    by the identity embedding, then aligned as a same-shape model — permuting its neurons and heads, zero ones
    included, is choosing a semi-permutation, so this is the same optimum (docs/DESIGN.md §2). The element is
    returned composed with the embedding (:func:`~symmerge.groups.after_embedding`), an element of the narrow model."""
    if match != "weights":
        raise SymmergeError(f"{options['model_name']} is narrower than the reference: --match {match} is not available for models of "
                            "different widths (use weights)")
    embedding = embedding_transform(spec, model_spec)
    result = align(ref_state, apply_transform(model_state, spec, embedding), symmetries=symmetries, spec=spec, **options)
    result.transform = after_embedding(embedding, result.transform)
    result.report.matching["widths"] = {"ffn": [model_spec.ffn_width, spec.ffn_width], "heads": [model_spec.num_heads, spec.num_heads]}
    return result


def _align_narrower(ref_state: StateDict, model_state: StateDict, spec: ModelSpec, model_spec: ModelSpec, chosen: frozenset[str] | None,
                    *, auto: bool, match: str, progress: bool, model_name: str, device: torch.device) -> Alignment:
    """A narrower model into the reference's widths by weight matching of the per-layer classes, whose FFN and head
    assignments become rectangular (semi-permutations). The report's "before" is the identity embedding (what
    merging without alignment would average)."""
    if auto:
        chosen = resolve_symmetries(AUTO, spec)
    if match != "weights":
        raise SymmergeError(f"{model_name} is narrower than the reference: --match {match} is not available for models of different "
                            "widths (use weights)")
    check_compatible(ref_state, model_state, model_name, frozenset(), resized_keys(spec, model_spec))
    fit = get_matcher("weights")(ref_state, model_state, spec, chosen, progress=progress, model_name=model_name, device=device,
                                 model_spec=model_spec)
    start = time.perf_counter()
    aligned = apply_transform(model_state, spec, fit.transform)
    seconds = {**fit.seconds, "apply": time.perf_counter() - start}
    before = squared_distances(apply_transform(model_state, spec, embedding_transform(spec, model_spec)), ref_state)
    after = squared_distances(aligned, ref_state)
    groups = []
    for kind, group_list in (("ffn", spec.ffn), ("attention", spec.attention)):
        for group in group_list:
            keys = {s.key for s in group.slots()}
            groups.append(GroupReport(group.name, kind, math.sqrt(sum(before[k] for k in keys)), math.sqrt(sum(after[k] for k in keys)),
                                      fit.details.get(group.name, {})))
    report = AlignmentReport(tuple(s for s in SYMMETRY_CLASSES if s in chosen), groups, math.sqrt(sum(before.values())),
                             math.sqrt(sum(after.values())), state_norm(ref_state), seconds,
                             {"method": "weights", "widths": {"ffn": [model_spec.ffn_width, spec.ffn_width],
                                                              "heads": [model_spec.num_heads, spec.num_heads]}})
    return Alignment(aligned, fit.transform, report, spec)


AUTO_MARGIN = 0.05
"""``auto`` keeps the residual map only if it lowers the weight distance at least this much (relative) below the
per-layer classes alone; otherwise it falls back to them (the residual map is then not trusted to help)."""


def _group_gain(report: AlignmentReport) -> float:
    """By what fraction the alignment lowered the distance over the tensors its groups touch (0 without groups): the
    quantity :func:`symmerge.match.per_layer.fit_gain` reads off a fit, here from the report's measured distances."""
    before = math.sqrt(sum(g.distance_before**2 for g in report.groups))
    after = math.sqrt(sum(g.distance_after**2 for g in report.groups))
    return 0.0 if before == 0 else 1.0 - after / before


def _auto_weights(reference: Any, model: Any, chosen: frozenset[str], sink: Callable[[str, torch.Tensor], None] | None,
                  **options: Any) -> Alignment:
    """Data-free ``auto``: ``chosen`` (with the residual map) unless its distance is not ``AUTO_MARGIN`` below the
    per-layer classes' alone; the report's ``matching["auto"]`` says which was kept and both distances.

    The per-layer fit runs first. When it gains no more than ``MIN_GAIN`` (fine-tunes of one base: their FFN
    neurons and heads already correspond, so they share the base's residual basis too), the residual map is not
    fitted at all, the rule ``merge`` applies (docs/DESIGN.md §3): its descent would cost rounds of full passes over
    both models (tens of minutes at 7B) only to fit fine-tuning noise.

    ``sink`` gets the kept candidate's tensors. When it can be restarted (a ``restart()`` method) and the per-layer
    element permutes nothing (:func:`permutes_nothing`, the fine-tune case), it is fed in the per-layer report's
    pass (each aligned tensor computed once for both); should the residual map then be fitted after all, it is
    restarted and fed the kept candidate."""
    restart = getattr(sink, "restart", None)
    per_layer = align(reference, model, symmetries=chosen - {"residual"}, sink=sink if callable(restart) else None,
                      feed_if=permutes_nothing, **options)
    if _group_gain(per_layer.report) <= MIN_GAIN:
        per_layer.report.matching["auto"] = {"kept": "all", "reason": f"the per-layer fit gains <= {MIN_GAIN:.0%}: models that "
                                             "share a basis (fine-tunes of one base); the residual map was not fitted",
                                             "distance_per_layer": per_layer.report.distance_after, "margin": AUTO_MARGIN}
        return _fed(per_layer, sink)
    if per_layer.fed:
        restart()
        per_layer.fed = False
    with_map = align(reference, model, symmetries=chosen, **options)
    keep = with_map.report.distance_after <= (1 - AUTO_MARGIN) * per_layer.report.distance_after
    kept = with_map if keep else per_layer
    kept.report.matching["auto"] = {"kept": "all,residual" if keep else "all", "distance_with_residual": with_map.report.distance_after,
                                    "distance_per_layer": per_layer.report.distance_after, "margin": AUTO_MARGIN}
    return _fed(kept, sink)


def _mean_state(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    common = [k for k in states[0] if all(k in st for st in states)]
    return {k: sum(st[k].double() for st in states).div(len(states)).to(states[0][k].dtype) if states[0][k].is_floating_point()
            else states[0][k] for k in common}


def _spread(states: list[Mapping[str, torch.Tensor]]) -> float:
    """``Σ_i ‖θ_i − θ̄‖²`` over the tensors every state holds: what a plain average of them has to bridge."""
    mean = _mean_state(states)
    return sum(state_distance({k: st[k] for k in mean}, mean) ** 2 for st in states)


@dataclass
class ManyAlignment:
    """The result of :func:`align_many`: the reference (as the merge should use it) and every other model aligned to
    the common basis, the spread ``Σ_i ‖θ_i − θ̄‖²`` after the star and after each round, and rounds run."""

    states: list[dict[str, torch.Tensor]]
    alignments: list[Alignment | None]  # None for the reference
    spread_history: list[float]
    rounds: int


def align_many(models: list[Any], *, reference: int = 0, rounds: int = 5, rtol: float = 1e-3, **options: Any) -> ManyAlignment:
    """Align K models to one common basis, iteratively: first every model to ``models[reference]`` (the star), then
    in rounds each other model to the mean of all the others (the reference included, which stays fixed and fixes the
    basis), until a round lowers the spread ``Σ_i ‖θ_i − θ̄‖²`` by less than ``rtol`` (relative) or ``rounds`` end.

    A model's new element is kept only if it brings it closer to the mean of the others than it was; since
    ``Σ_j ‖θ_j − θ̄‖² = (K−1)/K ‖θ_i − θ̄_{−i}‖² + (terms without θ_i)``, every kept step lowers the spread, so it
    never ends above the star's. ``options`` go to :func:`align` (``symmetries``, ``config``, ``spec``, ``match``…).
    """
    base = models[reference]
    alignments: list[Alignment | None] = [None] * len(models)
    for i, m in enumerate(models):
        if i != reference:
            alignments[i] = align(base, m, model_name=f"model {i}", **options)
    first = next(a for a in alignments if a is not None)
    if first.folded_reference is None:
        partner = as_state_and_config(base, options.get("config"))[0]
    else:
        partner = first.merge_partner or with_untied_head(as_state_and_config(base, options.get("config"))[0], first.spec.residual)
    current = [partner if a is None else a.state_dict for a in alignments]
    history = [_spread(current)]
    done = 0
    for _ in range(rounds):
        for i, m in enumerate(models):
            if i == reference:
                continue
            target = _mean_state([st for j, st in enumerate(current) if j != i])
            candidate = align(target, m, model_name=f"model {i}", **options)
            keys = [k for k in target if k in candidate.state_dict and k in current[i]]
            now = state_distance({k: current[i][k] for k in keys}, {k: target[k] for k in keys})
            new = state_distance({k: candidate.state_dict[k] for k in keys}, {k: target[k] for k in keys})
            if new < now:
                current[i], alignments[i] = candidate.state_dict, candidate
        done += 1
        history.append(_spread(current))
        if history[-2] - history[-1] <= rtol * history[-2]:
            break
    return ManyAlignment(current, alignments, history, done)


def apply_random_symmetry(model: Any, *, symmetries: str | Iterable[str] | None = "all", seed: int = 0, config: Any = None,
                          max_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """A seeded random element of the chosen symmetry classes applied to ``model`` (a module or a state dict with
    ``config``): a new state dict that computes exactly the same function. For tests and demos."""
    state, cfg = as_state_and_config(model, config)
    if cfg is None:
        raise SymmergeError("pass the model's config to scramble a plain state dict")
    spec = spec_for(cfg, state.keys())
    return apply_transform(state, spec, random_transform(spec, symmetries, seed=seed, max_scale=max_scale))
