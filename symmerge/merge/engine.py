"""Match, then merge: run a validated :class:`~symmerge.merge.recipe.MergePlan`, streaming.

Stages (each timed): align (fit one group element per model onto the reference), statistics (Fisher / Gram
matrices from data, computed on the *aligned* models: statistics of the unaligned models are in the wrong basis),
merge + write (one symmetry group or tensor at a time: each model's tensors are read from mmap, transformed into
the reference basis, merged, and appended to the current output shard).

Task vectors: the base model is aligned like every other model, so every tensor, the base's included, is in the
reference basis and ``τ_i = T_i(θ_i) − T_b(θ_base)``; the merge is ``T_b(θ_base) + f(τ_1 … τ_n)``. By default the
reference of a method with a base *is* the base (``T_b = id``): each model is brought into the base's basis, and
for a plain fine-tune (``T_i ≈ id``) this is the model's own task vector.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

import symmerge
from symmerge.align import fit_transform
from symmerge.errors import SymmergeError
from symmerge.groups import ModelTransform, apply_to_group, apply_transform
from symmerge.io import atomic_output_dir, copy_model_files
from symmerge.io.stream import LazyState, ShardWriter, dtype_name, write_config
from symmerge.merge.recipe import MergePlan
from symmerge.spec import StateView

UNRELATED_BASE = 1.0  # ‖τ_i‖ / ‖θ_base‖ above this: model i is no fine-tune of the base


@dataclass
class MergeResult:
    out: Path
    seconds: dict[str, float]
    alignment: dict[str, dict[str, float]] = field(default_factory=dict)  # model name → distances
    task_vector_ratio: dict[str, float] = field(default_factory=dict)


def merge_units(plan: MergePlan, keys: list[str]) -> list[tuple[Any, list[str]]]:
    """Work units in checkpoint order: a symmetry group's tensors together (they are transformed together),
    every other tensor alone."""
    group_of: dict[str, Any] = {}
    if plan.spec is not None:
        for group in plan.spec.groups():
            for slot in group.slots():
                group_of[slot.key] = group
    units, seen = [], set()
    for key in keys:
        group = group_of.get(key)
        if group is None:
            units.append((None, [key]))
        elif group.name not in seen:
            seen.add(group.name)
            units.append((group, sorted({s.key for s in group.slots()}, key=keys.index)))
    return units


def _subset(state: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: state[k] for k in keys}


def transformed_unit(state: Mapping[str, torch.Tensor], group: Any, keys: list[str], transform: ModelTransform | None) -> dict[str, torch.Tensor]:
    """The unit's tensors of one model, brought into the reference basis."""
    sub = _subset(state, keys)
    if group is None or transform is None:
        return sub
    view = StateView(sub)
    apply_to_group(view, group, transform)
    return dict(view.state)


def fit_alignments(plan: MergePlan, states: list[LazyState], base: LazyState | None,
                   progress: bool) -> tuple[list[ModelTransform | None], ModelTransform | None]:
    """One transform per model and one for the base (``None`` for the reference itself and when not aligning)."""
    transforms: list[ModelTransform | None] = [None] * len(states)
    if not plan.aligned:
        return transforms, None
    ref_state = base if plan.reference_index is None else states[plan.reference_index]
    for i, (state, name) in enumerate(zip(states, plan.names)):
        if i != plan.reference_index:
            transforms[i], _, _ = fit_transform(ref_state, state, plan.spec, plan.symmetries, progress=progress, model_name=name)
    base_transform = None
    if base is not None and plan.reference_index is not None:
        base_transform, _, _ = fit_transform(ref_state, base, plan.spec, plan.symmetries, progress=progress, model_name="base model")
    return transforms, base_transform


def align_with_residual(plan: MergePlan, states: list[LazyState], base: LazyState | None, progress: bool,
                        result: MergeResult) -> tuple[list[dict], dict | None]:
    """The residual map touches every tensor, so this path aligns whole models in memory: every model (and the
    base) is folded and aligned to the folded reference; the merge then runs on those states as they are."""
    from symmerge.align import align
    from symmerge.groups.residual import fold_norms

    ref_state = base if plan.reference_index is None else states[plan.reference_index]
    folded_ref = fold_norms(ref_state, plan.spec.residual)
    aligned = []
    for i, (state, name) in enumerate(zip(states, plan.names)):
        if i == plan.reference_index:
            aligned.append(folded_ref)
            result.alignment[name] = {"distance_before": 0.0, "distance_after": 0.0}
            continue
        r = align(ref_state, state, spec=plan.spec, symmetries=plan.symmetries, progress=progress, model_name=name)
        aligned.append(r.state_dict)
        result.alignment[name] = {"distance_before": r.report.distance_before, "distance_after": r.report.distance_after}
    aligned_base = None
    if base is not None:
        aligned_base = folded_ref if plan.reference_index is None else align(
            ref_state, base, spec=plan.spec, symmetries=plan.symmetries, progress=progress, model_name="base model").state_dict
    return aligned, aligned_base


def collect_statistics(plan: MergePlan, states: list, transforms: list[ModelTransform | None], progress: bool) -> list[dict]:
    """Fisher diagonals or input Gram matrices of every model, computed on the model *after* alignment (statistics
    of the unaligned model sit in the wrong basis: the bug of the seed paper's code). Keys are the checkpoint's."""
    from symmerge.data import load_calibration
    from symmerge.merge.statistics import fisher_diagonal, input_grams

    data = plan.recipe.data
    out = []
    for i, (state, ckpt) in enumerate(zip(states, plan.models)):
        aligned = dict(state) if transforms[i] is None else apply_transform(state, plan.spec, transforms[i])
        config = {**ckpt.config, "tie_word_embeddings": False} if "residual" in plan.symmetries else ckpt.config
        model = build_model(config, aligned)  # residual path: the folded head is untied
        batches = load_calibration(plan.data_path, model_dir=ckpt.path, main_input_name=model.main_input_name,
                                   max_length=data.max_length, num_examples=data.num_examples, batch_size=data.batch_size)
        stats = fisher_diagonal(model, batches, progress=progress) if plan.method.name == "fisher" else input_grams(model, batches, progress=progress)
        to_checkpoint = {v: k for k, v in getattr(model, "_symmerge_renames", {}).items()}
        out.append({"stats": {to_checkpoint.get(k, k): v for k, v in stats.items()},
                    "layout": {to_checkpoint.get(k, k): v for k, v in linear_layout(model).items()}})
        del model, aligned
    return out


def build_model(config: Mapping, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A Hugging Face model of ``config``'s architecture holding ``state`` (float32, eval mode). ``state`` may use
    the on-disk tensor names where transformers 5 renames them in memory (ViT)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**dict(config))
    architectures = list(getattr(cfg, "architectures", None) or [])
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = best_matching_class(cfg, state.keys())
    model = cls(cfg).float().eval()
    load_weights(model, state)
    return model


def best_matching_class(cfg, keys) -> type:
    """Without ``architectures`` in the config: the HF class (causal LM, image classifier, masked LM, sequence
    classifier, bare model) whose tensor names overlap ``keys`` most, built on the meta device (no memory)."""
    import transformers

    keys, best, best_overlap = set(keys), None, -1
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageClassification, transformers.AutoModelForMaskedLM,
                 transformers.AutoModelForSequenceClassification, transformers.AutoModel):
        try:
            cls = auto._model_mapping[type(cfg)]
        except KeyError:
            continue
        with torch.device("meta"):
            names = set(cls(cfg).state_dict())
        overlap = len(names & keys) - len(names - keys)
        if overlap > best_overlap:
            best, best_overlap = cls, overlap
    if best is None:
        raise SymmergeError(f"no transformers model class for model_type {cfg.model_type!r}")
    return best


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` (on-disk or in-memory names) into ``model``; every tensor must land somewhere, and only a
    tied LM head or position ids may be absent."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if set(state) - set(model.state_dict()):
        if not hasattr(model, "_symmerge_renames"):
            model._symmerge_renames = disk_to_module_names(model)
        state = {model._symmerge_renames.get(k, k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids") and "lm_head" not in k]
    if unexpected or missing:
        raise SymmergeError(f"the checkpoint does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def disk_to_module_names(model: torch.nn.Module) -> dict[str, str]:
    """On-disk tensor name → in-memory name, read off transformers' own saving: every parameter is filled with its
    index, saved, and found again by that index (exact for renames, the only conversion our families have)."""
    import tempfile

    from safetensors.torch import load_file

    import transformers

    transformers.utils.logging.disable_progress_bar()
    names = list(model.state_dict())
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            if t.is_floating_point():
                t.fill_(float(i))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            saved.update(load_file(f))
    model.load_state_dict(saved_weights)
    return {key: names[int(t.reshape(-1)[0])] for key, t in saved.items() if t.is_floating_point() and t.numel()}


def linear_layout(model: torch.nn.Module) -> dict[str, bool]:
    """Weight key → True when stored in×out (``Conv1D``), for every linear layer (RegMean solves in out×in)."""
    from transformers.pytorch_utils import Conv1D

    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            layout[f"{name}.weight"] = isinstance(module, Conv1D)
    return layout


def merge_tensor(plan: MergePlan, item: AlignedTensor, stats: list[dict] | None, extra: dict[str, Any]) -> torch.Tensor:
    """One output tensor from the models' (aligned) tensors."""
    from symmerge.merge.methods import MERGE_METHODS

    method, key, tensors = plan.method, item.key, item.tensors
    kwargs: dict[str, Any] = {**plan.params, **extra}
    if method.name == "fisher":
        if any(key not in s["stats"] for s in stats):  # buffers: no gradient, no Fisher
            return MERGE_METHODS["linear"].fn(tensors, weights=plan.weights)
        kwargs["fishers"] = [s["stats"][key] for s in stats]
    elif method.name == "regmean":
        grams = [s["stats"].get(key) for s in stats]
        if any(g is None for g in grams) or tensors[0].ndim != 2:
            # RegMean acts on linear weights only; everything else is averaged (Jin et al. 2023)
            return MERGE_METHODS["linear"].fn(tensors, weights=plan.weights)
        if stats[0]["layout"].get(key):  # Conv1D: solve in nn.Linear layout, store back in×out
            return method.fn([t.T for t in tensors], grams=grams, weights=plan.weights, **kwargs).T.contiguous()
        kwargs["grams"] = grams
    if method.needs_base:
        kwargs["base"] = item.base
    if "name" in method.arguments:
        kwargs["name"] = key
    return method.fn(tensors, weights=plan.weights, **kwargs)


@dataclass
class AlignedTensor:
    key: str
    tensors: list[torch.Tensor]  # per model, in the reference basis
    base: torch.Tensor | None  # in the reference basis
    raw: list[torch.Tensor]  # per model, as stored
    reference: torch.Tensor | None  # the alignment reference's tensor


def aligned_tensors(plan: MergePlan, states: list[LazyState], base: LazyState | None,
                    transforms: list[ModelTransform | None], base_transform: ModelTransform | None) -> Iterator[AlignedTensor]:
    """Every tensor of the checkpoint, in order, for every model (and the base) brought into the reference basis;
    one symmetry group's tensors at a time are held in memory."""
    keys = list(states[0].keys())
    for group, unit_keys in merge_units(plan, keys):
        raw = [_subset(s, unit_keys) for s in states]
        # untransformed units reuse the tensors just read instead of reading them from the mmap again
        aligned = [r if group is None or t is None else transformed_unit(s, group, unit_keys, t) for s, r, t in zip(states, raw, transforms)]
        aligned_base = transformed_unit(base, group, unit_keys, base_transform) if base is not None else None
        reference = raw[plan.reference_index] if plan.reference_index is not None else aligned_base
        for key in unit_keys:
            yield AlignedTensor(key, [a[key] for a in aligned], aligned_base[key] if aligned_base else None,
                                [r[key] for r in raw], reference[key] if reference else None)


def method_extras(plan: MergePlan, states, base, transforms, base_transform, stats, progress: bool) -> dict[str, Any]:
    """Whole-model quantities some methods need before the per-tensor pass."""
    from symmerge.merge.methods import fisher_model_norms, global_magnitude_thresholds

    if plan.method.name == "ties" and plan.params.get("trim") == "model":
        items = aligned_tensors(plan, states, base, transforms, base_transform)
        taus = ([t.float() - item.base.float() for t in item.tensors] for item in
                tqdm(items, total=len(states[0]), desc="TIES thresholds", unit="tensor", disable=not progress, leave=False)
                if item.tensors[0].is_floating_point())
        return {"thresholds": global_magnitude_thresholds(taus, plan.params["density"])}
    if plan.method.name == "fisher" and plan.params.get("normalize") == "model":
        return {"fisher_norms": fisher_model_norms(
            [s["stats"][k] for s in stats] for k in stats[0]["stats"])}
    return {}


def run_merge(plan: MergePlan, out: Path, *, force: bool = False, progress: bool = True) -> MergeResult:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    states = [LazyState(c) for c in plan.models]
    base = LazyState(plan.base) if plan.base else None
    result = MergeResult(out, seconds)
    residual = "residual" in plan.symmetries
    if residual:
        states, base = align_with_residual(plan, states, base, progress, result)
        transforms, base_transform = [None] * len(states), None
    else:
        transforms, base_transform = fit_alignments(plan, states, base, progress)
    seconds["align"] = time.perf_counter() - start

    start = time.perf_counter()
    stats = collect_statistics(plan, states, transforms, progress) if plan.method.needs_data else None
    seconds["statistics"] = time.perf_counter() - start

    start = time.perf_counter()
    extra = method_extras(plan, states, base, transforms, base_transform, stats, progress)
    n = len(states)
    sq_before, sq_after, sq_task, sq_base = [0.0] * n, [0.0] * n, [0.0] * n, 0.0
    with atomic_output_dir(out, force) as tmp:
        writer = ShardWriter(tmp, plan.shard_size)
        with tqdm(total=len(states[0]), desc="merging", unit="tensor", disable=not progress, leave=False) as bar:
            for item in aligned_tensors(plan, states, base, transforms, base_transform):
                bar.update(1)
                if not item.tensors[0].is_floating_point():
                    writer.add(item.key, item.raw[0])  # integer buffers (position ids...) come from the first model
                    continue
                if item.base is not None:
                    sq_base += _sq(item.base)
                    for i, t in enumerate(item.tensors):
                        sq_task[i] += _sq(t.float() - item.base.float())
                if item.reference is not None and plan.aligned and not residual:
                    for i in range(n):
                        sq_before[i] += _sq(item.raw[i].float() - item.reference.float())
                        sq_after[i] += _sq(item.tensors[i].float() - item.reference.float())
                merged = merge_tensor(plan, item, stats, extra)
                writer.add(item.key, merged.to(plan.dtype or item.raw[0].dtype))
        if base is not None and plan.method.needs_base:
            for i, name in enumerate(plan.names):
                ratio = math.sqrt(sq_task[i] / max(sq_base, 1e-30))
                result.task_vector_ratio[name] = ratio
                if ratio > UNRELATED_BASE and not plan.recipe.allow_unrelated_base:
                    raise SymmergeError(
                        f"model {name} is not a fine-tune of base_model: its task vector is {ratio:.2f}x the base's norm "
                        f"(fine-tunes are typically < 0.1); {plan.method.name} needs models fine-tuned from one base — "
                        "use linear, slerp, fisher or regmean for independently trained models (allow_unrelated_base: true overrides)"
                    )
        writer.close()
        seconds["merge+write"] = time.perf_counter() - start
        if plan.aligned and not residual:
            for i, name in enumerate(plan.names):
                result.alignment[name] = {"distance_before": math.sqrt(sq_before[i]), "distance_after": math.sqrt(sq_after[i])}
        source = plan.base if plan.aligned and plan.reference_index is None else plan.models[plan.reference_index or 0]
        copy_model_files(source.path, tmp)
        write_config(source.config, tmp, plan.dtype, untie=residual)
        (tmp / "merge.yaml").write_text(yaml.safe_dump(recipe_for_card(plan), sort_keys=False))
        (tmp / "README.md").write_text(model_card(plan, result))
    return result


def _sq(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.float())) ** 2


def recipe_for_card(plan: MergePlan) -> dict:
    """The recipe as it was run: absolute paths, resolved defaults."""
    r = plan.recipe.model_dump(exclude_none=True)
    for entry, ckpt in zip(r["models"], plan.models):
        entry["model"] = str(ckpt.path.resolve())
    if plan.base is not None:
        r["base_model"] = str(plan.base.path.resolve())
    r["parameters"] = plan.params
    if plan.aligned:
        ref = plan.base if plan.reference_index is None else plan.models[plan.reference_index]
        r["alignment"] = {"reference": str(ref.path.resolve()), "symmetries": sorted(plan.symmetries)}
    if plan.data_path is not None:
        r["data"]["path"] = str(plan.data_path.resolve())
    return r


def model_card(plan: MergePlan, result: MergeResult) -> str:
    lines = ["---", "tags: [merge, symmerge]", "---", "", "# Merged model", "",
             f"Produced by [symmerge](https://pypi.org/project/symmerge/) {symmerge.__version__}.", "",
             "## Models", ""]
    for name, ckpt, w in zip(plan.names, plan.models, plan.weights or [None] * len(plan.models)):
        lines.append(f"- `{ckpt.path.resolve()}`" + (f" (weight {w:g})" if w is not None else ""))
    if plan.base is not None:
        lines += ["", f"Base model: `{plan.base.path.resolve()}`"]
    params = ", ".join(f"{k}={v}" for k, v in plan.params.items()) or "defaults"
    lines += ["", "## Method", "", f"`{plan.method.name}` with {params}."]
    if plan.data_path is not None:
        lines.append(f"Statistics from `{plan.data_path.resolve()}`, computed on the aligned models.")
    lines += ["", "## Alignment", ""]
    if plan.aligned:
        ref = plan.base if plan.reference_index is None else plan.models[plan.reference_index]
        lines.append(f"Every model was aligned to `{ref.path.resolve()}` with symmetries {', '.join(sorted(plan.symmetries))} "
                     "before merging (function-preserving).")
        lines += ["", "| model | distance to reference before | after |", "|---|---|---|"]
        for name, d in result.alignment.items():
            lines.append(f"| {name} | {d['distance_before']:.5g} | {d['distance_after']:.5g} |")
    else:
        lines.append("None: tensors were merged as they are.")
    lines += ["", f"Output dtype: {dtype_name(plan.dtype) if plan.dtype else 'as the reference'}; "
              f"stage seconds: {json.dumps({k: round(v, 2) for k, v in result.seconds.items()})}", ""]
    return "\n".join(lines)
