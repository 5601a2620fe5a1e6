"""Planning a merge: :func:`plan_merge` turns a :class:`~symmerge.merge.recipe.Recipe` into a
:class:`~symmerge.merge.plan.MergePlan`, reading configs and safetensors headers only, and refuses in one line what
it cannot merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from symmerge.errors import SymmergeError, cut, shorten
from symmerge.groups import is_auto, parse_symmetries, resolve_symmetries
from symmerge.io import Checkpoint
from symmerge.merge.methods import MergeMethod, get_method, validate_params
from symmerge.merge.modules_plan import as_modules, plan_modules
from symmerge.merge.plan import MergePlan, OutSlice, SliceSource, has_weight, parameter_scopes
from symmerge.merge.plan_steps import check_model_count, check_scope, check_slice_bases, frankenmerge_layout, model_names, note_once, output_choices, slice_base
from symmerge.merge.recipe import TOKENIZER_KEYS_AT_TOP, Recipe, data_hint, parse_size, spelled
from symmerge.merge.references import index_in, open_reference, refuse_repeated_models, resolve_path
from symmerge.merge.settings import has_gradient, is_plain, leaves, resolve
from symmerge.merge.tokenizer_plan import plan_vocabulary, remapped_shapes
from symmerge.spec import (
    ModelSpec,
    check_compatible_shapes,
    check_embeddable,
    check_same_shape,
    config_differences,
    layer_structure,
    lent_head,
    resized_keys,
    spec_for,
    widths_differ,
)


def plan_merge(recipe: Recipe, root: Path | None = None, allow_pickle: bool = False) -> MergePlan:
    """Validate everything a merge needs, reading configs and safetensors headers only."""
    method = get_method(recipe.merge_method)
    notes: list[str] = []
    for key in recipe.misplaced_parameters:
        if key in TOKENIZER_KEYS_AT_TOP:
            notes.append(f"{key}: a tokenizer: key at the top level, where mergekit ignores it: ignored here too (write it under tokenizer:)")
        else:
            notes.append(f"{key}: a method parameter at the top level, where mergekit ignores it: ignored here too (parameters go under parameters:)")
    if recipe.name is not None:
        notes.append(f"name: {shorten(recipe.name, 60)} names a document of a mergekit-mega file; one recipe needs no name (mergekit-yaml ignores it too)")
    top = check_scope(method, recipe.parameters, "parameters", False, notes)
    recipe.parameters = top
    module = check_scope(method, recipe.module_parameters, "modules.default.parameters", False, notes)
    recipe.module_parameters = module
    representative = {k: (v if is_plain(v) else next(iter(leaves(v)), None)) for k, v in top.items() if k != "weight"}
    params = validate_params(recipe.merge_method, representative)
    if recipe.modules is None:
        recipe = as_modules(recipe, root, allow_pickle, module)
    if recipe.modules is not None:
        return plan_modules(recipe, root, allow_pickle, method, params, notes)

    # the inputs: models, or every model a slice names, each opened once (a LoRA-adapted model is another model)
    if recipe.models is not None:
        # the base is checked below, with a fuller explanation; an interpolation counts a base the list leaves out
        models = [open_reference(m.model, root, spelled(recipe, f"models.{i}.model"), allow_pickle) for i, m in enumerate(recipe.models)]
        base = open_reference(recipe.base_model, root, spelled(recipe, "base_model"), allow_pickle) if recipe.base_model else None
        check_model_count(method, len(models), base is not None and all(m.identity != base.identity for m in models))
        refuse_repeated_models([m.identity for m in models], "models", lambda i: spelled(recipe, f"models.{i}"))
        model_params = [check_scope(method, m.parameters, f"models.{i}.parameters", True, notes) for i, m in enumerate(recipe.models)]
    else:
        models, model_params = [], []
        base = open_reference(recipe.base_model, root, spelled(recipe, "base_model"), allow_pickle) if recipe.base_model else None
    slice_models: list[list[int]] = []
    slice_bases: list[int | None] = []  # per slice: its own base_model, an index into models (None: the recipe's)
    if recipe.slices is not None:
        for s, sl in enumerate(recipe.slices):
            if sl.residual_weight is not None:  # mergekit 0.1.5 declares it and never reads it
                note_once(notes, "residual_weight: mergekit declares it but never uses it, so it changes nothing here either")
            method.check_models(len(sl.sources), True)
            indices = []
            for j, src in enumerate(sl.sources):
                indices.append(index_in(models, open_reference(src.model, root, f"slices.{s}.sources.{j}.model", allow_pickle)))
            refuse_repeated_models([models[i].identity for i in indices], f"slices.{s}.sources")
            slice_models.append(indices)
            slice_bases.append(slice_base(method, sl, f"slices.{s}", indices, models, base, root, allow_pickle, notes))
        if base is not None:  # the base, named as a source too, is that same model
            base = next((c for c in models if c.identity == base.identity), base)
    own_bases = any(b is not None for b in slice_bases)
    if method.needs_base and base is None and own_bases:  # as mergekit validates each slice: every one needs a base
        s = slice_bases.index(None) if None in slice_bases else None
        if s is not None:
            raise SymmergeError(f"slices.{s}: merge_method {method.name} needs a base model for this slice too: give it "
                                "base_model (its own, one of its sources) or set the recipe's base_model")
    if method.needs_base and base is None and not own_bases:
        raise SymmergeError(
            f"{spelled(recipe, 'merge_method')} {method.name} needs {spelled(recipe, 'base_model')}: the common pretrained ancestor the models were fine-tuned "
            "from (task vectors θ_i − θ_base only exist for fine-tunes of one base); for models trained independently "
            "use linear, slerp, fisher or regmean"
        )
    match = "weights" if recipe.alignment == "none" else recipe.alignment.match
    data_path = None
    if method.needs_data or match != "weights":
        needer = f"{spelled(recipe, 'merge_method')} {method.name}" if method.needs_data else f"{spelled(recipe, 'alignment.match')} {match}"
        if recipe.data is None:
            raise SymmergeError(f"{needer} needs calibration data: {data_hint(recipe)} (a text file, one example per line, or an .npz)")
        if recipe.data.path == "zoo" and not method.needs_data:
            data_path = Path("zoo")  # activation/learned matching on a zoo model's own training data
        else:
            data_path = resolve_path(recipe.data.path, root, "data.path")
            if not data_path.is_file():
                raise SymmergeError(f"data.path: {data_path} is not a file")

    try:  # the layer structure, for gradients and slices (alignment needs more: checked below)
        layers, no_layers = layer_structure(models[0].config, models[0].shapes().keys()), ""
    except SymmergeError as e:  # tensor names that do not tell the layers apart
        layers, no_layers = None, str(e)
    vocabulary_plan = plan_vocabulary(recipe, root, models, base, layers, allow_pickle, notes)
    if vocabulary_plan is not None and vocabulary_plan.remap and (method.needs_data or match != "weights"):
        raise SymmergeError(f"tokenizer: the vocabularies differ, and {needer} "
                            "runs the models on data tokenized by their own tokenizers: not supported together; merge "
                            "with weight matching and a data-free method, or give every model the same tokenizer")

    def shapes_of(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
        return remapped_shapes(ckpt, vocabulary_plan)

    # the output slices: the models form is one slice of every model's whole depth (as mergekit normalises it)
    layout = None
    num_layers_out = layers.num_layers if layers is not None else None
    if recipe.models is not None:
        slices = [OutSlice([SliceSource(i, 0, p) for i, p in enumerate(model_params)], {}, 0, num_layers_out)]
    else:
        if layers is None:
            raise SymmergeError(f"slices need the layer structure of the model: {no_layers}; use models: (whole models)")
        slices, offset = [], 0
        for s, (sl, indices) in enumerate(zip(recipe.slices, slice_models)):
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sl.sources}
            if len(lengths) != 1:
                raise SymmergeError(f"slices.{s}: every source must take the same number of layers, got {sorted(lengths)}")
            sources = []
            for j, (src, m) in enumerate(zip(sl.sources, indices)):
                depth = layer_structure(models[m].config, models[m].shapes().keys()).num_layers
                if src.layer_range[1] > depth:
                    raise SymmergeError(f"slices.{s}.sources.{j}.layer_range: {list(src.layer_range)} goes past the "
                                        f"model's {depth} layers")
                sources.append(SliceSource(m, src.layer_range[0], check_scope(method, src.parameters, f"slices.{s}.sources.{j}.parameters", True, notes)))
            length = lengths.pop()
            slices.append(OutSlice(sources, check_scope(method, sl.parameters, f"slices.{s}.parameters", False, notes), offset,
                                   length, slice_bases[s]))
            offset += length
        num_layers_out = offset
        same_models = all([src.model for src in sl.sources] == [src.model for src in slices[0].sources] for sl in slices)
        in_place = all(src.start == sl.offset for sl in slices for src in sl.sources)
        # slices with their own base merge slice by slice (the slice-by-slice path reads each slice's base from its
        # sources), even in place
        if not (same_models and in_place and offset == layers.num_layers) or own_bases:
            layout = frankenmerge_layout(slices, models, layers, shapes_of)

    if layout is not None and (method.needs_data or method.prepare is not None and method.name != "ties"):
        raise SymmergeError(f"{method.name} needs whole models: it cannot merge slices that move or drop layers")

    if layout is not None and method.needs_base:
        check_slice_bases(slices, models, base, method, "slices")
    if layers is None:
        gradient = next((k for scope in parameter_scopes(top, slices, module) for k, v in scope.items() if has_gradient(v)), None)
        if gradient is not None:
            raise SymmergeError(f"{gradient}: a gradient (a list of values over the layers) needs the layer structure of "
                                f"the model: {no_layers}; give one value")
    # parameters that differ between tensors or models are resolved per tensor (tensor_parameters); else once
    varying = (any(not is_plain(v) for scope in parameter_scopes(top, slices, module) for v in scope.values())
               or any(sl.parameters for sl in slices) or len(slices) > 1 or bool(module)
               or any(set(src.parameters) - {"weight"} for sl in slices for src in sl.sources))
    weights = None
    if has_weight(top, slices, module) and not varying:
        plain = [resolve("weight", (src.parameters, top), "", 0.0) for src in slices[0].sources]
        weights = [1.0 if w is None else float(w) for w in plain]
    if weights is not None and sum(weights) == 0 and method.name == "linear" and params.get("normalize", True):
        raise SymmergeError(f"{spelled(recipe, 'models.*.parameters.weight')}: the weights sum to 0, so they cannot be normalised")

    everyone = models + ([base] if base is not None and all(base is not c for c in models) else [])
    widest = _widest(models, base, layout)  # None: every model has one shape
    if widest is not None and recipe.alignment == "none":
        raise SymmergeError("models of different widths must be aligned (the narrower are embedded into the widest): "
                            "drop alignment: none (--align none)")
    reference_shapes = shapes_of(models[widest or 0])
    lend_head = _lent_head(everyone)
    if layout is None:
        for ckpt in everyone:
            if ckpt is models[widest or 0]:
                continue
            label = f"base_model {ckpt.path}" if ckpt is base else f"model {ckpt.path}"
            resized = _resized(models[widest], ckpt) if widest is not None else frozenset()
            check_compatible_shapes(reference_shapes, shapes_of(ckpt), label, frozenset(lend_head[:1]) if lend_head else frozenset(), resized,
                                    reference_name=f"model {models[widest or 0].path}")

    auto = recipe.alignment != "none" and is_auto(recipe.alignment.symmetries)
    symmetries = frozenset() if recipe.alignment == "none" else frozenset({"auto"}) if auto else parse_symmetries(recipe.alignment.symmetries)
    if own_bases and symmetries:
        # symmerge aligns every model to one reference, the base for methods with one; slices measuring their task
        # vectors from different bases have no one reference: merged as mergekit merges them, unaligned
        if not recipe.default_alignment:
            raise SymmergeError("alignment: slices with their own base_model are merged slice by slice, without alignment: "
                                "set alignment: none (or drop the alignment key)")
        notes.append("slices with their own base_model: merged slice by slice without alignment, as mergekit merges them")
        symmetries = frozenset()
    if layout is not None and symmetries:
        notes.append("alignment does not apply to slices that move or drop layers (a frankenmerge): merged without it")
        symmetries = frozenset()
    if symmetries and method.name == "passthrough":
        notes.append("passthrough copies one model: nothing to align")
        symmetries = frozenset()
    spec, reference_index, model_specs = None, None, []
    if widest is not None and not symmetries:
        raise SymmergeError(f"models of different widths cannot be merged with {method.name}" if layout is None
                            else "models of different widths cannot be merged slice by slice")
    if symmetries:
        try:
            spec = spec_for(models[widest or 0].config, reference_shapes.keys())
        except SymmergeError as e:
            if not recipe.default_alignment:
                raise SymmergeError(f"{e}; to merge without alignment set alignment: none (--align none)") from None
            # a pasted recipe (no alignment key) on a family symmerge cannot align: merged as mergekit merges it
            notes.append(f"merged without alignment, as with alignment: none: symmerge cannot align this model ({e})")
            symmetries = frozenset()
    if symmetries:
        for ckpt in everyone:
            own = spec_for(ckpt.config, ckpt.shapes().keys())
            if widths_differ(spec, own):
                check_embeddable(spec, own, str(ckpt.path))
            else:
                check_same_shape(spec, own, str(ckpt.path))
        model_specs = [_own_spec(spec, c) for c in models]
        if auto:  # per family (docs/DESIGN.md §2): with the residual map for pre-LN / RMSNorm models
            symmetries = resolve_symmetries("auto", spec)
        if widest is not None:
            _check_widths_supported(recipe, match, base, models, method)
        # methods with a base align every model to the base by default (task vectors in the base's basis); models of
        # different widths align to the widest
        reference_index = None if (method.needs_base and base is not None) else widest or 0
        if widest:
            notes.append(f"models of different widths: aligned to the widest, {models[widest].path}")
        ref = recipe.alignment.reference
        if ref is not None:
            ref_id = open_reference(ref, root, spelled(recipe, "alignment.reference"), allow_pickle).identity
            matches = [i for i, c in enumerate(models) if c.identity == ref_id]
            if matches:
                reference_index = matches[0]
            elif base is not None and base.identity == ref_id:
                reference_index = None
            else:
                raise SymmergeError(f"{spelled(recipe, 'alignment.reference')}: {cut(ref)} is neither one of the models nor the "
                                    f"{spelled(recipe, 'base_model')}")
            if widest is not None and reference_index != widest:
                raise SymmergeError(f"alignment.reference: {cut(ref)} is narrower than {models[widest].path}: models of different "
                                    "widths are aligned to the widest")

    dtype, chat_template = output_choices(recipe, models, base, notes)
    plan = MergePlan(
        recipe=recipe, models=models, weights=weights, base=base, method=method, params=params,
        symmetries=symmetries, reference_index=reference_index, spec=spec,
        dtype=dtype, shard_size=parse_size(recipe.shard_size),
        data_path=data_path, names=model_names(models), lend_head=lend_head, match=match,
        slices=slices, layers=layers, layout=layout, num_layers_out=num_layers_out, varying=varying, notes=notes,
        vocabulary=vocabulary_plan,
        model_specs=model_specs, chat_template=chat_template,
    )
    _note_config_differences(plan)
    if plan.aligned and recipe.alignment.iterative and not plan.iterative:  # asked for, but the star alignment runs
        why = (f"{spelled(recipe, 'base_model')} (the models align to it)" if base is not None
               else f"{spelled(recipe, 'alignment.match')} {match}" if match != "weights" else f"{len(models)} models (it needs 3 or more)")
        plan.notes.append(f"{spelled(recipe, 'alignment.iterative')}: not with {why}; each model is aligned to the reference")
    return plan


def _note_config_differences(plan: MergePlan) -> None:
    """A note for each input whose config sets a value that may change what it computes (``rope_theta``,
    ``hidden_act``...) otherwise than the config the output takes: merged silently, its value would be lost."""
    source = plan.config_source
    for ckpt in [*plan.models, *([plan.base] if plan.base is not None else [])]:
        keys = [] if ckpt.identity == source.identity else config_differences(source.config, ckpt.config)
        if keys:
            shown = ", ".join(f"{k} ({shorten(ckpt.config[k], 40)} there, {shorten(source.config[k], 40)} in the output)" for k in keys[:3])
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            note_once(plan.notes, f"{cut(ckpt.path)}'s config differs from {cut(source.path)}'s, which the output takes, in {shown}{more}")


def _specs(ckpts: list[Checkpoint]) -> list[ModelSpec | None]:
    """Each checkpoint's spec, ``None`` where symmerge does not know its family."""
    out = []
    for c in ckpts:
        try:
            out.append(spec_for(c.config, c.shapes().keys()))
        except SymmergeError:
            out.append(None)
    return out


def _widest(models: list[Checkpoint], base: Checkpoint | None, layout: Any) -> int | None:
    """The model every other is aligned to when widths differ (docs/DESIGN.md §1): the one with the most FFN neurons
    and heads (:func:`~symmerge.spec.check_embeddable` then refuses models no single one contains); ``None`` when every
    model has one shape, or a family is unknown (the shape checks then name the first difference)."""
    specs = _specs(models + ([base] if base is not None else []))
    if any(s is None for s in specs) or not any(widths_differ(specs[0], s) for s in specs[1:]):
        return None
    sizes = [(s.ffn_width, s.num_heads) for s in specs[: len(models)]]
    return max(range(len(models)), key=lambda i: sizes[i])


def _resized(reference: Checkpoint, ckpt: Checkpoint) -> frozenset[str]:
    """The tensors a narrower ``ckpt`` may hold at other shapes than ``reference`` (none when specs are unknown)."""
    try:
        return resized_keys(spec_for(reference.config, reference.shapes().keys()), spec_for(ckpt.config, ckpt.shapes().keys()))
    except SymmergeError:
        return frozenset()


def _own_spec(spec: ModelSpec, ckpt: Checkpoint) -> ModelSpec | None:
    """``ckpt``'s spec when it is narrower than ``spec``, else ``None``."""
    own = spec_for(ckpt.config, ckpt.shapes().keys())
    return own if widths_differ(spec, own) else None


def _check_widths_supported(recipe: Recipe, match: str, base: Checkpoint | None,
                            models: list[Checkpoint], method: MergeMethod) -> None:
    """Models of different widths are merged by weight matching, without a base and without statistics from data:
    a one-line error for anything else."""
    why = ("a base_model (task vectors need one shape)" if base is not None
           else f"{method.name} (its statistics come from running each model at its own width)" if method.needs_data
           else f"match: {match} (use weights)" if match != "weights"
           else "iterative alignment" if recipe.alignment.iterative and len(models) >= 3 else None)
    if why:
        raise SymmergeError(f"models of different widths cannot be merged with {why}")


def _lent_head(checkpoints: list[Checkpoint]) -> tuple[str, str] | None:
    """:func:`~symmerge.spec.lent_head` of ``checkpoints``; ``None`` for a family symmerge has no spec of."""
    try:
        specs = [spec_for(c.config, c.shapes().keys()) for c in checkpoints]
    except SymmergeError:
        return None
    return lent_head([(spec, c.shapes().keys()) for spec, c in zip(specs, checkpoints)])
