"""The modules of multi-module architectures (vision-language models, encoder-decoders), for mergekit's recipes
``modules: {NAME: {models: ... | slices: ..., parameters: ...}}``, which merge each module with its own inputs.

mergekit 0.1.5 defines these "modular" architectures in ``mergekit/_data/architectures/*.json`` (``kind: modular``):
each module has a name and either a ``weight_prefix`` or full tensor names. The table below is written from those
files (names, prefixes and depth keys; symmerge reads every tensor under a module's prefixes, where mergekit lists
them one by one). A config's architecture is its ``architectures`` entry, as mergekit looks it up
(``arch_info_for_config``: exactly one entry). Within a module the layers are read from the tensor names, as for a
family without a spec (:mod:`symmerge.spec.layers`), so ``slices``, ``layer_range`` and gradients work per module.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from symmerge.errors import SymmergeError, cut
from symmerge.spec.base import ModelSpec
from symmerge.spec.layers import LAYER_INDEX, loose_role


@dataclass(frozen=True)
class Module:
    """One module of a modular architecture.

    ``prefixes``: its tensors' names begin with one of these; where the prefixes of two modules both match a name,
    the longer one wins (Qwen2-VL's ``visual.merger.`` projector inside its ``visual.`` vision tower).
    ``depth_keys``: config.json keys (dotted for nested configs) that may state its number of layers, the first
    present is checked against the tensor names and set in a merged config whose depth changes.
    ``layered``: whether the first ``.N.`` of its names indexes layers (Qwen2-VL's ``merger.mlp.0`` / ``mlp.2`` are
    two linear maps of one MLP, not layers; mergekit lists them as fixed names).
    ``before``: module names of tensors outside the layers that come before them (the first slice's inputs),
    besides the embeddings :func:`~symmerge.spec.layers.loose_role` recognises by name (mergekit's ``pre_weights``).
    """

    name: str
    prefixes: tuple[str, ...]
    depth_keys: tuple[str, ...] = ()
    layered: bool = True
    before: frozenset[str] = frozenset()


_TEXT = ("text_config.num_hidden_layers",)
_VISION = ("vision_config.num_hidden_layers",)
_LLAVA_PROJECTOR = Module("multi_modal_projector", ("multi_modal_projector.",), layered=False)
_QWEN2_VISION = Module("vision_tower", ("visual.",), ("vision_config.depth",))
_QWEN2_PROJECTOR = Module("multi_modal_projector", ("visual.merger.",), layered=False)
_QWEN3 = (Module("text_decoder", ("model.language_model.", "lm_head."), _TEXT),
          Module("vision_tower", ("model.visual.",), ("vision_config.depth",)),
          # the deepstack mergers are layers (mergekit: override_num_layers 3); the main merger comes before them
          Module("multi_modal_projector", ("model.visual.merger.", "model.visual.deepstack_merger_list."),
                 before=frozenset({"merger"})))
_WHISPER_ENCODER = Module("encoder", ("model.encoder.",), ("encoder_layers",), before=frozenset({"conv1", "conv2"}))

MODULAR_ARCHITECTURES: dict[str, tuple[Module, ...]] = {
    # mistral3.json: Pixtral vision tower (patch_conv and ln_pre before its layers), the projector without layers
    "Mistral3ForConditionalGeneration": (
        Module("text_decoder", ("language_model.",), _TEXT),
        Module("vision_tower", ("vision_tower.",), _VISION, before=frozenset({"patch_conv", "ln_pre"})),
        _LLAVA_PROJECTOR),
    "Gemma3ForConditionalGeneration": (  # gemma3vl.json: a SigLIP vision tower
        Module("text_decoder", ("language_model.",), _TEXT),
        # mergekit: vision_tower.vision_model. (the layout transformers 4.5x saves); transformers 5 saves vision_tower.encoder...
        Module("vision_tower", ("vision_tower.",), _VISION),
        _LLAVA_PROJECTOR),
    "Llama4ForConditionalGeneration": (  # llama4.json: the vision module is named vision_model there
        Module("text_decoder", ("language_model.",), _TEXT),
        Module("vision_model", ("vision_model.",), _VISION),
        _LLAVA_PROJECTOR),
    "Qwen2VLForConditionalGeneration": (  # qwen2_vl.json: full names, no prefixes
        Module("text_decoder", ("model.", "lm_head."), ("num_hidden_layers", "text_config.num_hidden_layers")),
        _QWEN2_VISION, _QWEN2_PROJECTOR),
    "Qwen2_5_VLForConditionalGeneration": (  # qwen2_5_vl.json
        Module("text_decoder", ("model.", "lm_head."), ("text_config.num_hidden_layers", "num_hidden_layers")),
        _QWEN2_VISION, _QWEN2_PROJECTOR),
    "Qwen3VLForConditionalGeneration": _QWEN3,  # qwen3_vl_dense.json
    "Qwen3VLMoeForConditionalGeneration": _QWEN3,  # qwen3_vl.json
    "T5ForConditionalGeneration": (  # t5.json: the shared embedding and the head are a module of their own
        Module("decoder", ("decoder.",), ("num_decoder_layers",)),
        Module("encoder", ("encoder.",), ("num_layers",)),
        Module("shared", ("shared.", "lm_head."), layered=False, before=frozenset({"shared"}))),  # shared: the embedding
    # whisper.json (its decoder prefix lacks the final dot there, so mergekit 0.1.5 finds none of its tensors)
    "WhisperForConditionalGeneration": (
        Module("decoder", ("model.decoder.",), ("decoder_layers",)),
        _WHISPER_ENCODER),
}
"""mergekit 0.1.5's modular architectures, by the class name in config.json's ``architectures``."""


def architecture_name(config: Any) -> str | None:
    """The one entry of config.json's ``architectures``, else ``None`` (none, or several: mergekit refuses those)."""
    names = config.get("architectures") if isinstance(config, Mapping) else getattr(config, "architectures", None)
    if isinstance(names, (list, tuple)) and len(names) == 1 and isinstance(names[0], str):
        return names[0]
    return None


def modules_of(config: Any) -> tuple[Module, ...] | None:
    """The modules of the config's architecture when it is a modular one, else ``None`` (one module, ``default``)."""
    name = architecture_name(config)
    return MODULAR_ARCHITECTURES.get(name) if name is not None else None


def module_of(modules: tuple[Module, ...], key: str) -> Module | None:
    """The module a tensor belongs to: the one with the longest prefix of its name; ``None`` when none has one."""
    best, length = None, -1
    for module in modules:
        for prefix in module.prefixes:
            if key.startswith(prefix) and len(prefix) > length:
                best, length = module, len(prefix)
    return best


def module_keys(modules: tuple[Module, ...], module: Module, keys: Collection[str]) -> list[str]:
    """The tensors of ``module`` among ``keys``, in their order."""
    return [k for k in keys if module_of(modules, k) is module]


def module_layers(config: Any, module: Module, keys: Collection[str], architecture: str = "") -> ModelSpec:
    """The layer structure of one module, from its tensors' names (``keys``: the module's tensors only): every
    tensor whose first ``.N.`` component follows one common prefix is in layer ``N``; a module without layered
    names has no layers. The indices must run 0…n−1 and agree with the module's depth in the config where it states
    one. Tensors outside the layers come before them when they are embeddings or named in ``module.before``, else
    after. One-line errors as :func:`~symmerge.spec.layers.infer_layers`."""
    where = f"{architecture or 'model'} module {module.name}"
    prefixes: dict[str, set[int]] = {}
    if module.layered:
        for key in keys:
            match = LAYER_INDEX.search(key)
            if match is not None:
                prefixes.setdefault(key[: match.start()], set()).add(int(match.group(1)))
    if len(prefixes) > 1:
        first, second = sorted(prefixes)[:2]
        raise SymmergeError(f"{where}: tensor names index layers under both {cut(first, 60)!r} and {cut(second, 60)!r}, "
                            "so symmerge cannot tell which are the module's layers")
    prefix, indices = next(iter(prefixes.items())) if prefixes else ("", set())
    count = max(indices) + 1 if indices else 0
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise SymmergeError(f"{where}: layers {cut(prefix, 60)}.N skip index {missing[0]} (indices up to {count - 1})")
    stated = stated_depth(config, module)
    if stated is not None and prefixes and stated[1] != count:
        raise SymmergeError(f"{where}: config.json has {stated[0]} = {stated[1]}, but the tensor names hold {count} "
                            f"layers {cut(prefix, 60)}.0…{count - 1}")
    layered = {k for k in keys if prefixes and (m := LAYER_INDEX.search(k)) is not None and k[: m.start()] == prefix}
    roles = tuple((k, role) for k in sorted(set(keys) - layered) if (role := _loose_role(k, module)) != "other")
    return ModelSpec(where, count, 0, 0, 0, 0, roles=roles, blocks=tuple(f"{prefix}.{i}" for i in range(count)))


def _loose_role(key: str, module: Module) -> str:
    """:func:`~symmerge.spec.layers.loose_role`, with the module's own names of tensors before its layers."""
    if any(m in module.before for m in key.split(".")[:-1]):
        return "embeddings"
    return loose_role(key)


def stated_depth(config: Any, module: Module) -> tuple[str, int] | None:
    """(key, value) of the first of the module's ``depth_keys`` the config sets to an integer, else ``None``."""
    for key in module.depth_keys:
        value = config_at(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


def config_at(config: Any, dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"`` (``None`` where a step is missing)."""
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
        if value is None:
            return None
    return value
