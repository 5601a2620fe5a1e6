"""FFN neuron permutation (docs/DESIGN.md §1): ``W_in → P^T W_in``, ``b_in → b_in P``, ``W_out → W_out P``.

A permutation is stored as an index vector ``perm`` (d_ff,): neuron ``j`` of the result is neuron ``perm[j]`` of
the input, i.e. ``W_in → W_in[perm]``, ``b_in → b_in[perm]``, ``W_out → W_out[:, perm]``.
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


def read_ffn(view: StateView, group: FFNGroup) -> FFNTensors:
    return FFNTensors(
        [view.get(s) for s in group.inputs], [view.get(s) for s in group.input_biases], [view.get(s) for s in group.outputs]
    )


def permute_ffn(t: FFNTensors, perm: torch.Tensor) -> FFNTensors:
    return FFNTensors([w[perm] for w in t.in_weights], [b[perm] for b in t.in_biases], [w[:, perm] for w in t.out_weights])


def write_ffn(view: StateView, group: FFNGroup, t: FFNTensors) -> None:
    for slot, value in zip(group.inputs, t.in_weights):
        view.set(slot, value)
    for slot, value in zip(group.input_biases, t.in_biases):
        view.set(slot, value)
    for slot, value in zip(group.outputs, t.out_weights):
        view.set(slot, value)


def is_identity(perm: torch.Tensor) -> bool:
    return bool(torch.equal(perm, torch.arange(len(perm), device=perm.device)))
