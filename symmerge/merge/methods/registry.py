"""The merge-method registry: parameter declarations, :class:`MergeMethod`, the :func:`merge_method` decorator
that fills :data:`MERGE_METHODS`, and :func:`validate_params`, which checks a recipe's values before any weight is read."""

from __future__ import annotations

import inspect
import keyword
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from symmerge.errors import SymmergeError

Tensor = torch.Tensor


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method: its recipe key, Python argument name, default and constraint.

    ``kind`` is ``"float"``, ``"int"``, ``"bool"`` or ``"choice"``. Numeric bounds are ``lo``/``hi`` (``None`` =
    unbounded), each open or closed; ``choices`` lists the allowed strings of a ``"choice"``.
    """

    name: str
    kind: str
    default: Any
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    help: str = ""
    per_model: bool = False  # may be one value per model (a list), like mergekit's per-model parameters
    required: bool = False  # no default: a recipe must give it (``default`` is then ``None``)
    # accepted because mergekit declares it, but it changes nothing here: the one-line note a recipe that sets it
    # gets ("{method}" is filled in); the recipe planner checks its values and then drops it
    no_effect: str = ""

    @property
    def arg(self) -> str:
        """The Python keyword argument: the recipe key, with ``_`` appended to Python keywords (``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    @property
    def constraint(self) -> str:
        """Human-readable constraint, e.g. ``"in (0, 1]"``, ``">= 0"``, ``"one of none, param, model"``."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "a finite number" if self.kind == "float" else "an integer"

    def check(self, method: str, value: Any) -> Any:
        """``value`` converted to the parameter's type, or :class:`SymmergeError` naming method, key and value.

        A ``per_model`` parameter also takes a list (or tuple) with one value per model: each element is checked
        (errors name it as ``density[1]``) and a list is returned.
        """
        if self.per_model and isinstance(value, (list, tuple)):
            if len(value) == 0:
                raise SymmergeError(f"{method}: {self.name} must be {self.constraint} or a list with one such value per model, got []")
            return [self._check_one(method, v, f"{self.name}[{i}]") for i, v in enumerate(value)]
        return self._check_one(method, value, self.name)

    def _check_one(self, method: str, value: Any, label: str) -> Any:
        bad = lambda what: SymmergeError(f"{method}: {label} must be {what}, got {value!r}")  # noqa: E731
        if self.kind == "bool":
            # mergekit reads every setting as a number, a word or a gradient, so the configs it writes (an output's
            # mergekit_config.yml, the model cards made from it) say 1.0 / 0.0 for true / false; its methods read
            # those, and no other number, as booleans
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
                return bool(value)
            if not isinstance(value, bool):
                raise bad("true or false")
            return value
        if isinstance(value, str) and self.kind in ("float", "int") and _YAML11_NUMBER.fullmatch(value.strip()):
            value = float(value)  # 1e-5: PyYAML (YAML 1.1) reads it as a word; mergekit's pydantic fields as a number
        if self.kind == "choice":
            if value not in self.choices:
                raise bad(self.constraint)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number" if self.kind == "float" else "an integer")
        if self.kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad("an integer")
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad("a finite number")
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_bad or hi_bad:
            raise SymmergeError(f"{method}: {label} must be {self.constraint}, got {_num(value)}")
        return value


# numbers YAML 1.1 leaves as words: exponents without a dot or without a sign (1e-5, 2.5e3)
_YAML11_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def Float(default: float | None, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
          help: str = "", per_model: bool = False, required: bool = False, no_effect: str = "") -> dict:
    """Keyword arguments of a float :class:`ParamSpec` (used in ``@merge_method(params={...})``).

    ``per_model=True``: a recipe may give one value per model (a list, or the key under a model's ``parameters``);
    ``required=True``: no default (pass ``None`` as ``default``), a recipe must set it. ``no_effect``: see
    :attr:`ParamSpec.no_effect`.
    """
    return dict(kind="float", default=default, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, help=help, per_model=per_model,
                required=required, no_effect=no_effect)


def Int(default: int, lo: int | None = None, hi: int | None = None, *, help: str = "", per_model: bool = False) -> dict:
    """Keyword arguments of an integer :class:`ParamSpec`."""
    return dict(kind="int", default=default, lo=lo, hi=hi, help=help, per_model=per_model)


def Bool(default: bool, *, help: str = "", no_effect: str = "") -> dict:
    """Keyword arguments of a boolean :class:`ParamSpec`."""
    return dict(kind="bool", default=default, help=help, no_effect=no_effect)


def Choice(default: str, choices: Sequence[str], *, help: str = "") -> dict:
    """Keyword arguments of a string :class:`ParamSpec` restricted to ``choices``."""
    return dict(kind="choice", default=default, choices=tuple(choices), help=help)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: what a recipe validator or ``symmerge methods`` needs to know about it."""

    name: str
    fn: Callable[..., Tensor] = field(repr=False)
    params: tuple[ParamSpec, ...]
    needs_base: bool
    statistics: str | None  # "fisher" (diagonal Fishers → fishers=) or "gram" (input Grams → grams=), from data
    min_models: int
    max_models: int | None
    description: str
    linear_layout: bool = False  # wants weights as nn.Linear (out, in): GPT-2's Conv1D (in, out) is transposed around it
    prepare: Callable[..., dict] | None = field(default=None, repr=False)  # whole-model inputs before the per-tensor pass
    optional_base: bool = False  # uses base_model when the recipe has one (slerp, nuslerp, multislerp), works without
    check: Callable[[str, dict], None] | None = field(default=None, repr=False)  # cross-parameter checks (validate_params)
    workers: int = 1  # output tensors the engine merges at once, in threads (each in flight adds its scratch memory)
    # ``True``: a recipe's per-model ``weight`` reaches ``fn``; else why mergekit's method reads none (karcher: it
    # averages uniformly), and the recipe planner drops it with a note that says so: a pasted recipe means what it meant
    recipe_weight: bool | str = True

    @property
    def uses_base(self) -> bool:
        """Whether the method takes ``base=``: always (``needs_base``) or when the recipe has one (``optional_base``)."""
        return self.needs_base or self.optional_base

    @property
    def per_model_params(self) -> tuple[str, ...]:
        """Recipe keys that may be given per model (under a model's ``parameters``, or as a list)."""
        return tuple(p.name for p in self.params if p.per_model)

    @property
    def needs_data(self) -> bool:
        """Whether the method needs calibration data (for its statistics)."""
        return self.statistics is not None

    @property
    def statistics_argument(self) -> str | None:
        """The keyword that receives one statistic per model for a tensor (``fishers`` or ``grams``)."""
        return {"fisher": "fishers", "gram": "grams"}.get(self.statistics or "")

    @property
    def defaults(self) -> dict[str, Any]:
        """Recipe key → default value."""
        return {p.name: p.default for p in self.params}

    @property
    def arguments(self) -> frozenset[str]:
        """The keyword arguments ``fn`` accepts (``base``, ``weights``, ``name``, parameters, data such as ``grams``)."""
        return frozenset(p.name for p in inspect.signature(self.fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def check_models(self, n_models: int, has_base: bool) -> None:
        """Raise :class:`SymmergeError` if ``n_models`` models (plus a base or not) cannot be merged this way."""
        if self.needs_base and not has_base:
            raise SymmergeError(f"{self.name}: needs a base model (the common ancestor of the models merged)")
        if self.max_models is not None and self.min_models == self.max_models and n_models != self.max_models:
            raise SymmergeError(f"{self.name}: merges exactly {self.max_models} models, got {n_models}")
        if n_models < self.min_models:
            raise SymmergeError(f"{self.name}: needs at least {self.min_models} model(s), got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise SymmergeError(f"{self.name}: merges at most {self.max_models} models, got {n_models}")

    def summary(self) -> str:
        """One line for a listing: ``ties [base] density=0.2 lambda=1  — description``."""
        parts = [self.name] + ["[base]"] * self.needs_base + ["[base?]"] * self.optional_base + ["[data]"] * self.needs_data
        parts += [f"{p.name}={_show(p)}" for p in self.params]
        return " ".join(parts) + f"  — {self.description}"

    def __call__(self, tensors: Sequence[Tensor], **kwargs: Any) -> Tensor:
        return self.fn(tensors, **kwargs)


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    params: Mapping[str, dict] | None = None,
    needs_base: bool = False,
    statistics: str | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    description: str | None = None,
    linear_layout: bool = False,
    prepare: Callable[..., dict] | None = None,
    optional_base: bool = False,
    check: Callable[[str, dict], None] | None = None,
    workers: int = 1,
    recipe_weight: bool | str = True,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register the decorated per-tensor function in :data:`MERGE_METHODS` under ``name``.

    ``params`` maps each recipe key to the spec built by :func:`Float`, :func:`Int`, :func:`Bool` or
    :func:`Choice`; the function must accept each as a keyword argument (``lambda`` → ``lambda_``) with the same
    default. ``description`` defaults to the first line of the docstring. The function is returned unchanged.

    What the engine provides is declared here, never inferred from the name: ``needs_base`` (``base=``),
    ``statistics`` (``"fisher"`` / ``"gram"``: one statistic per model, as ``fishers=`` / ``grams=``, or ``None``
    for tensors that have none — the function then decides what to do), ``linear_layout`` (weights handed over in
    ``nn.Linear`` layout), ``prepare(params, task_vectors, statistics) -> dict`` (extra keyword arguments computed
    over the whole model once, before the per-tensor pass; ``task_vectors()`` yields each tensor's per-model task
    vectors, ``statistics`` maps tensor name → per-model statistics), ``optional_base`` (``base=`` when the recipe
    has a base model, else nothing). ``check(method, params)`` runs cross-parameter checks in
    :func:`validate_params` (e.g. DELLA's ``density ± epsilon`` in (0, 1)). ``workers``: how many output tensors the
    engine may merge at once, in threads — more than one only for a function that is pure per tensor (scratch per
    call, random masks seeded per tensor: the bits do not change) and whose scratch is small, because every tensor
    in flight adds its memory (with two, sce — when it still kept whole-tensor float32 statistics — raised its peak RSS from 1.82 to 2.96 GB).
    ``recipe_weight``: ``True``, or why a recipe's per-model ``weight`` changes nothing (mergekit's method reads
    none): it is then dropped with a note giving that reason.

    Every function takes ``out_dtype=None``: it computes in float32 (float64 if an input is float64) and rounds
    once, to ``out_dtype`` (default: the dtype of ``tensors[0]``). The engine passes the output dtype, so a
    bf16 → float16 merge is rounded once, not twice.
    """

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        specs = tuple(ParamSpec(name=key, **spec) for key, spec in (params or {}).items())
        signature = inspect.signature(fn)
        for p in specs:
            arg = signature.parameters.get(p.arg)
            if arg is None or arg.default != p.default:
                raise ValueError(f"{fn.__name__} must take {p.arg}={p.default!r} for parameter {p.name!r} of {name!r}")
        for arg in ("name", "weights", "out_dtype"):
            if arg not in signature.parameters:
                raise ValueError(f"{fn.__name__} must take the keyword argument {arg!r} (merge method {name!r})")
        if needs_base and optional_base:
            raise ValueError(f"{name}: needs_base and optional_base are exclusive")
        desc = description or (inspect.getdoc(fn) or name).splitlines()[0]
        if statistics not in (None, "fisher", "gram"):
            raise ValueError(f"{name}: statistics must be None, 'fisher' or 'gram', got {statistics!r}")
        if workers < 1:
            raise ValueError(f"{name}: workers must be at least 1, got {workers}")
        MERGE_METHODS[name] = MergeMethod(name, fn, specs, needs_base, statistics, min_models, max_models, desc, linear_layout, prepare,
                                          optional_base, check, workers, recipe_weight)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """The registered :class:`MergeMethod` called ``name``, or :class:`SymmergeError` listing the available ones."""
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        raise SymmergeError(f"unknown merge method {name!r}; available: {', '.join(sorted(MERGE_METHODS))}") from None


def list_methods() -> list[MergeMethod]:
    """All registered methods, sorted by name."""
    return [MERGE_METHODS[k] for k in sorted(MERGE_METHODS)]


def validate_params(name: str, params: Mapping[str, Any] | None = None, *, n_models: int | None = None) -> dict[str, Any]:
    """Check a recipe's parameters for method ``name`` and fill in defaults, before any weight is read.

    Keys are the recipe keys (``lambda``; the Python spelling ``lambda_`` is accepted too). Returns a dict keyed by
    the Python argument names, ready for ``method.fn(tensors, ..., **validated)``. Raises :class:`SymmergeError`
    naming the method, key and value: ``"ties: density must be in (0, 1], got 1.5"``, ``"ties: unknown parameter
    'dens' (known: density, lambda)"``. A per-model parameter may be a list: each element is checked
    (``"ties: density[1] must be in (0, 1], got 1.5"``) and, given ``n_models``, its length too. A required
    parameter that is missing is an error.
    """
    method = get_method(name)
    if params is not None and not isinstance(params, Mapping):
        raise SymmergeError(f"{name}: parameters must be a mapping of names to values, got {params!r}")
    by_key = {p.name: p for p in method.params} | {p.arg: p for p in method.params}
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        spec = by_key.get(key)
        if spec is None:
            known = ", ".join(p.name for p in method.params) or "none"
            raise SymmergeError(f"{name}: unknown parameter {key!r} (known: {known})")
        if spec.arg in out:
            raise SymmergeError(f"{name}: parameter {spec.name!r} given twice")
        if spec.required and value is None:
            continue
        out[spec.arg] = spec.check(name, value)
        if n_models is not None and isinstance(out[spec.arg], list) and len(out[spec.arg]) != n_models:
            raise SymmergeError(f"{name}: {spec.name} has {len(out[spec.arg])} values for {n_models} models")
    for p in method.params:
        if p.required and p.arg not in out:
            raise SymmergeError(f"{name}: parameter {p.name!r} is required ({p.help})")
        out.setdefault(p.arg, p.default)
    if method.check is not None:
        method.check(name, out)
    return out


def _show(p: ParamSpec) -> str:
    if p.required:
        return "(required)"
    return _num(p.default) if p.kind in ("float", "int") else str(p.default).lower()


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
