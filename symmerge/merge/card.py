"""What a merged model says about itself: the recipe as it was run (merge.yaml) and a model card (README.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from symmerge._version import __version__
from symmerge.io.stream import dtype_name
from symmerge.merge.plan import MergePlan


def recipe_for_card(plan: MergePlan) -> dict:
    """The recipe as it was run: absolute paths, resolved defaults."""
    r = plan.recipe.model_dump(exclude_none=True)
    for entry, ckpt in zip(r.get("models", []), plan.models):
        entry["model"] = _where(ckpt)
    for sl, out in zip(r.get("slices", []), plan.slices):
        for entry, src in zip(sl["sources"], out.sources):
            entry["model"] = _where(plan.models[src.model])
        if out.base is not None:
            sl["base_model"] = _where(plan.models[out.base])
    where = {getattr(c, "reference", None): _where(c) for c in plan.models}
    for module in (r.get("modules") or {}).values():  # mergekit's multi-module form: each module's inputs
        inputs = module.get("models", []) + [src for sl in module.get("slices", []) for src in sl["sources"]]
        for entry in inputs:
            entry["model"] = where.get(entry["model"], entry["model"])
    if plan.base is not None:
        r["base_model"] = _where(plan.base)
    # the top-level parameters as given (a default weight, gradients, filter lists rank below the models' and
    # slices' own values, so they decide tensors too), then each method default the recipe left out, resolved
    given = r.get("parameters") or {}
    defaults = {p.name: plan.params[p.arg] for p in plan.method.params
                if p.name not in given and p.arg in plan.params and not p.no_effect}  # no_effect: a note on every re-run
    r["parameters"] = {**given, **defaults}
    if plan.aligned:
        ref = plan.base if plan.reference_index is None else plan.models[plan.reference_index]
        # every other key of the alignment block as it was given (match, learn_steps, device, ...), then the resolved
        # reference and symmetries: a recipe that can be run again
        given = r.get("alignment") if isinstance(r.get("alignment"), dict) else {}
        given = {k: v for k, v in given.items() if k not in ("reference", "symmetries")}  # the same order on every re-run
        r["alignment"] = {**given, "reference": str(ref.path.resolve()), "symmetries": sorted(plan.symmetries)}
    elif getattr(plan.recipe, "default_alignment", False):  # no alignment key, and none possible: it ran unaligned
        r["alignment"] = "none"
    if plan.data_path is not None:
        r["data"]["path"] = str(plan.data_path.resolve())
    module = r.pop("module_parameters", None)
    if module and "modules" not in r:  # written as it was given: mergekit's modules: {default: ...} form (recipe._lift_default_module)
        form = "models" if "models" in r else "slices"
        r = {"modules": {"default": {form: r.pop(form), "parameters": module}}, **r}
    return r


def _where(ckpt) -> str:
    """A model as the card records it: its absolute folder, plus ``+ADAPTER`` for a LoRA-adapted one."""
    return str(ckpt.path.resolve()) + (f"+{ckpt.lora.path.resolve()}" if ckpt.lora is not None else "")


def model_card(plan: MergePlan, alignment: Mapping[str, Mapping[str, float]], seconds: Mapping[str, float]) -> str:
    """README.md of the merged model: models, method, alignment (distances per model), dtype and stage seconds."""
    lines = ["---", "tags: [merge, symmerge]", "---", "", "# Merged model", "",
             f"Produced by [symmerge](https://pypi.org/project/symmerge/) {__version__}.", "",
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
        for name, d in alignment.items():
            lines.append(f"| {name} | {d['distance_before']:.5g} | {d['distance_after']:.5g} |")
    else:
        lines.append("None: tensors were merged as they are.")
    lines += ["", f"Output dtype: {dtype_name(plan.dtype) if plan.dtype else 'as the reference'}; "
              f"stage seconds: {json.dumps({k: round(v, 2) for k, v in seconds.items()})}", ""]
    return "\n".join(lines)
