"""Methods that weigh the models by data statistics: Fisher merging and RegMean."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from symmerge.errors import SymmergeError
from symmerge.merge.methods.common import _check_inputs, _compute_dtype, _dot64, _out, _params, _weights
from symmerge.merge.methods.interpolation import linear
from symmerge.merge.methods.registry import Choice, Float, merge_method

Tensor = torch.Tensor


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
