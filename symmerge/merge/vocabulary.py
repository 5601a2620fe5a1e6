"""Merging vocabularies: mergekit's ``tokenizer_source`` (``union``, ``base``, a model) and ``tokenizer`` block
(``source``, ``tokens``, ``pad_to_multiple_of``), with mergekit's semantics (docs/DESIGN.md §3).

The output vocabulary is the source tokenizer's (for ``union``: the base model's tokens with their ids, then every
other model's tokens it lacks, plain tokens first, then added/special tokens). Every vocabulary-indexed tensor
(input embedding, LM head) of every model is permuted to it: row ``u`` of model ``m`` is its row of token
``vocab_out[u]`` when it has that token (:func:`token_permutation`). Rows a model lacks are filled *after*
alignment, in the reference basis, by :func:`fill_missing_rows` — mergekit's rule for a token present in only some
of a tensor's models: the one model that has it gives its row (donor); else the base model's row when the base has
it; else the mean of the rows of the models that have it; a token no model has gets zeros; ``tokens:`` overrides
(``source``: a model, ``{kind: model_token, ...}``, ``{kind: zero}``; ``force: true`` replaces even rows a model has)
win. Rows added by ``pad_to_multiple_of`` are each model's mean row. The merge method then runs on the filled rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken

from symmerge.io.tokenizer import Vocabulary


def union_tokens(vocabularies: list[Vocabulary]) -> tuple[list[str], list[AddedToken]]:
    """The tokens to append to ``vocabularies[0]`` (the base's) to make the union: ``(plain, added)``.

    mergekit's order: every model's tokens below its ``vocab_size``, models in order (base first), each model's in
    id order (mergekit walks Python sets and Rust hash maps here, so its order is not reproducible; this one is);
    tokens the base already has are skipped; added tokens (special tokens, ``add_tokens``) come after all plain
    ones, with the settings of the first model that adds them."""
    base = vocabularies[0]
    seen: dict[str, None] = {}
    added: dict[str, AddedToken] = {}
    for vocab in vocabularies:
        for token, i in sorted(vocab.tokens.items(), key=lambda kv: kv[1]):
            if i < vocab.size:
                seen.setdefault(token, None)
        for i, info in vocab.added.items():
            if i < vocab.size:
                added.setdefault(str(info.content), info)
    plain = [t for t in seen if t not in added and t not in base.tokens]
    return plain, [info for content, info in added.items() if content not in base.tokens]


def output_size(vocab_out: Mapping[str, int], pad_to_multiple_of: int | None) -> int:
    """Rows of the output's vocabulary tensors: the vocabulary's length, rounded up to ``pad_to_multiple_of``."""
    n = len(vocab_out)
    if pad_to_multiple_of and n % pad_to_multiple_of:
        n += pad_to_multiple_of - n % pad_to_multiple_of
    return n


def token_permutation(vocab_out: Mapping[str, int], model: Vocabulary) -> torch.Tensor:
    """``p`` (int64, one entry per output token id): ``p[u]`` = the model's id of token ``u``, ``-1`` where the
    model lacks it (or holds it at an id with no embedding row, ≥ its ``vocab_size``)."""
    p = torch.full((len(vocab_out),), -1, dtype=torch.int64)
    for token, u in vocab_out.items():
        i = model.tokens.get(token)
        if i is not None and i < model.size:
            p[u] = i
    return p


def is_identity(p: torch.Tensor, rows: int, size: int) -> bool:
    """Whether permuting a tensor of ``rows`` rows by ``p`` into ``size`` rows changes nothing."""
    return rows == size == len(p) and bool(torch.equal(p, torch.arange(len(p))))


def permute_rows(tensor: torch.Tensor, p: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` (vocabulary on axis 0) in the output vocabulary: row ``u`` = ``tensor[p[u]]``; rows the model
    lacks (``p[u] = -1``) and padding rows (``u ≥ len(p)``) are zero until :func:`fill_missing_rows`."""
    out = tensor.new_zeros((size, *tensor.shape[1:]))
    have = p >= 0
    out[: len(p)][have] = tensor[p[have]]
    return out


@dataclass(frozen=True)
class TokenSource:
    """A ``tokens:`` override for output token ``token`` (its id): its row is zero (``model`` None) or ``model``'s
    row of output token ``row`` (the token itself, or ``model_token``'s other token); ``force``: for every model,
    not only those that lack the token."""

    token: int
    model: int | None
    row: int | None
    force: bool = False


def fill_missing_rows(rows: list[torch.Tensor], present: list[torch.Tensor], who: list[int], base: int | None,
                      overrides: Mapping[int, TokenSource], vocab_len: int) -> list[torch.Tensor]:
    """Every participant's vocabulary tensor with the rows it lacks filled by mergekit's rule (module docstring).

    ``rows[i]``: participant ``i``'s tensor in the output vocabulary, ``size × …`` (missing and padding rows zero),
    in the reference basis; ``present[i]``: bool, ``vocab_len`` entries (``p ≥ 0``); ``who[i]``: its checkpoint key
    (what :class:`TokenSource` names); ``base``: the base's position among the participants, if there. Default row
    of a token held by ``c`` of the ``n`` participants, ``c < n``: ``Σ_{i has it} r_i / c`` (the donor's row for
    ``c = 1``), the base's row when ``c ≥ 2`` and the base has it, zero for ``c = 0``. Padding rows: each
    participant's mean over its ``vocab_len`` real rows."""
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
    held = torch.stack(present)  # n × V
    count = held.sum(0)
    forced = torch.zeros_like(count, dtype=torch.bool)
    for tid, source in overrides.items():
        forced[tid] = source.force
    need = ((count < len(rows)) | forced).nonzero().flatten()  # only these rows change: a few of a large vocabulary
    shape = (-1,) + (1,) * (rows[0].dim() - 1)
    total = torch.zeros((len(need), *rows[0].shape[1:]), dtype=dtype)
    for r, h in zip(rows, held):
        total = total + r[need].to(dtype) * h[need].view(shape).to(dtype)  # x + 0 = x: a masked-out model adds nothing
    default = total / count[need].clamp(min=1).view(shape).to(dtype)
    if base is not None:
        from_base = held[base][need] & (count[need] >= 2)
        default = torch.where(from_base.view(shape), rows[base][need].to(dtype), default)
    position = {int(t): i for i, t in enumerate(need)}
    for tid, source in overrides.items():
        if tid in position:
            default[position[tid]] = 0 if source.model is None else rows[who.index(source.model)][source.row].to(dtype)
    out = []
    for r, h in zip(rows, held):
        take = ~h[need] | forced[need]
        filled = r.clone()
        filled[need[take]] = default[take].to(r.dtype)
        if r.shape[0] > vocab_len:  # pad_to_multiple_of: the mean row (vocabulary expansion, Hewitt 2021)
            filled[vocab_len:] = filled[:vocab_len].to(dtype).mean(0).to(r.dtype)
        out.append(filled)
    return out


class RemappedState(Mapping[str, torch.Tensor]):
    """A model's tensors with its vocabulary tensors (``keys``) permuted to the output vocabulary by ``p``
    (:func:`permute_rows`); every other tensor as stored, read from ``state`` on access."""

    def __init__(self, state: Mapping[str, torch.Tensor], p: torch.Tensor, keys: frozenset[str], size: int):
        self.state, self.p, self.keys_remapped, self.size = state, p, keys, size

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.state[key]
        return permute_rows(t, self.p, self.size) if key in self.keys_remapped else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def __contains__(self, key: object) -> bool:
        return key in self.state

    def tensor_files(self) -> dict[str, Path] | None:
        """The stored files of the tensors read unchanged (for Ray tasks); vocabulary tensors are not among them."""
        files = self.state.tensor_files() if hasattr(self.state, "tensor_files") else None
        return None if files is None else {k: f for k, f in files.items() if k not in self.keys_remapped}


@dataclass
class VocabularyPlan:
    """The output vocabulary of a recipe with a tokenizer source, and how every checkpoint's vocabulary tensors map
    to it. Checkpoint keys: ``i`` for ``models[i]``, ``len(models)`` for a base model not listed among them."""

    tokenizer: object | None  # a transformers tokenizer to save (union, added tokens), or None: copy ``copy_from``
    copy_from: Path | None
    vocab_out: dict[str, int]
    size: int  # rows of the output's vocabulary tensors (len(vocab_out), padded)
    keys: frozenset[str]  # the vocabulary-indexed tensors (input embedding, LM head)
    permutations: dict[int, torch.Tensor]
    overrides: dict[int, TokenSource]
    remap: bool  # whether any checkpoint's vocabulary tensors change (else they are merged as stored)
