"""Pasted mergekit recipes: parameter precedence, gradients, filters, slices, repo ids, LoRA, mergekit's CLI."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from string import Template

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import transformers
from conftest import expect_cli_error, merge_recipe, run_cli, save_model
from safetensors.torch import load_file, save_file
from test_modules import _mistral3_state, _save
from test_tokenizer_merge import SPECIAL, VOCABS, _tokenizer
from test_tokenizer_merge import _llama as _vocab_llama

from symmerge.io.hub import hub_snapshot
from symmerge.merge.plan import tensor_parameters
from symmerge.merge.planner import plan_merge
from symmerge.merge.recipe import load_recipe
from symmerge.merge.settings import evaluate

LAYERS = 4


def _llama(layers: int = LAYERS):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=40, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """base and two fine-tunes of it (base + 1% noise), float32, 4 layers."""
    root = tmp_path_factory.mktemp("llamas")
    model = _llama()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"base": save_model(model, root / "base", base), "model": model}
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(10 + i)
        state = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}
        out[name] = save_model(model, root / name, state)
    return out


def test_gradients_interpolate_anchors_over_the_layers():
    # 3 anchors over t ∈ [0, 1]: t = 0.25 sits halfway between anchors 0 and 1, t = 0.75 between 1 and 2
    assert evaluate([0, 1, 0.5], "x", 0.0) == 0
    assert evaluate([0, 1, 0.5], "x", 0.25) == pytest.approx(0.5)
    assert evaluate([0, 1, 0.5], "x", 0.75) == pytest.approx(0.75)
    assert evaluate([0, 1, 0.5], "x", 1.0) == 0.5
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"filter": None, "value": 0.9}]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate(setting, "model.norm.weight", 0.5) == 0.9
    assert evaluate(setting[:2], "model.norm.weight", 0.5) is None  # no entry: the next scope decides


def _plan(tmp_path: Path, text: str):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(text)
    r, root = load_recipe(recipe)
    return plan_merge(r, root)


def test_per_model_slice_and_global_parameters_resolve_as_mergekit(llamas, tmp_path):
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    plan = _plan(tmp_path, f"""
models:
  - model: {a}
    parameters: {{density: [1, 0.4], weight: 0.7}}
  - model: {b}
merge_method: ties
base_model: {base}
parameters: {{density: 0.5, weight: 0.2, lambda: [1, 2, 3, 4], normalize: false}}
""")
    key = "model.layers.2.mlp.up_proj.weight"  # layer 2 of 4: t = 2/3
    s, t = plan.position(key)
    assert (s, t) == (0, pytest.approx(2 / 3))
    params, weights = tensor_parameters(plan, key, s, t, [(0, key), (1, key)])
    assert params["density"] == [pytest.approx(1 - 0.6 * 2 / 3), 0.5]  # a's own gradient; b falls back to the global 0.5
    assert weights == [0.7, 0.2]  # a's own weight, b the global default
    assert params["lambda_"] == pytest.approx(3.0)  # [1, 2, 3, 4] at t = 2/3 → anchor 2
    assert params["normalize"] is False
    # outside the layers t = 0: the first anchors
    params, _ = tensor_parameters(plan, "model.embed_tokens.weight", *plan.position("model.embed_tokens.weight"),
                                  [(0, "model.embed_tokens.weight"), (1, "model.embed_tokens.weight")])
    assert params["density"] == [1.0, 0.5] and params["lambda_"] == 1.0


def test_the_default_module_form_is_the_top_level_form_and_its_parameters_rank_between_slice_and_recipe(llamas, tmp_path, capsys):
    """mergekit's ``modules: {default: ...}`` (its own normal form for text models): the module's parameters come
    after a model's and a slice's and before the recipe's, and a filter with no entry for a tensor falls through to
    the recipe's value, as in mergekit's ConfigReader.parameter_sources."""
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    plan = _plan(tmp_path, f"""
modules:
  default:
    models:
      - model: {a}
        parameters: {{density: 0.9}}
      - model: {b}
    parameters: {{density: 0.3, lambda: [{{filter: mlp, value: 2.0}}]}}
merge_method: ties
base_model: {base}
parameters: {{density: 0.5, lambda: 0.7, weight: 1.0}}
""")
    mlp, attn = "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    params, weights = tensor_parameters(plan, mlp, *plan.position(mlp), [(0, mlp), (1, mlp)])
    assert params["density"] == [0.9, 0.3] and params["lambda_"] == 2.0 and weights == [1.0, 1.0]
    params, _ = tensor_parameters(plan, attn, *plan.position(attn), [(0, attn), (1, attn)])
    assert params["lambda_"] == 0.7  # the module's filter has no entry for attention: the recipe's value

    # the same merge written both ways gives the same tensors
    top, _ = merge_recipe(capsys, tmp_path / "top", f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: linear\n"
                                              "parameters: {weight: [1, 0.2]}\nalignment: none\n")
    mod, _ = merge_recipe(capsys, tmp_path / "mod", f"modules: {{default: {{models: [{{model: {a}}}, {{model: {b}}}], "
                                              "parameters: {weight: [1, 0.2]}}}\nmerge_method: linear\n"
                                              "parameters: {weight: 0.5}\nalignment: none\n")
    assert top.keys() == mod.keys() and all(torch.equal(top[k], mod[k]) for k in top)
    written = tmp_path / "mod" / "out" / "merge.yaml"  # the recipe as run keeps the modules form, and runs again
    assert "modules:" in written.read_text() and "module_parameters" not in written.read_text()
    again, _ = merge_recipe(capsys, tmp_path / "again", written.read_text())
    assert all(torch.equal(again[k], mod[k]) for k in mod)
    half, _ = merge_recipe(capsys, tmp_path / "half", f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: linear\n"
                                               "parameters: {weight: 0.5}\nalignment: none\n")
    assert not torch.equal(half["model.layers.3.mlp.up_proj.weight"], mod["model.layers.3.mlp.up_proj.weight"])  # control


def test_malformed_modules_forms_are_refused(llamas, tmp_path, capsys):
    a = llamas["a"]
    for text, message in [
        (f"modules: {{default: {{models: [{{model: {a}}}]}}}}\nmodels: [{{model: {a}}}]\nmerge_method: linear\n",
         "exactly one of models, slices or modules"),
        (f"modules: {{default: {{models: [{{model: {a}}}], extra: 1}}}}\nmerge_method: linear\n", "modules.default: unknown key 'extra'"),
        ("modules: {default: {parameters: {t: 0.5}}}\nmerge_method: linear\n", "modules.default: give exactly one of models or slices"),
        (f"module_parameters: {{weight: 1}}\nmodels: [{{model: {a}}}]\nmerge_method: linear\n", "module_parameters: unknown key"),
    ]:
        (tmp_path / "r.yaml").write_text(text)
        expect_cli_error(capsys, message, "merge", tmp_path / "r.yaml", tmp_path / "o")


def test_weight_gradients_and_filters_merge_the_expected_tensors(llamas, tmp_path, capsys):
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    out, _ = merge_recipe(capsys, tmp_path, f"""
models:
  - model: {llamas["a"]}
    parameters: {{weight: [1, 0]}}
  - model: {llamas["b"]}
    parameters: {{weight: [0, 1]}}
merge_method: linear
alignment: none
""")
    for i in range(LAYERS):
        key = f"model.layers.{i}.self_attn.o_proj.weight"
        t = i / (LAYERS - 1)
        torch.testing.assert_close(out[key], (1 - t) * a[key] + t * b[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["lm_head.weight"], a["lm_head.weight"])  # t = 0 outside the layers, as in mergekit

    out, _ = merge_recipe(capsys, tmp_path, f"""
models:
  - model: {llamas["a"]}
  - model: {llamas["b"]}
merge_method: slerp
base_model: {llamas["a"]}
parameters:
  t: [{{filter: self_attn, value: 0}}, {{filter: mlp, value: 1}}, {{value: 0}}]
alignment: none
""")
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(out["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(out["model.norm.weight"], a["model.norm.weight"])


def test_passthrough_slices_build_a_deeper_model(llamas, tmp_path, capsys):
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    out, stdout = merge_recipe(capsys, tmp_path, f"""
slices:
  - sources: [{{model: {llamas["a"]}, layer_range: [0, 3]}}]
  - sources: [{{model: {llamas["b"]}, layer_range: [1, 4]}}]
merge_method: passthrough
dtype: bfloat16
""")
    assert "alignment does not apply" in stdout
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    for j, (src, i) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        key = "self_attn.k_proj.weight"
        assert torch.equal(out[f"model.layers.{j}.{key}"], src[f"model.layers.{i}.{key}"].to(torch.bfloat16))
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"].bfloat16())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6


def test_slices_of_whole_models_keep_alignment_and_per_slice_parameters(llamas, tmp_path, capsys):
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    out, _ = merge_recipe(capsys, tmp_path, f"""
slices:
  - sources: [{{model: {llamas["a"]}, layer_range: [0, 2]}}, {{model: {llamas["b"]}, layer_range: [0, 2]}}]
    parameters: {{t: 0}}
  - sources: [{{model: {llamas["a"]}, layer_range: [2, 4]}}, {{model: {llamas["b"]}, layer_range: [2, 4]}}]
merge_method: slerp
base_model: {llamas["a"]}
parameters: {{t: 1}}
alignment: none
""")
    key = "self_attn.v_proj.weight"
    assert torch.equal(out[f"model.layers.1.{key}"], a[f"model.layers.1.{key}"])
    torch.testing.assert_close(out[f"model.layers.2.{key}"], b[f"model.layers.2.{key}"])


def test_a_slice_base_model_is_that_slices_base_as_in_mergekit(llamas, tmp_path, capsys):
    """mergekit's per-slice base_model: slice 1's tensors (and the final norm and head, which follow the last slice)
    take their task vectors from model a; slice 0's (and the embeddings) from the recipe's base_model. Values by hand:
    task_arithmetic is base_s + Σ_i w_i (θ_i − base_s) over the slice's other sources."""
    base, a, b = (load_file(llamas[n] / "model.safetensors") for n in ("base", "a", "b"))
    text = f"""
slices:
  - sources: [{{model: {llamas["base"]}, layer_range: [0, 2]}}, {{model: {llamas["a"]}, layer_range: [0, 2]}},
              {{model: {llamas["b"]}, layer_range: [0, 2]}}]
  - sources: [{{model: {llamas["a"]}, layer_range: [2, 4]}}, {{model: {llamas["b"]}, layer_range: [2, 4]}}]
    base_model: {llamas["a"]}
base_model: {llamas["base"]}
merge_method: task_arithmetic
parameters: {{weight: 0.3}}
"""
    out, stdout = merge_recipe(capsys, tmp_path / "a", text)
    assert "slices with their own base_model: merged slice by slice without alignment" in stdout
    for k in out:
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        if layer is not None and layer < 2 or k == "model.embed_tokens.weight":  # the recipe's base
            expected = base[k] + 0.3 * (a[k] - base[k]) + 0.3 * (b[k] - base[k])
        else:  # layers 2, 3, model.norm, lm_head: a is the base, b the one task vector
            expected = a[k] + 0.3 * (b[k] - a[k])
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6, msg=k)
    # negative control: b as slice 1's base moves exactly its tensors, to b + 0.3 (a − b) (≠ a + 0.3 (b − a))
    swapped, _ = merge_recipe(capsys, tmp_path / "b", text.replace(f"base_model: {llamas['a']}", f"base_model: {llamas['b']}"))
    key = "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(swapped[key], b[key] + 0.3 * (a[key] - b[key]), rtol=0, atol=1e-6)
    assert (swapped[key] - out[key]).abs().max() > 1e-4
    assert torch.equal(swapped["model.layers.1.mlp.up_proj.weight"], out["model.layers.1.mlp.up_proj.weight"])
    card = (tmp_path / "a" / "out" / "merge.yaml").read_text()
    assert f"base_model: {llamas['a'].resolve()}" in card


def test_slice_bases_without_a_recipe_base_and_their_refusals(llamas, tmp_path, capsys):
    """No top-level base_model: each slice's own base serves its tensors, the first slice's the embeddings (as
    mergekit plans them); mergekit's rules are kept: the base is one of the slice's sources, every slice of a
    method that needs a base has one, and a method without a base ignores it (a note)."""
    base, a, b = (load_file(llamas[n] / "model.safetensors") for n in ("base", "a", "b"))

    def src(name: str, start: int, end: int) -> str:
        return f"{{model: {llamas[name]}, layer_range: [{start}, {end}]}}"

    def recipe(first_base: str | None, method: str = "task_arithmetic", extra: str = "") -> str:
        own = f"\n    base_model: {llamas[first_base]}" if first_base else ""
        return (f"slices:\n  - sources: [{src('base', 0, 2)}, {src('a', 0, 2)}]{own}\n"
                f"  - sources: [{src('a', 2, 4)}, {src('b', 2, 4)}]\n    base_model: {llamas['b']}\n"
                f"merge_method: {method}\nparameters: {{weight: 0.5}}\n{extra}")

    out, _ = merge_recipe(capsys, tmp_path / "ok", recipe("base"))
    for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(out[k], base[k] + 0.5 * (a[k] - base[k]), rtol=0, atol=1e-6)
    for k in ("model.layers.3.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(out[k], b[k] + 0.5 * (a[k] - b[k]), rtol=0, atol=1e-6)
    (tmp_path / "r.yaml").write_text(recipe(None))
    expect_cli_error(capsys, "slices.0: merge_method task_arithmetic needs a base model for this slice too", "merge", tmp_path / "r.yaml", tmp_path / "o")
    (tmp_path / "r.yaml").write_text(recipe("b"))
    expect_cli_error(capsys, "slices.0.base_model:", "merge", tmp_path / "r.yaml", tmp_path / "o")
    expect_cli_error(capsys, "must be one of the slice's sources for task_arithmetic", "merge", tmp_path / "r.yaml", tmp_path / "o")
    (tmp_path / "r.yaml").write_text(recipe("base", extra="alignment: {symmetries: [ffn]}\n"))
    expect_cli_error(capsys, "alignment: slices with their own base_model are merged slice by slice", "merge", tmp_path / "r.yaml", tmp_path / "o")
    # linear uses no base: the slices' base_model changes nothing (mergekit never reads it), said in a note
    plain, _ = merge_recipe(capsys, tmp_path / "plain", recipe(None, "linear").replace(f"    base_model: {llamas['b']}\n", ""))
    noted, stdout = merge_recipe(capsys, tmp_path / "noted", recipe("base", "linear"))
    assert "slices.*.base_model: linear uses no base model" in stdout
    assert plain.keys() == noted.keys() and all(torch.equal(plain[k], noted[k]) for k in plain)


def test_residual_weight_is_accepted_and_changes_nothing_as_in_mergekit(llamas, tmp_path, capsys):
    """mergekit 0.1.5 declares a slice's residual_weight and never reads it: same output, with a note."""
    text = f"""
slices:
  - sources: [{{model: {llamas["a"]}, layer_range: [0, 4]}}, {{model: {llamas["b"]}, layer_range: [0, 4]}}]
merge_method: linear
alignment: none
"""
    plain, _ = merge_recipe(capsys, tmp_path / "plain", text)
    (tmp_path / "r.yaml").write_text(text.replace("layer_range: [0, 4]}]", "layer_range: [0, 4]}]\n    residual_weight: 0.3", 1))
    code, stdout, err = run_cli(capsys, "merge", tmp_path / "r.yaml", tmp_path / "weighted", "-q")
    assert code == 0, err
    assert "residual_weight: mergekit declares it but never uses it" in stdout + err
    weighted = load_file(tmp_path / "weighted" / "model.safetensors")
    assert plain.keys() == weighted.keys() and all(torch.equal(plain[k], weighted[k]) for k in plain)


def _hub_cache(root: Path, repo: str, source: Path, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return root


def test_online_downloads_fetch_only_what_a_merge_reads(monkeypatch, tmp_path):
    """Online, a repo id downloads configs, tokenizer files and safetensors weights — not a GGUF or ONNX copy of
    the same weights, nor pickled weights beside safetensors ones (no network here: the hub calls are stubbed)."""
    hf = huggingface_hub
    files = {"org/st": ["config.json", "model.safetensors", "model.gguf", "onnx/model.onnx", "pytorch_model.bin", "tokenizer.json"],
             "org/bin": ["config.json", "pytorch_model.bin", "tokenizer.model"]}
    seen = {}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf, "list_repo_files", lambda repo, revision=None: files[repo])

    def download(repo, revision=None, local_files_only=False, allow_patterns=None):
        seen[repo] = (revision, local_files_only, allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(hf, "snapshot_download", download)
    hub_snapshot("org/st@v1", "models.0.model")
    hub_snapshot("org/bin", "models.0.model")

    def fetched(repo):
        return [f for f in files[repo] if any(fnmatch.fnmatch(f, p) for p in seen[repo][2])]

    assert seen["org/st"][:2] == ("v1", False)
    assert fetched("org/st") == ["config.json", "model.safetensors", "tokenizer.json"]
    assert fetched("org/bin") == ["config.json", "pytorch_model.bin", "tokenizer.model"]
    monkeypatch.setattr(hf, "list_repo_files", lambda repo, revision=None: (_ for _ in ()).throw(OSError("no network")))
    hub_snapshot("org/st", "models.0.model")  # no listing: snapshot_download decides (from the cache if it must)
    assert seen["org/st"][2] is None


def test_repo_ids_resolve_from_the_cache_offline(llamas, tmp_path, capsys, monkeypatch):
    cache = _hub_cache(tmp_path / "hub", "someorg/tiny-a", llamas["a"])
    _hub_cache(cache, "otherorg/tiny-a", llamas["a"])  # another repo of the same name (and weights): its own model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = merge_recipe(capsys, tmp_path, """
models: [{model: someorg/tiny-a}, {model: "otherorg/tiny-a@0123456789abcdef0123456789abcdef01234567"}]
merge_method: linear
alignment: none
""")
    a = load_file(llamas["a"] / "model.safetensors")
    assert all(torch.equal(out[k], a[k]) for k in a)
    names = plan_merge(*load_recipe(tmp_path / "r.yaml")).names  # tables and the card name the repo, not the snapshot hash
    assert names == ["tiny-a", "tiny-a-2"]
    recipe = tmp_path / "missing.yaml"
    recipe.write_text("models: [{model: someorg/not-there}]\nmerge_method: linear\n")
    expect_cli_error(capsys, "someorg/not-there is not a local folder", "merge", recipe, tmp_path / "o2")


def _adapter(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _q_proj_lora(folder: Path, seed: int) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A rank-2 LoRA (alpha 8: scale 4) on layer 1's q_proj: the adapter folder and its A, B factors."""
    g = torch.Generator().manual_seed(seed)
    la, lb = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    tensors = {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": la,
               "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": lb}
    return _adapter(folder, {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj"]}, tensors), la, lb


def test_lora_adapter_is_applied_before_merging(llamas, tmp_path, capsys):
    adapter, la, lb = _q_proj_lora(tmp_path / "adapter", seed=3)
    out, _ = merge_recipe(capsys, tmp_path, f"models: [{{model: {llamas['a']}+{adapter}}}]\nmerge_method: linear\nalignment: none\n")
    a = load_file(llamas["a"] / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(out[key], a[key] + 4.0 * lb @ la)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])


def test_dora_adapter_rescales_each_row_to_its_magnitude(llamas, tmp_path, capsys):
    adapter = tmp_path / "dora"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(4)
    prefix = "base_model.model.model.layers.0.self_attn."
    la, lb, mag = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), torch.rand(32, generator=g) + 0.5
    va, vb, vmag = torch.randn(2, 32, generator=g), torch.randn(16, 2, generator=g), torch.rand(16, generator=g) + 0.5
    save_file({prefix + "q_proj.lora_A.weight": la, prefix + "q_proj.lora_B.weight": lb, prefix + "q_proj.lora_magnitude_vector": mag,
               prefix + "v_proj.lora_A.weight": va, prefix + "v_proj.lora_B.weight": vb, prefix + "v_proj.lora_magnitude_vector": vmag},
              adapter / "adapter_model.safetensors")
    out, _ = merge_recipe(capsys, tmp_path, f"models: [{{model: {llamas['a']}+{adapter}}}]\nmerge_method: linear\nalignment: none\n")
    a = load_file(llamas["a"] / "model.safetensors")
    for name, (lo_a, lo_b, m) in {"q_proj": (la, lb, mag), "v_proj": (va, vb, vmag)}.items():
        key = f"model.layers.0.self_attn.{name}.weight"
        w = a[key] + 2.0 * lo_b @ lo_a
        expected = torch.stack([m[i] * w[i] / w[i].norm() for i in range(w.shape[0])])  # row i scaled to length m_i
        torch.testing.assert_close(out[key], expected)
        torch.testing.assert_close(out[key].norm(dim=1), m)
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    # a magnitude vector missing for one adapted module: refused, naming it
    save_file({prefix + "q_proj.lora_A.weight": la, prefix + "q_proj.lora_B.weight": lb}, adapter / "adapter_model.safetensors")
    (tmp_path / "r2.yaml").write_text(f"models: [{{model: {llamas['a']}+{adapter}}}]\nmerge_method: linear\n")
    expect_cli_error(capsys, "has no lora_magnitude_vector", "merge", tmp_path / "r2.yaml", tmp_path / "o2")


def test_mergekit_command_line(llamas, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{{model: {llamas['a']}}}, {{model: {llamas['b']}}}]\nmerge_method: dare_ties\n"
                      f"base_model: {llamas['base']}\nparameters: {{density: 0.5, weight: 0.5, int8_mask: true}}\ndtype: float16\n")
    code, out, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "--cuda", "--lazy-unpickle", "--out-shard-size", "20KB",
                             "--allow-crimes", "--random-seed", "3", "--copy-tokenizer", "-q")
    assert code == 0, err
    assert "--cuda" in out and (tmp_path / "out" / "model.safetensors.index.json").exists()
    expect_cli_error(capsys, "no output directory", "merge", recipe)


def test_unknown_keys_are_refused_with_the_key(llamas, tmp_path, capsys):
    a = llamas["a"]
    for text, message in [
        (f"models: [{{model: {a}}}]\nmerge_method: linear\nmodulez: 1\n", "modulez: Extra inputs are not permitted"),
        (f"models: [{{model: {a}}}]\nmerge_method: linear\nparameters: {{weight: [{{filtr: mlp, value: 1}}]}}\n", "unknown key 'filtr'"),
        (f"slices: [{{sources: [{{model: {a}, layer_range: [0, 2], laers: 1}}]}}]\nmerge_method: passthrough\n", "laers"),
        (f"models: [{{model: {a}}}]\nslices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}]}}]\nmerge_method: linear\n", "exactly one of models"),
        (f"models: [{{model: {a}, parameters: {{t: 0.3}}}}, {{model: {llamas['b']}}}]\nmerge_method: ties\nbase_model: {a}\n", "unknown per-model parameter 't'"),
    ]:
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(text)
        expect_cli_error(capsys, message, "merge", recipe, tmp_path / "o")


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp"])
def test_default_alignment_of_fine_tunes_of_one_base_is_the_identity(llamas, tmp_path, capsys, method):
    """A pasted recipe aligns by default; for fine-tunes of one base that must change no output bit."""
    base = f"base_model: {llamas['base']}\nparameters: {{density: 0.5, weight: 0.5}}\n" if method in ("ties", "dare_ties") else ""
    text = f"models: [{{model: {llamas['a']}}}, {{model: {llamas['b']}}}]\nmerge_method: {method}\n{base}"
    aligned, stdout = merge_recipe(capsys, tmp_path / "aligned", text)
    plain, _ = merge_recipe(capsys, tmp_path / "plain", text + "alignment: none\n")
    assert aligned.keys() == plain.keys()
    assert all(torch.equal(aligned[k], plain[k]) for k in plain)
    assert "alignment: identity" in stdout


def test_sizes_are_read_as_mergekit_reads_them():
    from symmerge.errors import SymmergeError
    from symmerge.merge.recipe import parse_size

    # mergekit's parse_kmb: a bare K / M / B is thousands / millions / billions; its default "5B" is 5·10⁹ bytes
    for text, size in (("5B", 5 * 10**9), ("5b", 5 * 10**9), ("500M", 5 * 10**8), ("2K", 2000), ("1000", 1000), (1000, 1000),
                       ("0", 0), (0, 0)):
        assert parse_size(text) == size, text
    # forms mergekit refuses but that mean one thing: decimal and binary byte units, G / T alone, fractions
    for text, size in (("1G", 10**9), ("2GB", 2 * 10**9), ("20KB", 20_000), ("1GiB", 2**30), ("3MiB", 3 * 2**20), ("1T", 10**12),
                       ("1.5B", 1_500_000_000), ("0.1GB", 10**8), (" 2 gb ", 2 * 10**9)):
        assert parse_size(text) == size, text
    for text in ("lots", "5X", "-1", -1, "2 gigabytes", "0.5", "1.2.3M", "B"):
        with pytest.raises(SymmergeError, match="size"):
            parse_size(text)


def _shards(out: Path) -> list[dict]:
    index = out / "model.safetensors.index.json"
    if not index.exists():
        return [load_file(out / "model.safetensors")]
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [load_file(out / f) for f in files]


def test_out_shard_size_5B_is_one_shard_and_2K_splits_greedily(llamas, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{{model: {llamas['a']}}}, {{model: {llamas['b']}}}]\nmerge_method: linear\nalignment: none\n")
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    # mergekit's default spelling: 5·10⁹ bytes, so the whole (≈ 150 KB) model is one file (it was 5 bytes: a shard per tensor)
    for flag, size in (("--out-shard-size", "5B"), ("--out-shard-size", "0"), ("--shard-size", "500M")):
        out = tmp_path / f"o{size}"
        code, _, err = run_cli(capsys, "merge", recipe, out, flag, size, "-q")
        assert code == 0, err
        assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists(), size
    code, _, err = run_cli(capsys, "merge", recipe, tmp_path / "o2k", "--out-shard-size", "2K", "-q")
    assert code == 0, err
    shards = _shards(tmp_path / "o2k")
    assert len(shards) > 10
    sizes = [sum(nbytes(t) for t in s.values()) for s in shards]
    # the writer's rule (mergekit's): a shard holds at most 2000 bytes unless one tensor alone is larger, and a
    # new shard starts only when the next tensor would not fit
    assert all(size <= 2000 or len(s) == 1 for size, s in zip(sizes, shards))
    assert sum(len(s) for s in shards) == len(load_file(llamas["a"] / "model.safetensors"))
    expect_cli_error(capsys, "not a size: '2X'", "merge", recipe, tmp_path / "bad", "--out-shard-size", "2X")
    expect_cli_error(capsys, "disagree", "merge", recipe, tmp_path / "bad", "--out-shard-size", "5B", "--shard-size", "1GB")


def test_task_arithmetic_takes_mergekits_density_and_rescale_and_they_change_nothing(llamas, tmp_path, capsys):
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    head = f"merge_method: task_arithmetic\nbase_model: {base}\nalignment: none\n"
    plain, _ = merge_recipe(capsys, tmp_path / "plain", head + f"models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]\n")
    given, out = merge_recipe(capsys, tmp_path / "given", head + "parameters: {rescale: true, int8_mask: true}\n"
                        f"models: [{{model: {a}, parameters: {{weight: 0.5, density: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.5, density: [0.2, 0.9]}}}}]\n")
    # mergekit's task_arithmetic reads density and rescale only inside its sparsify step, which it does not have
    assert all(torch.equal(given[k], plain[k]) for k in plain)
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes.count("note: density: task_arithmetic does not sparsify task vectors (nor does mergekit's), so it changes nothing") == 1
    assert notes.count("note: rescale: task_arithmetic does not sparsify task vectors (nor does mergekit's), so it changes nothing") == 1
    assert "note: int8_mask: a mergekit memory option; task_arithmetic computes in float32 here, so it changes nothing" in notes
    # hand-computed: base + 0.5 (a − base) + 0.5 (b − base)
    sa, sb, s0 = (load_file(p / "model.safetensors") for p in (a, b, base))
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(given[k], s0[k] + 0.5 * (sa[k] - s0[k]) + 0.5 * (sb[k] - s0[k]), rtol=0, atol=1e-6)
    # values are still checked; and where mergekit sparsifies (dare_linear), density does change the result
    expect_cli_error(capsys, "density must be a number", "merge", _write(tmp_path / "bad.yaml", head + f"models: [{{model: {a}, parameters: {{density: abc}}}}]\n"),
                     tmp_path / "bad")
    dare, out = merge_recipe(capsys, tmp_path / "dare", head.replace("task_arithmetic", "dare_linear") +
                       f"models: [{{model: {a}, parameters: {{weight: 0.5, density: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.5, density: 0.3}}}}]\n"
                       "parameters: {rescale: false}\n")
    assert not torch.equal(dare[k], plain[k]) and "density:" not in out


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear",
                                    "breadcrumbs", "breadcrumbs_ties", "sce"])
def test_int8_mask_gets_the_same_note_wherever_it_changes_nothing(llamas, tmp_path, capsys, method):
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    text = f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: {method}\nbase_model: {base}\nalignment: none\n"
    plain, out = merge_recipe(capsys, tmp_path / "plain", text)
    masked, out_masked = merge_recipe(capsys, tmp_path / "int8", text + "parameters: {int8_mask: true}\n")
    note = f"note: int8_mask: a mergekit memory option; {method} computes in float32 here, so it changes nothing"
    assert out_masked.splitlines().count(note) == 1 and "note: int8_mask" not in out
    assert all(torch.equal(masked[k], plain[k]) for k in plain)


def test_karcher_ignores_recipe_weights_as_mergekit_does(llamas, tmp_path, capsys):
    from symmerge.merge.methods import karcher

    a, b = llamas["a"], llamas["b"]
    head = "merge_method: karcher\nalignment: none\n"
    weighted, out = merge_recipe(capsys, tmp_path / "w", head + f"models: [{{model: {a}, parameters: {{weight: 0.9}}}}, {{model: {b}, parameters: {{weight: 0.1}}}}]\n")
    plain, _ = merge_recipe(capsys, tmp_path / "u", head + f"models: [{{model: {a}}}, {{model: {b}}}]\n")
    # mergekit 0.1.5's karcher declares no weight and takes alphas = [1/M] * M: the weights change nothing
    assert all(torch.equal(weighted[k], plain[k]) for k in plain)
    assert out.splitlines().count("note: weight: karcher averages uniformly (1/M), as mergekit's does, so it changes nothing") == 1
    # two orthogonal vectors e1, 2·e2: the uniform Karcher mean is their geodesic midpoint (e1 + e2)/√2
    # at the mean norm (1 + 2)/2; weights (0.9, 0.1) would give another point (the negative control)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(karcher([e1, e2]), 1.5 * torch.tensor([0.5**0.5, 0.5**0.5]))
    assert not torch.allclose(karcher([e1, e2], weights=[0.9, 0.1]), karcher([e1, e2]), atol=1e-3)


def test_lora_modules_to_save_and_embedding_lora_are_applied_as_peft_merges_them(llamas, tmp_path, capsys):
    # key names as PEFT 0.21 saves them (get_peft_model(..., target_modules=[q_proj, embed_tokens], modules_to_save=[lm_head]))
    g = torch.Generator().manual_seed(5)
    head, emb = torch.randn(40, 32, generator=g), torch.randn(40, 32, generator=g)
    ea, eb = torch.randn(2, 40, generator=g), torch.randn(32, 2, generator=g)  # lora_embedding_A: r×vocab, _B: dim×r
    qa, qb = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    p = "base_model.model."
    adapter = _adapter(tmp_path / "ad", {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}, {
        p + "lm_head.weight": head, p + "model.embed_tokens.base_layer.weight": emb,
        p + "model.embed_tokens.lora_embedding_A": ea, p + "model.embed_tokens.lora_embedding_B": eb,
        p + "model.layers.0.self_attn.q_proj.lora_A.weight": qa, p + "model.layers.0.self_attn.q_proj.lora_B.weight": qb})
    out, _ = merge_recipe(capsys, tmp_path / "m", f"models: [{{model: {llamas['a']}+{adapter}}}]\nmerge_method: linear\nalignment: none\n")
    a = load_file(llamas["a"] / "model.safetensors")
    # PEFT's merge_and_unload: the modules_to_save copy replaces lm_head; the saved embedding replaces the base's and
    # its LoRA adds scale·(B A)ᵀ (scale = lora_alpha / r = 4); q_proj gets W + 4 B A
    assert torch.equal(out["lm_head.weight"], head)
    torch.testing.assert_close(out["model.embed_tokens.weight"], emb + 4.0 * (eb @ ea).T)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(out[q], a[q] + 4.0 * qb @ qa)
    assert torch.equal(out["model.norm.weight"], a["model.norm.weight"])
    # what cannot be applied is refused in one line, never ignored
    cases = [
        ({p + "score.weight": head}, {}, "matches no tensor of the model"),
        ({p + "lm_head.weight": torch.zeros(41, 32)}, {}, "has shape (41, 32), the model's (40, 32)"),
        ({p + "model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 32)}, {}, "trainable token deltas"),
        ({p + "model.layers.0.self_attn.q_proj.lora_C.weight": qa}, {}, "no LoRA tensor symmerge knows"),
        ({p + "model.layers.0.self_attn.q_proj.lora_A.weight": qa, p + "model.layers.0.self_attn.q_proj.lora_B.weight": qb},
         {"rank_pattern": {"q_proj": 4}}, "has rank 2, the config's r / rank_pattern give 4"),
        ({p + "model.layers.0.self_attn.q_proj.lora_A.weight": qa, p + "model.layers.0.self_attn.q_proj.lora_B.weight": qb},
         {"alpha_pattern": {"q_proj(": 4}}, "alpha_pattern key q_proj( is not a regular expression"),
        ({p + "model.layers.0.self_attn.q_proj.lora_A.weight": qa, p + "model.layers.0.self_attn.q_proj.lora_B.weight": qb},
         {"rank_pattern": {"q_proj": 2.5}}, "rank_pattern[q_proj] must be a positive integer"),
        ({p + "model.embed_tokens.lora_embedding_A": ea}, {}, "has no matching lora_embedding_B"),
    ]
    for i, (tensors, extra, message) in enumerate(cases):
        bad = _adapter(tmp_path / f"bad{i}", {"r": 2, "lora_alpha": 8, **extra}, tensors)
        recipe = _write(tmp_path / f"bad{i}.yaml", f"models: [{{model: {llamas['a']}+{bad}}}]\nmerge_method: linear\n")
        expect_cli_error(capsys, message, "merge", recipe, tmp_path / f"o{i}")


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_rank_and_alpha_patterns_give_each_module_its_own_scale(rslora, llamas, tmp_path, capsys):
    """PEFT's rank_pattern / alpha_pattern: a module takes the first key (in the config's order) that is its whole
    name or a dotted tail of it, as a regular expression, else r / lora_alpha; its scale is alpha / r (rsLoRA:
    alpha / √r) with its own values. Scales by hand below."""
    g = torch.Generator().manual_seed(8)
    p = "base_model.model.model."
    ranks = {"layers.0.self_attn.q_proj": 4, "layers.1.self_attn.q_proj": 2, "layers.0.self_attn.v_proj": 3, "embed_tokens": 2}
    tensors, pairs = {}, {}
    for module, r in ranks.items():
        if module == "embed_tokens":  # lora_embedding_A: r×vocab, _B: dim×r
            pairs[module] = torch.randn(r, 40, generator=g), torch.randn(32, r, generator=g)
            tensors[p + module + ".lora_embedding_A"], tensors[p + module + ".lora_embedding_B"] = pairs[module]
        else:
            pairs[module] = torch.randn(r, 32, generator=g), torch.randn(16 if "v_proj" in module else 32, r, generator=g)
            tensors[p + module + ".lora_A.weight"], tensors[p + module + ".lora_B.weight"] = pairs[module]
    config = {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_rslora": rslora,
              # "proj" names no module (a key must match a whole dotted component); "v_proj" names v_proj
              "rank_pattern": {"proj": 9, "layers.0.self_attn.q_proj": 4, "v_proj": 3},
              # the first key that matches wins: layer 0's q_proj takes 1, not 16
              "alpha_pattern": {r"model\.layers\.0\.self_attn\.q_proj": 1, "q_proj": 16}}
    adapter = _adapter(tmp_path / "ad", config, tensors)
    out, _ = merge_recipe(capsys, tmp_path / "m", f"models: [{{model: {llamas['a']}+{adapter}}}]\nmerge_method: linear\nalignment: none\n")
    a = load_file(llamas["a"] / "model.safetensors")
    alphas = {"layers.0.self_attn.q_proj": 1, "layers.1.self_attn.q_proj": 16, "layers.0.self_attn.v_proj": 8, "embed_tokens": 8}
    for module, r in ranks.items():
        scale = alphas[module] / (r**0.5 if rslora else r)
        la, lb = pairs[module]
        key = f"model.{module}.weight"
        expected = a[key] + scale * ((lb @ la).T if module == "embed_tokens" else lb @ la)
        torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6, msg=key)
    # negative control: layer 1's q_proj at the adapter-wide scale is visibly another tensor
    q1 = "model.layers.1.self_attn.q_proj.weight"
    wide = a[q1] + (8 / (2**0.5 if rslora else 2)) * pairs["layers.1.self_attn.q_proj"][1] @ pairs["layers.1.self_attn.q_proj"][0]
    assert (out[q1] - wide).abs().max() > 1e-2


def test_conv1d_lora_is_transposed_and_lora_bias_added(tmp_path, capsys):
    from conftest import _gpt2

    model, _ = _gpt2()  # n_embd 48: c_attn stored 48×144 (in×out), attn.c_proj 48×48, mlp.c_proj 192×48
    src = save_model(model, tmp_path / "gpt2")
    w = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(6)
    p = "base_model.model.transformer.h.0."
    ca, cb, cbias = torch.randn(2, 48, generator=g), torch.randn(144, 2, generator=g), torch.randn(144, generator=g)
    pa, pb = torch.randn(2, 48, generator=g), torch.randn(48, 2, generator=g)
    ma, mb = torch.randn(2, 192, generator=g), torch.randn(48, 2, generator=g)
    tensors = {p + "attn.c_attn.lora_A.weight": ca, p + "attn.c_attn.lora_B.weight": cb, p + "attn.c_attn.lora_B.bias": cbias,
               p + "attn.c_proj.lora_A.weight": pa, p + "attn.c_proj.lora_B.weight": pb,
               p + "mlp.c_proj.lora_A.weight": ma, p + "mlp.c_proj.lora_B.weight": mb}
    # PEFT sets fan_in_fan_out: true in the config it saves when it wraps a Conv1D
    adapter = _adapter(tmp_path / "ad", {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True,
                                         "lora_bias": True}, tensors)
    out, _ = merge_recipe(capsys, tmp_path / "m", f"models: [{{model: {src}+{adapter}}}]\nmerge_method: linear\nalignment: none\n")
    h = "transformer.h.0."
    # PEFT's Linear(is_target_conv_1d_layer): ΔW = transpose(B A, fan_in_fan_out) · scale (scale 2), bias += scale · b_B
    torch.testing.assert_close(out[h + "attn.c_attn.weight"], w[h + "attn.c_attn.weight"] + 2.0 * (cb @ ca).T)
    torch.testing.assert_close(out[h + "attn.c_attn.bias"], w[h + "attn.c_attn.bias"] + 2.0 * cbias)
    torch.testing.assert_close(out[h + "attn.c_proj.weight"], w[h + "attn.c_proj.weight"] + 2.0 * (pb @ pa).T)  # square: the flag
    torch.testing.assert_close(out[h + "mlp.c_proj.weight"], w[h + "mlp.c_proj.weight"] + 2.0 * (mb @ ma).T)
    assert torch.equal(out[h + "attn.c_proj.bias"], w[h + "attn.c_proj.bias"])
    # negative control: without the transpose the square c_proj would get B A, another matrix
    assert not torch.allclose(out[h + "attn.c_proj.weight"], w[h + "attn.c_proj.weight"] + 2.0 * pb @ pa, atol=1e-3)
    # DoRA on a Conv1D: refused in one line
    dora = _adapter(tmp_path / "dora", {"r": 2, "lora_alpha": 4, "use_dora": True}, {
        p + "attn.c_attn.lora_A.weight": ca, p + "attn.c_attn.lora_B.weight": cb, p + "attn.c_attn.lora_magnitude_vector": torch.ones(144)})
    recipe = _write(tmp_path / "d.yaml", f"models: [{{model: {src}+{dora}}}]\nmerge_method: linear\n")
    expect_cli_error(capsys, "DoRA on a Conv1D layer", "merge", recipe, tmp_path / "od")


# every recipe form a merge.yaml must carry: $a, $b, $base are the llamas, $hub a repo id in a stubbed cache,
# $lora an adapter, $va $vb $vc Mistral3-shaped models (multi-module)
REPRODUCED = {
    # a top-level weight is the default of every model that has none (b here): the card used to drop it
    "top-level weight": """
models: [{model: $a, parameters: {weight: 0.7}}, {model: $b}]
merge_method: linear
parameters: {weight: 0.2}
alignment: none
""",
    "top-level gradient and filter list": """
models: [{model: $a, parameters: {density: [1, 0.4]}}, {model: $b}]
merge_method: ties
base_model: $base
parameters: {density: [0.9, 0.3], lambda: [{filter: mlp, value: 2.0}, {value: 0.8}], weight: [0.3, 1]}
alignment: none
""",
    "slices with their own base_model": """
slices:
  - sources: [{model: $base, layer_range: [0, 2]}, {model: $a, layer_range: [0, 2]}, {model: $b, layer_range: [0, 2]}]
    parameters: {weight: [0.5, 0.2]}
  - sources: [{model: $a, layer_range: [2, 4]}, {model: $b, layer_range: [2, 4]}]
    base_model: $a
base_model: $base
merge_method: task_arithmetic
parameters: {weight: 0.3}
""",
    "passthrough slices": """
slices:
  - sources: [{model: $a, layer_range: [0, 3]}]
  - sources: [{model: $b, layer_range: [1, 4]}]
merge_method: passthrough
""",
    "repo id and LoRA adapter": """
models: [{model: someorg/tiny-a}, {model: $b+$lora, parameters: {weight: 2}}]
merge_method: linear
parameters: {weight: 0.5}
alignment: none
""",
    "aligned, default alignment": """
models: [{model: $a}, {model: $b}]
merge_method: linear
parameters: {weight: [1, 0.25]}
""",
    "relative paths: a module slice's own base_model, an adapter": """
modules:
  text_decoder:
    slices:
      - sources: [{model: $rva+$rlora_v, layer_range: [0, 3], parameters: {weight: 0.5}}, {model: $rvb, layer_range: [0, 3]}]
        base_model: $rvb
  vision_tower: {models: [{model: $rva, parameters: {weight: 0.5}}]}
  multi_modal_projector: {models: [{model: $rva, parameters: {weight: 0.5}}]}
merge_method: task_arithmetic
base_model: $rvc
allow_unrelated_base: true
""",
    "relative paths: slices": """
slices:
  - sources: [{model: $rbase, layer_range: [0, 2]}, {model: $ra, layer_range: [0, 2]}]
    base_model: ./$rbase
  - sources: [{model: $ra, layer_range: [2, 4]}, {model: $rb+$rlora, layer_range: [2, 4]}]
    base_model: $ra
base_model: $rbase
merge_method: task_arithmetic
parameters: {weight: 0.3}
allow_unrelated_base: true
""",
    "relative paths: tokenizer_source a model": """
models: [{model: $rtbase}, {model: $rta}, {model: $rtb}]
merge_method: linear
tokenizer_source: $rtb
alignment: none
""",
    "relative paths: tokenizer block with token sources": """
models: [{model: $rtbase}, {model: $rta}, {model: $rtb}]
merge_method: linear
tokenizer:
  source: union
  tokens:
    e: {source: {kind: zero}}
    a: {source: $rtb, force: true}
    h: {source: {kind: model_token, model: $rta, token: b}}
alignment: none
""",
    "modules": """
modules:
  text_decoder:
    models: [{model: $va, parameters: {weight: 0.25}}, {model: $vb}]
  vision_tower:
    models: [{model: $vb}]
  multi_modal_projector:
    models: [{model: $va}, {model: $vc, parameters: {weight: 0.6}}]
    parameters: {weight: 0.2}
merge_method: linear
parameters: {weight: 0.75}
""",
}


@pytest.mark.parametrize("form", sorted(REPRODUCED))
def test_the_written_merge_yaml_reproduces_the_merge_bit_for_bit(form, llamas, tmp_path, capsys, monkeypatch):
    """``symmerge merge OUT/merge.yaml OUT2`` gives OUT's tensors exactly, whatever the recipe's form: the card keeps
    every value that decides a tensor (top-level defaults, gradients, filters, slices, modules, repo ids, adapters)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "someorg/tiny-a", llamas["a"])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(5)
    lora = _adapter(tmp_path / "lora", {"r": 2, "lora_alpha": 4, "target_modules": ["v_proj"]}, {
        "base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight": torch.randn(2, 32, generator=g),
        "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight": torch.randn(16, 2, generator=g)})
    vlms = {f"v{n}": _save(tmp_path / n, _mistral3_state(seed)) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    lora_v = _adapter(tmp_path / "lora_v", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, {
        "base_model.model.language_model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.language_model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=g)})
    vocabs = {}
    for seed, (name, tokens) in enumerate(VOCABS.items()):  # three tiny LLaMAs, each with its own vocabulary
        tok = _tokenizer(tokens, SPECIAL.get(name))
        vocabs["t" + name] = save_model(_vocab_llama(len(tok), seed), tmp_path / f"vocab-{name}")
        tok.save_pretrained(tmp_path / f"vocab-{name}")
    paths = {"a": llamas["a"], "b": llamas["b"], "base": llamas["base"], "lora": lora, "lora_v": lora_v, **vlms, **vocabs}
    # relative to the recipe's folder (tmp_path/one), which a merge.yaml in tmp_path/one/out is not in
    relative = {"r" + k: os.path.relpath(v, tmp_path / "one") for k, v in paths.items()}
    text = Template(REPRODUCED[form]).substitute(**paths, **relative)
    first, _ = merge_recipe(capsys, tmp_path / "one", text)
    code, _, err = run_cli(capsys, "merge", tmp_path / "one" / "out" / "merge.yaml", tmp_path / "two", "-q")  # run where it lies
    assert code == 0, err
    again = load_file(tmp_path / "two" / "model.safetensors")
    assert first.keys() == again.keys()
    assert [k for k in first if not torch.equal(first[k], again[k])] == []
    # and the recipe as run is a fixed point: the second merge.yaml is the first
    assert (tmp_path / "two" / "merge.yaml").read_text() == (tmp_path / "one" / "out" / "merge.yaml").read_text()


def test_final_norm_and_head_take_as_many_of_the_last_slices_sources_as_the_first_slice_has(llamas, tmp_path, capsys):
    """mergekit 0.1.5 (plan.py, plan_module) merges the tensors after the layers from the last slice's models zipped
    with the first slice's count of tensor names: the last slice's first min(len(first), len(last)) sources."""
    base, a, b = (load_file(llamas[n] / "model.safetensors") for n in ("base", "a", "b"))
    out, _ = merge_recipe(capsys, tmp_path / "wider", f"""
slices:
  - sources: [{{model: {llamas["a"]}, layer_range: [0, 2]}}, {{model: {llamas["base"]}, layer_range: [0, 2]}}]
  - sources: [{{model: {llamas["b"]}, layer_range: [2, 4], parameters: {{weight: 0.3}}}},
              {{model: {llamas["a"]}, layer_range: [1, 3], parameters: {{weight: 0.5}}}},
              {{model: {llamas["base"]}, layer_range: [2, 4], parameters: {{weight: 0.2}}}}]
merge_method: linear
""")
    for k in ("model.norm.weight", "lm_head.weight"):  # b and a only (weights 0.3, 0.5, normalised): base is dropped
        torch.testing.assert_close(out[k], (0.3 * b[k] + 0.5 * a[k]) / 0.8, rtol=0, atol=1e-6, msg=k)
        assert (out[k] - (0.3 * b[k] + 0.5 * a[k] + 0.2 * base[k])).abs().max() > 1e-5  # negative control: all three
    layer = "model.layers.3.mlp.up_proj.weight"  # the layers keep all three
    torch.testing.assert_close(out[layer], 0.3 * b[layer] + 0.5 * a["model.layers.2.mlp.up_proj.weight"] + 0.2 * base[layer],
                               rtol=0, atol=1e-6)
    # a narrower last slice keeps all of its sources
    out, _ = merge_recipe(capsys, tmp_path / "narrower", f"""
slices:
  - sources: [{{model: {llamas["a"]}, layer_range: [0, 2]}}, {{model: {llamas["base"]}, layer_range: [0, 2]}},
              {{model: {llamas["b"]}, layer_range: [0, 2]}}]
  - sources: [{{model: {llamas["b"]}, layer_range: [2, 4]}}, {{model: {llamas["a"]}, layer_range: [2, 4]}}]
merge_method: linear
""")
    torch.testing.assert_close(out["model.norm.weight"], (b["model.norm.weight"] + a["model.norm.weight"]) / 2, rtol=0, atol=1e-6)
    # a base model past those sources: mergekit stops ("Base input is not present in merge inputs"); so does symmerge
    _write(tmp_path / "dropped.yaml", f"""
slices:
  - sources: [{{model: {llamas["a"]}, layer_range: [0, 2]}}, {{model: {llamas["base"]}, layer_range: [0, 2]}}]
  - sources: [{{model: {llamas["b"]}, layer_range: [2, 4]}}, {{model: {llamas["a"]}, layer_range: [1, 3]}},
              {{model: {llamas["base"]}, layer_range: [2, 4]}}]
base_model: {llamas["base"]}
merge_method: task_arithmetic
""")
    expect_cli_error(capsys, "slices.1: the final norm and head merge from the last slice's first 2 sources", "merge",
                     tmp_path / "dropped.yaml", tmp_path / "o")


def test_a_model_repeated_in_one_slice_or_models_list_is_refused_as_mergekit_does(llamas, tmp_path, capsys):
    # mergekit 0.1.5 refuses each of these before merging ("Duplicate merge inputs for default.slices[0]"): it keys a
    # tensor's inputs by model. symmerge used to count A twice in models: (0.8 a + 0.2 b) but once in slices: ((a + b) / 2)
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    a_ = f"{a}/../{a.name}"  # the same folder, spelled otherwise: still the same model
    vlm_a, vlm_b = _save(tmp_path / "va", _mistral3_state(1)), _save(tmp_path / "vb", _mistral3_state(2))
    vlm = f"modules: {{text_decoder: {{models: [{{model: {vlm_a}}}, {{model: {vlm_b}}}, {{model: {vlm_a}}}]}}, " + \
          "".join(f"{m}: {{models: [{{model: {vlm_a}}}, {{model: {vlm_b}}}]}}, " for m in ("vision_tower", "multi_modal_projector"))
    for text, message in [
        (f"models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {a_}, parameters: {{weight: 0.3}}}}, "
         f"{{model: {b}, parameters: {{weight: 0.2}}}}]\nmerge_method: linear\nalignment: none\n",
         f"models.0 and models.1 are both {a.resolve()}: a tensor takes one input per model"),
        (f"slices: [{{sources: [{{model: {a}, layer_range: [0, 4]}}, {{model: {b}, layer_range: [0, 4]}}, "
         f"{{model: {a}, layer_range: [0, 4]}}]}}]\nmerge_method: linear\nalignment: none\n", "slices.0.sources.0 and slices.0.sources.2"),
        (f"slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {a}, layer_range: [2, 4]}}]}}]\n"
         "merge_method: linear\nalignment: none\n", "slices.0.sources.0 and slices.0.sources.1"),  # other layers of it too
        (f"models: [{{model: {base}}}, {{model: {a}}}, {{model: {base}}}]\nbase_model: {base}\nmerge_method: task_arithmetic\n"
         "alignment: none\n", "models.0 and models.2"),
        (vlm[:-2] + "}\nmerge_method: linear\n", "modules.text_decoder.models.0 and modules.text_decoder.models.2"),
    ]:
        (tmp_path / "r.yaml").write_text(text)
        expect_cli_error(capsys, message, "merge", tmp_path / "r.yaml", tmp_path / "o")

    # listed once with the sum of its weights: A's share by hand; a model in two slices and the base named in models
    # and as base_model are not repeats
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    out, _ = merge_recipe(capsys, tmp_path / "once", f"""
models: [{{model: {a}, parameters: {{weight: 0.8}}}}, {{model: {b}, parameters: {{weight: 0.2}}}}]
merge_method: linear
alignment: none
""")
    key = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(out[key], 0.8 * ta[key] + 0.2 * tb[key], rtol=1e-6, atol=1e-7)
    out, _ = merge_recipe(capsys, tmp_path / "twice", f"""
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]
  - sources: [{{model: {a}, layer_range: [2, 4]}}, {{model: {b}, layer_range: [2, 4]}}]
merge_method: linear
alignment: none
""")
    torch.testing.assert_close(out[key], (ta[key] + tb[key]) / 2, rtol=1e-6, atol=1e-7)
    merge_recipe(capsys, tmp_path / "base", f"models: [{{model: {base}}}, {{model: {a}}}]\nbase_model: {base}\n"
                 "merge_method: task_arithmetic\nalignment: none\n")


def test_mergekits_written_configs_booleans_and_yaml11_exponents_read_as_mergekit_reads_them(llamas, tmp_path, capsys):
    """mergekit reads every setting as a number, word or gradient, so the configs it writes (an output's
    mergekit_config.yml, model cards) say ``normalize: 1.0``; and PyYAML reads ``tol: 1e-5`` (no dot) as a word, which
    mergekit's pydantic fields read as a number. Both merge as mergekit merges them; other values are still refused."""
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    head = f"models: [{{model: {a}, parameters: {{weight: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.6}}}}]\nbase_model: {base}\nalignment: none\n"
    written, _ = merge_recipe(capsys, tmp_path / "written", head + "merge_method: della_linear\nparameters: {normalize: 1.0, int8_mask: 1.0, rescale: 0.0}\n")
    given, _ = merge_recipe(capsys, tmp_path / "given", head + "merge_method: della_linear\nparameters: {normalize: true, int8_mask: true, rescale: false}\n")
    assert all(torch.equal(written[k], given[k]) for k in given)
    words, _ = merge_recipe(capsys, tmp_path / "words", head + "merge_method: karcher\nparameters: {tol: 1e-5, max_iter: 1e1}\n")
    numbers, _ = merge_recipe(capsys, tmp_path / "numbers", head + "merge_method: karcher\nparameters: {tol: 1.0e-5, max_iter: 10}\n")
    assert all(torch.equal(words[k], numbers[k]) for k in numbers)
    for params, message in (("{normalize: 0.5}", "della_linear: normalize must be true or false, got 0.5"),
                            ("{normalize: 2}", "della_linear: normalize must be true or false, got 2"),
                            ("{lambda: 1e-5x}", "della_linear: lambda must be a number, got '1e-5x'")):
        expect_cli_error(capsys, message, "merge", _write(tmp_path / "bad.yaml", head + f"merge_method: della_linear\nparameters: {params}\n"), tmp_path / "bad")


def test_a_recipe_of_the_base_alone_writes_the_base_as_mergekits_task_arithmetic_does(llamas, tmp_path, capsys):
    """A published "LoRA-blation": base_model M+L and one source M+L. The engine drops base_model from the inputs
    (as mergekit does), so no task vector is left, and mergekit's task-arithmetic methods return the base: M with
    the adapter applied."""
    adapter, la, lb = _q_proj_lora(tmp_path / "adapter", seed=5)
    m = f"{llamas['a']}+{adapter}"
    a = load_file(llamas["a"] / "model.safetensors")
    for method in ("task_arithmetic", "ties", "della_linear"):
        out, _ = merge_recipe(capsys, tmp_path / method, f"base_model: {m}\nmerge_method: {method}\nparameters: {{normalize: false}}\n"
                              f"slices:\n- sources:\n  - layer_range: [0, {LAYERS}]\n    model: {m}\n    parameters: {{weight: 1.0}}\n")
        key = "model.layers.1.self_attn.q_proj.weight"
        torch.testing.assert_close(out[key], a[key] + 4.0 * lb @ la)
        assert all(torch.equal(out[k], a[k]) for k in a if k != key)


def test_mergekit_keys_its_configuration_ignores_are_dropped_with_a_note_typos_refused(llamas, tmp_path, capsys):
    """A method parameter at the top level (``normalize: true`` beside ``merge_method: model_stock``, as a published
    recipe has it) and mergekit-mega's document ``name`` change nothing in mergekit-yaml, which ignores keys it does
    not know: both merge with a note. A key that is no parameter of any method is still a typo, refused."""
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    text = f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: model_stock\nbase_model: {base}\nalignment: none\n"
    plain, out = merge_recipe(capsys, tmp_path / "plain", text)
    pasted, out_pasted = merge_recipe(capsys, tmp_path / "pasted", "name: First\n" + text + "normalize: true\nt: 0.3\n")
    assert all(torch.equal(pasted[k], plain[k]) for k in plain) and "note:" not in out
    notes = [line for line in out_pasted.splitlines() if line.startswith("note:")]
    assert "note: normalize: a method parameter at the top level, where mergekit ignores it: ignored here too (parameters go under parameters:)" in notes
    assert "note: t: a method parameter at the top level, where mergekit ignores it: ignored here too (parameters go under parameters:)" in notes
    assert any(n.startswith("note: name: 'First' names a document of a mergekit-mega file") for n in notes)
    expect_cli_error(capsys, "normalise: Extra inputs are not permitted", "merge", _write(tmp_path / "typo.yaml", text + "normalise: true\n"), tmp_path / "o")


def test_an_old_examples_pattern_key_and_a_mergekit_mega_file_are_refused_in_one_line_saying_what_to_do(llamas, tmp_path, capsys):
    a, b = llamas["a"], llamas["b"]
    text = f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: slerp\nalignment: none\n"
    expect_cli_error(capsys, "unknown key 'pattern' in a filtered value (keys: filter, value): write filter (mergekit ignores pattern",
                     "merge", _write(tmp_path / "p.yaml", text + "parameters: {t: [{pattern: mlp, value: 0.3}, {value: 0.5}]}\n"), tmp_path / "o")
    expect_cli_error(capsys, "expected a single document in the stream: but found another document (several YAML documents: a mergekit-mega file?",
                     "merge", _write(tmp_path / "mega.yaml", text + "parameters: {t: 0.5}\n---\n" + text), tmp_path / "o")


def test_a_base_model_the_models_do_not_list_is_an_interpolations_endpoint_as_in_mergekit(llamas, tmp_path, capsys):
    """mergekit adds base_model to the models when they do not list it, so `base_model: B` + `models: [A]` with
    slerp is the SLERP from B (t = 0) to A — the same merge as listing both (a published multi-stage recipe)."""
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    head = f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.45}}\nalignment: none\n"
    unlisted, _ = merge_recipe(capsys, tmp_path / "unlisted", head + f"models: [{{model: {a}}}]\n")
    listed, _ = merge_recipe(capsys, tmp_path / "listed", head + f"models: [{{model: {base}}}, {{model: {a}}}]\n")
    assert all(torch.equal(unlisted[k], listed[k]) for k in listed)
    s0, sa = (load_file(p / "model.safetensors") for p in (base, a))
    k = "model.layers.1.mlp.down_proj.weight"
    assert (unlisted[k] - s0[k]).norm() < (unlisted[k] - sa[k]).norm()  # t = 0.45: nearer the base
    expect_cli_error(capsys, "slerp: merges exactly 2 models, got 3 (counting base_model, which mergekit adds to models that do not list it)",
                     "merge", _write(tmp_path / "three.yaml", head + f"models: [{{model: {a}}}, {{model: {b}}}]\n"), tmp_path / "o")


def test_parameters_of_other_methods_that_ask_for_nothing_are_noted_and_ignored_as_in_mergekit(llamas, tmp_path, capsys):
    """mergekit reads only the parameters its method declares; published recipes carry others (normalize on
    multislerp and sce, mergekit-evolve's smooth and allow_negative_weights, a per-model density on sce)."""
    a, b, base = llamas["a"], llamas["b"], llamas["base"]
    models = f"models: [{{model: {a}, parameters: {{weight: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.7}}}}]\nalignment: none\n"
    plain, _ = merge_recipe(capsys, tmp_path / "ms", models + "merge_method: multislerp\n")
    given, out = merge_recipe(capsys, tmp_path / "ms_n", models + "merge_method: multislerp\nparameters: {normalize: true}\n")
    assert all(torch.equal(given[k], plain[k]) for k in plain)
    assert "note: normalize: not a parameter of multislerp; mergekit ignores it, and so does symmerge (multislerp's own is normalize_weights)" in out
    sce = f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: sce\nbase_model: {base}\nalignment: none\n"
    plain, _ = merge_recipe(capsys, tmp_path / "sce", sce + "parameters: {select_topk: 0.5}\n")
    extra = sce.replace(f"{{model: {a}}}", f"{{model: {a}, parameters: {{density: 0.9}}}}")
    flags = "lambda: 1.0, rescale: true, smooth: false, allow_negative_weights: false"
    given, out = merge_recipe(capsys, tmp_path / "sce_x", extra + f"parameters: {{select_topk: 0.5, {flags}}}\n")
    assert all(torch.equal(given[k], plain[k]) for k in plain)
    for key in ("lambda", "rescale", "smooth", "allow_negative_weights", "density"):
        assert f"note: {key}: not a parameter of sce; mergekit ignores it, and so does symmerge" in out
    # a shared value that would change a result where the parameter exists is refused (the user expects its effect)
    for bad, message in [("lambda: 2", "sce: unknown parameter 'lambda'"), ("smooth: 0.5", "sce: unknown parameter 'smooth'"),
                         ("selct_topk: 0.5", "sce: unknown parameter 'selct_topk'")]:
        expect_cli_error(capsys, message, "merge", _write(tmp_path / "bad.yaml", sce + f"parameters: {{{bad}}}\n"), tmp_path / "o")


def test_mergekit_model_prefix_and_a_top_level_pad_to_multiple_of_are_read_as_mergekit_reads_them(llamas, tmp_path, capsys):
    """`tokenizer_source: model:PATH` (mergekit's README, recipes of 2024) is the model at PATH; `pad_to_multiple_of`
    at the top level, where mergekit ignores it, is ignored with a note."""
    a, b = (tmp_path / "a", tmp_path / "b")
    for name, folder in (("a", a), ("b", b)):  # the fixture's fine-tunes, with one 40-token vocabulary
        save_model(llamas["model"], folder, load_file(llamas[name] / "model.safetensors"))
        _tokenizer([f"w{i}" for i in range(40)], None).save_pretrained(folder)
    head = f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: linear\nalignment: none\n"
    plain, _ = merge_recipe(capsys, tmp_path / "plain", head + f"tokenizer_source: {b}\n")
    prefixed, _ = merge_recipe(capsys, tmp_path / "prefixed", head + f"tokenizer_source: model:{b}\n")
    block, _ = merge_recipe(capsys, tmp_path / "block", head + f"tokenizer: {{source: 'model:{b}'}}\n")
    padded, out = merge_recipe(capsys, tmp_path / "padded", head + f"tokenizer_source: {b}\npad_to_multiple_of: 8\n")
    assert all(torch.equal(prefixed[k], plain[k]) and torch.equal(block[k], plain[k]) and torch.equal(padded[k], plain[k]) for k in plain)
    assert "note: pad_to_multiple_of: a tokenizer: key at the top level, where mergekit ignores it: ignored here too (write it under tokenizer:)" in out
    expect_cli_error(capsys, "dype: Extra inputs are not permitted, got 'float32' (did you mean dtype?)", "merge",
                     _write(tmp_path / "typo.yaml", head + "dype: float32\n"), tmp_path / "o")


@pytest.mark.parametrize("method, params", [("nearswap", "parameters: {t: 0.001}\n"), ("arcee_fusion", "")])
def test_base_anchored_methods_note_the_per_model_weight_they_do_not_read(llamas, tmp_path, capsys, method, params):
    """nearswap and arcee_fusion (mergekit's have no weight parameter) read no per-model weight: a published recipe
    that gives one merges as without it, and the user is told so once instead of silently (it was dropped unnoted)."""
    a, base = llamas["a"], llamas["base"]
    head = f"merge_method: {method}\nbase_model: {base}\nalignment: none\n{params}"
    weighted, out = merge_recipe(capsys, tmp_path / "w", head + f"models: [{{model: {a}, parameters: {{weight: 0.3}}}}]\n")
    plain, out_plain = merge_recipe(capsys, tmp_path / "u", head + f"models: [{{model: {a}}}]\n")
    assert all(torch.equal(weighted[k], plain[k]) for k in plain)
    note = f"note: weight: {method} takes no per-model weight (mergekit's has none), so it changes nothing"
    assert out.splitlines().count(note) == 1 and "note: weight" not in out_plain
