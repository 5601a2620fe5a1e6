"""Per-architecture symmetry specs: the only place that knows tensor names.

Each builder reads sizes from the model's config (nothing hard-coded) and resolves names against the state
dict's keys, so the same spec works on a ``model.safetensors`` file and on a live module's ``state_dict()`` (for
ViT, transformers 5.x renamed the in-memory tensors but still writes the legacy names to disk).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from symmerge.errors import SymmergeError
from symmerge.spec.base import AttentionGroup, FFNGroup, ModelSpec, Slot, find_prefix


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """First of ``names`` set on ``config`` (a ``PretrainedConfig`` or a plain dict from config.json)."""
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise SymmergeError(f"the model config has none of {', '.join(names)}")


def model_type(config: Any) -> str:
    return str(config_value(config, "model_type"))


def _sizes(config: Any, layers: tuple[str, ...], hidden: tuple[str, ...], heads: tuple[str, ...]) -> tuple[int, int, int, int]:
    num_layers = int(config_value(config, *layers))
    hidden_size = int(config_value(config, *hidden))
    num_heads = int(config_value(config, *heads))
    if hidden_size % num_heads:
        raise SymmergeError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
    return num_layers, hidden_size, num_heads, hidden_size // num_heads


def _require_prefix(keys: Collection[str], suffix: str, family: str) -> str:
    prefix = find_prefix(keys, suffix)
    if prefix is None:
        raise SymmergeError(f"no tensor named like '*{suffix}' in the checkpoint: is this really a {family} model?")
    return prefix


def _linear(name: str) -> tuple[Slot, Slot]:
    return Slot(f"{name}.weight"), Slot(f"{name}.bias")


def encoder_spec(config: Any, keys: Collection[str], family: str, layout: Callable[[str, int], dict[str, str]]) -> ModelSpec:
    """BERT-style blocks (``nn.Linear`` with biases): ``layout(prefix, i)`` names the q/k/v/o/ffn_in/ffn_out modules."""
    num_layers, d, h, dh = _sizes(config, ("num_hidden_layers",), ("hidden_size",), ("num_attention_heads",))
    ffn_width = int(config_value(config, "intermediate_size"))
    prefix = _require_prefix(keys, layout("", 0)["q"] + ".weight", family)
    ffn, attention = [], []
    for i in range(num_layers):
        names = layout(prefix, i)
        (q, qb), (k, kb), (v, vb) = _linear(names["q"]), _linear(names["k"]), _linear(names["v"])
        attention.append(AttentionGroup(f"layer{i}.attention", h, dh, q, k, v, Slot(names["o"] + ".weight"), qb, kb, vb))
        w_in, b_in = _linear(names["ffn_in"])
        ffn.append(FFNGroup(f"layer{i}.ffn", ffn_width, (w_in,), (b_in,), (Slot(names["ffn_out"] + ".weight"),)))
    return ModelSpec(family, num_layers, d, h, dh, ffn_width, tuple(ffn), tuple(attention))


def _bert_layout(prefix: str, i: int) -> dict[str, str]:
    layer = f"{prefix}encoder.layer.{i}"
    return {
        "q": f"{layer}.attention.self.query",
        "k": f"{layer}.attention.self.key",
        "v": f"{layer}.attention.self.value",
        "o": f"{layer}.attention.output.dense",
        "ffn_in": f"{layer}.intermediate.dense",
        "ffn_out": f"{layer}.output.dense",
    }


def _vit_file_layout(prefix: str, i: int) -> dict[str, str]:
    layer = f"{prefix}encoder.layer.{i}"
    return {
        "q": f"{layer}.attention.attention.query",
        "k": f"{layer}.attention.attention.key",
        "v": f"{layer}.attention.attention.value",
        "o": f"{layer}.attention.output.dense",
        "ffn_in": f"{layer}.intermediate.dense",
        "ffn_out": f"{layer}.output.dense",
    }


def _vit_module_layout(prefix: str, i: int) -> dict[str, str]:
    layer = f"{prefix}layers.{i}"
    return {
        "q": f"{layer}.attention.q_proj",
        "k": f"{layer}.attention.k_proj",
        "v": f"{layer}.attention.v_proj",
        "o": f"{layer}.attention.o_proj",
        "ffn_in": f"{layer}.mlp.fc1",
        "ffn_out": f"{layer}.mlp.fc2",
    }


def bert_spec(config: Any, keys: Collection[str]) -> ModelSpec:
    """BERT / RoBERTa (post-LN, biases everywhere)."""
    return encoder_spec(config, keys, model_type(config), _bert_layout)


def vit_spec(config: Any, keys: Collection[str]) -> ModelSpec:
    """ViT, with either the on-disk names (``encoder.layer.i.attention.attention.query``) or transformers 5.x
    in-memory names (``layers.i.attention.q_proj``)."""
    on_disk = find_prefix(keys, _vit_file_layout("", 0)["q"] + ".weight") is not None
    return encoder_spec(config, keys, "vit", _vit_file_layout if on_disk else _vit_module_layout)


def gpt2_spec(config: Any, keys: Collection[str]) -> ModelSpec:
    """GPT-2: ``Conv1D`` weights stored in×out (hence ``transposed``), Q|K|V fused on the out axis of ``c_attn``."""
    num_layers, d, h, dh = _sizes(config, ("n_layer", "num_hidden_layers"), ("n_embd", "hidden_size"), ("n_head", "num_attention_heads"))
    ffn_width = int(config_value(config, "n_inner", default=4 * d))
    prefix = _require_prefix(keys, "h.0.attn.c_attn.weight", "gpt2")
    ffn, attention = [], []
    for i in range(num_layers):
        block = f"{prefix}h.{i}"
        qkv_w, qkv_b = f"{block}.attn.c_attn.weight", f"{block}.attn.c_attn.bias"
        w = [Slot(qkv_w, transposed=True, rows=(j * d, (j + 1) * d)) for j in range(3)]
        b = [Slot(qkv_b, rows=(j * d, (j + 1) * d)) for j in range(3)]
        o = Slot(f"{block}.attn.c_proj.weight", transposed=True)
        attention.append(AttentionGroup(f"layer{i}.attention", h, dh, w[0], w[1], w[2], o, b[0], b[1], b[2]))
        ffn.append(
            FFNGroup(
                f"layer{i}.ffn",
                ffn_width,
                (Slot(f"{block}.mlp.c_fc.weight", transposed=True),),
                (Slot(f"{block}.mlp.c_fc.bias"),),
                (Slot(f"{block}.mlp.c_proj.weight", transposed=True),),
            )
        )
    return ModelSpec("gpt2", num_layers, d, h, dh, ffn_width, tuple(ffn), tuple(attention))


def llama_spec(config: Any, keys: Collection[str]) -> ModelSpec:
    """LLaMA-shaped decoders (``llama``, ``mistral``, ``qwen2``...): RoPE in HF's ``rotate_half`` layout, GQA/MQA,
    SwiGLU (gate and up projections permuted together), no biases except Qwen2's on Q/K/V."""
    family = model_type(config)
    num_layers = int(config_value(config, "num_hidden_layers"))
    d = int(config_value(config, "hidden_size"))
    h = int(config_value(config, "num_attention_heads"))
    kv = int(config_value(config, "num_key_value_heads", default=h))
    dh = int(config_value(config, "head_dim", default=d // h))
    ffn_width = int(config_value(config, "intermediate_size"))
    if h % kv:
        raise SymmergeError(f"{h} attention heads cannot be grouped over {kv} key/value heads")
    rope_fraction = float(config_value(config, "partial_rotary_factor", default=1.0))
    if rope_fraction != 1.0:
        raise SymmergeError(f"partial rotary embeddings (partial_rotary_factor={rope_fraction}) are not supported yet")
    prefix = _require_prefix(keys, "layers.0.self_attn.q_proj.weight", family)
    ffn, attention = [], []
    for i in range(num_layers):
        layer = f"{prefix}layers.{i}"
        proj = {n: f"{layer}.self_attn.{n}_proj" for n in "qkvo"}
        bias = {n: Slot(f"{proj[n]}.bias") if f"{proj[n]}.bias" in keys else None for n in "qkv"}
        attention.append(AttentionGroup(
            f"layer{i}.attention", h, dh, *(Slot(f"{proj[n]}.weight") for n in "qkvo"), bias["q"], bias["k"], bias["v"],
            num_kv_heads=kv, rope=True,
        ))
        mlp = f"{layer}.mlp"
        ffn.append(FFNGroup(f"layer{i}.ffn", ffn_width, (Slot(f"{mlp}.gate_proj.weight"), Slot(f"{mlp}.up_proj.weight")), (),
                            (Slot(f"{mlp}.down_proj.weight"),)))
    return ModelSpec(family, num_layers, d, h, dh, ffn_width, tuple(ffn), tuple(attention), num_kv_heads=kv)


SPEC_BUILDERS: dict[str, Callable[[Any, Collection[str]], ModelSpec]] = {
    "bert": bert_spec,
    "roberta": bert_spec,
    "vit": vit_spec,
    "gpt2": gpt2_spec,
    "llama": llama_spec,
    "mistral": llama_spec,
    "qwen2": llama_spec,
}


def spec_for(config: Any, keys: Collection[str]) -> ModelSpec:
    """The symmetry spec of a model, from its config and its state dict's keys."""
    kind = model_type(config)
    builder = SPEC_BUILDERS.get(kind)
    if builder is None:
        raise SymmergeError(f"model_type {kind!r} is not supported; supported: {', '.join(sorted(SPEC_BUILDERS))}")
    return builder(config, keys)
