"""Streaming: tensors read one at a time from memory-mapped safetensors, output written shard by shard.

Peak memory of a merge is then about one tensor (or one symmetry group's tensors) per model plus the output tensor
being written, not whole models: mapped input pages are clean file cache the kernel can drop.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import torch
from safetensors import safe_open

from symmerge.errors import SymmergeError
from symmerge.io.checkpoint import SAFETENSORS_INDEX, Checkpoint, _reading, all_finite, load_state_dict
from symmerge.spec.families import is_derived_buffer


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
                        if not is_derived_buffer(k):  # not weights: spec.families.DERIVED_BUFFER
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

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        """Tensor name → (safetensors dtype name, shape) from the headers (``None`` for pickle checkpoints): what a
        :class:`ShardWriter` can be told to expect (:meth:`ShardWriter.expect`)."""
        if self._eager is not None:
            return None
        out = {}
        for f in self.ckpt.weight_files:
            with _reading(f), safe_open(f, "pt") as h:
                for k in h.keys():
                    if not is_derived_buffer(k):
                        piece = h.get_slice(k)
                        out[k] = (piece.get_dtype(), tuple(piece.get_shape()))
        return {**out, **{k: out[v] for k, v in self._aliases.items()}}

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


#: safetensors' dtype names, in the order of its ``Dtype`` enum (``safetensors/src/tensor.rs``, 0.8): a file lays its
#: tensors out by this rank descending, then by name, so the 8-byte types come first and every tensor starts
#: aligned. ``tests/test_streaming.py`` checks the layout byte for byte against ``safetensors.torch.save_file``.
_ST_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16",
                   "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_ST_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.complex64: "C64", torch.float64: "F64",
             torch.int64: "I64"}
_ST_NAMES.update({getattr(torch, attr): name for name, attr in (  # in newer torch builds only
    ("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")) if hasattr(torch, attr)})

_COPY_BLOCK = 1 << 26  # bytes per copy call when a shard's data is moved behind its header


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The header safetensors writes for tensors ``(name, dtype name, shape, nbytes)``, and the names in file order.

    Layout as ``safetensors.serialize``: tensors sorted by dtype rank descending (:data:`_ST_DTYPE_ORDER`), then by
    name (bytewise = code-point order), data offsets consecutive in that order; the JSON compact, ``__metadata__``
    first, keys in file order, padded with spaces to a multiple of 8 bytes; preceded by its length as 8-byte
    little-endian.
    """
    rank = {name: i for i, name in enumerate(_ST_DTYPE_ORDER)}
    ordered = sorted(entries, key=lambda e: (-rank[e[1]], e[0]))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, nbytes in ordered:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [e[0] for e in ordered]


def _tensor_bytes(key: str, tensor: torch.Tensor) -> tuple[str, memoryview]:
    """``tensor``'s safetensors dtype name and its bytes (C order, little-endian), without a copy when it is a
    contiguous CPU tensor."""
    name = _ST_NAMES.get(tensor.dtype)
    if name is None:
        raise SymmergeError(f"cannot write tensor {key!r}: safetensors has no dtype for {tensor.dtype}")
    if sys.byteorder != "little":
        raise SymmergeError("writing safetensors needs a little-endian machine")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return name, memoryview(b"")
    return name, memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` to ``dst`` (both flushed): in the kernel with
    ``copy_file_range`` where the system has it, else (or where it refuses these files) through a buffer of
    :data:`_COPY_BLOCK` bytes."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(_COPY_BLOCK, nbytes - done), offset + done)
                if n == 0:
                    break
                done += n
        except OSError:  # EXDEV, EINVAL... on some file systems: the rest through memory
            pass
    if done < nbytes:
        dst.seek(0, os.SEEK_END)  # copy_file_range moved the descriptor's offset, not the buffered object's
        src.seek(offset + done)
        while done < nbytes:
            block = src.read(min(_COPY_BLOCK, nbytes - done))
            if not block:
                raise SymmergeError(f"{src.name}: shard data ended {nbytes - done} bytes early")
            dst.write(block)
            done += len(block)
        dst.flush()


class ShardWriter:
    """Writes tensors to safetensors shards as they arrive, a new shard whenever the next tensor would exceed
    ``max_shard_bytes`` (``0``: no limit, one shard); memory holds no more than the tensor being added.

    A tensor's bytes go at once to a temporary data file in ``directory`` (only its name, dtype, shape and offset
    are kept); closing a shard writes the header safetensors would write and then copies the data behind it in
    safetensors' order — the file is byte for byte what ``safetensors.torch.save_file`` makes of the same tensors.
    (The header cannot be written first: its length is known only when the shard's last tensor is. Writing the
    data straight into the shard file after a reserved gap would leave padding and a tensor order safetensors
    does not produce; the copy costs one more pass over the shard, in the kernel.)

    ``close()`` names the shards ``model-0000i-of-0000N.safetensors`` with an index, or ``model.safetensors`` when
    everything fit in one.
    """

    METADATA = {"format": "pt"}  # what transformers' save_pretrained writes (and expects)

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._plan: list[tuple[str, str, tuple[int, ...], int]] | None = None  # expect(): the tensors to come, in order
        self._next = 0  # the plan's next entry
        self._open: tuple[BinaryIO, Path, int, dict[str, int], int] | None = None  # a planned shard being written
        self._data: BinaryIO | None = None  # the open shard's tensor bytes, in arrival order
        self._entries: list[tuple[str, str, tuple[int, ...], int]] = []  # (name, dtype, shape, nbytes), arrival order
        self._buffer_bytes = 0
        self._keys: set[str] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def _data_path(self) -> Path:
        return self.directory / f".shard-{len(self._shards):05d}.data"

    def expect(self, entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> None:
        """Announce the tensors to come, ``(name, safetensors dtype name, shape)`` in the order they will be added
        (before the first :meth:`add`). While the tensors added match it, each shard's header is written first and
        every tensor's bytes go straight to their place in the shard: no data file, no second copy of the shard's
        data when it closes. The files are the same: at the first tensor that differs from the announcement (or a
        shard that ends elsewhere), the shard begun is moved into the data file and the writer goes on unannounced."""
        if self._entries or self._shards or self._open is not None:
            raise SymmergeError("internal: ShardWriter.expect after add")
        plan = []
        for name, dtype, shape in entries:
            n = 1
            for x in shape:
                n *= x
            itemsize = next((torch.empty((), dtype=t).element_size() for t, st in _ST_NAMES.items() if st == dtype), None)
            if itemsize is None:
                return
            plan.append((name, dtype, tuple(shape), n * itemsize))
        self._plan, self._next = plan, 0

    def _planned_shard(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """The plan's entries from ``_next`` that :meth:`add`'s rule puts in one shard."""
        out, size = [], 0
        for entry in self._plan[self._next :]:
            if out and 0 < self.max_shard_bytes < size + entry[3]:
                break
            out.append(entry)
            size += entry[3]
        return out

    def _unplan(self) -> None:
        """Leave the planned mode: the open planned shard's tensors move to a data file, in arrival order."""
        self._plan = None
        if self._open is None:
            return
        out, path, header_len, offsets, _ = self._open
        self._open = None
        out.flush()
        self._data = open(self._data_path(), "w+b")
        with open(path, "rb") as src:
            for name, _, _, nbytes in self._entries:
                _copy_range(src, self._data, header_len + offsets[name], nbytes)
        out.close()
        path.unlink()

    def _add_planned(self, key: str, dtype: str, tensor: torch.Tensor, data: memoryview) -> bool:
        """Write ``tensor`` where the plan puts it; ``False`` (and the plan dropped) where it is not the tensor the
        plan expects next."""
        expected = self._plan[self._next] if self._next < len(self._plan) else None
        if expected != (key, dtype, tuple(tensor.shape), data.nbytes):
            self._unplan()
            return False
        if self._open is not None and self._open[4] == len(self._entries):  # the open shard is full: it is done
            self._finish_planned()
        if self._open is None:
            shard = self._planned_shard()
            header, order = safetensors_header(shard, self.METADATA)
            offsets, offset = {}, 0
            sizes = {e[0]: e[3] for e in shard}
            for name in order:
                offsets[name] = offset
                offset += sizes[name]
            path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
            out = open(path, "wb")
            out.write(header)
            self._open = (out, path, len(header), offsets, len(shard))
        out, _, header_len, offsets, _ = self._open
        out.seek(header_len + offsets[key])
        out.write(data)
        self._next += 1
        return True

    def _finish_planned(self) -> None:
        out, path, _, _, _ = self._open
        out.close()
        self._shards.append((path, [e[0] for e in self._entries]))
        self._open, self._entries, self._buffer_bytes = None, [], 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._keys:
            raise SymmergeError(f"internal: tensor {key!r} written twice")
        dtype, data = _tensor_bytes(key, tensor)
        size = data.nbytes
        if self._plan is not None and self._add_planned(key, dtype, tensor, data):
            self._keys.add(key)
            self._entries.append((key, dtype, tuple(tensor.shape), size))
            self._buffer_bytes += size
            self.total_bytes += size
            return
        if self._entries and 0 < self.max_shard_bytes < self._buffer_bytes + size:  # 0: no limit (mergekit's too)
            self.flush()
        if self._data is None:
            self._data = open(self._data_path(), "w+b")
        self._data.write(data)
        self._keys.add(key)
        self._entries.append((key, dtype, tuple(tensor.shape), size))
        self._buffer_bytes += size
        self.total_bytes += size

    __call__ = add  # the writer is a sink (align's ``sink``), one that can be restarted

    def restart(self) -> None:
        """Forget everything added: the open shard's data and the shards closed so far are deleted, and the next
        :meth:`add` starts the first shard again (:func:`symmerge.alignment.align` restarts a sink it fed a
        candidate it then did not keep)."""
        if self._data is not None:
            self._data.close()
            self._data_path().unlink(missing_ok=True)
        if self._open is not None:
            self._open[0].close()
            self._open[1].unlink(missing_ok=True)
            self._open = None
        for path, _ in self._shards:
            path.unlink(missing_ok=True)
        self._next = 0
        self._data, self._entries, self._buffer_bytes = None, [], 0
        self._keys, self._shards, self.total_bytes = set(), [], 0

    def flush(self) -> None:
        """Close the open shard: header, then its tensors' bytes in safetensors' order."""
        if not self._entries:
            return
        data, data_path = self._data, self._data_path()
        data.flush()
        starts, offset = {}, 0
        for name, _, _, nbytes in self._entries:
            starts[name] = (offset, nbytes)
            offset += nbytes
        header, order = safetensors_header(self._entries, self.METADATA)
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        with open(path, "wb") as out:
            out.write(header)
            out.flush()
            for name in order:
                _copy_range(data, out, *starts[name])
        data.close()
        data_path.unlink()
        self._shards.append((path, [e[0] for e in self._entries]))
        self._data, self._entries, self._buffer_bytes = None, [], 0

    def close(self) -> list[Path]:
        if self._open is not None:
            if self._open[4] == len(self._entries):  # the last planned shard holds what the plan said
                self._finish_planned()
            else:  # fewer tensors came than announced: the header written is not this shard's
                self._unplan()
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


T = TypeVar("T")
WRITE_AHEAD = 2
"""Tensors :func:`save_streamed` lets its reader compute before the writer takes them."""


def computed_ahead(keys: Iterable[str], read: Callable[[str], T], depth: int = WRITE_AHEAD) -> Iterator[tuple[str, T]]:
    """``(key, read(key))`` in ``keys``' order, every ``read`` run by one worker thread at most ``depth`` keys ahead
    of the consumer: a lazily computed state (an aligned :class:`~symmerge.groups.stream.TransformedState`)
    computes its next unit while the consumer writes or measures the last one (torch and file writes release the
    GIL). Only the worker reads, so states that are not thread-safe (an LRU unit cache, safetensors handles) are read
    as by one thread, provided the consumer reads none of them meanwhile; memory holds at most ``depth + 1`` results
    besides the states' own."""
    pending: deque[tuple[str, Future]] = deque()
    with ThreadPoolExecutor(1) as reader:
        try:
            for key in keys:
                pending.append((key, reader.submit(read, key)))
                if len(pending) > depth:
                    key_done, value = pending.popleft()
                    yield key_done, value.result()
            while pending:
                key_done, value = pending.popleft()
                yield key_done, value.result()
        finally:  # the consumer stopped early (an error while writing): drop what was read ahead
            for _, value in pending:
                value.cancel()


STREAMED_SHARD_BYTES = 5 * 10**9
"""Shard size of :func:`save_streamed` (and of a :class:`ShardWriter` fed the same stream elsewhere)."""


def stream_into(state: Mapping[str, torch.Tensor], consume: Callable[[str, torch.Tensor], None]) -> None:
    """``consume(key, tensor)`` for every tensor of ``state``, in its own order, the next one computed while the last
    is consumed (:func:`computed_ahead`)."""
    for key, tensor in computed_ahead(state, state.__getitem__):
        consume(key, tensor)


def save_streamed(state: Mapping[str, torch.Tensor], dest: Path, max_shard_bytes: int = STREAMED_SHARD_BYTES) -> None:
    """Write ``state`` tensor by tensor in its own order, shard by shard (a lazily computed state, e.g. an aligned
    :class:`~symmerge.groups.stream.TransformedState`, is then computed unit by unit as it is written, the next unit
    while the last is written: :func:`stream_into`): the writer holds no tensor after adding it
    (:class:`ShardWriter`)."""
    writer = ShardWriter(Path(dest), max_shard_bytes)
    stream_into(state, writer.add)
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
