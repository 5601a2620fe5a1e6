"""Planning mergekit's multi-module recipes (``modules: {text_decoder: ..., vision_tower: ...}``, and a top-level
recipe on a multi-module model as mergekit normalises it): each module merged from its own models or slices, its
layers read from its tensor names."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from symmerge.errors import SymmergeError, cut
from symmerge.io import Checkpoint
from symmerge.merge.methods import MergeMethod
from symmerge.merge.plan import MergePlan, OutSlice, OutTensor, SliceSource, parameter_scopes
from symmerge.merge.plan_steps import check_model_count, check_scope, check_slice_bases, frankenmerge_layout, model_names, note_once, output_choices, slice_base
from symmerge.merge.recipe import ModuleEntry, Recipe, parse_size, spelled
from symmerge.merge.references import index_in, open_reference, refuse_repeated_models
from symmerge.merge.settings import has_gradient
from symmerge.merge.tokenizer_plan import plan_vocabulary, remapped_shapes
from symmerge.spec import (
    MODULAR_ARCHITECTURES,
    ModelSpec,
    Module,
    architecture_name,
    module_keys,
    module_layers,
    module_of,
    modules_of,
    stated_depth,
)


def plan_modules(recipe: Recipe, root: Path | None, allow_pickle: bool, method: MergeMethod, params: dict[str, Any],
                 notes: list[str]) -> MergePlan:
    """A multi-module recipe (``modules: {text_decoder: ..., vision_tower: ...}``) as mergekit 0.1.5 plans it
    (``MergePlanner.normalize_config`` / ``plan_module``): each module's tensors merged from that module's models or
    slices with that module's parameters; ``merge_method``, ``base_model``, the recipe's ``parameters`` and the dtypes
    apply to all. A module's ``models:`` is one slice of the module's whole depth, with the base model added as a
    source when the method uses one and it is not listed (as mergekit adds it). Every module of the architecture
    must be listed, and every tensor must belong to one: mergekit writes no tensor outside the modules it merges,
    which would leave the output without them. Never aligned: symmerge has no spec of these models."""
    assert recipe.modules is not None
    models: list[Checkpoint] = []

    base = open_reference(recipe.base_model, root, "base_model", allow_pickle) if recipe.base_model else None
    if method.needs_data or method.prepare is not None and method.name != "ties":
        raise SymmergeError(f"merge_method {method.name} needs whole models: it cannot merge modules: module by module "
                            "(use models: for all modules at once)")
    if recipe.alignment != "none" and not recipe.default_alignment:
        raise SymmergeError("alignment: symmerge cannot align the modules of a multi-module model (it has no spec of "
                            "them): set alignment: none, or leave alignment out")
    if recipe.data is not None:
        note_once(notes, "data: not read: merging modules one by one uses no calibration data")

    # every input opened once, in recipe order (a module's models, then its slices' sources)
    # per module, per slice: (model index, parameters, layer_range or None for the whole module) of each source, the
    # slice's parameters, its own base_model (mergekit's per-slice base, a model index; None: the recipe's)
    entries: dict[str, list[tuple[list[tuple[int, dict, tuple[int, int] | None]], dict, int | None]]] = {}
    for name, entry in recipe.modules.items():
        where = f"modules.{cut(name, 40)}"
        if entry.models:
            sources = [(index_in(models, open_reference(m.model, root, f"{where}.models.{i}.model", allow_pickle)),
                        check_scope(method, m.parameters, f"{where}.models.{i}.parameters", True, notes), None)
                       for i, m in enumerate(entry.models)]
            unlisted = base is not None and all(models[m].identity != base.identity for m, _, _ in sources)
            check_model_count(method, len(entry.models), unlisted, f"{where}: ")  # an interpolation counts the unlisted base
            refuse_repeated_models([models[m].identity for m, _, _ in sources], f"{where}.models")
            if unlisted and method.uses_base:
                sources.append((index_in(models, base), {}, None))  # mergekit: "Base model specified but not in input models - adding"
            if method.needs_base and base is None:
                raise SymmergeError(f"{where}: merge_method {method.name} needs base_model: the common pretrained "
                                    "ancestor its models were fine-tuned from")
            entries[name] = [(sources, {}, None)]
        else:
            entries[name] = []
            for s, sl in enumerate(entry.slices):
                if sl.residual_weight is not None:
                    note_once(notes, "residual_weight: mergekit declares it but never uses it, so it changes nothing here either")
                method.check_models(len(sl.sources), True)
                sources = [(index_in(models, open_reference(src.model, root, f"{where}.slices.{s}.sources.{j}.model", allow_pickle)),
                            check_scope(method, src.parameters, f"{where}.slices.{s}.sources.{j}.parameters", True, notes),
                            src.layer_range) for j, src in enumerate(sl.sources)]
                refuse_repeated_models([models[m].identity for m, _, _ in sources], f"{where}.slices.{s}.sources")
                own_base = slice_base(method, sl, f"{where}.slices.{s}", [m for m, _, _ in sources], models, base,
                                      root, allow_pickle, notes)
                if method.needs_base and base is None and own_base is None:
                    raise SymmergeError(f"{where}.slices.{s}: merge_method {method.name} needs a base model for this slice: "
                                        "give it base_model (its own, one of its sources) or set the recipe's base_model")
                entries[name].append((sources, check_scope(method, sl.parameters, f"{where}.slices.{s}.parameters", False, notes),
                                      own_base))
    if base is not None:  # the base, named as a source too, is that same model
        base = next((c for c in models if c.identity == base.identity), base)

    architecture, table = _modular_architecture(recipe, models, base)
    by_name = {m.name: m for m in table}
    missing = [m.name for m in table if m.name not in recipe.modules]
    if missing:
        raise SymmergeError(f"modules: {architecture} has modules {', '.join(by_name)}; the recipe omits {', '.join(missing)} "
                            "(mergekit 0.1.5 writes no tensor of an omitted module, so the output would lack it): list "
                            "every module, e.g. with another module's models")
    for ckpt in models + ([base] if base is not None and base not in models else []):
        stray = next((k for k in ckpt.shapes() if module_of(table, k) is None), None)
        if stray is not None:
            prefixes = ", ".join(p for m in table for p in m.prefixes)
            raise SymmergeError(f"modules: {ckpt.path}: tensor {cut(stray, 80)} is in no module of {architecture} (tensor "
                                f"names start with {prefixes}; mergekit would drop it)")

    keys_cache: dict[tuple[int, str], list[str]] = {}

    def keys_in(ckpt: Checkpoint, module: Module) -> list[str]:
        key = (id(ckpt), module.name)
        if key not in keys_cache:
            keys_cache[key] = module_keys(table, module, ckpt.shapes())
        return keys_cache[key]

    def layers_of(m: int, module: Module) -> ModelSpec:
        return module_layers(models[m].config, module, keys_in(models[m], module), architecture)

    # tokenizer_source / tokenizer: the tensors indexed by token are the modules' embeddings and heads whose rows are
    # the vocabulary (mergekit's vocabulary_axis: the text decoder's embed_tokens and lm_head)
    roles = ModelSpec(architecture, 0, 0, 0, 0, 0, roles=tuple(r for m in table for r in layers_of(0, m).roles))
    vocabulary_plan = plan_vocabulary(recipe, root, models, base, roles, allow_pickle, notes)

    def shapes_of(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
        return remapped_shapes(ckpt, vocabulary_plan)

    slices: list[OutSlice] = []
    layout: list[OutTensor] = []
    module_depths: list[tuple[str, int, list[int]]] = []
    module_params = {}
    for name, module_slices in entries.items():
        module, where = by_name[name], f"modules.{cut(name, 40)}"
        module_params[name] = check_scope(method, recipe.modules[name].parameters, f"{where}.parameters", False, notes)
        first = len(slices)
        offset = 0
        for s, (sources, slice_params, own_base) in enumerate(module_slices):
            depths = [layers_of(m, module).num_layers for m, _, _ in sources]
            ranges = [(0, d) if r is None else r for (_, _, r), d in zip(sources, depths)]
            for j, ((m, _, r), d) in enumerate(zip(sources, depths)):
                if r is not None and r[1] > d:
                    raise SymmergeError(f"{where}.slices.{s}.sources.{j}.layer_range: {list(r)} goes past the module's {d} "
                                        f"layers in {models[m].path}")
            lengths = sorted({b - a for a, b in ranges})
            if len(lengths) != 1:
                what = f"{where}: the models' {name} have different depths" if sources[0][2] is None else \
                    f"{where}.slices.{s}: every source must take the same number of layers"
                raise SymmergeError(f"{what}, got {lengths}")
            out = [SliceSource(m, a, p) for (m, p, _), (a, _) in zip(sources, ranges)]
            slices.append(OutSlice(out, slice_params, offset, lengths[0], base=own_base, module=module_params[name]))
            offset += lengths[0]
        own = slices[first:]
        if method.needs_base:
            check_slice_bases(own, models, base, method, f"{where}.slices")
        layers = layers_of(own[0].sources[0].model, module)
        tensors = frankenmerge_layout(own, models, layers, shapes_of, lambda c, mod=module: keys_in(c, mod))
        layout += [replace(o, slice=o.slice + first) for o in tensors]
        source_config = models[0].config  # the output's config (engine: the first model's when not aligned)
        stated = stated_depth(source_config, module)
        if stated is not None:
            module_depths.append((stated[0], offset, [sl.sources[0].start + i for sl in own for i in range(sl.length)]))
    if any(scope.get("trim") == "model" for scope in parameter_scopes(recipe.parameters or {}, slices) + [params]):
        # one threshold per model over all its tensors: the modules merge different models, so there is no one model
        raise SymmergeError(f"{method.name}: trim: model takes one threshold over each whole model; modules: merge each "
                            "module from its own models: use trim: tensor (mergekit's)")
    if recipe.default_alignment:
        notes.append(f"merged without alignment, as with alignment: none: symmerge cannot align the modules of {architecture}")
    dtype, chat_template = output_choices(recipe, models, base, notes)
    return MergePlan(
        recipe=recipe, models=models, weights=None, base=base, method=method, params=params, symmetries=frozenset(),
        reference_index=None, spec=None, dtype=dtype,
        shard_size=parse_size(recipe.shard_size), data_path=None, names=model_names(models),
        slices=slices, layers=None, layout=layout, num_layers_out=None, varying=True, notes=notes,
        chat_template=chat_template, module_depths=module_depths, vocabulary=vocabulary_plan,
    )


def as_modules(recipe: Recipe, root: Path | None, allow_pickle: bool, module: dict[str, Any]) -> Recipe:
    """A top-level recipe on a multi-module model as mergekit normalises it, where the layers matter: ``models:``
    with a gradient is every module merged from those models (each module's own layers give ``t``); ``slices:`` is
    refused in one line, as mergekit refuses it. Other recipes are returned as they are (a whole-model merge of every
    tensor, which is what mergekit's normal form computes without gradients)."""
    scopes = [recipe.parameters or {}, module] + [m.parameters or {} for m in recipe.models or []]
    if not recipe.slices and not any(has_gradient(v) for scope in scopes for v in scope.values()):
        return recipe
    where = spelled(recipe, "models.0.model") if recipe.models else "slices.0.sources.0.model"
    first = open_reference(recipe.models[0].model if recipe.models else recipe.slices[0].sources[0].model, root, where, allow_pickle)
    table = modules_of(first.config)
    if table is None:
        return recipe
    names = ", ".join(m.name for m in table)
    if recipe.slices:
        raise SymmergeError(f"slices: {architecture_name(first.config)} has modules {names}: give each module's slices "
                            "under modules: {NAME: {slices: ...}} (as mergekit requires)")
    lifted = recipe.model_copy(update={"models": None, "modules": {
        m.name: ModuleEntry(models=recipe.models, parameters=module) for m in table}})
    return lifted


def _modular_architecture(recipe: Recipe, models: list[Checkpoint], base: Checkpoint | None) -> tuple[str, tuple[Module, ...]]:
    """The architecture of a multi-module recipe's models (config.json ``architectures``, one entry, the same in
    every model, as mergekit requires without ``--allow-crimes``) and its modules; one-line errors otherwise."""
    everyone = models + ([base] if base is not None and base not in models else [])
    names = [architecture_name(c.config) for c in everyone]
    first = names[0]
    for c, name in zip(everyone, names):
        if name != first:
            raise SymmergeError(f"modules: {c.path} is a {name or 'model without one architecture'}, {everyone[0].path} "
                                f"a {first or 'model without one architecture'}: the modules of one architecture are merged")
    given = ", ".join(cut(n, 40) for n in list(recipe.modules or {})[:4])
    table = MODULAR_ARCHITECTURES.get(first) if first is not None else None
    if table is None:
        kind = first or "a model whose config.json names no single architecture"
        raise SymmergeError(f"modules: {given}: {kind} has one module, default (modules are defined for "
                            f"{', '.join(sorted(MODULAR_ARCHITECTURES))})")
    unknown = [n for n in recipe.modules or {} if n not in {m.name for m in table}]
    if unknown:
        raise SymmergeError(f"modules.{cut(unknown[0], 40)}: {first} has no such module (its modules: "
                            f"{', '.join(m.name for m in table)})")
    return first, table
