"""Base-anchored methods: model_stock, sce, ram, ramplus_tl, nearswap, arcee_fusion, passthrough."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symmerge.errors import SymmergeError
from symmerge.merge.methods.common import (
    _DOT_CHUNK,
    _INT8,
    GRAM_CHUNK,
    _broadcast,
    _check_inputs,
    _chunked,
    _compute_dtype,
    _dot64,
    _out,
    _params,
    _row_blocks,
    _row_gram64,
    _task_vector,
)
from symmerge.merge.methods.registry import Bool, Float, merge_method
from symmerge.merge.methods.sparsify import _trim_to_count_, kth_largest

Tensor = torch.Tensor


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
    recipe_weight="takes no per-model weight (mergekit's has none)",
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
    recipe_weight="takes no per-model weight (mergekit's has none)",
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
