"""The merge recipe: a YAML file in the spirit of mergekit's, plus an ``alignment`` block.

    models:
      - model: ./finetune-a
        parameters: {weight: 0.6}
      - model: ./finetune-b
    base_model: ./pretrained          # needed by task_arithmetic, ties, dare_*
    merge_method: ties
    parameters: {density: 0.3, lambda: 1.0}
    alignment:                        # or: alignment: none
      reference: ./finetune-a         # default: base_model for methods with a base, else the first model
      symmetries: [ffn, qk, vo, scale, heads]
      max_seconds: 600                # optional: time budget of the residual descent, per model
      device: auto                    # optional: cpu (default), cuda or auto — where the matching math runs
    data: {path: calib.txt, max_length: 128, num_examples: 256, batch_size: 8}   # fisher, regmean
    dtype: bfloat16                   # default: the reference's dtype
    shard_size: 2GB

:func:`plan_merge` validates the whole recipe — paths, families and shapes (from configs and safetensors headers),
the method and its parameters, the data — before any weight is read, and raises one-line errors that name the
offending key and value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from symmerge.errors import SymmergeError
from symmerge.groups import parse_symmetries
from symmerge.io import Checkpoint, open_checkpoint, unique_names
from symmerge.merge.methods import MergeMethod, get_method, validate_params
from symmerge.spec import ModelSpec, check_compatible_shapes, check_same_shape, spec_for, tied_head

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_PARAMETERS = {"weight"}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _known(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if key not in MODEL_PARAMETERS:
                raise ValueError(f"unknown per-model parameter {key!r} (per-model parameters: {', '.join(sorted(MODEL_PARAMETERS))})")
            if key == "weight" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"weight must be a number, got {value!r}")
        return v


class AlignmentBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str | None = None
    symmetries: str | list[str] = "all"
    match: Literal["weights", "activations", "learned"] = "weights"  # activations / learned read the recipe's data
    learn_steps: int = Field(200, gt=0)
    max_seconds: float | None = Field(None, ge=0)  # time budget of the residual descent, per model
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where the matching math runs (LAPs on the CPU); not the result


class DataBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    max_length: int = Field(128, gt=0)
    num_examples: int = Field(256, gt=0)
    batch_size: int = Field(8, gt=0)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] = Field(min_length=1)
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    alignment: AlignmentBlock | Literal["none"] = Field(default_factory=AlignmentBlock)
    data: DataBlock | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    shard_size: str | int = "2GB"
    allow_unrelated_base: bool = False  # merge task vectors even when a model looks unrelated to the base

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        parse_size(v)
        return v


def parse_size(value: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``1000000`` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(value), flags=re.I)
    if not m:
        raise ValueError(f"not a size: {value!r} (examples: 2GB, 500MB)")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(float(m.group(1)) * units[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def _pydantic_message(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if err["type"] in ("missing", "value_error") or isinstance(value, (dict, list)) else f", got {value!r}"
    return f"{source}: {where}: {msg}{shown}"


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Parse and type-check a recipe file; relative model paths are resolved later against the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise SymmergeError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SymmergeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SymmergeError(f"{path}: a recipe is a mapping with models, merge_method, ... at the top level")
    try:
        return Recipe.model_validate(raw), path.parent
    except ValidationError as e:
        raise SymmergeError(_pydantic_message(e, str(path))) from None


def recipe_from_models(models: list[str], method: str, *, base: str | None = None, weights: list[float] | None = None,
                       params: dict[str, Any] | None = None, align: str = "all", reference: str | None = None,
                       data: str | None = None, dtype: str | None = None, shard_size: str = "2GB", match: str = "weights",
                       learn_steps: int = 200, max_seconds: float | None = None, device: str = "cpu") -> Recipe:
    """The short form ``symmerge merge A B --method ties ...`` as a :class:`Recipe`."""
    if weights is not None and len(weights) != len(models):
        raise SymmergeError(f"--weights has {len(weights)} values for {len(models)} models")
    raw: dict[str, Any] = {
        "models": [{"model": m, "parameters": {"weight": w} if weights else {}} for m, w in zip(models, weights or [None] * len(models))],
        "merge_method": method,
        "base_model": base,
        "parameters": params or {},
        "alignment": "none" if align == "none" else {"reference": reference, "symmetries": align, "match": match, "learn_steps": learn_steps,
                                                            "max_seconds": max_seconds, "device": device},
        "data": {"path": data} if data else None,
        "dtype": dtype,
        "shard_size": shard_size,
    }
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise SymmergeError(_pydantic_message(e, "options")) from None


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
    dtype: torch.dtype | None
    shard_size: int
    data_path: Path | None
    names: list[str] = field(default_factory=list)
    match: str = "weights"  # the matcher that finds each model's alignment (symmerge.match.MATCHERS)
    lend_head: tuple[str, str] | None = None  # (head, embedding): some models tie their head, others store one

    @property
    def aligned(self) -> bool:
        return bool(self.symmetries)


def _resolve(path: str, root: Path | None, what: str) -> Path:
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute() or root is None:
        return p
    candidate = root / p
    if candidate.exists():
        return candidate
    raise SymmergeError(f"{what}: {path} does not exist (looked in the current directory and in {root})")


def plan_merge(recipe: Recipe, root: Path | None = None, allow_pickle: bool = False) -> MergePlan:
    """Validate everything a merge needs, reading configs and safetensors headers only."""
    method = get_method(recipe.merge_method)
    params = validate_params(recipe.merge_method, dict(recipe.parameters))
    method.check_models(len(recipe.models), True)  # the base is checked below, with a fuller explanation

    models = [open_checkpoint(_resolve(m.model, root, f"models.{i}.model"), allow_pickle) for i, m in enumerate(recipe.models)]
    base = open_checkpoint(_resolve(recipe.base_model, root, "base_model"), allow_pickle) if recipe.base_model else None
    if method.needs_base and base is None:
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
            data_path = _resolve(recipe.data.path, root, "data.path")
            if not data_path.is_file():
                raise SymmergeError(f"data.path: {data_path} is not a file")

    weights = [float(m.parameters["weight"]) if "weight" in m.parameters else 1.0 for m in recipe.models]
    has_weights = any("weight" in m.parameters for m in recipe.models)
    if has_weights and sum(weights) == 0 and method.name == "linear" and params.get("normalize", True):
        raise SymmergeError("models.*.parameters.weight: the weights sum to 0, so they cannot be normalised")

    everyone = models + ([base] if base else [])
    reference_shapes = models[0].shapes()
    lend_head = _lent_head(everyone)
    for i, ckpt in enumerate(everyone[1:], start=1):
        label = f"base_model {ckpt.path}" if ckpt is base else f"model {ckpt.path}"
        check_compatible_shapes(reference_shapes, ckpt.shapes(), label, frozenset(lend_head[:1]) if lend_head else frozenset())

    symmetries = frozenset() if recipe.alignment == "none" else parse_symmetries(recipe.alignment.symmetries)
    spec, reference_index = None, None
    if symmetries:
        try:
            spec = spec_for(models[0].config, reference_shapes.keys())
        except SymmergeError as e:
            raise SymmergeError(f"{e}; to merge without alignment set alignment: none (--align none)") from None
        for ckpt in everyone[1:]:
            check_same_shape(spec, spec_for(ckpt.config, ckpt.shapes().keys()), str(ckpt.path))
        # methods with a base align every model to the base by default (task vectors in the base's basis)
        reference_index = None if (method.needs_base and base is not None) else 0
        ref = recipe.alignment.reference
        if ref is not None:
            ref_path = _resolve(ref, root, "alignment.reference").resolve()
            matches = [i for i, c in enumerate(models) if c.path.resolve() == ref_path]
            if matches:
                reference_index = matches[0]
            elif base is not None and base.path.resolve() == ref_path:
                reference_index = None
            else:
                raise SymmergeError(f"alignment.reference: {ref} is neither one of the models nor the base_model")

    return MergePlan(
        recipe=recipe, models=models, weights=weights if has_weights else None, base=base, method=method, params=params,
        symmetries=symmetries, reference_index=reference_index, spec=spec,
        dtype=DTYPES[recipe.dtype] if recipe.dtype else None, shard_size=parse_size(recipe.shard_size),
        data_path=data_path, names=unique_names([c.path for c in models]), lend_head=lend_head, match=match,
    )


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
