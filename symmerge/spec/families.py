"""Per-architecture symmetry specs as data: the only place that knows tensor names.

A Hugging Face family whose blocks are standard (Q/K/V/O projections, possibly fused; an FFN with one input
projection, gate+up, or a fused gate|up; pre-LN, post-LN or sandwich norms) is one :class:`FamilyTable` of
tensor-name templates plus flags. :func:`build_spec` turns a table, a config (sizes, never hard-coded) and the
state dict's keys (bias presence, the model's prefix, the head) into a :class:`ModelSpec`, residual group included
where the family allows it. The same table works on a ``model.safetensors`` file and on a live module's
``state_dict()``; ViT has two tables because transformers 5.x renamed its in-memory tensors but still writes the
legacy names to disk.

Quirks stay small and local: GPT-2's ``Conv1D`` (``transposed``) with a fused ``c_attn``; GPT-NeoX's Q|K|V fused
per head (``qkv_per_head``); ViT's two naming schemes; partial-rotary (GPT-NeoX, StableLM, Phi, Phi-3, GPT-J) and
interleaved (GPT-J, Cohere) RoPE heads read their layout from the config (:func:`rope_layout`);
post-LN encoders (BERT, RoBERTa, DeBERTa-v2) offer residual *permutations* only, and only when a head reads the
stream (sequence classifiers); OLMo-2's norms over the whole Q and K
projections are read as Q/K bias slots (``qk_row_norms``); OLMo-1's weightless LayerNorms fold nothing; config
checks that refuse what a table cannot express (:data:`REFUSED`, :func:`_rotary_check`, :func:`_stablelm_check`,
:func:`_deberta_check`, :func:`_opt_check`, :func:`_olmo_check`, :func:`_cohere_check`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from symmerge.errors import SymmergeError, UnsupportedFamily
from symmerge.spec.base import (
    AttentionGroup,
    FFNGroup,
    ModelSpec,
    Norm,
    ResidualGroup,
    Slot,
    find_prefix,
)

DERIVED_BUFFER = re.compile(r"(^|\.)(h\.\d+\.attn\.(bias|masked_bias)|layers\.\d+\.attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")
"""Buffers older transformers versions saved and current ones recompute and drop on load (GPT-2 / GPT-J causal masks
``h.N.attn.bias`` and ``masked_bias``, GPT-NeoX's ``layers.N.attention.bias`` / ``masked_bias``, RoPE's
``rotary_emb.inv_freq``): not weights. A checkpoint is read without them, so an old checkpoint merges with a
fine-tune a current transformers saved (which has none), and no output carries them."""


def is_derived_buffer(key: str) -> bool:
    return DERIVED_BUFFER.search(key) is not None


REFUSED: dict[str, str] = {
    "t5": "T5's relative attention bias is a per-head table that would have to follow head permutations",
    "mt5": "T5's relative attention bias is a per-head table that would have to follow head permutations",
    "umt5": "T5's relative attention bias is a per-head table that would have to follow head permutations",
    "bloom": "ALiBi gives every head its own fixed slope, so heads cannot be permuted",
    "deberta": "DeBERTa (v1) fuses Q|K|V per head in in_proj with separate q_bias/v_bias; only deberta-v2 is supported",
}
"""Families a table cannot express, with the reason (for the README and the error message)."""


@dataclass(frozen=True)
class FamilyTable:
    """One family's tensor names and flags.

    Templates: ``layer`` names a block, formatted with ``prefix`` (the model's root, found from the keys: ``""``,
    ``"bert."``, ``"model."``...) and ``i``; module names (``q``, ``ffn_in``, norms...) are relative to the block;
    ``final_norm``, ``embeddings``, ``embedding_writer``, ``stream_vectors`` are relative to the root; ``head``,
    ``head_needs`` and ``head_modules`` are full keys/modules where ``{prefix}`` may appear.

    Attention: ``q, k, v, o`` modules, or ``qkv`` (one fused module, canonical rows ``q | k | v`` with GQA sizes;
    ``qkv_per_head``: fused per head instead, ``q_h | k_h | v_h`` for each head in turn, GPT-NeoX's ``query_key_value``).
    FFN: ``ffn_in`` modules (gate and up move together), or ``gate_up`` (fused, rows ``gate | up``), and ``ffn_out``.
    Biases are whatever ``<module>.bias`` keys exist. ``transposed``: Conv1D storage (in×out).

    Norms: ``norm`` ``"layernorm"`` (weight and bias) or ``"rmsnorm"`` (weight), gain ``norm_offset + weight``
    (Gemma: 1). ``placement``: ``"pre"`` (``attn_norm`` → attention, ``ffn_norm`` → FFN, ``final_norm`` → head);
    ``"post"`` (BERT: ``attn_norm``/``ffn_norm`` normalise the stream after each residual add); ``"sandwich"``
    (Gemma-2: pre norms plus ``attn_out_norm``/``ffn_out_norm`` on what attention and FFN write).
    ``head_norms``: per-head norms inside attention (Qwen3's ``q_norm``/``k_norm``), touched by no group.
    ``qk_row_norms``: norms over the whole Q and K projections (OLMo-2's ``q_norm``/``k_norm``, one gain per row of
    Q and of K): with ``qk_fixed`` their gains only follow head permutations, like the Q/K biases they stand in for
    (the projections have none). ``norm`` ``"nonparametric"``: LayerNorm without weight or bias (OLMo-1): nothing
    to fold, the residual map is centered.
    ``qk_fixed``: no QK map is a symmetry (``qk_fixed_reason`` says why, for ``symmerge inspect``); ``qk_norm_flag``:
    a config key that, when true, makes it so (Phi's ``qk_layernorm``: one LayerNorm over each head's q and k).
    RoPE layout (:func:`rope_layout`): ``rotary_fraction`` is the family's default ``partial_rotary_factor`` (GPT-NeoX's
    ``rotary_pct``) when the config has none (0: the whole head is rotated); ``rotary_dim_key`` names a config key
    holding the rotated dimensions themselves (GPT-J's ``rotary_dim``); ``rope_interleaved``: planes ``(2i, 2i+1)``.
    ``ffn_norm`` empty: the FFN reads the attention's norm (Phi's parallel block: one ``input_layernorm``);
    ``shared_norm_flag``: a config key that, when true, makes it so (StableLM's ``use_parallel_residual``).

    Residual stream: ``embeddings`` (stream on the last axis; missing ones skipped), ``embedding_writer`` (ViT's
    patch projection), ``stream_vectors`` (post-LN embedding norms). The head: ``lm_head`` (decoders: offered when
    the checkpoint has its LM head, see :func:`_has_lm_head`; ``lm_head_keys``: its names, in-memory first: GPT-NeoX
    saves ``embed_out.weight``), else the first present of ``head`` when one of
    ``head_needs`` is present too (a pooler feeding a classifier).

    ``check(config, keys)``: raises for a config the table cannot express (partial rotary, DeBERTa's unshared
    positional projections) and returns why the residual class is refused ("" when it is not).
    """

    layers: tuple[str, ...]
    hidden: tuple[str, ...]
    heads: tuple[str, ...]
    ffn_width: tuple[str, ...]
    layer: str
    o: str
    ffn_out: str
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""
    qkv_per_head: bool = False
    ffn_in: tuple[str, ...] = ()
    gate_up: str = ""
    kv_heads: tuple[str, ...] = ()
    head_dim: tuple[str, ...] = ()
    ffn_default: int = 0
    transposed: bool = False
    rope: bool = False
    rotary_fraction: float = 0.0
    rotary_dim_key: str = ""
    rope_interleaved: bool = False
    qk_fixed: bool = False
    qk_fixed_reason: str = ""
    qk_norm_flag: str = ""
    norm: str = "layernorm"
    norm_offset: float = 0.0
    placement: str = "pre"
    attn_norm: str = ""
    ffn_norm: str = ""
    attn_out_norm: str = ""
    ffn_out_norm: str = ""
    shared_norm_flag: str = ""
    final_norm: str = ""
    head_norms: tuple[str, ...] = ()
    qk_row_norms: tuple[str, str] = ("", "")
    embeddings: tuple[str, ...] = ()
    embedding_flatten: str | None = None
    embedding_writer: str = ""
    stream_vectors: tuple[str, ...] = ()
    lm_head: bool = False
    lm_head_keys: tuple[str, ...] = ("lm_head.weight",)
    tie_default: bool = False
    head: tuple[str, ...] = ()
    head_needs: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()
    check: Callable[[Any, Collection[str]], str] | None = None

    def anchor(self) -> str:
        """The key suffix that locates the model's root: block 0's first attention projection weight."""
        return f"{self.layer.format(prefix='', i=0)}.{self.qkv or self.q}.weight"


# ---------------------------------------------------------------------------------------------------- config


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
    """The config's ``model_type`` (the registry key)."""
    return str(config_value(config, "model_type"))


@dataclass(frozen=True)
class Sizes:
    """Sizes read from a config: ``heads`` query heads of ``head_dim`` over ``kv_heads`` key/value heads."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_width: int


def _head_sizes(table: FamilyTable, config: Any) -> tuple[int, int, Any, int]:
    """(hidden, heads, stated head_dim or 0, KV heads), or a one-line error where they do not fit together."""
    d, h = int(config_value(config, *table.hidden)), int(config_value(config, *table.heads))
    dh = config_value(config, *table.head_dim, default=0) if table.head_dim else 0
    if not dh and d % h:
        raise SymmergeError(f"hidden size {d} is not divisible by {h} heads")
    kv = int(config_value(config, *table.kv_heads, default=h)) if table.kv_heads else h
    if h % kv:
        raise SymmergeError(f"{h} attention heads cannot be grouped over {kv} key/value heads")
    return d, h, dh, kv


def check_head_sizes(config: Mapping[str, Any]) -> None:
    """A supported family's head counts fit together (see :func:`_head_sizes`), checked when a checkpoint is opened
    so that the error can name its config: found later, when a spec is built, it named no model."""
    tables = TABLES.get(config.get("model_type"))
    if tables:
        _head_sizes(tables[0], config)


def read_sizes(table: FamilyTable, config: Any) -> Sizes:
    """Sizes from the config keys the table names. ``head_dim`` defaults to ``hidden / heads`` (which must divide),
    ``kv_heads`` to ``heads`` (which it must divide), the FFN width to ``ffn_default · hidden``."""
    d, h, dh, kv = _head_sizes(table, config)
    ffn = int(config_value(config, *table.ffn_width, default=table.ffn_default * d or None))
    return Sizes(int(config_value(config, *table.layers)), d, h, kv, int(dh) or d // h, ffn)


def _rotary_check(config: Any, keys: Collection[str]) -> str:
    """LLaMA-style attention in transformers (llama, mistral, qwen2, gemma, granite, olmo, ...) has no partial rotary:
    its default RoPE rotates every dimension of a head whatever ``partial_rotary_factor`` says, and a scaled
    ``rope_type`` builds a shorter ``cos`` that does not broadcast against the head. Which layout such a checkpoint
    means (the whole head, as transformers runs it, or the leading dimensions, as the key says) is unknown, and the
    QK group differs between them, so it is refused. Phi-3 does implement it (its table reads the factor)."""
    fraction = partial_rotary_factor(config, 1.0)
    if fraction != 1.0:
        raise UnsupportedFamily(f"{model_type(config)} with partial_rotary_factor={fraction:g} is not supported: transformers' "
                            f"{model_type(config)} attention rotates every dimension of a head whatever the factor says, so "
                            "which dimensions this checkpoint rotates (and so which QK maps are symmetries) is unknown")
    return ""


def partial_rotary_factor(config: Any, default: float) -> float:
    """The fraction of each head RoPE rotates: ``partial_rotary_factor`` (top level, or in ``rope_parameters`` /
    ``rope_scaling`` as transformers 5 stores it), GPT-NeoX's older ``rotary_pct``, else the family's ``default``
    (what its transformers config assumes when the key is missing: GPT-NeoX and StableLM 0.25, Phi 0.5)."""
    fraction = config_value(config, "partial_rotary_factor", default=0.0)
    for name in ("rope_parameters", "rope_scaling"):
        extra = config_value(config, name, default={})
        if not fraction and isinstance(extra, Mapping):
            fraction = extra.get("partial_rotary_factor") or 0.0
    return float(fraction or config_value(config, "rotary_pct", default=0.0) or default)


def rope_layout(table: FamilyTable, config: Any, head_dim: int) -> tuple[bool, int]:
    """``(rope, rotary_dim)`` of a family's heads (``rotary_dim`` 0: the whole head), as transformers computes them.

    GPT-NeoX, StableLM, Phi and Phi-3 rotate ``int(head_dim · partial_rotary_factor)`` leading dimensions, rounded
    up to even: their inverse frequencies are ``arange(0, dim, 2)``, and GPT-NeoX and Phi-3 slice as many dimensions
    as ``cos`` has (``2·ceil(dim/2)``; StableLM and Phi need ``dim`` even to run at all). GPT-J rotates its config's
    ``rotary_dim`` leading dimensions (``None``: all). No rotated dimension at all is no RoPE."""
    if not table.rope:
        return False, 0
    if table.rotary_dim_key:
        rotated = int(config_value(config, table.rotary_dim_key, default=0) or head_dim)
    elif table.rotary_fraction:
        dim = int(head_dim * partial_rotary_factor(config, table.rotary_fraction))
        rotated = 2 * ((dim + 1) // 2)
    else:
        rotated = head_dim
    if rotated <= 0:
        return False, 0
    return True, 0 if rotated >= head_dim else rotated


def _deberta_check(config: Any, keys: Collection[str]) -> str:
    """DeBERTa-v2's disentangled attention adds ``q·(W_K r + b_K)`` (c2p) and ``k·(W_Q r + b_Q)`` (p2c) for relative
    position embeddings ``r``: with ``share_att_key`` they go through the same Q/K projections, so a per-head QK
    rotation and rescaling (and head permutations) still cancel. Returns why the residual class is not offered."""
    relative = bool(config_value(config, "relative_attention", default=False))
    pos_types = config_value(config, "pos_att_type", default=()) or ()
    if isinstance(pos_types, str):
        pos_types = [t.strip() for t in pos_types.lower().split("|")]
    if relative and pos_types and not config_value(config, "share_att_key", default=False):
        raise UnsupportedFamily("deberta-v2 with share_att_key=False is not supported: its separate positional projections "
                            "(pos_key_proj, pos_query_proj) would have to move with the per-head QK transforms")
    if int(config_value(config, "conv_kernel_size", default=0)) > 0:
        return "DeBERTa-v2's ConvLayer (conv_kernel_size > 0) reads and writes the stream through a convolution symmerge does not permute"
    embedding_size = config_value(config, "embedding_size", default=0)
    if embedding_size and int(embedding_size) != int(config_value(config, "hidden_size")):
        return "the embeddings are narrower than the stream (embed_proj), which symmerge does not map"
    return ""


def _stablelm_check(config: Any, keys: Collection[str]) -> str:
    """StableLM's optional per-head q/k LayerNorms have their own weights for every head (``StableLmLayerNormPerHead``):
    a head permutation would have to permute those norms too, which no group does."""
    if config_value(config, "qk_layernorm", default=False):
        raise UnsupportedFamily("stablelm with qk_layernorm=True is not supported: its q/k LayerNorms hold separate weights per "
                            "head, which a head permutation would have to move with the heads")
    return ""


def _opt_check(config: Any, keys: Collection[str]) -> str:
    """OPT's pre-LN configs (``do_layer_norm_before``, every size but 350m) are GPT-2-like: the residual class is
    offered. opt-350m is post-LN and projects a narrower word embedding in and out of the stream (``project_in`` /
    ``project_out``), which no table expresses: heads, QK, VO and FFN still move, the residual class is refused."""
    hidden = int(config_value(config, "hidden_size"))
    if not config_value(config, "do_layer_norm_before", default=True):
        return "post-LN OPT (do_layer_norm_before=False, opt-350m) is not mapped by symmerge's residual class"
    if int(config_value(config, "word_embed_proj_dim", default=hidden)) != hidden:
        return "the word embeddings are narrower than the stream (project_in / project_out), which symmerge does not map"
    if config_value(config, "_remove_final_layer_norm", default=False):
        return "OPT without its final LayerNorm (_remove_final_layer_norm) is not mapped by symmerge's residual class"
    if not config_value(config, "layer_norm_elementwise_affine", default=True):
        return "OPT LayerNorms without weights (layer_norm_elementwise_affine=False) are not mapped by symmerge's residual class"
    return ""


def _olmo_check(config: Any, keys: Collection[str]) -> str:
    """OLMo's ``clip_qkv`` clamps every entry of Q, K and V: an elementwise clamp commutes with no per-head rotation
    or rescaling."""
    if config_value(config, "clip_qkv", default=0):
        raise UnsupportedFamily("olmo with clip_qkv is not supported: clamping every entry of Q, K and V does not commute with "
                            "QK/VO rotations and rescalings")
    return _rotary_check(config, keys)


def _cohere_check(config: Any, keys: Collection[str]) -> str:
    """Cohere's optional q/k LayerNorms (``use_qk_norm``) hold separate weights for every head; like LLaMA's, its
    attention has no partial rotary (:func:`_rotary_check`)."""
    if config_value(config, "use_qk_norm", default=False):
        raise UnsupportedFamily("cohere with use_qk_norm=True is not supported: its q/k LayerNorms hold separate weights per head, "
                            "which a head permutation would have to move with the heads")
    return _rotary_check(config, keys)


QK_ROW_NORMS = "q_norm / k_norm over the whole projection: QK maps are left alone (their gains follow head permutations)"
"""Why OLMo-2 fixes QK: an RMSNorm over all of Q (and of K) with one gain per row; the norm is invariant under head
permutations (the gains permute along) but a QK rotation or rescaling within a head changes it."""

# ---------------------------------------------------------------------------------------------------- tables

_DECODER_SIZES = {"layers": ("num_hidden_layers",), "hidden": ("hidden_size",), "heads": ("num_attention_heads",),
                  "ffn_width": ("intermediate_size",), "kv_heads": ("num_key_value_heads",), "head_dim": ("head_dim",)}
_LLAMA = {**_DECODER_SIZES, "layer": "{prefix}layers.{i}", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.o_proj", "ffn_in": ("mlp.gate_proj", "mlp.up_proj"), "ffn_out": "mlp.down_proj", "rope": True,
          "check": _rotary_check, "norm": "rmsnorm", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "final_norm": "norm", "embeddings": ("embed_tokens.weight",), "lm_head": True, "head_modules": ("lm_head.", "score.")}
_ENCODER_SIZES = {"layers": ("num_hidden_layers",), "hidden": ("hidden_size",), "heads": ("num_attention_heads",),
                  "ffn_width": ("intermediate_size",)}
_BERT_BLOCK = {"layer": "{prefix}encoder.layer.{i}", "o": "attention.output.dense", "ffn_in": ("intermediate.dense",),
               "ffn_out": "output.dense", "placement": "post", "attn_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm",
               "head_modules": ("{prefix}pooler.", "pooler.", "classifier.", "cls.", "lm_head.", "lm_predictions.")}
_BERT = {**_ENCODER_SIZES, **_BERT_BLOCK, "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "embeddings": tuple(f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")),
         "stream_vectors": ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"),
         "head": ("{prefix}pooler.dense.weight", "classifier.dense.weight"), "head_needs": ("classifier.weight", "classifier.out_proj.weight")}
_VIT = {**_ENCODER_SIZES, "final_norm": "layernorm", "embeddings": ("embeddings.cls_token", "embeddings.position_embeddings"),
        "embedding_flatten": "leading", "embedding_writer": "embeddings.patch_embeddings.projection", "head": ("classifier.weight",),
        "head_modules": ("classifier.", "{prefix}pooler."), "attn_norm": "layernorm_before", "ffn_norm": "layernorm_after"}

TABLES: dict[str, tuple[FamilyTable, ...]] = {
    "bert": (FamilyTable(**_BERT),),
    "roberta": (FamilyTable(**_BERT),),
    "vit": (  # on-disk names first, then transformers 5.x in-memory names
        FamilyTable(**_VIT, layer="{prefix}encoder.layer.{i}", q="attention.attention.query", k="attention.attention.key",
                    v="attention.attention.value", o="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense"),
        FamilyTable(**_VIT, layer="{prefix}layers.{i}", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                    o="attention.o_proj", ffn_in=("mlp.fc1",), ffn_out="mlp.fc2"),
    ),
    "gpt2": (FamilyTable(layers=("n_layer", "num_hidden_layers"), hidden=("n_embd", "hidden_size"), heads=("n_head", "num_attention_heads"),
                         ffn_width=("n_inner",), ffn_default=4, layer="{prefix}h.{i}", qkv="attn.c_attn", o="attn.c_proj",
                         ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj", transposed=True, attn_norm="ln_1", ffn_norm="ln_2", final_norm="ln_f",
                         embeddings=("wte.weight", "wpe.weight"), lm_head=True, tie_default=True, head_modules=("lm_head.", "score.")),),
    "llama": (FamilyTable(**_LLAMA),),
    "mistral": (FamilyTable(**_LLAMA),),
    "qwen2": (FamilyTable(**_LLAMA),),
    "qwen3": (FamilyTable(**_LLAMA, qk_fixed=True, head_norms=("self_attn.q_norm", "self_attn.k_norm")),),
    # Phi-3 rotates int(d_h · partial_rotary_factor) leading dimensions (default 1: all), rotate_half planes
    "phi3": (FamilyTable(**{**_LLAMA, "q": "", "k": "", "v": "", "ffn_in": (), "check": None}, qkv="self_attn.qkv_proj",
                         gate_up="mlp.gate_up_proj", rotary_fraction=1.0),),
    "gemma": (FamilyTable(**_LLAMA, norm_offset=1.0, tie_default=True),),
    "gemma2": (FamilyTable(**{**_LLAMA, "ffn_norm": "pre_feedforward_layernorm"}, norm_offset=1.0, tie_default=True, placement="sandwich",
                           attn_out_norm="post_attention_layernorm", ffn_out_norm="post_feedforward_layernorm"),),
    # Pythia: Q|K|V fused per head, parallel (or sequential) residual with two LayerNorms, untied embed_out
    "gpt_neox": (FamilyTable(**{**_DECODER_SIZES, "kv_heads": ()}, layer="{prefix}layers.{i}", qkv="attention.query_key_value", qkv_per_head=True,
                             o="attention.dense", ffn_in=("mlp.dense_h_to_4h",), ffn_out="mlp.dense_4h_to_h", rope=True, rotary_fraction=0.25,
                             attn_norm="input_layernorm", ffn_norm="post_attention_layernorm",
                             final_norm="final_layer_norm", embeddings=("embed_in.weight",), lm_head=True,
                             lm_head_keys=("lm_head.weight", "embed_out.weight"), head_modules=("lm_head.", "embed_out.", "score.")),),
    "stablelm": (FamilyTable(**{**_LLAMA, "check": _stablelm_check, "norm": "layernorm"}, rotary_fraction=0.25,
                             shared_norm_flag="use_parallel_residual"),),
    # one input_layernorm read by attention and MLP (parallel block); optional qk_layernorm is one LayerNorm shared by all heads
    "phi": (FamilyTable(**{**_LLAMA, "o": "self_attn.dense", "ffn_in": ("mlp.fc1",), "ffn_out": "mlp.fc2", "ffn_norm": "",
                           "final_norm": "final_layernorm", "check": None, "norm": "layernorm"}, rotary_fraction=0.5,
                        qk_norm_flag="qk_layernorm", head_norms=("self_attn.q_layernorm", "self_attn.k_layernorm")),),
    # pre-LN (do_layer_norm_before): learned positions (embed_positions, 2 offset rows) are stream vectors like GPT-2's wpe
    "opt": (FamilyTable(**{**_DECODER_SIZES, "kv_heads": (), "head_dim": (), "ffn_width": ("ffn_dim",)}, layer="{prefix}layers.{i}",
                        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", ffn_in=("fc1",),
                        ffn_out="fc2", attn_norm="self_attn_layer_norm", ffn_norm="final_layer_norm", final_norm="final_layer_norm",
                        embeddings=("embed_tokens.weight", "embed_positions.weight"), lm_head=True, tie_default=True,
                        head_modules=("lm_head.", "score."), check=_opt_check),),
    # llama names; attention_multiplier, residual_multiplier, embedding_multiplier, logits_scaling are scalars
    "granite": (FamilyTable(**_LLAMA),),
    # non-parametric LayerNorms: nothing to fold, the residual map is centered
    "olmo": (FamilyTable(**{**_LLAMA, "check": _olmo_check, "norm": "nonparametric"}),),
    # no pre-norms: RMSNorms on what attention and FFN write (permutations only), q_norm/k_norm over whole projections
    "olmo2": (FamilyTable(**{**_LLAMA, "attn_norm": "", "ffn_norm": ""}, placement="sandwich", attn_out_norm="post_attention_layernorm",
                          ffn_out_norm="post_feedforward_layernorm", qk_fixed=True, qk_fixed_reason=QK_ROW_NORMS,
                          qk_row_norms=("self_attn.q_norm", "self_attn.k_norm")),),
    # one ln_1 read by attention and MLP (parallel block), partial interleaved rotary, untied LM head with a bias
    "gptj": (FamilyTable(layers=("n_layer",), hidden=("n_embd",), heads=("n_head",), ffn_width=("n_inner",), ffn_default=4, layer="{prefix}h.{i}",
                         q="attn.q_proj", k="attn.k_proj", v="attn.v_proj", o="attn.out_proj", ffn_in=("mlp.fc_in",), ffn_out="mlp.fc_out",
                         rope=True, rotary_dim_key="rotary_dim", rope_interleaved=True, attn_norm="ln_1", final_norm="ln_f",
                         embeddings=("wte.weight",), lm_head=True, head_modules=("lm_head.", "score.")),),
    # LayerNorm without bias, one input_layernorm read by attention and MLP, interleaved RoPE, logit_scale (a scalar)
    "cohere": (FamilyTable(**{**_LLAMA, "ffn_norm": "", "norm": "layernorm", "check": _cohere_check}, rope_interleaved=True,
                           tie_default=True),),
    "deberta-v2": (FamilyTable(**{**_ENCODER_SIZES, **_BERT_BLOCK}, head_dim=("attention_head_size",), q="attention.self.query_proj",
                               k="attention.self.key_proj", v="attention.self.value_proj", check=_deberta_check,
                               embeddings=(*_BERT["embeddings"], "encoder.rel_embeddings.weight"),
                               stream_vectors=(*_BERT["stream_vectors"], "encoder.LayerNorm.weight", "encoder.LayerNorm.bias"),
                               head=("pooler.dense.weight",), head_needs=("classifier.weight",)),),
}
"""model_type → its tables (alternative naming schemes, tried in order)."""


# ---------------------------------------------------------------------------------------------------- builder


def _weight(table: FamilyTable, module: str, rows: tuple[int, int] | None = None, period: int = 0) -> Slot:
    """A projection's canonical out×in weight (transposed back from Conv1D storage; ``rows`` of a fused one, in each
    chunk of ``period`` rows for one fused per head)."""
    return Slot(f"{module}.weight", transposed=table.transposed, rows=rows, period=period)


def _bias(keys: Collection[str], module: str, rows: tuple[int, int] | None = None, period: int = 0) -> Slot | None:
    """A projection's bias, if the checkpoint has one (missing biases act as zero)."""
    return Slot(f"{module}.bias", rows=rows, period=period) if f"{module}.bias" in keys else None


def _fused_rows(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive row blocks of the given sizes: ``[q | k | v]`` or ``[gate | up]``."""
    return list(itertools.pairwise(itertools.accumulate(sizes, initial=0)))


def _attention(table: FamilyTable, block: str, i: int, s: Sizes, keys: Collection[str], config: Any) -> AttentionGroup:
    """Layer ``i``'s heads: Q (H·d_h rows), K and V (H_kv·d_h rows each), O (H·d_h columns); fused ``qkv`` is
    split on its out axis as ``q | k | v``, or per head as ``q_h | k_h | v_h`` (``qkv_per_head``: each of Q, K, V is
    the same block of every head's ``3·d_h`` rows)."""
    if table.qkv_per_head:
        if s.kv_heads != s.heads:
            raise SymmergeError(f"internal: a per-head fused qkv with {s.kv_heads} key/value heads for {s.heads} heads")
        fused, period = f"{block}.{table.qkv}", 3 * s.head_dim
        rows = _fused_rows((s.head_dim,) * 3)
        weights = [_weight(table, fused, r, period) for r in rows]
        biases = [_bias(keys, fused, r, period) for r in rows]
    elif table.qkv:
        fused = f"{block}.{table.qkv}"
        rows = _fused_rows((s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim))
        weights = [_weight(table, fused, r) for r in rows]
        biases = [_bias(keys, fused, r) for r in rows]
    else:
        modules = [f"{block}.{m}" for m in (table.q, table.k, table.v)]
        weights, biases = [_weight(table, m) for m in modules], [_bias(keys, m) for m in modules]
        if table.qk_row_norms[0]:  # a gain per Q/K row after the (bias-free) projection: it moves with the heads
            if not table.qk_fixed or biases[0] or biases[1]:
                raise SymmergeError("internal: row norms on Q/K need qk_fixed and projections without biases")
            biases[:2] = [Slot(f"{block}.{m}.weight") for m in table.qk_row_norms]
    rope, rotary_dim = rope_layout(table, config, s.head_dim)
    return AttentionGroup(f"layer{i}.attention", s.heads, s.head_dim, *weights, _weight(table, f"{block}.{table.o}"), *biases,
                          num_kv_heads=s.kv_heads if table.kv_heads else 0, rope=rope, qk_fixed=_qk_fixed(table, config),
                          row_norms=bool(table.qk_row_norms[0]), rotary_dim=rotary_dim, rope_interleaved=rope and table.rope_interleaved)


def _qk_fixed(table: FamilyTable, config: Any) -> bool:
    """Whether no QK map is a symmetry: the table says so, or its ``qk_norm_flag`` is set in the config."""
    return table.qk_fixed or bool(table.qk_norm_flag and config_value(config, table.qk_norm_flag, default=False))


def _ffn(table: FamilyTable, block: str, i: int, s: Sizes, keys: Collection[str]) -> FFNGroup:
    """Layer ``i``'s neurons: rows of every input projection (gate and up together; both halves of a fused
    ``gate_up``) and their biases, columns of the output projection."""
    if table.gate_up:
        fused = f"{block}.{table.gate_up}"
        rows = _fused_rows((s.ffn_width, s.ffn_width))
        inputs, biases = [_weight(table, fused, r) for r in rows], [_bias(keys, fused, r) for r in rows]
    else:
        modules = [f"{block}.{m}" for m in table.ffn_in]
        inputs, biases = [_weight(table, m) for m in modules], [_bias(keys, m) for m in modules]
    return FFNGroup(f"layer{i}.ffn", s.ffn_width, tuple(inputs), tuple(b for b in biases if b), (_weight(table, f"{block}.{table.ffn_out}"),))


def _readers(table: FamilyTable, block: str, keys: Collection[str], part: str) -> tuple[list[Slot], list[Slot | None]]:
    """The whole projections that read the stream in a block's attention or FFN (a fused one as one matrix), and
    their biases (None where absent)."""
    if part == "attention":
        modules = [table.qkv] if table.qkv else [table.q, table.k, table.v]
    else:
        modules = [table.gate_up] if table.gate_up else list(table.ffn_in)
    full = [f"{block}.{m}" for m in modules]
    return [_weight(table, m) for m in full], [_bias(keys, m) for m in full]


def _norm(table: FamilyTable, module: str, keys: Collection[str], readers: list[Slot], reader_biases: list[Slot | None]) -> Norm:
    """A pre-norm and the projections that read it (its gain ``norm_offset + weight`` is folded into them; the
    readers' biases only absorb a LayerNorm's bias ``W β``, so an RMSNorm lists none)."""
    if table.norm != "layernorm":
        return Norm(Slot(f"{module}.weight"), None, tuple(readers), (None,) * len(readers), table.norm_offset)
    bias = Slot(f"{module}.bias") if f"{module}.bias" in keys else None  # Cohere's LayerNorm has no bias
    return Norm(Slot(f"{module}.weight"), bias, tuple(readers), tuple(reader_biases), table.norm_offset)


def _head(table: FamilyTable, config: Any, keys: Collection[str], prefix: str) -> str | None:
    """The key of the head weight that reads the stream, or None when there is none (a bare encoder or decoder:
    its output is the stream itself, so no residual map is a symmetry)."""
    if table.lm_head:
        return _lm_head_key(table, keys) if _has_lm_head(table, config, keys, prefix) else None
    head = next((h for c in table.head if (h := c.format(prefix=prefix)) in keys), None)
    if head is None or table.head_needs and not any(n in keys for n in table.head_needs):
        return None
    return head


def _lm_head_key(table: FamilyTable, keys: Collection[str]) -> str:
    """The LM head's key: the first of the table's names the checkpoint has (the first one for a tied head it
    does not store)."""
    return next((k for k in table.lm_head_keys if k in keys), table.lm_head_keys[0])


def _has_lm_head(table: FamilyTable, config: Any, keys: Collection[str], prefix: str) -> bool:
    """A causal-LM checkpoint stores its head, or ties it to the embedding and nests the base model under a prefix
    (``transformer.``, ``model.``); a bare base model (prefix ``""``) has no head, and its output is the stream."""
    tied = bool(config_value(config, "tie_word_embeddings", default=table.tie_default))
    return any(k in keys for k in table.lm_head_keys) or (tied and prefix != "")


def _tied(table: FamilyTable, config: Any, keys: Collection[str], prefix: str) -> tuple[str, str] | None:
    """(head, embedding) when the config ties the LM head to the token embedding."""
    if table.lm_head and config_value(config, "tie_word_embeddings", default=table.tie_default):
        return _lm_head_key(table, keys), f"{prefix}{table.embeddings[0]}"
    return None


def _shared_norm(table: FamilyTable, config: Any) -> bool:
    """Whether the FFN reads the attention's norm (a parallel block with one pre-norm: Phi; StableLM with
    ``use_parallel_residual``) instead of a norm of its own."""
    return not table.ffn_norm or bool(table.shared_norm_flag and config_value(config, table.shared_norm_flag, default=False))


def _embeddings(table: FamilyTable, prefix: str, keys: Collection[str]) -> tuple[Slot, ...]:
    """Tensors with the stream on their last axis (``E → E Q``): token, position, CLS, relative-position tables."""
    names = [f"{prefix}{e}" for e in table.embeddings]
    return tuple(Slot(n, flatten=table.embedding_flatten) for n in names if n in keys)


def _pre_norm_residual(table: FamilyTable, config: Any, keys: Collection[str], prefix: str, blocks: list[str], head: str) -> ResidualGroup:
    """Pre-norm stream (GPT-2, ViT, LLaMA...): after folding every norm into its readers, RMSNorm commutes with any
    orthogonal ``Q`` and LayerNorm with those fixing the all-ones direction (``"centered"``). Sequential and
    parallel blocks (GPT-NeoX's ``use_parallel_residual``) alike: each norm reads the stream and is folded into its
    readers; a shared pre-norm (Phi) is one norm whose readers are attention's and the FFN's."""
    readers, writers, vectors, norms = [], [], [], []
    shared = _shared_norm(table, config)
    for block in blocks:
        attn_in, attn_bias = _readers(table, block, keys, "attention")
        ffn_in, ffn_bias = _readers(table, block, keys, "ffn")
        readers += attn_in + ffn_in
        writers += [_weight(table, f"{block}.{table.o}"), _weight(table, f"{block}.{table.ffn_out}")]
        block_norms = (table.attn_norm,) if shared else (table.attn_norm, table.ffn_norm)
        vectors += [b for b in (_bias(keys, f"{block}.{m}") for m in (table.o, table.ffn_out, *block_norms)) if b]
        if table.norm == "nonparametric":
            pass  # OLMo-1: nothing to fold
        elif shared:
            norms.append(_norm(table, f"{block}.{table.attn_norm}", keys, attn_in + ffn_in, attn_bias + ffn_bias))
        else:
            norms += [_norm(table, f"{block}.{table.attn_norm}", keys, attn_in, attn_bias),
                      _norm(table, f"{block}.{table.ffn_norm}", keys, ffn_in, ffn_bias)]
    readers.append(Slot(head))
    if table.embedding_writer:
        writers.append(Slot(f"{prefix}{table.embedding_writer}.weight", flatten="trailing"))
    final = f"{prefix}{table.final_norm}"
    vectors += [b for b in (_bias(keys, f"{prefix}{table.embedding_writer}"), _bias(keys, final)) if b]
    if table.norm != "nonparametric":
        norms.append(_norm(table, final, keys, [Slot(head)], [_bias(keys, head.removesuffix(".weight"))]))
    kind = "orthogonal" if table.norm == "rmsnorm" else "centered"
    return ResidualGroup(kind, int(config_value(config, *table.hidden)), _embeddings(table, prefix, keys), tuple(readers), tuple(writers),
                         tuple(vectors), tuple(norms), _tied(table, config, keys, prefix))


def _permutation_residual(table: FamilyTable, config: Any, keys: Collection[str], prefix: str, blocks: list[str], head: str) -> ResidualGroup:
    """Post-LN (BERT) or sandwich-norm (Gemma-2) stream: a norm normalises what is written into the stream (or the
    stream itself), so its gain acts on the written side where no linear layer can absorb it; ``Q`` must commute
    with an elementwise gain, which leaves the permutations (norm gains and biases permute along, no folding)."""
    readers, writers, vectors = [Slot(head)], [], [f"{prefix}{v}" for v in table.stream_vectors if f"{prefix}{v}" in keys]
    for block in blocks:
        readers += _readers(table, block, keys, "attention")[0] + _readers(table, block, keys, "ffn")[0]
        writers += [_weight(table, f"{block}.{table.o}"), _weight(table, f"{block}.{table.ffn_out}")]
        norms = [m for m in (table.attn_norm, table.ffn_norm, table.attn_out_norm, table.ffn_out_norm) if m]
        vectors += [f"{block}.{table.o}.bias", f"{block}.{table.ffn_out}.bias"] + [f"{block}.{m}.{p}" for m in norms for p in ("weight", "bias")]
    if table.final_norm:
        vectors += [f"{prefix}{table.final_norm}.{p}" for p in ("weight", "bias")]
    present = tuple(Slot(v) for v in vectors if v in keys)
    return ResidualGroup("permutation", int(config_value(config, *table.hidden)), _embeddings(table, prefix, keys), tuple(readers),
                         tuple(writers), present, (), _tied(table, config, keys, prefix))


def _roles(table: FamilyTable, prefix: str, blocks: list[str]) -> tuple[tuple[str, str], ...]:
    """(pattern, tensor group) rules for the tensors no symmetry group names (norms, the O and FFN-output biases,
    embeddings, heads): a pattern ending in ``.`` is a module (every key under it), otherwise an exact key. Norms
    first (an embedding LayerNorm is a norm)."""
    layer_norms = (table.attn_norm, table.ffn_norm, table.attn_out_norm, table.ffn_out_norm, *table.head_norms)
    norms = [f"{b}.{m}." for b in blocks for m in layer_norms if m] + [f"{prefix}{v.rsplit('.', 1)[0]}." for v in table.stream_vectors]
    if table.final_norm:
        norms.append(f"{prefix}{table.final_norm}.")
    embeddings = [f"{prefix}{e}" for e in table.embeddings] + ([f"{prefix}{table.embedding_writer}."] if table.embedding_writer else [])
    heads = [h.format(prefix=prefix) for h in table.head_modules]
    writers = [(f"{b}.{table.o}.", "attention") for b in blocks] + [(f"{b}.{table.ffn_out}.", "ffn") for b in blocks]  # O / FFN-out biases
    return (*((n, "norms") for n in norms), *writers, *((e, "embeddings") for e in embeddings), *((h, "head") for h in heads))


def build_spec(table: FamilyTable, family: str, config: Any, keys: Collection[str]) -> ModelSpec:
    """The spec of one model from its family's table, its config (sizes) and its state dict's keys (prefix,
    biases, head): one FFN and one attention group per block, and the residual group when a head reads the stream."""
    no_residual = table.check(config, keys) if table.check else ""
    prefix = find_prefix(keys, table.anchor())
    if prefix is None:
        raise SymmergeError(f"no tensor named like '*{table.anchor()}' in the checkpoint: is this really a {family} model?")
    s = read_sizes(table, config)
    blocks = [table.layer.format(prefix=prefix, i=i) for i in range(s.layers)]
    attention = tuple(_attention(table, b, i, s, keys, config) for i, b in enumerate(blocks))
    ffn = tuple(_ffn(table, b, i, s, keys) for i, b in enumerate(blocks))
    head = _head(table, config, keys, prefix)
    residual = None
    if head is not None and not no_residual:
        build = _pre_norm_residual if table.placement == "pre" else _permutation_residual
        residual = build(table, config, keys, prefix, blocks, head)
    return ModelSpec(family, s.layers, s.hidden, s.heads, s.head_dim, s.ffn_width, ffn, attention,
                     num_kv_heads=s.kv_heads if table.kv_heads else 0, residual=residual, no_residual=no_residual,
                     qk_fixed_reason=table.qk_fixed_reason,
                     roles=_roles(table, prefix, blocks), blocks=tuple(blocks),
                     pre_layers=tuple(f"{prefix}{v.rsplit('.', 1)[0]}." for v in table.stream_vectors))


def _choose_table(tables: tuple[FamilyTable, ...], keys: Collection[str]) -> FamilyTable:
    """The first naming scheme whose anchor tensor is in the checkpoint (the first one when none is, for the error)."""
    return next((t for t in tables if find_prefix(keys, t.anchor()) is not None), tables[0])


def spec_for(config: Any, keys: Collection[str]) -> ModelSpec:
    """The symmetry spec of a model, from its config and its state dict's keys."""
    kind = model_type(config)
    tables = TABLES.get(kind)
    if tables is None:
        why = f": {REFUSED[kind]}" if kind in REFUSED else ""
        raise UnsupportedFamily(f"model_type {kind!r} is not supported{why}; supported: {', '.join(sorted(TABLES))}")
    return build_spec(_choose_table(tables, keys), kind, config, keys)


SPEC_BUILDERS = TABLES
"""The registry of supported families (model_type → tables); kept under its historical name."""
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(TABLES))


def required_config_keys(model_type: str) -> tuple[tuple[str, ...], ...]:
    """The config keys a supported family's sizes are read from (layers, hidden size, heads), each as the tuple of
    its accepted spellings; ``()`` for a family symmerge has no table of."""
    tables = TABLES.get(model_type)
    return (tables[0].layers, tables[0].hidden, tables[0].heads) if tables else ()
