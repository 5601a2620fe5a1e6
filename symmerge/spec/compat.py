"""Can two checkpoints be aligned? Shape and family checks, run on configs and safetensors headers before any
weight is read, each failing with a one-line error that names the first difference."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.spec.base import ModelSpec

INFERENCE_NEUTRAL_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "use_cache", "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "return_dict", "torchscript", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params",
    "tokenizer_class", "prefix", "gradient_checkpointing", "tie_word_embeddings", "vocab_size", "quantization_config",
})
"""config.json keys that do not change what the weights compute at inference (metadata, token ids, training-only
settings), or that symmerge handles itself (tying: a tied model lends its embedding; vocab_size: the shapes)."""


def config_differences(reference: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """The config.json keys that both configs set, to different values, that may change what the weights compute
    (``rope_theta``, ``rms_norm_eps``, ``hidden_act``, ``rope_scaling``...): a merge writes one config, so the other
    models' values are dropped. Dropout is training-only. Keys only one config sets are left out: transformers
    versions spell one setting differently (``rope_theta`` or ``rope_parameters``)."""
    def neutral(key: str) -> bool:
        return key in INFERENCE_NEUTRAL_CONFIG_KEYS or "dropout" in key or key.endswith("pdrop")

    return sorted(k for k in reference.keys() & other.keys() if not neutral(k) and reference[k] != other[k])


def check_same_shape(reference: ModelSpec, other: ModelSpec, other_name: str = "model") -> None:
    """Raise a one-line error naming the first architectural value (family, layers, widths...) that differs."""
    for what, ref_value in reference.shape().items():
        value = other.shape()[what]
        if value != ref_value:
            raise SymmergeError(
                f"{other_name} has {what} {value}, the reference has {ref_value}: these cannot be aligned"
            )


WIDTHS = ("attention heads", "key/value heads", "FFN width")
"""The values of :meth:`ModelSpec.shape` a narrower model may have fewer of: a semi-permutation embeds it into the
reference's widths (docs/DESIGN.md §1, models of different widths)."""


def widths_differ(reference: ModelSpec, other: ModelSpec) -> bool:
    """Whether ``other`` has another FFN width or head count than ``reference``."""
    return any(reference.shape()[w] != other.shape()[w] for w in WIDTHS)


def check_embeddable(reference: ModelSpec, other: ModelSpec, other_name: str = "model") -> None:
    """:func:`check_same_shape`, except that ``other`` may be narrower: fewer FFN neurons, or fewer attention heads
    of the same head dim (with GQA, as many query heads per key/value head). One-line error otherwise."""
    ref_shape, shape = reference.shape(), other.shape()
    for what, ref_value in ref_shape.items():
        if what in WIDTHS:
            continue
        if shape[what] != ref_value:
            raise SymmergeError(f"{other_name} has {what} {shape[what]}, the reference has {ref_value}: these cannot be aligned"
                                + (" (a narrower model can be aligned into a wider one only through its FFN width and head count)"
                                   if what in ("hidden size", "head dim", "layers") else ""))
    for what in ("FFN width", "attention heads"):
        if shape[what] > ref_shape[what]:
            raise SymmergeError(f"{other_name} has {what} {shape[what]}, the reference has {ref_shape[what]}: only a narrower model "
                                "can be aligned into a wider one (make the widest model the reference)")
    if shape["attention heads"] != ref_shape["attention heads"] and any(g.row_norms for g in reference.attention):
        raise SymmergeError(f"{other_name} has {shape['attention heads']} attention heads, the reference has {ref_shape['attention heads']}: "
                            f"{reference.family}'s q/k norms span every head, so an empty head would change them")
    group, ref_group = other.num_heads // (other.num_kv_heads or other.num_heads), reference.num_heads // (reference.num_kv_heads or reference.num_heads)
    if group != ref_group:
        raise SymmergeError(f"{other_name} has {group} query heads per key/value head, the reference has {ref_group}: "
                            "heads of different widths can be aligned only with the same grouping")


def resized_keys(reference: ModelSpec, other: ModelSpec) -> frozenset[str]:
    """The tensors whose shapes differ between a narrower ``other`` and ``reference`` (the keys of every group whose
    width differs), which :func:`check_compatible_shapes` then does not compare."""
    keys = set()
    if reference.ffn_width != other.ffn_width:
        keys |= {s.key for g in reference.ffn for s in g.slots()}
    if reference.num_heads != other.num_heads:
        keys |= {s.key for g in reference.attention for s in g.slots()}
    return frozenset(keys)


def check_compatible_shapes(reference: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]], model_name: str = "model",
                            optional: frozenset[str] = frozenset(), resized: frozenset[str] = frozenset(), *,
                            reference_name: str = "the reference") -> None:
    """Same tensor names and shapes, or a one-line error naming the first difference. ``optional`` keys may be
    missing on either side (a tied LM head that folding unties); ``resized`` keys may differ in shape (a narrower
    model's FFN and attention tensors, :func:`resized_keys`). Models that share fewer than half of the reference's
    names are told apart as different architectures, not by their first missing tensor."""
    missing = sorted(set(reference) - set(model) - optional)
    extra = sorted(set(model) - set(reference) - optional)
    shared = len(set(reference) & set(model))
    if missing and extra and shared < len(reference) / 2:
        prefixed = _prefixed(reference, model, model_name) or _prefixed(model, reference, reference_name)
        hint = (f": {prefixed[0]}'s names carry the prefix {prefixed[1]!r} (a model with a task head, saved with "
                "AutoModelFor..., against a bare base model): give models saved with one class") if prefixed else ""
        raise SymmergeError(f"{model_name} and {reference_name} are not the same architecture: they share {shared} of "
                            f"{len(reference)} tensor names ({reference_name} has {missing[0]!r}, {model_name} has {extra[0]!r}){hint}")
    if missing or extra:
        which, key = ("lacks", missing[0]) if missing else ("has an extra", extra[0])
        more = len(missing) + len(extra) - 1
        raise SymmergeError(f"{model_name} {which} tensor {key!r}" + (f" (and {more} more differences)" if more else ""))
    for key, shape in reference.items():
        if key in model and key not in resized and tuple(shape) != tuple(model[key]):
            raise SymmergeError(f"tensor {key!r} has shape {tuple(model[key])} in {model_name}, {tuple(shape)} in the reference")


def _prefixed(bare: Collection[str], other: Collection[str], other_name: str) -> tuple[str, str] | None:
    """``(other_name, prefix)`` when most of ``bare``'s names are in ``other`` with one prefix in front (``bert.``,
    ``model.``, ``transformer.``), else ``None``."""
    bare_set, other_set = set(bare), set(other)
    key = next((k for k in sorted(bare_set - other_set)), None)
    prefix = next((o[: -len(key)] for o in sorted(other_set) if key and o.endswith("." + key)), None)
    if prefix and sum(prefix + k in other_set for k in bare_set) >= len(bare_set) / 2:
        return other_name, prefix
    return None


def check_compatible(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], model_name: str = "model",
                     optional: frozenset[str] = frozenset(), resized: frozenset[str] = frozenset(), *,
                     reference_name: str = "the reference") -> None:
    """:func:`check_compatible_shapes` on two state dicts (a memory-mapped one's shapes come from its headers:
    nothing is read)."""
    check_compatible_shapes(_shapes(reference), _shapes(model), model_name, optional, resized, reference_name=reference_name)


def check_floating(spec: ModelSpec, state: Mapping[str, torch.Tensor], model_name: str = "model") -> None:
    """Every tensor a symmetry group transforms is floating point, or a one-line error naming the first that is not:
    a permutation or rotation of quantised integer weights would ignore their scales. The dtypes come from the
    headers where ``state`` has them (a memory-mapped state's :meth:`layout`): nothing is read."""
    layout = getattr(state, "layout", None)
    headers = layout() if callable(layout) else None
    for key in sorted(spec.touched_keys()):
        if headers is not None:
            name = headers[key][0] if key in headers else None
            floating = name is None or name.startswith(("F", "BF"))
        else:
            t = state.get(key) if isinstance(state, dict) else None
            name, floating = (None, True) if t is None else (t.dtype, t.is_floating_point())
        if not floating:
            raise SymmergeError(f"{model_name}: tensor {key!r} is {name}, not floating point: symmerge aligns float weights; "
                                "dequantise the model to bfloat16 or float32 first")


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape: ``state.shapes()`` where it has one (:class:`~symmerge.io.stream.LazyState`, from the
    headers), else from the tensors."""
    shapes = getattr(state, "shapes", None)
    return shapes() if callable(shapes) else {k: tuple(v.shape) for k, v in state.items()}


def tied_head(spec: ModelSpec | None) -> tuple[str, str] | None:
    """``(head key, embedding key)`` when the family may tie its LM head to the embedding (a tied checkpoint then
    stores no head: the embedding stands in for it), else ``None``."""
    return spec.residual.tied if spec is not None and spec.residual is not None else None


def lent_head(models: Sequence[tuple[ModelSpec, Collection[str]]]) -> tuple[str, str] | None:
    """``(head, embedding)`` when some of ``models`` (spec, tensor names) tie their LM head (they store none) and
    others store their own (an untied fine-tune, an output of ``align -s ...,residual``): the tied ones then lend
    their embedding as their head. The pair comes from a tied model's spec, whichever model that is (an untied
    model's config names none). ``None`` when all agree, or for models of different families (whose tensor names
    differ anyway: the shape checks name that)."""
    if len({spec.family for spec, _ in models}) > 1:
        return None
    pair = next((p for p in (tied_head(spec) for spec, _ in models) if p is not None), None)
    if pair is None:
        return None
    has_head = [pair[0] in keys for _, keys in models]
    return pair if any(has_head) and not all(has_head) else None


def untied_head(spec: ModelSpec, symmetries: frozenset[str]) -> frozenset[str]:
    """The LM-head key that may exist in one checkpoint only: folding the final norm into a tied head unties it, so
    a folded (untied) checkpoint holds it and a tied one does not — when the residual class is on."""
    if "residual" in symmetries and spec.residual is not None and spec.residual.tied is not None:
        return frozenset({spec.residual.tied[0]})
    return frozenset()
