"""A pasted mergekit recipe on a family symmerge has no spec of (here starcoder2, written by hand): the default
alignment falls back to none with a note, and slices and gradients find the layers from the tensor names, as
mergekit's inferred architectures do (``mergekit/architecture/auto.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, expect_cli_error, make_model, merge_recipe, run_cli, save_checkpoint
from safetensors.torch import load_file
from test_tokenizer_merge import _tokenizer

from symmerge.errors import SymmergeError
from symmerge.merge.planner import plan_merge
from symmerge.merge.recipe import load_recipe
from symmerge.spec import infer_layers, layer_structure, spec_for

LAYERS, D, FFN, VOCAB = 4, 8, 16, 20


def _starcoder2_state(seed: int, prefix: str = "model.layers", vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A tiny state dict named as Starcoder2ForCausalLM's: embeddings, LAYERS blocks (biased attention, biased
    c_fc/c_proj MLP, LayerNorms), final norm and an untied head."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, D), "model.norm.weight": (D,), "model.norm.bias": (D,), "lm_head.weight": (vocab, D)}
    for i in range(LAYERS):
        block = f"{prefix}.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{block}.self_attn.{p}.weight"], shapes[f"{block}.self_attn.{p}.bias"] = (D, D), (D,)
        shapes[f"{block}.mlp.c_fc.weight"], shapes[f"{block}.mlp.c_proj.weight"] = (FFN, D), (D, FFN)
        shapes[f"{block}.mlp.c_fc.bias"], shapes[f"{block}.mlp.c_proj.bias"] = (FFN,), (D,)
        for n in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{block}.{n}.weight"], shapes[f"{block}.{n}.bias"] = (D,), (D,)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _config(layers: int = LAYERS) -> dict:
    return {"model_type": "starcoder2", "architectures": ["Starcoder2ForCausalLM"], "num_hidden_layers": layers,
            "hidden_size": D, "intermediate_size": FFN, "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": VOCAB, "max_position_embeddings": 32, "norm_epsilon": 1e-5, "use_bias": True,
            "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": False, "torch_dtype": "float32"}


def _save(path: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    return save_checkpoint(path, state, config or _config())


@pytest.fixture(scope="module")
def coders(tmp_path_factory):
    """Two unrelated starcoder2 checkpoints a and b (float32, 4 layers)."""
    root = tmp_path_factory.mktemp("coders")
    return {name: _save(root / name, _starcoder2_state(seed)) for name, seed in (("a", 1), ("b", 2))}


def test_layers_are_read_from_the_tensor_names():
    state = _starcoder2_state(0)
    with pytest.raises(SymmergeError, match="'starcoder2' is not supported"):
        spec_for(_config(), state.keys())
    layers = layer_structure(_config(), state.keys())
    assert layers.num_layers == LAYERS and not layers.groups()  # the layers only: nothing to align
    assert layers.layer_of("model.layers.3.mlp.c_fc.weight") == 3
    assert layers.layer_of("model.norm.weight") is None and layers.layer_of("lm_head.weight") is None
    assert layers.is_embedding("model.embed_tokens.weight")
    assert not layers.is_embedding("model.norm.weight") and not layers.is_embedding("lm_head.weight")
    assert layers.in_layer("model.layers.1.self_attn.q_proj.bias", 3) == "model.layers.3.self_attn.q_proj.bias"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_names_give_the_same_layers_as_the_specs_of_known_families(family):
    # the fallback agrees with the tables where both apply: same layer of every tensor, same embeddings
    model, _ = make_model(family)
    keys = list(model.state_dict())
    spec, inferred = spec_for(model.config, keys), infer_layers(model.config, keys)
    assert inferred.blocks == spec.blocks
    assert {k: inferred.layer_of(k) for k in keys} == {k: spec.layer_of(k) for k in keys}
    # before the layers in both, as in mergekit's architecture files: embeddings and BERT's embeddings.LayerNorm; but
    # DeBERTa's encoder.LayerNorm normalises its relative embeddings, which its name does not tell (the spec knows)
    outside = [k for k in keys if spec.layer_of(k) is None and not k.startswith("deberta.encoder.LayerNorm.")]
    assert [k for k in outside if inferred.is_embedding(k)] == [k for k in outside if spec.is_embedding(k)]
    if family == "bert":
        assert spec.is_embedding("embeddings.LayerNorm.weight") and spec.tensor_groups(["embeddings.LayerNorm.weight"]) == {
            "embeddings.LayerNorm.weight": "norms"}


def test_ambiguous_or_gapped_names_are_refused_in_one_line():
    encoder = {k.replace("model.layers", "model.encoder.layers"): v for k, v in _starcoder2_state(0).items()}
    decoder = {k.replace("model.layers", "model.decoder.layers"): v for k, v in _starcoder2_state(0).items()}
    with pytest.raises(SymmergeError, match=r"under both 'model.decoder.layers' and 'model.encoder.layers'") as e:
        infer_layers(_config(), encoder | decoder)
    assert "\n" not in str(e.value)
    gapped = {k: v for k, v in _starcoder2_state(0).items() if ".layers.2." not in k}
    with pytest.raises(SymmergeError, match=r"skip index 2"):
        infer_layers(_config(), gapped)
    with pytest.raises(SymmergeError, match=r"config.json has num_hidden_layers = 6, but the tensor names hold 4 layers"):
        infer_layers(_config(layers=6), _starcoder2_state(0))
    with pytest.raises(SymmergeError, match="no tensor name has a layer index"):
        infer_layers(_config(), {"model.embed_tokens.weight": None, "lm_head.weight": None})


def test_a_default_recipe_merges_unaligned_with_a_note_bit_for_bit(coders, tmp_path, capsys):
    models = f"models:\n  - model: {coders['a']}\n    parameters: {{weight: 0.3}}\n  - model: {coders['b']}\n    parameters: {{weight: 0.7}}\nmerge_method: linear\n"
    pasted, stdout = merge_recipe(capsys, tmp_path / "pasted", models)
    note = [line for line in stdout.splitlines() if "without alignment" in line]
    assert len(note) == 1 and "model_type 'starcoder2' is not supported" in note[0], stdout
    unaligned, stdout = merge_recipe(capsys, tmp_path / "none", models + "alignment: none\n")
    assert "without alignment" not in stdout
    assert pasted.keys() == unaligned.keys() and all(torch.equal(pasted[k], unaligned[k]) for k in pasted)
    a, b = load_file(coders["a"] / "model.safetensors"), load_file(coders["b"] / "model.safetensors")
    key = "model.layers.2.mlp.c_fc.weight"
    torch.testing.assert_close(pasted[key], 0.3 * a[key] + 0.7 * b[key])
    # an explicit alignment stays a clear refusal
    (tmp_path / "explicit.yaml").write_text(models + "alignment: {symmetries: all}\n")
    expect_cli_error(capsys, "set alignment: none", "merge", tmp_path / "explicit.yaml", tmp_path / "out-explicit")


def test_the_short_form_default_is_the_pasted_recipe_default(coders, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "merge", coders["a"], coders["b"], "--method", "linear", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert "without alignment" in stdout
    expect_cli_error(capsys, "set alignment: none", "merge", coders["a"], coders["b"], "--method", "linear",
                     "-s", "all", "-o", tmp_path / "out2")


def test_a_weight_gradient_interpolates_over_the_inferred_layers(coders, tmp_path, capsys):
    a, b = load_file(coders["a"] / "model.safetensors"), load_file(coders["b"] / "model.safetensors")
    out, _ = merge_recipe(capsys, tmp_path, f"""
models:
  - model: {coders["a"]}
    parameters: {{weight: [1, 0]}}
  - model: {coders["b"]}
    parameters: {{weight: [0, 1]}}
merge_method: linear
""")
    for i in range(LAYERS):
        t = i / (LAYERS - 1)  # mergekit's t of layer i in a slice of LAYERS layers
        for key in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.input_layernorm.bias"):
            torch.testing.assert_close(out[key], (1 - t) * a[key] + t * b[key], rtol=1e-6, atol=1e-7)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[key], a[key])  # t = 0 outside the layers, as for known families and in mergekit
    # negative control: the layers do differ from a, so the loop above could fail
    assert not torch.equal(out["model.layers.3.self_attn.o_proj.weight"], a["model.layers.3.self_attn.o_proj.weight"])


def test_passthrough_slices_take_the_named_layers(coders, tmp_path, capsys):
    a, b = load_file(coders["a"] / "model.safetensors"), load_file(coders["b"] / "model.safetensors")
    out, _ = merge_recipe(capsys, tmp_path, f"""
slices:
  - sources: [{{model: {coders["a"]}, layer_range: [0, 2]}}]
  - sources: [{{model: {coders["b"]}, layer_range: [1, 4]}}]
merge_method: passthrough
""")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5
    assert len({k for k in out if k.startswith("model.layers.")}) == 5 * len([k for k in a if k.startswith("model.layers.0.")])
    for j, (src, i) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2), (b, 3)]):
        for name in ("self_attn.k_proj.weight", "mlp.c_proj.weight", "post_attention_layernorm.bias"):
            assert torch.equal(out[f"model.layers.{j}.{name}"], src[f"model.layers.{i}.{name}"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # from the first slice
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"]) and torch.equal(out["model.norm.bias"], b["model.norm.bias"])
    (tmp_path / "far.yaml").write_text(f"slices:\n  - sources: [{{model: {coders['a']}, layer_range: [2, 5]}}]\nmerge_method: passthrough\n")
    expect_cli_error(capsys, "goes past the model's 4 layers", "merge", tmp_path / "far.yaml", tmp_path / "out-far")


def test_ambiguous_names_refuse_slices_and_gradients_but_merge_whole_models(tmp_path, capsys):
    def state(seed):
        s = _starcoder2_state(seed)
        return s | {k.replace("model.layers", "model.vision.blocks"): v.clone() for k, v in s.items() if ".layers." in k}
    a, b = _save(tmp_path / "a", state(1)), _save(tmp_path / "b", state(2))
    (tmp_path / "slices.yaml").write_text(f"slices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\nmerge_method: passthrough\n")
    expect_cli_error(capsys, "slices need the layer structure of the model: model_type 'starcoder2': tensor names index "
                     "layers under both", "merge", tmp_path / "slices.yaml", tmp_path / "out1")
    gradient = f"models:\n  - model: {a}\n    parameters: {{weight: [1, 0]}}\n  - model: {b}\nmerge_method: linear\n"
    (tmp_path / "gradient.yaml").write_text(gradient)
    expect_cli_error(capsys, "weight: a gradient (a list of values over the layers) needs the layer structure",
                     "merge", tmp_path / "gradient.yaml", tmp_path / "out2")
    out, stdout = merge_recipe(capsys, tmp_path / "plain", gradient.replace("[1, 0]", "0.5"))
    assert "without alignment" in stdout and "model.vision.blocks.0.mlp.c_fc.weight" in out


def test_the_plan_places_each_tensor_as_for_a_known_family(coders, tmp_path):
    (tmp_path / "r.yaml").write_text(f"models: [{{model: {coders['a']}}}, {{model: {coders['b']}}}]\nmerge_method: linear\n"
                                     "parameters: {weight: [1, 0]}\n")
    plan = plan_merge(*load_recipe(tmp_path / "r.yaml"))
    assert plan.layers is not None and plan.slices[0].length == LAYERS and not plan.aligned
    assert [plan.position(f"model.layers.{i}.mlp.c_fc.weight")[1] for i in range(LAYERS)] == [0, 1 / 3, 2 / 3, 1]
    assert plan.position("lm_head.weight") == (0, 0.0) and plan.position("model.embed_tokens.weight") == (0, 0.0)


def test_a_union_vocabulary_maps_the_embedding_and_head_rows_by_token(tmp_path, capsys):
    # the vocabulary tensors of a family without a spec are found by name too: embedding and head rows follow tokens
    vocabs = {"a": ["<unk>", "x", "y", "z"], "b": ["<unk>", "z", "w", "x", "v"]}
    paths, rows = {}, {}
    for seed, (name, tokens) in enumerate(vocabs.items()):
        state = _starcoder2_state(seed, vocab=len(tokens))
        paths[name] = _save(tmp_path / name, state, _config() | {"vocab_size": len(tokens)})
        _tokenizer(tokens, None).save_pretrained(paths[name])
        rows[name] = {k: dict(zip(tokens, state[k])) for k in ("model.embed_tokens.weight", "lm_head.weight")}
    out, stdout = merge_recipe(capsys, tmp_path / "merge", f"models: [{{model: {paths['a']}}}, {{model: {paths['b']}}}]\n"
                                                      "merge_method: linear\ntokenizer_source: union\n")
    assert "without alignment" in stdout
    union = ["<unk>", "x", "y", "z", "w", "v"]  # a's tokens, then b's new ones in b's id order
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[key].shape == (len(union), D)
        for u, token in enumerate(union):  # a token one model lacks takes the other's row there: the mean of those that exist
            expected = torch.stack([rows[m][key][token] for m in vocabs if token in rows[m][key]]).mean(0)
            torch.testing.assert_close(out[key][u], expected)
