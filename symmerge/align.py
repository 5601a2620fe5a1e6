"""Align one model to a reference: fit one group element per symmetry group, apply it, report what changed.

Stages (each timed): FFN matching (similarity GEMM + exact LAP per layer, LAPs of different layers run in a
2-thread pool while the next layer's similarity is built), attention matching (head assignment, Procrustes and
quartic for all heads of a layer at once), apply.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from symmerge.errors import SymmergeError
from symmerge.groups import SYMMETRY_CLASSES, ModelTransform, apply_transform, parse_symmetries, read_ffn, read_heads, require_residual
from symmerge.match.attention import match_heads
from symmerge.match.ffn import ffn_similarity
from symmerge.match.lap import solve_lap
from symmerge.spec import ModelSpec, StateView, check_same_shape, spec_for

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
    reference_state: dict[str, torch.Tensor] | None = None  # the reference with its norms folded (residual only):
    # the basis the aligned model is in; merge with this, not with the original reference


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def as_state_and_config(model: Any, config: Any = None) -> tuple[StateDict, Any]:
    """Accept an ``nn.Module`` with ``.config`` (a Hugging Face model) or a plain state dict plus ``config``."""
    if isinstance(model, torch.nn.Module):
        return model.state_dict(), config if config is not None else getattr(model, "config", None)
    if isinstance(model, Mapping):
        return model, config
    raise TypeError(f"expected a state dict or an nn.Module, got {type(model).__name__}")


def check_compatible_shapes(reference: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]], model_name: str = "model",
                            optional: frozenset[str] = frozenset()) -> None:
    """Same tensor names and shapes, or a one-line error naming the first difference. ``optional`` keys may be
    missing on either side (a tied LM head that folding unties)."""
    missing = sorted(set(reference) - set(model) - optional)
    extra = sorted(set(model) - set(reference) - optional)
    if missing or extra:
        which, key = ("lacks", missing[0]) if missing else ("has an extra", extra[0])
        more = len(missing) + len(extra) - 1
        raise SymmergeError(f"{model_name} {which} tensor {key!r}" + (f" (and {more} more differences)" if more else ""))
    for key, shape in reference.items():
        if key in model and tuple(shape) != tuple(model[key]):
            raise SymmergeError(f"tensor {key!r} has shape {tuple(model[key])} in {model_name}, {tuple(shape)} in the reference")


def check_compatible(reference: StateDict, model: StateDict, model_name: str = "model", optional: frozenset[str] = frozenset()) -> None:
    check_compatible_shapes({k: tuple(v.shape) for k, v in reference.items()}, {k: tuple(v.shape) for k, v in model.items()},
                            model_name, optional)


def untied_head(spec: ModelSpec, symmetries: frozenset[str]) -> frozenset[str]:
    """The LM-head key that may exist in one checkpoint only: folded (untied) vs tied, when the residual map is on."""
    if "residual" in symmetries and spec.residual is not None and spec.residual.tied is not None:
        return frozenset({spec.residual.tied[0]})
    return frozenset()


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
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.float())) ** 2 for t in a.values() if t.is_floating_point()))


def fit_ffn(ref: StateView, model: StateView, spec: ModelSpec, bar: tqdm, max_pending: int = 2) -> dict[str, torch.Tensor]:
    """One exact LAP per FFN; at most ``max_pending`` similarity matrices wait for a solver at a time."""
    perms: dict[str, torch.Tensor] = {}
    pending: deque[tuple[str, Future]] = deque()

    def collect() -> None:
        name, fut = pending.popleft()
        perms[name] = torch.from_numpy(fut.result())
        bar.update(1)

    with ThreadPoolExecutor(2) as pool:  # the LAP solvers release the GIL
        for group in spec.ffn:
            similarity = ffn_similarity(read_ffn(ref, group), read_ffn(model, group))
            pending.append((group.name, pool.submit(solve_lap, similarity)))
            while len(pending) > max_pending:
                collect()
        while pending:
            collect()
    return perms


def fit_transform(
    reference: StateDict,
    model: StateDict,
    spec: ModelSpec,
    symmetries: frozenset[str],
    *,
    progress: bool = False,
    model_name: str = "model",
) -> tuple[ModelTransform, dict[str, dict], dict[str, float]]:
    """The group element bringing ``model`` closest to ``reference`` (state dicts of one ``spec``), per-group details,
    and seconds per stage. Reads only the tensors the groups touch, one group at a time."""
    seconds: dict[str, float] = {}
    ref_view, model_view = StateView(reference), StateView(model)
    transform = ModelTransform()
    attention_on = bool(symmetries & {"qk", "vo", "scale", "heads"})
    total = len(spec.ffn) * ("ffn" in symmetries) + len(spec.attention) * attention_on
    details: dict[str, dict] = {}
    with tqdm(total=total, desc=f"aligning {model_name}", unit="group", disable=not progress, leave=False) as bar:
        start = time.perf_counter()
        if "ffn" in symmetries:
            transform.ffn = fit_ffn(ref_view, model_view, spec, bar)
            for name, perm in transform.ffn.items():
                details[name] = {"neurons_moved": int((perm != torch.arange(len(perm))).sum())}
        seconds["ffn"] = time.perf_counter() - start
        start = time.perf_counter()
        if attention_on:
            for group in spec.attention:
                transform.heads[group.name], details[group.name] = match_heads(
                    read_heads(ref_view, group), read_heads(model_view, group),
                    qk="qk" in symmetries, vo="vo" in symmetries, scale="scale" in symmetries, heads="heads" in symmetries,
                    rope=group.rope, qk_fixed=group.qk_fixed,
                )
                bar.update(1)
        seconds["attention"] = time.perf_counter() - start
    return transform, details, seconds


def solve_residual(m: torch.Tensor, kind: str) -> torch.Tensor:
    """The residual map ``Q`` maximising ``tr(Q^T M)`` in its group: orthogonal Procrustes; for ``centered``,
    Procrustes on the complement of the all-ones direction (``Q 1 = 1``); for ``permutation``, an exact LAP."""
    from symmerge.groups.residual import centered_basis, embed_centered
    from symmerge.match.procrustes import procrustes

    if kind == "permutation":
        return torch.eye(m.shape[0], dtype=torch.float64)[:, torch.from_numpy(solve_lap(m.T))]
    if kind == "centered":
        v = centered_basis(m.shape[0])
        return embed_centered(procrustes(v.T @ m @ v))
    return procrustes(m)


def fit_with_residual(
    reference: StateDict, model: StateDict, spec: ModelSpec, symmetries: frozenset[str], *, progress: bool = False,
    model_name: str = "model", max_iter: int = 20, rtol: float = 1e-7,
) -> tuple[ModelTransform, dict[str, dict], dict[str, float], dict[str, torch.Tensor], list[float]]:
    """Coordinate descent over the residual map ``Q`` and the per-layer elements ``T`` (DESIGN §2).

    Both models' norms are folded first. ``Q`` acts on the residual axis of every tensor and ``T`` on the other
    axis, so they commute: the ``Q`` step is an exact Procrustes given ``T`` (on ``T(model)``), the ``T`` step the
    usual per-layer fit on ``Q(model)``. A step is kept only if it lowers the distance, so the objective never
    increases. Returns the transform, per-group details, stage seconds, the folded reference and the distance
    after each accepted step.
    """
    from symmerge.groups.residual import apply_residual, fold_norms, residual_correlation

    residual = require_residual(spec)
    per_layer = symmetries - {"residual"}
    ref_f, model_f = fold_norms(reference, residual), fold_norms(model, residual)
    transform, details, seconds = ModelTransform(), {}, {"residual": 0.0, "ffn": 0.0, "attention": 0.0}
    history = [state_distance(model_f, ref_f)]
    for _ in range(max_iter):
        start = time.perf_counter()
        per_layer_only = ModelTransform(ffn=transform.ffn, heads=transform.heads)
        q = solve_residual(residual_correlation(apply_transform(model_f, spec, per_layer_only), ref_f, residual), residual.kind)
        rotated = apply_residual(model_f, residual, q)
        seconds["residual"] += time.perf_counter() - start
        candidate, cand_details, secs = fit_transform(ref_f, rotated, spec, per_layer, progress=progress, model_name=model_name)
        for k in ("ffn", "attention"):
            seconds[k] += secs[k]
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
        if improvement <= rtol * history[0]:
            break
    return transform, details, seconds, ref_f, history


def fit_activations(reference: StateDict, model: StateDict, config: Any, spec: ModelSpec, symmetries: frozenset[str],
                    calibration: list | None) -> tuple[ModelTransform, dict, dict[str, float], dict[str, torch.Tensor] | None]:
    """Activation matching (:mod:`symmerge.match.activations`) on models rebuilt from the two state dicts."""
    from symmerge.groups.residual import fold_norms
    from symmerge.match.activations import fit_from_activations
    from symmerge.merge.engine import build_model

    if not calibration:
        raise SymmergeError("activation matching needs calibration data (--data: zoo, a text file or an .npz)")
    if config is None:
        raise SymmergeError("activation matching needs the model's config to rebuild the models")
    config = config if isinstance(config, Mapping) else config.to_dict()
    untie = {**config, "tie_word_embeddings": False} if "residual" in symmetries else config
    start = time.perf_counter()
    transform, details = fit_from_activations(build_model(untie, reference), build_model(untie, model), spec, symmetries, calibration,
                                              reference, model)
    reference_state = fold_norms(reference, require_residual(spec)) if transform.residual is not None else None
    return transform, details, {"activations": time.perf_counter() - start}, reference_state


def midpoint_loss(config: Any, reference: StateDict, batches: list, untie: bool):
    """``loss(state)``: the mean loss over ``batches`` of one HF module evaluated functionally at ``state``."""
    from symmerge.merge.engine import build_model

    config = dict(config if isinstance(config, Mapping) else config.to_dict())
    if untie:
        config["tie_word_embeddings"] = False
    module = build_model(config, reference).train(False)
    for p in module.parameters():
        p.requires_grad_(False)
    renames = getattr(module, "_symmerge_renames", {})

    def loss(state: StateDict) -> torch.Tensor:
        params = {renames.get(k, k): v for k, v in state.items()}
        return sum(torch.func.functional_call(module, params, args=(), kwargs=b).loss for b in batches) / len(batches)

    return loss


def fit_learned(reference: StateDict, model: StateDict, config: Any, spec: ModelSpec, symmetries: frozenset[str],
                calibration: list | None, steps: int, progress: bool, model_name: str):
    """Weight matching, then :func:`symmerge.match.learned.learn_transform` on the midpoint loss."""
    from symmerge.groups.residual import fold_norms
    from symmerge.match.learned import learn_transform

    if not calibration or not all("labels" in b for b in calibration):
        raise SymmergeError("learned matching needs calibration batches with labels (--data zoo, or an .npz with labels)")
    start = time.perf_counter()
    if "residual" in symmetries:
        init, details, _, reference_state, _ = fit_with_residual(reference, model, spec, symmetries, model_name=model_name)
        model = fold_norms(model, spec.residual)
    else:
        init, details, _ = fit_transform(reference, model, spec, symmetries, model_name=model_name)
        reference_state = None
    loss = midpoint_loss(config, reference_state if reference_state is not None else reference, calibration, "residual" in symmetries)
    transform, history = learn_transform(reference_state if reference_state is not None else reference, model, spec, init, loss,
                                         steps=steps, progress=progress)
    details["learned"] = {"steps": steps, "midpoint_loss_first": history[0], "midpoint_loss_best": min(history),
                          "midpoint_loss_last": history[-1]}
    return transform, details, {"learned": time.perf_counter() - start}, reference_state


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
) -> Alignment:
    """Bring ``model`` into ``reference``'s basis without changing what ``model`` computes.

    ``reference``, ``model``: Hugging Face modules or state dicts (then pass the HF ``config``, an object or the
    config.json dict, or a ready ``spec``). ``symmetries``: any of ``ffn, qk, vo, scale, heads, residual``
    (comma-separated or a list), ``"all"`` (the per-layer classes, default) or ``"none"``. ``match``:
    ``"weights"`` (data-free), ``"activations"`` (cross-correlations of activations on ``calibration``, a list of
    model-input batches) or ``"learned"`` (weight matching refined for ``learn_steps`` steps to lower the midpoint
    model's loss on ``calibration``, batches with labels). Returns an :class:`Alignment`; ``model`` is not modified.
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

    reference_state = None
    if match not in ("weights", "activations", "learned"):
        raise SymmergeError(f"match must be weights, activations or learned, got {match!r}")
    if match == "learned":
        transform, details, seconds, reference_state = fit_learned(
            ref_state, model_state, ref_config if ref_config is not None else model_config, spec, chosen, calibration,
            steps=learn_steps, progress=progress, model_name=model_name)
    elif match == "activations":
        transform, details, seconds, reference_state = fit_activations(
            ref_state, model_state, ref_config if ref_config is not None else model_config, spec, chosen, calibration)
    elif "residual" in chosen:
        transform, details, seconds, reference_state, history = fit_with_residual(
            ref_state, model_state, spec, chosen, progress=progress, model_name=model_name)
        details["residual"] = {"iterations": len(history) - 1, "distance_history": [round(h, 6) for h in history]}
    else:
        transform, details, seconds = fit_transform(ref_state, model_state, spec, chosen, progress=progress, model_name=model_name)
    compare_to = reference_state if reference_state is not None else ref_state
    start = time.perf_counter()
    aligned = apply_transform(model_state, spec, transform)
    seconds["apply"] = time.perf_counter() - start
    start = time.perf_counter()
    before = squared_distances(model_state, ref_state)
    if reference_state is None:
        after = dict(before)  # tensors no group touched are unchanged
        after.update(squared_distances(aligned, ref_state, spec.touched_keys() & before.keys()))
    else:  # the residual map touches every tensor; compare with the folded reference
        after = squared_distances(aligned, reference_state)
    groups = []
    for kind, group_list in (("ffn", spec.ffn), ("attention", spec.attention)):
        for group in group_list:
            keys = {s.key for s in group.slots()}
            groups.append(GroupReport(group.name, kind, math.sqrt(sum(before[k] for k in keys)),
                                      math.sqrt(sum(after[k] for k in keys)), details.get(group.name, {})))
    if reference_state is not None:
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
    return Alignment(aligned, transform, report, spec, reference_state)
