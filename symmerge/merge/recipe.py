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

This module is the recipe's schema and its loading: the pydantic models (:class:`Recipe` and its blocks),
:func:`load_recipe` (bounded, safe YAML), :func:`recipe_from_models` (the command line's flags as a recipe) and
:func:`parse_size`. It opens no model: :func:`symmerge.merge.planner.plan_merge` validates the whole recipe — paths,
families and shapes (from configs and safetensors headers), the method and its parameters, the data — before any
weight is read, and raises one-line errors that name the offending key and value.
"""

from __future__ import annotations

import difflib
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from symmerge.errors import SymmergeError, shorten
from symmerge.merge.methods import list_methods
from symmerge.merge.settings import check_setting, leaves

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DtypeName = Literal["float32", "bfloat16", "float16"]


def _dtype_name(v: Any) -> Any:
    return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v


def _settings(v: dict[str, Any], where: str) -> dict[str, Any]:
    """Every value a scalar, a gradient or a filtered list (:mod:`symmerge.merge.settings`); ``weight`` a number."""
    out = {}
    for key, value in v.items():
        if not isinstance(key, str) or len(key) > 80:
            raise ValueError(f"parameter names are short words, got {shorten(key)}")
        if key == "weight" and isinstance(value, str):
            raise ValueError(f"weight must be a number, got {shorten(value)}")
        out[key] = check_setting(value, f"{where} {key!r}")
        if key == "weight":
            for leaf in leaves(out[key]):
                if isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
                    raise ValueError(f"weight must be a number, got {shorten(leaf)}")
    return out


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] | None = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _known(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        return _settings(v or {}, "parameter")


class SourceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _known(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        return _settings(v or {}, "parameter")

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range is [first, end) with 0 <= first < end, got {list(v)}")
        return v


class SliceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SourceEntry] = Field(min_length=1)
    parameters: dict[str, Any] | None = Field(default_factory=dict)
    base_model: str | None = None  # mergekit's per-slice base: the base of this slice's tensors (plan_merge, slice_base)
    residual_weight: float | None = None  # mergekit's: declared, never read (accepted with a note in plan_merge)

    @field_validator("parameters")
    @classmethod
    def _known(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        return _settings(v or {}, "parameter")


class ZeroToken(BaseModel):
    """``{kind: zero}``: the token's row is zero."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class ModelToken(BaseModel):
    """``{kind: model_token, model: M, token: T}`` (or ``token_id: I``): model M's row of token T (id I in M's own
    tokenizer)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source names exactly one of token or token_id")
        return self


class TokenEntry(BaseModel):
    """mergekit's ``tokens: {TOKEN: {source: ..., force: ...}}``: where the token's row comes from."""

    model_config = ConfigDict(extra="forbid")
    source: ZeroToken | ModelToken | str | None = None
    force: bool = False


class TokenizerBlock(BaseModel):
    """mergekit's ``tokenizer:`` block; ``source`` defaults to ``union`` as there."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenEntry] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return without_model_prefix(v)


def without_model_prefix(source: str | None) -> str | None:
    """A tokenizer source without mergekit's ``model:`` prefix: its README documents ``tokenizer_source:
    model:<model_path>`` (a model, as opposed to ``base`` or ``union``), and recipes of 2024 (miqu-1-120b,
    miquliz-120b) are written that way; the model is the path after the prefix."""
    return source.removeprefix("model:") if isinstance(source, str) else source


class AlignmentBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str | None = None
    symmetries: str | list[str] = "auto"
    match: Literal["weights", "activations", "learned"] = "weights"  # activations / learned read the recipe's data
    learn_steps: int = Field(200, gt=0)
    max_seconds: float | None = Field(None, ge=0)  # time budget of the residual descent, per model
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where the matching math runs (LAPs on the CPU); not the result
    learn_seconds: float | None = Field(None, ge=1)  # as the command line's --learn-seconds (at least 1 s)
    iterative: bool = False  # K ≥ 3 models: align each to the mean of the others in rounds (align_many), not a star
    # models of different widths: what a narrower model contributes to the neurons / heads it lacks (docs/DESIGN.md §3)
    unmatched: Literal["mean", "inputs", "zero"] = "mean"  # symmerge.groups.UNMATCHED_RULES

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


class ModuleEntry(BaseModel):
    """One module of mergekit's ``modules: {NAME: {models: ... | slices: ..., parameters: ...}}``: the inputs of
    that module's tensors, and its parameters (ranked below a slice's, above the recipe's)."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    parameters: dict[str, Any] | None = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_form(self) -> ModuleEntry:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of models or slices (as in mergekit)")
        return self

    @field_validator("parameters")
    @classmethod
    def _known(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        return _settings(v or {}, "parameter")


def _lift_default_module(raw: dict[str, Any]) -> dict[str, Any]:
    """mergekit's ``modules:`` form for a single-module model, as the top-level form it stands for. mergekit names
    the one module of every text-only architecture ``default`` and normalises ``models:`` / ``slices:`` into
    ``modules: {default: ...}`` itself (``mergekit/plan.py``); the module's ``parameters`` rank below a slice's and
    above the recipe's (``ConfigReader.parameter_sources``), kept here as ``module_parameters``. Other module names
    (a vision-language model's ``text_decoder``, ``vision_tower``...) stay as ``modules``:
    :func:`~symmerge.merge.modules_plan.plan_modules` checks them against the models' architecture."""
    modules = raw.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError("modules: takes a mapping of module names to {models: ...} or {slices: ...}")
    if raw.get("models") or raw.get("slices"):
        raise ValueError("a recipe has exactly one of models, slices or modules (as in mergekit)")
    for name in modules:
        if not isinstance(name, str) or not name or len(name) > 80:
            raise ValueError(f"modules: module names are words such as text_decoder, got {shorten(name)}")
    if list(modules) != ["default"]:
        return raw
    raw.pop("modules")
    module = modules["default"]
    if not isinstance(module, dict):
        raise ValueError("modules.default: takes models: or slices: (and optionally parameters:)")
    unknown = sorted(set(module) - {"models", "slices", "parameters"})
    if unknown:
        raise ValueError(f"modules.default: unknown key {shorten(unknown[0], 40)} (it takes models, slices and parameters)")
    if bool(module.get("models")) == bool(module.get("slices")):
        raise ValueError("modules.default: give exactly one of models or slices")
    for key in ("models", "slices"):
        if module.get(key):
            raw[key] = module[key]
    raw["module_parameters"] = module.get("parameters") or {}
    return raw


class Recipe(BaseModel):
    """A recipe: mergekit's single-document configuration (``models``, ``slices`` or ``modules``, ``base_model``,
    ``merge_method``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` / ``tokenizer``,
    ``chat_template``), plus symmerge's ``alignment``, ``data``, ``shard_size`` and ``allow_unrelated_base``."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    # mergekit's multi-module form (modules other than default): each module merged from its own models or slices
    modules: dict[str, ModuleEntry] | None = None
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Any] | None = Field(default_factory=dict)
    alignment: AlignmentBlock | Literal["none"] = Field(default_factory=AlignmentBlock)
    data: DataBlock | None = None
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    tokenizer_source: str | None = None  # "base", "union" or a model reference
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    shard_size: str | int = "2GB"
    allow_unrelated_base: bool = False  # merge task vectors even when a model looks unrelated to the base
    # the parameters of mergekit's ``modules: {default: {parameters: ...}}``: below a slice's, above the recipe's
    module_parameters: dict[str, Any] = Field(default_factory=dict)
    # mergekit-mega's name of one document of a multi-stage file, often kept in a recipe pasted from one: a label,
    # which mergekit-yaml ignores (accepted with a note by plan_merge)
    name: str | None = Field(None, max_length=200)
    # no alignment key: align where the family allows it, else merge unaligned with a note (as mergekit merges)
    _default_alignment: bool = PrivateAttr(default=False)
    # method parameters the file gives at the top level, where mergekit ignores them (load_recipe; noted by plan_merge)
    _misplaced: tuple[str, ...] = PrivateAttr(default=())
    # made from the command line's short form (recipe_from_models): errors name its options, not recipe keys (spelled)
    _short_form: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = dict(raw)
            for key in ("dtype", "out_dtype"):
                raw[key] = _dtype_name(raw.get(key))
            if "alignment" in raw and raw["alignment"] in (None, False):
                raw["alignment"] = "none"
            if "module_parameters" in raw:
                raise ValueError("module_parameters: unknown key (write modules: {default: {parameters: ...}})")
            if "modules" in raw:
                raw = _lift_default_module(raw)
                if "modules" in raw:
                    return raw
            given = [k for k in ("models", "slices") if raw.get(k)]
            if len(given) != 1:
                raise ValueError("a recipe has exactly one of models (whole models) or slices (layer ranges)"
                                 + (", not both" if len(given) == 2 else ""))
        return raw

    @model_validator(mode="after")
    def _tokenizer(self) -> Recipe:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("tokenizer_source and tokenizer cannot both be given (as in mergekit)")
        # read once, here: a later assignment (the CLI's --device) must not turn the default into an explicit choice
        self._default_alignment = "alignment" not in self.model_fields_set
        return self

    @property
    def misplaced_parameters(self) -> tuple[str, ...]:
        """Method parameters the recipe file gave at the top level (``normalize: true`` beside ``merge_method``),
        dropped as mergekit-yaml drops them: it ignores every key it does not know."""
        return self._misplaced

    @property
    def default_alignment(self) -> bool:
        """Whether the recipe has no ``alignment`` key (a pasted mergekit recipe): it then aligns the families
        symmerge has a spec of and merges any other unaligned, with a note, instead of refusing."""
        return self._default_alignment

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, v: str | None) -> str | None:
        return without_model_prefix(v)

    @field_validator("merge_method")
    @classmethod
    def _method_name(cls, v: str) -> str:
        if len(v) > 80:
            raise ValueError(f"merge_method is a method name (see `symmerge methods`), got {shorten(v)}")
        return v

    @field_validator("parameters", "module_parameters")
    @classmethod
    def _scalars(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        # method parameters are settings (numbers, true/false, words, gradients, filtered lists); anything else is
        # refused here, before a validator could render an unbounded value in its message
        return _settings(v or {}, "parameter")

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> str | int:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"shard_size takes a size such as {SIZE_EXAMPLES}, got {shorten(v)}")
        try:
            parse_size(v)
        except SymmergeError as e:  # pydantic reports ValueErrors with the field's location
            raise ValueError(str(e)) from None
        return v


# Size suffixes, case-insensitive. A bare K, M or B is mergekit's (``parse_kmb``): thousands, millions, billions — so
# mergekit's default ``5B`` is 5·10⁹ bytes, not 5 bytes. G and T alone, and the byte units KB…TB (decimal) and
# KiB…TiB (binary), mean one thing each, so they are read too (mergekit refuses them).
SIZE_UNITS = {
    "": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
SIZE_EXAMPLES = "5B (mergekit's: 5 billion bytes), 500M, 2GB, 1GiB, or a number of bytes; 0: no limit"


def parse_size(value: str | int) -> int:
    """A shard size in bytes, read as mergekit reads ``--out-shard-size`` plus unambiguous byte units.

    ``"5B"`` → 5·10⁹ (mergekit: B is billions), ``"500M"`` → 5·10⁸, ``"2K"`` → 2000, ``"2GB"``/``"2G"`` → 2·10⁹,
    ``"1GiB"`` → 2³⁰, ``1000000`` → 10⁶, ``"1.5B"`` → 1.5·10⁹; ``0`` means no limit (one shard), as in mergekit.
    Anything else raises :class:`SymmergeError`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise SymmergeError(f"a size cannot be negative, got {value} (examples: {SIZE_EXAMPLES})")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = SIZE_UNITS.get(m.group(2).upper()) if m else None
    if unit is None:
        raise SymmergeError(f"not a size: {shorten(value)} (examples: {SIZE_EXAMPLES})")
    size = Fraction(m.group(1)) * unit  # exact: "0.1GB" is 10⁸ bytes, not 10⁸ ± a float rounding
    if size != 0 and size < 1:
        raise SymmergeError(f"a size must be at least 1 byte, got {shorten(value)}")
    return int(size)


def _pydantic_message(e: ValidationError, source: str) -> str:
    err = e.errors(include_url=False, include_context=False)[0]
    where = ".".join(shorten(p, 40) if not isinstance(p, (str, int)) else str(p)[:40] for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg if len(msg) <= 300 else msg[:299] + "…"
    value = err.get("input")
    shown = "" if err["type"] in ("missing", "value_error") or isinstance(value, (dict, list)) else f", got {shorten(value)}"
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:  # a misspelt top-level key: name the one meant
        close = difflib.get_close_matches(str(err["loc"][0]), RECIPE_KEYS, n=1, cutoff=0.7)
        shown += f" (did you mean {close[0]}?)" if close else ""
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
    # mergekit-mega's multi-stage files separate their recipes with ---; mergekit-yaml refuses them as well
    hint = " (several YAML documents: a mergekit-mega file? give each recipe its own file)" if context == "expected a single document in the stream" else ""
    # a model card's recipe that lost its `models:` line: the list items land under the key above, which has a value
    line = _line_at(mark)
    if problem == "mapping values are not allowed here" and line.lstrip().startswith("- "):
        hint = " (a list item under a key that already has a value: is a `models:` line missing above it?)"
    return f"{path} is not valid YAML{where}: {shorten(' '.join(str(reason).split()), 200).strip(chr(39))}{hint}"


def _line_at(mark: Any) -> str:
    """The text of the line a YAML error points at ("" when the parser kept no buffer)."""
    buffer = getattr(mark, "buffer", None)
    if mark is None or not isinstance(buffer, str):
        return ""
    lines = buffer.split("\n")
    return lines[mark.line] if mark.line < len(lines) else ""


def _refuse_other_forms(raw: dict[Any, Any], path: Path) -> None:
    """Files pasted as recipes that are another tool's configuration or a misshapen one, refused in one line that
    says what to do (mergekit-yaml refuses them too, with a pydantic error naming a missing field)."""
    if "experts" in raw and not any(raw.get(k) for k in ("models", "slices", "modules")):
        raise SymmergeError(f"{path}: a mergekit-moe config (experts:, gate_mode:) builds a mixture of experts, which "
                            "mergekit-yaml refuses too: run mergekit-moe on it, or list the experts under models: with a "
                            "merge_method to merge them into one dense model")
    params = raw.get("parameters")
    if isinstance(params, list) and all(isinstance(p, dict) for p in params):
        raise SymmergeError(f"{path}: parameters: a mapping of names to values (parameters: {{weight: 1.0}}), not a list "
                            "(- weight: 1.0), as mergekit requires")


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
    _refuse_other_forms(raw, path)
    misplaced = _misplaced_parameters(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise SymmergeError(_pydantic_message(e, str(path))) from None
    except RecursionError:
        raise SymmergeError(f"{path} is not a valid recipe: it is nested too deeply") from None
    recipe._misplaced = misplaced
    return recipe, path.parent


def _misplaced_parameters(raw: dict[Any, Any]) -> tuple[str, ...]:
    """Remove from ``raw`` the method parameters given at the top level instead of under ``parameters:``: mergekit's
    configuration ignores keys it does not know, so a published recipe may carry one (``normalize: true`` beside
    ``merge_method: model_stock``) that changed nothing there. Any other unknown key is still refused (a typo)."""
    names = {p.name for m in list_methods() for p in m.params} | {"weight"} | TOKENIZER_KEYS_AT_TOP
    keys = tuple(k for k in raw if isinstance(k, str) and k in names and k not in Recipe.model_fields)
    for k in keys:
        raw.pop(k)
    return keys


TOKENIZER_KEYS_AT_TOP = {"pad_to_multiple_of"}
"""Keys of mergekit's ``tokenizer:`` block that published recipes write at the top level, where mergekit ignores
them (dropped with a note, as a method parameter there is)."""
RECIPE_KEYS = tuple(Recipe.model_fields)


def recipe_from_models(models: list[str], method: str, *, base: str | None = None, weights: list[float] | None = None,
                       params: dict[str, Any] | None = None, align: str = "all", reference: str | None = None,
                       data: str | None = None, dtype: str | None = None, shard_size: str = "2GB", match: str = "weights",
                       learn_steps: int = 200, max_seconds: float | None = None, device: str = "cpu",
                       learn_seconds: float | None = None, iterative: bool = False, unmatched: str = "mean") -> Recipe:
    """The short form ``symmerge merge A B --method ties ...`` as a :class:`Recipe`."""
    if weights is not None and len(weights) != len(models):
        raise SymmergeError(f"--weights has {len(weights)} values for {len(models)} models")
    alignment = {"reference": reference, "symmetries": align, "match": match, "learn_steps": learn_steps, "max_seconds": max_seconds,
                 "device": device, "learn_seconds": learn_seconds, "iterative": iterative, "unmatched": unmatched}
    raw: dict[str, Any] = {
        "models": [{"model": m, "parameters": {"weight": w} if weights else {}} for m, w in zip(models, weights or [None] * len(models))],
        "merge_method": method,
        "base_model": base,
        "parameters": params or {},
        "alignment": "none" if align == "none" else alignment,
        "data": {"path": data} if data else None,
        "dtype": dtype,
        "shard_size": shard_size,
    }
    # options that all equal a recipe's alignment defaults are a recipe without an alignment key (it aligns where the
    # family allows it, and merges unaligned with a note where it cannot); the defaults are stated once, in AlignmentBlock
    if align != "none" and alignment == AlignmentBlock().model_dump():
        del raw["alignment"]
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise SymmergeError(_pydantic_message(e, "options")) from None
    recipe._short_form = True
    return recipe


SHORT_FORM_OPTIONS = {"merge_method": "--method", "base_model": "--base", "data": "--data", "alignment.match": "--match",
                      "alignment.reference": "--reference", "models.*.parameters.weight": "--weights",
                      "alignment.iterative": "--iterative"}
"""The recipe keys that errors name, as the short form ``symmerge merge A B --method ...`` spells them."""

_SHORT_FORM_MODEL = re.compile(r"models\.(\d+)(\.model)?")  # the short form's positional models: "model 2", counted from 1


def spelled(recipe: Recipe, key: str) -> str:
    """``key`` as the user wrote it: the command line's option (or ``model N``, the N-th model argument) for a recipe
    made from the short form, else the key."""
    if not recipe._short_form:
        return key
    model = _SHORT_FORM_MODEL.fullmatch(key)
    return f"model {int(model.group(1)) + 1}" if model else SHORT_FORM_OPTIONS.get(key, key)


def data_hint(recipe: Recipe) -> str:
    """How to give calibration data, in the form the user wrote the merge in."""
    return "add --data FILE" if recipe._short_form else "add data: {path: FILE}"
