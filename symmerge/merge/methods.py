"""Registered merge methods: pure per-tensor functions, and a registry that describes and validates them.

Every method is a function ``fn(tensors, *, base=None, weights=None, name=None, **params, **data) -> Tensor``:

- ``tensors``: one tensor per model, all the same shape (already aligned by symmerge);
- ``base``: the common ancestor's tensor (methods with ``needs_base``; ignored by the others);
- ``weights``: one float per model (``None`` = 1 for every model);
- ``name``: the tensor's name in the state dict: seeds DARE's masks and labels error messages;
- ``params``: the method's registered parameters (see :func:`validate_params`);
- ``data``: per-model statistics for the ``needs_data`` methods (``fishers=``, ``grams=``) and precomputed TIES
  ``thresholds=``.

The math runs in float32 (float64 when an input is float64; RegMean's solve always in float64) and the result is
cast back to the dtype of ``tensors[0]``. Inputs are never modified. Functions keep at most a few tensor-sized
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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
        """``value`` converted to the parameter's type, or :class:`SymmergeError` naming method, key and value."""
        bad = lambda what: SymmergeError(f"{method}: {self.name} must be {what}, got {value!r}")  # noqa: E731
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
            raise SymmergeError(f"{method}: {self.name} must be {self.constraint}, got {_num(value)}")
        return value


def Float(default: float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False, help: str = "") -> dict:
    """Keyword arguments of a float :class:`ParamSpec` (used in ``@merge_method(params={...})``)."""
    return dict(kind="float", default=default, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, help=help)


def Int(default: int, lo: int | None = None, hi: int | None = None, *, help: str = "") -> dict:
    """Keyword arguments of an integer :class:`ParamSpec`."""
    return dict(kind="int", default=default, lo=lo, hi=hi, help=help)


def Bool(default: bool, *, help: str = "") -> dict:
    """Keyword arguments of a boolean :class:`ParamSpec`."""
    return dict(kind="bool", default=default, help=help)


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
        parts = [self.name] + ["[base]"] * self.needs_base + ["[data]"] * self.needs_data
        parts += [f"{p.name}={_num(p.default) if p.kind in ('float', 'int') else str(p.default).lower()}" for p in self.params]
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
    vectors, ``statistics`` maps tensor name → per-model statistics).
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
        desc = description or (inspect.getdoc(fn) or name).splitlines()[0]
        if statistics not in (None, "fisher", "gram"):
            raise ValueError(f"{name}: statistics must be None, 'fisher' or 'gram', got {statistics!r}")
        MERGE_METHODS[name] = MergeMethod(name, fn, specs, needs_base, statistics, min_models, max_models, desc, linear_layout, prepare)
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


def validate_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a recipe's parameters for method ``name`` and fill in defaults, before any weight is read.

    Keys are the recipe keys (``lambda``; the Python spelling ``lambda_`` is accepted too). Returns a dict keyed by
    the Python argument names, ready for ``method.fn(tensors, ..., **validated)``. Raises :class:`SymmergeError`
    naming the method, key and value: ``"ties: density must be in (0, 1], got 1.5"``, ``"ties: unknown parameter
    'dens' (known: density, lambda)"``.
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
        out[spec.arg] = spec.check(name, value)
    for p in method.params:
        out.setdefault(p.arg, p.default)
    return out


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
    if not all(math.isfinite(x) for x in w):
        raise SymmergeError(f"{method}: weights must be finite, got {w}")
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
    """How many of ``n`` entries a top-``density`` trim keeps: ``round(density · n)`` (to nearest), in ``[1, n]``."""
    return min(n, max(1, round(density * n)))


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
    density: float,
    *,
    sample_rate: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Whole-model TIES trimming (Yadav et al. 2023, "Trim" step): one magnitude threshold per model, over all tensors.

    ``task_vectors`` yields, for each tensor of the model, the per-model task vectors ``[τ_1, ..., τ_M]``
    (``τ_i = θ_i − base``, one shape per tensor) — an iterable (consumed once, so a generator that loads tensors
    lazily works) or a mapping name → list. Returns ``[t_1, ..., t_M]``: ``t_i`` is the ``k``-th largest
    ``|τ_i|`` over the whole model, ``k = keep_count(density, Σ numel)``. Pass it as ``ties(..., thresholds=...)``
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
    out = []
    for chunks in pools:
        magnitudes = torch.cat(chunks)
        chunks.clear()
        out.append(magnitude_threshold(magnitudes, density))
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


def _disjoint_merge(task_vector: Callable[[int], Tensor], n_models: int, weights: list[float], like: Tensor, dtype: torch.dtype) -> Tensor:
    """TIES "elect" and "disjoint merge" over task vectors produced on demand by ``task_vector(i)``.

    ``γ = sign(Σ_i w_i τ̂_i)`` per entry (mass-based election); ``τ_m = Σ_i w_i [sign τ̂_i = γ] τ̂_i /
    Σ_i w_i [sign τ̂_i = γ]``; 0 where no model agrees (all τ̂_i zero, or ``Σ_i w_i τ̂_i = 0`` exactly: a tie elects
    no sign). Two passes recompute the task vectors instead of stacking M of them: peak memory is four float
    buffers plus bool masks, whatever M.
    """
    sign = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for i in range(n_models):
        sign.add_(task_vector(i), alpha=weights[i])
    sign.sign_()
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for i in range(n_models):
        tau = task_vector(i).mul_(sign).clamp_min_(0)  # |τ̂_i| where it agrees with γ, else 0
        den.add_(tau > 0, alpha=weights[i])
        num.add_(tau.mul_(sign), alpha=weights[i])
        del tau
    return num.div_(den.masked_fill_(den == 0, 1))


# ------------------------------------------------------------------------------------------------ the methods


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
    out = torch.zeros(tensors[0].shape, dtype=_compute_dtype(*tensors), device=tensors[0].device)
    for t, wi in zip(tensors, w):
        out.add_(t, alpha=wi)
    if normalize:
        out.div_(sum(w))
    return out.to(tensors[0].dtype)


@merge_method(
    "task_arithmetic",
    params={"lambda": Float(1.0, help="scale of the summed task vectors")},
    needs_base=True,
    description="base + λ Σ w_i (θ_i − base)",
)
def task_arithmetic(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    lambda_: float = 1.0,
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"): ``θ = base + λ Σ_i w_i τ_i``.

    ``τ_i = θ_i − base``; ``tensors``: M tensors and ``base`` of one shape; ``weights`` default all 1 (no
    normalisation: negative weights negate a task).
    """
    lam = _params("task_arithmetic", lambda_=lambda_)["lambda_"]
    _check_inputs("task_arithmetic", tensors, name, base=base, needs_base=True)
    w = _weights("task_arithmetic", weights, len(tensors))
    dtype = _compute_dtype(*tensors, base)
    out = torch.zeros(base.shape, dtype=dtype, device=base.device)
    for t, wi in zip(tensors, w):
        out.add_(_task_vector(t, base, dtype), alpha=wi)  # θ_i − base first: exact for nearby values
    return out.mul_(lam).add_(base).to(tensors[0].dtype)


def _ties_prepare(params: Mapping[str, Any], task_vectors: Callable[[], Iterable[Sequence[Tensor]]], statistics: Any) -> dict:
    """Whole-model trimming (``trim="model"``, the paper's): one magnitude threshold per model over all its tensors."""
    if params.get("trim") != "model":
        return {}
    return {"thresholds": global_magnitude_thresholds(task_vectors(), params["density"])}


@merge_method(
    "ties",
    prepare=_ties_prepare,
    params={
        "density": Float(0.2, 0, 1, lo_open=True, help="fraction of each task vector kept (largest magnitudes)"),
        "lambda": Float(1.0, help="scale of the merged task vector"),
        "trim": Choice("tensor", ("tensor", "model"), help="keep the top density of each tensor, or of the whole model (the paper)"),
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
    density: float = 0.2,
    lambda_: float = 1.0,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    """TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models"), per tensor.

    ``tensors``: M tensors and ``base`` of one shape; ``weights``: M non-negative floats (default all 1).

    1. Trim: ``τ̂_i = τ_i · [|τ_i| >= t_i]``, ``τ_i = θ_i − base``. By default ``t_i`` is this tensor's
       :func:`magnitude_threshold` and exactly ``keep_count(density, n)`` entries are kept (ties at the threshold
       broken by position). For the paper's whole-model
       trimming (``trim="model"``), pass ``thresholds=[t_1, ..., t_M]`` from :func:`global_magnitude_thresholds`
       (``density`` is then ignored here; the merge engine computes them).
    2. Elect: ``γ = sign(Σ_i w_i τ̂_i)`` per entry (total mass; a tie ``Σ = 0`` elects nothing — the original code
       resolves such ties to the tensor's majority sign, mergekit to +).
    3. Disjoint mean: ``τ_m = Σ_i w_i a_i τ̂_i / Σ_i w_i a_i`` with ``a_i = [τ̂_i ≠ 0 and sign τ̂_i = γ]``
       (the paper's unweighted mean for equal weights); 0 where no model agrees.

    Returns ``base + λ τ_m``.
    """
    p = _params("ties", density=density, lambda_=lambda_, trim=trim)
    _check_inputs("ties", tensors, name, base=base, needs_base=True)
    if p["trim"] == "model" and thresholds is None:
        raise SymmergeError("ties: trim=model needs whole-model thresholds (see global_magnitude_thresholds)")
    w = _weights("ties", weights, len(tensors), nonnegative=True)
    if thresholds is not None and len(thresholds) != len(tensors):
        raise SymmergeError(f"ties: got {len(thresholds)} thresholds for {len(tensors)} models")
    dtype = _compute_dtype(*tensors, base)
    cache: list[float | None] = list(thresholds) if thresholds is not None else [None] * len(tensors)

    def trimmed(i: int) -> Tensor:
        tau = _task_vector(tensors[i], base, dtype)
        if thresholds is not None:  # whole-model trim: one threshold for the model, ties kept
            return _trim_(tau, float(cache[i]))
        if cache[i] is None:
            cache[i] = magnitude_threshold(tau.abs(), p["density"])
        return _trim_to_count_(tau, float(cache[i]), keep_count(p["density"], tau.numel()))

    merged = _disjoint_merge(trimmed, len(tensors), w, base, dtype)
    return merged.mul_(p["lambda_"]).add_(base).to(tensors[0].dtype)


def dare_seed(seed: int, name: str | None, model_index: int) -> int:
    """The generator seed of DARE's mask for one model's tensor: a stable hash of ``(seed, name, model_index)``.

    Stable across runs and processes (not Python's salted ``hash``), so every tensor and every model draws its own
    mask and a merge is reproducible. Masks depend on the device's generator (CPU and CUDA draw differently).
    """
    digest = hashlib.blake2b(f"{seed}\x00{name or ''}\x00{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_task_vector(theta: Tensor, base: Tensor, density: float, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """DARE's drop-and-rescale (Yu et al. 2023, "Language models are Super Mario") of ``τ = θ − base``.

    ``τ̃ = m ⊙ τ / density`` with ``m_j ~ Bernoulli(density)`` i.i.d. (each entry dropped with probability
    ``1 − density``), so ``E[τ̃] = τ``. ``theta``, ``base``: one shape; the mask is drawn from ``generator`` (on
    the tensor's device). Returns a fresh ``dtype`` tensor.
    """
    tau = _task_vector(theta, base, dtype)
    if density < 1:
        drop = torch.empty(tau.shape, dtype=torch.bool, device=tau.device).bernoulli_(1 - density, generator=generator)
        tau.masked_fill_(drop, 0).div_(density)
    return tau


def _dare(
    method: str, tensors: Sequence[Tensor], base: Tensor | None, name: str | None, seed: int, density: float
) -> tuple[Callable[[int], Tensor], torch.dtype]:
    _check_inputs(method, tensors, name, base=base, needs_base=True)
    dtype = _compute_dtype(*tensors, base)

    def task_vector(i: int) -> Tensor:  # same seed → same mask each time it is recomputed
        g = torch.Generator(device=base.device).manual_seed(dare_seed(seed, name, i))
        return dare_task_vector(tensors[i], base, density, g, dtype)

    return task_vector, dtype


_DARE_PARAMS = {
    "density": Float(0.5, 0, 1, lo_open=True, help="probability of keeping each task-vector entry"),
    "lambda": Float(1.0, help="scale of the merged task vector"),
    "seed": Int(0, 0, help="seed of the drop masks (combined with the tensor name and model index)"),
}


@merge_method(
    "dare_linear",
    params=_DARE_PARAMS,
    needs_base=True,
    description="DARE: drop task-vector entries, rescale by 1/density, then task arithmetic",
)
def dare_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float = 0.5,
    lambda_: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """DARE then task arithmetic (Yu et al. 2023): ``θ = base + λ Σ_i w_i τ̃_i``, ``τ̃_i`` from :func:`dare_task_vector`.

    ``tensors``: M tensors and ``base`` of one shape; ``weights`` default all 1. Model ``i``'s mask comes from a
    ``torch.Generator`` seeded with :func:`dare_seed` ``(seed, name, i)``: pass the tensor's ``name`` so that
    different tensors get different masks. Unbiased: ``E[θ] = task_arithmetic(...)``.
    """
    p = _params("dare_linear", density=density, lambda_=lambda_, seed=seed)
    w = _weights("dare_linear", weights, len(tensors))
    task_vector, dtype = _dare("dare_linear", tensors, base, name, p["seed"], p["density"])
    out = torch.zeros(base.shape, dtype=dtype, device=base.device)
    for i, wi in enumerate(w):
        out.add_(task_vector(i), alpha=wi)
    return out.mul_(p["lambda_"]).add_(base).to(tensors[0].dtype)


@merge_method(
    "dare_ties",
    params=_DARE_PARAMS,
    needs_base=True,
    description="DARE drop-and-rescale, then TIES sign election and disjoint mean",
)
def dare_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    density: float = 0.5,
    lambda_: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """DARE then TIES (Yu et al. 2023; Yadav et al. 2023): ``θ = base + λ τ_m``.

    ``τ̃_i`` from :func:`dare_task_vector` (masks seeded as in :func:`dare_linear`) replace TIES' magnitude trim;
    then ``γ = sign(Σ_i w_i τ̃_i)`` and ``τ_m = Σ_i w_i a_i τ̃_i / Σ_i w_i a_i``, ``a_i = [τ̃_i ≠ 0, sign τ̃_i = γ]``,
    exactly as in :func:`ties`. ``tensors``: M tensors and ``base`` of one shape; ``weights``: M non-negative
    floats (default all 1).
    """
    p = _params("dare_ties", density=density, lambda_=lambda_, seed=seed)
    w = _weights("dare_ties", weights, len(tensors), nonnegative=True)
    task_vector, dtype = _dare("dare_ties", tensors, base, name, p["seed"], p["density"])
    merged = _disjoint_merge(task_vector, len(tensors), w, base, dtype)
    return merged.mul_(p["lambda_"]).add_(base).to(tensors[0].dtype)


_DOT_CHUNK = 1 << 22


def _dot64(x: Tensor, y: Tensor) -> float:
    """``⟨x, y⟩`` accumulated in float64, in chunks (no full-size float64 copies)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return sum(float(torch.dot(x[i : i + _DOT_CHUNK].double(), y[i : i + _DOT_CHUNK].double())) for i in range(0, x.numel(), _DOT_CHUNK))


#: SLERP interpolates linearly when ``|cos Ω| > 1 − PARALLEL_TOL`` (sin Ω ≈ 0) or a tensor has norm ≤ ZERO_NORM.
PARALLEL_TOL = 1e-6
ZERO_NORM = 1e-12


@merge_method(
    "slerp",
    params={"t": Float(0.5, 0, 1, help="interpolation position: 0 = first model, 1 = second")},
    min_models=2,
    max_models=2,
    description="spherical interpolation between two models",
)
def slerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Sequence[float] | None = None,
    name: str | None = None,
    t: float = 0.5,
) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985), per tensor, as used for model merging (e.g. mergekit).

    ``tensors = [a, b]`` of one shape, flattened to vectors: ``cos Ω = ⟨a, b⟩ / (‖a‖ ‖b‖)`` and

        ``θ = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b``

    on the original (un-normalised) tensors. Falls back to ``(1 − t) a + t b`` when ``|cos Ω| > 1 − 1e-6`` or a
    norm is ~0. ``t = 0`` / ``1`` return ``a`` / ``b``. ``weights`` and ``base`` are ignored.
    """
    t = _params("slerp", t=t)["t"]
    _check_inputs("slerp", tensors, name)
    if len(tensors) != 2:
        raise SymmergeError(f"slerp: merges exactly 2 models, got {len(tensors)}")
    a, b = tensors
    na, nb = math.sqrt(_dot64(a, a)), math.sqrt(_dot64(b, b))
    c0, c1 = 1.0 - t, t
    if min(na, nb) > ZERO_NORM:
        cos = max(-1.0, min(1.0, _dot64(a, b) / (na * nb)))
        if abs(cos) <= 1 - PARALLEL_TOL:
            omega = math.acos(cos)
            s = math.sin(omega)
            c0, c1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    return a.to(_compute_dtype(a, b), copy=True).mul_(c0).add_(b, alpha=c1).to(a.dtype)


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
        return linear(tensors, weights=w, name=name)
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
    return num.div_(den).to(tensors[0].dtype)


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
        return linear(tensors, weights=w, name=name)
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
    return x.T.to(tensors[0].dtype).contiguous()


__all__ = [
    "EXACT_DIRECT_MAX", "FISHER_EPS", "MERGE_METHODS", "PARALLEL_TOL", "REGMEAN_RTOL", "ZERO_NORM", "Bool", "Choice",
    "Float", "Int", "MergeMethod", "ParamSpec", "dare_linear", "dare_seed", "dare_task_vector", "dare_ties", "fisher",
    "fisher_model_norms", "get_method", "global_magnitude_thresholds", "keep_count", "linear", "list_methods",
    "magnitude_threshold", "merge_method", "regmean", "slerp", "task_arithmetic", "ties", "validate_params",
]
