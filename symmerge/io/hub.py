"""Model references as mergekit writes them: a local folder, a Hugging Face repo id ``org/name`` (optionally
``@revision``), either one followed by ``+ADAPTER`` (a PEFT LoRA adapter: a folder or a repo id).

Repo ids resolve through ``huggingface_hub``: from the local cache only when ``HF_HUB_OFFLINE=1``, downloaded
otherwise. A LoRA adapter is applied as it is read (:class:`LoraDelta`): ``W += (lora_alpha / r) · B A`` for every
target module of ``adapter_config.json``, from ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

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
        return Path(huggingface_hub.snapshot_download(repo, revision=revision or None, local_files_only=local_only))
    except hub_errors.LocalEntryNotFoundError:
        how = "not in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if local_only else "neither in the local cache nor downloadable"
        raise SymmergeError(f"{what}: {cut(ref)} is not a local folder, and as a Hugging Face repo id it is {how}") from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:160]
        raise SymmergeError(f"{what}: {cut(ref)} is not a local folder, and as a Hugging Face repo id it failed: {reason}") from None


@dataclass
class LoraDelta:
    """A PEFT LoRA (or DoRA) adapter: :meth:`apply` adapts the weights it targets (``W + scale · B A``; DoRA:
    rescaled per output row to its learned magnitude)."""

    path: Path
    scale: float
    pairs: dict[str, tuple[str, str]]  # base weight key suffix (``layers.0.self_attn.q_proj.weight``) → (A key, B key)
    magnitudes: dict[str, str] = field(default_factory=dict)  # DoRA: base weight key suffix → magnitude vector key

    def match(self, keys: list[str]) -> dict[str, str]:
        """Checkpoint key → the adapter's weight key suffix it matches (a checkpoint key ends with the suffix)."""
        out = {}
        for key in keys:
            for suffix in self.pairs:
                if key == suffix or key.endswith("." + suffix):
                    out[key] = suffix
                    break
        return out

    def delta(self, a_key: str, b_key: str) -> torch.Tensor:
        with safe_open(self.path / "adapter_model.safetensors", "pt") as h:
            a, b = h.get_tensor(a_key).float(), h.get_tensor(b_key).float()
        return (b @ a).mul_(self.scale)

    def apply(self, weight: torch.Tensor, suffix: str) -> torch.Tensor:
        """``weight`` (out×in, ``nn.Linear`` layout) adapted, rounded once to its dtype: ``W + ΔW`` with
        ``ΔW = scale · B A``; DoRA (Liu et al. 2024, PEFT's merge): ``m / ‖W + ΔW‖ · (W + ΔW)``, the L2 norm taken
        per output row over the input axis and ``m`` the adapter's magnitude vector (one entry per output row)."""
        adapted = weight.float() + self.delta(*self.pairs[suffix])
        if suffix in self.magnitudes:
            with safe_open(self.path / "adapter_model.safetensors", "pt") as h:
                magnitude = h.get_tensor(self.magnitudes[suffix]).float().flatten()
            adapted = adapted * (magnitude / torch.linalg.vector_norm(adapted, dim=1)).unsqueeze(1)
        return adapted.to(weight.dtype)


def open_lora(path: Path, what: str) -> LoraDelta:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
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
    if cfg.get("use_rslora"):
        scale = alpha / r**0.5
    else:
        scale = alpha / r
    dora = bool(cfg.get("use_dora"))
    if dora and cfg.get("fan_in_fan_out"):
        raise SymmergeError(f"{cfg_path}: DoRA adapters of Conv1D layers (fan_in_fan_out: true, GPT-2) are not supported: "
                            "merge the adapter into its model with peft's merge_and_unload and give that folder")
    targets = cfg.get("target_modules")
    with safe_open(weights, "pt") as h:
        keys = list(h.keys())
    pairs = {}
    for k in keys:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.default)?\.weight", k)
        if not m:
            continue
        module = m.group(1)
        b_key = k.replace("lora_A", "lora_B")
        if b_key not in keys:
            raise SymmergeError(f"{weights}: {cut(k)} has no matching lora_B")
        if isinstance(targets, list) and targets and module.rsplit(".", 1)[-1] not in targets:
            continue
        pairs[module + ".weight"] = (k, b_key)
    if not pairs:
        raise SymmergeError(f"{weights}: no lora_A / lora_B pairs for the target modules {cut(str(targets))}")
    magnitudes = {}
    if dora:  # PEFT stores one magnitude vector per adapted module: MODULE.lora_magnitude_vector
        for k in keys:
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?", k)
            if m and m.group(1) + ".weight" in pairs:
                magnitudes[m.group(1) + ".weight"] = k
        lacking = sorted(set(pairs) - set(magnitudes))
        if lacking:
            raise SymmergeError(f"{weights}: use_dora is set but {cut(lacking[0])} has no lora_magnitude_vector")
    else:
        stray = next((k for k in keys if "lora_magnitude_vector" in k), None)
        if stray is not None:
            raise SymmergeError(f"{weights}: holds DoRA magnitude vectors ({cut(stray)}) but adapter_config.json does not set "
                                "use_dora: true: which is it?")
    return LoraDelta(path, float(scale), pairs, magnitudes)
