"""Averages and spherical interpolations: linear, slerp, nuslerp, multislerp, karcher."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from symmerge.errors import SymmergeError
from symmerge.merge.methods.common import ELEMENTWISE_CHUNK, _check_inputs, _chunked, _compute_dtype, _gram64, _out, _params, _task_vector, _weights
from symmerge.merge.methods.registry import Bool, Float, Int, merge_method

Tensor = torch.Tensor


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
    recipe_weight="averages uniformly (1/M), as mergekit's does",  # mergekit 0.1.5's karcher: alphas = 1/M whatever the weights
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
