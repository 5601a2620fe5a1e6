"""Per-architecture symmetry specs: the only place that knows tensor names.

Each builder reads sizes from the model's config (nothing hard-coded) and resolves names against the state
dict's keys, so the same spec works on a ``model.safetensors`` file and on a live module's ``state_dict()`` (for
ViT, transformers 5.x renamed the in-memory tensors but still writes the legacy names to disk).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

from symmerge.errors import SymmergeError
from symmerge.spec.base import AttentionGroup, FFNGroup, ModelSpec, Norm, ResidualGroup, Slot, find_prefix


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
    """BERT / RoBERTa (post-LN, biases everywhere). Post-LN normalises the stream itself, so only residual
    *permutations* are symmetries (LayerNorm gains and biases permute along); offered for sequence classifiers,
    whose head reads the stream through ``pooler.dense`` (BERT) or ``classifier.dense`` (RoBERTa)."""
    spec = encoder_spec(config, keys, model_type(config), _bert_layout)
    prefix = _require_prefix(keys, _bert_layout("", 0)["q"] + ".weight", spec.family)
    head = next((h for h in (f"{prefix}pooler.dense.weight", "classifier.dense.weight") if h in keys), None)
    if head is None or "classifier.weight" not in keys and "classifier.out_proj.weight" not in keys:
        return spec
    readers, writers, vectors = [Slot(head)], [], []
    emb = f"{prefix}embeddings"
    embeddings = tuple(Slot(f"{emb}.{n}.weight") for n in ("word_embeddings", "position_embeddings", "token_type_embeddings") if f"{emb}.{n}.weight" in keys)
    vectors += [Slot(f"{emb}.LayerNorm.weight"), Slot(f"{emb}.LayerNorm.bias")]
    for i in range(spec.num_layers):
        names, layer = _bert_layout(prefix, i), f"{prefix}encoder.layer.{i}"
        readers += [Slot(names[n] + ".weight") for n in ("q", "k", "v", "ffn_in")]
        writers += [Slot(names[n] + ".weight") for n in ("o", "ffn_out")]
        vectors += [Slot(names[n] + ".bias") for n in ("o", "ffn_out")]
        vectors += [Slot(f"{layer}.{ln}.LayerNorm.{p}") for ln in ("attention.output", "output") for p in ("weight", "bias")]
    residual = ResidualGroup("permutation", spec.hidden_size, embeddings, tuple(readers), tuple(writers), tuple(vectors), ())
    return replace(spec, residual=residual)


def vit_spec(config: Any, keys: Collection[str]) -> ModelSpec:
    """ViT, with either the on-disk names (``encoder.layer.i.attention.attention.query``) or transformers 5.x
    in-memory names (``layers.i.attention.q_proj``). Pre-LN: the residual stream admits the orthogonal maps that fix
    the all-ones direction once the LayerNorms are folded (needs the classifier head)."""
    on_disk = find_prefix(keys, _vit_file_layout("", 0)["q"] + ".weight") is not None
    layout = _vit_file_layout if on_disk else _vit_module_layout
    spec = encoder_spec(config, keys, "vit", layout)
    prefix = _require_prefix(keys, layout("", 0)["q"] + ".weight", "vit")
    if "classifier.weight" not in keys:
        return spec
    before, after = ("layernorm_before", "layernorm_after")
    root = prefix
    layers = [f"{prefix}encoder.layer.{i}" if on_disk else f"{prefix}layers.{i}" for i in range(spec.num_layers)]
    readers, writers, vectors, norms = [], [], [], []
    for i, layer in enumerate(layers):
        names = layout(prefix, i)
        qkv = [names[n] for n in "qkv"]
        readers += [Slot(f"{n}.weight") for n in qkv] + [Slot(names["ffn_in"] + ".weight")]
        writers += [Slot(names["o"] + ".weight"), Slot(names["ffn_out"] + ".weight")]
        vectors += [Slot(names["o"] + ".bias"), Slot(names["ffn_out"] + ".bias"), Slot(f"{layer}.{before}.bias"), Slot(f"{layer}.{after}.bias")]
        norms.append(Norm(Slot(f"{layer}.{before}.weight"), Slot(f"{layer}.{before}.bias"),
                          tuple(Slot(f"{n}.weight") for n in qkv), tuple(Slot(f"{n}.bias") for n in qkv)))
        norms.append(Norm(Slot(f"{layer}.{after}.weight"), Slot(f"{layer}.{after}.bias"),
                          (Slot(names["ffn_in"] + ".weight"),), (Slot(names["ffn_in"] + ".bias"),)))
    emb = f"{root}embeddings"
    readers.append(Slot("classifier.weight"))
    writers.append(Slot(f"{emb}.patch_embeddings.projection.weight", flatten="trailing"))
    vectors += [Slot(f"{emb}.patch_embeddings.projection.bias"), Slot(f"{root}layernorm.bias")]
    norms.append(Norm(Slot(f"{root}layernorm.weight"), Slot(f"{root}layernorm.bias"), (Slot("classifier.weight"),), (Slot("classifier.bias"),)))
    embeddings = (Slot(f"{emb}.cls_token", flatten="leading"), Slot(f"{emb}.position_embeddings", flatten="leading"))
    residual = ResidualGroup("centered", spec.hidden_size, embeddings, tuple(readers), tuple(writers), tuple(vectors), tuple(norms))
    return replace(spec, residual=residual)


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
    residual = None
    if _has_lm_head(config, keys, prefix, tied_default=True):
        residual = _gpt2_residual(config, prefix, num_layers, d)
    return ModelSpec("gpt2", num_layers, d, h, dh, ffn_width, tuple(ffn), tuple(attention), residual=residual)


def _has_lm_head(config: Any, keys: Collection[str], prefix: str, tied_default: bool) -> bool:
    """A causal-LM checkpoint stores its head, or ties it to the embedding and nests the base model under a prefix
    (``transformer.``, ``model.``); a bare base model (prefix ``""``) has no head, and its output is the stream."""
    tied = bool(config_value(config, "tie_word_embeddings", default=tied_default))
    return "lm_head.weight" in keys or (tied and prefix != "")


def _gpt2_residual(config: Any, prefix: str, num_layers: int, d: int) -> ResidualGroup:
    """Pre-LN GPT-2 with its LM head: centred orthogonal residual maps after folding the LayerNorms."""
    t = lambda key: Slot(key, transposed=True)  # noqa: E731  (Conv1D weights are stored in×out)
    readers, writers, vectors, norms = [], [], [], []
    for i in range(num_layers):
        b = f"{prefix}h.{i}"
        readers += [t(f"{b}.attn.c_attn.weight"), t(f"{b}.mlp.c_fc.weight")]
        writers += [t(f"{b}.attn.c_proj.weight"), t(f"{b}.mlp.c_proj.weight")]
        vectors += [Slot(f"{b}.attn.c_proj.bias"), Slot(f"{b}.mlp.c_proj.bias"), Slot(f"{b}.ln_1.bias"), Slot(f"{b}.ln_2.bias")]
        norms.append(Norm(Slot(f"{b}.ln_1.weight"), Slot(f"{b}.ln_1.bias"), (t(f"{b}.attn.c_attn.weight"),), (Slot(f"{b}.attn.c_attn.bias"),)))
        norms.append(Norm(Slot(f"{b}.ln_2.weight"), Slot(f"{b}.ln_2.bias"), (t(f"{b}.mlp.c_fc.weight"),), (Slot(f"{b}.mlp.c_fc.bias"),)))
    readers.append(Slot("lm_head.weight"))
    vectors.append(Slot(f"{prefix}ln_f.bias"))
    norms.append(Norm(Slot(f"{prefix}ln_f.weight"), Slot(f"{prefix}ln_f.bias"), (Slot("lm_head.weight"),), (None,)))
    tied = ("lm_head.weight", f"{prefix}wte.weight") if config_value(config, "tie_word_embeddings", default=True) else None
    embeddings = (Slot(f"{prefix}wte.weight"), Slot(f"{prefix}wpe.weight"))
    return ResidualGroup("centered", d, embeddings, tuple(readers), tuple(writers), tuple(vectors), tuple(norms), tied)


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
    residual = None
    tied = bool(config_value(config, "tie_word_embeddings", default=False))
    if _has_lm_head(config, keys, prefix, tied_default=False):
        readers, writers, norms = [], [], []
        for i in range(num_layers):
            layer, mlp = f"{prefix}layers.{i}", f"{prefix}layers.{i}.mlp"
            qkv = tuple(Slot(f"{layer}.self_attn.{n}_proj.weight") for n in "qkv")
            gate_up = (Slot(f"{mlp}.gate_proj.weight"), Slot(f"{mlp}.up_proj.weight"))
            readers += [*qkv, *gate_up]
            writers += [Slot(f"{layer}.self_attn.o_proj.weight"), Slot(f"{mlp}.down_proj.weight")]
            norms.append(Norm(Slot(f"{layer}.input_layernorm.weight"), None, qkv, (None,) * 3))
            norms.append(Norm(Slot(f"{layer}.post_attention_layernorm.weight"), None, gate_up, (None,) * 2))
        readers.append(Slot("lm_head.weight"))
        norms.append(Norm(Slot(f"{prefix}norm.weight"), None, (Slot("lm_head.weight"),), (None,)))
        residual = ResidualGroup("orthogonal", d, (Slot(f"{prefix}embed_tokens.weight"),), tuple(readers), tuple(writers), (),
                                 tuple(norms), ("lm_head.weight", f"{prefix}embed_tokens.weight") if tied else None)
    return ModelSpec(family, num_layers, d, h, dh, ffn_width, tuple(ffn), tuple(attention), num_kv_heads=kv, residual=residual)


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
