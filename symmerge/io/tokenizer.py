"""Tokenizers of the models a recipe merges: their vocabularies, and the output tokenizer (mergekit's
``tokenizer_source`` / ``tokenizer`` block, docs/DESIGN.md §3), read and written with Hugging Face ``transformers``."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken

from symmerge.errors import SymmergeError, cut
from symmerge.io.checkpoint import TOKENIZER_FILES
from symmerge.lazy import lazy_module

transformers = lazy_module("transformers")  # imported on first use (~1 s): see symmerge/lazy.py


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's tokens: ``tokens`` (token → id, added tokens included), ``added`` (id → the added token with
    its settings, in id order) and ``size``: the model's ``vocab_size`` (embedding rows; ids at or above it have no
    row)."""

    tokens: dict[str, int]
    added: dict[int, AddedToken] = field(default_factory=dict)
    size: int = 0


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path, what: str) -> transformers.PreTrainedTokenizerBase:
    """The fast tokenizer stored in ``folder`` (local files only: never the Hub)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for one broken folder
        reason = " ".join(str(e).split())
        raise SymmergeError(f"{what}: cannot load the tokenizer in {cut(str(folder))}: {cut(reason, 160)}") from None


def vocabulary(tokenizer: transformers.PreTrainedTokenizerBase, size: int | None) -> Vocabulary:
    """``tokenizer``'s :class:`Vocabulary`; ``size`` the model's ``vocab_size`` (``None``: the tokenizer's length)."""
    tokens = dict(tokenizer.get_vocab())
    added = {i: t for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    return Vocabulary(tokens, added, len(tokens) if size is None else int(size))


def extended_tokenizer(folder: Path, plain: list[str], added: list[AddedToken],
                       what: str) -> transformers.PreTrainedTokenizerBase:
    """``folder``'s tokenizer with ``plain`` tokens and then ``added`` tokens appended (ids after its own), as
    mergekit builds the union tokenizer: ``add_tokens`` on a fresh copy of the base's."""
    tokenizer = load_tokenizer(folder, what)
    tokenizer.add_tokens(plain)  # in order, each after the last: one call is one trie rebuild, not one per token
    tokenizer.add_tokens(added)
    return tokenizer


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, dest: Path) -> None:
    """Replace the tokenizer files in ``dest`` with ``tokenizer`` saved there (``tokenizer.json`` and its configs)."""
    for name in TOKENIZER_FILES:
        (dest / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes only tokenizer files, but keep dest tidy
        tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            if f.is_file():
                (dest / f.name).write_bytes(f.read_bytes())
