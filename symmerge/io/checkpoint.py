"""Reading and writing Hugging Face model directories.

Reading is lazy: :func:`open_checkpoint` validates the directory and reads only config.json and the safetensors
headers, so every input can be checked before any weight is touched; :func:`load_state_dict` then maps the
tensors (zero-copy mmap). Writing goes to a temporary directory beside the destination and is renamed into
place only when complete, so a failed or interrupted run leaves no partial output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from symmerge.errors import SymmergeError, cut, shorten
from symmerge.io.output import MARKER, OLD_MARKERS, atomic_output_dir, check_output_dir, is_symmerge_output  # noqa: F401
from symmerge.spec.families import check_head_sizes, is_derived_buffer, required_config_keys
from symmerge.spec.layers import LAYER_COUNT_KEYS, stated_layers_problem

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
    lora: Any = None  # a symmerge.io.hub.LoraDelta applied as the tensors are read (``model+adapter``)
    reference: str = ""  # as the recipe named it (a path, a repo id, ``model+adapter``)

    @property
    def identity(self) -> tuple[Path, Path | None]:
        """What makes two references the same model: the folder, and the LoRA adapter applied to it."""
        return self.path.resolve(), self.lora.path.resolve() if self.lora is not None else None

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
                    shapes.update(_safetensors_header(f))
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
    except SymmergeError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError, OverflowError) as e:
        reason = _first_line(e)
        raise SymmergeError(f"cannot read {path}: {reason} (the file is corrupt or truncated)") from None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
    return shorten(text, 200).strip("'\"") if len(text) > 200 else text


def _safetensors_header(f: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from one safetensors file's header (validated by safetensors), no data read."""
    with _reading(f), safe_open(f, "pt") as h:
        return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys() if not is_derived_buffer(k)}


def _load_pickle(f: Path) -> object:
    """A torch pickle, weights only (tensors and containers, never arbitrary objects): one-line errors."""
    try:
        with open(f, "rb") as h:
            head = h.read(4)
    except OSError as e:
        raise SymmergeError(f"cannot read {f}: {e.strerror or e}") from None
    if not head:
        raise SymmergeError(f"cannot read {f}: the file is empty (0 bytes): copy or download it again")
    # a zip cut short (no central directory) is still a zip: "truncated", not "legacy"
    legacy = not zipfile.is_zipfile(f) and not head.startswith(b"PK\x03\x04")
    try:
        # mmap needs the zip format torch has written since 1.6; the legacy format is read into memory instead
        return torch.load(f, map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line that names what was found is the useful one
        lines = [" ".join(x.split()) for x in str(e).splitlines() if x.strip()]
        found = [x for x in lines if re.search(r"unsupported|global|operand|blocked", x, re.I) and "Re-running" not in x]
        detail = cut(found[0] if found else (lines[0] if lines else type(e).__name__), 120)
        raise SymmergeError(
            f"{f} was refused: it holds objects other than tensors ({detail}); weights-only loading never runs code "
            "from a file: convert it to safetensors where it was made, or remove it"
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError, AttributeError, IndexError) as e:
        if legacy:
            raise SymmergeError(
                f"cannot read {f}: it is in the legacy (pre-1.6, non-zip) torch pickle format and could not be loaded "
                f"({_first_line(e)}); convert it: torch.save(torch.load(path, weights_only=True), path), or to safetensors"
            ) from None
        raise SymmergeError(f"cannot read {f}: {_first_line(e)} (the file is corrupt or truncated)") from None


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SymmergeError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise SymmergeError(f"{path} is not a valid {what}: {cut(str(e), 120)}") from None
    except RecursionError:
        raise SymmergeError(f"{path} is not a valid {what}: nested too deeply") from None
    except OSError as e:
        raise SymmergeError(f"cannot read {path}: {e.strerror or e}") from None


# config.json fields that count something: when set, each must be a positive integer (0 heads divides by zero)
_COUNT_KEYS = ("n_head", "num_attention_heads", "num_key_value_heads", "n_layer", "num_hidden_layers", "hidden_size",
               "n_embd", "intermediate_size", "n_inner", "vocab_size", "head_dim", "num_labels", "image_size", "patch_size",
               "num_channels", "max_position_embeddings", "n_positions")


def _check_config(config: dict, config_path: Path) -> None:
    model_dir = config_path.parent
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        got = "" if model_type is None else f" (got {shorten(model_type)})"
        raise SymmergeError(f"{config_path} has no model_type{got}: the config of model {model_dir} must name its "
                            "architecture, e.g. \"model_type\": \"llama\" (re-save it with save_pretrained)")
    for key in _COUNT_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise SymmergeError(f"{config_path}: {key} must be a positive integer, got {shorten(value)}: "
                                f"the config of model {model_dir} is broken")
    for names in required_config_keys(model_type):
        if not any(config.get(n) is not None for n in names):
            raise SymmergeError(f"{config_path} has none of {', '.join(names)}: the config of model {model_dir} "
                                f"({model_type}) needs one of them")
    try:
        check_head_sizes(config)
    except SymmergeError as e:
        raise SymmergeError(f"{config_path}: {e}: the config of model {model_dir} is broken") from None


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
    config = _read_json(config_path, "config")
    if not isinstance(config, dict):
        raise SymmergeError(f"{config_path} does not hold a JSON object")
    _check_config(config, config_path)

    index = path / SAFETENSORS_INDEX
    # a single model.safetensors wins over an index beside it (one left over from a re-save), as in transformers'
    # from_pretrained: symmerge reads the weights transformers would load
    if index.is_file() and not (path / "model.safetensors").is_file():
        data = _read_json(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SymmergeError(f"{index} is not a valid safetensors index: it needs a non-empty \"weight_map\" object "
                                "mapping tensor names to shard files")
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard.startswith("."):
                raise SymmergeError(f"{index}: weight_map[{shorten(key)}] must name a shard file in {path}, got {shorten(shard)}")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise SymmergeError(f"{index} names {f.name}, which is missing")
        shapes: dict[str, tuple[int, ...]] = {}
        where: dict[str, str] = {}
        for f in files:
            for key, shape in _safetensors_header(f).items():
                if key in where:
                    raise SymmergeError(f"{path}: tensor {shorten(key)} is in both {where[key]} and {f.name}")
                where[key] = f.name
                shapes[key] = shape
        for key, shard in weight_map.items():
            if where.get(key) != shard and not is_derived_buffer(key):  # the headers were read without them
                held = f" (it is in {where[key]})" if key in where else ""
                raise SymmergeError(f"{index} says tensor {shorten(key)} is in {shard}, but that shard does not hold it{held}: "
                                    "the index does not match the shards; re-save the model")
        extra = sorted(set(where) - set(weight_map))
        if extra:
            raise SymmergeError(f"{index} does not list tensor {shorten(extra[0])} of {where[extra[0]]} "
                                f"({len(extra)} unlisted): the index does not match the shards; re-save the model")
        return _layers_checked(Checkpoint(path, config, files, _shapes=shapes), config_path)
    if (path / "model.safetensors").is_file():
        f = path / "model.safetensors"
        return _layers_checked(Checkpoint(path, config, [f], _shapes=_safetensors_header(f)), config_path)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise SymmergeError(
                f"{path} holds only pickle weights ({pickles[0].name}); unpickling can run arbitrary code, so it is "
                "refused: convert to safetensors, or pass --allow-pickle if you trust the file"
            )
        return Checkpoint(path, config, pickles, is_pickle=True)
    raise SymmergeError(f"{path} has no model.safetensors (nor a sharded index, nor pickle weights)")


def _layers_checked(ckpt: Checkpoint, config_path: Path) -> Checkpoint:
    """``ckpt``, once its config's layer count is that of its tensors (:func:`~symmerge.spec.layers.stated_layers_problem`;
    read from the headers, so a pickle checkpoint is checked where its spec is built)."""
    problem = stated_layers_problem(ckpt.config, ckpt.shapes().keys())
    if problem is not None:
        raise SymmergeError(f"{config_path} {problem}")
    return ckpt


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
            part = _load_pickle(f)
            if isinstance(part, Mapping) and "state_dict" in part and isinstance(part["state_dict"], Mapping):
                part = part["state_dict"]
            if not isinstance(part, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()):
                raise SymmergeError(f"{f} does not hold a state dict (a mapping of tensor names to tensors)")
        else:
            with _reading(f):
                part = load_file(f)
            files.update(dict.fromkeys(part, f.resolve()))
        state.update((k, v) for k, v in part.items() if not is_derived_buffer(k))  # spec.families.DERIVED_BUFFER
    if check_finite:
        for key, t in state.items():
            if not all_finite(t):
                raise SymmergeError(f"{ckpt.path}: tensor {key!r} holds NaN or Inf values")
    return FileBackedState(state, files) if file_backed and not ckpt.is_pickle else state


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t`` (True for integer tensors). ``torch.aminmax`` propagates NaN and brings an infinity
    out as the min or max, in one pass with no bool temporary: ~40x faster than ``isfinite(t).all()`` on bf16,
    where the finite check otherwise costs more than a whole TIES merge. Float8 has neither ``aminmax`` nor (on the
    CPU) ``isfinite``: it is checked widened to float32, which holds every float8 value, NaN and Inf exactly."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:
        return bool(torch.isfinite(t.float()).all())
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def is_weight_file(p: Path) -> bool:
    return p.suffix in WEIGHT_SUFFIXES or p.name in (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")


# What a model folder may hold besides its weights, copied into outputs made from it. Only files at the top level:
# never other folders (an output written inside an input would otherwise be copied into every later output), except
# the module folders a sentence-transformers ``modules.json`` names.
SYMMERGE_FILES = (MARKER, *OLD_MARKERS)


def copy_model_files(source: Path, dest: Path) -> None:
    """Copy the model's own files but its weights (config, tokenizer, generation config, model card...) from ``source``."""
    for p in sorted(source.iterdir()):
        if p.name.startswith(".") or is_weight_file(p) or p.name in SYMMERGE_FILES or p.is_symlink() and p.is_dir():
            continue
        if p.is_file():
            shutil.copy2(p, dest / p.name)
    for module in _sentence_transformer_modules(source):
        src = source / module
        if src.is_dir() and not src.is_symlink() and not is_symmerge_output(src):
            shutil.copytree(src, dest / module, symlinks=True,
                            ignore=lambda d, names: [n for n in names if is_weight_file(Path(d) / n) or n in SYMMERGE_FILES])


def _sentence_transformer_modules(source: Path) -> list[str]:
    """The sub-folders a sentence-transformers ``modules.json`` declares (``1_Pooling``...), nothing else."""
    try:
        modules = json.loads((source / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    found = []
    for m in modules if isinstance(modules, list) else []:
        path = m.get("path") if isinstance(m, dict) else None
        if isinstance(path, str) and path and "/" not in path and "\\" not in path and path not in (".", "..") and not path.startswith("."):
            found.append(path)
    return found


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "spiece.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(source: Path, dest: Path) -> None:
    """Replace the tokenizer files in ``dest`` with ``source``'s (mergekit's ``tokenizer_source``, as a plain copy)."""
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise SymmergeError(f"tokenizer_source: {source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for name in TOKENIZER_FILES:
        (dest / name).unlink(missing_ok=True)
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def read_chat_template(directory: Path) -> str | None:
    """The chat template a tokenizer saved in ``directory`` carries, stripped, or None: ``chat_template.jinja``
    (which transformers prefers), else ``chat_template.json``'s, else ``tokenizer_config.json``'s — of a list of
    named templates, the one named ``default`` (what ``tokenizer.chat_template`` gives mergekit)."""
    if (directory / "chat_template.jinja").is_file():
        template: object = (directory / "chat_template.jinja").read_text(errors="replace")
    else:
        template = None
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                config = _read_json(directory / name, name)
                template = config.get("chat_template") if isinstance(config, dict) else None
                if template is not None:
                    break
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return (template.strip() or None) if isinstance(template, str) else None


def set_chat_template(dest: Path, template: str) -> None:
    """Write a Jinja chat template into ``dest``'s tokenizer_config.json (created if missing)."""
    path = dest / "tokenizer_config.json"
    config = _read_json(path, "tokenizer config") if path.is_file() else {}
    if not isinstance(config, dict):
        config = {}
    config["chat_template"] = template
    (dest / "chat_template.jinja").unlink(missing_ok=True)  # it would take precedence over the config's template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def with_module_depth(config: dict, key: str, count: int, layers: list[int]) -> dict:
    """``config`` with the depth at ``key`` (dotted for a nested config: ``text_config.num_hidden_layers``) set to
    ``count``, the module's output layers taken from its source ``layers``; per-layer lists beside that key
    (``layer_types``...) re-indexed as :func:`with_layer_count` does. The input is not modified."""
    *path, last = key.split(".")
    out = dict(config)
    parent = out
    for part in path:
        if not isinstance(parent.get(part), dict):
            return out
        parent[part] = dict(parent[part])
        parent = parent[part]
    old = parent.get(last)
    parent[last] = count
    if isinstance(old, int):
        parent.update(_reindexed_layer_lists(parent, old, count, layers))
    return out


def _reindexed_layer_lists(config: Mapping, old: int, count: int, layers: list[int]) -> dict[str, list]:
    """The per-layer lists of ``config`` (length ``old``, the source depth) taken at the output's source ``layers``:
    every such list when the depth changes to ``count``, ``layer_types`` always (a list of ``old`` entries that is
    not per layer is told apart only by a changed depth)."""
    return {k: [v[i] for i in layers] for k, v in config.items()
            if isinstance(v, list) and len(v) == old and (old != count or k == "layer_types")}


def with_layer_count(config: dict, count: int, layers: list[int]) -> dict:
    """``config`` for a model of ``count`` layers taken from ``layers`` of the source (a frankenmerge): the layer
    count key of the family, and any per-layer list (``layer_types``...) re-indexed."""
    keys = required_config_keys(str(config.get("model_type", "")))
    # a family without a table: whichever of the usual depth keys the config sets (bloom's n_layer, mpt's n_layers)
    names = keys[0] if keys else tuple(k for k in LAYER_COUNT_KEYS if k in config) or ("num_hidden_layers",)
    old = next((config[k] for k in names if isinstance(config.get(k), int)), None)
    out = dict(config)
    for k in names:
        if k in out:
            out[k] = count
    if not any(k in out for k in names):
        out[names[0]] = count
    if old is not None:
        out.update(_reindexed_layer_lists(config, old, count, layers))
    return out
