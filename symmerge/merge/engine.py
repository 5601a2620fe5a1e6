"""Match, then merge: run a validated :class:`~symmerge.merge.plan.MergePlan`, streaming.

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

import math
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from symmerge.alignment import align, align_many
from symmerge.data import load_calibration
from symmerge.errors import SymmergeError
from symmerge.groups import ModelTransform, apply_to_group, apply_transform, embedding_transform, fill_empty_slots
from symmerge.groups.residual import can_unfold
from symmerge.groups.stream import TransformedState
from symmerge.io import atomic_output_dir, copy_model_files
from symmerge.io.checkpoint import copy_tokenizer_files, set_chat_template, with_layer_count, with_module_depth
from symmerge.io.hf import build_model, linear_layout, model_input_name, to_checkpoint_names, untied_config
from symmerge.io.stream import LazyState, ShardWriter, write_config
from symmerge.io.tokenizer import save_tokenizer
from symmerge.match import fit_per_layer, resolve_device
from symmerge.match.objective import state_distance
from symmerge.match.per_layer import MIN_GAIN, fit_gain
from symmerge.merge.card import model_card, recipe_for_card
from symmerge.merge.plan import MergePlan, tensor_parameters
from symmerge.merge.statistics import fisher_diagonal, input_grams
from symmerge.merge.vocabulary import RemappedState, fill_missing_rows
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


def plan_device(plan: MergePlan, executor: Any = None) -> torch.device:
    """Where the alignment's math runs: the recipe's ``alignment.device`` (a one-line error for cuda without a GPU;
    with a Ray executor, a GPU of the cluster)."""
    device = "cpu" if plan.recipe.alignment == "none" else plan.recipe.alignment.device
    return resolve_device(device) if executor is None else executor.resolve_device(device)


def fit_alignments(plan: MergePlan, states: list[LazyState], base: LazyState | None,
                   progress: bool, executor: Any = None) -> tuple[list[ModelTransform | None], ModelTransform | None]:
    """One transform per model and one for the base (``None`` for the reference itself and when not aligning).
    With a Ray ``executor`` every group of every model is one task, all submitted at once; the tasks read the
    checkpoints' safetensors files themselves."""
    transforms: list[ModelTransform | None] = [None] * len(states)
    if not plan.aligned:
        return transforms, None
    device = plan_device(plan, executor)
    ref_state = base if plan.reference_index is None else states[plan.reference_index]
    model_specs = plan.model_specs or [None] * len(states)
    if executor is not None:
        if any(model_specs):
            raise SymmergeError("models of different widths are aligned in this process: drop --ray")
        todo = [i for i in range(len(states)) if i != plan.reference_index]
        with_base = base is not None and plan.reference_index is not None
        pairs = [(ref_state, states[i]) for i in todo] + ([(ref_state, base)] if with_base else [])
        fits = executor.fit_many(pairs, plan.spec, plan.symmetries, device=device, progress=progress,
                                 names=[plan.names[i] for i in todo] + (["base model"] if with_base else []))
        fitted = list(zip([states[i] for i in todo] + ([base] if with_base else []), fits))
        for i, fit in zip(todo, fits):
            transforms[i] = fit.transform
        base_transform = fits[-1].transform if with_base else None
    else:
        fitted = []  # (state, fit) per aligned model, for the guard below
        for i, (state, name) in enumerate(zip(states, plan.names)):
            if i != plan.reference_index:
                # distances recorded while the fit reads the tensors: the guard then reads neither model again
                fit = fit_per_layer(ref_state, state, plan.spec, plan.symmetries, progress=progress, model_name=name, device=device,
                                    model_spec=model_specs[i], distances=True)
                transforms[i] = fit.transform
                fitted.append((state, fit))
        base_transform = None
        if base is not None and plan.reference_index is not None:
            fit = fit_per_layer(ref_state, base, plan.spec, plan.symmetries, progress=progress, model_name="base model",
                                device=device, distances=True)
            base_transform = fit.transform
            fitted.append((base, fit))
    # fine-tunes of one base share its basis: when no model's alignment gains more than MIN_GAIN, the optima are
    # near-identities fitting fine-tuning noise, and the merge keeps every model exactly as it is (all or none: one
    # model's optimum composed with another's snapped identity would not be the same function)
    if any(model_specs):  # a narrower model has to be embedded into the reference's widths, whatever it gains
        return transforms, base_transform
    if all(fit_gain(ref_state, state, plan.spec, fit) <= MIN_GAIN for state, fit in fitted):
        return [None] * len(states), None
    return transforms, base_transform


def align_whole_models(plan: MergePlan, states: list[LazyState], base: LazyState | None, progress: bool,
                       result: MergeResult, executor: Any = None) -> tuple[list, Any, list]:
    """The residual map touches every tensor, and activation / learned matching run the models on data, so these
    paths align whole models with :func:`symmerge.alignment.align` (the matcher the recipe names, on the recipe's
    calibration data): every model (and the base) comes back in the reference's own parametrisation (norms unfolded
    with the reference's gains; a head that folding untied stays untied, so a tied reference lends its embedding as
    its head); the merge then runs on those states as they are. Only a reference with a zero norm gain keeps every
    model folded, merged with the folded reference. A narrower model comes back grown to the reference's widths.
    Returns the aligned states, the aligned base, and per model the element found (``None`` for the reference):
    the engine reads from it which slots a narrower model leaves empty. Weight matching streams
    here too: the states are memory-mapped, so each aligned state is a
    :class:`~symmerge.groups.stream.TransformedState`, computed one unit at a time as the merge reads it, and the
    residual descent itself holds a few units per model (:func:`symmerge.match.residual.residual_descent`)."""
    ref_state = base if plan.reference_index is None else states[plan.reference_index]
    ref_ckpt = plan.base if plan.reference_index is None else plan.models[plan.reference_index]
    residual = plan.spec.residual if "residual" in plan.symmetries else None
    # the reference as the merge pairs it, computed unit by unit from the mapped checkpoint (never whole)
    partner = ref_state if residual is None else TransformedState(ref_state, plan.spec, untie=True, fold=not can_unfold(ref_state, residual))
    calibration = None
    if plan.match != "weights":
        data = plan.recipe.data
        calibration = load_calibration(plan.data_path, model_dir=ref_ckpt.path, main_input_name=model_input_name(ref_ckpt.config),
                                       max_length=data.max_length, num_examples=data.num_examples, batch_size=data.batch_size,
                                       labels=plan.match == "learned")
    options = dict(spec=plan.spec, symmetries=plan.symmetries, progress=progress, config=ref_ckpt.config, match=plan.match,
                   calibration=calibration, learn_steps=plan.recipe.alignment.learn_steps,
                   learn_seconds=plan.recipe.alignment.learn_seconds, max_seconds=plan.recipe.alignment.max_seconds,
                   device=plan.recipe.alignment.device, ray=executor)
    if plan.iterative:  # K ≥ 3 models, no base: each to the mean of the others, in rounds (align_many)
        many = align_many(list(states), reference=plan.reference_index, **options)
        ref_index = plan.reference_index or 0
        for i, name in enumerate(plan.names):
            # to the reference, as the star reports it and the CLI and the model card say: a model's last report
            # measures the distance to the mean of the others it was last aligned to
            before = [k for k in states[ref_index] if k in states[i]]
            after = [k for k in many.states[ref_index] if k in many.states[i]]
            result.alignment[name] = {"distance_before": state_distance(states[i], states[ref_index], before),
                                      "distance_after": state_distance(many.states[i], many.states[ref_index], after),
                                      "rounds": many.rounds, "spread_history": many.spread_history}
        return many.states, None, [None] * len(states)
    aligned, elements = [], []
    model_specs = plan.model_specs or [None] * len(states)
    for i, (state, name) in enumerate(zip(states, plan.names)):
        if i == plan.reference_index:
            aligned.append(partner)
            elements.append(None)
            result.alignment[name] = {"distance_before": 0.0, "distance_after": 0.0}
            continue
        r = align(ref_state, state, model_name=name, model_spec=model_specs[i], **options)
        aligned.append(r.state_dict)
        elements.append(r.transform)
        result.alignment[name] = {"distance_before": r.report.distance_before, "distance_after": r.report.distance_after}
    aligned_base = None
    if base is not None:
        if plan.reference_index is None:
            aligned_base = partner
        else:
            r = align(ref_state, base, model_name="base model", **options)
            aligned_base = r.state_dict
    return aligned, aligned_base, elements


def collect_statistics(plan: MergePlan, states: list, transforms: list[ModelTransform | None], progress: bool) -> list[dict]:
    """The method's statistics (Fisher diagonals or input Gram matrices) of every model, computed on the model
    *after* alignment (statistics of the unaligned model sit in the wrong basis: the bug of the seed paper's code).
    Per model: ``{"stats": checkpoint key → statistic, "layout": weight key → stored in×out}``."""
    data = plan.recipe.data
    compute = fisher_diagonal if plan.method.statistics == "fisher" else input_grams
    out = []
    for i, (state, ckpt) in enumerate(zip(states, plan.models)):
        aligned = dict(state) if transforms[i] is None else apply_transform(state, plan.spec, transforms[i])
        model = build_model(untied_config(ckpt.config, "residual" in plan.symmetries), aligned)  # residual: the folded head is untied
        batches = load_calibration(plan.data_path, model_dir=ckpt.path, main_input_name=model.main_input_name,
                                   max_length=data.max_length, num_examples=data.num_examples, batch_size=data.batch_size)
        out.append({"stats": to_checkpoint_names(model, compute(model, batches, progress=progress)),
                    "layout": to_checkpoint_names(model, linear_layout(model))})
        del model, aligned
    return out


def listed_base_index(plan: MergePlan) -> int | None:
    """The index of base_model among the models when the recipe lists it there too (mergekit's usual SLERP recipe:
    ``models: [A, B]``, ``base_model: A``), else ``None``."""
    if plan.base is None:
        return None
    base = _identity(plan.base)
    return next((i for i, m in enumerate(plan.models) if _identity(m) == base), None)


def slice_base_index(plan: MergePlan, slice_index: int) -> int | None:
    """The index among the models of the base of output slice ``slice_index``'s tensors: the slice's own base_model
    (mergekit's per-slice base), else base_model when the recipe lists it among the models (:func:`listed_base_index`),
    else ``None``."""
    slices = getattr(plan, "slices", None) or []
    own = getattr(slices[slice_index], "base", None) if slice_index < len(slices) else None
    return own if own is not None else listed_base_index(plan)


def _identity(ckpt: Any) -> tuple:
    """A checkpoint's identity (folder and LoRA adapter); a bare object with a ``path`` (tests) by its folder."""
    return ckpt.identity if hasattr(ckpt, "identity") else (ckpt.path.resolve(), None)


def merge_tensor(plan: MergePlan, item: AlignedTensor, stats: list[dict] | None, extra: dict[str, Any]) -> torch.Tensor:
    """One output tensor from the models' (aligned) tensors, with what the method declared it needs.

    Methods that use a base (``needs_base``, or ``optional_base`` when the recipe has one) get it as ``base=``; if
    base_model is also listed among the models, that entry is the base and not a model merged (as in mergekit): it
    is removed from the tensors, the weights, the per-model parameter lists and any per-model list in ``extra``.
    The method rounds once, to the output dtype (``out_dtype=``).
    """
    method, key, tensors = plan.method, item.key, list(item.tensors)
    inputs = item.inputs or [(i, key) for i in range(len(tensors))]
    params, weights = tensor_parameters(plan, key, item.slice, item.t, inputs)
    kwargs: dict[str, Any] = {**params, **extra}
    transposed = False
    if method.statistics_argument is not None:
        per_model = [s["stats"].get(key) for s in stats]
        kwargs[method.statistics_argument] = None if any(x is None for x in per_model) else per_model
        transposed = method.linear_layout and per_model[0] is not None and bool(stats[0]["layout"].get(key))
    if method.needs_base or (method.optional_base and item.base is not None):
        base, listed = item.base, slice_base_index(plan, item.slice)
        j = next((p for p, (m, _) in enumerate(inputs) if m == listed), None)
        if j is not None and item.base is not None:
            n = len(tensors)
            base = tensors[j] if plan.reference_index == listed or getattr(plan, "layout", None) is not None else item.base  # the untransformed copy
            per_model = {p.arg for p in method.params if p.per_model} | set(extra)
            for arg in per_model:
                value = kwargs.get(arg)
                if isinstance(value, (list, tuple)) and len(value) == n:
                    kwargs[arg] = [v for i, v in enumerate(value) if i != j]
            tensors = tensors[:j] + tensors[j + 1 :]
            weights = None if weights is None else weights[:j] + weights[j + 1 :]
        kwargs["base"] = base
    if "name" in method.arguments:
        kwargs["name"] = key
    kwargs["out_dtype"] = plan.dtype or item.raw[0].dtype
    if transposed:  # Conv1D: the method works in nn.Linear layout, the checkpoint stores in×out
        return method.fn([t.T for t in tensors], weights=weights, **kwargs).T.contiguous()
    return method.fn(tensors, weights=weights, **kwargs)


def _merged(plan: MergePlan, item: AlignedTensor, stats: list[dict] | None, extra: dict[str, Any]) -> torch.Tensor:
    """:func:`merge_tensor`, already rounded once to the output dtype (``.to`` is a guard, not a second rounding)."""
    return merge_tensor(plan, item, stats, extra).to(plan.dtype or item.raw[0].dtype)


@dataclass
class AlignedTensor:
    key: str
    tensors: list[torch.Tensor]  # per model, in the reference basis
    base: torch.Tensor | None  # in the reference basis
    raw: list[torch.Tensor]  # per model, as stored
    reference: torch.Tensor | None  # the alignment reference's tensor
    inputs: list[tuple[int, str]] = field(default_factory=list)  # (model index, its tensor's name) per tensor
    slice: int = 0  # the output slice it belongs to, and its place t in it (gradients)
    t: float = 0.0


def aligned_tensors(plan: MergePlan, states: list[LazyState], base: LazyState | None,
                    transforms: list[ModelTransform | None], base_transform: ModelTransform | None,
                    elements: list[ModelTransform | None] | None = None) -> Iterator[AlignedTensor]:
    """Every tensor of the checkpoint, in order, for every model (and the base) brought into the reference basis;
    one symmetry group's tensors at a time are held in memory. With a tokenizer source, vocabulary tensors come in
    the output vocabulary, every row filled. ``elements``: each model's alignment, to find the slots a narrower
    model leaves empty (default ``transforms``; the whole-model path has applied its elements already and passes
    them here); those are filled per ``alignment.unmatched`` (:func:`fill_empty_slots`)."""
    for item in _aligned_tensors(plan, states, base, transforms, base_transform, elements):
        yield _with_vocabulary(plan, item)


def _with_vocabulary(plan: MergePlan, item: AlignedTensor) -> AlignedTensor:
    """``item`` with the rows its models lack in the output vocabulary filled by mergekit's rule
    (:func:`symmerge.merge.vocabulary.fill_missing_rows`), in the reference basis; other tensors as they are."""
    vocab = getattr(plan, "vocabulary", None)
    if vocab is None or not vocab.remap or item.key not in vocab.keys:
        return item
    who = [m for m, _ in item.inputs]
    rows = list(item.tensors)
    listed = slice_base_index(plan, item.slice)
    base_position = who.index(listed) if listed in who else None
    if item.base is not None and base_position is None:
        who.append(len(plan.models))
        rows.append(item.base)
        base_position = len(rows) - 1
    present = [vocab.permutations[m] >= 0 for m in who]
    missing = next((o for o in vocab.overrides.values() if o.model is not None and o.model not in who), None)
    if missing is not None:
        token = next(t for t, u in vocab.vocab_out.items() if u == missing.token)
        raise SymmergeError(f"tokenizer.tokens.{token}: its source model is not among the models of {item.key}")
    filled = fill_missing_rows(rows, present, who, base_position, vocab.overrides, len(vocab.vocab_out))
    n = len(item.tensors)
    base = item.base if item.base is None else filled[base_position]
    return replace(item, tensors=filled[:n], base=base)


def _aligned_tensors(plan: MergePlan, states: list[LazyState], base: LazyState | None,
                     transforms: list[ModelTransform | None], base_transform: ModelTransform | None,
                     elements: list[ModelTransform | None] | None = None) -> Iterator[AlignedTensor]:
    elements = transforms if elements is None else elements
    if plan.layout is not None:  # a frankenmerge: renamed tensors, no alignment
        for o in plan.layout:
            raw = [states[m][name] for m, name in o.inputs]
            listed = slice_base_index(plan, o.slice)  # the slice's own base_model, else the recipe's
            base_t = next((t for (m, _), t in zip(o.inputs, raw) if m == listed), None)
            yield AlignedTensor(o.key, raw, base_t, raw, None, o.inputs, o.slice, o.t)
        return
    keys = list(states[0].keys())
    # a narrower model not aligned yet (the whole-model path hands over grown states, with transforms None)
    embeddings = [None if own is None or t is None else embedding_transform(plan.spec, own)
                  for own, t in zip(plan.model_specs or [None] * len(states), transforms)]
    for group, unit_keys in merge_units(plan, keys):
        # a narrower model's tensors "as stored" are its identity embedding into the reference's widths
        raw = [_subset(s, unit_keys) if e is None or group is None else transformed_unit(s, group, unit_keys, e)
               for s, e in zip(states, embeddings)]
        # untransformed units reuse the tensors just read instead of reading them from the mmap again
        aligned = [r if group is None or t is None else transformed_unit(s, group, unit_keys, t) for s, r, t in zip(states, raw, transforms)]
        if group is not None and plan.recipe.alignment != "none":
            fill_empty_slots(aligned, group, elements, plan.weights, plan.recipe.alignment.unmatched)
        aligned_base = transformed_unit(base, group, unit_keys, base_transform) if base is not None else None
        reference = raw[plan.reference_index] if plan.reference_index is not None else aligned_base
        for key in unit_keys:
            s, t = plan.position(key)
            yield AlignedTensor(key, [a[key] for a in aligned], aligned_base[key] if aligned_base else None,
                                [r[key] for r in raw], reference[key] if reference else None,
                                [(i, key) for i in range(len(states))], s, t)


def _one_buffer(tensors: list[torch.Tensor]) -> bool:
    """Whether every model holds the same tensor: dtype, shape and values (a buffer, not a weight)."""
    first = tensors[0]
    return all(t.dtype == first.dtype and t.shape == first.shape and torch.equal(t, first) for t in tensors[1:])


def _differing_integer_tensor(method: str, key: str, tensors: list[torch.Tensor]) -> SymmergeError:
    dtype = next(t.dtype for t in tensors if not t.is_floating_point())
    return SymmergeError(f"{method}: cannot merge a {dtype} tensor (tensor {key!r}): it differs between the models, so it is "
                         "no buffer to copy from one of them; quantised weights: dequantise the models to bfloat16 or float32 first")


def check_integer_tensors(method: str, states: list[Mapping[str, torch.Tensor]]) -> None:
    """:func:`copied_buffer`'s rule before anything is aligned, so that a quantised model is refused in seconds instead
    of after a whole alignment: every tensor that any model (or the base) stores, by its header, in a dtype that is
    not floating point must be one buffer (:func:`_one_buffer`; such buffers are small, and quantised weights are
    refused at the first that differs). Checkpoints without headers (pickle) are left to the merge pass."""
    layouts = [getattr(s, "layout", lambda: None)() for s in states]
    if any(layout is None for layout in layouts):
        return
    integer = sorted({k for layout in layouts for k, (dtype, _) in layout.items() if not dtype.startswith(("F", "BF"))})
    for key in integer:
        if any(key not in layout for layout in layouts):
            continue  # a missing tensor is the shape check's to report
        tensors = [s[key] for s in states]
        if not _one_buffer(tensors):
            raise _differing_integer_tensor(method, key, tensors)


def copied_buffer(method: str, item: AlignedTensor) -> torch.Tensor | None:
    """What to write for ``item`` when a model (or the base) stores it in a dtype that is not floating point, else
    ``None`` (every tensor is floating: merge them). Integer and boolean buffers (position ids, masks) are the same
    in every model: the first model's is copied. One that differs between the models (int8 weights of a quantised
    checkpoint, or an integer tensor that another model holds as floats) is refused, whichever model holds it: copying
    model 0's would silently drop the others'."""
    tensors = [*item.raw, *([] if item.base is None else [item.base])]
    if all(t.is_floating_point() for t in tensors):
        return None
    if _one_buffer(tensors):
        return item.raw[0]
    raise _differing_integer_tensor(method, item.key, tensors)


def method_extras(plan: MergePlan, states, base, transforms, base_transform, stats, progress: bool) -> dict[str, Any]:
    """Whole-model quantities the method's ``prepare`` asks for before the per-tensor pass (none for most)."""
    if plan.method.prepare is None:
        return {}

    def task_vectors() -> Iterator[list[torch.Tensor]]:
        items = aligned_tensors(plan, states, base, transforms, base_transform)
        for item in tqdm(items, total=len(states[0]), desc="whole-model pass", unit="tensor", disable=not progress, leave=False):
            if item.tensors[0].is_floating_point():
                yield [t.float() - item.base.float() for t in item.tensors]

    by_tensor = {k: [s["stats"][k] for s in stats] for k in stats[0]["stats"]} if stats else {}
    return plan.method.prepare(plan.params, task_vectors, by_tensor)


def run_merge(plan: MergePlan, out: Path, *, force: bool = False, progress: bool = True, executor: Any = None) -> MergeResult:
    """Align, then merge ``plan`` into ``out``. ``executor``: a :class:`symmerge.match.distributed.RayExecutor`
    to fit the alignments as Ray tasks (same result)."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    plan_device(plan, executor)  # cuda without a GPU: a one-line error before any weight is read
    lend = dict([plan.lend_head]) if plan.lend_head else None  # a tied model's embedding stands in for its head
    states = [_in_output_vocabulary(plan, LazyState(c, lend), i) for i, c in enumerate(plan.models)]
    listed = listed_base_index(plan)
    # base_model listed among the models (mergekit's SLERP recipe): the same reader, not the checkpoint mapped and
    # NaN-checked a second time (a whole extra model in RSS)
    base = None if not plan.base else states[listed] if listed is not None else _in_output_vocabulary(plan, LazyState(plan.base, lend), base_key(plan))
    if plan.layout is None:  # a frankenmerge takes each tensor from its own source: the merge pass checks those
        check_integer_tensors(plan.method.name, [*states, *([base] if base is not None and listed is None else [])])
    result = MergeResult(out, seconds)
    residual = "residual" in plan.symmetries
    whole_models = plan.aligned and (residual or plan.match != "weights" or plan.iterative)
    transforms, base_transform = [None] * len(states), None
    if not whole_models or (plan.match == "weights" and not plan.iterative):
        transforms, base_transform = fit_alignments(plan, states, base, progress, executor)
        if whole_models:
            # models that share a basis (fine-tunes of one base) are told apart by the per-layer fit, whose guard
            # (MIN_GAIN) fits no noise: then nothing is aligned at all, the residual map included (its folding and
            # d×d rotation would otherwise "improve" fine-tuning noise and change output bits); else the whole-model
            # path below fits the per-layer elements again, jointly with the residual map
            whole_models = any(t is not None for t in transforms) or base_transform is not None
            transforms, base_transform = [None] * len(states), None
    residual = residual and whole_models
    elements = transforms  # where each model's empty slots are (models of different widths)
    if whole_models:
        states, base, elements = align_whole_models(plan, states, base, progress, result, executor)
    seconds["align"] = time.perf_counter() - start

    start = time.perf_counter()
    stats = collect_statistics(plan, states, transforms, progress) if plan.method.needs_data else None
    seconds["statistics"] = time.perf_counter() - start

    start = time.perf_counter()
    extra = method_extras(plan, states, base, transforms, base_transform, stats, progress)
    n = len(states)
    sq_before, sq_after, sq_task, sq_base = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    own_bases = any(getattr(sl, "base", None) is not None for sl in plan.slices)
    check_base = (base is not None or own_bases) and plan.method.needs_base
    compared = 0  # floating tensors with a base seen: the base check runs after the first few, and at the end
    total = len(plan.layout) if plan.layout is not None else len(states[0])
    with atomic_output_dir(out, force) as tmp:
        writer = ShardWriter(tmp, plan.shard_size)
        pending: deque[tuple[str, Future | torch.Tensor]] = deque()  # in output order

        def write_oldest() -> None:
            key, value = pending.popleft()
            writer.add(key, value.result() if isinstance(value, Future) else value)

        # a method registered with workers > 1 (pure per tensor, small scratch) has that many output tensors merged
        # at once, in threads (torch releases the GIL), written in order, while the reads and checks go on here: TIES's
        # elementwise kernel otherwise kept one of the two cores busy
        workers = plan.method.workers
        with tqdm(total=total, desc="merging", unit="tensor", disable=not progress, leave=False) as bar, \
                ThreadPoolExecutor(workers) as pool:
            for item in aligned_tensors(plan, states, base, transforms, base_transform, elements):
                bar.update(1)
                while len(pending) >= workers:
                    write_oldest()
                buffer = copied_buffer(plan.method.name, item)
                if buffer is not None:
                    pending.append((item.key, buffer))  # integer buffers (position ids...) come from the first model
                    continue
                if item.base is not None and check_base:  # slerp & co. take a base without task vectors: no check
                    b, tasks = _sq_base_and_tasks(item.base, item.tensors)
                    for (m, _), task in zip(item.inputs, tasks):
                        sq_base[m] += b
                        sq_task[m] += task
                    compared += 1
                    if check_base and compared == EARLY_CHECK:  # refuse on the first tensors, not after merging them all
                        _check_fine_tunes(plan, sq_task, sq_base, listed, result, early=True)
                if item.reference is not None and plan.aligned and not whole_models:
                    for i in range(n):
                        sq_before[i] += _sq(item.raw[i], item.reference)
                        sq_after[i] += _sq(item.tensors[i], item.reference)
                pending.append((item.key, pool.submit(_merged, plan, item, stats, extra)))
            while pending:
                write_oldest()
        if check_base:
            _check_fine_tunes(plan, sq_task, sq_base, listed, result, early=False)
        writer.close()
        seconds["merge+write"] = time.perf_counter() - start
        if plan.aligned and not whole_models:
            for i, name in enumerate(plan.names):
                t = transforms[i]
                result.alignment[name] = {"distance_before": math.sqrt(sq_before[i]), "distance_after": math.sqrt(sq_after[i]),
                                          "identity": t is None or not (t.ffn or t.heads or t.residual is not None)}
        source = plan.config_source
        copy_model_files(source.path, tmp)
        vocab = plan.vocabulary
        if vocab is not None and vocab.tokenizer is not None:
            save_tokenizer(vocab.tokenizer, tmp)
        elif vocab is not None and vocab.copy_from != source.path:
            copy_tokenizer_files(vocab.copy_from, tmp)
        if plan.chat_template is not None:
            set_chat_template(tmp, plan.chat_template)
        config = dict(source.config)
        if vocab is not None and "vocab_size" in config:  # as mergekit: the output vocabulary's length, padded
            config["vocab_size"] = vocab.size
        elif vocab is not None and isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
            config["text_config"] = {**config["text_config"], "vocab_size": vocab.size}  # a vision-language model's
        if getattr(plan, "module_depths", None):  # modules: each module's depth where the config states it (as mergekit)
            for key, count, layers in plan.module_depths:
                config = with_module_depth(config, key, count, layers)
        elif plan.layout is not None and plan.num_layers_out is not None:  # a frankenmerge: the new depth, and
            # per-layer config lists follow the layers
            config = with_layer_count(config, plan.num_layers_out, [layer for _, layer in _source_layers(plan)])
        write_config(config, tmp, plan.dtype, untie=residual or plan.lend_head is not None)
        (tmp / "merge.yaml").write_text(yaml.safe_dump(recipe_for_card(plan), sort_keys=False))
        (tmp / "README.md").write_text(model_card(plan, result.alignment, result.seconds))
    return result


def base_key(plan: MergePlan) -> int:
    """The base's checkpoint key in :attr:`VocabularyPlan.permutations`: its index when listed among the models,
    else ``len(models)``."""
    listed = listed_base_index(plan)
    return len(plan.models) if listed is None else listed


def _in_output_vocabulary(plan: MergePlan, state: LazyState, key: int) -> LazyState | RemappedState:
    """``state`` with its vocabulary tensors permuted to the output vocabulary (missing rows zero until filled)."""
    vocab = plan.vocabulary
    if vocab is None or not vocab.remap:
        return state
    return RemappedState(state, vocab.permutations[key], vocab.keys, vocab.size)


EARLY_CHECK = 8  # floating tensors: the base check runs once after these, then over the whole model


def _check_fine_tunes(plan: MergePlan, sq_task: list[float], sq_base: list[float], listed: int | None, result: MergeResult,
                      early: bool) -> None:
    """Refuse task vectors of models that are no fine-tune of the base: ‖τ_i‖ / ‖θ_base‖ over the tensors seen."""
    for i, name in enumerate(plan.names):
        if i == listed or sq_base[i] == 0:
            continue
        ratio = math.sqrt(sq_task[i] / max(sq_base[i], 1e-30))
        if not early:
            result.task_vector_ratio[name] = ratio
        if ratio > UNRELATED_BASE and not plan.recipe.allow_unrelated_base:
            where = f" (over its first {EARLY_CHECK} tensors)" if early else ""
            raise SymmergeError(
                f"model {name} is not a fine-tune of base_model: its task vector is {ratio:.2f}x the base's norm{where} "
                f"(fine-tunes are typically < 0.1); {plan.method.name} needs models fine-tuned from one base — "
                "use linear, slerp, fisher or regmean for independently trained models (allow_unrelated_base: true overrides)"
            )


def _source_layers(plan: MergePlan) -> list[tuple[int, int]]:
    """(model index, layer) each output layer of a frankenmerge is taken from (its first source's)."""
    return [(sl.sources[0].model, sl.sources[0].start + i) for sl in plan.slices for i in range(sl.length)]


#: ``_sq`` works on chunks of this many entries: float32 copies of a chunk stay in cache, where a float32 copy of a
#: whole bf16 tensor costs a fresh allocation's page faults (about 10x slower; and hundreds of MB at the peak).
SQ_CHUNK = 1 << 20


def _sq_base_and_tasks(base: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[float, list[float]]:
    """``‖base‖²`` and ``‖θ_i − base‖²`` per model, as :func:`_sq` computes them but converting ``base`` to float32
    once per chunk for all models."""
    a = base.reshape(-1)
    others = [t.reshape(-1) for t in tensors]
    n = a.numel()
    fb = torch.empty(min(n, SQ_CHUNK), dtype=torch.float32, device=a.device)
    buf = torch.empty_like(fb)
    sq_base, sq_tasks = 0.0, [0.0] * len(others)
    for s in range(0, n, SQ_CHUNK):
        e = min(s + SQ_CHUNK, n)
        c = fb[: e - s].copy_(a[s:e])
        sq_base += float(torch.linalg.vector_norm(c)) ** 2
        for i, t in enumerate(others):
            sq_tasks[i] += float(torch.linalg.vector_norm(buf[: e - s].copy_(t[s:e]).sub_(c))) ** 2
    return sq_base, sq_tasks


def _sq(t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """``‖t − minus‖²`` (``‖t‖²`` without ``minus``) in float32 chunk by chunk, the chunks' squares summed in float64:
    the fine-tune check and alignment distances, without a float32 copy of whole tensors."""
    a = t.reshape(-1)
    b = minus.reshape(-1) if minus is not None else None
    n = a.numel()
    buf = torch.empty(min(n, SQ_CHUNK), dtype=torch.float32, device=a.device)
    other = torch.empty_like(buf) if b is not None else None
    total = 0.0
    for s in range(0, n, SQ_CHUNK):
        e = min(s + SQ_CHUNK, n)
        c = buf[: e - s].copy_(a[s:e])
        if b is not None:
            c.sub_(other[: e - s].copy_(b[s:e]))
        total += float(torch.linalg.vector_norm(c)) ** 2
    return total
