"""FFN neuron permutation (docs/DESIGN.md §1): ``W_in → P^T W_in``, ``b_in → b_in P``, ``W_out → W_out P``.

A permutation is stored as an index vector ``perm`` (d_ff,): neuron ``j`` of the result is neuron ``perm[j]`` of
the input, i.e. ``W_in → W_in[perm]``, ``b_in → b_in[perm]``, ``W_out → W_out[:, perm]``.

A *semi-permutation* (GLMC, Theus et al. 2025; docs/DESIGN.md §1 "models of different widths") is the same index
vector with an output width ``m`` larger than the input's ``n``: each input neuron appears once and the ``m − n``
other entries are ``EMPTY`` (−1), neurons whose input rows, bias and output column are zero. A zero neuron adds
``W_out[:, j] · act(0·x + 0) = 0`` to the output whatever ``act(0)`` is, so the embedded FFN computes exactly what
the narrow one did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from symmerge.spec.base import FFNGroup, StateView


@dataclass
class FFNTensors:
    """Canonical tensors of one FFN: every tensor indexed by neuron, neuron axis where the group acts."""

    in_weights: list[torch.Tensor]  # (d_ff, d) each: W_in, and W_gate for gated MLPs
    in_biases: list[torch.Tensor]  # (d_ff,) each
    out_weights: list[torch.Tensor]  # (d, d_ff) each: W_out


def read_ffn(view: StateView, group: FFNGroup, stored: bool = False) -> FFNTensors:
    """The group's tensors in canonical layout: float32 copies (float64 stays float64), or with ``stored`` the
    stored tensors themselves (views, their dtype; read-only: :meth:`~symmerge.spec.StateView.peek`)."""
    get = view.peek if stored else view.get
    return FFNTensors([get(s) for s in group.inputs], [get(s) for s in group.input_biases], [get(s) for s in group.outputs])


EMPTY = -1
"""The index of an empty slot in a semi-permutation: a zero neuron (or a zero head, :mod:`symmerge.groups.heads`)."""


def take(t: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` indexed along ``dim`` by ``index``, ``EMPTY`` entries giving zero slices: a permutation's action when
    ``index`` is a permutation, a semi-permutation's embedding otherwise."""
    index = index.to(t.device)
    out = t.index_select(dim, index.clamp(min=0))
    empty = index < 0
    if bool(empty.any()):
        shape = [1] * t.dim()
        shape[dim] = len(index)
        out = out.masked_fill(empty.view(shape), 0)
    return out


def permute_ffn(t: FFNTensors, perm: torch.Tensor) -> FFNTensors:
    """Neuron ``j`` of the result is input neuron ``perm[j]`` (zero where ``perm[j]`` is ``EMPTY``)."""
    return FFNTensors([take(w, perm) for w in t.in_weights], [take(b, perm) for b in t.in_biases],
                      [take(w, perm, 1) for w in t.out_weights])


def embedding(width_in: int, width_out: int) -> torch.Tensor:
    """The identity semi-permutation: input neuron ``i`` to slot ``i``, slots ``width_in …`` empty (what merging
    models of different widths without alignment means)."""
    return torch.cat([torch.arange(width_in), torch.full((width_out - width_in,), EMPTY)])


def empty_slots(perm: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the slots no input neuron fills."""
    return perm < 0


def write_ffn(view: StateView, group: FFNGroup, t: FFNTensors) -> None:
    for slot, value in zip(group.inputs, t.in_weights):
        view.set(slot, value)
    for slot, value in zip(group.input_biases, t.in_biases):
        view.set(slot, value)
    for slot, value in zip(group.outputs, t.out_weights):
        view.set(slot, value)


def is_identity(perm: torch.Tensor) -> bool:
    """Whether ``perm`` is the identity permutation (a semi-permutation that widens is not)."""
    return bool(torch.equal(perm, torch.arange(len(perm), device=perm.device)))
