"""Generalized task arithmetic: task_arithmetic, TIES, DARE, breadcrumbs and DELLA, each ``base + λ · merge(τ̂_i)``
over sparsified task vectors ``τ_i = θ_i − base``."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.merge.methods.common import _DOT_CHUNK, _INT8, _broadcast, _check_inputs, _chunked, _compute_dtype, _dot64, _out, _params, _task_vector, _weights
from symmerge.merge.methods.registry import Bool, Choice, Float, Int, _num, merge_method
from symmerge.merge.methods.sparsify import (
    _disjoint_merge,
    _ties_chunked,
    _trim_,
    _trim_to_count_,
    global_magnitude_thresholds,
    keep_count,
    kth_largest,
    magnitude_threshold,
)

Tensor = torch.Tensor


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
    if not tensors and base is not None:
        # base_model is the only input (the engine drops it from the models, as mergekit does), e.g. a recipe that
        # applies a LoRA: base_model M+L and one source M+L. mergekit's task-arithmetic methods return the base then
        _check_inputs(method, [base], name)
        return base.to(out_dtype or base.dtype, copy=True)
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
    if tensors or base is None:  # base_model alone: _gta returns the base, as mergekit's does
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
