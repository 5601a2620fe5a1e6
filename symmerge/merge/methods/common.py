"""Helpers every method shares: input checks, weights, the compute dtype, task vectors, chunked elementwise
evaluation and the single rounding to the output dtype."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.merge.methods.registry import Bool, validate_params

Tensor = torch.Tensor


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_inputs(method: str, tensors: Sequence[Tensor], name: str | None, *, base: Tensor | None = None, needs_base: bool = False) -> None:
    where = f" (tensor {name!r})" if name else ""
    if len(tensors) == 0:
        raise SymmergeError(f"{method}: no tensors to merge{where}")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if not (t.is_floating_point()):
            raise SymmergeError(f"{method}: cannot merge a {t.dtype} tensor{where}; copy it from one model instead")
        if t.element_size() == 1:  # float8: quantised weights, whose scales live in other tensors
            raise SymmergeError(f"{method}: cannot merge a {t.dtype} tensor{where}: float8 weights are quantised; "
                                f"dequantise the model to bfloat16 or float32 first")
        if t.shape != shape:
            raise SymmergeError(f"{method}: model {i} has shape {tuple(t.shape)}, model 0 {tuple(shape)}{where}")
    if needs_base and base is None:
        raise SymmergeError(f"{method}: needs the base model's tensor{where}")
    if base is not None and needs_base and base.shape != shape:
        raise SymmergeError(f"{method}: base has shape {tuple(base.shape)}, models {tuple(shape)}{where}")


def _weights(method: str, weights: Sequence[float] | None, n: int, *, nonnegative: bool = False) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise SymmergeError(f"{method}: got {len(w)} weights for {n} models")
    # the tensors are combined in float32: a weight (or a sum of them) past its range would overflow mid-merge
    if not all(math.isfinite(x) for x in w) or not sum(abs(x) for x in w) <= torch.finfo(torch.float32).max:
        raise SymmergeError(f"{method}: weights must be finite, with magnitudes summing to at most 3.4e38, got {w}")
    if nonnegative and (any(x < 0 for x in w) or sum(w) <= 0):
        raise SymmergeError(f"{method}: weights must be >= 0 with a positive sum, got {w}")
    return w


def _params(method: str, **values: Any) -> dict[str, Any]:
    """Validate a direct call's parameters with the same checks as a recipe (cheap: a few dict operations)."""
    return validate_params(method, values)


def _task_vector(theta: Tensor, base: Tensor, dtype: torch.dtype) -> Tensor:
    """``θ − base`` in ``dtype``, as a fresh tensor the caller may modify (the inputs are left untouched)."""
    return theta.to(dtype, copy=True).sub_(base)




#: Elementwise methods run chunk by chunk (:func:`_chunked`): a float32 accumulator of this many entries stays in
#: cache, where whole-tensor float32 temporaries cost fresh pages (several times slower) and peak memory.
ELEMENTWISE_CHUNK = 1 << 20


def _chunked(fn: Callable[[list[Tensor], Tensor], Tensor], inputs: Sequence[Tensor], dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """``fn(chunks, acc)`` over the flattened ``inputs`` (one shape) chunk by chunk: ``acc`` is a zeroed ``dtype``
    buffer of the chunk's size, ``fn`` returns the chunk's result (in ``dtype``), rounded once to ``out_dtype``.
    For elementwise methods only: each entry goes through the same operations as on the whole tensor."""
    flat = [x.reshape(-1) for x in inputs]
    n = flat[0].numel()
    out = torch.empty(n, dtype=out_dtype, device=flat[0].device)
    acc = torch.empty(min(n, ELEMENTWISE_CHUNK), dtype=dtype, device=flat[0].device)
    for s in range(0, n, ELEMENTWISE_CHUNK):
        e = min(s + ELEMENTWISE_CHUNK, n)
        out[s:e].copy_(fn([x[s:e] for x in flat], acc[: e - s].zero_()))
    return out.view(inputs[0].shape)


def _out(x: Tensor, tensors: Sequence[Tensor], out_dtype: torch.dtype | None) -> Tensor:
    """The single rounding of a result computed in float32/float64: to ``out_dtype`` (default ``tensors[0]``'s)."""
    return x.to(out_dtype or tensors[0].dtype)


def _broadcast(method: str, key: str, value: Any, n: int) -> list:
    """A per-model parameter as one value per model: a scalar repeated, or a list of exactly ``n`` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SymmergeError(f"{method}: got {len(value)} values of {key} for {n} models")
        return list(value)
    return [value] * n


# mergekit's int8_mask stores TIES' sign mask as int8 to save memory; the mask's values are the same either way
INT8_MASK_NOTE = "a mergekit memory option; {method} computes in float32 here, so it changes nothing"
_INT8 = Bool(False, help="accepted for mergekit recipes; no effect (symmerge's masks are bool)", no_effect=INT8_MASK_NOTE)


#: float64 reductions read their inputs in slices of this many entries (no whole-tensor float64 copy).
_DOT_CHUNK = 1 << 22


def _dot64(x: Tensor, y: Tensor) -> float:
    """``⟨x, y⟩`` accumulated in float64, in chunks (no full-size float64 copies)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return sum(float(torch.dot(x[i : i + _DOT_CHUNK].double(), y[i : i + _DOT_CHUNK].double())) for i in range(0, x.numel(), _DOT_CHUNK))


#: The spherical kernels (slerp, multislerp, karcher) and model_stock read their inputs in blocks of this many
#: entries — once for the float64 Gram matrix of the models, once for the output — so no whole-tensor float32 or
#: float64 temporary is made (fresh pages for each cost more time than the arithmetic, and peak memory).
GRAM_CHUNK = 1 << 18


def _row_blocks(rows: int, cols: int) -> Iterator[tuple[slice, slice]]:
    """Blocks of at most ``GRAM_CHUNK`` entries of a ``rows × cols`` matrix: whole rows at a time, or pieces of one
    row when a row alone is longer."""
    row_step, col_step = max(1, GRAM_CHUNK // max(cols, 1)), max(1, min(cols, GRAM_CHUNK))
    for r in range(0, rows, row_step):
        for c in range(0, cols, col_step):
            yield slice(r, min(r + row_step, rows)), slice(c, min(c + col_step, cols))


def _vectors_(out: Tensor, tensors: Sequence[Tensor], base: Tensor | None, rs: slice, cs: slice) -> Tensor:
    """Block ``[rs, cs]`` of each model's vector — ``θ_i``, or ``θ_i − base`` formed in ``out``'s dtype as
    :func:`_task_vector` does (so the same bits) — written into ``out`` (``M × block``), which is returned."""
    for i, x in enumerate(tensors):
        out[i].copy_(x[rs, cs])
        if base is not None:
            out[i].sub_(base[rs, cs])
    return out


def _row_gram64(tensors: Sequence[Tensor], base: Tensor | None, dtype: torch.dtype, rows: tuple[int, int]) -> Tensor:
    """Per row of the ``rows`` view, the float64 Gram matrix ``G[r, i, j] = ⟨v_i[r], v_j[r]⟩`` of the vectors
    ``v_i = θ_i`` (or ``θ_i − base``, in ``dtype``), shape ``R × M × M``; one pass over the inputs, block by block."""
    views = [x.reshape(rows) for x in tensors]
    b = None if base is None else base.reshape(rows)
    n_rows, cols = views[0].shape
    m = len(views)
    gram = torch.zeros(n_rows, m, m, dtype=torch.float64, device=views[0].device)
    size = min(views[0].numel(), GRAM_CHUNK)  # the largest block of _row_blocks
    scratch = torch.empty(m, max(size, 1), dtype=dtype, device=views[0].device)
    wide = torch.empty(m, max(size, 1), dtype=torch.float64, device=views[0].device) if dtype != torch.float64 else None
    for rs, cs in _row_blocks(n_rows, cols):
        r, c = rs.stop - rs.start, cs.stop - cs.start
        block = _vectors_(scratch[:, : r * c].view(m, r, c), views, b, rs, cs)
        if wide is not None:
            block = wide[:, : r * c].view(m, r, c).copy_(block)
        by_row = block.transpose(0, 1)  # r × M × c
        gram[rs].add_(torch.bmm(by_row, by_row.transpose(1, 2)))
    return gram


def _gram64(tensors: Sequence[Tensor], base: Tensor | None, dtype: torch.dtype) -> list[list[float]]:
    """The float64 Gram matrix of the flattened vectors ``θ_i`` (or ``θ_i − base``), as nested lists."""
    return _row_gram64(tensors, base, dtype, (1, -1))[0].tolist()
