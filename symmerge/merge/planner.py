"""Planning a merge: :func:`plan_merge` turns a :class:`~symmerge.merge.recipe.Recipe` into a
:class:`~symmerge.merge.plan.MergePlan`, reading configs and safetensors headers only, and refuses in one line what
it cannot merge."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from symmerge.errors import SymmergeError, cut
from symmerge.groups import is_auto, parse_symmetries, resolve_symmetries
from symmerge.io import Checkpoint, unique_names
from symmerge.io.chat_templates import CHAT_TEMPLATES
from symmerge.io.checkpoint import read_chat_template
from symmerge.merge.methods import INT8_MASK_NOTE, MergeMethod, get_method, validate_params
from symmerge.merge.plan import MergePlan, OutSlice, OutTensor, SliceSource, has_weight, parameter_scopes
from symmerge.merge.recipe import DTYPES, ModuleEntry, Recipe, SliceEntry, parse_size
from symmerge.merge.references import (
    absolute_reference,
    index_in,
    open_reference,
    refuse_repeated_models,
    resolve_path,
    shown_path,
)
from symmerge.merge.settings import has_gradient, is_plain, layer_position, leaves, resolve
from symmerge.merge.tokenizer_plan import plan_vocabulary, remapped_shapes
from symmerge.spec import (
    MODULAR_ARCHITECTURES,
    ModelSpec,
    Module,
    architecture_name,
    check_compatible_shapes,
    check_embeddable,
    check_same_shape,
    layer_structure,
    module_keys,
    module_layers,
    module_of,
    modules_of,
    resized_keys,
    spec_for,
    stated_depth,
    tied_head,
    widths_differ,
)

MEMORY_OPTIONS = {"int8_mask"}  # mergekit's memory savers, for methods that do not declare them: symmerge computes in float32 anyway


def _known_keys(method: MergeMethod) -> dict[str, Any]:
    return {p.name: p for p in method.params} | {p.arg: p for p in method.params}


def _check_scope(method: MergeMethod, scope: dict[str, Any], where: str, per_model: bool, notes: list[str]) -> dict[str, Any]:
    """Check one ``parameters`` block's keys and every value it can produce; drop (with a note) what changes
    nothing here: memory options of mergekit, and shared parameters under a model (mergekit ignores them too)."""
    specs = _known_keys(method)
    out = {}
    for key, setting in scope.items():
        if key == "weight":
            if method.recipe_weight:
                out[key] = setting
            else:
                _note_once(notes, f"weight: {method.name} averages uniformly (1/M), as mergekit's does, so it changes nothing")
            continue
        spec = specs.get(key)
        if spec is None:
            if key in MEMORY_OPTIONS:
                _note_once(notes, f"{key}: {INT8_MASK_NOTE.format(method=method.name)}")
                continue
            if per_model:
                known = ", ".join(["weight", *method.per_model_params])
                raise SymmergeError(f"{where}: unknown per-model parameter {key!r} (per-model parameters of {method.name}: {known})")
            known = ", ".join(["weight", *(p.name for p in method.params)])
            raise SymmergeError(f"{method.name}: unknown parameter {key!r} (known: {known})")
        if per_model and not spec.per_model:
            notes.append(f"{where}.{key}: {key} is one value for all models in {method.name}: ignored under a model (as in mergekit)")
            continue
        if spec.required and setting is None:
            continue
        for leaf in leaves(setting):
            spec.check(method.name, leaf)
        if spec.no_effect:  # declared by mergekit, a no-op in its method and here: checked, noted, not passed on
            _note_once(notes, f"{spec.name}: {spec.no_effect.format(method=method.name)}")
            continue
        out[spec.name] = setting
    return out


def _note_once(notes: list[str], note: str) -> None:
    """One note per key, however many models or slices set it."""
    if note not in notes:
        notes.append(note)


def _slice_base(method: MergeMethod, entry: SliceEntry, where: str, indices: list[int], models: list[Checkpoint],
                base: Checkpoint | None, root: Path | None, allow_pickle: bool, notes: list[str]) -> int | None:
    """mergekit's per-slice ``base_model``: the base of that slice's tensors (its layers; the embeddings when it is
    the first slice, the final norm and head when it is the last) in place of the recipe's. As in mergekit it must be
    one of the slice's sources for a method that uses a base, and changes nothing for one that does not (mergekit
    never reads it then). Returns its index among ``models``; None when the slice has none of its own, names the
    recipe's base_model, or the method uses no base. A base that is used is rewritten in ``entry`` as its absolute
    folder (``+ADAPTER``), so the recipe as run (merge.yaml) names it from any folder."""
    given = entry.base_model
    if given is None:
        return None
    if not method.uses_base:
        _note_once(notes, f"slices.*.base_model: {method.name} uses no base model, so a slice's changes nothing (as in mergekit)")
        return None
    identity = open_reference(given, root, f"{where}.base_model", allow_pickle).identity
    entry.base_model = absolute_reference(identity)  # as run: found wherever merge.yaml lies
    if base is not None and identity == base.identity:
        return None
    own = next((m for m in indices if models[m].identity == identity), None)
    if own is None:
        raise SymmergeError(f"{where}.base_model: {cut(given)} must be one of the slice's sources for {method.name} (as in mergekit)")
    return own


def plurality_chat_template(directories: list[Path]) -> str | None:
    """mergekit's ``chat_template: auto``: the template most of the models' tokenizers carry (each folder counted
    once; a tie goes to the first in recipe order, base model first — mergekit's order there is a set's), or None
    when none has one (the copied tokenizer is then left as it is)."""
    folders = list(dict.fromkeys(Path(d).resolve() for d in directories))
    templates = [t for t in (read_chat_template(d) for d in folders) if t is not None]
    return Counter(templates).most_common(1)[0][0] if templates else None


def plan_merge(recipe: Recipe, root: Path | None = None, allow_pickle: bool = False) -> MergePlan:
    """Validate everything a merge needs, reading configs and safetensors headers only."""
    method = get_method(recipe.merge_method)
    notes: list[str] = []
    top = _check_scope(method, recipe.parameters, "parameters", False, notes)
    recipe.parameters = top
    module = _check_scope(method, recipe.module_parameters, "modules.default.parameters", False, notes)
    recipe.module_parameters = module
    representative = {k: (v if is_plain(v) else next(iter(leaves(v)), None)) for k, v in top.items() if k != "weight"}
    params = validate_params(recipe.merge_method, representative)
    if recipe.modules is None:
        recipe = _as_modules(recipe, root, allow_pickle, module)
    if recipe.modules is not None:
        return _plan_modules(recipe, root, allow_pickle, method, params, notes)

    # the inputs: models, or every model a slice names, each opened once (a LoRA-adapted model is another model)
    if recipe.models is not None:
        method.check_models(len(recipe.models), True)  # the base is checked below, with a fuller explanation
        models = [open_reference(m.model, root, f"models.{i}.model", allow_pickle) for i, m in enumerate(recipe.models)]
        refuse_repeated_models([m.identity for m in models], "models")
        model_params = [_check_scope(method, m.parameters, f"models.{i}.parameters", True, notes) for i, m in enumerate(recipe.models)]
    else:
        models, model_params = [], []
    base = open_reference(recipe.base_model, root, "base_model", allow_pickle) if recipe.base_model else None
    slice_models: list[list[int]] = []
    slice_bases: list[int | None] = []  # per slice: its own base_model, an index into models (None: the recipe's)
    if recipe.slices is not None:
        for s, sl in enumerate(recipe.slices):
            if sl.residual_weight is not None:  # mergekit 0.1.5 declares it and never reads it
                _note_once(notes, "residual_weight: mergekit declares it but never uses it, so it changes nothing here either")
            method.check_models(len(sl.sources), True)
            indices = []
            for j, src in enumerate(sl.sources):
                indices.append(index_in(models, open_reference(src.model, root, f"slices.{s}.sources.{j}.model", allow_pickle)))
            refuse_repeated_models([models[i].identity for i in indices], f"slices.{s}.sources")
            slice_models.append(indices)
            slice_bases.append(_slice_base(method, sl, f"slices.{s}", indices, models, base, root, allow_pickle, notes))
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
            f"merge_method {method.name} needs base_model: the common pretrained ancestor the models were fine-tuned "
            "from (task vectors θ_i − θ_base only exist for fine-tunes of one base); for models trained independently "
            "use linear, slerp, fisher or regmean"
        )
    match = "weights" if recipe.alignment == "none" else recipe.alignment.match
    data_path = None
    if method.needs_data or match != "weights":
        needer = f"merge_method {method.name}" if method.needs_data else f"alignment.match {match}"
        if recipe.data is None:
            raise SymmergeError(f"{needer} needs calibration data: add data: {{path: FILE}} (a text file, one example per line, or an .npz)")
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
        raise SymmergeError(f"tokenizer: the vocabularies differ, and {'merge_method ' + method.name if method.needs_data else 'alignment.match ' + match} "
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
                sources.append(SliceSource(m, src.layer_range[0], _check_scope(method, src.parameters, f"slices.{s}.sources.{j}.parameters", True, notes)))
            length = lengths.pop()
            slices.append(OutSlice(sources, _check_scope(method, sl.parameters, f"slices.{s}.parameters", False, notes), offset,
                                   length, slice_bases[s]))
            offset += length
        num_layers_out = offset
        same_models = all([src.model for src in sl.sources] == [src.model for src in slices[0].sources] for sl in slices)
        in_place = all(src.start == sl.offset for sl in slices for src in sl.sources)
        # slices with their own base merge slice by slice (the slice-by-slice path reads each slice's base from its
        # sources), even in place
        if not (same_models and in_place and offset == layers.num_layers) or own_bases:
            layout = _frankenmerge_layout(slices, models, layers, shapes_of)

    if layout is not None and (method.needs_data or method.prepare is not None and method.name != "ties"):
        raise SymmergeError(f"{method.name} needs whole models: it cannot merge slices that move or drop layers")

    if layout is not None and method.needs_base:
        _check_slice_bases(slices, models, base, method, "slices")
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
        raise SymmergeError("models.*.parameters.weight: the weights sum to 0, so they cannot be normalised")

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
            check_compatible_shapes(reference_shapes, shapes_of(ckpt), label, frozenset(lend_head[:1]) if lend_head else frozenset(), resized)

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
            ref_id = open_reference(ref, root, "alignment.reference", allow_pickle).identity
            matches = [i for i, c in enumerate(models) if c.identity == ref_id]
            if matches:
                reference_index = matches[0]
            elif base is not None and base.identity == ref_id:
                reference_index = None
            else:
                raise SymmergeError(f"alignment.reference: {cut(ref)} is neither one of the models nor the base_model")
            if widest is not None and reference_index != widest:
                raise SymmergeError(f"alignment.reference: {cut(ref)} is narrower than {models[widest].path}: models of different "
                                    "widths are aligned to the widest")

    out_dtype, chat_template = _output_choices(recipe, models, base, notes)
    plan = MergePlan(
        recipe=recipe, models=models, weights=weights, base=base, method=method, params=params,
        symmetries=symmetries, reference_index=reference_index, spec=spec,
        dtype=DTYPES[out_dtype] if out_dtype else None, shard_size=parse_size(recipe.shard_size),
        data_path=data_path, names=unique_names([shown_path(c.path) for c in models]), lend_head=lend_head, match=match,
        slices=slices, layers=layers, layout=layout, num_layers_out=num_layers_out, varying=varying, notes=notes,
        vocabulary=vocabulary_plan,
        model_specs=model_specs, chat_template=chat_template,
    )
    for i, c in enumerate(models):
        if c.lora is not None:
            plan.names[i] += "+" + c.lora.path.name
    return plan


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


def _frankenmerge_layout(slices: list[OutSlice], models: list[Checkpoint], layers: ModelSpec,
                         shapes_of: Callable[[Checkpoint], dict[str, tuple[int, ...]]],
                         keys_of: Callable[[Checkpoint], list[str]] | None = None) -> list[OutTensor]:
    """Every output tensor of slices that move or drop layers: embeddings from the first slice's models, each
    output layer from its sources' layers (renamed to its new index), final norm and head from the last slice's
    (its first sources, as many as the first slice has, as in mergekit). ``keys_of``: the tensors of a checkpoint taken (one module's), default all."""
    first_model = models[slices[0].sources[0].model]
    keys = list(first_model.shapes()) if keys_of is None else keys_of(first_model)
    outside = [k for k in keys if layers.layer_of(k) is None]
    out: list[OutTensor] = []
    for k in outside:
        if layers.is_embedding(k):
            out.append(OutTensor(k, [(s.model, k) for s in slices[0].sources], 0, 0.0))
    for s, sl in enumerate(slices):
        for idx in range(sl.length):
            first = sl.sources[0]
            for k in _layer_keys(models[first.model], layers, first.start + idx):
                inputs = [(src.model, layers.in_layer(k, src.start + idx)) for src in sl.sources]
                out.append(OutTensor(layers.in_layer(k, sl.offset + idx), inputs, s, layer_position(idx, sl.length)))
    # after the layers, mergekit 0.1.5 (plan.py, MergePlanner.plan_module) pairs the last slice's models with as
    # many tensor names as the first slice has sources, and zip() keeps the shorter: the last slice's first
    # min(len(first), len(last)) sources
    last = slices[-1].sources[:len(slices[0].sources)]
    for k in outside:
        if not layers.is_embedding(k):
            out.append(OutTensor(k, [(s.model, k) for s in last], len(slices) - 1, 0.0))
    for o in out:  # shapes from the headers, before any weight is read
        shapes = {shapes_of(models[m]).get(name) for m, name in o.inputs}
        if None in shapes:
            missing = next(f"{models[m].path}: {name}" for m, name in o.inputs if name not in models[m].shapes())
            raise SymmergeError(f"slices: tensor {missing} does not exist")
        if len(shapes) > 1:
            raise SymmergeError(f"slices: tensor {o.key} would merge tensors of shapes {sorted(shapes)}")
    return out


def _check_slice_bases(slices: list[OutSlice], models: list[Checkpoint], base: Checkpoint | None, method: MergeMethod,
                       where: str) -> None:
    """For a method with a base: every slice's base (its own, else the recipe's) is one of its sources, and the last
    slice's is among the sources its final norm and head merge from (:func:`_check_tail_base`), as mergekit requires."""
    for s, sl in enumerate(slices):
        if sl.base is None and (base is None or all(models[src.model] is not base for src in sl.sources)):
            raise SymmergeError(f"{where}.{s}: base_model must be one of the slice's sources for {method.name} (as in mergekit)")
    _check_tail_base(slices, models, base, where)


def _check_tail_base(slices: list[OutSlice], models: list[Checkpoint], base: Checkpoint | None, where: str) -> None:
    """Refuse a last slice whose base model is not among the sources its final norm and head merge from (the first
    as many as the first slice has, :func:`_frankenmerge_layout`): mergekit 0.1.5 stops there too ("Base input is not
    present in merge inputs")."""
    last = slices[-1]
    kept = last.sources[:len(slices[0].sources)]
    wanted = models[last.base] if last.base is not None else base
    if wanted is None or len(kept) == len(last.sources) or any(models[src.model].identity == wanted.identity for src in kept):
        return
    raise SymmergeError(f"{where}.{len(slices) - 1}: the final norm and head merge from the last slice's first {len(kept)} "
                        f"sources (as many as the first slice has, as in mergekit), and its base model {cut(str(wanted.path))} "
                        "is not among them: list it earlier in the slice")


def _layer_keys(ckpt: Checkpoint, layers: ModelSpec, index: int) -> list[str]:
    return [k for k in ckpt.shapes() if layers.layer_of(k) == index]


def _lent_head(checkpoints: list[Checkpoint]) -> tuple[str, str] | None:
    """``(head, embedding)`` when some checkpoints tie their LM head (they store none) and others store their own
    (an output of ``align -s ...,residual``, whose folded head was untied): the tied ones then lend their embedding
    as their head. ``None`` when all agree, or for a family symmerge has no spec of."""
    try:
        pair = tied_head(spec_for(checkpoints[0].config, checkpoints[0].shapes().keys()))
    except SymmergeError:
        return None
    if pair is None:
        return None
    has_head = [pair[0] in c.shapes() for c in checkpoints]
    return pair if any(has_head) and not all(has_head) else None


def _plan_modules(recipe: Recipe, root: Path | None, allow_pickle: bool, method: MergeMethod, params: dict[str, Any],
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
        _note_once(notes, "data: not read: merging modules one by one uses no calibration data")

    # every input opened once, in recipe order (a module's models, then its slices' sources)
    # per module, per slice: (model index, parameters, layer_range or None for the whole module) of each source, the
    # slice's parameters, its own base_model (mergekit's per-slice base, a model index; None: the recipe's)
    entries: dict[str, list[tuple[list[tuple[int, dict, tuple[int, int] | None]], dict, int | None]]] = {}
    for name, entry in recipe.modules.items():
        where = f"modules.{cut(name, 40)}"
        if entry.models:
            method.check_models(len(entry.models), True)
            sources = [(index_in(models, open_reference(m.model, root, f"{where}.models.{i}.model", allow_pickle)),
                        _check_scope(method, m.parameters, f"{where}.models.{i}.parameters", True, notes), None)
                       for i, m in enumerate(entry.models)]
            refuse_repeated_models([models[m].identity for m, _, _ in sources], f"{where}.models")
            if base is not None and method.uses_base and all(models[m].identity != base.identity for m, _, _ in sources):
                sources.append((index_in(models, base), {}, None))  # mergekit: "Base model specified but not in input models - adding"
            if method.needs_base and base is None:
                raise SymmergeError(f"{where}: merge_method {method.name} needs base_model: the common pretrained "
                                    "ancestor its models were fine-tuned from")
            entries[name] = [(sources, {}, None)]
        else:
            entries[name] = []
            for s, sl in enumerate(entry.slices):
                if sl.residual_weight is not None:
                    _note_once(notes, "residual_weight: mergekit declares it but never uses it, so it changes nothing here either")
                method.check_models(len(sl.sources), True)
                sources = [(index_in(models, open_reference(src.model, root, f"{where}.slices.{s}.sources.{j}.model", allow_pickle)),
                            _check_scope(method, src.parameters, f"{where}.slices.{s}.sources.{j}.parameters", True, notes),
                            src.layer_range) for j, src in enumerate(sl.sources)]
                refuse_repeated_models([models[m].identity for m, _, _ in sources], f"{where}.slices.{s}.sources")
                own_base = _slice_base(method, sl, f"{where}.slices.{s}", [m for m, _, _ in sources], models, base,
                                       root, allow_pickle, notes)
                if method.needs_base and base is None and own_base is None:
                    raise SymmergeError(f"{where}.slices.{s}: merge_method {method.name} needs a base model for this slice: "
                                        "give it base_model (its own, one of its sources) or set the recipe's base_model")
                entries[name].append((sources, _check_scope(method, sl.parameters, f"{where}.slices.{s}.parameters", False, notes),
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
        module_params[name] = _check_scope(method, recipe.modules[name].parameters, f"{where}.parameters", False, notes)
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
            _check_slice_bases(own, models, base, method, f"{where}.slices")
        layers = layers_of(own[0].sources[0].model, module)
        tensors = _frankenmerge_layout(own, models, layers, shapes_of, lambda c, mod=module: keys_in(c, mod))
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
    out_dtype, chat_template = _output_choices(recipe, models, base, notes)
    plan = MergePlan(
        recipe=recipe, models=models, weights=None, base=base, method=method, params=params, symmetries=frozenset(),
        reference_index=None, spec=None, dtype=DTYPES[out_dtype] if out_dtype else None,
        shard_size=parse_size(recipe.shard_size), data_path=None, names=unique_names([shown_path(c.path) for c in models]),
        slices=slices, layers=None, layout=layout, num_layers_out=None, varying=True, notes=notes,
        chat_template=chat_template, module_depths=module_depths, vocabulary=vocabulary_plan,
    )
    for i, c in enumerate(models):
        if c.lora is not None:
            plan.names[i] += "+" + c.lora.path.name
    return plan


def _as_modules(recipe: Recipe, root: Path | None, allow_pickle: bool, module: dict[str, Any]) -> Recipe:
    """A top-level recipe on a multi-module model as mergekit normalises it, where the layers matter: ``models:``
    with a gradient is every module merged from those models (each module's own layers give ``t``); ``slices:`` is
    refused in one line, as mergekit refuses it. Other recipes are returned as they are (a whole-model merge of every
    tensor, which is what mergekit's normal form computes without gradients)."""
    scopes = [recipe.parameters or {}, module] + [m.parameters or {} for m in recipe.models or []]
    if not recipe.slices and not any(has_gradient(v) for scope in scopes for v in scope.values()):
        return recipe
    where = "models.0.model" if recipe.models else "slices.0.sources.0.model"
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


def _output_choices(recipe: Recipe, models: list[Checkpoint], base: Checkpoint | None, notes: list[str]) -> tuple[str | None, str | None]:
    """The output dtype (``out_dtype``, else ``dtype``) and chat template (``auto`` resolved), with their notes."""
    out_dtype = recipe.out_dtype or recipe.dtype
    if recipe.dtype and recipe.out_dtype and recipe.dtype != recipe.out_dtype:
        notes.append(f"dtype {recipe.dtype}: symmerge computes in float32 and rounds once, to out_dtype {recipe.out_dtype}")
    chat_template = recipe.chat_template
    if chat_template == "auto":
        chat_template = plurality_chat_template([c.path for c in ([base] if base is not None else []) + models])
        notes.append("chat_template: auto chose " + ("no template (no model has one)" if chat_template is None else
                                                      f"the models' most common template ({cut(chat_template, 40)!r})"))
    elif chat_template in CHAT_TEMPLATES:  # mergekit's names: symmerge's own templates of those formats
        chat_template = CHAT_TEMPLATES[chat_template]
    elif chat_template is not None and "{" not in chat_template:
        raise SymmergeError(f"chat_template: {cut(chat_template)} is neither a Jinja template nor a template name "
                            f"({', '.join(CHAT_TEMPLATES)}) nor auto")
    return out_dtype, chat_template
