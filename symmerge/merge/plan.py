"""The merge plan: what :func:`~symmerge.merge.planner.plan_merge` resolves a recipe to and the engine runs —
every checkpoint opened (headers only), the output slices and, for a frankenmerge or ``modules:``, every output tensor
with its inputs — and :func:`tensor_parameters`, one output tensor's parameters resolved from the plan's scopes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from symmerge.io import Checkpoint
from symmerge.merge.methods import MergeMethod
from symmerge.merge.recipe import Recipe
from symmerge.merge.settings import layer_position, resolve
from symmerge.merge.vocabulary import VocabularyPlan
from symmerge.spec import ModelSpec


@dataclass
class SliceSource:
    """One input of an output slice: model ``model`` (an index into :attr:`MergePlan.models`) from layer ``start``."""

    model: int
    start: int
    parameters: dict[str, Any]


@dataclass
class OutSlice:
    """Output layers ``offset … offset + length − 1``, each merged from the matching layer of every source."""

    sources: list[SliceSource]
    parameters: dict[str, Any]
    offset: int
    length: int | None  # None: the whole model, whose layers its tensor names do not tell (no gradients then)
    base: int | None = None  # its own base_model (mergekit's per-slice base), a model index; None: the recipe's
    module: dict[str, Any] | None = None  # its module's parameters (modules: NAME); None: the recipe's module_parameters


@dataclass
class OutTensor:
    """One output tensor of a frankenmerge: its name, the (model index, tensor name) it is merged from, where it
    sits (``slice`` index, ``t`` for gradients)."""

    key: str
    inputs: list[tuple[int, str]]
    slice: int
    t: float


@dataclass
class MergePlan:
    """A validated recipe with every checkpoint opened (headers only) and every choice resolved."""

    recipe: Recipe
    models: list[Checkpoint]
    weights: list[float] | None
    base: Checkpoint | None
    method: MergeMethod
    params: dict[str, Any]
    symmetries: frozenset[str]
    reference_index: int | None  # index into models; None when aligning to the base model, or not aligning
    spec: ModelSpec | None
    dtype: torch.dtype | None  # the output dtype (out_dtype, else dtype)
    shard_size: int
    data_path: Path | None
    names: list[str] = field(default_factory=list)
    match: str = "weights"  # the matcher that finds each model's alignment (symmerge.match.MATCHERS)
    lend_head: tuple[str, str] | None = None  # (head, embedding): some models tie their head, others store one
    slices: list[OutSlice] = field(default_factory=list)
    # the first model's layers (gradients, slices), aligned or not: its spec, else read from the tensor names
    # (symmerge.spec.layer_structure); None when the names do not tell (gradients and slices are then refused)
    layers: ModelSpec | None = None
    layout: list[OutTensor] | None = None  # a frankenmerge: output tensors renamed from other layers (no alignment)
    num_layers_out: int | None = None
    varying: bool = False  # some parameter differs between tensors or models (gradients, filters, per-model values)
    notes: list[str] = field(default_factory=list)  # one line each: what a mergekit option does (or does not) here
    vocabulary: VocabularyPlan | None = None  # tokenizer_source / tokenizer: the output vocabulary and the remapping
    model_specs: list[ModelSpec | None] = field(default_factory=list)  # per model: its own spec when narrower than the reference's
    chat_template: str | None = None  # the template written into the output's tokenizer (``auto`` resolved); None: as copied
    # modules: of a multi-module model: (config key of a module's depth, its new depth, the source layer of each
    # output layer) for every module whose depth the config states
    module_depths: list[tuple[str, int, list[int]]] = field(default_factory=list)

    @property
    def aligned(self) -> bool:
        return bool(self.symmetries)

    @property
    def iterative(self) -> bool:
        """Whether the models are aligned to a common basis iteratively (:func:`symmerge.alignment.align_many`): asked
        for (``alignment.iterative``), three models or more, no base model, weight matching."""
        return bool(self.aligned and self.recipe.alignment.iterative and self.base is None and len(self.models) >= 3
                    and self.match == "weights")

    @property
    def config_source(self) -> Checkpoint:
        """The checkpoint whose config (and tokenizer files) the output takes: the base where the models are aligned
        to it, else the reference (the first model when nothing is aligned)."""
        return self.base if self.aligned and self.reference_index is None else self.models[self.reference_index or 0]

    def position(self, key: str) -> tuple[int, float]:
        """(slice index, t) of an output tensor of an unrenamed merge: its layer's place in its slice; tensors
        outside the layers take t = 0 in the first slice (embeddings) or the last one (final norm, head)."""
        i = self.layers.layer_of(key) if self.layers is not None else None
        if i is None:
            first = self.layers is None or self.layers.is_embedding(key)
            return (0 if first else len(self.slices) - 1), 0.0
        for s, sl in enumerate(self.slices):
            if sl.length is None or sl.offset <= i < sl.offset + sl.length:
                return s, 0.0 if sl.length is None else layer_position(i - sl.offset, sl.length)
        return len(self.slices) - 1, 0.0


def tensor_parameters(plan: MergePlan, key: str, slice_index: int, t: float,
                      inputs: list[tuple[int, str]]) -> tuple[dict[str, Any], list[float] | None]:
    """The method's parameters and the per-input weights for one output tensor, resolved as mergekit resolves
    them: a per-model value from the input's own parameters, then the slice's, the module's (``modules:``), the
    recipe's; a shared value from the slice's, the module's, then the recipe's; gradients at ``t``, filters on the tensor's name (an input's own name for
    per-model values), else the method's default. Per-model values that agree are passed as one scalar."""
    if not getattr(plan, "varying", False):
        return plan.params, None if plan.weights is None else [plan.weights[m] for m, _ in inputs]
    sl = plan.slices[slice_index]
    top = plan.recipe.parameters
    module = plan.recipe.module_parameters if sl.module is None else sl.module
    params = dict(plan.params)
    specs = {p.name: p for p in plan.method.params}
    own = {src.model: src.parameters for src in sl.sources}
    for name, spec in specs.items():
        if not spec.per_model:
            value = resolve(name, (sl.parameters, module, top), key, t)
            if value is not None:
                params[spec.arg] = spec.check(plan.method.name, value)
            continue
        values = []
        for m, input_name in inputs:
            value = resolve(name, (own.get(m), sl.parameters, module, top), input_name, t)
            values.append(plan.params[spec.arg] if value is None else spec.check(plan.method.name, value))
        params[spec.arg] = values[0] if all(v == values[0] for v in values) else values
    weights = None
    if _mentions(plan, "weight"):
        weights = []
        for m, input_name in inputs:
            value = resolve("weight", (own.get(m), sl.parameters, module, top), input_name, t)
            weights.append(1.0 if value is None else float(value))
    return params, weights


def _mentions(plan: MergePlan, key: str) -> bool:
    return any(key in (scope or {}) for scope in parameter_scopes(plan.recipe.parameters, plan.slices, plan.recipe.module_parameters))


def parameter_scopes(top: dict, slices: list[OutSlice], module: dict | None = None) -> list[dict]:
    return ([top, module or {}] + [sl.module or {} for sl in slices] + [sl.parameters or {} for sl in slices]
            + [s.parameters or {} for sl in slices for s in sl.sources])


def has_weight(top: dict, slices: list[OutSlice], module: dict | None = None) -> bool:
    return any("weight" in scope for scope in parameter_scopes(top, slices, module))
