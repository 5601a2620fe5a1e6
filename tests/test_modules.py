"""mergekit's multi-module recipes (``modules: {text_decoder: ..., vision_tower: ..., multi_modal_projector: ...}``)
on tiny Mistral3-shaped checkpoints written here: each module merged from its own models or slices with its own
parameters (mergekit 0.1.5's ``MergePlanner.plan_module``), the layers of each module read from its tensor names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import expect_cli_error, merge_recipe, save_checkpoint
from safetensors.torch import load_file
from test_tokenizer_merge import _tokenizer

from symmerge.errors import SymmergeError
from symmerge.merge.planner import plan_merge
from symmerge.merge.recipe import load_recipe
from symmerge.spec import MODULAR_ARCHITECTURES, module_keys, module_layers, module_of

TEXT_LAYERS, VISION_LAYERS, D, DV, VOCAB = 3, 2, 8, 6, 16
TABLE = MODULAR_ARCHITECTURES["Mistral3ForConditionalGeneration"]
TEXT, VISION, PROJECTOR = TABLE


def _mistral3_state(seed: int, text_layers: int = TEXT_LAYERS, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A tiny state dict named as mergekit 0.1.5's mistral3.json names Mistral3ForConditionalGeneration's tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"language_model.model.embed_tokens.weight": (vocab, D), "language_model.model.norm.weight": (D,),
              "language_model.lm_head.weight": (vocab, D),
              "vision_tower.patch_conv.weight": (DV, 3, 2, 2), "vision_tower.ln_pre.weight": (DV,),
              "multi_modal_projector.norm.weight": (DV,), "multi_modal_projector.patch_merger.merging_layer.weight": (DV, 4 * DV),
              "multi_modal_projector.linear_1.weight": (D, DV), "multi_modal_projector.linear_2.weight": (D, D)}
    for i in range(text_layers):
        block = f"language_model.model.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{block}.self_attn.{p}.weight"] = (D, D)
        shapes[f"{block}.mlp.up_proj.weight"] = shapes[f"{block}.mlp.gate_proj.weight"] = (2 * D, D)
        shapes[f"{block}.mlp.down_proj.weight"] = (D, 2 * D)
        shapes[f"{block}.input_layernorm.weight"] = shapes[f"{block}.post_attention_layernorm.weight"] = (D,)
    for i in range(VISION_LAYERS):
        block = f"vision_tower.transformer.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{block}.attention.{p}.weight"] = (DV, DV)
        shapes[f"{block}.feed_forward.up_proj.weight"] = shapes[f"{block}.feed_forward.gate_proj.weight"] = (2 * DV, DV)
        shapes[f"{block}.feed_forward.down_proj.weight"] = (DV, 2 * DV)
        shapes[f"{block}.attention_norm.weight"] = shapes[f"{block}.ffn_norm.weight"] = (DV,)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _config(text_layers: int = TEXT_LAYERS, architecture: str = "Mistral3ForConditionalGeneration") -> dict:
    return {"architectures": [architecture], "model_type": "mistral3", "torch_dtype": "float32",
            "text_config": {"model_type": "mistral", "num_hidden_layers": text_layers, "hidden_size": D, "vocab_size": VOCAB,
                            "layer_types": [("full_attention", "sliding_attention")[i % 2] for i in range(text_layers)]},
            "vision_config": {"model_type": "pixtral", "num_hidden_layers": VISION_LAYERS, "hidden_size": DV}}


def _save(path: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    return save_checkpoint(path, state, config or _config())


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """Three unrelated Mistral3-shaped checkpoints a, b, c (float32)."""
    root = tmp_path_factory.mktemp("vlms")
    return {name: _save(root / name, _mistral3_state(seed)) for name, seed in (("a", 1), ("b", 2), ("c", 3))}


def _states(vlms) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(p / "model.safetensors") for n, p in vlms.items()}


def _of(module, keys):
    return [k for k in keys if module_of(TABLE, k) is module]


def test_each_module_holds_its_prefix_and_reads_its_own_layers():
    state = _mistral3_state(0)
    assert {module_of(TABLE, k).name for k in state} == {"text_decoder", "vision_tower", "multi_modal_projector"}
    text = module_layers(_config(), TEXT, module_keys(TABLE, TEXT, state))
    vision = module_layers(_config(), VISION, module_keys(TABLE, VISION, state))
    projector = module_layers(_config(), PROJECTOR, module_keys(TABLE, PROJECTOR, state))
    assert (text.num_layers, vision.num_layers, projector.num_layers) == (TEXT_LAYERS, VISION_LAYERS, 0)
    assert text.layer_of("language_model.model.layers.2.mlp.up_proj.weight") == 2
    assert vision.layer_of("vision_tower.transformer.layers.1.ffn_norm.weight") == 1
    assert text.layer_of("vision_tower.transformer.layers.1.ffn_norm.weight") is None
    # before the layers (mergekit's pre_weights): the embedding, and Pixtral's patch_conv and ln_pre; after: the rest
    assert text.is_embedding("language_model.model.embed_tokens.weight") and not text.is_embedding("language_model.lm_head.weight")
    assert vision.is_embedding("vision_tower.patch_conv.weight") and vision.is_embedding("vision_tower.ln_pre.weight")
    # Qwen2-VL: the merger inside visual. is the projector (the longer prefix), its mlp.0 / mlp.2 are no layers
    qwen = MODULAR_ARCHITECTURES["Qwen2VLForConditionalGeneration"]
    assert module_of(qwen, "visual.merger.mlp.2.weight").name == "multi_modal_projector"
    assert module_of(qwen, "visual.blocks.0.attn.qkv.weight").name == "vision_tower"
    assert module_of(qwen, "lm_head.weight").name == module_of(qwen, "model.layers.0.mlp.up_proj.weight").name == "text_decoder"
    gemma3 = MODULAR_ARCHITECTURES["Gemma3ForConditionalGeneration"]  # mergekit's layout and transformers 5's
    assert {module_of(gemma3, f"vision_tower.{p}encoder.layers.0.mlp.fc1.weight").name for p in ("vision_model.", "")} == {"vision_tower"}
    t5 = MODULAR_ARCHITECTURES["T5ForConditionalGeneration"]  # T5's shared embedding is the vocabulary's, before the layers
    assert module_layers({}, t5[2], ["shared.weight", "lm_head.weight"]).tensor_groups(["shared.weight", "lm_head.weight"]) == {
        "shared.weight": "embeddings", "lm_head.weight": "head"}
    merger = ["visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight"]
    assert module_layers({}, qwen[2], merger).num_layers == 0


def test_a_module_depth_that_disagrees_with_the_config_is_refused_in_one_line():
    state = _mistral3_state(0)
    with pytest.raises(SymmergeError, match=r"module text_decoder: config.json has text_config.num_hidden_layers = 5, "
                                            r"but the tensor names hold 3 layers") as e:
        module_layers(_config(text_layers=5), TEXT, module_keys(TABLE, TEXT, state))
    assert "\n" not in str(e.value)
    gapped = [k for k in state if ".layers.1." not in k]
    with pytest.raises(SymmergeError, match="skip index 1"):
        module_layers({}, TEXT, module_keys(TABLE, TEXT, gapped))


def test_each_module_merges_its_own_models_with_its_own_parameters(vlms, tmp_path, capsys):
    s = _states(vlms)
    out, stdout = merge_recipe(capsys, tmp_path, f"""
modules:
  text_decoder:
    models:
      - model: {vlms["a"]}
        parameters: {{weight: 0.25}}
      - model: {vlms["b"]}
  vision_tower:
    models: [{{model: {vlms["b"]}}}]
  multi_modal_projector:
    models:
      - model: {vlms["a"]}
      - model: {vlms["c"]}
        parameters: {{weight: 0.6}}
    parameters: {{weight: 0.2}}
merge_method: linear
parameters: {{weight: 0.75}}
""")
    assert out.keys() == s["a"].keys()
    note = [line for line in stdout.splitlines() if "without alignment" in line]
    assert len(note) == 1 and "Mistral3ForConditionalGeneration" in note[0], stdout
    for k in _of(TEXT, out):  # a's own 0.25, b the recipe's 0.75: normalised by their sum, 1
        torch.testing.assert_close(out[k], 0.25 * s["a"][k] + 0.75 * s["b"][k])
    for k in _of(VISION, out):
        torch.testing.assert_close(out[k], s["b"][k])  # 0.75 b / 0.75
    for k in _of(PROJECTOR, out):  # a the module's 0.2 (above the recipe's), c its own 0.6 (above the module's)
        torch.testing.assert_close(out[k], (0.2 * s["a"][k] + 0.6 * s["c"][k]) / 0.8)
    # negative control: the modules did come from different inputs
    k = "multi_modal_projector.linear_1.weight"
    assert not torch.allclose(out[k], 0.25 * s["a"][k] + 0.75 * s["b"][k])
    written = (tmp_path / "out" / "merge.yaml").read_text()
    assert "multi_modal_projector:" in written and str(vlms["c"].resolve()) in written
    again = plan_merge(*load_recipe(tmp_path / "out" / "merge.yaml"))  # the recipe as run runs again
    assert [sl.module for sl in again.slices] == [{}, {}, {"weight": 0.2}]


def test_slices_and_gradients_run_over_each_modules_own_layers(vlms, tmp_path, capsys):
    s = _states(vlms)
    out, _ = merge_recipe(capsys, tmp_path, f"""
modules:
  text_decoder:
    slices:
      - sources: [{{model: {vlms["a"]}, layer_range: [0, 2]}}]
      - sources: [{{model: {vlms["b"]}, layer_range: [1, 3]}}]
  vision_tower:
    models: [{{model: {vlms["a"]}}}]
  multi_modal_projector:
    models: [{{model: {vlms["c"]}}}]
merge_method: passthrough
""")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4 and config["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    assert config["text_config"]["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    for j, (src, i) in enumerate([("a", 0), ("a", 1), ("b", 1), ("b", 2)]):
        for name in ("self_attn.k_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"language_model.model.layers.{j}.{name}"], s[src][f"language_model.model.layers.{i}.{name}"])
    assert torch.equal(out["language_model.model.embed_tokens.weight"], s["a"]["language_model.model.embed_tokens.weight"])
    assert torch.equal(out["language_model.lm_head.weight"], s["b"]["language_model.lm_head.weight"])  # the last slice's
    assert all(torch.equal(out[k], s["a"][k]) for k in _of(VISION, s["a"]))
    assert all(torch.equal(out[k], s["c"][k]) for k in _of(PROJECTOR, s["a"]))
    assert len(out) == len(s["a"]) + len([k for k in s["a"] if k.startswith("language_model.model.layers.0.")])

    # a gradient: t runs over each module's own layers (3 text, 2 vision), 0 outside them; mergekit's default form too
    out, _ = merge_recipe(capsys, tmp_path / "gradient", f"""
modules:
  default:
    models: [{{model: {vlms["a"]}, parameters: {{weight: [1, 0]}}}}, {{model: {vlms["b"]}}}]
    parameters: {{weight: [0, 1]}}
merge_method: linear
""")
    assert "modules:" in (tmp_path / "gradient" / "out" / "merge.yaml").read_text()
    for prefix, n, name in (("language_model.model.layers", TEXT_LAYERS, "self_attn.o_proj.weight"),
                            ("vision_tower.transformer.layers", VISION_LAYERS, "attention.o_proj.weight")):
        for i in range(n):
            key, t = f"{prefix}.{i}.{name}", i / (n - 1)
            torch.testing.assert_close(out[key], (1 - t) * s["a"][key] + t * s["b"][key])
    for key in ("language_model.lm_head.weight", "vision_tower.patch_conv.weight", "multi_modal_projector.linear_1.weight"):
        assert torch.equal(out[key], s["a"][key])


def test_a_base_model_not_listed_in_a_module_is_added_to_it(vlms, tmp_path, capsys):
    s = _states(vlms)
    modules = "\n".join(f"  {m.name}:\n    models: [{{model: {vlms['a']}, parameters: {{weight: 0.5}}}}]" for m in TABLE)
    out, _ = merge_recipe(capsys, tmp_path, f"modules:\n{modules}\nmerge_method: task_arithmetic\nbase_model: {vlms['b']}\n"
                                            "allow_unrelated_base: true\n")
    for k in out:  # base + 0.5 (a − base): mergekit adds the base to every module's sources
        torch.testing.assert_close(out[k], s["b"][k] + 0.5 * (s["a"][k] - s["b"][k]))
    # slerp from that base to the one model each module lists, as when both are listed
    one = "\n".join(f"  {m.name}:\n    models: [{{model: {vlms['a']}}}]" for m in TABLE)
    both = "\n".join(f"  {m.name}:\n    models: [{{model: {vlms['b']}}}, {{model: {vlms['a']}}}]" for m in TABLE)
    tail = f"merge_method: slerp\nbase_model: {vlms['b']}\nparameters: {{t: 0.3}}\n"
    unlisted, _ = merge_recipe(capsys, tmp_path / "unlisted", f"modules:\n{one}\n{tail}")
    listed, _ = merge_recipe(capsys, tmp_path / "listed", f"modules:\n{both}\n{tail}")
    assert all(torch.equal(unlisted[k], listed[k]) for k in listed)


def test_multi_module_recipes_are_refused_in_one_line_where_they_cannot_run(vlms, tmp_path, capsys):
    a, b = vlms["a"], vlms["b"]
    every = {m.name: f"{{models: [{{model: {a}}}]}}" for m in TABLE}

    def recipe(modules: dict, extra: str = "") -> str:
        return "modules:\n" + "".join(f"  {k}: {v}\n" for k, v in modules.items()) + "merge_method: linear\n" + extra

    starcoder = tmp_path / "sc"
    _save(starcoder, {"model.layers.0.mlp.c_fc.weight": torch.zeros(2, 2)}, {"model_type": "starcoder2",
                                                                            "architectures": ["Starcoder2ForCausalLM"]})
    stray = _save(tmp_path / "stray", _mistral3_state(1) | {"image_newline": torch.zeros(D)})
    for i, (text, message) in enumerate([
        (recipe({**every, "vision": every["vision_tower"]}), "modules.vision: Mistral3ForConditionalGeneration has no such "
         "module (its modules: text_decoder, vision_tower, multi_modal_projector)"),
        (recipe({k: v for k, v in every.items() if k != "vision_tower"}), "the recipe omits vision_tower"),
        (recipe({"text_decoder": f"{{models: [{{model: {starcoder}}}]}}"}), "Starcoder2ForCausalLM has one module, default"),
        (recipe(every, "alignment: {symmetries: all}\n"), "cannot align the modules of a multi-module model"),
        (recipe({**every, "text_decoder": f"{{models: [{{model: {stray}}}]}}"}), "tensor image_newline is in no module"),
        (recipe({**every, "text_decoder": "{parameters: {weight: 1}}"}), "modules.text_decoder: give exactly one of models or slices"),
        (recipe({**every, "text_decoder": f"{{slices: [{{sources: [{{model: {a}, layer_range: [1, 4]}}]}}]}}"}),
         "modules.text_decoder.slices.0.sources.0.layer_range: [1, 4] goes past the module's 3 layers"),
        (recipe({**every, "text_decoder": f"{{slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}, "
                                          f"{{model: {b}, layer_range: [0, 3]}}]}}]}}"}), "every source must take the same number"),
        (f"slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}]}}]\nmerge_method: passthrough\n",
         "slices: Mistral3ForConditionalGeneration has modules text_decoder, vision_tower, multi_modal_projector: give each "
         "module's slices under modules:"),
        (recipe(every).replace("linear", "fisher") + "data: {path: x.txt}\n", "fisher needs whole models"),
        (recipe(every).replace("linear", "ties") + f"base_model: {b}\nparameters: {{trim: model}}\n", "ties: trim: model takes one"),
    ]):
        (tmp_path / f"r{i}.yaml").write_text(text)
        expect_cli_error(capsys, message, "merge", tmp_path / f"r{i}.yaml", tmp_path / f"o{i}")


def test_alignment_none_merges_without_the_note_and_the_plan_keeps_modules_apart(vlms, tmp_path, capsys):
    every = "".join(f"  {m.name}: {{models: [{{model: {vlms['a']}}}, {{model: {vlms['b']}}}]}}\n" for m in TABLE)
    out, stdout = merge_recipe(capsys, tmp_path, f"modules:\n{every}merge_method: linear\nalignment: none\n")
    assert "without alignment" not in stdout
    (tmp_path / "r2.yaml").write_text(f"modules:\n{every}merge_method: linear\n")
    plan = plan_merge(*load_recipe(tmp_path / "r2.yaml"))
    assert [sl.length for sl in plan.slices] == [TEXT_LAYERS, VISION_LAYERS, 0] and not plan.aligned
    assert len(plan.layout) == len(out) and {o.key for o in plan.layout} == set(out)
    # the plain mean in every tensor, as the same recipe with models: at the top level
    whole, _ = merge_recipe(capsys, tmp_path / "whole", f"models: [{{model: {vlms['a']}}}, {{model: {vlms['b']}}}]\n"
                                                        "merge_method: linear\n")
    assert out.keys() == whole.keys() and all(torch.equal(out[k], whole[k]) for k in out)


def _qwen2_vl_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny state dict named as Qwen2VLForConditionalGeneration's (mergekit's qwen2_vl.json): no module prefixes;
    the projector (visual.merger.) sits inside the vision tower's visual. names."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,), "lm_head.weight": (VOCAB, D),
              "visual.patch_embed.proj.weight": (DV, 3, 2, 2, 2), "visual.merger.ln_q.weight": (DV,),
              "visual.merger.mlp.0.weight": (4 * DV, 4 * DV), "visual.merger.mlp.2.weight": (D, 4 * DV)}
    for i in range(TEXT_LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"], shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (D, D), (2 * D, D)
    for i in range(VISION_LAYERS):
        shapes[f"visual.blocks.{i}.attn.qkv.weight"], shapes[f"visual.blocks.{i}.norm1.weight"] = (3 * DV, DV), (DV,)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_modules_without_prefixes_are_told_apart_by_the_longest_prefix(tmp_path, capsys):
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "num_hidden_layers": TEXT_LAYERS,
              "vision_config": {"depth": VISION_LAYERS}, "torch_dtype": "float32"}
    a, b = (_save(tmp_path / n, _qwen2_vl_state(seed), config) for n, seed in (("a", 1), ("b", 2)))
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    out, _ = merge_recipe(capsys, tmp_path / "m", f"""
modules:
  text_decoder: {{models: [{{model: {a}}}]}}
  vision_tower: {{models: [{{model: {a}, parameters: {{weight: [1, 0]}}}}, {{model: {b}, parameters: {{weight: [0, 1]}}}}]}}
  multi_modal_projector: {{models: [{{model: {b}}}]}}
merge_method: linear
""")
    assert out.keys() == sa.keys()
    for k in ("model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(out[k], sa[k])
    for k in ("visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight"):  # not vision's
        torch.testing.assert_close(out[k], sb[k])
    for i in range(VISION_LAYERS):  # t = i over the two vision blocks: a's block 0, b's block 1
        key = f"visual.blocks.{i}.attn.qkv.weight"
        torch.testing.assert_close(out[key], (sa if i == 0 else sb)[key])
    torch.testing.assert_close(out["visual.patch_embed.proj.weight"], sa["visual.patch_embed.proj.weight"])  # t = 0


def test_a_union_vocabulary_maps_the_text_decoders_rows_by_token(tmp_path, capsys):
    vocabs = {"a": ["<unk>", "x", "y", "z"], "b": ["<unk>", "z", "w", "x", "v"]}
    paths, states = {}, {}
    for seed, (name, tokens) in enumerate(vocabs.items()):
        states[name] = _mistral3_state(seed, vocab=len(tokens))
        config = _config()
        config["text_config"]["vocab_size"] = len(tokens)
        paths[name] = _save(tmp_path / name, states[name], config)
        _tokenizer(tokens, None).save_pretrained(paths[name])
    out, _ = merge_recipe(capsys, tmp_path / "m", f"""
modules:
  text_decoder: {{models: [{{model: {paths["a"]}}}, {{model: {paths["b"]}}}]}}
  vision_tower: {{models: [{{model: {paths["b"]}}}]}}
  multi_modal_projector: {{models: [{{model: {paths["a"]}}}]}}
merge_method: linear
tokenizer_source: union
""")
    union = ["<unk>", "x", "y", "z", "w", "v"]  # a's tokens, then b's new ones in b's id order
    assert json.loads((tmp_path / "m" / "out" / "config.json").read_text())["text_config"]["vocab_size"] == len(union)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        rows = {m: dict(zip(vocabs[m], states[m][key])) for m in vocabs}
        assert out[key].shape == (len(union), D)
        for u, token in enumerate(union):  # the mean of the rows that exist
            torch.testing.assert_close(out[key][u], torch.stack([rows[m][token] for m in vocabs if token in rows[m]]).mean(0))
    for key in ("vision_tower.patch_conv.weight", "multi_modal_projector.linear_1.weight"):  # untouched by the vocabulary
        torch.testing.assert_close(out[key], states["b" if key.startswith("vision") else "a"][key])


def test_a_module_slice_with_its_own_base_model_merges_against_it(vlms, tmp_path, capsys):
    s = _states(vlms)
    a, b, c = vlms["a"], vlms["b"], vlms["c"]
    out, _ = merge_recipe(capsys, tmp_path, f"""
modules:
  text_decoder:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 3], parameters: {{weight: 0.5}}}}, {{model: {b}, layer_range: [0, 3]}}]
        base_model: {b}
  vision_tower: {{models: [{{model: {a}, parameters: {{weight: 0.5}}}}]}}
  multi_modal_projector: {{models: [{{model: {a}, parameters: {{weight: 0.5}}}}]}}
merge_method: task_arithmetic
base_model: {c}
allow_unrelated_base: true
""")
    for k in out:  # the text decoder against its slice's base b, the other modules against the recipe's c (added)
        base = s["b"] if module_of(TABLE, k) is TEXT else s["c"]
        torch.testing.assert_close(out[k], base[k] + 0.5 * (s["a"][k] - base[k]))
    (tmp_path / "r2.yaml").write_text((tmp_path / "r.yaml").read_text().replace(f"base_model: {c}\n", ""))
    expect_cli_error(capsys, "modules.vision_tower: merge_method task_arithmetic needs base_model", "merge", tmp_path / "r2.yaml",
                     tmp_path / "o2")
