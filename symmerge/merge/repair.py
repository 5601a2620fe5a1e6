"""REPAIR after merging (Jordan et al. 2022), adapted to transformers: reset the merged model's FFN pre-activation
statistics from calibration data.

Averaging two aligned models shrinks the variance of hidden units whose endpoints do not agree exactly (the
"variance collapse" REPAIR names). For every FFN, channel ``j`` of the input projection's output
``h = W_in x + b_in`` (before the activation function) gets the mean and standard deviation interpolated from the
endpoints', ``μ_t = (1−t) μ_A + t μ_B`` (σ likewise), measured on the same calibration batches in the common
(aligned) basis. The correction ``h → s ⊙ (h − μ_m) + μ_t``, ``s = σ_t / σ_m``, is folded into the weights
(``W_in → diag(s) W_in``, ``b_in → s ⊙ (b_in − μ_m) + μ_t``), layer after layer, so each layer's statistics are
measured with the earlier layers already repaired. LayerNorm/RMSNorm layers renormalise the residual stream
themselves, so the FFN pre-activations are where the collapse is left to repair. Gated FFNs and input projections
without a bias are skipped (the shift needs a bias; gate × up is not one channel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from symmerge.io.hf import build_model, untied_config
from symmerge.spec import ModelSpec, StateView, spec_for

Stats = list[tuple[torch.Tensor, torch.Tensor] | None]  # per FFN group: (mean, std) per channel, None if skipped


def _repairable(spec: ModelSpec) -> list[bool]:
    return [len(g.inputs) == 1 and len(g.input_biases) == 1 for g in spec.ffn]


@torch.no_grad()
def ffn_statistics(config: Any, state: Mapping[str, torch.Tensor], batches: Sequence[Mapping[str, torch.Tensor]], untie: bool,
                   only: int | None = None) -> Stats:
    """Per FFN group (checkpoint order): per-channel mean and std of ``W_in x + b_in`` over every position of
    ``batches`` (``only``: that group alone)."""
    model = build_model(untied_config(config, untie), state)
    live = spec_for(model.config, model.state_dict().keys())
    sums: dict[int, list] = {}
    hooks = []
    for i, (g, ok) in enumerate(zip(live.ffn, _repairable(live))):
        if not ok or (only is not None and i != only):
            continue
        sums[i] = [0, 0.0, 0.0]

        def hook(module, inputs, output, i=i):
            h = output.detach().double().reshape(-1, output.shape[-1])
            sums[i][0] += h.shape[0]
            sums[i][1] = sums[i][1] + h.sum(0)
            sums[i][2] = sums[i][2] + (h * h).sum(0)
        hooks.append(model.get_submodule(g.inputs[0].key.removesuffix(".weight")).register_forward_hook(hook))
    try:
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
    out: Stats = []
    for i in range(len(live.ffn)):
        if i not in sums:
            out.append(None)
            continue
        n, s1, s2 = sums[i]
        mean = s1 / n
        out.append((mean, (s2 / n - mean * mean).clamp_min(0).sqrt()))
    return out


def repair(state: Mapping[str, torch.Tensor], config: Any, spec: ModelSpec, batches: Sequence[Mapping[str, torch.Tensor]],
           stats_a: Stats, stats_b: Stats, t: float = 0.5, untie: bool = False, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """``state`` (the merged model ``(1−t) A + t B'``) with every repairable FFN's pre-activation statistics reset to
    the endpoints' interpolated ones (module docstring); ``stats_a``, ``stats_b`` from :func:`ffn_statistics`."""
    out = dict(state)
    for i, group in enumerate(spec.ffn):
        if stats_a[i] is None or stats_b[i] is None:
            continue
        mean_m, std_m = ffn_statistics(config, out, batches, untie, only=i)[i]
        mean_t = (1 - t) * stats_a[i][0] + t * stats_b[i][0]
        std_t = (1 - t) * stats_a[i][1] + t * stats_b[i][1]
        s = std_t / std_m.clamp_min(eps)
        view = StateView(out)
        w, b = group.inputs[0], group.input_biases[0]
        dtype = view.get(w).dtype
        view.set(w, (view.get(w).double() * s[:, None]).to(dtype))
        view.set(b, (s * (view.get(b).double() - mean_m) + mean_t).to(dtype))
        out = dict(view.state)
    return out
