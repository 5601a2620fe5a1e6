"""A model with a transform applied lazily, one unit of tensors at a time (docs/DESIGN.md §5: bounded memory).

:class:`TransformedState` is a read-only mapping over a state (a memory-mapped :class:`~symmerge.io.stream.LazyState`
or a dict) that computes, on access, what the whole-model functions compute — norm folding
(:func:`~symmerge.groups.residual.fold_norms`), the residual map (:func:`~symmerge.groups.residual.apply_residual`),
every per-layer group element (:func:`~symmerge.groups.transform.apply_to_group`) and unfolding with a reference's
norms (:func:`~symmerge.groups.residual.unfold_norms`) — restricted to the *unit* of the key asked for: the smallest
set of tensors those operations couple (a symmetry group's tensors, plus the norm that feeds them and the norm's
other readers). The same operations run on the same tensors in the same order, so every value is the one the
whole-model path gives; only a few units are held at a time (the last ``cache`` ones), whatever the model's size.
Iteration yields keys unit by unit, so one pass computes each unit once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch

from symmerge.groups.residual import apply_residual, fold_norms, unfold_norms
from symmerge.groups.transform import ModelTransform, apply_to_group, require_residual
from symmerge.spec.base import ModelSpec, ResidualGroup, StateView


def _units(spec: ModelSpec, keys: list[str], residual: ResidualGroup | None) -> list[list[str]]:
    """Partition ``keys`` into units (union-find over the keys each group or folded norm couples), in key order."""
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def join(slot_keys) -> None:
        present = [k for k in slot_keys if k in parent]
        for k in present[1:]:
            parent[find(k)] = find(present[0])

    for group in spec.groups():
        join([s.key for s in group.slots()])
    if residual is not None:
        for norm in residual.norms:
            join([s.key for s in (norm.weight, norm.bias, *norm.readers, *norm.reader_biases) if s is not None])
    units: dict[str, list[str]] = {}
    for k in keys:
        units.setdefault(find(k), []).append(k)
    return list(units.values())


def _restrict(residual: ResidualGroup, keys: set[str]) -> ResidualGroup:
    keep = lambda slots: tuple(s for s in slots if s.key in keys)  # noqa: E731
    return replace(residual, embeddings=keep(residual.embeddings), readers=keep(residual.readers), writers=keep(residual.writers),
                   vectors=keep(residual.vectors), norms=tuple(n for n in residual.norms if n.weight.key in keys), tied=None)


class TransformedState(Mapping[str, torch.Tensor]):
    """``state`` seen through ``fold`` (norms folded), ``transform`` (residual map, then per-layer elements) and
    ``unfold_with`` (a reference whose norm gains the result is unfolded with), computed one unit at a time.

    With ``fold`` (or ``untie``) and a tied head stored as the embedding only, the head is a key of its own (folding
    unties it). ``transform.residual`` acts on folded states: pass ``fold`` unless ``state`` is folded already.
    Values equal ``unfold_norms(apply_transform(state, ...), ...)`` of the whole-model path (``transform.residual``
    set), or ``apply_transform(fold_norms(state) if fold else state, ...)``, tensor for tensor and bit for bit.
    Read-only; ``cache``: how many computed units are kept (least recently used first out)."""

    def __init__(self, state: Mapping[str, torch.Tensor], spec: ModelSpec, transform: ModelTransform | None = None, *,
                 fold: bool = False, unfold_with: Mapping[str, torch.Tensor] | None = None, untie: bool = False, cache: int = 3):
        self.source, self.spec = state, spec
        self.transform = transform or ModelTransform()
        needs_residual = fold or untie or self.transform.residual is not None or unfold_with is not None
        self.residual = require_residual(spec) if needs_residual else None
        self.fold, self.unfold_with = fold, unfold_with
        keys = list(state.keys())
        self._alias: dict[str, str] = {}
        if self.residual is not None and self.residual.tied is not None:
            head, embedding = self.residual.tied
            if head not in state and embedding in state and (fold or untie):
                self._alias[head] = embedding
                keys.append(head)
        self._unit_of: dict[str, int] = {}
        self._units = _units(spec, keys, self.residual if fold or unfold_with is not None else None)
        for i, unit in enumerate(self._units):
            for k in unit:
                self._unit_of[k] = i
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache
        self._groups = {}
        for group in spec.groups():
            first = next(iter(group.slots())).key
            if first in self._unit_of:
                self._groups.setdefault(self._unit_of[first], []).append(group)
        self._identity = (not fold and self.transform.residual is None and unfold_with is None
                          and not self.transform.ffn and not self.transform.heads)

    def __iter__(self) -> Iterator[str]:
        for unit in self._units:
            yield from unit

    def __len__(self) -> int:
        return len(self._unit_of)

    def __contains__(self, key: object) -> bool:
        return key in self._unit_of

    def layout(self) -> list[tuple[str, str, tuple[int, ...]]] | None:
        """``(name, safetensors dtype name, shape)`` of every tensor, in iteration order, where the transform keeps
        the source's dtypes and shapes (per-layer elements of same-width models) and the source's headers say them
        (a memory-mapped :class:`~symmerge.io.stream.LazyState`); else ``None``. An announcement for a
        :class:`~symmerge.io.stream.ShardWriter` (``expect``), which checks every tensor against it anyway."""
        source = getattr(self.source, "layout", None)
        if not callable(source) or self.residual is not None or self.transform.source is not None or self._alias:
            return None
        known = source()
        if known is None or any(k not in known for k in self):
            return None
        return [(k, *known[k]) for k in self]

    def units(self) -> list[list[str]]:
        return [list(u) for u in self._units]

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._identity:
            return self.source[self._alias.get(key, key)]
        i = self._unit_of[key]
        if i not in self._cache:
            self._cache[i] = self._compute(self._units[i])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return self._cache[i][key]

    def _compute(self, unit: list[str]) -> dict[str, torch.Tensor]:
        sub = {k: self.source[self._alias.get(k, k)] for k in unit}
        keys = set(unit)
        residual = _restrict(self.residual, keys) if self.residual is not None else None
        if self.fold:
            sub = fold_norms(sub, residual)
        if self.transform.residual is not None:
            sub = apply_residual(sub, residual, self.transform.residual)
        groups = self._groups.get(self._unit_of[unit[0]], [])
        if groups and (self.transform.ffn or self.transform.heads):
            view = StateView(sub)
            for group in groups:
                apply_to_group(view, group, self.transform)
            sub = dict(view.state)
        if self.unfold_with is not None:
            ref = {s.key: self.unfold_with[s.key] for n in residual.norms for s in (n.weight, n.bias) if s is not None}
            sub = unfold_norms(sub, residual, ref)
        return sub

