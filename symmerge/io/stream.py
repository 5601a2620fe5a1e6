"""Streaming: tensors read one at a time from memory-mapped safetensors, output written shard by shard.

Peak memory of a merge is then about one tensor (or one symmetry group's tensors) per model plus one output
shard, not whole models: mapped input pages are clean file cache the kernel can drop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from symmerge.errors import SymmergeError
from symmerge.io.checkpoint import SAFETENSORS_INDEX, Checkpoint, _reading, all_finite, load_state_dict


class LazyState(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, read from mmap on access and checked for NaN/Inf the first time each is read.

    ``aliases``: extra keys that read another key's tensor (a tied LM head: ``{head: embedding}``)."""

    def __init__(self, ckpt: Checkpoint, aliases: Mapping[str, str] | None = None):
        self.ckpt = ckpt
        self._aliases = dict(aliases or {})
        self._where: dict[str, Path] = {}
        self._eager: dict[str, torch.Tensor] | None = None
        if ckpt.is_pickle:
            self._eager = load_state_dict(ckpt, check_finite=False)
        else:
            for f in ckpt.weight_files:
                with _reading(f), safe_open(f, "pt") as h:
                    for k in h.keys():
                        self._where[k] = f
        self._handles: dict[Path, object] = {}
        self._checked: set[str] = set()
        self._lora = ckpt.lora.match(list(self._stored())) if ckpt.lora is not None else {}
        stored = self._eager if self._eager is not None else self._where
        self._aliases = {k: v for k, v in self._aliases.items() if k not in stored and v in stored}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape without reading a tensor (the safetensors headers; an alias takes its target's)."""
        shapes = self.ckpt.shapes() if self._eager is None else {k: tuple(v.shape) for k, v in self._eager.items()}
        return {**shapes, **{k: shapes[v] for k, v in self._aliases.items()}}

    def _stored(self) -> Mapping:
        return self._eager if self._eager is not None else self._where

    def tensor_files(self) -> dict[str, Path] | None:
        """Tensor name → the safetensors file holding it (absolute), for readers elsewhere (Ray tasks); ``None``
        for pickle checkpoints, which are read whole."""
        return None if self._eager is not None else {k: f.resolve() for k, f in self._where.items()}

    def __iter__(self) -> Iterator[str]:
        yield from self._stored()
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._stored()) + len(self._aliases)

    def __contains__(self, key: object) -> bool:
        return key in self._stored() or key in self._aliases

    def __getitem__(self, key: str) -> torch.Tensor:
        key = self._aliases.get(key, key)
        if self._eager is not None:
            t = self._eager[key]
        else:
            f = self._where[key]
            if f not in self._handles:
                with _reading(f):
                    self._handles[f] = safe_open(f, "pt")
            with _reading(f):
                t = self._handles[f].get_tensor(key)
        if key not in self._checked:
            if not all_finite(t):
                raise SymmergeError(f"{self.ckpt.path}: tensor {key!r} holds NaN or Inf values")
            self._checked.add(key)
        if key in self._lora:  # a LoRA adapter: W + (alpha / r) B A (DoRA: rescaled per row), rounded once to the stored dtype
            t = self.ckpt.lora.apply(t, self._lora[key])
        return t


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the next tensor would exceed ``max_shard_bytes``.

    ``close()`` names the shards ``model-0000i-of-0000N.safetensors`` with an index, or ``model.safetensors`` when
    everything fit in one.
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._buffer or any(key in keys for _, keys in self._shards):
            raise SymmergeError(f"internal: tensor {key!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self.flush()
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n = len(self._shards)
        if n == 1:
            final = self.directory / "model.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map, files = {}, []
        for i, (path, keys) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return files


def save_streamed(state: Mapping[str, torch.Tensor], dest: Path, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write ``state`` tensor by tensor in its own order, shard by shard (a lazily computed state, e.g. an aligned
    :class:`~symmerge.groups.stream.TransformedState`, is then computed unit by unit as it is written): memory holds
    one shard, not the model."""
    writer = ShardWriter(Path(dest), max_shard_bytes)
    for key in state:
        writer.add(key, state[key])
    writer.close()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
_OUTPUT_EMBEDDINGS = ("lm_head.weight",)


def _written_tensors(dest: Path) -> dict[str, tuple[Path, torch.dtype]]:
    found = {}
    for f in sorted(dest.glob("*.safetensors")):
        with _reading(f), safe_open(f, "pt") as h:
            for k in h.keys():
                found[k] = (f, h.get_slice(k).get_dtype())
    return found


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _find(keys, suffixes) -> str | None:
    return next((k for k in sorted(keys) if k.endswith(suffixes)), None)


def write_config(source: Mapping, dest: Path, dtype: torch.dtype | None, untie: bool = False) -> None:
    """config.json from ``source`` with its metadata made true of the weights in ``dest``: the dtype field names the
    floating dtype written (``dtype`` when nothing is written yet), ``tie_word_embeddings`` says whether the LM head
    is the input embedding (False when ``untie``, or when the written head differs from the embedding)."""
    config = dict(source)
    written = _written_tensors(dest)
    floating = {}
    for f, st_dtype in written.values():
        if st_dtype in _ST_DTYPES:
            floating[_ST_DTYPES[st_dtype]] = floating.get(_ST_DTYPES[st_dtype], 0) + 1
    if floating:
        dtype = max(floating, key=floating.get)
    if untie:
        config["tie_word_embeddings"] = False
    else:
        head, embedding = _find(written, _OUTPUT_EMBEDDINGS), _find(written, _INPUT_EMBEDDINGS)
        if head is not None and embedding is not None and config.get("tie_word_embeddings", True):
            with safe_open(written[head][0], "pt") as h:
                head_t = h.get_tensor(head)
            with safe_open(written[embedding][0], "pt") as h:
                emb_t = h.get_tensor(embedding)
            if head_t.shape != emb_t.shape or not torch.equal(head_t, emb_t):
                config["tie_word_embeddings"] = False  # a tied config would make loaders discard the written head
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype_name(dtype)
        if "torch_dtype" not in config and "dtype" not in config:
            config["dtype"] = dtype_name(dtype)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
