"""Conformance: the same recipe through symmerge and through mergekit, tensor by tensor.

mergekit runs in its own virtualenv (``.cache/bench-mergekit-venv``, created by ``merge_speed.ensure_mergekit``:
torch pinned to the local CPU wheel first). Checkpoints: a small LLaMA-shaped base and three fine-tunes (base +
1 % noise), float32. Every merge method and every recipe feature (gradients, filters, per-model parameters, a global
weight, slices, passthrough frankenmerges, dtype/out_dtype) runs in both tools with the same YAML; symmerge gets
``alignment: none`` added (mergekit does not know the key). Random methods run where both are deterministic
(DARE / DELLA at density 1) — mergekit's masks are unseeded. Vocabulary merging (``tokenizer_source`` / ``tokenizer``)
runs on three more checkpoints with their own WordLevel tokenizers (:func:`tokenizer_checkpoints`); the outputs'
embedding and LM-head rows are compared token by token, since mergekit appends the union's tokens in set / hash-map
order (and, without a base_model, starts from an arbitrary model's tokenizer) where symmerge's order is fixed. Writes benchmarks/results/mergekit_conformance.md:
per job, the largest absolute difference over all tensors, how many tensors differ by more than one rounding of the
output dtype, and wall time and peak RSS of both tools.

    .venv/bin/python benchmarks/mergekit_conformance.py [--only JOB ...]   # run all jobs / those whose names contain JOB
    .venv/bin/python benchmarks/mergekit_conformance.py --render           # re-render the .md from the json, run nothing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import CACHE, RESULTS, TIME, _parse_time_v, child_env, ensure_mergekit, mergekit_yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CKPTS = CACHE / "conformance-ckpts"
WORK = CACHE / "conformance-out"
SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=64, tie_word_embeddings=False)


def checkpoints() -> dict[str, str]:
    import transformers

    names = ("base", "a", "b", "c")
    if all((CKPTS / n / "model.safetensors").exists() for n in names):
        return {n: str(CKPTS / n) for n in names}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZE))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, n in enumerate(names):
        g = torch.Generator().manual_seed(100 + i)
        state = base if n == "base" else {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}
        model.save_pretrained(CKPTS / n)
        save_file({k: v.contiguous() for k, v in state.items()}, CKPTS / n / "model.safetensors", metadata={"format": "pt"})
    return {n: str(CKPTS / n) for n in names}


UNKNOWN = "starcoder2"
"""Jobs named so run a family symmerge has no spec of, pasted as is (no ``alignment`` key): symmerge merges it
unaligned with a note, its layers read from the tensor names (``symmerge/spec/layers.py``)."""


def unknown_family_checkpoints() -> dict[str, str]:
    """Two unrelated Starcoder2 checkpoints (seeds 0 and 1) of SIZE's widths, float32: a family without a spec."""
    import transformers

    names = ("sc2-a", "sc2-b")
    if all((CKPTS / n / "model.safetensors").exists() for n in names):
        return {n: str(CKPTS / n) for n in names}
    cfg = transformers.Starcoder2Config(hidden_size=SIZE["hidden_size"], intermediate_size=SIZE["intermediate_size"],
                                        num_hidden_layers=SIZE["num_hidden_layers"], num_attention_heads=SIZE["num_attention_heads"],
                                        num_key_value_heads=SIZE["num_key_value_heads"], vocab_size=SIZE["vocab_size"],
                                        max_position_embeddings=SIZE["max_position_embeddings"], tie_word_embeddings=False)
    for seed, n in enumerate(names):
        torch.manual_seed(seed)
        transformers.Starcoder2ForCausalLM(cfg).save_pretrained(CKPTS / n)
    return {n: str(CKPTS / n) for n in names}


MODULAR = "modules (mistral3)"
"""Jobs named so run mergekit's multi-module recipes (``modules: {text_decoder: ..., vision_tower: ...,
multi_modal_projector: ...}``) on tiny Mistral3ForConditionalGeneration checkpoints, pasted as is (no
``alignment`` key): symmerge reads the modules from ``symmerge/spec/modules.py`` and merges them unaligned."""
MM_NAMES = ("mm-base", "mm-a", "mm-b")
MM_TOK_NAMES = ("mm-tok-a", "mm-tok-b")


def modular_checkpoints() -> dict[str, str]:
    """Three Mistral3ForConditionalGeneration checkpoints (a 4-layer Mistral text decoder of SIZE's widths, a 2-layer
    Pixtral vision tower of width 64, the projector; untied head), float32: a base and two fine-tunes (base + 1 %
    noise), saved by transformers (mergekit 0.1.5's mistral3.json names every tensor)."""
    import transformers

    names = MM_NAMES + MM_TOK_NAMES
    if all((CKPTS / n / "model.safetensors").exists() for n in names):
        return {n: str(CKPTS / n) for n in names}
    text = transformers.MistralConfig(**{**SIZE, "head_dim": SIZE["hidden_size"] // SIZE["num_attention_heads"]})
    vision = transformers.PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                              head_dim=32, image_size=32, patch_size=8)
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2, tie_word_embeddings=False)
    torch.manual_seed(2)
    model = transformers.Mistral3ForConditionalGeneration(config)
    for i, name in enumerate(MM_NAMES):
        model.save_pretrained(CKPTS / name)
        state = load_file(CKPTS / name / "model.safetensors")
        if name != "mm-base":
            g = torch.Generator().manual_seed(400 + i)
            state = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, CKPTS / name / "model.safetensors", metadata={"format": "pt"})
    # mm-a and mm-b with the vocabularies of tok-a (512 words) and tok-b (513, a special token): their tokenizers'
    # files, b's text decoder one row longer (rows are compared token by token)
    words = tokenizer_checkpoints()
    for name, source, rows in (("mm-tok-a", "mm-a", 512), ("mm-tok-b", "mm-b", 513)):
        shutil.copytree(CKPTS / source, CKPTS / name, dirs_exist_ok=True)
        for f in Path(words["tok-" + name[-1]]).glob("*token*"):
            shutil.copy(f, CKPTS / name / f.name)
        state = load_file(CKPTS / source / "model.safetensors")
        g = torch.Generator().manual_seed(410 + rows)
        for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            state[k] = torch.cat([state[k], torch.randn(rows - len(state[k]), state[k].shape[1], generator=g) * state[k].std()])
        config = json.loads((CKPTS / name / "config.json").read_text())
        config["text_config"]["vocab_size"] = rows
        (CKPTS / name / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, CKPTS / name / "model.safetensors", metadata={"format": "pt"})
    return {n: str(CKPTS / n) for n in names}


GEMMA3 = "modules (gemma3)"
GEMMA3_NAMES = ("g3-a", "g3-b")


def gemma3_checkpoints() -> dict[str, str]:
    """Two Gemma3ForConditionalGeneration checkpoints (a 4-layer Gemma3 text decoder of SIZE's widths, a 2-layer SigLIP
    vision tower of width 64 without its pooling head, the projector), float32, fine-tunes of one random model (1 %
    noise). The vision tower's tensors are renamed to ``vision_tower.vision_model.``, the layout mergekit 0.1.5's
    gemma3vl.json names (transformers 5 saves them as ``vision_tower.encoder...``)."""
    import transformers

    if all((CKPTS / n / "model.safetensors").exists() for n in GEMMA3_NAMES):
        return {n: str(CKPTS / n) for n in GEMMA3_NAMES}
    text = transformers.Gemma3TextConfig(**{**SIZE, "head_dim": SIZE["hidden_size"] // SIZE["num_attention_heads"]})
    vision = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                             image_size=32, patch_size=8, vision_use_head=False)
    torch.manual_seed(3)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(text_config=text, vision_config=vision,
                                                                                   mm_tokens_per_image=4))
    for i, name in enumerate(GEMMA3_NAMES):
        model.save_pretrained(CKPTS / name)
        g = torch.Generator().manual_seed(500 + i)
        state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g)
                 for k, v in load_file(CKPTS / name / "model.safetensors").items()}
        save_file(state, CKPTS / name / "model.safetensors", metadata={"format": "pt"})
    return {n: str(CKPTS / n) for n in GEMMA3_NAMES}


TOK_NAMES = ("tok-base", "tok-a", "tok-b")


def tokenizer_checkpoints() -> dict[str, str]:
    """Three checkpoints of SIZE with their own WordLevel tokenizers: the base's 512 words; A a fine-tune of it with
    20 words replaced by its own and the ids of 100 words shuffled (its rows move with them); B likewise with 30 words
    of its own and a special token <sep> (513 rows). Rows of a word are the base's row plus 1 % noise."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    if all((CKPTS / n / "tokenizer.json").exists() for n in TOK_NAMES):
        return {n: str(CKPTS / n) for n in TOK_NAMES}
    words = ["<unk>"] + [f"w{i}" for i in range(1, SIZE["vocab_size"])]
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZE))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(TOK_NAMES):
        g = torch.Generator().manual_seed(200 + i)
        own = {"tok-base": 0, "tok-a": 20, "tok-b": 30}[name]
        vocab = list(words)
        order = torch.arange(len(words))
        if own:
            picks = torch.randperm(len(words) - 1, generator=g)[:own] + 1
            for j, k in enumerate(picks.tolist()):
                vocab[k] = f"{name[-1]}{j}"
            block = torch.randperm(len(words) - 1, generator=g)[:100] + 1
            order[block] = block[torch.randperm(100, generator=g)]
            vocab = [vocab[k] for k in order.tolist()]
        special = ["<sep>"] if name == "tok-b" else []
        state = {}
        for k, v in base.items():
            v = v if name == "tok-base" else v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g)
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                v = v[order]
                if own:  # its own words: fresh rows
                    mine = torch.tensor([vocab.index(f"{name[-1]}{j}") for j in range(own)])
                    v[mine] = torch.randn(own, v.shape[1], generator=g) * v.std()
                if special:
                    v = torch.cat([v, torch.randn(1, v.shape[1], generator=g) * v.std()])
            state[k] = v.contiguous()
        cfg = transformers.LlamaConfig(**{**SIZE, "vocab_size": len(vocab) + len(special)})
        transformers.LlamaForCausalLM(cfg).save_pretrained(CKPTS / name)
        save_file(state, CKPTS / name / "model.safetensors", metadata={"format": "pt"})
        backend = Tokenizer(WordLevel({w: j for j, w in enumerate(vocab)}, unk_token="<unk>"))
        backend.pre_tokenizer = Whitespace()
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
        if special:
            tok.add_special_tokens({"additional_special_tokens": special})
        tok.save_pretrained(CKPTS / name)
    return {n: str(CKPTS / n) for n in TOK_NAMES}


def _save_adapter(name: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """Write a PEFT adapter folder ``CKPTS/name``: ``tensors`` as adapter_model.safetensors and ``config`` (on top of
    the entries every adapter here shares) as adapter_config.json."""
    folder = CKPTS / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, **config}))
    return str(folder)


def _cached_adapter(name: str) -> str | None:
    """``CKPTS/name`` if an earlier run wrote that adapter, else None (adapters are random: written once, reused)."""
    return str(CKPTS / name) if (CKPTS / name / "adapter_model.safetensors").exists() else None


def dora_adapter() -> str:
    """A PEFT DoRA adapter (r = 4 on q_proj and v_proj of every layer, random A, B and magnitudes) for checkpoint "a",
    written in PEFT's file format (tensor names as ``PeftModel.save_pretrained`` writes them)."""
    if cached := _cached_adapter("a-dora"):
        return cached
    g = torch.Generator().manual_seed(300)
    d, kv = SIZE["hidden_size"], SIZE["hidden_size"] // SIZE["num_attention_heads"] * SIZE["num_key_value_heads"]
    tensors = {}
    for layer in range(SIZE["num_hidden_layers"]):
        for module, out in (("q_proj", d), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}."
            tensors[prefix + "lora_A.weight"] = 0.05 * torch.randn(4, d, generator=g)
            tensors[prefix + "lora_B.weight"] = 0.05 * torch.randn(out, 4, generator=g)
            tensors[prefix + "lora_magnitude_vector"] = torch.rand(out, generator=g) + 0.5
    return _save_adapter("a-dora", tensors, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True})


def lora_adapter() -> str:
    """A plain PEFT LoRA adapter for checkpoint "a" (r = 8, alpha 16 on every attention and MLP projection of every
    layer, random A and B), tensor names as ``PeftModel.save_pretrained`` writes them."""
    if cached := _cached_adapter("a-lora"):
        return cached
    g = torch.Generator().manual_seed(302)
    d, ff = SIZE["hidden_size"], SIZE["intermediate_size"]
    kv = d // SIZE["num_attention_heads"] * SIZE["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d),
              "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}
    tensors = {}
    for layer in range(SIZE["num_hidden_layers"]):
        for module, (out, inp) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}."
            tensors[prefix + "lora_A.weight"] = 0.05 * torch.randn(8, inp, generator=g)
            tensors[prefix + "lora_B.weight"] = 0.05 * torch.randn(out, 8, generator=g)
    return _save_adapter("a-lora", tensors, {"r": 8, "lora_alpha": 16, "target_modules": [m.split(".")[1] for m in shapes]})


HUB_REPO = "conformance/tiny-{name}"
HUB_CACHE = CKPTS / "hub-cache"


def hub_cache(ck: dict[str, str]) -> Path:
    """A Hugging Face cache (the layout huggingface_hub reads offline) holding checkpoints "a" and "b" as repos
    ``conformance/tiny-a`` and ``conformance/tiny-b``: both tools resolve the repo ids from it with HF_HUB_OFFLINE=1."""
    revision = "0" * 40
    for name in ("a", "b"):
        folder = HUB_CACHE / ("models--" + HUB_REPO.format(name=name).replace("/", "--"))
        snapshot = folder / "snapshots" / revision
        if not (snapshot / "model.safetensors").exists():
            snapshot.mkdir(parents=True, exist_ok=True)
            for f in Path(ck[name]).iterdir():
                if f.is_file():
                    (snapshot / f.name).write_bytes(f.read_bytes())
            (folder / "refs").mkdir(exist_ok=True)
            (folder / "refs" / "main").write_text(revision)
    return HUB_CACHE


def mergekit_form(recipe: dict, ck: dict[str, str]) -> dict:
    """The recipe mergekit runs: the same, except repo ids of :func:`hub_cache` given as the local folders they hold —
    mergekit 0.1.5 lists a repo's files online before it reads its cache (``OfflineModeIsEnabled`` offline), so the
    hub row compares symmerge reading the repo ids offline with mergekit reading the same checkpoints as folders."""
    local = {HUB_REPO.format(name=n) + suffix: ck[n] for n in ("a", "b") for suffix in ("", "@main")}
    if "models" not in recipe:
        return recipe
    return {**recipe, "models": [{**m, "model": local.get(m["model"], m["model"])} for m in recipe["models"]]}


def extras_adapter() -> str:
    """A PEFT LoRA adapter for checkpoint "a" with what a plain LoRA lacks: a ``modules_to_save`` copy of lm_head, an
    embedding LoRA (``lora_embedding_A/B``, plus the embedding layer PEFT saves beside it) and q_proj pairs — tensor
    names as PEFT 0.21's ``save_pretrained`` writes them for ``target_modules=[q_proj, embed_tokens],
    modules_to_save=[lm_head]``."""
    if cached := _cached_adapter("a-peft-extras"):
        return cached
    g = torch.Generator().manual_seed(301)
    d, vocab = SIZE["hidden_size"], SIZE["vocab_size"]
    a = load_file(Path(checkpoints()["a"]) / "model.safetensors")
    p = "base_model.model."
    tensors = {p + "lm_head.weight": a["lm_head.weight"] + 0.02 * torch.randn(vocab, d, generator=g),
               p + "model.embed_tokens.base_layer.weight": a["model.embed_tokens.weight"],
               p + "model.embed_tokens.lora_embedding_A": 0.05 * torch.randn(4, vocab, generator=g),
               p + "model.embed_tokens.lora_embedding_B": 0.05 * torch.randn(d, 4, generator=g)}
    for layer in range(SIZE["num_hidden_layers"]):
        tensors[p + f"model.layers.{layer}.self_attn.q_proj.lora_A.weight"] = 0.05 * torch.randn(4, d, generator=g)
        tensors[p + f"model.layers.{layer}.self_attn.q_proj.lora_B.weight"] = 0.05 * torch.randn(d, 4, generator=g)
    return _save_adapter("a-peft-extras", tensors, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"],
                                                    "modules_to_save": ["lm_head"]})


REPEATED = "a model listed twice in models: (linear; both refuse)"
"""A job both tools must refuse: the row is conformant when both fail, with the two errors as its note."""


def jobs(ck: dict[str, str]) -> dict[str, dict]:
    two = [{"model": ck["a"]}, {"model": ck["b"]}]

    def src(name: str, start: int, end: int, weight: float | None = None) -> dict:
        return {"model": ck[name], "layer_range": [start, end], **({"parameters": {"weight": weight}} if weight is not None else {})}

    three_w = [{"model": ck["a"], "parameters": {"weight": 0.5}}, {"model": ck["b"], "parameters": {"weight": 0.3}},
               {"model": ck["c"], "parameters": {"weight": 0.2}}]
    tv = lambda method, params=None, models=None: {"models": models or three_w, "merge_method": method, "base_model": ck["base"],  # noqa: E731
                                                   "parameters": params or {}, "dtype": "float32"}
    j = {
        "linear": {"models": three_w, "merge_method": "linear", "dtype": "float32"},
        "slerp": {"models": two, "merge_method": "slerp", "base_model": ck["a"], "parameters": {"t": 0.3}, "dtype": "float32"},
        "nuslerp": {"models": [{"model": ck["a"], "parameters": {"weight": 0.4}}, {"model": ck["b"], "parameters": {"weight": 0.6}}],
                    "merge_method": "nuslerp", "dtype": "float32"},
        "multislerp": {"models": three_w, "merge_method": "multislerp", "dtype": "float32"},
        "karcher": {"models": three_w, "merge_method": "karcher", "dtype": "float32"},
        "task_arithmetic": tv("task_arithmetic", {"lambda": 0.8}),
        "task_arithmetic + density, rescale, int8_mask": tv("task_arithmetic", {"lambda": 0.8, "rescale": True, "int8_mask": True}, models=[
            {"model": ck["a"], "parameters": {"weight": 0.5, "density": 0.3}}, {"model": ck["b"], "parameters": {"weight": 0.3, "density": 0.5}},
            {"model": ck["c"], "parameters": {"weight": 0.2}}]),
        "ties": tv("ties", {"density": 0.4}),
        "dare_linear (density 1)": tv("dare_linear", {"density": 1.0}),
        "dare_ties (density 1)": tv("dare_ties", {"density": 1.0}),
        "breadcrumbs": tv("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
        "breadcrumbs_ties": tv("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
        "della (density 1, epsilon 0)": tv("della", {"density": 1.0, "epsilon": 0.0}),
        "della_linear (density 1, epsilon 0)": tv("della_linear", {"density": 1.0, "epsilon": 0.0}),
        "sce": tv("sce", {"select_topk": 0.5}),
        "ram": tv("ram"),
        "ramplus_tl": tv("ramplus_tl"),
        "model_stock": tv("model_stock", models=[{"model": ck["a"]}, {"model": ck["b"]}, {"model": ck["c"]}]),
        "nearswap": {"models": [{"model": ck["a"]}], "merge_method": "nearswap", "base_model": ck["base"], "parameters": {"t": 0.001},
                     "dtype": "float32"},
        "arcee_fusion": {"models": [{"model": ck["a"]}], "merge_method": "arcee_fusion", "base_model": ck["base"], "dtype": "float32"},
        # recipe features
        "gradient + filter (slerp t)": {"models": two, "merge_method": "slerp", "base_model": ck["a"], "dtype": "float32",
                                        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "per-model gradients (ties)": tv("ties", {"weight": 0.4, "normalize": False}, models=[
            {"model": ck["a"], "parameters": {"density": [1, 0.5, 0.2], "weight": [0.2, 0.8]}},
            {"model": ck["b"], "parameters": {"density": 0.6}}, {"model": ck["c"]}]),
        "global weight default (task_arithmetic)": tv("task_arithmetic", {"weight": 0.3},
                                                      models=[{"model": ck["a"], "parameters": {"weight": 0.9}}, {"model": ck["b"]}]),
        "slices, same ranges (slerp per slice)": {
            "slices": [{"sources": [{"model": ck["a"], "layer_range": [0, 2]}, {"model": ck["b"], "layer_range": [0, 2]}],
                        "parameters": {"t": 0.2}},
                       {"sources": [{"model": ck["a"], "layer_range": [2, 4]}, {"model": ck["b"], "layer_range": [2, 4]}]}],
            "merge_method": "slerp", "base_model": ck["a"], "parameters": {"t": [0.1, 0.9]}, "dtype": "float32"},
        "passthrough frankenmerge (6 layers)": {
            "slices": [{"sources": [{"model": ck["a"], "layer_range": [0, 3]}]}, {"sources": [{"model": ck["b"], "layer_range": [1, 4]}]}],
            "merge_method": "passthrough", "dtype": "float32"},
        "modules: default (linear)": {"modules": {"default": {"models": three_w}}, "merge_method": "linear", "dtype": "float32"},
        "ties, normalize: false, lambda 0.7": tv("ties", {"density": 0.4, "normalize": False, "lambda": 0.7}),
        "breadcrumbs, rescale: true": tv("breadcrumbs", {"density": 0.8, "gamma": 0.05, "rescale": True}),
        "hub repo ids, offline cache (linear; mergekit given the folders)": {"models": [{"model": HUB_REPO.format(name="a"), "parameters": {"weight": 0.6}},
                                                            {"model": HUB_REPO.format(name="b") + "@main", "parameters": {"weight": 0.4}}],
                                                 "merge_method": "linear", "dtype": "float32"},
        "dtype bfloat16 (linear)": {"models": three_w, "merge_method": "linear", "dtype": "bfloat16"},
        # mergekit's per-slice base_model: the base of that slice's tensors (the first slice's: the embeddings; the
        # last's: final norm and head)
        "slice base_model overrides base_model (task_arithmetic)": {
            "slices": [{"sources": [src("base", 0, 2), src("a", 0, 2, 0.5), src("b", 0, 2, 0.3)]},
                       {"sources": [src("a", 2, 4), src("b", 2, 4, 0.3), src("c", 2, 4, 0.2)], "base_model": ck["a"]}],
            "merge_method": "task_arithmetic", "base_model": ck["base"], "parameters": {"lambda": 0.8}, "dtype": "float32"},
        "slice base_model, no recipe base (dare_ties, density 1)": {
            "slices": [{"sources": [src("base", 0, 2), src("a", 0, 2, 0.5), src("b", 0, 2, 0.3)], "base_model": ck["base"]},
                       {"sources": [src("a", 2, 4, 0.5), src("b", 2, 4), src("c", 2, 4, 0.2)], "base_model": ck["b"]}],
            "merge_method": "dare_ties", "parameters": {"density": 1.0}, "dtype": "float32"},
        "slice base_model, moved layers (task_arithmetic)": {
            "slices": [{"sources": [src("base", 0, 2), src("a", 1, 3, 0.6)], "base_model": ck["base"]},
                       {"sources": [src("b", 2, 4, 0.4), src("c", 1, 3)], "base_model": ck["c"]}],
            "merge_method": "task_arithmetic", "dtype": "float32"},
        "slice base_model, slerp (one base per slice)": {
            "slices": [{"sources": [src("a", 0, 2), src("b", 0, 2)], "base_model": ck["a"]},
                       {"sources": [src("a", 2, 4), src("b", 2, 4)], "base_model": ck["b"]}],
            "merge_method": "slerp", "parameters": {"t": 0.3}, "dtype": "float32"},
        "dtype float32 + out_dtype bfloat16 (ties)": {**tv("ties", {"density": 0.4}), "out_dtype": "bfloat16"},
        # the tensors after the layers come from the last slice's first sources, as many as the first slice has (b, c)
        "slices, last slice wider than the first (linear; final norm and head)": {
            "slices": [{"sources": [src("a", 0, 2, 0.5), src("base", 0, 2, 0.5)]},
                       {"sources": [src("b", 2, 4, 0.3), src("c", 2, 4, 0.5), src("a", 1, 3, 0.2)]}],
            "merge_method": "linear", "dtype": "float32"},
        # mergekit keys a tensor's inputs by model: a model listed twice is refused before merging
        REPEATED: {"models": [{"model": ck["a"], "parameters": {"weight": 0.5}}, {"model": ck["a"], "parameters": {"weight": 0.3}},
                              {"model": ck["b"], "parameters": {"weight": 0.2}}], "merge_method": "linear", "dtype": "float32"},
    }
    if "a-dora" in ck:
        j["model+lora: DoRA adapter (linear)"] = {"models": [{"model": f"{ck['a']}+{ck['a-dora']}", "parameters": {"weight": 0.5}},
                                                             {"model": ck["b"], "parameters": {"weight": 0.5}}],
                                                  "merge_method": "linear", "dtype": "float32"}
    if "a-lora" in ck:
        j["model+lora: plain LoRA on every projection (linear)"] = {
            "models": [{"model": f"{ck['a']}+{ck['a-lora']}", "parameters": {"weight": 0.5}}, {"model": ck["b"], "parameters": {"weight": 0.5}}],
            "merge_method": "linear", "dtype": "float32"}
    if "a-extras" in ck:
        j["model+lora: modules_to_save + embedding LoRA (linear)"] = {
            "models": [{"model": f"{ck['a']}+{ck['a-extras']}", "parameters": {"weight": 0.5}}, {"model": ck["b"], "parameters": {"weight": 0.5}}],
            "merge_method": "linear", "dtype": "float32"}
    if "sc2-a" in ck:  # a family without a spec, recipes pasted unchanged
        sc2 = [{"model": ck["sc2-a"]}, {"model": ck["sc2-b"]}]
        j |= {
            f"{UNKNOWN}, no alignment key (linear)": {"models": [{"model": ck["sc2-a"], "parameters": {"weight": 0.3}},
                                                                 {"model": ck["sc2-b"], "parameters": {"weight": 0.7}}],
                                                      "merge_method": "linear", "dtype": "float32"},
            f"{UNKNOWN}, per-model weight gradients (linear)": {
                "models": [{"model": ck["sc2-a"], "parameters": {"weight": [1, 0]}}, {"model": ck["sc2-b"], "parameters": {"weight": [0, 1]}}],
                "merge_method": "linear", "dtype": "float32"},
            f"{UNKNOWN}, gradient + filter (slerp t)": {"models": sc2, "merge_method": "slerp", "base_model": ck["sc2-a"], "dtype": "float32",
                                                        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}},
            f"{UNKNOWN}, passthrough frankenmerge (5 layers)": {
                "slices": [{"sources": [{"model": ck["sc2-a"], "layer_range": [0, 2]}]}, {"sources": [{"model": ck["sc2-b"], "layer_range": [1, 4]}]}],
                "merge_method": "passthrough", "dtype": "float32"},
        }
    if "mm-base" in ck:  # a multi-module model: each module merged from its own inputs, recipes pasted unchanged
        mm = lambda name, w=None: {"model": ck[name], **({"parameters": {"weight": w}} if w is not None else {})}  # noqa: E731
        j |= {
            f"{MODULAR}: per-module models + parameters (linear)": {
                "modules": {"text_decoder": {"models": [mm("mm-a", 0.3), mm("mm-b")]},
                            "vision_tower": {"models": [mm("mm-a"), mm("mm-b", 0.8)], "parameters": {"weight": 0.4}},
                            "multi_modal_projector": {"models": [mm("mm-b")]}},
                "merge_method": "linear", "parameters": {"weight": 0.7}, "dtype": "float32"},
            f"{MODULAR}: per-module gradients, base added (task_arithmetic)": {
                "modules": {"text_decoder": {"models": [mm("mm-a", [0.2, 0.9]), mm("mm-b", 0.5)]},
                            "vision_tower": {"models": [mm("mm-a", 0.6)], "parameters": {"lambda": [1.0, 0.5]}},
                            "multi_modal_projector": {"models": [mm("mm-b", 0.7)]}},
                "merge_method": "task_arithmetic", "base_model": ck["mm-base"], "dtype": "float32"},
            f"{MODULAR}: text decoder frankenmerge (passthrough, 6 text layers)": {
                "modules": {"text_decoder": {"slices": [{"sources": [{"model": ck["mm-a"], "layer_range": [0, 3]}]},
                                                        {"sources": [{"model": ck["mm-b"], "layer_range": [1, 4]}]}]},
                            "vision_tower": {"models": [mm("mm-a")]}, "multi_modal_projector": {"models": [mm("mm-b")]}},
                "merge_method": "passthrough", "dtype": "float32"},
            f"{MODULAR}: a text-decoder slice with its own base_model (task_arithmetic)": {
                "modules": {"text_decoder": {"slices": [{"sources": [{"model": ck["mm-a"], "layer_range": [0, 4], "parameters": {"weight": 0.7}},
                                                                     {"model": ck["mm-b"], "layer_range": [0, 4]}],
                                                         "base_model": ck["mm-b"]}]},
                            "vision_tower": {"models": [mm("mm-a", 0.6), mm("mm-b", 0.4)]},
                            "multi_modal_projector": {"models": [mm("mm-a", 0.5)]}},
                "merge_method": "task_arithmetic", "base_model": ck["mm-base"], "dtype": "float32"},
            f"{MODULAR}: tokenizer_source: union (linear)": {
                "modules": {"text_decoder": {"models": [mm("mm-tok-a", 0.4), mm("mm-tok-b", 0.6)]},
                            "vision_tower": {"models": [mm("mm-tok-a", 0.5), mm("mm-tok-b", 0.5)]},
                            "multi_modal_projector": {"models": [mm("mm-tok-b", 1.0)]}},
                "merge_method": "linear", "tokenizer_source": "union", "dtype": "float32"},
        }
    if "g3-a" in ck:
        j[f"{GEMMA3}: per-module models + parameters (slerp)"] = {
            "modules": {"text_decoder": {"models": [{"model": ck["g3-a"]}, {"model": ck["g3-b"]}], "parameters": {"t": [0.2, 0.8]}},
                        "vision_tower": {"models": [{"model": ck["g3-a"]}, {"model": ck["g3-b"]}]},
                        "multi_modal_projector": {"models": [{"model": ck["g3-a"]}, {"model": ck["g3-b"]}], "parameters": {"t": 0.9}}},
            "merge_method": "slerp", "base_model": ck["g3-a"], "parameters": {"t": 0.4}, "dtype": "float32"}
    if "tok-base" in ck:  # different vocabularies: tokenizer_source / tokenizer (rows compared token by token)
        tok3 = [{"model": ck[n], "parameters": {"weight": w}} for n, w in zip(TOK_NAMES, (0.5, 0.3, 0.2))]
        tok2 = tok3[1:]
        j |= {
            "tokenizer_source: union (linear)": {"models": tok3, "merge_method": "linear", "tokenizer_source": "union",
                                                 "dtype": "float32"},
            "tokenizer_source: union + base (task_arithmetic)": {"models": tok2, "base_model": ck["tok-base"],
                                                                 "merge_method": "task_arithmetic", "tokenizer_source": "union",
                                                                 "dtype": "float32"},
            "tokenizer_source: base (task_arithmetic)": {"models": tok2, "base_model": ck["tok-base"],
                                                         "merge_method": "task_arithmetic", "tokenizer_source": "base",
                                                         "dtype": "float32"},
            "tokenizer: tokens + pad_to_multiple_of (linear)": {
                "models": tok3, "merge_method": "linear", "dtype": "float32",
                "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
                    "a0": {"source": {"kind": "zero"}}, "w5": {"source": ck["tok-b"], "force": True},
                    "new": {"source": {"kind": "model_token", "model": ck["tok-a"], "token": "w7"}}}}},
        }
        tok_src = lambda name, start, end, weight=None: {"model": ck[name], "layer_range": [start, end],  # noqa: E731
                                                         **({"parameters": {"weight": weight}} if weight is not None else {})}
        j["slice base_model + tokenizer_source: union (task_arithmetic)"] = {
            "slices": [{"sources": [tok_src("tok-base", 0, 2), tok_src("tok-a", 0, 2, 0.5), tok_src("tok-b", 0, 2, 0.3)]},
                       {"sources": [tok_src("tok-a", 2, 4), tok_src("tok-b", 2, 4, 0.4)], "base_model": ck["tok-a"]}],
            "merge_method": "task_arithmetic", "base_model": ck["tok-base"], "tokenizer_source": "union", "dtype": "float32"}
        # mergekit's chat template names: a tokenizer is built (union), so both tools write the named template
        for name in TEMPLATE_NAMES:
            j[f"chat_template: {name} (linear, union tokenizer)"] = {"models": tok3, "merge_method": "linear", "tokenizer_source": "union",
                                                                     "chat_template": name, "dtype": "float32"}
    return j


EXPLAIN = {  # job prefix → why the outputs may differ by more than one rounding (read from mergekit 0.1.5's source)
    "slerp": "float32 arithmetic order: symmerge computes the SLERP coefficients in float64, a few ulps",
    "gradient + filter": "as slerp: coefficient precision, a few ulps",
    "slices, same ranges": "as slerp: coefficient precision, a few ulps",
    f"{UNKNOWN}, gradient + filter": "as slerp: coefficient precision, a few ulps",
    "multislerp": "float32 arithmetic order, a few ulps",
    "ram": "float32 arithmetic order (the largest difference, 1.19e-07 = 2⁻²³, is the spacing of float32 numbers between 1 and 2)",
    "model_stock": "float32 arithmetic order (the largest difference, 1.19e-07 = 2⁻²³, is the spacing of float32 numbers between 1 and 2)",
    GEMMA3: "as slerp: coefficient precision, a few ulps",
    f"{MODULAR}: a text-decoder slice": "as task_arithmetic: float32 summation order, a few ulps",
    "karcher": "float32 arithmetic order: symmerge iterates in float64 on the Gram matrix of the directions, a few ulps "
               "(both ignore `weight`: mergekit 0.1.5's alphas are uniform)",
    "task_arithmetic": "float32 summation order, a few ulps",
    "global weight": "float32 summation order, a few ulps",
    "ties": "trim-cut ties: these float32 checkpoints' τ = fl(base + noise) − base are multiples of ulp(base), so |τ| "
            "values repeat; symmerge keeps the first tied entries in memory order, mergekit's argsort any (both keep ⌊d·n⌋)",
    "per-model gradients": "as ties: trim-cut tie-breaking",
    "dtype float32 + out_dtype": "as ties, then rounded to bfloat16",
    "breadcrumbs": "as ties: ties across the outlier and small-magnitude cuts (symmerge's stable sort, mergekit's unstable one)",
    "sce": "top-k variance count, as ties",
    "arcee_fusion": "mergekit samples 10^6 entries (unseeded) for its quantiles; symmerge's are exact",
    "dtype bfloat16": "mergekit computes in bfloat16; symmerge in float32, rounded once",
    "dare": "density 1: no random mask, so deterministic",
    "della": "density 1, epsilon 0: no random mask, so deterministic",
    "tokenizer_source: union + base": "as task_arithmetic: float32 summation order, a few ulps",
    "tokenizer_source: base": "as task_arithmetic: float32 summation order, a few ulps",
    "tokenizer: tokens": "the padding rows (the mean of 564 rows): float32 summation order",
    "slice base_model, slerp": "as slerp: coefficient precision, a few ulps",
    "slice base_model": "as task_arithmetic: float32 summation order, a few ulps",
}

TEMPLATE_NAMES = ("chatml", "llama3", "mistral", "alpaca", "exaone")
TEMPLATE_EXPLAIN = {  # why mergekit's file renders otherwise (transformers renders with trim_blocks and lstrip_blocks)
    "llama3": "mergekit's file prints each message on a line of its own, so a \\n follows every <|eot_id|>, which the Llama 3 "
              "format (and Meta's template) does not have",
    "alpaca": "mergekit's file renders a blank line first when there is no system message, and none between the last turn "
              "and the generation prompt's ### Response:",
    "exaone": "mergekit's file is indented: lstrip_blocks strips only before {% %} tags, so the indentation before its {{ }} "
              "and its line breaks are rendered into the prompt",
}


def _conversations() -> list[tuple[list[dict], bool, dict]]:
    """(messages, add_generation_prompt, special tokens): every role layout the five formats treat differently."""
    s, u, a = "system", "user", "assistant"
    chats = [[(u, "Hi")], [(s, "Be brief."), (u, "Hi there")], [(s, "Be brief."), (u, "Hi there"), (a, "Hello!"), (u, "2+2?")],
             [(u, "Hi"), (a, " Hello ")], [(u, "one"), (a, "1"), (u, "two"), (a, "2")], [(s, "only a system message")],
             [(u, "line 1\nline 2 "), (a, "ok\n")], [(s, "S"), (u, "Summarise"), ("user_context", "the input")],
             [(u, "a"), (u, "b")], [(a, "first")]]
    tokens = [{"bos_token": "<s>", "eos_token": "</s>"}, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}]
    return [([{"role": r, "content": c} for r, c in chat], g, t) for chat in chats for g in (False, True) for t in tokens]


def _render(template: str, messages: list[dict], generation: bool, tokens: dict) -> str:
    """The prompt transformers' apply_chat_template renders (its renderer, trim_blocks and lstrip_blocks), or the
    error a template raises (``raise_exception``)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        return render_jinja_template([messages], chat_template=template, add_generation_prompt=generation, **tokens)[0][0]
    except Exception as e:  # noqa: BLE001 - a template's raise_exception: compared as an outcome
        return f"<error {type(e).__name__}>"


def template_conformance(name: str, sym: Path, mk: Path) -> str:
    """The chat templates both tools wrote into their outputs' tokenizers (as transformers loads them), rendered
    over :func:`_conversations`: how many prompts are the same string, and whether the others differ in whitespace
    only."""
    import transformers

    ours, theirs = (transformers.AutoTokenizer.from_pretrained(p, local_files_only=True).chat_template for p in (sym, mk))
    if not ours or not theirs:
        return f"chat template missing: symmerge {bool(ours)}, mergekit {bool(theirs)}"
    pairs = [(_render(ours, *c), _render(theirs, *c)) for c in _conversations()]
    differ = [(x, y) for x, y in pairs if x != y]
    out = f"chat template `{name}`: {len(pairs) - len(differ)} / {len(pairs)} prompts identical"
    if differ:
        spaces = sum("".join(x.split()) == "".join(y.split()) for x, y in differ)
        x, y = min(differ, key=lambda d: len(d[0]))
        out += (f"; {spaces} of the {len(differ)} others differ in whitespace only (e.g. symmerge {x[:60]!r}, mergekit "
                f"{y[:60]!r}): {TEMPLATE_EXPLAIN.get(name, '')}")
    return out


def explain(name: str) -> str:
    return next((v for k, v in EXPLAIN.items() if name.startswith(k)), "")


def _straddles(mag: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Entries of ``mag`` (flat) whose value sits on both sides of a cut of the ascending order (position ``c``: the
    first ``c`` entries go one way, the rest the other): which of the tied entries fall on which side is up to
    the sort, so the two tools may choose differently."""
    asc = torch.sort(mag).values
    amb = torch.zeros_like(mag, dtype=torch.bool)
    for c in cuts:
        if 0 < c < mag.numel() and asc[c - 1] == asc[c]:
            amb |= mag == asc[c]
    return amb


def attribute(recipe: dict, ck: dict[str, str], sym: Path, mk: Path) -> dict | None:
    """For task-vector methods with one global density/gamma: the entries that differ by more than one rounding,
    split by cause — ``tie``: some model's ``|τ_i|`` there ties across its trim cut (TIES: the ``⌊d n⌋``-th largest;
    Breadcrumbs: both cuts of its ascending order), where symmerge keeps the first in memory order and mergekit's
    unstable sort an arbitrary one; ``election``: the weighted task vectors cancel to within float32 rounding
    (``|Σ w_i τ_i| <= 8 ε Σ |w_i τ_i|``), so the summation order decides the elected sign (symmerge accumulates with
    fused multiply-adds, mergekit rounds the products first); ``ulps``: within 8 units in the last place of the largest
    operand (operation order; ``base + τ_m`` may cancel to a far smaller output); ``other``. Also how many election entries the exact
    (float64) sum gives the sign symmerge elected."""
    method = recipe.get("merge_method")
    if method not in ("ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "della") or "base_model" not in recipe:
        return None
    params = recipe.get("parameters", {})
    if any(isinstance(v, (list, dict)) for v in params.values()) or any("density" in m.get("parameters", {}) for m in recipe["models"]):
        return None
    density, gamma = float(params.get("density", 1.0)), float(params.get("gamma", 0.01))
    weights = [float(m.get("parameters", {}).get("weight", 1.0)) for m in recipe["models"]]
    base = load_file(Path(recipe["base_model"]) / "model.safetensors")
    models = [load_file(Path(m["model"]) / "model.safetensors") for m in recipe["models"]]
    a, b = _sharded(sym), _sharded(mk)
    counts = {"differing": 0, "tie": 0, "election": 0, "ulps": 0, "other": 0, "election_symmerge_sign_exact": 0}
    for key, bt in base.items():
        x, y = a[key].float(), b[key].float()
        d = (x - y).abs() > ulp(torch.maximum(x.abs(), y.abs()), b[key].dtype) * 1.0001
        if not bool(d.any()):
            continue
        taus = [m[key].float().reshape(-1) - bt.float().reshape(-1) for m in models]
        n = taus[0].numel()
        tie = torch.zeros(n, dtype=torch.bool)
        if density < 1 and method in ("ties",):
            k = max(1, int(density * n))
            tie = torch.stack([_straddles(t.abs(), [n - k]) for t in taus]).any(0)
        elif density < 1:
            target, top = int(density * n), int(gamma * n)
            bottom = max(0, n - target - top)
            tie = torch.stack([_straddles(t.abs(), [bottom, bottom + target]) for t in taus]).any(0)
        wt = torch.stack([w * t for w, t in zip(weights, taus)])
        near = wt.sum(0).abs() <= 8 * torch.finfo(torch.float32).eps * wt.abs().sum(0)
        d = d.reshape(-1)
        counts["differing"] += int(d.sum())
        counts["tie"] += int((d & tie).sum())
        election = d & ~tie & near
        counts["election"] += int(election.sum())
        rest = d & ~tie & ~near
        scale = torch.maximum(torch.maximum(x.abs(), y.abs()), bt.float().abs())  # the largest operand: base + τ_m may cancel
        few = ((x - y).abs() <= 8 * ulp(scale, b[key].dtype)).reshape(-1)
        counts["ulps"] += int((rest & few).sum())
        counts["other"] += int((rest & ~few).sum())
        counts.setdefault("other_examples", []).extend(f"{key}[{j}]" for j in (rest & ~few).nonzero().squeeze(1)[:2].tolist())
        if bool(election.any()):
            exact = sum(w * t.double() for w, t in zip(weights, taus))[election].sign()
            elected = (x.reshape(-1) - bt.float().reshape(-1))[election].sign().double()
            counts["election_symmerge_sign_exact"] += int((exact == elected).sum())
    return counts


def describe(c: dict | None) -> str:
    if not c or not c["differing"]:
        return ""
    parts = []
    if c["tie"]:
        parts.append(f"{c['tie']} at trim-cut ties (symmerge keeps the first in memory order, mergekit's unstable sort any)")
    if c["election"]:
        parts.append(f"{c['election']} where Σ w_i τ_i cancels to float32 rounding, so summation order elects the sign "
                     f"(symmerge fused multiply-adds, mergekit rounded products; the float64 sum agrees with symmerge's sign in "
                     f"{c['election_symmerge_sign_exact']})")
    if c["ulps"]:
        parts.append(f"{c['ulps']} by 2–8 units in the last place of the largest operand (float32 operation order)")
    if c["other"]:
        parts.append(f"{c['other']} other")
    return f"measured: {c['differing']} entries differ > 1 rounding: " + "; ".join(parts)


def operand_ulps(ck: dict[str, str], sym: Path, mk: Path, names: tuple[str, ...] = ("base", "a", "b", "c")) -> float:
    """The largest difference between the two outputs in units in the last place of the largest input at that entry
    (over checkpoints ``names``, at the same tensor name): what float32 operation order alone can explain is a
    few; a wrong base would be ~10^4 (a task vector is 1 % of the weights)."""
    inputs = [load_file(Path(ck[n]) / "model.safetensors") for n in names]
    a, b = _sharded(sym), _sharded(mk)
    worst = 0.0
    for key, x in a.items():
        if key not in inputs[0] or inputs[0][key].shape != x.shape:
            continue
        scale = torch.stack([m[key].float().abs() for m in inputs]).amax(0)
        worst = max(worst, float(((x.float() - b[key].float()).abs() / ulp(scale, torch.float32)).max()))
    return worst


def run(cmd: list[str], env: dict) -> tuple[float | None, int | None, str]:
    p = subprocess.run([str(TIME), "-v", *cmd], capture_output=True, text=True, env=env)
    wall, rss = _parse_time_v(p.stderr)
    if p.returncode == 0:
        return wall, rss, ""
    own = p.stderr.split("\tCommand being timed:")[0]  # the tool's stderr, before time -v's report and exit line
    last = ([line for line in own.strip().splitlines() if not line.startswith("Command exited with")] or ["?"])[-1]
    for folder in (CKPTS.resolve(), CKPTS):  # a checkpoint by its name, not this machine's path
        last = last.replace(f"{folder}/", "")
    return wall, rss, last[:200]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    return (torch.nextafter(y, torch.full_like(y, float("inf"))) - y).abs().float()


def _token_order(folder: Path) -> list[str] | None:
    """The tokens of the tokenizer in ``folder`` by id, or ``None`` without one."""
    if not (folder / "tokenizer.json").exists():
        return None
    import transformers

    vocab = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True).get_vocab()
    return sorted(vocab, key=vocab.get)


def by_token(a: dict, b: dict, sym: Path, mk: Path) -> str:
    """Reorder ``b``'s vocabulary rows (mergekit's) into ``a``'s token order, in place: mergekit appends the union's
    new tokens in set / hash-map order, symmerge in a fixed one. A note when the vocabularies differ."""
    ta, tb = _token_order(sym), _token_order(mk)
    if ta is None or tb is None or ta == tb:
        return ""
    if sorted(ta) != sorted(tb):
        return f"vocabularies differ: {sorted(set(ta) ^ set(tb))[:3]}"
    where = {t: i for i, t in enumerate(tb)}
    order = torch.tensor([where[t] for t in ta])
    for k in [k for k in b if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:  # a VLM's under its module prefix
        b[k] = torch.cat([b[k][order], b[k][len(order):]])  # padding rows (pad_to_multiple_of) stay last
    return ""


def compare(sym: Path, mk: Path) -> tuple[float, int, int, str]:
    a, b = load_file(sym / "model.safetensors") if (sym / "model.safetensors").exists() else _sharded(sym), _sharded(mk)
    worst, over, note = 0.0, 0, by_token(a, b, sym, mk)
    if set(a) != set(b):
        note = f"keys differ: {sorted(set(a) ^ set(b))[:3]}"
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape:
            note = f"{k}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"
            continue
        d = (x.float() - y.float()).abs()
        worst = max(worst, float(d.max()))
        if bool((d > ulp(torch.maximum(x.float().abs(), y.float().abs()), y.dtype) * 1.0001).any()):
            over += 1
    return worst, over, len(set(a) & set(b)), note


def _sharded(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


RESULTS_JSON = RESULTS / "mergekit_conformance.json"
"""Every row measured, tracked: the source of truth the .md is rendered from (an ``--only`` run replaces its rows and
keeps the others, whatever the local cache holds)."""


class _AnyCheckpoint(dict):
    """Stands in for the checkpoint folders where only the job names are wanted: every checkpoint present, one path."""

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> str:
        return "/checkpoint"


def job_order() -> list[str]:
    """Every job's name in the order :func:`jobs` lists them (the table's order), without building a checkpoint."""
    return list(jobs(_AnyCheckpoint()))


def merge_rows(stored: list[dict], fresh: list[dict], order: list[str]) -> list[dict]:
    """``fresh`` rows replace the stored rows of the same jobs; the stored rows of jobs not run this time stay (an
    ``--only`` run re-measures some rows without touching the rest). Rows in ``order``; a stored row whose job is no
    longer in ``order`` (renamed or removed) is dropped, as its recipe can no longer be re-run."""
    by_job = {r["job"]: r for r in stored} | {r["job"]: r for r in fresh}
    return [by_job[name] for name in order if name in by_job]


def _tool(measured: tuple[float | None, int | None, str]) -> dict:
    wall, rss, error = measured
    return {"seconds": wall, "rss_bytes": rss, "error": error}


def render(versions: dict, rows: list[dict]) -> str:
    """The markdown report of ``rows`` (as stored in RESULTS_JSON)."""
    lines = ["# symmerge vs mergekit: conformance", "",
             f"mergekit {versions['mergekit']}, torch {versions['torch']} (its own venv); symmerge with `alignment: none` "
             f"added, except in the `{UNKNOWN}` rows (a family symmerge has no spec of, recipes as pasted: no alignment key). "
             f"LLaMA-shaped checkpoints {SIZE}, base + 3 fine-tunes (1 % noise), float32. Generated by "
             "`benchmarks/mergekit_conformance.py`.", "",
             "`> 1 rounding`: tensors with an entry that differs by more than one unit in the last place of the output dtype.", "",
             "`tokenizer` rows: three more checkpoints of that size with their own WordLevel vocabularies (A: 20 words of its "
             "own and 100 ids shuffled; B: 30 words and a special token); the output vocabularies hold the same tokens and "
             "their embedding / LM-head rows are compared token by token (mergekit's order of the appended tokens is "
             "hash order).", "",
             f"`{UNKNOWN}` rows: two unrelated Starcoder2 checkpoints of those widths (seeds 0 and 1), a family symmerge has "
             "no spec of; mergekit reads it with its own starcoder2 architecture file, symmerge reads the layers from the "
             "tensor names and notes that it merges without alignment.", "",
             "`slice base_model` rows: mergekit's per-slice base (the base of that slice's layers; the first slice's also of "
             "the embeddings, the last's of the final norm and head).", "",
             "`chat_template` rows: the template each tool wrote into its output tokenizer (loaded with transformers) is "
             f"rendered by transformers' chat renderer (trim_blocks, lstrip_blocks) over {len(_conversations())} prompts "
             "(10 conversations of every role layout, add_generation_prompt false / true, two bos/eos pairs); the note says "
             "how many are the same string. symmerge's templates are its own, written from each format's definition "
             "(`symmerge/io/chat_templates.py`).", "",
             f"`{MODULAR}` rows: mergekit's multi-module recipes (`modules: {{text_decoder, vision_tower, "
             "multi_modal_projector}`, each module with its own models or slices and parameters) on three tiny "
             "Mistral3ForConditionalGeneration checkpoints (a 4-layer text decoder of those widths, a 2-layer Pixtral vision "
             "tower, the projector; a base and two fine-tunes), pasted as is; the tokenizer row gives the fine-tunes the "
             f"`tokenizer` rows' vocabularies of A and B (text-decoder rows compared token by token). The `{GEMMA3}` row: the "
             "same on two Gemma3ForConditionalGeneration fine-tunes (Gemma3 text decoder, SigLIP vision tower).", "",
             "| job | max abs diff | tensors > 1 rounding / all | symmerge s | mergekit s | symmerge RSS MB | mergekit RSS MB | note |",
             "|---|---|---|---|---|---|---|---|"]
    mb = lambda r: f"{r / 2**20:.0f}" if r else "?"  # noqa: E731
    sec = lambda w: f"{w:.2f}" if w else "?"  # noqa: E731
    for r in rows:
        diff = "—" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        count = "—" if r["tensors_over"] is None else f"{r['tensors_over']} / {r['tensors']}"
        sym, mk = r["symmerge"], r["mergekit"]
        lines.append(f"| {r['job']} | {diff} | {count} | {sec(sym['seconds'])} | {sec(mk['seconds'])} | {mb(sym['rss_bytes'])} "
                     f"| {mb(mk['rss_bytes'])} | {r['note']} |")
    return "\n".join(lines) + "\n"


def write_results(versions: dict, rows: list[dict]) -> str:
    """Store ``rows`` in RESULTS_JSON and render them into benchmarks/results/mergekit_conformance.md; the text."""
    RESULTS.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({"versions": versions, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    text = render(versions, rows)
    (RESULTS / "mergekit_conformance.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="run the jobs whose names contain one of these; the other stored rows stay")
    ap.add_argument("--render", action="store_true", help="run nothing: re-render the .md from the stored json")
    args = ap.parse_args()
    stored = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {"versions": {}, "rows": []}
    order = job_order()
    if args.render:
        print(write_results(stored["versions"], merge_rows(stored["rows"], [], order)))
        return
    versions = ensure_mergekit()
    versions = {"mergekit": versions["mergekit"], "torch": versions["torch"]}
    ck = checkpoints() | tokenizer_checkpoints() | unknown_family_checkpoints() | modular_checkpoints() | gemma3_checkpoints()
    ck["a-dora"] = dora_adapter()
    ck["a-extras"] = extras_adapter()
    ck["a-lora"] = lora_adapter()
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**child_env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache(ck))}  # repo ids: from this cache only
    rows = stored["rows"]
    for name, recipe in jobs(ck).items():
        if args.only and not any(o in name for o in args.only):
            continue
        slug = "".join(c if c.isalnum() else "_" for c in name)[:50]
        mk_cfg, sym_cfg = WORK / f"{slug}.mk.yaml", WORK / f"{slug}.sym.yaml"
        mk_cfg.write_text(yaml.safe_dump(mergekit_form(recipe, ck), sort_keys=False))
        pasted = name.startswith((UNKNOWN, MODULAR, GEMMA3))  # as is: the default alignment must fall back by itself
        sym_cfg.write_text(yaml.safe_dump(recipe if pasted else {**recipe, "alignment": "none"}, sort_keys=False))
        mk_out, sym_out = WORK / f"{slug}-mergekit", WORK / f"{slug}-symmerge"
        load = os.getloadavg()[0]
        mk = run([*mergekit_yaml(), str(mk_cfg), str(mk_out), "--no-copy-tokenizer", "--quiet",
                  "--no-write-model-card", "--allow-crimes", "--lora-merge-cache", str(WORK / "lora-cache")], env)
        sym = run([sys.executable, "-m", "symmerge.cli", "merge", str(sym_cfg), str(sym_out), "--force", "-q"], {**env, "PYTHONPATH": str(REPO)})
        if mk[2] or sym[2]:
            both = "both refuse, as they should: " if name == REPEATED and mk[2] and sym[2] else ""
            worst, over, total, note = None, None, None, f"{both}mergekit: {mk[2] or 'ok'}; symmerge: {sym[2] or 'ok'}"
        else:
            worst, over, total, note = compare(sym_out, mk_out)
            if over and not note:
                note = "; ".join(filter(None, [explain(name), describe(attribute(recipe, ck, sym_out, mk_out))]))
            if over and name.startswith("slice base_model") and "tokenizer_source" not in recipe:
                note += f"; measured: at most {operand_ulps(ck, sym_out, mk_out):.0f} units in the last place of the largest input"
            if over and name.startswith(f"{MODULAR}: a text-decoder slice"):
                note += f"; measured: at most {operand_ulps(ck, sym_out, mk_out, MM_NAMES):.0f} units in the last place of the largest input"
            if "chat_template" in recipe:
                note = "; ".join(filter(None, [note, template_conformance(recipe["chat_template"], sym_out, mk_out)]))
        row = {"job": name, "max_abs_diff": worst, "tensors_over": over, "tensors": total, "note": note,
               "symmerge": _tool(sym), "mergekit": _tool(mk), "load_average": [load, os.getloadavg()[0]]}
        print(row, flush=True)
        rows = merge_rows(rows, [row], order)
        write_results(versions, rows)  # after every job: an interrupted run keeps what it measured
    print(write_results(versions, merge_rows(rows, [], order)))


if __name__ == "__main__":
    main()
