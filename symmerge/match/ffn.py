"""FFN neuron matching: Git Re-Basin weight matching, one exact LAP per FFN (Zhang et al. 2025, eq. 6-7)."""

from __future__ import annotations

import torch

from symmerge.groups.ffn import FFNTensors
from symmerge.match.certificate import (
    CERTIFY_FRACTIONS,
    CERTIFY_SAMPLE,
    UNIT_ROUNDOFF,
    diagonal_dominates_blocked,
    feature_columns,
    row_dots,
)
from symmerge.match.device import similarity_dtype

SIMILARITY_ROWS = 1024
"""Rows of ``S`` per GEMM call: at LLaMA-7B one call is ~1/11 of a layer's similarity (~1-2 s on this 2-core CPU)
instead of the whole (~16 s), so SIGINT/SIGTERM, whose Python handlers run between calls, stop a run within
seconds."""


def ffn_similarity(reference: FFNTensors, model: FFNTensors, device: torch.device | str | None = None) -> torch.Tensor:
    """``S[i, j]`` = similarity of reference neuron ``i`` and model neuron ``j`` (d_ff,ref × d_ff,model, float32):

        S = W_in,ref W_in,model^T + b_ref^T b_model + W_out,ref^T W_out,model     (summed over gate/up inputs)

    The first product writes the output (no zero-filled pass over d_ff² floats: ~30 ms a layer at BERT-base), the
    other terms are added in place with ``addmm_``, in blocks of ``SIMILARITY_ROWS`` rows, on ``device`` (default: the CPU; the inputs are moved
    there, and ``S`` stays there: move it to the CPU for the LAP). For bfloat16 checkpoints on a CPU that multiplies
    bfloat16 natively the products run in bfloat16 instead (:func:`~symmerge.match.device.similarity_dtype`: 3-5x
    faster there; each entry rounded once to bfloat16).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if similarity_dtype(_stored_dtypes(reference, model), device) == torch.bfloat16:
        return _bfloat16_similarity(reference, model, device)
    f32 = lambda t: _f32(t, device)  # noqa: E731
    n = reference.in_weights[0].shape[0]
    s = torch.empty(n, model.in_weights[0].shape[0], dtype=torch.float32, device=device)
    # the order of the sums is the one this function always had (in, biases, out): the same float32 S bit for bit
    terms = [*((f32(a), f32(b).T) for a, b in zip(reference.in_weights, model.in_weights)),
             *((f32(a)[:, None], f32(b)[None, :]) for a, b in zip(reference.in_biases, model.in_biases)),
             *((f32(a).T, f32(b)) for a, b in zip(reference.out_weights, model.out_weights))]
    for t, (a, b) in enumerate(terms):
        for lo in range(0, n, SIMILARITY_ROWS):  # row blocks: Python (and a Ctrl-C) gets control between them
            rows = slice(lo, lo + SIMILARITY_ROWS)
            if t == 0:
                torch.mm(a[rows], b, out=s[rows])
            elif a.shape[1] == 1:
                s[rows].addr_(a[rows, 0], b[0])
            else:
                s[rows].addmm_(a[rows], b)
    return s


def _stored_dtypes(*ffns: FFNTensors) -> tuple[torch.dtype, ...]:
    return tuple(w.dtype for t in ffns for w in (*t.in_weights, *t.in_biases, *t.out_weights))


def _bfloat16_similarity(reference: FFNTensors, model: FFNTensors, device: torch.device) -> torch.Tensor:
    """:func:`ffn_similarity` with one bfloat16 GEMM (:func:`~symmerge.match.device.similarity_dtype`): the weight
    features side by side, ``[W_in... | W_out^T]`` (d_ff × K), so each entry of ``S`` is accumulated over all
    ``K`` features in float32 inside the GEMM and rounded to bfloat16 once; the biases' outer products are added in
    float32. Row blocks of ``SIMILARITY_ROWS``, as in the float32 path."""
    def side_by_side(t: FFNTensors) -> torch.Tensor:
        return torch.cat([w.to(device=device, dtype=torch.bfloat16) for w in (*t.in_weights, *(w.T for w in t.out_weights))], dim=1)

    x, y = side_by_side(reference), side_by_side(model)
    s = torch.empty(x.shape[0], y.shape[0], dtype=torch.float32, device=device)
    yt = y.T
    for lo in range(0, x.shape[0], SIMILARITY_ROWS):
        rows = slice(lo, lo + SIMILARITY_ROWS)
        s[rows] = x[rows] @ yt
    for a, b in zip(reference.in_biases, model.in_biases):
        s.addr_(_f32(a, device), _f32(b, device))
    return s


NEURON_CHUNK = 512
"""Neurons per chunk of the certificate's passes over whole rows (float32 copies of a few MB instead of whole
matrices)."""


def _blocks(t: FFNTensors) -> list[torch.Tensor]:
    """The neuron-indexed feature blocks ``X_t`` (d_ff × k_t, in the stored dtype, views: nothing is copied) with
    ``S = Σ_t X_t,ref X_t,model^T`` (:func:`ffn_similarity`'s three sums as one)."""
    return [*t.in_weights, *(b.unsqueeze(1) for b in t.in_biases), *(w.T for w in t.out_weights)]


def _f32(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.float32)


def _neurons(x: torch.Tensor, part: slice | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``part`` (neurons) of a feature block in float32. ``W_out^T``'s rows are columns of the stored
    ``W_out``: they are converted in the stored orientation (a row-by-row copy) and returned as a transposed view,
    not gathered into row-major order."""
    if x.dim() == 2 and x.stride(0) == 1 and x.stride(1) != 1:
        return _f32(x.T[:, part], device).T
    return _f32(x[part], device)


def _row_squared_norms(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``‖x_i‖²`` over the (float32) blocks, summed in float64 (:func:`~symmerge.match.certificate.row_dots` per block)."""
    return sum(row_dots(x, x).double() for x in blocks)


def _sample_rows(xs: list[torch.Tensor], ys: list[torch.Tensor], sample: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``S[sample, :]`` in float32, the model's neurons converted ``NEURON_CHUNK`` at a time."""
    xs_s = [_neurons(x, sample, device) for x in xs]
    n = ys[0].shape[0]
    rows = torch.empty(len(sample), n, dtype=torch.float32, device=device)
    for lo in range(0, n, NEURON_CHUNK):
        rows[:, lo : lo + NEURON_CHUNK] = sum(x @ _neurons(y, slice(lo, lo + NEURON_CHUNK), device).T for x, y in zip(xs_s, ys))
    return rows


def _diagonal_and_norms(xs: list[torch.Tensor], ys: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``S[i, i]`` (float32) and the squared row norms ``‖x_i‖²``, ``‖y_i‖²`` (float64) in one pass over the
    neurons, ``NEURON_CHUNK`` at a time converted to float32 once for all three."""
    n = xs[0].shape[0]
    diag = torch.empty(n, dtype=torch.float32, device=device)
    x_sq, y_sq = (torch.empty(n, dtype=torch.float64, device=device) for _ in range(2))
    for lo in range(0, n, NEURON_CHUNK):
        part = slice(lo, lo + NEURON_CHUNK)
        cx, cy = [_neurons(x, part, device) for x in xs], [_neurons(y, part, device) for y in ys]
        diag[part] = sum(row_dots(x, y) for x, y in zip(cx, cy))
        x_sq[part], y_sq[part] = _row_squared_norms(cx), _row_squared_norms(cy)
    return diag, x_sq, y_sq


def ffn_similarity_or_identity(reference: FFNTensors, model: FFNTensors, device: torch.device | str | None = None) -> torch.Tensor | None:
    """:func:`ffn_similarity`, or ``None`` when the identity permutation is proven optimal from a fraction of it
    (:func:`identity_certified`: fine-tunes of one base, whose neurons still correspond) — a fraction of the GEMM
    work. Where the identity is not certified, the matrix is :func:`ffn_similarity`'s, bit for bit (the sample
    costs ~1 % more; an attempt that failed, up to 25 %)."""
    return None if identity_certified(reference, model, device) else ffn_similarity(reference, model, device)


def identity_certified(reference: FFNTensors, model: FFNTensors, device: torch.device | str | None = None) -> bool:
    """Whether the identity permutation is proven optimal for :func:`ffn_similarity`'s ``S`` from a fraction of it.

    ``S[i, j] = ⟨x_i, y_j⟩`` over ``K`` features (the rows of ``W_in``, ``b_in``, the columns of ``W_out``). After
    the first ``k`` features are summed into ``S_k``, Cauchy–Schwarz bounds the rest:
    ``S[i, j] ≤ S_k[i, j] + ‖x_i^{>k}‖ ‖y_j^{>k}‖``, while the diagonal ``S[i, i]`` is computed exactly (row-wise
    dot products, O(d_ff·K)). If every diagonal entry beats the bound of every other entry of its row (or every one
    of its column), after subtracting a potential (:func:`~symmerge.match.certificate.diagonal_dominates`) — net of
    float32's worst-case rounding ``(K+2)u ‖x_i‖ ‖y_j‖`` per entry, counted for both this
    function's sums and :func:`ffn_similarity`'s, and by a relative ``CERTIFY_MARGIN`` —
    then ``S[i, i] ≥ max_j S[i, j]`` holds for the exact ``S`` and for the float32 one :func:`ffn_similarity`
    computes, which is :func:`~symmerge.match.lap.identity_is_optimal`'s condition: :func:`~symmerge.match.lap.solve_lap`
    would return the identity (on its bfloat16 path's ``S``, rounded further, the identity is still the exact
    optimum). Tried at ``CERTIFY_FRACTIONS`` of the features, only when the full rows of ``CERTIFY_SAMPLE`` sampled
    neurons are diagonal-dominant."""
    device = torch.device("cpu") if device is None else torch.device(device)
    xs, ys = _blocks(reference), _blocks(model)  # stored dtype; converted to float32 chunk by chunk
    n, total = xs[0].shape[0], sum(x.shape[1] for x in xs)
    if n > 1:
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(CERTIFY_SAMPLE, n)]
        rows = _sample_rows(xs, ys, sample, device)
        on_diagonal = (torch.arange(len(sample), device=device), sample.to(device))
        sample_diag = rows[on_diagonal].clone()
        rows[on_diagonal] = -torch.inf
        # independent models: the sample rules the identity out, before any O(d_ff·K) pass over every row
        # (on BERT-base the diagonal and the norms below took ~1 s of a 8 s CLI run, for nothing)
        if not bool((rows.max(1).values <= sample_diag).all()):
            return False
        diag, x_sq, y_sq = _diagonal_and_norms(xs, ys, device)
        # float32 rounding: any computed entry is within γ‖x_i‖‖y_j‖ of the exact one (γ = (K+2)u, dot products of
        # K terms, in any order); counted twice on each side, for this function's sums and for ffn_similarity's
        gamma = (total + 2) * UNIT_ROUNDOFF
        x_norm, y_norm = x_sq.sqrt().float(), y_sq.sqrt().float()
        diag = diag - 2 * gamma * x_norm * y_norm
        done = 0
        s = None
        for fraction in CERTIFY_FRACTIONS:
            upto = max(int(total * fraction), done + 1)
            cx = [_f32(x, device) for x in feature_columns(xs, done, upto)]
            cy = [_f32(y, device) for y in feature_columns(ys, done, upto)]
            for x, y in zip(cx, cy):
                s = torch.mm(x, y.T) if s is None else s.addmm_(x, y.T)  # the first product allocates (no zero fill)
            x_sq, y_sq = x_sq - _row_squared_norms(cx), y_sq - _row_squared_norms(cy)
            del cx, cy
            done = upto
            # the unseen features' norms, ‖x^{>k}‖² = ‖x‖² − ‖x^{≤k}‖² (float64; a rounding below zero is no norm);
            # bound = s + ‖x^{>k}‖‖y^{>k}‖ᵀ + 2γ‖x‖‖y‖ᵀ, formed and checked a block of rows at a time
            if diagonal_dominates_blocked(s, x_sq.clamp_min(0).sqrt().float(), y_sq.clamp_min(0).sqrt().float(), 2 * gamma,
                                          diag, x_norm, y_norm):
                return True
    return False
