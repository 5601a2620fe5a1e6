"""Model references as mergekit writes them: a local folder, a Hugging Face repo id ``org/name`` (optionally
``@revision``), either one followed by ``+ADAPTER`` (a PEFT LoRA adapter: a folder or a repo id).

Repo ids resolve through ``huggingface_hub``: from the local cache only when ``HF_HUB_OFFLINE=1``, downloaded
otherwise. A LoRA adapter is applied as it is read (:class:`LoraDelta`), as PEFT's ``merge_and_unload`` applies it:
``W += (lora_alpha / r) · B A`` for every target module of ``adapter_config.json`` (Conv1D and embedding layers
too), whole tensors it saved (``modules_to_save``) replacing the model's; what cannot be applied is refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from symmerge.errors import SymmergeError, cut
from symmerge.lazy import lazy_module

# huggingface_hub's download client costs ~0.3 s to import; only repo ids need it (symmerge/lazy.py)
huggingface_hub = lazy_module("huggingface_hub")
hub_errors = lazy_module("huggingface_hub.errors")

REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?")


def split_reference(ref: str) -> tuple[str, str | None]:
    """``"model+adapter"`` → ``("model", "adapter")``; without ``+``: ``(ref, None)``. A ``+`` that is part of an
    existing path is kept."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref, None
    model, _, lora = ref.rpartition("+")
    return model, lora or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(ref: str, what: str) -> Path | None:
    """The local folder of repo id ``ref`` (``org/name[@revision]``), from the cache or downloaded; ``None`` when
    ``ref`` is not shaped like a repo id; a one-line error naming the id when it cannot be found."""
    if not REPO_ID.fullmatch(ref) or ref.startswith((".", "/", "~")):
        return None
    repo, _, revision = ref.partition("@")
    local_only = offline()
    try:
        patterns = None if local_only else _listed_patterns(repo, revision or None)
        return Path(huggingface_hub.snapshot_download(repo, revision=revision or None, local_files_only=local_only,
                                                      allow_patterns=patterns))
    except hub_errors.LocalEntryNotFoundError:
        how = "not in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if local_only else "neither in the local cache nor downloadable"
        raise SymmergeError(f"{what}: {cut(ref)} is not a local folder, and as a Hugging Face repo id it is {how}") from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:160]
        raise SymmergeError(f"{what}: {cut(ref)} is not a local folder, and as a Hugging Face repo id it failed: {reason}") from None


def _listed_patterns(repo: str, revision: str | None) -> list[str] | None:
    try:
        return download_patterns(huggingface_hub.list_repo_files(repo, revision=revision))
    except Exception:  # no listing (no network, a gated repo): snapshot_download decides, from the cache if it must
        return None


#: What a merge reads from a model repo: configs, tokenizer files and the weights — not other formats of the same
#: weights (GGUF, ONNX, Flax, TF), images or code, which can be many times the model's size.
REPO_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
PICKLE_WEIGHTS = ["*.bin", "*.pt", "*.pth"]


def download_patterns(files: list[str]) -> list[str]:
    """The ``allow_patterns`` of a download, given the repo's file list: :data:`REPO_FILES`, plus the pickled
    weights only when the repo has no safetensors weights (as mergekit prefers safetensors)."""
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return REPO_FILES + ([] if has_safetensors else PICKLE_WEIGHTS)


_PREFIX = r"(?:base_model\.model\.)?"
_ADAPTER = r"(?:\.default)?"  # the adapter name some PEFT versions keep in saved keys
_LORA_KEYS = (  # kind → PEFT's saved key for module MODULE (``base_model.model.`` prefixed)
    ("A", re.compile(_PREFIX + r"(.+)\.lora_A" + _ADAPTER + r"\.weight")),
    ("B", re.compile(_PREFIX + r"(.+)\.lora_B" + _ADAPTER + r"\.weight")),
    ("B bias", re.compile(_PREFIX + r"(.+)\.lora_B" + _ADAPTER + r"\.bias")),
    ("embedding A", re.compile(_PREFIX + r"(.+)\.lora_embedding_A" + _ADAPTER)),
    ("embedding B", re.compile(_PREFIX + r"(.+)\.lora_embedding_B" + _ADAPTER)),
    ("magnitude", re.compile(_PREFIX + r"(.+)\.lora_magnitude_vector" + _ADAPTER + r"(?:\.weight)?")),
)


def _whole_tensor_name(key: str) -> str:
    """The model tensor a whole tensor saved in an adapter replaces: ``modules_to_save`` copies are saved without
    their ``modules_to_save.NAME.`` part, embedding layers (``save_embedding_layers``) and trained biases
    (``bias: all``) under the wrapped layer's ``base_layer``."""
    name = re.sub(r"^base_model\.model\.", "", key)
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name.replace(".base_layer.", ".")


def _suffix_match(key: str, suffix: str) -> bool:
    return key == suffix or key.endswith("." + suffix)


@dataclass
class LoraDelta:
    """A PEFT LoRA (or DoRA) adapter, applied to the tensors it touches as PEFT's ``merge_and_unload`` would
    (:meth:`apply`): whole tensors it saved (``modules_to_save``, embedding layers, trained biases) replace the
    model's; then ``W += scale · B A`` for a linear layer (transposed for a ``Conv1D``, stored in×out),
    ``W += scale · (B A)ᵀ`` for an embedding (``lora_embedding_A/B``), ``b += scale · b_B`` for ``lora_bias``;
    DoRA rescales each output row to its learned magnitude. Keys are model tensor names as suffixes
    (``layers.0.self_attn.q_proj.weight``): a checkpoint key matches a suffix it ends with."""

    path: Path
    scale: float  # lora_alpha / r (rsLoRA: / √r) of every module the patterns do not name
    pairs: dict[str, tuple[str, str]]  # linear / Conv1D weight suffix → (A key, B key)
    magnitudes: dict[str, str] = field(default_factory=dict)  # DoRA: weight suffix → magnitude vector key
    embeddings: dict[str, tuple[str, str]] = field(default_factory=dict)  # embedding weight suffix → (A key, B key)
    biases: dict[str, str] = field(default_factory=dict)  # bias suffix → lora_B bias key (PEFT's lora_bias)
    whole: dict[str, str] = field(default_factory=dict)  # tensor suffix → adapter key of its replacement
    fan_in_fan_out: bool = False  # the config's flag: decides a square weight's layout (PEFT sets it for Conv1D)
    scales: dict[str, float] = field(default_factory=dict)  # tensor suffix → its module's own scale (rank_pattern / alpha_pattern)

    def scale_of(self, suffix: str) -> float:
        return self.scales.get(suffix, self.scale)

    def suffixes(self) -> set[str]:
        return set(self.pairs) | set(self.embeddings) | set(self.biases) | set(self.whole)

    def match(self, keys: list[str]) -> dict[str, str]:
        """Checkpoint key → the adapter's tensor suffix it matches (a checkpoint key ends with the suffix)."""
        suffixes = self.suffixes()
        return {key: suffix for key in keys for suffix in suffixes if _suffix_match(key, suffix)}

    def check(self, shapes: dict[str, tuple[int, ...]], what: str) -> None:
        """Refuse, in one line, what could not be applied as PEFT applies it: an adapter tensor that matches no
        tensor of the model, or matches one of another shape, or DoRA on a Conv1D or embedding layer."""
        matched = self.match(list(shapes))
        found = set(matched.values())
        missing = sorted(self.suffixes() - found)
        if missing:
            raise SymmergeError(f"{what}: the LoRA adapter's {cut(missing[0])} matches no tensor of the model (a different architecture?)")
        own = self._shapes()
        for key, suffix in matched.items():
            shape = tuple(shapes[key])
            if suffix in self.whole and own[self.whole[suffix]] != shape:
                raise SymmergeError(f"{what}: the adapter's {cut(suffix)} has shape {own[self.whole[suffix]]}, the model's {shape} "
                                    "(a resized vocabulary?): not supported")
            if suffix in self.pairs:
                a, b = own[self.pairs[suffix][0]], own[self.pairs[suffix][1]]
                if self._transposed(shape, (b[0], a[1])) and suffix in self.magnitudes:
                    raise SymmergeError(f"{what}: DoRA on a Conv1D layer ({cut(suffix)}, stored in×out) is not supported: merge the "
                                        "adapter with peft's merge_and_unload and give that folder")
            if suffix in self.embeddings:
                a, b = own[self.embeddings[suffix][0]], own[self.embeddings[suffix][1]]
                if shape != (a[1], b[0]):
                    raise SymmergeError(f"{what}: the adapter's embedding LoRA for {cut(suffix)} gives {(a[1], b[0])}, the model's is {shape}")
            if suffix in self.biases and own[self.biases[suffix]] != shape:
                raise SymmergeError(f"{what}: the adapter's lora_B bias for {cut(suffix)} has shape {own[self.biases[suffix]]}, the model's {shape}")

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        with safe_open(self.path / "adapter_model.safetensors", "pt") as h:
            return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}

    def _transposed(self, weight_shape: tuple[int, ...], delta_shape: tuple[int, int]) -> bool:
        """Whether ``B A`` (out×in) must be transposed to fit ``weight_shape``: a Conv1D stores in×out. PEFT decides by
        the layer's type; the shape decides here, and the config's ``fan_in_fan_out`` (which PEFT sets when it wraps
        a Conv1D) decides a square weight."""
        out_in, in_out = tuple(delta_shape), tuple(reversed(delta_shape))
        if tuple(weight_shape) == out_in and out_in != in_out:
            return False
        if tuple(weight_shape) == in_out and out_in != in_out:
            return True
        if tuple(weight_shape) == out_in:  # square
            return self.fan_in_fan_out
        raise SymmergeError(f"{self.path}: a LoRA update of shape {out_in} does not fit a weight of shape {tuple(weight_shape)}")

    def _read(self, *keys: str) -> list[torch.Tensor]:
        with safe_open(self.path / "adapter_model.safetensors", "pt") as h:
            return [h.get_tensor(k).float() for k in keys]

    def delta(self, a_key: str, b_key: str, scale: float) -> torch.Tensor:
        a, b = self._read(a_key, b_key)
        return (b @ a).mul_(scale)

    def apply(self, weight: torch.Tensor, suffix: str) -> torch.Tensor:
        """``weight`` adapted, rounded once to its dtype. A whole tensor the adapter saved replaces it (rounded to its
        dtype, as PEFT loads it into the model); then ``W + ΔW`` with ``ΔW = scale · B A`` (``(B A)ᵀ`` for Conv1D
        storage and for embeddings, whose ``A`` is r×vocab and ``B`` dim×r); a ``lora_B`` bias adds ``scale · b_B``.
        DoRA (Liu et al. 2024, PEFT's merge): ``m / ‖W + ΔW‖_row · (W + ΔW)``, the L2 norm per output row over the
        input axis and ``m`` the adapter's magnitude vector (one entry per output row)."""
        dtype = weight.dtype
        if suffix in self.whole:
            weight = self._read(self.whole[suffix])[0].to(dtype)
        if suffix in self.pairs:
            delta = self.delta(*self.pairs[suffix], self.scale_of(suffix))
            if self._transposed(tuple(weight.shape), tuple(delta.shape)):
                delta = delta.T
            adapted = weight.float() + delta
            if suffix in self.magnitudes:
                (magnitude,) = self._read(self.magnitudes[suffix])
                adapted = adapted * (magnitude.flatten() / torch.linalg.vector_norm(adapted, dim=1)).unsqueeze(1)
            return adapted.to(dtype)
        if suffix in self.embeddings:
            return (weight.float() + self.delta(*self.embeddings[suffix], self.scale_of(suffix)).T).to(dtype)
        if suffix in self.biases:
            (bias,) = self._read(self.biases[suffix])
            return (weight.float() + self.scale_of(suffix) * bias).to(dtype)
        return weight


def open_lora(path: Path, what: str) -> LoraDelta:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``). Every tensor in it is
    either applied (:class:`LoraDelta`) or refused in one line: none is ignored."""
    cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise SymmergeError(f"{what}: {path} is not a LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise SymmergeError(f"{cfg_path}: not readable JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise SymmergeError(f"{cfg_path}: only LoRA adapters are supported, got peft_type {cut(str(cfg.get('peft_type')))}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or r <= 0 or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise SymmergeError(f"{cfg_path}: r must be a positive integer and lora_alpha a number")
    rank_pattern, alpha_pattern = _pattern(cfg, "rank_pattern", cfg_path, int), _pattern(cfg, "alpha_pattern", cfg_path, (int, float))
    rslora = bool(cfg.get("use_rslora"))
    scale = lora_scale(alpha, r, rslora)
    dora = bool(cfg.get("use_dora"))
    targets = cfg.get("target_modules")
    with safe_open(weights, "pt") as h:
        keys = list(h.keys())
    found: dict[str, dict[str, str]] = {kind: {} for kind, _ in _LORA_KEYS}
    whole = {}
    for k in keys:
        if "trainable_tokens" in k:
            raise SymmergeError(f"{weights}: trainable token deltas ({cut(k)}) are not supported: merge the adapter with peft's "
                                "merge_and_unload and give that folder")
        kind = next(((kind, m.group(1)) for kind, rx in _LORA_KEYS if (m := rx.fullmatch(k))), None)
        if kind is not None:
            found[kind[0]][kind[1]] = k
        elif "lora_" in k:
            raise SymmergeError(f"{weights}: {cut(k)} is no LoRA tensor symmerge knows (lora_A/B, lora_embedding_A/B, lora_magnitude_vector)")
        else:  # modules_to_save, saved embedding layers, trained biases: whole tensors that replace the model's
            whole[_whole_tensor_name(k)] = k

    def targeted(module: str) -> bool:
        # PEFT creates LoRA layers for target_modules only; a list names modules by their last component
        return not (isinstance(targets, list) and targets and module.rsplit(".", 1)[-1] not in targets)

    saved_as = {"A": "lora_A", "B": "lora_B", "embedding A": "lora_embedding_A", "embedding B": "lora_embedding_B"}

    def paired(a_kind: str, b_kind: str) -> dict[str, tuple[str, str]]:
        out = {}
        for module, a_key in found[a_kind].items():
            if module not in found[b_kind]:
                raise SymmergeError(f"{weights}: {cut(a_key)} has no matching {saved_as[b_kind]}")
            if targeted(module):
                out[module] = (a_key, found[b_kind][module])
        stray = sorted(set(found[b_kind]) - set(found[a_kind]))
        if stray:
            raise SymmergeError(f"{weights}: {cut(found[b_kind][stray[0]])} has no matching {saved_as[a_kind]}")
        return out

    pairs = {module + ".weight": ab for module, ab in paired("A", "B").items()}
    embeddings = {module + ".weight": ab for module, ab in paired("embedding A", "embedding B").items()}
    biases = {module + ".bias": k for module, k in found["B bias"].items() if targeted(module)}
    if not pairs and not embeddings and not whole:
        raise SymmergeError(f"{weights}: no lora_A / lora_B pairs for the target modules {cut(str(targets))}")
    magnitudes = {}
    if dora:  # PEFT stores one magnitude vector per adapted module: MODULE.lora_magnitude_vector
        for module, k in found["magnitude"].items():
            if module + ".weight" in embeddings:
                raise SymmergeError(f"{weights}: DoRA on an embedding layer ({cut(module)}) is not supported: merge the adapter with "
                                    "peft's merge_and_unload and give that folder")
            if module + ".weight" in pairs:
                magnitudes[module + ".weight"] = k
        lacking = sorted(set(pairs) - set(magnitudes))
        if lacking:
            raise SymmergeError(f"{weights}: use_dora is set but {cut(lacking[0])} has no lora_magnitude_vector")
    elif found["magnitude"]:
        stray = next(iter(found["magnitude"].values()))
        raise SymmergeError(f"{weights}: holds DoRA magnitude vectors ({cut(stray)}) but adapter_config.json does not set "
                            "use_dora: true: which is it?")
    # per-module rank and alpha (PEFT's rank_pattern / alpha_pattern): each module's own scale; its lora_A must hold
    # that many rows, as PEFT builds the layer with that rank before loading the saved tensors into it
    with safe_open(weights, "pt") as h:
        ranks = {k: h.get_slice(k).get_shape()[0] for k, _ in (*pairs.values(), *embeddings.values())}
    scales = {}
    for suffix, (a_key, _) in (*pairs.items(), *embeddings.items()):
        module = suffix.removesuffix(".weight")
        r_m, alpha_m = pattern_value(rank_pattern, module, r), pattern_value(alpha_pattern, module, alpha)
        if ranks[a_key] != r_m:
            raise SymmergeError(f"{weights}: {cut(a_key)} has rank {ranks[a_key]}, the config's r / rank_pattern give {r_m}")
        if (r_m, alpha_m) != (r, alpha):
            scales[suffix] = scales[module + ".bias"] = float(lora_scale(alpha_m, r_m, rslora))
    return LoraDelta(path, float(scale), pairs, magnitudes, embeddings, biases, whole, bool(cfg.get("fan_in_fan_out")),
                     {k: v for k, v in scales.items() if k in pairs or k in embeddings or k in biases})


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """The factor of a LoRA update ``scale · B A``: ``alpha / r``, or rsLoRA's ``alpha / √r`` (Kalajdzievski 2023)."""
    return alpha / r**0.5 if rslora else alpha / r


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """A module's entry in a PEFT ``rank_pattern`` / ``alpha_pattern``: the first key, in the config's order, that
    names the module's whole dotted name or a dotted tail of it, read as a regular expression (``q_proj`` names
    ``model.layers.0.self_attn.q_proj``, ``layers.0.self_attn.q_proj`` too, ``proj`` does not); else ``default``."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def _pattern(cfg: dict, name: str, cfg_path: Path, kind: type | tuple[type, ...]) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern`` of an adapter config, checked: regular expressions → positive numbers."""
    pattern = cfg.get(name) or {}
    if not isinstance(pattern, dict):
        raise SymmergeError(f"{cfg_path}: {name} must map module name patterns to values, got {cut(str(pattern))}")
    for key, value in pattern.items():
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise SymmergeError(f"{cfg_path}: {name}[{cut(key)}] must be a positive {'integer' if kind is int else 'number'}, got {cut(str(value))}")
        try:
            re.compile(key)
        except re.error as e:
            raise SymmergeError(f"{cfg_path}: {name} key {cut(key)} is not a regular expression ({e})") from None
    return pattern
