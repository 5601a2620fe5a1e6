"""Loss barriers: for each alignment setting, align B to A and evaluate the linear path between them
(docs/DESIGN.md §4); and the loss landscape on the plane through A, B and the aligned B'."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from symmerge.alignment import align
from symmerge.errors import SymmergeError
from symmerge.evaluate.interpolation import Curve, interpolate, interpolation_curve
from symmerge.evaluate.tasks import Evaluator
from symmerge.groups import is_auto, parse_symmetries, resolve_symmetries
from symmerge.groups.residual import with_untied_head
from symmerge.io.hf import build_model, load_weights, untied_config
from symmerge.match import state_distance
from symmerge.merge.repair import ffn_statistics, repair
from symmerge.spec import spec_for

StateDict = Mapping[str, torch.Tensor]


@dataclass
class Setting:
    """One alignment setting of a study: the two endpoints it compares, and what the alignment reported."""

    label: str
    a: StateDict
    b: StateDict
    distance: float
    untied: bool = False
    curve: Curve | None = None
    seconds: float = 0.0


@dataclass
class Study:
    settings: list[Setting] = field(default_factory=list)

    def rows(self) -> list[dict]:
        out = []
        for s in self.settings:
            c = s.curve
            mid = c.at(0.5)
            row = {"setting": s.label, "distance": s.distance, "loss_A": c.losses[0], "loss_B": c.losses[-1],
                   "midpoint_loss": mid["loss"], "barrier": c.barrier(), "align_seconds": s.seconds}
            if "accuracy" in mid:
                row.update(accuracy_A=c.metrics[0]["accuracy"], accuracy_B=c.metrics[-1]["accuracy"], midpoint_accuracy=mid["accuracy"])
            out.append(row)
        return out

    def table(self) -> str:
        rows = self.rows()
        acc = "midpoint_accuracy" in rows[0]
        head = f"{'alignment':<22} {'distance':>10} {'loss A':>8} {'loss B':>8} {'midpoint':>9} {'barrier':>9}" + (f" {'mid acc':>8}" if acc else "")
        lines = [head]
        for r in rows:
            line = f"{r['setting']:<22} {r['distance']:>10.4g} {r['loss_A']:>8.4f} {r['loss_B']:>8.4f} {r['midpoint_loss']:>9.4f} {r['barrier']:>9.4f}"
            lines.append(line + (f" {r['midpoint_accuracy']:>8.2%}" if acc else ""))
        return "\n".join(lines)


def model_for(config: Mapping, state: StateDict, untied: bool) -> torch.nn.Module:
    """An HF module holding ``state`` (untied where the residual class folded a tied head)."""
    return build_model(untied_config(config, untied), state)


def run_study(reference: StateDict, model: StateDict, config: Mapping, settings: Sequence[str], evaluate: Evaluator,
              points: int = 11, progress: bool = False, calibration: list | None = None, learn_steps: int = 200,
              learn_seconds: float | None = None, learn_path: str = "random", repair_batches: int = 8) -> Study:
    """For each alignment setting (``none``, a symmetry list, ``act:`` + a list for activation matching or
    ``learn:`` + a list for learned matching, both on ``calibration``; a ``+repair`` suffix also repairs every
    interior point of the path on the first ``repair_batches`` calibration batches, :mod:`symmerge.merge.repair`),
    align ``model`` to ``reference`` and evaluate the linear path at ``points`` values of t. A setting and its
    ``+repair`` twin share one alignment."""
    spec = None
    study = Study()
    ts = [i / (points - 1) for i in range(points)]
    models: dict[bool, torch.nn.Module] = {}
    found: dict[str, tuple] = {}
    for label in settings:
        repaired = label.endswith(REPAIR_SUFFIX)
        key = label.removesuffix(REPAIR_SUFFIX)
        match = {"act": "activations", "learn": "learned"}.get(key.split(":")[0], "weights") if ":" in key else "weights"
        symmetries = key.split(":")[-1]
        if is_auto(symmetries):
            spec = spec or spec_for(config, reference.keys())
        chosen = resolve_symmetries(symmetries, spec) if is_auto(symmetries) else parse_symmetries(symmetries)
        start = time.perf_counter()
        if key in found:
            a, b, distance, seconds = found[key]
        elif not chosen:
            a, b, distance = reference, model, state_distance(reference, model)
        else:
            spec = spec or spec_for(config, reference.keys())
            result = align(reference, model, config=config, spec=spec, symmetries=symmetries if is_auto(symmetries) else chosen,
                           progress=progress,
                           match=match, calibration=calibration, learn_steps=learn_steps,
                           learn_seconds=learn_seconds, learn_path=learn_path)
            a = result.merge_partner or (with_untied_head(reference, spec.residual) if "residual" in chosen else reference)
            b, distance = result.state_dict, result.report.distance_after
            chosen = frozenset(result.report.symmetries)  # auto may fall back to the per-layer classes
            if "residual" not in chosen:
                a = reference
        if key not in found:
            seconds = time.perf_counter() - start
            found[key] = (a, b, distance, seconds)
        setting = Setting(label, a, b, distance, untied="residual" in chosen, seconds=seconds)
        if setting.untied not in models:
            models[setting.untied] = model_for(config, reference, setting.untied)
        if repaired:
            if not calibration:
                raise SymmergeError("+repair needs calibration data")
            spec = spec or spec_for(config, reference.keys())
            begin = time.perf_counter()
            setting.curve = repaired_curve(models[setting.untied], a, b, evaluate, ts, config, spec, calibration[:repair_batches],
                                           setting.untied, label=label, progress=progress)
            setting.seconds += time.perf_counter() - begin
        else:
            setting.curve = interpolation_curve(models[setting.untied], a, b, evaluate, ts, label=label, progress=progress)
        study.settings.append(setting)
    return study


REPAIR_SUFFIX = "+repair"


def repaired_curve(model: torch.nn.Module, a: StateDict, b: StateDict, evaluate: Evaluator, ts: Sequence[float], config: Mapping,
                   spec, batches: list, untied: bool, label: str = "", progress: bool = False) -> Curve:
    """The path with every interior point repaired toward the endpoints' interpolated FFN statistics."""
    stats_a, stats_b = ffn_statistics(config, a, batches, untied), ffn_statistics(config, b, batches, untied)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = []
    try:
        for t in tqdm(ts, desc=f"interpolating {label}".strip(), unit="point", disable=not progress, leave=False):
            state = interpolate(a, b, float(t))
            if 0 < t < 1:
                state = repair(state, config, spec, batches, stats_a, stats_b, float(t), untie=untied)
            load_weights(model, state)
            metrics.append(evaluate(model))
    finally:
        model.load_state_dict(saved)
    return Curve(label, [float(t) for t in ts], metrics)


def landscape(setting: Setting, unaligned: StateDict, config: Mapping, evaluate: Evaluator, grid: int = 9,
              progress: bool = False) -> tuple[list[list[float]], list[list[float]], list[list[float]], dict[str, tuple[float, float]]]:
    """Loss on the plane through A, B (unaligned) and B' (aligned): orthonormal directions e1 ∝ B − A and
    e2 ∝ (B' − A) minus its e1 part; a ``grid``×``grid`` square covering the three points."""
    a, b_aligned = setting.a, setting.b
    keys = [k for k, v in a.items() if v.is_floating_point() and k in unaligned]
    d1 = {k: unaligned[k].float() - a[k].float() for k in keys}
    d2 = {k: b_aligned[k].float() - a[k].float() for k in keys}
    dot = lambda x, y: sum(float((x[k] * y[k]).sum()) for k in keys)  # noqa: E731
    n1 = math.sqrt(dot(d1, d1))
    e1 = {k: v / n1 for k, v in d1.items()}
    p = dot(d2, e1)
    r = {k: d2[k] - p * e1[k] for k in keys}
    n2 = math.sqrt(max(dot(r, r), 1e-30))
    e2 = {k: v / n2 for k, v in r.items()}
    points = {"A": (0.0, 0.0), "B": (n1, 0.0), "B'": (p, n2)}
    lo_u, hi_u = min(0.0, p) - 0.2 * n1, max(n1, p) + 0.2 * n1
    lo_v, hi_v = -0.2 * n2, 1.2 * n2
    us = [[lo_u + (hi_u - lo_u) * j / (grid - 1) for j in range(grid)] for _ in range(grid)]
    vs = [[lo_v + (hi_v - lo_v) * i / (grid - 1)] * grid for i in range(grid)]
    model = model_for(config, a, setting.untied)
    losses = []
    with tqdm(total=grid * grid, desc="landscape", unit="point", disable=not progress, leave=False) as bar:
        for i in range(grid):
            row = []
            for j in range(grid):
                u, v = us[i][j], vs[i][j]
                state = {k: (a[k].float() + u * e1[k] + v * e2[k]).to(a[k].dtype) if k in e1 else a[k] for k in a}
                load_weights(model, state)
                row.append(evaluate(model)["loss"])
                bar.update(1)
            losses.append(row)
    return us, vs, losses, points
