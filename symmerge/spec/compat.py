"""Can two checkpoints be aligned? Shape and family checks, run on configs and safetensors headers before any
weight is read, each failing with a one-line error that names the first difference."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from symmerge.errors import SymmergeError
from symmerge.spec.base import ModelSpec


def check_same_shape(reference: ModelSpec, other: ModelSpec, other_name: str = "model") -> None:
    """Raise a one-line error naming the first architectural value (family, layers, widths...) that differs."""
    for what, ref_value in reference.shape().items():
        value = other.shape()[what]
        if value != ref_value:
            raise SymmergeError(
                f"{other_name} has {what} {value}, the reference has {ref_value}: these cannot be aligned"
            )


def check_compatible_shapes(reference: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]], model_name: str = "model",
                            optional: frozenset[str] = frozenset()) -> None:
    """Same tensor names and shapes, or a one-line error naming the first difference. ``optional`` keys may be
    missing on either side (a tied LM head that folding unties)."""
    missing = sorted(set(reference) - set(model) - optional)
    extra = sorted(set(model) - set(reference) - optional)
    if missing or extra:
        which, key = ("lacks", missing[0]) if missing else ("has an extra", extra[0])
        more = len(missing) + len(extra) - 1
        raise SymmergeError(f"{model_name} {which} tensor {key!r}" + (f" (and {more} more differences)" if more else ""))
    for key, shape in reference.items():
        if key in model and tuple(shape) != tuple(model[key]):
            raise SymmergeError(f"tensor {key!r} has shape {tuple(model[key])} in {model_name}, {tuple(shape)} in the reference")


def check_compatible(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], model_name: str = "model",
                     optional: frozenset[str] = frozenset()) -> None:
    """:func:`check_compatible_shapes` on two state dicts (a memory-mapped one's shapes come from its headers:
    nothing is read)."""
    check_compatible_shapes(_shapes(reference), _shapes(model), model_name, optional)


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape: ``state.shapes()`` where it has one (:class:`~symmerge.io.stream.LazyState`, from the
    headers), else from the tensors."""
    shapes = getattr(state, "shapes", None)
    return shapes() if callable(shapes) else {k: tuple(v.shape) for k, v in state.items()}


def tied_head(spec: ModelSpec | None) -> tuple[str, str] | None:
    """``(head key, embedding key)`` when the family may tie its LM head to the embedding (a tied checkpoint then
    stores no head: the embedding stands in for it), else ``None``."""
    return spec.residual.tied if spec is not None and spec.residual is not None else None


def untied_head(spec: ModelSpec, symmetries: frozenset[str]) -> frozenset[str]:
    """The LM-head key that may exist in one checkpoint only: folding the final norm into a tied head unties it, so
    a folded (untied) checkpoint holds it and a tied one does not — when the residual class is on."""
    if "residual" in symmetries and spec.residual is not None and spec.residual.tied is not None:
        return frozenset({spec.residual.tied[0]})
    return frozenset()
