"""Which layer a tensor is in, for every family: the family's spec where symmerge has one, else the layer structure
read from the tensor names alone, as mergekit reads an architecture it has no definition of
(``mergekit/architecture/auto.py``: the first ``.N.`` path component indexes the layers).

What the merge needs of a family it cannot align is only this: the layers (for ``slices``, ``layer_range`` and
gradients, whose ``t`` is a layer's place in its slice) and which tensors outside them come before the layers
(embeddings: taken from the first slice's models) or after (final norm, head: from the last slice's). The result
is a :class:`~symmerge.spec.base.ModelSpec` with those fields and no symmetry group, so it can never be aligned.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from symmerge.errors import SymmergeError, cut
from symmerge.spec.base import ModelSpec
from symmerge.spec.families import model_type, spec_for

LAYER_INDEX = re.compile(r"\.(\d+)\.")
"""mergekit's ``RE_LAYER_INDEX``: the first integer path component with a module before and a tensor after it."""

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
"""config.json keys that state the depth in the families symmerge has no table of (HF's usual spellings)."""

HEAD_MODULES = frozenset({"lm_head", "embed_out", "output", "output_layer"})
"""Module names of an LM head outside the layers (GPT-NeoX's ``embed_out`` names an embedding but is the head)."""


def layer_structure(config: Any, keys: Collection[str]) -> ModelSpec:
    """The layer structure of a model: its family's spec (:func:`~symmerge.spec.families.spec_for`) where symmerge
    has one, else :func:`infer_layers` from the tensor names; a one-line error when neither can tell."""
    try:
        return spec_for(config, keys)
    except SymmergeError:
        return infer_layers(config, keys)


def infer_layers(config: Any, keys: Collection[str]) -> ModelSpec:
    """The layers of a model read from its tensor names: every tensor whose first ``.N.`` component follows one
    common prefix (``model.layers``, ``transformer.h``...) is in layer ``N``; the indices must run 0…n−1 and agree
    with the config's depth where it states one. Refused with a one-line error when no tensor has a layer index,
    when indices follow two prefixes (an encoder and a decoder, a vision tower: which are *the* layers?), or when
    they skip a layer."""
    family = model_type(config)
    prefixes: dict[str, set[int]] = {}
    for key in keys:
        match = LAYER_INDEX.search(key)
        if match is not None:
            prefixes.setdefault(key[: match.start()], set()).add(int(match.group(1)))
    where = f"model_type {family!r}"
    if not prefixes:
        raise SymmergeError(f"{where}: no tensor name has a layer index (such as model.layers.0.), so symmerge cannot "
                            "tell its layers")
    if len(prefixes) > 1:
        first, second = sorted(prefixes)[:2]
        raise SymmergeError(f"{where}: tensor names index layers under both {cut(first, 60)!r} and {cut(second, 60)!r}, "
                            f"so symmerge cannot tell which are the model's layers ({len(prefixes)} candidates)")
    prefix, indices = next(iter(prefixes.items()))
    count = max(indices) + 1
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise SymmergeError(f"{where}: layers {cut(prefix, 60)}.N skip index {missing[0]} (indices up to {count - 1})")
    stated = _stated_depth(config)
    if stated is not None and stated[1] != count:
        raise SymmergeError(f"{where}: config.json has {stated[0]} = {stated[1]}, but the tensor names hold {count} "
                            f"layers {cut(prefix, 60)}.0…{count - 1}")
    loose = (k for k in keys if LAYER_INDEX.search(k) is None)
    roles = tuple((k, role) for k in sorted(loose) if (role := loose_role(k)) != "other")
    return ModelSpec(family, count, 0, 0, 0, 0, roles=roles, blocks=tuple(f"{prefix}.{i}" for i in range(count)))


def stated_layers_problem(config: Any, keys: Collection[str]) -> str | None:
    """For a family symmerge has a spec of, what is wrong when config.json's layer count is not the number of layers
    the tensor names hold (an edited or copied config), else ``None``: the spec reads the depth from the config, so
    a missing layer would surface later as a missing tensor of no named model, and a merge without alignment would
    write a config that does not match its weights. Other families are checked where their layers are inferred
    (:func:`infer_layers`)."""
    try:
        spec = spec_for(config, keys)
    except SymmergeError:
        return None
    if not spec.blocks:
        return None
    prefix = spec.blocks[0].rsplit(".", 1)[0] + "."
    held = {int(m.group(1)) for k in keys if k.startswith(prefix) and (m := re.match(r"(\d+)\.", k[len(prefix):]))}
    if held == set(range(len(spec.blocks))):
        return None
    stated = _stated_depth(config)
    said = f"{stated[0]} = {stated[1]}" if stated else f"{len(spec.blocks)} layers"
    count = f"{len(held)} layers ({prefix}{min(held)}…{max(held)})" if held else "no layer"
    return f"has {said}, but the tensor names hold {count}: the config does not match the weights"


def loose_role(key: str) -> str:
    """A tensor outside the layers, by its name: ``"head"`` (under a :data:`HEAD_MODULES` module), ``"embeddings"``
    (a module named like an embedding: ``embed_tokens``, ``wte``, ``word_embeddings``, ``embeddings.LayerNorm``),
    else ``"other"`` (a final norm, a pooler). Embeddings come before the layers, the rest after them, as in every
    architecture mergekit defines (``pre_weights`` / ``post_weights``)."""
    modules = key.split(".")[:-1]
    if any(m in HEAD_MODULES for m in modules):
        return "head"
    if any("emb" in m.lower() or m in ("wte", "wpe") for m in modules):
        return "embeddings"
    return "other"


def _stated_depth(config: Any) -> tuple[str, int] | None:
    """(key, value) of the first :data:`LAYER_COUNT_KEYS` entry config.json sets to an integer, else ``None``."""
    for key in LAYER_COUNT_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None
