"""Registered merge methods: pure per-tensor functions, and a registry that describes and validates them.

Every method is a function ``fn(tensors, *, base=None, weights=None, name=None, **params, **data) -> Tensor``:

- ``tensors``: one tensor per model, all the same shape (already aligned by symmerge);
- ``base``: the common ancestor's tensor (methods with ``needs_base``; used when given by ``optional_base`` ones —
  slerp, nuslerp, multislerp; ignored by the others);
- ``weights``: one float per model (``None`` = 1 for every model);
- ``name``: the tensor's name in the state dict: seeds DARE's masks and labels error messages;
- ``params``: the method's registered parameters (see :func:`validate_params`); ``per_model`` ones (``density``,
  ``gamma``, ``epsilon``, ``scale``) take a scalar or one value per model;
- ``data``: per-model statistics for the ``needs_data`` methods (``fishers=``, ``grams=``) and precomputed TIES
  ``thresholds=``.

The math runs in float32 (float64 when an input is float64; RegMean's solve always in float64) and the result is
rounded once, to ``out_dtype`` (every method takes it; default: the dtype of ``tensors[0]``; the engine passes the
output dtype). Inputs are never modified. Functions keep at most a few tensor-sized
float32 buffers alive at once whatever the number of models: task vectors ``θ_i − base`` are recomputed rather
than stacked, and masks are applied in place, because these run on 7B-scale tensors.

The registry: :data:`MERGE_METHODS` maps a name to a :class:`MergeMethod` (parameters with defaults and checks,
model-count and base/data requirements, a one-line description), filled by :func:`merge_method`. A recipe is
checked with :func:`get_method`, :meth:`MergeMethod.check_models` and :func:`validate_params` before any weight is
read.
"""

from __future__ import annotations

import hashlib
import inspect
import keyword
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from symmerge.errors import SymmergeError

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------------- registry


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
            if not isinstance(value, bool):
                raise bad("true or false")
            return value
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
    # whether a recipe's per-model ``weight`` reaches ``fn``; False where mergekit's method declares no weight and
    # reads none (karcher): the recipe planner then drops it with a note, so a pasted recipe means what it meant
    recipe_weight: bool = True

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
    recipe_weight: bool = True,
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
    ``recipe_weight=False``: a recipe's per-model ``weight`` is noted and dropped (mergekit's method has none).

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


# ---------------------------------------------------------------------------------------------- shared helpers


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_inputs(method: str, tensors: Sequence[Tensor], name: str | None, *, base: Tensor | None = None, needs_base: bool = False) -> None:
    where = f" (tensor {name!r})" if name else ""
    if len(tensors) == 0:
        raise SymmergeError(f"{method}: no tensors to merge{where}")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if not (t.is_floating_point()):
            raise SymmergeError(f"{method}: cannot merge a {t.dtype} tensor{where}; copy it from one model instead")
        if t.element_size() == 1:  # float8: quantised weights, whose scales live in other tensors
            raise SymmergeError(f"{method}: cannot merge a {t.dtype} tensor{where}: float8 weights are quantised; "
                                f"dequantise the model to bfloat16 or float32 first")
        if t.shape != shape:
            raise SymmergeError(f"{method}: model {i} has shape {tuple(t.shape)}, model 0 {tuple(shape)}{where}")
    if needs_base and base is None:
        raise SymmergeError(f"{method}: needs the base model's tensor{where}")
    if base is not None and needs_base and base.shape != shape:
        raise SymmergeError(f"{method}: base has shape {tuple(base.shape)}, models {tuple(shape)}{where}")


def _weights(method: str, weights: Sequence[float] | None, n: int, *, nonnegative: bool = False) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise SymmergeError(f"{method}: got {len(w)} weights for {n} models")
    # the tensors are combined in float32: a weight (or a sum of them) past its range would overflow mid-merge
    if not all(math.isfinite(x) for x in w) or not sum(abs(x) for x in w) <= torch.finfo(torch.float32).max:
        raise SymmergeError(f"{method}: weights must be finite, with magnitudes summing to at most 3.4e38, got {w}")
    if nonnegative and (any(x < 0 for x in w) or sum(w) <= 0):
        raise SymmergeError(f"{method}: weights must be >= 0 with a positive sum, got {w}")
    return w


def _params(method: str, **values: Any) -> dict[str, Any]:
    """Validate a direct call's parameters with the same checks as a recipe (cheap: a few dict operations)."""
    return validate_params(method, values)


def _task_vector(theta: Tensor, base: Tensor, dtype: torch.dtype) -> Tensor:
    """``θ − base`` in ``dtype``, as a fresh tensor the caller may modify (the inputs are left untouched)."""
    return theta.to(dtype, copy=True).sub_(base)


# ------------------------------------------------------------------------------------------- top-k thresholds

#: Tensors up to this many entries get their threshold straight from ``torch.kthvalue`` (which copies the input
#: and an int64 index array); larger ones use the exact bracketing selection in :func:`magnitude_threshold`.
EXACT_DIRECT_MAX = 1 << 22
_BRACKET_SAMPLE = 1 << 18


def keep_count(density: float, n: int) -> int:
    """How many of ``n`` entries a top-``density`` trim keeps: ``⌊density · n⌋``, in ``[1, n]`` (mergekit's count)."""
    return min(n, max(1, int(density * n)))


def magnitude_threshold(magnitudes: Tensor, density: float, *, sample_size: int | None = None, generator: torch.Generator | None = None) -> float:
    """The ``k``-th largest entry of ``magnitudes`` (any shape, entries ``>= 0``), ``k = keep_count(density, n)``.

    Keeping the entries ``>= threshold`` keeps the top-``density`` fraction by magnitude (a few more when several
    entries tie with the threshold). ``density = 1`` returns 0 (keep everything).

    Exact by default: ``torch.kthvalue`` for tensors up to :data:`EXACT_DIRECT_MAX` entries; above, a random
    sample brackets the ``k``-th largest value in ``[lo, hi]`` and only the entries inside the bracket are gathered
    and selected from — exact (checked by counting, with a full ``kthvalue`` fallback if the bracket misses),
    using bool masks instead of ``kthvalue``'s 12 bytes per entry. ``sample_size=m`` instead returns the sampled
    quantile of ``m`` entries drawn with replacement (approximate, for huge tensors when speed matters more).
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise SymmergeError("cannot compute a magnitude threshold of an empty tensor")
    k = keep_count(density, n)
    if k >= n:
        return 0.0
    if sample_size is not None and sample_size > 0 and n > sample_size:
        idx = torch.randint(n, (sample_size,), generator=generator, device=flat.device)
        sample = flat[idx].float()
        return float(torch.kthvalue(sample, min(sample_size, max(1, round((1 - k / n) * sample_size)))).values)
    return kth_largest(flat, k)


def kth_largest(values: Tensor, k: int) -> float:
    """The ``k``-th largest entry of ``values`` (any shape, ``1 <= k <= n``), exactly: ``torch.kthvalue`` up to
    :data:`EXACT_DIRECT_MAX` entries, above it the bracketing selection described in :func:`magnitude_threshold`."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n <= EXACT_DIRECT_MAX:
        return float(torch.kthvalue(flat, n - k + 1).values)
    # Exact selection by bracketing: rank n−k+1 from the bottom sits near the (1 − k/n) sample quantile; a margin
    # of 6 binomial standard deviations makes a miss (handled below, exactly) vanishingly rare.
    g = torch.Generator(device=flat.device).manual_seed(0x5EED)
    s = _BRACKET_SAMPLE
    sample = flat[torch.randint(n, (s,), generator=g, device=flat.device)]
    p = 1 - k / n
    margin = 6 * math.sqrt(p * (1 - p) / s) + 2 / s
    lo = torch.kthvalue(sample, min(s, max(1, math.floor((p - margin) * s)))).values
    hi = torch.kthvalue(sample, min(s, max(1, math.ceil((p + margin) * s)))).values
    above = int((flat > hi).sum())
    candidates = flat[(flat >= lo) & (flat <= hi)]
    r = k - above  # the wanted value is the r-th largest candidate, if the bracket holds it
    if 1 <= r <= candidates.numel():
        return float(torch.kthvalue(candidates, candidates.numel() - r + 1).values)
    return float(torch.kthvalue(flat, n - k + 1).values)


def global_magnitude_thresholds(
    task_vectors: Iterable[Sequence[Tensor]] | Mapping[str, Sequence[Tensor]],
    density: float | Sequence[float],
    *,
    sample_rate: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Whole-model TIES trimming (Yadav et al. 2023, "Trim" step): one magnitude threshold per model, over all tensors.

    ``task_vectors`` yields, for each tensor of the model, the per-model task vectors ``[τ_1, ..., τ_M]``
    (``τ_i = θ_i − base``, one shape per tensor) — an iterable (consumed once, so a generator that loads tensors
    lazily works) or a mapping name → list. Returns ``[t_1, ..., t_M]``: ``t_i`` is the ``k``-th largest
    ``|τ_i|`` over the whole model, ``k = keep_count(density_i, Σ numel)`` (``density``: one value, or one per
    model). Pass it as ``ties(..., thresholds=...)``
    for every tensor: the kept fraction then varies between tensors, ``density`` overall per model, as in the
    paper (per-tensor trimming, the default of :func:`ties`, keeps ``density`` of every tensor instead).

    Exact by default, which holds ``|τ_i|`` of the whole model in float32 (4 bytes per parameter per model, twice
    that for one model at a time while its pieces are concatenated).
    ``sample_rate=r`` keeps a uniform sample of about ``r`` of each tensor's entries instead (drawn with
    replacement, seeded by ``seed``) and returns the sample's quantile: ~``4 r`` bytes per parameter per model,
    one pass, approximate (for a 7B model, ``r = 1e-3`` gives 7M samples per model).
    """
    items = task_vectors.values() if isinstance(task_vectors, Mapping) else task_vectors
    pools: list[list[Tensor]] | None = None
    total = 0
    g: torch.Generator | None = None
    for taus in items:
        if pools is None:
            pools = [[] for _ in taus]
        if len(taus) != len(pools):
            raise SymmergeError(f"global_magnitude_thresholds: got {len(taus)} task vectors for a tensor, {len(pools)} before")
        n = taus[0].numel()
        total += n
        for i, tau in enumerate(taus):
            flat = tau.reshape(-1)
            if sample_rate is not None:
                if g is None:
                    g = torch.Generator(device=flat.device).manual_seed(seed)
                m = min(n, max(1, math.ceil(sample_rate * n)))
                flat = flat[torch.randint(n, (m,), generator=g, device=flat.device)]
            pools[i].append(flat.to(torch.float32).abs())
    if pools is None or total == 0:
        raise SymmergeError("global_magnitude_thresholds: no task vectors given")
    densities = _broadcast("global_magnitude_thresholds", "density", density, len(pools))
    out = []
    for chunks, d in zip(pools, densities):
        magnitudes = torch.cat(chunks)
        chunks.clear()
        out.append(magnitude_threshold(magnitudes, d))
    return out


def _trim_(tau: Tensor, threshold: float) -> Tensor:
    """Zero, in place, the entries of ``tau`` with ``|τ| < threshold`` (bool temporaries only)."""
    if threshold > 0:
        tau.masked_fill_(torch.logical_and(tau < threshold, tau > -threshold), 0)
    return tau


def _trim_to_count_(tau: Tensor, threshold: float, k: int) -> Tensor:
    """Keep exactly the top ``k`` magnitudes of ``tau`` (in place): everything above ``threshold`` (the ``k``-th
    largest magnitude) and, of the entries equal to it, the first ones in memory order. bf16 task vectors tie at
    the threshold often; keeping every tied entry would keep far more than ``density`` (mergekit, like this,
    keeps exactly ``k``)."""
    _trim_(tau, threshold)
    if threshold > 0:
        flat = tau.view(-1)
        surplus = int(torch.count_nonzero(flat)) - k
        if surplus > 0:
            tied = (flat.abs() == threshold).nonzero().squeeze(1)
            flat[tied[len(tied) - surplus:]] = 0
    return tau


def _disjoint_merge(task_vector: Callable[[int], Tensor], n_models: int, weights: list[float], like: Tensor, dtype: torch.dtype,
                    normalize: bool = True) -> Tensor:
    """TIES "elect" and "disjoint merge" over task vectors produced on demand by ``task_vector(i)``.

    ``γ = sign(Σ_i w_i τ̂_i)`` per entry (mass-based election); ``a_i = [τ̂_i ≠ 0, sign τ̂_i = γ]``;
    ``τ_m = Σ_i w_i a_i τ̂_i / Σ_i w_i a_i`` (``normalize``) or ``Σ_i w_i a_i τ̂_i`` (not); 0 where no model agrees
    (all τ̂_i zero, or ``Σ_i w_i τ̂_i = 0`` exactly: a tie elects no sign). Two passes recompute the task vectors
    instead of stacking M of them: peak memory is four float buffers plus bool masks, whatever M.
    """
    sign = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for i in range(n_models):
        sign.add_(task_vector(i), alpha=weights[i])
    sign.sign_()
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign) if normalize else None
    for i in range(n_models):
        tau = task_vector(i).mul_(sign).clamp_min_(0)  # |τ̂_i| where it agrees with γ, else 0
        if den is not None:
            den.add_(tau > 0, alpha=weights[i])
        num.add_(tau.mul_(sign), alpha=weights[i])
        del tau
    return num if den is None else num.div_(den.masked_fill_(den == 0, 1))


#: TIES works on chunks of this many entries: the trim thresholds come from counts (or histograms) of the task
#: vectors accumulated chunk by chunk, and trim, sign election and disjoint mean run chunk by chunk, so the scratch
#: memory is a few chunk-sized float32 buffers per model whatever the tensor's size. 2^18 entries (1 MiB a float32
#: buffer, ~8 MiB in use for two models) stay in cache where 2^20 did not: the kernel ran ~1.5x faster on the
#: 168M-parameter benchmark. Every operation is elementwise (torch's vector and scalar paths round alike, add with
#: alpha included: both fused multiply-adds), so the chunk size changes no result.
TIES_CHUNK = 1 << 18
_RADIX_HI, _RADIX_LO = 1 << 15, 1 << 16


def _rank_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin of ``hist`` that holds the ``k``-th largest entry (``k >= 1``), and how many entries lie above it."""
    above = hist.flip(0).cumsum(0).flip(0) - hist
    b = int(torch.nonzero((above < k) & (above + hist >= k))[0])
    return b, int(above[b])


class _TiesScratch:
    """Chunk-sized buffers: the base and one task vector per model in float32, int32 bit patterns, a bool mask."""

    def __init__(self, n_models: int, size: int):
        f32, i32 = torch.float32, torch.int32
        self.base = torch.empty(size, dtype=f32)
        self.taus = [torch.empty(size, dtype=f32) for _ in range(n_models)]
        self.bits = torch.empty(size, dtype=i32)
        self.key = torch.empty(size, dtype=i32)
        self.num = torch.empty(size, dtype=f32)
        self.den = torch.empty(size, dtype=f32)
        self.mask = torch.empty(size, dtype=torch.bool)

    def task_vector(self, i: int, theta: Tensor, base: Tensor, s: int, e: int, base_ready: bool = False) -> Tensor:
        """``θ[s:e] − base[s:e]`` in float32, in model ``i``'s buffer (only same-dtype in-place ops: fast on CPU)."""
        if not base_ready:
            self.base[: e - s].copy_(base[s:e])
        return self.taus[i][: e - s].copy_(theta[s:e]).sub_(self.base[: e - s])

    def abs_bits(self, tau: Tensor) -> Tensor:
        """``|τ|`` as int32 bit patterns, which order like the magnitudes (finite floats, sign bit cleared)."""
        return torch.bitwise_and(tau.view(torch.int32), 0x7FFFFFFF, out=self.bits[: tau.numel()])


#: The trim plan's bracket: this many entries of ``|τ|``, drawn with a fixed seed, bracket the ``k``-th largest.
TIES_SAMPLE = 1 << 14


def _sampled_bracket(theta: Tensor, base: Tensor, k: int) -> tuple[float, float]:
    """``lo <= hi`` that hold the ``k``-th largest ``|τ|``, ``τ = θ − base`` (flat), with near certainty: the
    sample quantiles at rank ``n − k + 1`` ± 6 binomial standard deviations of :data:`TIES_SAMPLE` entries drawn
    with a fixed seed (the caller checks by counting and falls back to an exact selection on a miss).

    The sample is stratified — one entry drawn from each of ``s`` equal runs of ``⌊n/s⌋`` entries — so its indices
    come in memory order without a sort (which cost as much as the rest of the bracket), and its quantiles vary
    no more than those of independent draws: the binomial margin stays conservative."""
    n = theta.numel()
    s = min(TIES_SAMPLE, max(n, 1024))  # a small tensor: about as many draws as entries
    g = torch.Generator(device=theta.device).manual_seed(0x5EED)
    stride = n // s
    if stride >= 1:
        idx = torch.randint(stride, (s,), generator=g, device=theta.device)
        idx.add_(torch.arange(0, s * stride, stride, device=theta.device))
    else:  # fewer than 1024 entries: independent draws (with replacement), sorted into memory order
        idx = torch.randint(n, (s,), generator=g, device=theta.device).sort().values
    sample = (theta[idx].float() - base[idx].float()).abs_()  # the same float32 arithmetic as the full pass
    p = 1 - k / n
    margin = 6 * math.sqrt(p * (1 - p) / s) + 2 / s
    lo = torch.kthvalue(sample, min(s, max(1, math.floor((p - margin) * s)))).values
    hi = torch.kthvalue(sample, min(s, max(1, math.ceil((p + margin) * s)))).values
    return float(lo), float(hi)


def _below(t: float) -> float:
    """The largest float32 below ``t`` (toward 0): ``|x| > _below(t)`` ⟺ ``|x| >= t`` for float32 ``x``, ``t > 0``."""
    return float(torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(0.0, dtype=torch.float32)))


def _count_above(magnitudes: Tensor, t: float, scratch: Tensor) -> int:
    """``#{j : m_j > t}`` for float32 ``magnitudes >= 0`` (at most 2^24 of them, ``t >= 0``), as
    ``Σ sign(hardshrink(m, t))``: hardshrink zeroes ``m <= t``, sign maps the rest to 1, and a float32 sum of at
    most 2^24 ones is exact. Float ops only, in ``scratch`` (same size): on CPU a comparison into a bool mask and
    its ``count_nonzero`` cost about twice as much."""
    return int(torch.hardshrink(magnitudes, t, out=scratch).sign_().sum())


def _trim_plan(theta: Tensor, base: Tensor, k: int, scratch: _TiesScratch, i: int) -> tuple[float, int]:
    """``(t, p)``: keeping ``|τ| >= t`` in ``τ[:p]`` and ``|τ| > t`` in ``τ[p:]`` keeps exactly the ``k`` largest
    ``|τ|``, ``τ = θ − base`` (flat), entries tied with ``t`` the first ones in memory order; ``t = 0``: keep all.

    One pass over the chunks: a sampled bracket ``[lo, hi]`` (:func:`_sampled_bracket`) holds the ``k``-th largest
    ``|τ|``; the pass counts the entries above ``hi`` and gathers those inside the bracket (only counts them when
    ``lo = hi``: bf16 task vectors take few distinct values, and the threshold is often one of them, tied with a
    sixth of the entries), and the threshold is selected among them. Exact: when the counts show that the bracket
    missed, :func:`_radix_trim_plan` selects from the whole tensor. Same result as :func:`magnitude_threshold` +
    :func:`_trim_to_count_`.
    """
    n = theta.numel()
    if k >= n:
        return 0.0, n
    lo, hi = _sampled_bracket(theta, base, k)
    below_hi = _below(hi)
    bounds = [(s, min(s + TIES_CHUNK, n)) for s in range(0, n, TIES_CHUNK)]
    above, inside = 0, []  # entries > hi; per chunk, those in [lo, hi] (their count when lo = hi)
    for s, e in bounds:
        mag = torch.abs(scratch.task_vector(i, theta, base, s, e), out=scratch.num[: e - s])
        n_above = _count_above(mag, hi, scratch.den[: e - s])
        above += n_above
        if lo == hi:  # |τ| >= hi ⟺ |τ| > below(hi); every entry when hi = 0
            inside.append((e - s if hi == 0 else _count_above(mag, below_hi, scratch.den[: e - s])) - n_above)
        else:
            mask = scratch.mask[: e - s]
            inside.append(mag[torch.ge(mag, lo, out=mask).logical_and_(mag <= hi)])
    r = k - above  # the k-th largest is the r-th largest inside the bracket, if it is there
    if lo == hi:
        if not 1 <= r <= sum(inside):
            return _radix_trim_plan(theta, base, k, scratch, i)
        t, tied_per_chunk = hi, torch.tensor(inside)
    else:
        values = torch.cat(inside)
        if not 1 <= r <= values.numel():
            return _radix_trim_plan(theta, base, k, scratch, i)
        t = float(torch.kthvalue(values, values.numel() - r + 1).values)
        r -= int((values > t).count_nonzero())  # how many entries equal to t are kept (>= 1)
        tied_per_chunk = torch.tensor([int((v == t).count_nonzero()) for v in inside])
    return _tie_cut(theta, base, t, r, tied_per_chunk, bounds, scratch, i)


_TIE_PIECE = 1 << 14


def _tie_cut(theta: Tensor, base: Tensor, t: float, r: int, tied_per_chunk: Tensor, bounds: list[tuple[int, int]],
             scratch: _TiesScratch, i: int) -> tuple[float, int]:
    """The plan that keeps the first ``r`` entries with ``|τ| = t`` (memory order), from their count per chunk: the
    position after the ``r``-th one (found in the one chunk that holds it), or ``n`` when all are kept."""
    n = theta.numel()
    if t == 0:  # the k-th largest magnitude is 0: nothing to trim
        return 0.0, n
    tied = tied_per_chunk.cumsum(0)
    if r >= int(tied[-1]):
        return t, n
    if r == 0:
        return t, 0
    j = int(torch.searchsorted(tied, r))  # the first chunk whose running count reaches r
    before = int(tied[j - 1]) if j > 0 else 0
    s, e = bounds[j]
    bits = scratch.abs_bits(scratch.task_vector(i, theta, base, s, e))
    v = int(torch.tensor(t, dtype=torch.float32).view(torch.int32))
    tied_here = torch.eq(bits, v, out=scratch.mask[: e - s])
    # the r-th tied entry: count per piece of _TIE_PIECE entries, then list the tied entries of one piece only
    m = (e - s) // _TIE_PIECE * _TIE_PIECE
    counts = torch.cat([tied_here[:m].view(-1, _TIE_PIECE).sum(1), tied_here[m:].sum().reshape(1)]).cumsum(0)
    q = int(torch.searchsorted(counts, r - before))
    start = q * _TIE_PIECE
    prior = before + (int(counts[q - 1]) if q > 0 else 0)
    idx = tied_here[start : start + _TIE_PIECE].nonzero().squeeze(1)
    return t, s + start + int(idx[r - prior - 1]) + 1


def _radix_trim_plan(theta: Tensor, base: Tensor, k: int, scratch: _TiesScratch, i: int) -> tuple[float, int]:
    """:func:`_trim_plan` by exact radix selection on the float bits (non-negative finite float32 values order like
    their int32 bit patterns), in two histogram passes — the 15 high bits, then the 16 low bits within the bin
    that holds the ``k``-th largest — with no sort, no ``kthvalue`` copy and no int64 index array. Slower than the
    bracket (``bincount`` costs ~20 elementwise operations): the fallback when the bracket misses."""
    n = theta.numel()
    if k >= n:
        return 0.0, n
    bounds = [(s, min(s + TIES_CHUNK, n)) for s in range(0, n, TIES_CHUNK)]
    hist = torch.zeros(_RADIX_HI, dtype=torch.int64)
    for s, e in bounds:
        bits = scratch.abs_bits(scratch.task_vector(i, theta, base, s, e))
        hist += torch.bincount(torch.bitwise_right_shift(bits, 16, out=scratch.key[: e - s]), minlength=_RADIX_HI)
    b, above = _rank_bin(hist, k)
    per_chunk = torch.empty(len(bounds), _RADIX_LO, dtype=torch.int64)
    for j, (s, e) in enumerate(bounds):
        bits = scratch.abs_bits(scratch.task_vector(i, theta, base, s, e))
        key = torch.sub(bits, b << 16, out=scratch.key[: e - s]).clamp_(-1, _RADIX_LO).add_(1)  # bin b → 1.._RADIX_LO
        per_chunk[j] = torch.bincount(key, minlength=_RADIX_LO + 2)[1 : _RADIX_LO + 1]
    c, above_c = _rank_bin(per_chunk.sum(0), k - above)
    t = float(torch.tensor((b << 16) | c, dtype=torch.int32).view(torch.float32))
    return _tie_cut(theta, base, t, k - above - above_c, per_chunk[:, c], bounds, scratch, i)


def _apply_trim_(tau: Tensor, t: float, p: int, s: int) -> Tensor:
    """Trim the chunk ``tau = τ[s : s + len]`` in place by the plan ``(t, p)`` (``hardshrink`` keeps ``|x| > λ``)."""
    if t <= 0:
        return tau
    m = tau.numel()
    cut = min(max(p - s, 0), m)
    if cut > 0:  # |x| > nextafter(t, 0) ⟺ |x| >= t in float32
        below = _below(t)
        torch.hardshrink(tau[:cut], below, out=tau[:cut])
    if cut < m:
        torch.hardshrink(tau[cut:], t, out=tau[cut:])
    return tau


def _ties_chunked(tensors: Sequence[Tensor], base: Tensor, w: list[float], lam: float, ks: list[int] | None,
                  thresholds: Sequence[float] | None, normalize: bool, out_dtype: torch.dtype) -> Tensor:
    """TIES in float32 on CPU, chunk by chunk: one trim plan per model (``thresholds``: keep ``|τ| >= t_i``, ties
    included; else exactly ``ks[i]``), then trim, elect and disjoint mean in one pass over the chunks, each chunk
    rounded once to ``out_dtype``. Bit-identical to the generic path (:func:`_disjoint_merge` over
    :func:`_trim_to_count_`), which ``tests/test_merge_methods.py`` checks against a slow reference."""
    flat = [t.reshape(-1) for t in tensors]
    base_flat = base.reshape(-1)
    n = base_flat.numel()
    scratch = _TiesScratch(len(flat), max(1, min(n, TIES_CHUNK)))
    if thresholds is not None:
        plans = [(float(t), n) for t in thresholds]
    else:
        plans = [_trim_plan(x, base_flat, k, scratch, i) for i, (x, k) in enumerate(zip(flat, ks))]
    out = torch.empty(n, dtype=out_dtype, device=base.device)
    wmin = min((x for x in w if x > 0), default=1.0)
    for s in range(0, n, TIES_CHUNK):
        e = min(s + TIES_CHUNK, n)
        m = e - s
        scratch.base[:m].copy_(base_flat[s:e])
        taus = [_apply_trim_(scratch.task_vector(i, x, base_flat, s, e, base_ready=True), *plans[i], s) for i, x in enumerate(flat)]
        sign = scratch.key[:m].view(torch.float32)  # the int32 scratch, reused
        if w[0] == 1 and len(taus) > 1:  # 1 · τ_0 = τ_0 exactly: the first sum w_1 τ_1 + τ_0 without a product pass
            torch.add(taus[0], taus[1], alpha=w[1], out=sign)
        else:
            torch.mul(taus[0], w[0], out=sign)
        for i in range(2 if w[0] == 1 and len(taus) > 1 else 1, len(taus)):
            sign.add_(taus[i], alpha=w[i])
        sign.sign_()
        num, den = scratch.num[:m].zero_(), scratch.den[:m]
        for i, tau in enumerate(taus):
            tau.mul_(sign).clamp_min_(0)  # |τ̂_i| where it agrees with γ, else 0 (or −0)
            num.add_(tau, alpha=w[i])
            if normalize and i == 0:  # w_0 sign(τ̂_0) = 0 + w_0 sign(τ̂_0) but for the sign of zeros, which the clamp erases
                torch.sign(tau, out=den)
                if w[0] != 1:
                    den.mul_(w[0])
            elif normalize:
                den.add_(tau.sign_(), alpha=w[i])
        num.mul_(sign)
        if normalize:  # den = 0 only where num = 0 (no model agrees); elsewhere den >= the smallest positive weight
            den.clamp_min_(wmin)
        if normalize and lam == 1:  # base + 1 · num / den in one pass, rounded as num.div_(den).add_(base) (1 · num is exact)
            torch.addcdiv(scratch.base[:m], num, den, out=num)
        else:
            if normalize:
                num.div_(den)
            if lam != 1:  # x · 1 = x exactly: skip the pass
                num.mul_(lam)
            num.add_(scratch.base[:m])
        out[s:e].copy_(num)
    return out.view(base.shape)


# ------------------------------------------------------------------------------------- output dtype, per-model


#: Elementwise methods run chunk by chunk (:func:`_chunked`): a float32 accumulator of this many entries stays in
#: cache, where whole-tensor float32 temporaries cost fresh pages (several times slower) and peak memory.
ELEMENTWISE_CHUNK = 1 << 20


def _chunked(fn: Callable[[list[Tensor], Tensor], Tensor], inputs: Sequence[Tensor], dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """``fn(chunks, acc)`` over the flattened ``inputs`` (one shape) chunk by chunk: ``acc`` is a zeroed ``dtype``
    buffer of the chunk's size, ``fn`` returns the chunk's result (in ``dtype``), rounded once to ``out_dtype``.
    For elementwise methods only: each entry goes through the same operations as on the whole tensor."""
    flat = [x.reshape(-1) for x in inputs]
    n = flat[0].numel()
    out = torch.empty(n, dtype=out_dtype, device=flat[0].device)
    acc = torch.empty(min(n, ELEMENTWISE_CHUNK), dtype=dtype, device=flat[0].device)
    for s in range(0, n, ELEMENTWISE_CHUNK):
        e = min(s + ELEMENTWISE_CHUNK, n)
        out[s:e].copy_(fn([x[s:e] for x in flat], acc[: e - s].zero_()))
    return out.view(inputs[0].shape)


def _out(x: Tensor, tensors: Sequence[Tensor], out_dtype: torch.dtype | None) -> Tensor:
    """The single rounding of a result computed in float32/float64: to ``out_dtype`` (default ``tensors[0]``'s)."""
    return x.to(out_dtype or tensors[0].dtype)


def _broadcast(method: str, key: str, value: Any, n: int) -> list:
    """A per-model parameter as one value per model: a scalar repeated, or a list of exactly ``n`` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SymmergeError(f"{method}: got {len(value)} values of {key} for {n} models")
        return list(value)
    return [value] * n


# ------------------------------------------------------------------------- generalized task arithmetic (GTA)

#: A norm below this (before or after sparsifying) skips the norm-matching rescale, as mergekit does.
RESCALE_EPS = 1e-7
#: ``normalize`` without sign consensus divides by ``Σ w_i``, or by 1 when ``|Σ w_i|`` is below this (mergekit).
WEIGHT_SUM_EPS = 1e-8


def dare_seed(seed: int, name: str | None, model_index: int) -> int:
    """The generator seed of a random mask (DARE, DELLA) for one model's tensor: a stable hash of
    ``(seed, name, model_index)``.

    Stable across runs and processes (not Python's salted ``hash``), so every tensor and every model draws its own
    mask and a merge is reproducible. Masks depend on the device's generator (CPU and CUDA draw differently).
    """
    digest = hashlib.blake2b(f"{seed}\x00{name or ''}\x00{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _norm64(x: Tensor, kind: str) -> float:
    """``‖x‖_1``, ``‖x‖_2`` or ``‖x‖_∞`` of a float tensor, accumulated in float64 (chunked: no full float64 copy)."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    if kind == "linf":
        return float(flat.abs().max())
    if kind == "l2":
        return math.sqrt(_dot64(flat, flat))
    return sum(float(flat[i : i + _DOT_CHUNK].double().abs().sum()) for i in range(0, flat.numel(), _DOT_CHUNK))


def _rescale_factor(before: float, after: float) -> float:
    """mergekit's ``rescaled_masked_tensor``: match the norm before sparsifying, unless either norm is ~0."""
    return 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after


def dare_task_vector(theta: Tensor, base: Tensor, density: float, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                     rescale: str | None = "density") -> Tensor:
    """DARE's drop-and-rescale (Yu et al. 2023, "Language models are Super Mario") of ``τ = θ − base``.

    ``τ̃ = m ⊙ τ · s`` with ``m_j ~ Bernoulli(density)`` i.i.d. (each entry dropped with probability
    ``1 − density``). ``rescale``: ``"density"`` (the paper: ``s = 1/density``, so ``E[τ̃] = τ``), ``"l1"`` /
    ``"l2"`` / ``"linf"`` (mergekit's ``rescale: true``, ``l1``: ``s = ‖τ‖ / ‖m ⊙ τ‖``, 1 if either is < 1e-7), or
    ``None`` (no rescale). ``theta``, ``base``: one shape; the mask is drawn from ``generator`` (on the tensor's
    device). Returns a fresh ``dtype`` tensor.
    """
    tau = _task_vector(theta, base, dtype)
    if density < 1:
        before = _norm64(tau, rescale) if rescale not in (None, "density") else 0.0
        drop = torch.empty(tau.shape, dtype=torch.bool, device=tau.device).bernoulli_(1 - density, generator=generator)
        tau.masked_fill_(drop, 0)
        if rescale == "density":
            tau.div_(density)
        elif rescale is not None:
            factor = _rescale_factor(before, _norm64(tau, rescale))
            if factor != 1.0:
                tau.mul_(factor)
    return tau


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities (Deep et al. 2024, "DELLA-Merging"), as mergekit computes them.

    Along dim 1 (a 1-D tensor is one row), entries are ranked by magnitude, ``r = 1 … n`` (ties by position), and
    ``p = (density − ε) + 2ε (r − 1)/(n − 1)``: from ``density − ε`` for the smallest magnitude to ``density + ε``
    for the largest, mean ``density``. A row of one entry gets ``p = density`` (mergekit divides 0 by 0 there).
    Returns float32 (float64 for a float64 ``tau``) probabilities of ``tau``'s shape.
    """
    shape = tau.shape
    x = tau.reshape(1, -1) if tau.ndim < 2 else tau
    n = x.shape[1]
    order = torch.argsort(x.abs(), dim=1, stable=True)
    # the inverse permutation by a scatter (O(n)), not a second argsort: ranks[order[j]] = j
    positions = torch.arange(n, dtype=tau.dtype if tau.dtype == torch.float64 else torch.float32, device=tau.device)
    ranks = torch.empty(order.shape, dtype=positions.dtype, device=tau.device).scatter_(1, order, positions.expand_as(order))
    del order
    rank_norm = ranks.div_(n - 1).clamp_(0, 1) if n > 1 else ranks.fill_(0.5)
    return rank_norm.mul_(2 * epsilon).add_(density - epsilon).reshape(shape)


def _outlier_keep(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2023): drop the ``⌊γ n⌋`` largest magnitudes (outliers) and the
    smallest, keep ``⌊density · n⌋`` in between — mergekit's ``magnitude_outliers`` (if ``density + γ > 1`` fewer
    outliers are dropped). Entries ordered by ``|τ|`` with ties by position (a stable sort): the kept entries are
    those of stable ascending rank in ``[bottom, bottom + target)``, found by two exact selections instead of a
    sort (no int64 index array of the whole tensor; :func:`_smallest`)."""
    n = tau.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mag = tau.reshape(-1).abs()
    keep = _smallest(mag, bottom + target)
    if bottom > 0:
        keep &= ~_smallest(mag, bottom)
    return keep.view(tau.shape)


def _smallest(values: Tensor, m: int) -> Tensor:
    """Bool mask of the ``m`` smallest entries of ``values`` (flat) in stable ascending order: all entries below
    the ``m``-th smallest value ``v`` (exact, :func:`kth_largest`), and of those equal to ``v`` the first in memory
    order — the first ``m`` indices of ``torch.sort(values, stable=True)``."""
    n = values.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    v = kth_largest(values, n - m + 1)
    mask = values < v
    tied = (values == v).nonzero().squeeze(1)
    mask[tied[: m - int(mask.count_nonzero())]] = True
    return mask


class _Sparsified:
    """Model ``i``'s sparsified task vector ``τ̂_i``, recomputed on demand (TIES-style merges read each twice).

    The first call computes the keep mask and rescale factor (the costly part: a selection, a sort or random draws)
    and caches them — a bool mask and a scalar (or, for DELLA's ``density`` rescale, the keep probabilities);
    later calls rebuild ``τ̂_i = (θ_i − base) ⊙ mask · s`` from the inputs.
    """

    def __init__(self, method: str, kind: str | None, tensors: Sequence[Tensor], base: Tensor, dtype: torch.dtype, name: str | None, p: Mapping[str, Any],
                 thresholds: Sequence[float] | None = None):
        m = len(tensors)
        self.tensors, self.base, self.dtype, self.kind, self.name = tensors, base, dtype, kind, name
        self.density = [float(x) for x in _broadcast(method, "density", p.get("density", 1.0), m)]
        self.gamma = [float(x) for x in _broadcast(method, "gamma", p.get("gamma", 0.0), m)]
        self.epsilon = [float(x) for x in _broadcast(method, "epsilon", p.get("epsilon", 0.0), m)]
        self.rescale = p.get("rescale_norm", "l1") if p.get("rescale", False) else None
        self.seed = p.get("seed", 0)
        self.thresholds = thresholds
        self.cache: list[tuple[Tensor | None, float | Tensor] | None] = [None] * m  # (keep mask, multiplier or divisor)

    def _first(self, i: int) -> Tensor:
        tau = _task_vector(self.tensors[i], self.base, self.dtype)
        d, kind = self.density[i], self.kind
        if kind is None or (d >= 1 and not (kind == "magnitude" and self.thresholds is not None)):
            self.cache[i] = (None, 1.0)
            return tau
        before = _norm64(tau, self.rescale) if self.rescale not in (None, "density") else 0.0
        scale: float | Tensor = 1.0
        if kind == "magnitude":
            if self.thresholds is not None:  # whole-model trim: one threshold for the model, ties kept
                _trim_(tau, float(self.thresholds[i]))
            else:
                _trim_to_count_(tau, magnitude_threshold(tau.abs(), d), keep_count(d, tau.numel()))
            keep = tau != 0
            scale = 1 / d
        elif kind == "random":
            g = torch.Generator(device=tau.device).manual_seed(dare_seed(self.seed, self.name, i))
            keep = torch.empty(tau.shape, dtype=torch.bool, device=tau.device).bernoulli_(1 - d, generator=g).logical_not_()  # = dare_task_vector's
            scale = 1 / d
        elif kind == "magnitude_outliers":
            keep = _outlier_keep(tau, d, self.gamma[i])
            scale = 1 / d
        else:  # della_magprune
            probs = della_keep_probabilities(tau, d, self.epsilon[i])
            g = torch.Generator(device=tau.device).manual_seed(dare_seed(self.seed, self.name, i))
            keep = torch.bernoulli(probs, generator=g).bool()
            scale = probs
        tau.masked_fill_(~keep, 0)
        if self.rescale == "density":  # a float multiplies (1/density); DELLA's probabilities divide
            tau.mul_(scale) if isinstance(scale, float) else tau.div_(scale)
        elif self.rescale is not None:
            scale = _rescale_factor(before, _norm64(tau, self.rescale))
            if scale != 1.0:
                tau.mul_(scale)
        else:
            scale = 1.0
        self.cache[i] = (keep, scale)
        return tau

    def __call__(self, i: int) -> Tensor:
        if self.cache[i] is None:
            return self._first(i)
        keep, scale = self.cache[i]  # the same operations as the first call: bit-identical
        tau = _task_vector(self.tensors[i], self.base, self.dtype)
        if keep is not None:
            tau.masked_fill_(~keep, 0)
        if isinstance(scale, Tensor):
            tau.div_(scale)
        elif scale != 1.0:
            tau.mul_(scale)
        return tau


_DOT_CHUNK = 1 << 22


def _gta(method: str, tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float] | None, name: str | None,
         p: Mapping[str, Any], *, sparsify: str | None, consensus: bool, out_dtype: torch.dtype | None,
         thresholds: Sequence[float] | None = None) -> Tensor:
    """Generalized task arithmetic, mergekit's family: ``θ = base + λ · τ_m``, ``τ_i = θ_i − base``.

    1. Sparsify each ``τ_i`` (``sparsify``: ``None``, ``"magnitude"`` TIES, ``"random"`` DARE,
       ``"magnitude_outliers"`` Breadcrumbs, ``"della_magprune"`` DELLA; then the optional ``rescale``) → ``τ̂_i``.
    2. Combine: with ``consensus`` (TIES' sign election, :func:`_disjoint_merge`) ``τ_m = Σ_i w_i a_i τ̂_i``, divided
       by ``Σ_i w_i a_i`` when ``normalize``; without, ``τ_m = Σ_i w_i τ̂_i``, divided by ``Σ_i w_i`` (or by 1
       when ``|Σ_i w_i| < 1e-8``) when ``normalize``.
    """
    _check_inputs(method, tensors, name, base=base, needs_base=True)
    w = _weights(method, weights, len(tensors), nonnegative=consensus)
    dtype = _compute_dtype(*tensors, base)
    lam, normalize = p["lambda_"], p["normalize"]
    rescale = p.get("rescale", False)
    if consensus and sparsify == "magnitude" and not rescale and dtype == torch.float32 and base.device.type == "cpu":
        ks = None if thresholds is not None else [keep_count(float(d), base.numel()) for d in _broadcast(method, "density", p["density"], len(tensors))]
        return _ties_chunked(tensors, base, w, lam, ks, thresholds, normalize, out_dtype or tensors[0].dtype)
    if sparsify is None and not consensus:  # task arithmetic: elementwise, so chunk by chunk (the same operations)
        total = sum(w)

        def task_sum(chunks: list[Tensor], acc: Tensor) -> Tensor:
            *thetas, b = chunks
            for theta, wi in zip(thetas, w):
                acc.add_(_task_vector(theta, b, dtype), alpha=wi)
            if normalize and abs(total) >= WEIGHT_SUM_EPS:
                acc.div_(total)
            return acc.mul_(lam).add_(b)

        return _chunked(task_sum, [*tensors, base], dtype, out_dtype or tensors[0].dtype)
    task_vector = _Sparsified(method, sparsify, tensors, base, dtype, name, p, thresholds)
    if consensus:
        merged = _disjoint_merge(task_vector, len(tensors), w, base, dtype, normalize)
    else:
        merged = torch.zeros(base.shape, dtype=dtype, device=base.device)
        for i, wi in enumerate(w):
            merged.add_(task_vector(i), alpha=wi)
        total = sum(w)
        if normalize and abs(total) >= WEIGHT_SUM_EPS:
            merged.div_(total)
    return _out(merged.mul_(lam).add_(base), tensors, out_dtype)


_DENSITY = Float(1.0, 0, 1, lo_open=True, per_model=True, help="fraction of each task vector kept (1: no sparsification)")
_LAMBDA = Float(1.0, help="scale of the merged task vector")
_SEED = Int(0, 0, help="seed of the random masks (combined with the tensor name and model index)")
# mergekit's int8_mask stores TIES' sign mask as int8 to save memory; the mask's values are the same either way
INT8_MASK_NOTE = "a mergekit memory option; {method} computes in float32 here, so it changes nothing"
_INT8 = Bool(False, help="accepted for mergekit recipes; no effect (symmerge's masks are bool)", no_effect=INT8_MASK_NOTE)
_RESCALE_NORM = Choice(
    "l1", ("l1", "l2", "linf", "density"),
    help="with rescale: match the task vector's l1/l2/linf norm before sparsifying (mergekit: l1), or divide each kept "
         "entry by its keep probability (density: the DARE / DELLA papers)",
)


def _normalize(default: bool) -> dict:
    return Bool(default, help="divide the merged task vector by the sum of the (agreeing) models' weights")


def _rescale(default: bool) -> dict:
    return Bool(default, help="rescale each sparsified task vector (see rescale_norm)")


_GAMMA = Float(0.01, 0, 1, per_model=True, help="fraction of the largest magnitudes removed as outliers")
_EPSILON = Float(0.15, 0, 1, hi_open=True, per_model=True, help="keep probabilities span density ± epsilon, by magnitude rank")


def _check_della(method: str, p: Mapping[str, Any]) -> None:
    """DELLA's probabilities ``density ± epsilon`` must lie in (0, 1) wherever ``density < 1`` (as in mergekit)."""
    ds, es = p["density"], p["epsilon"]
    n = max(len(x) for x in (ds, es) if isinstance(x, list)) if isinstance(ds, list) or isinstance(es, list) else 1
    for i, (d, e) in enumerate(zip(_broadcast(method, "density", ds, n), _broadcast(method, "epsilon", es, n))):
        if d < 1 and not (0 < d - e and d + e < 1):
            where = f" (model {i})" if n > 1 else ""
            raise SymmergeError(f"{method}: density ± epsilon must lie in (0, 1){where}, got density={_num(d)}, epsilon={_num(e)}")


# mergekit declares density and rescale for every generalized-task-arithmetic method; task_arithmetic has no
# sparsification step, so there they change nothing (mergekit's merge_group only reads them inside `sparsify`)
_NO_SPARSIFY = "{method} does not sparsify task vectors (nor does mergekit's), so it changes nothing"


@merge_method(
    "task_arithmetic",
    params={"normalize": _normalize(False), "lambda": Float(1.0, help="scale of the summed task vectors"),
            "density": Float(1.0, per_model=True, help="accepted for mergekit recipes; no effect", no_effect=_NO_SPARSIFY),
            "rescale": Bool(False, help="accepted for mergekit recipes; no effect", no_effect=_NO_SPARSIFY),
            "int8_mask": _INT8},
    needs_base=True,
    description="base + λ Σ w_i (θ_i − base)",
)
def task_arithmetic(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    density: float | Sequence[float] = 1.0,
    rescale: bool = False,
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"): ``θ = base + λ Σ_i w_i τ_i``.

    ``τ_i = θ_i − base``; ``tensors``: M tensors and ``base`` of one shape; ``weights`` default all 1 (negative
    weights negate a task). ``normalize``: divide the sum by ``Σ_i w_i`` (mergekit's parameter, default off).
    ``density``, ``rescale`` and ``int8_mask`` are mergekit's parameters of every task-vector method; without a
    sparsification step they change nothing, here as in mergekit.
    """
    p = _params("task_arithmetic", normalize=normalize, lambda_=lambda_, density=density, rescale=rescale, int8_mask=int8_mask)
    return _gta("task_arithmetic", tensors, base, weights, name, p, sparsify=None, consensus=False, out_dtype=out_dtype)


def _ties_prepare(params: Mapping[str, Any], task_vectors: Callable[[], Iterable[Sequence[Tensor]]], statistics: Any) -> dict:
    """Whole-model trimming (``trim="model"``, the paper's): one magnitude threshold per model over all its tensors."""
    if params.get("trim") != "model":
        return {}
    return {"thresholds": global_magnitude_thresholds(task_vectors(), params["density"])}


@merge_method(
    "ties",
    prepare=_ties_prepare,
    workers=2,  # chunked kernel, small scratch: merge_speed 7.96 -> 5.41 s, peak RSS 1.30 -> 1.33 GB (mergekit 29.5 s, 1.92 GB)
    params={
        "density": _DENSITY,
        "lambda": _LAMBDA,
        "trim": Choice("tensor", ("tensor", "model"), help="keep the top density of each tensor, or of the whole model (the paper)"),
        "normalize": _normalize(True),
        "rescale": _rescale(False),
        "rescale_norm": _RESCALE_NORM,
        "int8_mask": _INT8,
    },
    needs_base=True,
    description="TIES: trim task vectors to top-density, elect signs, disjoint mean",
)
def ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float | Sequence[float] = 1.0,
    lambda_: float = 1.0,
    trim: str = "tensor",
    normalize: bool = True,
    rescale: bool = False,
    rescale_norm: str = "l1",
    int8_mask: bool = False,
    thresholds: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models"), per tensor.

    ``tensors``: M tensors and ``base`` of one shape; ``weights``: M non-negative floats (default all 1).

    1. Trim: ``τ̂_i = τ_i · [|τ_i| >= t_i]``, ``τ_i = θ_i − base``. By default ``t_i`` is this tensor's
       :func:`magnitude_threshold` and exactly ``keep_count(density_i, n) = ⌊density_i · n⌋`` entries are kept
       (ties at the threshold broken by position; mergekit's ``argsort`` leaves that order unspecified).
       ``density``: one value or one per model. For the paper's whole-model trimming (``trim="model"``), pass
       ``thresholds=[t_1, ..., t_M]`` from :func:`global_magnitude_thresholds` (the merge engine computes them).
       ``rescale``: scale ``τ̂_i`` to ``τ_i``'s norm (``rescale_norm``).
    2. Elect: ``γ = sign(Σ_i w_i τ̂_i)`` per entry (total mass; a tie ``Σ = 0`` elects nothing — the original code
       resolves such ties to the tensor's majority sign, mergekit to +).
    3. Disjoint mean: ``τ_m = Σ_i w_i a_i τ̂_i / Σ_i w_i a_i`` with ``a_i = [τ̂_i ≠ 0 and sign τ̂_i = γ]``
       (the paper's unweighted mean for equal weights); 0 where no model agrees. ``normalize=False``: the sum.

    Returns ``base + λ τ_m``. On CPU in float32 without ``rescale`` it runs the chunked radix-select kernel
    (:func:`_ties_chunked`, bit-identical, faster and lighter).
    """
    p = _params("ties", density=density, lambda_=lambda_, trim=trim, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm,
                int8_mask=int8_mask)
    _check_inputs("ties", tensors, name, base=base, needs_base=True)
    if p["trim"] == "model" and thresholds is None:
        raise SymmergeError("ties: trim=model needs whole-model thresholds (see global_magnitude_thresholds)")
    if thresholds is not None and len(thresholds) != len(tensors):
        raise SymmergeError(f"ties: got {len(thresholds)} thresholds for {len(tensors)} models")
    return _gta("ties", tensors, base, weights, name, p, sparsify="magnitude", consensus=True, out_dtype=out_dtype, thresholds=thresholds)


_DARE_DOC = """``τ̂_i``: each entry of ``τ_i = θ_i − base`` kept with probability ``density_i`` (DARE's drop), then, with
    ``rescale`` (default on), scaled to ``τ_i``'s l1 norm (mergekit; ``rescale_norm="density"``: by ``1/density``,
    the paper's unbiased rescale). Model ``i``'s mask comes from a ``torch.Generator`` seeded with
    :func:`dare_seed` ``(seed, name, i)``: pass the tensor's ``name`` so that different tensors get different masks.
    ``density``: one value or one per model (default 1: nothing dropped, as in mergekit)."""


@merge_method(
    "dare_linear",
    params={"density": _DENSITY, "lambda": _LAMBDA, "seed": _SEED, "normalize": _normalize(False), "rescale": _rescale(True),
            "rescale_norm": _RESCALE_NORM, "int8_mask": _INT8},
    needs_base=True,
    description="DARE: drop task-vector entries at random, rescale, then task arithmetic",
)
def dare_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float | Sequence[float] = 1.0,
    lambda_: float = 1.0,
    seed: int = 0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_norm: str = "l1",
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DARE then task arithmetic (Yu et al. 2023, "Language models are Super Mario"): ``θ = base + λ Σ_i w_i τ̂_i``
    (divided by ``Σ_i w_i`` with ``normalize``).

    """
    p = _params("dare_linear", density=density, lambda_=lambda_, seed=seed, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm,
                int8_mask=int8_mask)
    return _gta("dare_linear", tensors, base, weights, name, p, sparsify="random", consensus=False, out_dtype=out_dtype)


@merge_method(
    "dare_ties",
    params={"density": _DENSITY, "lambda": _LAMBDA, "seed": _SEED, "normalize": _normalize(False), "rescale": _rescale(True),
            "rescale_norm": _RESCALE_NORM, "int8_mask": _INT8},
    needs_base=True,
    description="DARE drop-and-rescale, then TIES sign election; summed (normalize: false, mergekit's default)",
)
def dare_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float | Sequence[float] = 1.0,
    lambda_: float = 1.0,
    seed: int = 0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_norm: str = "l1",
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DARE then TIES (Yu et al. 2023; Yadav et al. 2023): ``θ = base + λ τ_m``.

    ``γ = sign(Σ_i w_i τ̂_i)``, ``a_i = [τ̂_i ≠ 0, sign τ̂_i = γ]`` and ``τ_m = Σ_i w_i a_i τ̂_i`` — summed, not
    averaged, by default (mergekit's ``normalize: false``); ``normalize=True`` divides by ``Σ_i w_i a_i`` as
    :func:`ties` does. ``weights``: M non-negative floats (default all 1).

    """
    p = _params("dare_ties", density=density, lambda_=lambda_, seed=seed, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm,
                int8_mask=int8_mask)
    return _gta("dare_ties", tensors, base, weights, name, p, sparsify="random", consensus=True, out_dtype=out_dtype)


_BREADCRUMBS_DOC = """``τ̂_i``: of ``τ_i = θ_i − base`` (flattened, ordered by magnitude, ties by position) the ``⌊γ_i n⌋``
    largest entries (outliers) and the smallest are dropped, ``⌊density_i · n⌋`` kept — mergekit's
    ``magnitude_outliers``; nothing is dropped when ``density_i = 1`` (the default). ``rescale``: scale ``τ̂_i``
    back to ``τ_i``'s norm. ``density`` and ``gamma``: one value or one per model."""


@merge_method(
    "breadcrumbs",
    params={"density": _DENSITY, "gamma": _GAMMA, "lambda": _LAMBDA, "normalize": _normalize(False), "rescale": _rescale(False),
            "rescale_norm": _RESCALE_NORM, "int8_mask": _INT8},
    needs_base=True,
    description="Model Breadcrumbs: drop the largest (outliers) and smallest task-vector entries, then task arithmetic",
)
def breadcrumbs(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    rescale_norm: str = "l1",
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: scaling multi-task model merging with
    sparse masks"): ``θ = base + λ Σ_i w_i τ̂_i`` (divided by ``Σ_i w_i`` with ``normalize``).

    """
    p = _params("breadcrumbs", density=density, gamma=gamma, lambda_=lambda_, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm,
                int8_mask=int8_mask)
    return _gta("breadcrumbs", tensors, base, weights, name, p, sparsify="magnitude_outliers", consensus=False, out_dtype=out_dtype)


@merge_method(
    "breadcrumbs_ties",
    params={"density": _DENSITY, "gamma": _GAMMA, "lambda": _LAMBDA, "normalize": _normalize(False), "rescale": _rescale(False),
            "rescale_norm": _RESCALE_NORM, "int8_mask": _INT8},
    needs_base=True,
    description="Model Breadcrumbs' outlier-and-small mask, then TIES sign election (summed by default)",
)
def breadcrumbs_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    rescale_norm: str = "l1",
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Model Breadcrumbs with TIES' sign election (mergekit's ``breadcrumbs_ties``): ``θ = base + λ τ_m``,
    ``τ_m = Σ_i w_i a_i τ̂_i`` (divided by ``Σ_i w_i a_i`` with ``normalize``), ``a_i`` as in :func:`ties`.

    """
    p = _params("breadcrumbs_ties", density=density, gamma=gamma, lambda_=lambda_, normalize=normalize, rescale=rescale,
                rescale_norm=rescale_norm, int8_mask=int8_mask)
    return _gta("breadcrumbs_ties", tensors, base, weights, name, p, sparsify="magnitude_outliers", consensus=True, out_dtype=out_dtype)


_DELLA_DOC = """``τ̂_i``: MagPrune — entry ``j`` of ``τ_i = θ_i − base`` kept with probability ``p_j`` from
    :func:`della_keep_probabilities` (``density_i ± epsilon_i`` by magnitude rank along dim 1), drawn from a
    generator seeded with :func:`dare_seed` ``(seed, name, i)``; then, with ``rescale`` (default on), scaled to
    ``τ_i``'s l1 norm (mergekit; ``rescale_norm="density"``: each kept entry divided by its ``p_j``, the paper).
    ``density`` and ``epsilon``: one value or one per model; ``density ± epsilon`` must lie in (0, 1) unless
    ``density = 1`` (the default: nothing dropped)."""


@merge_method(
    "della",
    params={"density": _DENSITY, "epsilon": _EPSILON, "lambda": _LAMBDA, "seed": _SEED, "normalize": _normalize(True),
            "rescale": _rescale(True), "rescale_norm": _RESCALE_NORM, "int8_mask": _INT8},
    needs_base=True,
    check=_check_della,
    description="DELLA: drop task-vector entries with magnitude-ranked probabilities, rescale, TIES election, mean",
)
def della(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float | Sequence[float] = 1.0,
    epsilon: float | Sequence[float] = 0.15,
    lambda_: float = 1.0,
    seed: int = 0,
    normalize: bool = True,
    rescale: bool = True,
    rescale_norm: str = "l1",
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing interference in model merging through
    magnitude-based sampling"): ``θ = base + λ τ_m``, ``τ_m = Σ_i w_i a_i τ̂_i / Σ_i w_i a_i`` (TIES' election;
    the sum with ``normalize=False``).

    """
    p = _params("della", density=density, epsilon=epsilon, lambda_=lambda_, seed=seed, normalize=normalize, rescale=rescale,
                rescale_norm=rescale_norm, int8_mask=int8_mask)
    return _gta("della", tensors, base, weights, name, p, sparsify="della_magprune", consensus=True, out_dtype=out_dtype)


@merge_method(
    "della_linear",
    params={"density": _DENSITY, "epsilon": _EPSILON, "lambda": _LAMBDA, "seed": _SEED, "normalize": _normalize(False),
            "rescale": _rescale(True), "rescale_norm": _RESCALE_NORM, "int8_mask": _INT8},
    needs_base=True,
    check=_check_della,
    description="DELLA's magnitude-ranked random drop and rescale, then task arithmetic",
)
def della_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float | Sequence[float] = 1.0,
    epsilon: float | Sequence[float] = 0.15,
    lambda_: float = 1.0,
    seed: int = 0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_norm: str = "l1",
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DELLA's MagPrune then task arithmetic (mergekit's ``della_linear``): ``θ = base + λ Σ_i w_i τ̂_i`` (divided
    by ``Σ_i w_i`` with ``normalize``).

    """
    p = _params("della_linear", density=density, epsilon=epsilon, lambda_=lambda_, seed=seed, normalize=normalize, rescale=rescale,
                rescale_norm=rescale_norm, int8_mask=int8_mask)
    return _gta("della_linear", tensors, base, weights, name, p, sparsify="della_magprune", consensus=False, out_dtype=out_dtype)


for _fn, _doc in ((dare_linear, _DARE_DOC), (dare_ties, _DARE_DOC), (breadcrumbs, _BREADCRUMBS_DOC), (breadcrumbs_ties, _BREADCRUMBS_DOC),
                  (della, _DELLA_DOC), (della_linear, _DELLA_DOC)):
    _fn.__doc__ = _fn.__doc__.rstrip() + "\n\n    " + _doc + "\n"


# ------------------------------------------------------------------------------------------ averages, SLERPs


@merge_method(
    "linear",
    params={"normalize": Bool(True, help="divide by the sum of the weights")},
    description="weighted average Σ w_i θ_i / Σ w_i (model soup)",
)
def linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Weighted average (Wortsman et al. 2022, "Model soups"): ``θ = Σ_i w_i θ_i / Σ_i w_i``.

    ``tensors``: M tensors of one shape; ``weights``: M floats (default all 1, i.e. the mean). ``normalize=False``
    returns the plain weighted sum ``Σ_i w_i θ_i``. ``base`` is ignored.
    """
    normalize = _params("linear", normalize=normalize)["normalize"]
    _check_inputs("linear", tensors, name)
    w = _weights("linear", weights, len(tensors))
    if normalize and sum(w) == 0:
        raise SymmergeError(f"linear: weights sum to 0, cannot normalize: {w}")
    total = sum(w)

    def average(chunks: list[Tensor], acc: Tensor) -> Tensor:
        for t, wi in zip(chunks, w):
            acc.add_(t, alpha=wi)
        return acc.div_(total) if normalize else acc

    return _chunked(average, tensors, _compute_dtype(*tensors), out_dtype or tensors[0].dtype)


def _dot64(x: Tensor, y: Tensor) -> float:
    """``⟨x, y⟩`` accumulated in float64, in chunks (no full-size float64 copies)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return sum(float(torch.dot(x[i : i + _DOT_CHUNK].double(), y[i : i + _DOT_CHUNK].double())) for i in range(0, x.numel(), _DOT_CHUNK))


#: The spherical kernels (slerp, multislerp, karcher) and model_stock read their inputs in blocks of this many
#: entries — once for the float64 Gram matrix of the models, once for the output — so no whole-tensor float32 or
#: float64 temporary is made (fresh pages for each cost more time than the arithmetic, and peak memory).
GRAM_CHUNK = 1 << 18


def _row_blocks(rows: int, cols: int) -> Iterator[tuple[slice, slice]]:
    """Blocks of at most ``GRAM_CHUNK`` entries of a ``rows × cols`` matrix: whole rows at a time, or pieces of one
    row when a row alone is longer."""
    row_step, col_step = max(1, GRAM_CHUNK // max(cols, 1)), max(1, min(cols, GRAM_CHUNK))
    for r in range(0, rows, row_step):
        for c in range(0, cols, col_step):
            yield slice(r, min(r + row_step, rows)), slice(c, min(c + col_step, cols))


def _vectors_(out: Tensor, tensors: Sequence[Tensor], base: Tensor | None, rs: slice, cs: slice) -> Tensor:
    """Block ``[rs, cs]`` of each model's vector — ``θ_i``, or ``θ_i − base`` formed in ``out``'s dtype as
    :func:`_task_vector` does (so the same bits) — written into ``out`` (``M × block``), which is returned."""
    for i, x in enumerate(tensors):
        out[i].copy_(x[rs, cs])
        if base is not None:
            out[i].sub_(base[rs, cs])
    return out


def _row_gram64(tensors: Sequence[Tensor], base: Tensor | None, dtype: torch.dtype, rows: tuple[int, int]) -> Tensor:
    """Per row of the ``rows`` view, the float64 Gram matrix ``G[r, i, j] = ⟨v_i[r], v_j[r]⟩`` of the vectors
    ``v_i = θ_i`` (or ``θ_i − base``, in ``dtype``), shape ``R × M × M``; one pass over the inputs, block by block."""
    views = [x.reshape(rows) for x in tensors]
    b = None if base is None else base.reshape(rows)
    n_rows, cols = views[0].shape
    m = len(views)
    gram = torch.zeros(n_rows, m, m, dtype=torch.float64, device=views[0].device)
    size = min(views[0].numel(), GRAM_CHUNK)  # the largest block of _row_blocks
    scratch = torch.empty(m, max(size, 1), dtype=dtype, device=views[0].device)
    wide = torch.empty(m, max(size, 1), dtype=torch.float64, device=views[0].device) if dtype != torch.float64 else None
    for rs, cs in _row_blocks(n_rows, cols):
        r, c = rs.stop - rs.start, cs.stop - cs.start
        block = _vectors_(scratch[:, : r * c].view(m, r, c), views, b, rs, cs)
        if wide is not None:
            block = wide[:, : r * c].view(m, r, c).copy_(block)
        by_row = block.transpose(0, 1)  # r × M × c
        gram[rs].add_(torch.bmm(by_row, by_row.transpose(1, 2)))
    return gram


def _gram64(tensors: Sequence[Tensor], base: Tensor | None, dtype: torch.dtype) -> list[list[float]]:
    """The float64 Gram matrix of the flattened vectors ``θ_i`` (or ``θ_i − base``), as nested lists."""
    return _row_gram64(tensors, base, dtype, (1, -1))[0].tolist()


def _combine(tensors: Sequence[Tensor], coefficients: Sequence[float], base: Tensor | None, dtype: torch.dtype,
             out_dtype: torch.dtype) -> Tensor:
    """``Σ_i k_i v_i`` (``+ base`` with one: ``v_i = θ_i − base``), accumulated in ``dtype`` block by block and
    rounded once to ``out_dtype``."""
    inputs = list(tensors) + ([] if base is None else [base])
    scratch = torch.empty(min(inputs[0].numel(), ELEMENTWISE_CHUNK), dtype=dtype, device=inputs[0].device)

    def combine(chunks: list[Tensor], acc: Tensor) -> Tensor:
        for x, k in zip(chunks, coefficients):
            acc.add_(x if base is None else scratch[: x.numel()].copy_(x).sub_(chunks[-1]), alpha=k)
        return acc if base is None else acc.add_(chunks[-1])

    return _chunked(combine, inputs, dtype, out_dtype)


#: SLERP interpolates linearly when ``|cos Ω| > 1 − PARALLEL_TOL`` (mergekit's ``dot_threshold = 0.9995``) or a
#: tensor has norm ≤ ZERO_NORM.
PARALLEL_TOL = 5e-4
ZERO_NORM = 1e-12


def _slerp_pair(method: str, tensors: Sequence[Tensor], base: Tensor | None, name: str | None) -> tuple[Tensor, Tensor]:
    """The two endpoints of a SLERP: ``(base, the other model)`` with a base model, else the two models."""
    _check_inputs(method, tensors, name)
    if base is None:
        if len(tensors) != 2:
            raise SymmergeError(f"{method}: merges exactly 2 models, got {len(tensors)}")
        return tensors[0], tensors[1]
    if len(tensors) != 1:
        raise SymmergeError(f"{method}: with a base model, interpolates from the base to exactly 1 other model, got {len(tensors)} others "
                            "(base_model must be one of the 2 models)")
    if base.shape != tensors[0].shape:
        raise SymmergeError(f"{method}: base has shape {tuple(base.shape)}, model {tuple(tensors[0].shape)}")
    return base, tensors[0]


@merge_method(
    "slerp",
    params={"t": Float(0.5, 0, 1, help="interpolation position: 0 = base_model (or the first model), 1 = the other model")},
    min_models=2,
    max_models=2,
    optional_base=True,
    description="spherical interpolation between two models (t = 0: base_model, or the first model without one)",
)
def slerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    t: float = 0.5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985), per tensor, as mergekit merges models with it.

    Endpoints ``a`` (``t = 0``) and ``b`` (``t = 1``): with ``base``, ``a = base`` and ``b`` the one other model
    (``tensors = [b]``: the engine passes base_model's tensor as ``base`` and the other model as ``tensors``);
    without, ``tensors = [a, b]``. Flattened to vectors: ``cos Ω = ⟨a, b⟩ / (‖a‖ ‖b‖)`` and

        ``θ = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b``

    on the original (un-normalised) tensors. Falls back to ``(1 − t) a + t b`` when ``|cos Ω| > 0.9995``
    (mergekit's threshold) or a norm is ~0. ``weights`` are ignored.
    """
    t = _params("slerp", t=t)["t"]
    a, b = _slerp_pair("slerp", tensors, base, name)
    dtype = _compute_dtype(a, b)
    gram = _gram64([a, b], None, dtype)  # ‖a‖², ⟨a, b⟩, ‖b‖² in one pass
    na, nb = math.sqrt(gram[0][0]), math.sqrt(gram[1][1])
    c0, c1 = 1.0 - t, t
    if min(na, nb) > ZERO_NORM:
        cos = max(-1.0, min(1.0, gram[0][1] / (na * nb)))
        if abs(cos) <= 1 - PARALLEL_TOL:
            omega = math.acos(cos)
            s = math.sin(omega)
            c0, c1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    return _combine([a, b], [c0, c1], None, dtype, out_dtype or tensors[0].dtype)


def _interp_weight(weights: Sequence[float] | None) -> float:
    """nuslerp's ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0, as mergekit)."""
    if weights is None:
        return 0.5
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _slerp_rows(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """SLERP of each vector along the last dim of ``v0``, ``v1`` (mergekit's nuslerp kernel): ``u = v / max(‖v‖,
    1e-7)``, ``cos Ω = ⟨u_0, u_1⟩``, linear where ``1 − cos² Ω <= eps²``, else
    ``(sin((1 − t) Ω) v_0 + sin(t Ω) v_1) / sin Ω``."""
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp_(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(-1, keepdim=True).clamp_(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(omega)
    spherical = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.where(colinear, torch.ones_like(s), s)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


@merge_method(
    "nuslerp",
    params={
        "nuslerp_flatten": Bool(True, help="interpolate the whole tensor as one vector (false: row or column vectors)"),
        "nuslerp_row_wise": Bool(False, help="without flatten: interpolate the vectors along dim 0 (columns) instead of the last dim (rows)"),
    },
    min_models=2,
    max_models=3,
    optional_base=True,
    description="SLERP of two models, t = w_2 / (w_1 + w_2); with base_model, of their task vectors",
)
def nuslerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """mergekit's NuSLERP: spherical interpolation at ``t = w_1 / (w_0 + w_1)`` of two models (default weights:
    ``t = 0.5``), with the SLERP of :func:`_slerp_rows`.

    Exactly two ``tensors`` (besides the base). Without ``base``: ``θ = slerp(t, θ_0, θ_1)``; with ``base``:
    ``θ = base + slerp(t, θ_0 − base, θ_1 − base)`` (the task vectors). ``nuslerp_flatten`` (default): the whole
    tensor is one vector; else each row (last dim) — or, ``nuslerp_row_wise``, each vector along dim 0 — is
    interpolated on its own.
    """
    p = _params("nuslerp", nuslerp_flatten=nuslerp_flatten, nuslerp_row_wise=nuslerp_row_wise)
    _check_inputs("nuslerp", tensors, name, base=base, needs_base=base is not None)
    if len(tensors) != 2:
        raise SymmergeError(f"nuslerp: merges exactly 2 models besides the base, got {len(tensors)}")
    w = _weights("nuslerp", weights, 2)
    dtype = _compute_dtype(*tensors, base)
    v0, v1 = (t.to(dtype, copy=True) if base is None else _task_vector(t, base, dtype) for t in tensors)
    shape = v0.shape
    if p["nuslerp_flatten"]:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif p["nuslerp_row_wise"] and v0.ndim > 1:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    elif v0.ndim == 0:
        v0, v1 = v0.reshape(1), v1.reshape(1)
    out = _slerp_rows(_interp_weight(w), v0, v1)
    if not p["nuslerp_flatten"] and p["nuslerp_row_wise"] and len(shape) > 1:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return _out(out if base is None else out.add_(base), tensors, out_dtype)


@merge_method(
    "multislerp",
    params={
        "normalize_weights": Bool(True, help="divide the weights by their sum"),
        "eps": Float(1e-8, 0, lo_open=True, help="added to norms for numerical stability"),
    },
    optional_base=True,
    description="barycentric SLERP of any number of models on the hypersphere (of task vectors with base_model)",
)
def multislerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Multi-SLERP (Goddard 2025, "multislerp"; mergekit's ``multislerp``): barycentric interpolation on the sphere.

    ``v_i = θ_i`` (or ``θ_i − base`` with ``base``), flattened; ``w_i`` the weights (divided by their sum with
    ``normalize_weights``); ``u_i = v_i / (‖v_i‖ + ε)``. The weighted mean direction ``μ = Σ_i w_i u_i / ‖·‖`` is
    the tangent point; the tangent vectors ``u_i − ⟨u_i, μ⟩ μ`` are averaged, ``τ = Σ_i w_i (u_i − ⟨u_i, μ⟩ μ)``,
    and mapped back, ``r = cos(‖τ‖ + ε) μ + sin(‖τ‖ + ε) τ / (‖τ‖ + ε)``; the result is ``(Σ_i w_i ‖v_i‖) r``
    (``+ base``). (``τ`` vanishes up to rounding — ``Σ_i w_i u_i`` is parallel to ``μ`` — so ``r ≈ μ``: the
    normalised weighted mean of the directions, at the weighted mean norm.) One model: returned as is. If
    ``‖Σ_i w_i u_i‖ < ε`` two models are averaged linearly (``w_0 v_0 + w_1 v_1``); more is an error.
    """
    p = _params("multislerp", normalize_weights=normalize_weights, eps=eps)
    eps = p["eps"]
    _check_inputs("multislerp", tensors, name, base=base, needs_base=base is not None)
    m = len(tensors)
    if m == 1:
        return _out(tensors[0], tensors, out_dtype)
    w = _weights("multislerp", weights, m)
    if p["normalize_weights"]:
        total = sum(w)
        if total == 0:
            raise SymmergeError(f"multislerp: weights sum to 0, cannot normalize: {w}")
        w = [x / total for x in w]
    dtype = _compute_dtype(*tensors, base)
    # Everything lies in the span of the v_i, so the whole computation runs on coefficients over v_1..v_M and
    # their float64 Gram matrix (one pass over the inputs), and the result is formed once, Σ_j k_j v_j (a second
    # pass). The tangent mean τ vanishes in exact arithmetic; on whole float32 vectors it is rounding noise, here
    # ~float64 noise: either way cos(‖τ‖ + ε) = 1 and sin(‖τ‖ + ε)/(‖τ‖ + ε) = 1 in float32.
    gram = _gram64(tensors, base, dtype)
    norms = [math.sqrt(gram[i][i]) for i in range(m)]

    def dot(x: Sequence[float], y: Sequence[float]) -> float:  # ⟨Σ x_i v_i, Σ y_j v_j⟩
        return sum(x[i] * gram[i][j] * y[j] for i in range(m) for j in range(m))

    mean = [w[i] / (norms[i] + eps) for i in range(m)]  # Σ_i w_i u_i
    mean_norm = math.sqrt(max(dot(mean, mean), 0.0))
    if mean_norm < eps:
        if m != 2:
            raise SymmergeError("multislerp: the weighted sum of the directions is zero (antipodal models with balancing weights); "
                                "change the weights")
        return _combine(tensors, w, base, dtype, out_dtype or tensors[0].dtype)
    mu = [c / mean_norm for c in mean]
    d = [sum(gram[i][j] * mu[j] for j in range(m)) / (norms[i] + eps) for i in range(m)]  # ⟨u_i, μ⟩
    # τ = Σ_i w_i (u_i − d_i μ), u_i = v_i / (‖v_i‖ + ε)
    tangent = [w[j] / (norms[j] + eps) - sum(w[i] * d[i] for i in range(m)) * mu[j] for j in range(m)]
    tn = math.sqrt(max(dot(tangent, tangent), 0.0)) + eps
    scale = sum(wi * ni for wi, ni in zip(w, norms))
    # a zero v_j adds nothing (its huge 1/ε coefficient would overflow float32 and make 0 · inf = NaN)
    k = [0.0 if norms[j] == 0 else scale * (math.cos(tn) * mu[j] + math.sin(tn) / tn * tangent[j]) for j in range(m)]
    return _combine(tensors, k, base, dtype, out_dtype or tensors[0].dtype)


@merge_method(
    "karcher",
    params={
        "max_iter": Int(10, 0, help="Riemannian gradient steps at most"),
        "tol": Float(1e-5, 0, lo_open=True, help="stop when the tangent step is shorter; norms below it count as zero"),
    },
    description="Karcher (Riemannian) mean of the models' directions on the sphere, at their mean norm (unweighted, as mergekit's)",
    recipe_weight=False,  # mergekit 0.1.5's karcher takes alphas = 1/M whatever the recipe's weights
)
def karcher(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Karcher mean on the unit sphere (Karcher 1977; mergekit's ``karcher``), per tensor.

    ``α_i = w_i / Σ_j w_j`` (default ``1/M``: mergekit's uniform weights; a recipe's ``weight`` is ignored with a
    note, as mergekit ignores it — only a direct call can weight the mean), ``u_i = θ_i / ‖θ_i‖`` (flattened). Start
    from ``μ = Σ α_i u_i / ‖·‖`` over the models with ``‖θ_i‖ > tol`` (their α renormalised) and iterate at most
    ``max_iter`` times: ``Ω_i = acos⟨μ, u_i⟩``, ``g = Σ_i α_i Ω_i / sin Ω_i (u_i − cos Ω_i μ)`` (terms with
    ``Ω_i < tol`` skipped), stop if ``‖g‖ < tol``, else ``μ ← cos‖g‖ μ + sin‖g‖ g / ‖g‖`` (renormalised). Returns
    ``(Σ_i α_i ‖θ_i‖) μ``. One model: returned as is; all norms ~0: zeros. ``base`` is ignored.
    """
    p = _params("karcher", max_iter=max_iter, tol=tol)
    tol = p["tol"]
    _check_inputs("karcher", tensors, name)
    m = len(tensors)
    if m == 1:
        return _out(tensors[0], tensors, out_dtype)
    w = _weights("karcher", weights, m, nonnegative=True)
    alphas = [x / sum(w) for x in w]
    dtype = _compute_dtype(*tensors)
    # μ stays in the span of the u_i, so the iteration runs on its coefficients over u_1..u_M with the float64 Gram
    # matrix of the u_i (one pass over the inputs), and the result is formed once, Σ_i k_i θ_i (a second pass).
    gram = _gram64(tensors, None, dtype)
    norms = [math.sqrt(gram[i][i]) for i in range(m)]
    valid = [i for i in range(m) if norms[i] > tol]
    if not valid:
        return _out(torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device), tensors, out_dtype)
    cosines = {(i, j): gram[i][j] / (norms[i] * norms[j]) for i in valid for j in valid}  # ⟨u_i, u_j⟩

    def dot(x: Mapping[int, float], y: Mapping[int, float]) -> float:  # ⟨Σ x_i u_i, Σ y_j u_j⟩
        return sum(x[i] * cosines[i, j] * y[j] for i in valid for j in valid)

    a_sum = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / a_sum for i in valid}
    mn = math.sqrt(max(dot(a, a), 0.0))
    mean = {i: float(i == valid[0]) for i in valid} if mn < tol else {i: a[i] / mn for i in valid}
    for _ in range(p["max_iter"]):
        tangent = dict.fromkeys(valid, 0.0)
        for i in valid:
            cos = max(-1.0, min(1.0, sum(mean[j] * cosines[j, i] for j in valid)))  # ⟨μ, u_i⟩
            omega = math.acos(cos)
            if omega < tol:
                continue
            step = a[i] * omega / math.sin(omega)
            tangent[i] += step
            for j in valid:
                tangent[j] -= step * cos * mean[j]
        tn = math.sqrt(max(dot(tangent, tangent), 0.0))
        if tn < tol:
            break
        mean = {i: math.cos(tn) * mean[i] + math.sin(tn) / tn * tangent[i] for i in valid}
        un = math.sqrt(max(dot(mean, mean), 0.0))
        if un > tol:
            mean = {i: c / un for i, c in mean.items()}
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    k = [scale * mean[i] / norms[i] if i in mean else 0.0 for i in range(m)]  # Σ_i μ_i u_i = Σ_i μ_i / ‖θ_i‖ θ_i
    return _combine(tensors, k, None, dtype, out_dtype or tensors[0].dtype)


# ---------------------------------------------------------------------------------- base-anchored methods


@merge_method(
    "model_stock",
    params={"filter_wise": Bool(False, help="one interpolation ratio per row (last-dim vector) instead of per tensor")},
    needs_base=True,
    min_models=2,
    description="Model Stock: move from the base toward the models' average by a ratio set by their task vectors' angles",
)
def model_stock(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    filter_wise: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Model Stock (Jang et al. 2024, "Model Stock: all we need is just a few fine-tuned models").

    ``τ_i = θ_i − base`` (N ≥ 2 models), ``cos = mean over pairs i < j of ⟨τ_i, τ_j⟩ / max(‖τ_i‖ ‖τ_j‖, 1e-6)``
    (clamped to [−1, 1]), ``t = N cos / (1 + (N − 1) cos)`` (0 where ``|1 + (N − 1) cos| < 1e-6``), and
    ``θ = t · mean_i θ_i + (1 − t) · base``. Per tensor, or per last-dim vector with ``filter_wise`` (a 1-D tensor
    is one vector). ``weights`` are ignored (mergekit has none).
    """
    filter_wise = _params("model_stock", filter_wise=filter_wise)["filter_wise"]
    _check_inputs("model_stock", tensors, name, base=base, needs_base=True)
    n = len(tensors)
    if n < 2:
        raise SymmergeError(f"model_stock: needs at least 2 models besides the base, got {n}")
    dtype = _compute_dtype(*tensors, base)
    rows = (-1, base.shape[-1]) if filter_wise and base.ndim >= 1 else (1, -1)

    gram = _row_gram64(tensors, base, dtype, rows)  # per row: ⟨τ_i, τ_j⟩, one pass over the inputs
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    cos = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
    for i in range(n):
        for j in range(i + 1, n):
            cos += (gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
    cos /= n * (n - 1) / 2
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den)).to(dtype).unsqueeze(-1)
    return _interpolate_rows(tensors, base, t, rows, dtype, out_dtype or tensors[0].dtype)


def _interpolate_rows(tensors: Sequence[Tensor], base: Tensor, t: Tensor, rows: tuple[int, int], dtype: torch.dtype,
                      out_dtype: torch.dtype) -> Tensor:
    """Model Stock's ``t · mean_i θ_i + (1 − t) · base`` with one ``t`` per row of the ``rows`` view (``R × 1``), in
    ``dtype`` block by block, rounded once to ``out_dtype``."""
    views = [x.reshape(rows) for x in tensors]
    b = base.reshape(rows)
    out = torch.empty(b.shape, dtype=out_dtype, device=base.device)
    size = max(min(b.numel(), GRAM_CHUNK), 1)
    acc, scratch = torch.empty(size, dtype=dtype, device=base.device), torch.empty(size, dtype=dtype, device=base.device)
    keep = 1 - t
    for rs, cs in _row_blocks(*b.shape):
        shape = (rs.stop - rs.start, cs.stop - cs.start)
        total = acc[: shape[0] * shape[1]].view(shape).zero_()
        for x in views:
            total.add_(x[rs, cs])
        total.div_(len(views)).mul_(t[rs])
        out[rs, cs] = total.add_(scratch[: total.numel()].view(shape).copy_(b[rs, cs]).mul_(keep[rs]))
    return out.view(base.shape)


@merge_method(
    "sce",
    params={
        "select_topk": Float(1.0, 0, 1, help="fraction of entries kept: those whose task vectors vary most across models"),
        "int8_mask": _INT8,
    },
    needs_base=True,
    description="SCE: select high-variance entries, weight models by task-vector energy, TIES election, weighted mean",
)
def sce(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """SCE — Select, Calculate, Erase (Wan et al. 2024, "FuseChat: knowledge fusion of chat models"), per tensor.

    ``τ_i = θ_i − base``. Select: with ``select_topk < 1``, keep the ``k = ⌊select_topk · #{σ² ≠ 0}⌋`` entries
    with the largest variance across models ``σ²_j = mean_i (τ_ij − mean_i τ_ij)²`` (ties by position; ``k = 0``
    keeps none), ``τ̂_i = τ_i ⊙ mask``. Calculate: ``c_i = mean_j τ̂_ij² / Σ_k mean_j τ̂_kj²`` (uniform ``1/M`` if
    that sum is < 1e-6, as in mergekit). Erase: ``γ = +1 where Σ_i τ̂_i >= 0, else −1`` (a tie elects + here, as
    mergekit does), ``a_i = [sign τ̂_i = γ]``. Returns ``base + Σ_i c_i a_i τ̂_i / max(Σ_i c_i a_i, 1e-6)``.
    ``weights`` are ignored (SCE computes its own). Chunk by chunk, as every entry's operations allow: the only
    whole-tensor buffers are the variance (for the exact selection, freed before Erase), the bool mask and the output.
    """
    p = _params("sce", select_topk=select_topk, int8_mask=int8_mask)
    _check_inputs("sce", tensors, name, base=base, needs_base=True)
    m = len(tensors)
    dtype = _compute_dtype(*tensors, base)
    keep = _sce_keep(tensors, base, dtype, p["select_topk"]) if p["select_topk"] < 1 else None

    def task_vectors(xs: Sequence[Tensor], b: Tensor, kept: Tensor | None) -> list[Tensor]:
        taus = [_task_vector(x, b, dtype) for x in xs]
        return taus if kept is None else [t.masked_fill_(~kept, 0) for t in taus]

    # Calculate: the energies in _dot64's chunks and order, so the same float64 sums as on whole task vectors
    flat, b, n = [x.reshape(-1) for x in tensors], base.reshape(-1), base.numel()
    energy = [0.0] * m
    for s in range(0, n, _DOT_CHUNK):
        e = min(s + _DOT_CHUNK, n)
        for i, t in enumerate(task_vectors([x[s:e] for x in flat], b[s:e], None if keep is None else keep[s:e])):
            energy[i] += _dot64(t, t)
    energy = [x / max(1, n) for x in energy]
    total = sum(energy)
    c = [1 / m] * m if abs(total) < 1e-6 else [x / total for x in energy]

    def erase(chunks: list[Tensor], num: Tensor) -> Tensor:
        xs, b = chunks[:m], chunks[m]
        taus = task_vectors(xs, b, chunks[m + 1] if keep is not None else None)
        sign = torch.zeros_like(num)
        for t in taus:
            sign.add_(t)
        sign = torch.where(sign >= 0, 1.0, -1.0).to(dtype)
        den = torch.zeros_like(num)
        for t, ci in zip(taus, c):
            agree = t.sign() == sign
            num.add_(t.masked_fill_(~agree, 0), alpha=ci)
            den.add_(agree, alpha=ci)
        return num.div_(den.clamp_(min=1e-6)).add_(b)

    inputs = [*tensors, base] + ([keep.view(base.shape)] if keep is not None else [])
    return _chunked(erase, inputs, dtype, out_dtype or tensors[0].dtype)


def _sce_keep(tensors: Sequence[Tensor], base: Tensor, dtype: torch.dtype, select_topk: float) -> Tensor:
    """SCE's Select mask (flat bool): the ``k = ⌊select_topk · #{σ² ≠ 0}⌋`` entries of largest variance across
    models ``σ²_j = mean_i (τ_ij − mean_i τ_ij)²``, ties by position. The variance (computed chunk by chunk) is the
    one whole-tensor float buffer SCE keeps — the exact selection needs all of it — and is freed before the merge."""
    m = len(tensors)

    def variance(chunks: list[Tensor], var: Tensor) -> Tensor:
        taus = [_task_vector(x, chunks[m], dtype) for x in chunks[:m]]
        mean = torch.zeros_like(var)
        for t in taus:
            mean.add_(t)
        mean.div_(m)
        for t in taus:
            var.add_(t.sub_(mean).square_())
        return var.div_(m)

    var = _chunked(variance, [*tensors, base], dtype, dtype).reshape(-1)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        return torch.zeros(var.shape, dtype=torch.bool, device=base.device)
    return _trim_to_count_(var, kth_largest(var, k), k) != 0


def _ram_counts(tensors: Sequence[Tensor], base: Tensor, dtype: torch.dtype, epsilon: float) -> Tensor:
    """How many models change each entry by more than ``epsilon``: ``c_j = Σ_i [|τ_ij| > ε]`` (int32)."""
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for x in tensors:
        counts.add_(_task_vector(x, base, dtype).abs_() > epsilon)
    return counts


_RAM_EPS = Float(1e-5, 0, help="a task-vector entry counts as a contribution when |τ| > epsilon")


@merge_method("ram", params={"epsilon": _RAM_EPS}, needs_base=True,
              description="RAM: keep entries changed by one model as they are, average those changed by several")
def ram(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    epsilon: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Reinforced Agent Merging (mergekit's ``ram``, arXiv 2601.13572), per tensor.

    ``n_ij = [|τ_ij| > ε]``, ``c_j = Σ_i n_ij``; ``θ = base + Σ_i n_i ⊙ τ_i ⊙ ([c = 1] + [c > 1] / c)``: an
    entry changed by one model keeps that change, one changed by several gets their mean (never diluted by the
    models that left it alone). ``weights`` are ignored.
    """
    eps = _params("ram", epsilon=epsilon)["epsilon"]
    return _ram("ram", tensors, base, name, eps, None, out_dtype)


@merge_method(
    "ramplus_tl",
    params={
        "r": Float(0.1, 0, help="strength of the boost of a model's unique entries"),
        "alpha": Float(0.2, 0, help="cap of the shared/unique ratio ρ"),
        "epsilon": _RAM_EPS,
    },
    needs_base=True,
    description="RAM+ (tensor-local): RAM, with each model's unique entries boosted by its overlap ratio",
)
def ramplus_tl(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """RAM+ with tensor-local statistics (mergekit's ``ramplus_tl``, arXiv 2601.13572), per tensor.

    As :func:`ram`, but model ``i``'s unique entries (``c = 1``) are scaled by ``λ_i = 1 + r · clip(ρ_i, 0, α)``,
    ``ρ_i = #{j: n_ij, c_j > 1} / max(#{j: n_ij, c_j = 1}, ε)`` — counted over this tensor:
    ``θ = base + Σ_i n_i ⊙ τ_i ⊙ (λ_i [c = 1] + [c > 1] / c)``. ``weights`` are ignored.
    """
    p = _params("ramplus_tl", r=r, alpha=alpha, epsilon=epsilon)
    return _ram("ramplus_tl", tensors, base, name, p["epsilon"], (p["r"], p["alpha"]), out_dtype)


def _ram(method: str, tensors: Sequence[Tensor], base: Tensor | None, name: str | None, eps: float, plus: tuple[float, float] | None,
         out_dtype: torch.dtype | None) -> Tensor:
    _check_inputs(method, tensors, name, base=base, needs_base=True)
    dtype = _compute_dtype(*tensors, base)
    counts = _ram_counts(tensors, base, dtype, eps)
    unique, shared = counts == 1, counts > 1
    inv = torch.where(shared, 1.0 / counts.clamp(min=1).to(dtype), torch.zeros((), dtype=dtype))
    out = torch.zeros(base.shape, dtype=dtype, device=base.device)
    for x in tensors:
        tau = _task_vector(x, base, dtype)
        nz = tau.abs() > eps
        tau.masked_fill_(~nz, 0)
        lam = 1.0
        if plus is not None:
            r, alpha = plus
            rho = int((nz & shared).sum()) / max(int((nz & unique).sum()), eps)
            lam = 1 + r * min(max(rho, 0.0), alpha)
        out.add_(tau * torch.where(unique, torch.tensor(lam, dtype=dtype), inv))
    return _out(out.add_(base), tensors, out_dtype)


@merge_method(
    "nearswap",
    params={"t": Float(None, 0, required=True, help="distance below which the other model's value is taken whole")},
    needs_base=True,
    max_models=2,
    description="NearSwap: take the other model's value where it is within t of the base, else move t toward it",
)
def nearswap(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    t: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """NearSwap (alchemonaut, "QuartetAnemoi-70B-t0.0001"; mergekit's ``nearswap``): base model ``a``, one other ``b``.

    ``s = clip(t / max(|a − b|, 1e-6), 0, 1)`` per entry, ``θ = s b + (1 − s) a``: entries closer than ``t`` are
    swapped for ``b``'s, farther ones move by ``t`` toward ``b``. ``t`` is required (no default, as in mergekit).
    Elementwise, so computed chunk by chunk (:func:`_chunked`: the same operations per entry, a few chunk-sized
    float32 temporaries instead of five tensor-sized ones).
    """
    t = _params("nearswap", t=t)["t"]
    _check_inputs("nearswap", tensors, name, base=base, needs_base=True)
    if len(tensors) != 1:
        raise SymmergeError(f"nearswap: merges base_model with exactly 1 other model, got {len(tensors)} others")
    dtype = _compute_dtype(tensors[0], base)

    def swap(chunks: list[Tensor], acc: Tensor) -> Tensor:
        a, b = chunks[0].to(dtype), chunks[1].to(dtype)
        s = (t / (a - b).abs_().clamp_(min=1e-6)).clamp_(0, 1)
        return a + s * (b - a)

    return _chunked(swap, [base, tensors[0]], dtype, out_dtype or tensors[0].dtype)


def _quantiles_like_mergekit(x: Tensor, qs: Sequence[float]) -> list[float]:
    """``sorted(x)[⌊q (n − 1)⌋]`` for each ``q`` (index computed in float32, as mergekit does), exactly (``kthvalue``)."""
    flat = x.reshape(-1)
    idx = (torch.tensor(list(qs), dtype=torch.float32) * (flat.numel() - 1)).long().tolist()
    return [float(torch.kthvalue(flat, i + 1).values) for i in idx]


@merge_method(
    "arcee_fusion",
    needs_base=True,
    max_models=2,
    description="Arcee Fusion: take the other model's changes only where their importance is an upper outlier",
)
def arcee_fusion(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Arcee Fusion (mergekit's ``arcee_fusion``): base model ``a``, one other ``b``.

    Importance ``s = |b − a| · KL(softmax(b) ‖ softmax(a))``, the KL along the last dim (per row; a 1-D tensor is
    one row) with ``1e-8`` added to both distributions. Threshold ``T = median(s) + 1.5 (Q3(s) − Q1(s))`` with
    ``Q_q = sorted(s)[⌊q (n − 1)⌋]``; ``θ = a + (b − a) ⊙ [s >= T]``. Quantiles are exact (mergekit estimates them
    from an unseeded random sample of 10⁶ entries on larger tensors).
    """
    _check_inputs("arcee_fusion", tensors, name, base=base, needs_base=True)
    if len(tensors) != 1:
        raise SymmergeError(f"arcee_fusion: merges base_model with exactly 1 other model, got {len(tensors)} others")
    dtype = _compute_dtype(tensors[0], base)
    a, b = base.to(dtype), tensors[0].to(dtype)
    rows = a.reshape(1) if a.ndim == 0 else a
    brow = b.reshape(1) if b.ndim == 0 else b
    p = torch.softmax(brow, dim=-1).add_(1e-8)
    q = torch.softmax(rows, dim=-1).add_(1e-8)
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    del p, q
    diff = b - a
    importance = (diff.abs().reshape(rows.shape) * kl).reshape(a.shape)
    q1, median, q3 = _quantiles_like_mergekit(importance, (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    return _out(a + diff * (importance >= threshold), tensors, out_dtype)


@merge_method(
    "passthrough",
    params={"scale": Float(1.0, per_model=True, help="multiply the tensor by this")},
    min_models=1,
    max_models=1,
    description="the one model's tensor, unchanged (for slice-built frankenmerges; alignment does not apply)",
)
def passthrough(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    scale: float | Sequence[float] = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Passthrough (mergekit's): the single model's tensor, unchanged (times ``scale`` if it is not 1).

    Used with slices to assemble layers of several models into one (frankenmerges); a merge of one model has nothing
    to align to, so alignment does not apply. ``base`` and ``weights`` are ignored.
    """
    scale = _params("passthrough", scale=scale)["scale"]
    _check_inputs("passthrough", tensors, name)
    if len(tensors) != 1:
        raise SymmergeError(f"passthrough: takes exactly 1 model, got {len(tensors)}")
    s = float(_broadcast("passthrough", "scale", scale, 1)[0])
    x = tensors[0]
    if s == 1.0:
        return x.to(out_dtype or x.dtype, copy=True)
    return _out(x.to(_compute_dtype(x)).mul(s), tensors, out_dtype)


# ------------------------------------------------------------------------------------- with data: Fisher, RegMean


FISHER_EPS = 1e-10


def fisher_model_norms(fishers_by_tensor: Iterable[Sequence[Tensor]] | Mapping[str, Sequence[Tensor]]) -> list[float]:
    """Whole-model Fisher norms ``‖F_i‖ = sqrt(Σ_tensors Σ_j F_i[j]²)``, one per model, for ``normalize="model"``.

    ``fishers_by_tensor`` yields, per tensor, the M diagonal Fishers (an iterable consumed once, or a mapping
    name → list). Divide each model's Fishers by its norm (or pass ``fisher_norms=`` to :func:`fisher`).
    """
    items = fishers_by_tensor.values() if isinstance(fishers_by_tensor, Mapping) else fishers_by_tensor
    sq: list[float] | None = None
    for fs in items:
        if sq is None:
            sq = [0.0] * len(fs)
        if len(fs) != len(sq):
            raise SymmergeError(f"fisher_model_norms: got {len(fs)} Fishers for a tensor, {len(sq)} before")
        for i, f in enumerate(fs):
            sq[i] += _dot64(f, f)
    if sq is None:
        raise SymmergeError("fisher_model_norms: no Fishers given")
    return [math.sqrt(s) for s in sq]


@merge_method(
    "fisher",
    params={
        "normalize": Choice(
            "none", ("none", "param", "model"), help="divide each model's Fisher by nothing, its norm on this tensor, or its whole-model norm"
        )
    },
    statistics="fisher",
    prepare=lambda params, task_vectors, statistics: (
        {"fisher_norms": fisher_model_norms(statistics)} if params.get("normalize") == "model" else {}),
    description="Fisher-weighted average Σ w_i F_i θ_i / Σ w_i F_i (needs diagonal Fishers)",
)
def fisher(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    normalize: str = "none",
    fishers: Sequence[Tensor] | None = None,
    fisher_norms: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Fisher merging (Matena & Raffel 2022, "Merging models with Fisher-weighted averaging").

    ``θ = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i`` elementwise, ``F̃_i = F_i / c_i + ε`` (``ε = 1e-10``).
    ``tensors``: M tensors; ``fishers``: M diagonal Fishers of the same shape (``F_i >= 0``); ``weights``: M
    non-negative floats (default all 1). ``normalize``: ``"none"`` (``c_i = 1``), ``"param"`` (``c_i = ‖F_i‖``
    on this tensor), ``"model"`` (``c_i`` = the whole-model norm from :func:`fisher_model_norms`, passed as
    ``fisher_norms``; without ``fisher_norms`` the Fishers are taken as already divided by it). Equal Fishers give
    :func:`linear`; where only one model's Fisher is nonzero, that model's value. Without ``fishers`` (buffers
    and other tensors without a gradient) returns :func:`linear` of the tensors.
    """
    normalize = _params("fisher", normalize=normalize)["normalize"]
    _check_inputs("fisher", tensors, name)
    m = len(tensors)
    w = _weights("fisher", weights, m, nonnegative=True)
    if fishers is None:
        return linear(tensors, weights=w, name=name, out_dtype=out_dtype)
    if len(fishers) != m:
        raise SymmergeError(f"fisher: needs one Fisher per model ({m}), got {len(fishers)}" + (f" (tensor {name!r})" if name else ""))
    for i, f in enumerate(fishers):
        if f.shape != tensors[0].shape:
            where = f" (tensor {name!r})" if name else ""
            raise SymmergeError(f"fisher: Fisher {i} has shape {tuple(f.shape)}, the models {tuple(tensors[0].shape)}{where}")
    if normalize == "model" and fisher_norms is not None and len(fisher_norms) != m:
        raise SymmergeError(f"fisher: got {len(fisher_norms)} fisher_norms for {m} models")
    dtype = _compute_dtype(*tensors, *fishers)
    num = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    den = torch.zeros_like(num)
    for i, (theta, f) in enumerate(zip(tensors, fishers)):
        scale = 1.0
        if normalize == "param":
            scale = math.sqrt(_dot64(f, f))
        elif normalize == "model" and fisher_norms is not None:
            scale = float(fisher_norms[i])
        ft = f.to(dtype, copy=True)
        if scale > 0 and scale != 1.0:
            ft.div_(scale)
        ft.add_(FISHER_EPS).mul_(w[i])
        den.add_(ft)
        num.add_(ft.mul_(theta))
        del ft
    return _out(num.div_(den), tensors, out_dtype)


#: Relative eigenvalue cut-off of RegMean's pseudo-inverse fallback, and the Cholesky pivot test that triggers it.
REGMEAN_RTOL = 1e-12


@merge_method(
    "regmean",
    params={"alpha": Float(0.9, 0, 1, help="scale of the Gram matrices' off-diagonal entries")},
    statistics="gram",
    linear_layout=True,
    description="RegMean: least-squares merge of linear layers from input Gram matrices",
)
def regmean(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    alpha: float = 0.9,
    grams: Sequence[Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """RegMean (Jin et al. 2023, "Dataless knowledge fusion by merging weights of language models").

    ``tensors``: M weights ``W_i`` of shape (out, in) in ``nn.Linear`` layout (``y = x W^T``; transpose GPT-2's
    ``Conv1D`` (in, out) weights first); ``grams``: M input Gram matrices ``G_i = X_i^T X_i / N_i``, (in, in).
    Off-diagonals are shrunk, ``G̃_i = w_i (α G_i + (1 − α) diag(G_i))`` (``weights`` default all 1), and

        ``W^T = (Σ_i G̃_i)^{-1} Σ_i G̃_i W_i^T``,

    the minimiser of ``Σ_i w_i ‖X_i W^T − X_i W_i^T‖²`` when ``α = 1``. Solved in float64 by Cholesky; if
    ``Σ G̃_i`` is singular (a dead input feature, fewer samples than features, α = 1), the least-squares problem
    has many minimisers and we return the one closest to the weighted average ``W̄`` (through an eigen-pseudo-
    inverse ``A^+``: ``W^T = A^+ B + (I − A^+ A) W̄^T``), instead of ``pinv``'s minimum-norm one, which would
    zero the weights of unseen input directions.

    Without ``grams`` (biases, norms, embeddings: tensors that are not a linear layer's weight) returns
    :func:`linear` of the tensors, as the paper does for non-linear parameters.
    """
    alpha = _params("regmean", alpha=alpha)["alpha"]
    _check_inputs("regmean", tensors, name)
    m = len(tensors)
    w = _weights("regmean", weights, m, nonnegative=True)
    if grams is None:
        return linear(tensors, weights=w, name=name, out_dtype=out_dtype)
    where = f" (tensor {name!r})" if name else ""
    if tensors[0].ndim != 2:
        raise SymmergeError(f"regmean: needs 2-D (out, in) weights, got shape {tuple(tensors[0].shape)}{where}")
    d_in = tensors[0].shape[1]
    if len(grams) != m:
        raise SymmergeError(f"regmean: needs one Gram matrix per model ({m}), got {len(grams)}{where}")
    for i, g in enumerate(grams):
        if g.shape != (d_in, d_in):
            expected = f"expected ({d_in}, {d_in}) for weights {tuple(tensors[0].shape)}"
            raise SymmergeError(f"regmean: Gram {i} has shape {tuple(g.shape)}, {expected}{where}")
    device = tensors[0].device
    a = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    b = torch.zeros(d_in, tensors[0].shape[0], dtype=torch.float64, device=device)
    for wi, wt, g in zip(w, tensors, grams):
        gt = g.to(torch.float64, copy=True)
        if alpha != 1.0:
            diag = gt.diagonal().clone()
            gt.mul_(alpha).diagonal().copy_(diag)
        gt.mul_(wi)
        a.add_(gt)
        b.addmm_(gt, wt.to(torch.float64).T)
        del gt
    chol, info = torch.linalg.cholesky_ex(a)
    pivots = chol.diagonal().square()
    if int(info) == 0 and float(pivots.min()) > REGMEAN_RTOL * float(a.diagonal().max()):
        x = torch.cholesky_solve(b, chol)
    else:
        # Singular: a zero Cholesky pivot means det(A) ≈ 0. Among all least-squares minimisers A x = b (b lies in
        # range(A), as A and b are sums of G̃_i terms) take the one nearest the weighted average.
        evals, evecs = torch.linalg.eigh(a)
        keep = evals > REGMEAN_RTOL * max(float(evals.max()), 0.0) * d_in
        q = evecs[:, keep]
        avg = sum(wi * wt.to(torch.float64) for wi, wt in zip(w, tensors)).T / sum(w)
        x = q @ ((q.T @ b) / evals[keep, None]) + avg - q @ (q.T @ avg)
    return _out(x.T, tensors, out_dtype).contiguous()


__all__ = [
    "EXACT_DIRECT_MAX", "FISHER_EPS", "MERGE_METHODS", "PARALLEL_TOL", "REGMEAN_RTOL", "RESCALE_EPS", "TIES_CHUNK", "WEIGHT_SUM_EPS", "ZERO_NORM",
    "Bool", "Choice", "Float", "Int", "MergeMethod", "ParamSpec", "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear",
    "dare_seed", "dare_task_vector", "dare_ties", "della", "della_keep_probabilities", "della_linear", "fisher", "fisher_model_norms",
    "get_method", "global_magnitude_thresholds", "karcher", "keep_count", "kth_largest", "linear", "list_methods", "magnitude_threshold",
    "merge_method", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl", "regmean", "sce", "slerp",
    "task_arithmetic", "ties", "validate_params",
]
