"""The residual-stream symmetry (docs/DESIGN.md §1): one d×d map ``Q`` shared by every layer.

Norm layers stand in the way of a general ``Q``: an RMSNorm commutes with any orthogonal ``Q`` once its gain is
folded into the linear layers that read it (SliceGPT); a LayerNorm, once gain and bias are folded, is centring
plus RMS normalisation, which commutes with the orthogonal maps that fix the all-ones direction. Folding changes
the parametrisation, not the function, and the result is still a standard checkpoint of the same architecture
(norm gains 1, biases 0; a tied LM head becomes untied).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import replace

import torch

from symmerge.errors import SymmergeError
from symmerge.spec.base import ResidualGroup, StateView


def is_tied(state: Mapping[str, torch.Tensor], residual: ResidualGroup) -> bool:
    """Whether ``state`` ties its head to the embedding: the head is absent (a tied checkpoint on disk) or shares
    the embedding's storage (a live tied module)."""
    if residual.tied is None:
        return False
    head, embedding = residual.tied
    return head not in state or state[head].data_ptr() == state[embedding].data_ptr()


def with_untied_head(state: Mapping[str, torch.Tensor], residual: ResidualGroup) -> dict[str, torch.Tensor]:
    """``state`` with a head of its own (a copy of the embedding) where it ties them; else ``state`` as it is."""
    out = dict(state)
    if is_tied(state, residual):
        head, embedding = residual.tied
        out[head] = state[embedding].clone()
    return out


def fold_norms(state: Mapping[str, torch.Tensor], residual: ResidualGroup) -> dict[str, torch.Tensor]:
    """Fold every norm's gain ``γ = offset + w`` (and bias ``β``) into its readers: ``W → W diag(γ)``,
    ``b → b + W β``; the norm keeps ``γ = 1`` (stored ``w = 1 − offset``: 0 for Gemma's ``1 + w``) and ``β = 0`` —
    or ``β/γ`` (and no reader absorbs it) where a reader has no bias to absorb it (GPT-2's LM head)."""
    view = StateView(with_untied_head(state, residual))  # the head will differ from the embedding
    for norm in residual.norms:
        gamma = view.get(norm.weight) + norm.offset
        beta = view.get(norm.bias) if norm.bias else None
        # all or nothing: a reader without a bias (GPT-J's q/k/v beside fc_in, both reading ln_1) keeps β in the norm,
        # and then no reader may absorb it as well (unfold_norms makes the same choice)
        keep_beta = beta is not None and any(b is None for b in norm.reader_biases)
        for reader, reader_bias in zip(norm.readers, norm.reader_biases):
            w = view.get(reader)
            if beta is not None and not keep_beta:
                view.set(reader_bias, view.get(reader_bias) + w @ beta)
            view.set(reader, w * gamma)
        if keep_beta:
            if bool((gamma == 0).any()):
                raise SymmergeError(f"cannot fold {norm.weight.key}: a zero gain with a bias no reader can absorb")
            view.set(norm.bias, beta / gamma)
        elif norm.bias:
            view.set(norm.bias, torch.zeros_like(beta))
        view.set(norm.weight, torch.full_like(gamma, 1.0 - norm.offset))
    return dict(view.state)


def can_unfold(reference: Mapping[str, torch.Tensor], residual: ResidualGroup) -> bool:
    """Whether :func:`unfold_norms` can use ``reference``'s gains: every one nonzero."""
    view = StateView(reference)
    return all(bool(((view.get(n.weight) + n.offset) != 0).all()) for n in residual.norms)


def unfold_norms(state: Mapping[str, torch.Tensor], residual: ResidualGroup, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A folded ``state`` (norm gains 1, as :func:`fold_norms` leaves it) rewritten with ``reference``'s norm gains
    ``γ_R`` and biases ``β_R``, computing the same function: the inverse of folding, with another model's norms.

    For a norm whose folded output is ``x̂ + c`` (``c`` its remaining bias, 0 unless a reader has no bias), read by
    ``W x + b``: ``W → W diag(1/γ_R)`` and the norm takes ``γ_R``; then ``β_R`` with ``b → b + W c − W_u β_R``
    where every reader has a bias, else ``β = γ_R ⊙ c`` and ``b`` unchanged (``W_u β = W c`` exactly). Unfolding
    the folded reference itself gives the reference back, and since the map is affine in the folded tensors,
    averaging the reference with an unfolded aligned model is the unfolded average of the folded models. Needs
    nonzero gains (:func:`can_unfold`). A head folding untied stays untied (it now differs from the embedding).
    """
    view, ref = StateView(state), StateView(reference)
    for norm in residual.norms:
        gamma = ref.get(norm.weight) + norm.offset
        c = view.get(norm.bias) if norm.bias else None
        readers_have_biases = all(b is not None for b in norm.reader_biases)
        beta = ref.get(norm.bias) if norm.bias and readers_have_biases else (gamma * c if c is not None else None)
        for reader, reader_bias in zip(norm.readers, norm.reader_biases):
            w = view.get(reader)
            w_unfolded = w / gamma
            if reader_bias is not None and c is not None:
                view.set(reader_bias, view.get(reader_bias) + w @ c - w_unfolded @ beta)
            view.set(reader, w_unfolded)
        if beta is not None:
            view.set(norm.bias, beta)
        view.set(norm.weight, gamma - norm.offset)
    return dict(view.state)


def compute_dtype(*stored: torch.dtype) -> torch.dtype:
    """float64 for float32/float64 tensors (as exact as the stored values); float32 for 16-bit ones, whose rounding
    (~1e-3) dwarfs float32's (~1e-7) — at half the memory traffic and twice the speed of float64 (a 1B model's
    ``Q`` is 4 TFLOP per application)."""
    return torch.float64 if any(d in (torch.float32, torch.float64) for d in stored) else torch.float32


def apply_residual(state: Mapping[str, torch.Tensor], residual: ResidualGroup, q: torch.Tensor,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``Q`` applied to every tensor that touches the stream (the state must already be folded), the products in
    ``dtype``: by default :func:`compute_dtype` of each stored tensor; learned matching's steps pass float32, the
    dtype of the loss they feed."""
    view = StateView(state)
    for slot in residual.embeddings + residual.readers + residual.vectors:
        d = dtype or compute_dtype(view.stored(slot.key).dtype)
        view.set(slot, view.get(slot).to(d) @ q.to(d))
    for slot in residual.writers:
        d = dtype or compute_dtype(view.stored(slot.key).dtype)
        view.set(slot, q.T.to(d) @ view.get(slot).to(d))
    return dict(view.state)


def residual_correlation(model: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], residual: ResidualGroup,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """``M`` (d×d) with ``Σ_t ‖Q(model_t) − reference_t‖² = const − 2 tr(Q^T M)``:
    ``M = Σ E_1^T E_2 + Σ W_1^T W_2 (readers) + Σ W_1 W_2^T (writers) + Σ b_1^T b_2``, computed on ``device``
    (default: the CPU; each tensor is moved there before its product, and ``M`` stays there), accumulated in
    float64, each product in :func:`compute_dtype`. The terms are taken in ``model``'s own key order, so a lazily
    transformed model (:class:`~symmerge.groups.stream.TransformedState`) computes each of its units once."""
    a, b = StateView(model), StateView(reference)
    device = torch.device("cpu") if device is None else torch.device(device)
    m = torch.zeros(residual.width, residual.width, dtype=torch.float64, device=device)
    terms = [(s, "reader") for s in residual.embeddings + residual.readers] + [(s, "writer") for s in residual.writers]
    terms += [(s, "vector") for s in residual.vectors]
    order = {k: i for i, k in enumerate(model)}
    for slot, kind in sorted(terms, key=lambda t: order.get(t[0].key, -1)):
        dtype = compute_dtype(a.stored(slot.key).dtype, b.stored(slot.key).dtype)
        x, y = a.get(slot).to(device=device, dtype=dtype), b.get(slot).to(device=device, dtype=dtype)
        if kind == "reader":
            m += (x.T @ y).double()
        elif kind == "writer":
            m += (x @ y.T).double()
        else:
            m += torch.outer(x.double(), y.double())
    return m


def anchor_group(residual: ResidualGroup, moved: Collection[str]) -> ResidualGroup | None:
    """The part of ``residual`` whose other axis no per-layer group moves: its slots whose tensor is not in
    ``moved`` (the keys the per-layer groups touch) — embeddings and position tables, the LM head or classifier,
    a patch projection, writer biases and norm biases. Their terms of :func:`residual_correlation` compare the two
    models axis for axis before any neuron or head is matched; the per-layer terms are noise until then.
    ``None`` if no slot is left. The norms are dropped: fold them first."""
    keep = lambda slots: tuple(s for s in slots if s.key not in moved)  # noqa: E731
    anchors = replace(residual, embeddings=keep(residual.embeddings), readers=keep(residual.readers),
                      writers=keep(residual.writers), vectors=keep(residual.vectors), norms=())
    if not (anchors.embeddings or anchors.readers or anchors.writers or anchors.vectors):
        return None
    return anchors


def centered_basis(d: int) -> torch.Tensor:
    """An orthonormal basis (d, d−1) of the complement of the all-ones direction."""
    ones = torch.full((d, 1), 1 / math.sqrt(d), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([ones, torch.eye(d, dtype=torch.float64)[:, : d - 1]], 1))
    return q[:, 1:] * torch.sign(q[:, :1].sum())  # columns orthogonal to ones


def embed_centered(inner: torch.Tensor) -> torch.Tensor:
    """``Q = u u^T + V Q' V^T``: the orthogonal map fixing ``u = 1/√d`` that acts as ``Q'`` on its complement."""
    d = inner.shape[0] + 1
    v = centered_basis(d)
    u = torch.full((d, 1), 1 / math.sqrt(d), dtype=torch.float64)
    return u @ u.T + v @ inner.to(torch.float64) @ v.T
