"""The steps both planners take — :func:`~symmerge.merge.planner.plan_merge` for a single-module recipe and
:func:`~symmerge.merge.modules_plan.plan_modules` for a ``modules:`` one: each ``parameters`` block checked against
the method, a slice's own ``base_model``, the output tensors of slices that move or drop layers (a frankenmerge)
and the base checks mergekit makes on them, and the output's dtype and chat template."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from symmerge.errors import SymmergeError, cut
from symmerge.io import Checkpoint, unique_names
from symmerge.io.chat_templates import CHAT_TEMPLATES
from symmerge.io.checkpoint import read_chat_template
from symmerge.merge.methods import INT8_MASK_NOTE, MergeMethod, list_methods
from symmerge.merge.plan import OutSlice, OutTensor
from symmerge.merge.recipe import DTYPES, Recipe, SliceEntry
from symmerge.merge.references import absolute_reference, open_reference, shown_path
from symmerge.merge.settings import layer_position, leaves
from symmerge.spec import (
    ModelSpec,
)

MEMORY_OPTIONS = {"int8_mask"}  # mergekit's memory savers, for methods that do not declare them: symmerge computes in float32 anyway
# mergekit-evolve's genome switches (normalize, allow_negative_weights, smooth): published recipes copy them into a
# merge's parameters, where mergekit-yaml ignores them as it ignores every parameter its method does not declare
EVOLVE_FLAGS = {"allow_negative_weights", "smooth"}


def _ignored_elsewhere(method: MergeMethod, key: str, setting: Any, per_model: bool) -> bool:
    """Whether ``key``, not a parameter of ``method``, is one mergekit knows (another method's, or an evolve switch)
    and ignores here, set to a value that asks for nothing this method lacks: a switch (true/false), another
    method's default (``lambda: 1``), or, under one model, another method's per-model parameter (``density`` under
    a model of sce: mergekit reads no per-model key its method does not declare). A shared value that would change a
    result (``lambda: 2`` on linear) or a shared parameter under a model (``t``) is still refused: the user expects
    an effect that mergekit silently drops."""
    if key in EVOLVE_FLAGS:
        return all(isinstance(v, bool) for v in leaves(setting))
    specs = [p for m in list_methods() if m is not method for p in m.params if p.name == key]
    if not specs:
        return False  # no method has it: a typo (dens, wieght)
    if per_model:
        return any(p.per_model for p in specs)
    values = list(leaves(setting))
    return all(isinstance(v, bool) for v in values) or all(any(v == p.default for p in specs) for v in values)


def check_model_count(method: MergeMethod, listed: int, base_unlisted: bool, where: str = "") -> None:
    """``method.check_models`` of ``listed`` models, counting the base_model an interpolation (slerp, nuslerp,
    multislerp) is given beside a list that leaves it out: mergekit adds it to the models ("Base model specified but
    not in input models - adding"), so ``base_model: A`` + ``models: [B]`` is slerp A→B. ``where``: the error's
    prefix (a module's ``modules.NAME: ``)."""
    counted = listed + (base_unlisted and method.optional_base)
    try:
        method.check_models(counted, True)
    except SymmergeError as e:
        counting = " (counting base_model, which mergekit adds to models that do not list it)" if counted > listed else ""
        raise SymmergeError(f"{where}{e}{counting}") from None


def _known_keys(method: MergeMethod) -> dict[str, Any]:
    return {p.name: p for p in method.params} | {p.arg: p for p in method.params}


def check_scope(method: MergeMethod, scope: dict[str, Any], where: str, per_model: bool, notes: list[str]) -> dict[str, Any]:
    """Check one ``parameters`` block's keys and every value it can produce; drop (with a note) what changes
    nothing here: memory options of mergekit, and shared parameters under a model (mergekit ignores them too)."""
    specs = _known_keys(method)
    out = {}
    for key, setting in scope.items():
        if key == "weight":
            if method.recipe_weight is True:
                out[key] = setting
            else:
                note_once(notes, f"weight: {method.name} {method.recipe_weight}, so it changes nothing")
            continue
        spec = specs.get(key)
        if spec is None:
            if key in MEMORY_OPTIONS:
                note_once(notes, f"{key}: {INT8_MASK_NOTE.format(method=method.name)}")
                continue
            if _ignored_elsewhere(method, key, setting, per_model):
                similar = [p.name for p in method.params if p.name.startswith(f"{key}_")]  # normalize → normalize_weights
                hint = f" ({method.name}'s own is {similar[0]})" if similar else ""
                note_once(notes, f"{key}: not a parameter of {method.name}; mergekit ignores it, and so does symmerge{hint}")
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
            note_once(notes, f"{spec.name}: {spec.no_effect.format(method=method.name)}")
            continue
        out[spec.name] = setting
    return out


def note_once(notes: list[str], note: str) -> None:
    """One note per key, however many models or slices set it."""
    if note not in notes:
        notes.append(note)


def slice_base(method: MergeMethod, entry: SliceEntry, where: str, indices: list[int], models: list[Checkpoint],
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
        note_once(notes, f"slices.*.base_model: {method.name} uses no base model, so a slice's changes nothing (as in mergekit)")
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


def frankenmerge_layout(slices: list[OutSlice], models: list[Checkpoint], layers: ModelSpec,
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


def check_slice_bases(slices: list[OutSlice], models: list[Checkpoint], base: Checkpoint | None, method: MergeMethod,
                      where: str) -> None:
    """For a method with a base: every slice's base (its own, else the recipe's) is one of its sources, and the last
    slice's is among the sources its final norm and head merge from (:func:`_check_tail_base`), as mergekit requires."""
    for s, sl in enumerate(slices):
        if sl.base is None and (base is None or all(models[src.model] is not base for src in sl.sources)):
            raise SymmergeError(f"{where}.{s}: base_model must be one of the slice's sources for {method.name} (as in mergekit)")
    _check_tail_base(slices, models, base, where)


def _check_tail_base(slices: list[OutSlice], models: list[Checkpoint], base: Checkpoint | None, where: str) -> None:
    """Refuse a last slice whose base model is not among the sources its final norm and head merge from (the first
    as many as the first slice has, :func:`frankenmerge_layout`): mergekit 0.1.5 stops there too ("Base input is not
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


def output_choices(recipe: Recipe, models: list[Checkpoint], base: Checkpoint | None,
                   notes: list[str]) -> tuple[torch.dtype | None, str | None]:
    """The output dtype (``out_dtype``, else ``dtype``; None: the reference's) and chat template (``auto`` resolved),
    with their notes."""
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
    return (DTYPES[out_dtype] if out_dtype else None), chat_template


def model_names(models: list[Checkpoint]) -> list[str]:
    """How the plan names each model in tables and the card: its folder (a Hugging Face snapshot by its repo's name),
    made unique, with ``+ADAPTER`` for a LoRA-adapted one."""
    names = unique_names([shown_path(c.path) for c in models])
    return [name + ("+" + c.lora.path.name if c.lora is not None else "") for name, c in zip(names, models)]
