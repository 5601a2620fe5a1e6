"""Weight matching (data-free): the ``weights`` matcher. Per-layer classes alone are solved once, exactly per
group; with the residual class, by coordinate descent (:mod:`symmerge.match.residual`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.match.fit import Fit, matcher
from symmerge.match.per_layer import fit_per_layer
from symmerge.match.residual import fit_with_residual
from symmerge.spec import ModelSpec


@matcher("weights")
def match_weights(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                  symmetries: frozenset[str], *, progress: bool = False, model_name: str = "model", max_seconds: float | None = None,
                  device: torch.device | None = None, executor: Any = None, model_spec: ModelSpec | None = None, **_unused) -> Fit:
    """Minimise ``Σ_t ‖T(θ_model)_t − θ_ref,t‖²`` over the chosen classes (the objective of
    :mod:`symmerge.match.objective`). Data and config are not needed (``_unused``). ``max_seconds``: the time budget
    of the residual descent (:func:`~symmerge.match.residual.fit_with_residual`); ``executor``: where the per-layer
    fits run (:class:`symmerge.match.distributed.RayExecutor`), ``None`` for this process. ``model_spec``: a narrower
    model's own spec (:func:`~symmerge.match.per_layer.fit_per_layer`; per-layer classes only)."""
    if "residual" in symmetries:
        if model_spec is not None:
            raise SymmergeError("the residual class is not available for models of different widths")
        return fit_with_residual(reference, model, spec, symmetries, progress=progress, model_name=model_name, max_seconds=max_seconds,
                                 device=device, executor=executor)
    return fit_per_layer(reference, model, spec, symmetries, progress=progress, model_name=model_name, device=device, executor=executor,
                         model_spec=model_spec, distances=True)
