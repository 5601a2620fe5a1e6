"""FFN neuron matching: Git Re-Basin weight matching, one exact LAP per FFN (Zhang et al. 2025, eq. 6-7)."""

from __future__ import annotations

import torch

from symmerge.groups.ffn import FFNTensors


def ffn_similarity(reference: FFNTensors, model: FFNTensors, device: torch.device | str | None = None) -> torch.Tensor:
    """``S[i, j]`` = similarity of reference neuron ``i`` and model neuron ``j`` (d_ff,ref × d_ff,model, float32):

        S = W_in,ref W_in,model^T + b_ref^T b_model + W_out,ref^T W_out,model     (summed over gate/up inputs)

    Built in place with ``addmm_`` so only the output is allocated, on ``device`` (default: the CPU; the inputs
    are moved there, and ``S`` stays there: move it to the CPU for the LAP).
    """
    n, m = reference.in_weights[0].shape[0], model.in_weights[0].shape[0]
    device = torch.device("cpu") if device is None else torch.device(device)

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float32)

    s = torch.zeros(n, m, dtype=torch.float32, device=device)
    for a, b in zip(reference.in_weights, model.in_weights):
        s.addmm_(f32(a), f32(b).T)
    for a, b in zip(reference.in_biases, model.in_biases):
        s.addr_(f32(a), f32(b))
    for a, b in zip(reference.out_weights, model.out_weights):
        s.addmm_(f32(a).T, f32(b))
    return s
