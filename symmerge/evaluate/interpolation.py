"""Linear mode connectivity: the path θ(t) = (1 − t)·θ_A + t·θ_B' and its loss barrier (docs/DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from symmerge.io.hf import load_weights

StateDict = Mapping[str, torch.Tensor]


def interpolate(a: StateDict, b: StateDict, t: float) -> dict[str, torch.Tensor]:
    """``(1 − t) a + t b`` for floating tensors (others from ``a``)."""
    return {k: torch.lerp(v.float(), b[k].float(), t).to(v.dtype) if v.is_floating_point() else v for k, v in a.items()}


@dataclass
class Curve:
    label: str
    ts: list[float]
    metrics: list[dict]  # per t: {"loss", ["accuracy"]}

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]

    def barrier(self) -> float:
        """``max_t [L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B))]``: how far the path rises above the straight line."""
        l0, l1 = self.losses[0], self.losses[-1]
        return max(loss - ((1 - t) * l0 + t * l1) for t, loss in zip(self.ts, self.losses))

    def at(self, t: float) -> dict:
        i = min(range(len(self.ts)), key=lambda j: abs(self.ts[j] - t))
        return self.metrics[i]


def interpolation_curve(model: torch.nn.Module, a: StateDict, b: StateDict, evaluate: Callable[[torch.nn.Module], dict],
                        ts: Sequence[float], label: str = "", progress: bool = False) -> Curve:
    """Evaluate ``model`` holding ``θ(t)`` at every ``t``; the model's weights are restored afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = []
    try:
        for t in tqdm(ts, desc=f"interpolating {label}".strip(), unit="point", disable=not progress, leave=False):
            load_weights(model, interpolate(a, b, float(t)))
            metrics.append(evaluate(model))
    finally:
        model.load_state_dict(saved)
    return Curve(label, [float(t) for t in ts], metrics)
