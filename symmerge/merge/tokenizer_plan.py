"""The output vocabulary of mergekit's ``tokenizer_source`` / ``tokenizer:`` block, planned from the tokenizers'
files before any weight is read: the output tokenizer, each checkpoint's permutation onto it, the rows ``tokens:``
takes from elsewhere, and the tensors indexed by token (:class:`~symmerge.merge.vocabulary.VocabularyPlan`)."""

from __future__ import annotations

from pathlib import Path

import torch

from symmerge.errors import SymmergeError, cut
from symmerge.io import Checkpoint
from symmerge.io.hub import split_reference
from symmerge.io.tokenizer import extended_tokenizer, has_tokenizer, load_tokenizer, vocabulary
from symmerge.merge.recipe import Recipe, TokenEntry, ZeroToken
from symmerge.merge.references import absolute_reference, open_reference, resolve_path
from symmerge.merge.vocabulary import (
    TokenSource,
    VocabularyPlan,
    is_identity,
    output_size,
    token_permutation,
    union_tokens,
)
from symmerge.spec import ModelSpec, tied_head


def plan_vocabulary(recipe: Recipe, root: Path | None, models: list[Checkpoint], base: Checkpoint | None,
                    layers: ModelSpec | None, allow_pickle: bool, notes: list[str]) -> VocabularyPlan | None:
    """mergekit's ``tokenizer_source`` / ``tokenizer`` block: the output tokenizer (``union``: the base's tokens,
    then the others', :func:`~symmerge.merge.vocabulary.union_tokens`; ``base``; a model) plus ``tokens:`` added,
    and every checkpoint's permutation onto it. ``None`` without a tokenizer source (the reference's files are
    copied and nothing is remapped, as mergekit without one)."""
    block = recipe.tokenizer
    source = recipe.tokenizer_source if block is None else block.source
    if source is None:
        return None
    tokens = (block.tokens if block is not None else None) or {}
    pad = block.pad_to_multiple_of if block is not None else None
    where = "tokenizer.source" if block is not None else "tokenizer_source"
    everyone = models + ([base] if base is not None and all(base.identity != c.identity for c in models) else [])
    first = base or models[0]
    sizes = [_vocab_size(c) for c in everyone]
    if not has_tokenizer(first.path):
        raise SymmergeError(f"{where}: {first.path} ({'base_model' if base else 'the first model'}) holds no tokenizer "
                            "files: add them (every vocabulary is mapped from its tokenizer's)")
    first_tok = load_tokenizer(first.path, where)
    vocabs = []
    for c, size in zip(everyone, sizes):
        if c is first:
            vocabs.append(vocabulary(first_tok, size))
        elif has_tokenizer(c.path):
            vocabs.append(vocabulary(load_tokenizer(c.path, where), size))
        else:  # as mergekit: a model without a tokenizer is assumed to share the base's
            notes.append(f"{where}: {c.path} has no tokenizer files: its vocabulary is taken to be {first.path}'s")
            vocabs.append(vocabulary(first_tok, size))
    sizes = [v.size for v in vocabs]  # a config without vocab_size: the tokenizer's length
    first_vocab = vocabs[everyone.index(first)]
    if source == "union":
        beyond = sorted(t for t, i in first_vocab.tokens.items() if i >= first_vocab.size)
        if beyond:
            raise SymmergeError(f"{where}: union: {first.path}'s tokenizer has {len(beyond)} token(s) without an embedding "
                                f"row (ids >= vocab_size {first_vocab.size}, e.g. {cut(repr(beyond[0]), 40)}): not supported")
        order = [first_vocab] + [v for c, v in zip(everyone, vocabs) if c is not first]
        plain, added = union_tokens(order)
        tokenizer, copy_from = extended_tokenizer(first.path, plain, added, where), None
    else:
        if source == "base":
            if base is None:
                raise SymmergeError("tokenizer_source: base needs a base_model")
            folder = base.path
        else:
            folder = _tokenizer_folder(source, root, where, allow_pickle)
            # as run: the folder found, so that merge.yaml names it from any folder
            if block is not None:
                block.source = str(folder.resolve())
            else:
                recipe.tokenizer_source = str(folder.resolve())
        tokenizer, copy_from = load_tokenizer(folder, where), folder
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    for token in new:  # mergekit adds every token the tokens: block names
        tokenizer.add_tokens(token)
    vocab_out = dict(tokenizer.get_vocab())
    if source != "union" and not new:
        tokenizer = None  # copied as stored
    size = output_size(vocab_out, pad)
    permutations = {i: token_permutation(vocab_out, v) for i, v in enumerate(vocabs)}  # a separate base: len(models)
    keys = _vocabulary_keys(layers, everyone, sizes)
    remap = not all(is_identity(permutations[i], rows, size) for i, rows in enumerate(sizes))
    overrides = {}
    for token, entry in tokens.items():
        overrides[vocab_out[token]] = _token_source(token, entry, vocab_out, everyone, vocabs, permutations, root, allow_pickle)
    remap = remap or any(o.force for o in overrides.values())
    if remap and not keys:
        raise SymmergeError(f"{where}: the vocabularies differ, and symmerge does not know which tensors of family "
                            f"{models[0].model_type!r} are indexed by token (embedding, LM head)")
    return VocabularyPlan(tokenizer, copy_from, vocab_out, size, keys, permutations, overrides, remap)


def remapped_shapes(ckpt: Checkpoint, plan: VocabularyPlan | None) -> dict[str, tuple[int, ...]]:
    """``ckpt``'s tensor shapes once its vocabulary tensors are permuted to the output vocabulary."""
    shapes = ckpt.shapes()
    if plan is None or not plan.remap:
        return shapes
    return {k: (plan.size, *s[1:]) if k in plan.keys else s for k, s in shapes.items()}


def _vocab_size(ckpt: Checkpoint) -> int | None:
    """The model's ``vocab_size`` (its embedding's rows), from its config."""
    config = ckpt.config or {}
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _vocabulary_keys(layers: ModelSpec | None, checkpoints: list[Checkpoint], sizes: list[int | None]) -> frozenset[str]:
    """Tensors indexed by token: embeddings and heads whose first axis is the model's vocab_size (mergekit's
    ``vocabulary_axis``; BERT's position and token-type embeddings are not), and a tied model's head."""
    if layers is None:
        return frozenset()
    keys = set()
    for c, size in zip(checkpoints, sizes):
        shapes = c.shapes()
        roles = layers.tensor_groups(shapes)
        keys |= {k for k, role in roles.items() if role in ("embeddings", "head") and shapes[k] and shapes[k][0] == size}
    pair = tied_head(layers)
    if pair is not None and pair[1] in keys:
        keys.add(pair[0])
    return frozenset(keys)


def _tokenizer_folder(source: str, root: Path | None, where: str, allow_pickle: bool) -> Path:
    """The folder of ``tokenizer_source: MODEL`` (a model folder or repo id; a folder with only tokenizer files too)."""
    try:
        return open_reference(source, root, where, allow_pickle).path
    except SymmergeError:
        model, _ = split_reference(source)
        path = resolve_path(model, root, where)
        if not path.is_dir() or not has_tokenizer(path):
            raise
        return path


def _token_source(token: str, entry: TokenEntry, vocab_out: dict[str, int], everyone: list[Checkpoint], vocabs: list,
                  permutations: dict[int, torch.Tensor], root: Path | None, allow_pickle: bool) -> TokenSource:
    """One ``tokenizer.tokens`` entry as a :class:`TokenSource` over checkpoint keys and output token ids."""
    where = f"tokenizer.tokens.{cut(token, 40)}"
    u = vocab_out[token]
    source = entry.source
    if source is None:
        raise SymmergeError(f"{where}: give a source (a model, {{kind: model_token, ...}} or {{kind: zero}})")
    if isinstance(source, ZeroToken):
        return TokenSource(u, None, None, entry.force)
    ref = source if isinstance(source, str) else source.model
    identity = open_reference(ref, root, f"{where}.source", allow_pickle).identity
    if isinstance(source, str):  # as run: named from any folder
        entry.source = absolute_reference(identity)
    else:
        source.model = absolute_reference(identity)
    position = next((i for i, c in enumerate(everyone) if c.identity == identity), None)
    if position is None:
        raise SymmergeError(f"{where}.source: {cut(ref)} is not one of the models merged (nor the base_model)")
    key = position  # models[i] is i, a base not listed among them len(models): as in permutations
    p = permutations[key]
    if isinstance(source, str):
        if p[u] < 0:
            raise SymmergeError(f"{where}.source: {cut(ref)} has no token {cut(repr(token), 40)}: name another model, "
                                "or a model_token source")
        return TokenSource(u, key, u, entry.force)
    original = source.token_id if source.token is None else vocabs[position].tokens.get(source.token)
    if original is None:
        raise SymmergeError(f"{where}.source.token: {cut(ref)} has no token {cut(repr(source.token), 40)}")
    rows = (p == original).nonzero().flatten().tolist()
    if not rows:
        raise SymmergeError(f"{where}.source: token id {original} of {cut(ref)} is not in the output vocabulary "
                            "(symmerge takes rows of the output vocabulary only): use a token it has")
    return TokenSource(u, key, rows[0], entry.force)
