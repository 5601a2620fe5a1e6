"""Reading and writing Hugging Face model directories.

Reading is lazy: :func:`open_checkpoint` validates the directory and reads only config.json and the safetensors
headers, so every input can be checked before any weight is touched; :func:`load_state_dict` then maps the
tensors (zero-copy mmap). Writing goes to a temporary directory beside the destination and is renamed into
place only when complete, so a failed or interrupted run leaves no partial output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from symmerge.errors import SymmergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".h5", ".msgpack", ".onnx", ".gguf", *PICKLE_SUFFIXES)
MAX_SHARD_SIZE = "5GB"


@dataclass
class Checkpoint:
    """A validated model directory: its config and weight files (no weights read yet)."""

    path: Path
    config: dict
    weight_files: list[Path]
    is_pickle: bool = False
    _shapes: dict[str, tuple[int, ...]] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape, from the safetensors headers only."""
        if self._shapes is None:
            if self.is_pickle:
                self._shapes = {k: tuple(v.shape) for k, v in load_state_dict(self, check_finite=False).items()}
            else:
                shapes = {}
                for f in self.weight_files:
                    with _reading(f):
                        with safe_open(f, "pt") as h:
                            for k in h.keys():
                                shapes[k] = tuple(h.get_slice(k).get_shape())
                self._shapes = shapes
        return self._shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SymmergeError(f"cannot read {path}: {e} (the file is corrupt or truncated)") from None


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
    """Validate a model directory (config.json plus safetensors weights, sharded or not)."""
    path = Path(path)
    if not path.exists():
        raise SymmergeError(f"{path} does not exist")
    if not path.is_dir():
        raise SymmergeError(f"{path} is not a directory: give a Hugging Face model directory (config.json + weights)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SymmergeError(f"{path} has no config.json: is it a Hugging Face model directory?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SymmergeError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise SymmergeError(f"{config_path} does not hold a JSON object")

    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SymmergeError(f"{index} is not a valid safetensors index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise SymmergeError(f"{index} names {f.name}, which is missing")
        return Checkpoint(path, config, files)
    if (path / "model.safetensors").is_file():
        return Checkpoint(path, config, [path / "model.safetensors"])
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise SymmergeError(
                f"{path} holds only pickle weights ({pickles[0].name}); unpickling can run arbitrary code, so it is "
                "refused: convert to safetensors, or pass --allow-pickle if you trust the file"
            )
        return Checkpoint(path, config, pickles, is_pickle=True)
    raise SymmergeError(f"{path} has no model.safetensors (nor a sharded index, nor pickle weights)")


class FileBackedState(dict):
    """A loaded state dict that also knows which safetensors file holds each tensor (:meth:`tensor_files`), so a
    worker on another machine can read a group's tensors itself instead of receiving them. Copies made from it
    (``dict(state)``, transformed states) are plain dicts: only the tensors as stored are file-backed."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], files: Mapping[str, Path]):
        super().__init__(tensors)
        self._files = dict(files)

    def tensor_files(self) -> dict[str, Path]:
        return dict(self._files)


def load_state_dict(ckpt: Checkpoint, check_finite: bool = True, file_backed: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (safetensors are memory-mapped, not copied); rejects NaN/Inf weights.
    ``file_backed``: return a :class:`FileBackedState` (safetensors checkpoints; pickles stay plain dicts)."""
    state: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}
    for f in ckpt.weight_files:
        if ckpt.is_pickle:
            with _reading(f):
                # weights_only=True: tensors and containers only, never arbitrary objects
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(part, Mapping) and "state_dict" in part and isinstance(part["state_dict"], Mapping):
                part = part["state_dict"]
            if not isinstance(part, Mapping):
                raise SymmergeError(f"{f} does not hold a state dict")
        else:
            with _reading(f):
                part = load_file(f)
            files.update(dict.fromkeys(part, f.resolve()))
        state.update(part)
    if check_finite:
        for key, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SymmergeError(f"{ckpt.path}: tensor {key!r} holds NaN or Inf values")
    return FileBackedState(state, files) if file_backed and not ckpt.is_pickle else state


def is_weight_file(p: Path) -> bool:
    return p.suffix in WEIGHT_SUFFIXES or p.name in (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")


def copy_model_files(source: Path, dest: Path) -> None:
    """Copy everything but the weights (config, tokenizer, sentence-transformers modules...) from ``source``."""
    for p in source.iterdir():
        if p.name.startswith(".") or is_weight_file(p):
            continue
        if p.is_dir():
            shutil.copytree(p, dest / p.name, ignore=lambda d, names: [n for n in names if is_weight_file(Path(d) / n)])
        else:
            shutil.copy2(p, dest / p.name)


def save_state_dict(state: Mapping[str, torch.Tensor], dest: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """Write ``state`` as ``model.safetensors``, or as shards plus an index when larger than ``max_shard_size``."""
    split = split_torch_state_dict_into_shards(dict(state), max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, dest / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (dest / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def unique_names(paths: list[Path]) -> list[str]:
    """Directory names for outputs, one per input path, with ``-2``, ``-3``... appended on collisions."""
    names, seen = [], {}
    for p in paths:
        base = Path(p).resolve().name or "model"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise SymmergeError(f"{out} already exists: choose another --out or pass --force to replace it")
    if not out.parent.exists():
        raise SymmergeError(f"the parent directory of {out} does not exist")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` when the block succeeds, delete it if not."""
    out = Path(out)
    check_output_dir(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # --force: replace only now that the new output is complete
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
