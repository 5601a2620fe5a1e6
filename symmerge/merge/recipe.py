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
    data: {path: calib.txt, max_length: 128, num_examples: 256, batch_size: 8}   # fisher, regmean
    dtype: bfloat16                   # default: the reference's dtype
    shard_size: 2GB

:func:`plan_merge` validates the whole recipe — paths, families and shapes (from configs and safetensors headers),
the method and its parameters, the data — before any weight is read, and raises one-line errors that name the
offending key and value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from symmerge.errors import SymmergeError, cut, shorten
from symmerge.groups import is_auto, parse_symmetries, resolve_symmetries
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
                raise ValueError(f"weight must be a number, got {shorten(value)}")
            if key == "weight" and not _finite(value):
                raise ValueError(f"weight must be a finite number, got {shorten(value)}")
        return v


class AlignmentBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str | None = None
    symmetries: str | list[str] = "auto"
    match: Literal["weights", "activations", "learned"] = "weights"  # activations / learned read the recipe's data
    learn_steps: int = Field(200, gt=0)
    learn_seconds: float | None = Field(None, gt=0)
    iterative: bool = False  # K ≥ 3 models: align each to the mean of the others in rounds (align_many), not a star

    @field_validator("symmetries")
    @classmethod
    def _short(cls, v: str | list[str]) -> str | list[str]:
        if len(v) > 200 or (isinstance(v, list) and any(len(x) > 40 for x in v)):
            raise ValueError(f"symmetries are a few names such as all,residual, got {shorten(v)}")
        return v


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

    @field_validator("merge_method")
    @classmethod
    def _method_name(cls, v: str) -> str:
        if len(v) > 80:
            raise ValueError(f"merge_method is a method name (see `symmerge methods`), got {shorten(v)}")
        return v

    @field_validator("parameters")
    @classmethod
    def _scalars(cls, v: dict[str, Any]) -> dict[str, Any]:
        # method parameters are numbers, true/false or a short word; anything else is refused here, before a
        # validator could render an unbounded value in its message
        for key, value in v.items():
            if not isinstance(key, str) or len(key) > 80:
                raise ValueError(f"parameter names are short words, got {shorten(key)}")
            ok = value is None or isinstance(value, bool) or (isinstance(value, (int, float)) and _finite(value)) \
                or (isinstance(value, str) and len(value) <= 80)
            if not ok:
                raise ValueError(f"parameter {key!r} must be a number, true/false or a word, got {shorten(value)}")
        return v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> str | int:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"shard_size takes a size such as 2GB, 500MB or a number of bytes, got {shorten(v)}")
        parse_size(v)
        return v


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def parse_size(value: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``1000000`` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(value), flags=re.I)
    if not m:
        raise ValueError(f"not a size: {shorten(value)} (examples: 2GB, 500MB)")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(float(m.group(1)) * units[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {shorten(value)}")
    return size


def _pydantic_message(e: ValidationError, source: str) -> str:
    err = e.errors(include_url=False, include_context=False)[0]
    where = ".".join(shorten(p, 40) if not isinstance(p, (str, int)) else str(p)[:40] for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg if len(msg) <= 300 else msg[:299] + "…"
    value = err.get("input")
    shown = "" if err["type"] in ("missing", "value_error") or isinstance(value, (dict, list)) else f", got {shorten(value)}"
    return f"{source}: {where}: {msg}{shown}"


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; anything near this is a mistake or an attack
MAX_RECIPE_NODES = 100_000  # YAML nodes after alias expansion ("billion laughs" expands 10 aliases to 10**9)


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses documents whose alias expansion exceeds :data:`MAX_RECIPE_NODES` nodes."""

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node


def _check_expanded_size(root) -> None:
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:  # iterative post-order: deep nesting cannot overflow the Python stack
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_RECIPE_NODES + 1)
            if sizes[key] > MAX_RECIPE_NODES:
                raise yaml.YAMLError(f"the document expands to more than {MAX_RECIPE_NODES:,} values (YAML aliases "
                                     "repeating aliases): a recipe needs a few dozen")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise yaml.YAMLError("an alias refers to a node that contains it (a recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    reason = f"{context}: {problem}" if context and getattr(e, "problem", None) else problem
    return f"{path} is not valid YAML{where}: {shorten(' '.join(str(reason).split()), 200).strip(chr(39))}"


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Parse and type-check a recipe file; relative model paths are resolved later against the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise SymmergeError(f"recipe {path} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise SymmergeError(f"recipe {path} is {size:,} bytes: a recipe is at most {MAX_RECIPE_BYTES:,} bytes (is it the right file?)")
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise SymmergeError(f"cannot read recipe {path}: {e.strerror or e}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise SymmergeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES:,} bytes: is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SymmergeError(f"recipe {path} is not UTF-8 text (byte {e.start}): is it the right file?") from None
    try:
        raw = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SymmergeError(_yaml_error(path, e)) from None
    except RecursionError:
        raise SymmergeError(f"{path} is not a valid recipe: it is nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise SymmergeError(f"{path} is not a valid recipe: {shorten(str(e), 120)}") from None
    if not isinstance(raw, dict):
        raise SymmergeError(f"{path}: a recipe is a mapping with models, merge_method, ... at the top level")
    try:
        return Recipe.model_validate(raw), path.parent
    except ValidationError as e:
        raise SymmergeError(_pydantic_message(e, str(path))) from None
    except RecursionError:
        raise SymmergeError(f"{path} is not a valid recipe: it is nested too deeply") from None


def recipe_from_models(models: list[str], method: str, *, base: str | None = None, weights: list[float] | None = None,
                       params: dict[str, Any] | None = None, align: str = "all", reference: str | None = None,
                       data: str | None = None, dtype: str | None = None, shard_size: str = "2GB", match: str = "weights",
                       learn_steps: int = 200, learn_seconds: float | None = None, iterative: bool = False) -> Recipe:
    """The short form ``symmerge merge A B --method ties ...`` as a :class:`Recipe`."""
    if weights is not None and len(weights) != len(models):
        raise SymmergeError(f"--weights has {len(weights)} values for {len(models)} models")
    raw: dict[str, Any] = {
        "models": [{"model": m, "parameters": {"weight": w} if weights else {}} for m, w in zip(models, weights or [None] * len(models))],
        "merge_method": method,
        "base_model": base,
        "parameters": params or {},
        "alignment": "none" if align == "none" else {"reference": reference, "symmetries": align, "match": match, "learn_steps": learn_steps,
                                                              **({"learn_seconds": learn_seconds} if learn_seconds else {}),
                                                              **({"iterative": True} if iterative else {})},
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


def _exists(p: Path, what: str, given: str) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte...
        reason = getattr(e, "strerror", None) or str(e)
        raise SymmergeError(f"{what}: {cut(given)} is not a usable path ({reason})") from None


def _resolve(path: str, root: Path | None, what: str) -> Path:
    try:
        p = Path(path).expanduser()
    except RuntimeError as e:  # ~user that does not exist
        raise SymmergeError(f"{what}: {cut(path)}: {e}") from None
    if _exists(p, what, path) or p.is_absolute() or root is None:
        return p
    candidate = root / p
    if _exists(candidate, what, path):
        return candidate
    raise SymmergeError(f"{what}: {cut(path)} does not exist (looked in the current directory and in {root})")


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

    auto = recipe.alignment != "none" and is_auto(recipe.alignment.symmetries)
    symmetries = frozenset() if recipe.alignment == "none" else frozenset({"auto"}) if auto else parse_symmetries(recipe.alignment.symmetries)
    spec, reference_index = None, None
    if symmetries:
        try:
            spec = spec_for(models[0].config, reference_shapes.keys())
        except SymmergeError as e:
            raise SymmergeError(f"{e}; to merge without alignment set alignment: none (--align none)") from None
        for ckpt in everyone[1:]:
            check_same_shape(spec, spec_for(ckpt.config, ckpt.shapes().keys()), str(ckpt.path))
        if auto:  # per family (docs/DESIGN.md §2): with the residual map for pre-LN / RMSNorm models
            symmetries = resolve_symmetries("auto", spec)
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
                raise SymmergeError(f"alignment.reference: {cut(ref)} is neither one of the models nor the base_model")

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
