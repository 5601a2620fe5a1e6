"""Hostile inputs the other reliability tests do not reach: quantised weights, data files that do not fit the
model, output files of ``barrier``, odd numbers and odd paths. Every case is a one-line ``error:`` with exit 2
(or a success), never an ``internal error`` or an exit code that reads like an interruption, and never an output
or a changed input left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import expect_cli_error, make_model, run_cli, save_model, stray_folders
from safetensors.torch import load_file, save_file

from symmerge.errors import SymmergeError
from symmerge.io.output import check_output_dir
from symmerge.merge import engine

ST = "model.safetensors"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Tiny models: two LLaMAs, LLaMAs of another hidden size / depth / vocabulary, a LLaMA with a tied LM head, a GPT-2
    (32 positions), a ViT."""
    root = tmp_path_factory.mktemp("hostile")

    def llama(name, seed=0, **changes):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                          "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64, **changes})
        return save_model(transformers.LlamaForCausalLM(cfg), root / name)

    paths = {"a": llama("a"), "b": llama("b", 1), "wide": llama("wide", 2, hidden_size=48), "deep": llama("deep", 3, num_hidden_layers=3),
             "vocab": llama("vocab", 4, vocab_size=80), "tied": llama("tied", 5, tie_word_embeddings=True)}
    paths["gpt2"] = save_model(make_model("gpt2")[0], root / "gpt2")
    paths["vit"] = save_model(make_model("vit")[0], root / "vit")
    tokens = root / "tokens.npz"
    np.savez(tokens, inputs=np.random.default_rng(0).integers(0, 64, (20, 8)))
    paths["tokens"] = tokens
    return paths


def copy(zoo, name, tmp_path, new=None) -> Path:
    return Path(shutil.copytree(zoo[name], tmp_path / (new or name)))


def restate(model_dir: Path, change) -> Path:
    state = load_file(model_dir / ST)
    save_file(change(state) or state, model_dir / ST, metadata={"format": "pt"})
    return model_dir


def npz(tmp_path, name="d.npz", **arrays) -> Path:
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


def fails_cleanly(capsys, message, *args, out: Path | None = None) -> str:
    err = expect_cli_error(capsys, message, *args)
    if out is not None:
        assert not out.exists() and stray_folders(out.parent) == []
    return err


# ------------------------------------------------------------------------------ quantised and odd weight files


def test_float8_weights_are_refused_by_merge_and_aligned_by_align(zoo, tmp_path, capsys):
    """Float8 has no aminmax nor (on the CPU) isfinite: the finite check was an internal error; merging float8
    (quantised, scales elsewhere) is refused in one line."""
    f8 = restate(copy(zoo, "b", tmp_path), lambda s: {k: v.to(torch.float8_e4m3fn) for k, v in s.items()})
    fails_cleanly(capsys, "float8 weights are quantised", "merge", zoo["a"], f8, "-m", "linear", "-o", tmp_path / "m", "-q",
                  out=tmp_path / "m")
    code, _, err = run_cli(capsys, "align", zoo["a"], f8, "-o", tmp_path / "al", "-q")
    assert code == 0, err


def test_float8_nan_is_found(zoo, tmp_path, capsys):
    def poison(s):
        s = {k: v.to(torch.float8_e4m3fn) for k, v in s.items()}
        s["model.norm.weight"][0] = float("nan")
        return s

    bad = restate(copy(zoo, "b", tmp_path), poison)
    fails_cleanly(capsys, "holds NaN or Inf", "align", zoo["a"], bad, "-o", tmp_path / "o", "-q", out=tmp_path / "o")


def test_integer_tensor_in_a_symmetry_group_is_refused(zoo, tmp_path, capsys):
    """An int8 projection (a quantised checkpoint) inside an FFN group was an internal KeyError after alignment."""
    key = "model.layers.0.mlp.up_proj.weight"
    i8 = restate(copy(zoo, "b", tmp_path), lambda s: s.update({key: (s[key] * 100).to(torch.int8)}))
    for cmd, message in ((["merge", zoo["a"], i8, "-m", "linear"], f"cannot merge a torch.int8 tensor (tensor {key!r})"),  # before aligning
                         (["align", zoo["a"], i8], f"tensor {key!r} is I8, not floating point")):
        err = fails_cleanly(capsys, message, *cmd, "-o", tmp_path / "o", "-q", out=tmp_path / "o")
        assert "dequantise" in err


def test_integer_model_merged_unaligned_is_refused(zoo, tmp_path, capsys):
    i8 = restate(copy(zoo, "b", tmp_path), lambda s: {k: (v * 100).to(torch.int8) for k, v in s.items()})
    fails_cleanly(capsys, "cannot merge a torch.int8 tensor", "merge", zoo["a"], i8, "-m", "linear", "-s", "none", "-o", tmp_path / "o",
                  "-q", out=tmp_path / "o")


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("quantised", ["model.norm.weight", "all"])
def test_integer_tensors_are_refused_whichever_model_holds_them(zoo, tmp_path, capsys, position, quantised):
    """An int8 tensor no symmetry group touches (a norm, or every tensor with -s none) was copied from model 0 into
    the output without a word (an int8 "merge" of a whole quantised model was model 0 as it was), while the same
    tensor in model 1 was refused: it is refused in either place now."""
    def quantise(s):
        return {k: (v * 100 + torch.randn_like(v)).to(torch.int8) if quantised in (k, "all") else v for k, v in s.items()}

    i8 = restate(copy(zoo, "b", tmp_path), quantise)
    models = [zoo["a"], i8] if position == 1 else [i8, zoo["a"]]
    key = "model.norm.weight" if quantised != "all" else ""
    fails_cleanly(capsys, f"cannot merge a torch.int8 tensor (tensor '{key}", "merge", *models, "-m", "linear", "-s",
                  "all" if key else "none", "-o", tmp_path / "o", "-q", out=tmp_path / "o")


def test_integer_tensors_are_refused_before_anything_is_aligned(zoo, tmp_path, capsys, monkeypatch):
    """The refusal comes from the headers and the integer tensors alone, before the alignment (minutes at 7B) runs."""
    i8 = restate(copy(zoo, "b", tmp_path), lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.int8)}))

    def no_alignment(*args, **kwargs):
        raise AssertionError("the alignment ran before the integer tensor was refused")

    monkeypatch.setattr(engine, "fit_alignments", no_alignment)
    monkeypatch.setattr(engine, "align_whole_models", no_alignment)
    fails_cleanly(capsys, "cannot merge a torch.int8 tensor (tensor 'model.norm.weight')", "merge", zoo["a"], i8, "-m", "linear",
                  "-s", "all", "-o", tmp_path / "o", "-q", out=tmp_path / "o")


def test_integer_buffers_the_models_share_are_copied(zoo, tmp_path, capsys):
    """Integer and boolean tensors every model holds alike (position ids, masks) are buffers, not weights: the output
    takes them as they are, in their dtype."""
    buffers = {"model.position_ids": torch.arange(64)[None], "model.causal_mask": torch.ones(8, 8, dtype=torch.bool).tril()}
    a, b = (restate(copy(zoo, name, tmp_path), lambda s: s.update(buffers)) for name in ("a", "b"))
    code, _, err = run_cli(capsys, "merge", a, b, "-m", "linear", "-o", tmp_path / "o", "-q")
    assert code == 0, err
    merged = load_file(tmp_path / "o" / ST)
    assert all(merged[k].dtype == v.dtype and torch.equal(merged[k], v) for k, v in buffers.items())


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty (0 bytes)"),
    ("zip-cut", "corrupt or truncated"),  # was: "in the legacy (pre-1.6, non-zip) torch pickle format"
])
def test_broken_pickle_weights_are_named_as_they_are(zoo, tmp_path, capsys, content, message):
    d = copy(zoo, "b", tmp_path)
    state = load_file(d / ST)
    (d / ST).unlink()
    if content == "zip-cut":
        torch.save(state, d / "pytorch_model.bin")
        data = (d / "pytorch_model.bin").read_bytes()
        content = data[: len(data) // 3]
    (d / "pytorch_model.bin").write_bytes(content)
    err = fails_cleanly(capsys, message, "inspect", d, "--allow-pickle")
    assert "legacy" not in err


def _zero_bytes(d):
    (d / ST).write_bytes(b"")


def _wrong_shape_header(d):
    raw = (d / ST).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = "model.norm.weight"
    header[key]["shape"] = [header[key]["shape"][0] * 2]
    encoded = json.dumps(header).encode()
    (d / ST).write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n:])


def _only_config(d):
    (d / ST).unlink()


def _config_list(d):
    (d / "config.json").write_text("[1, 2]")


def _config_null(d):
    (d / "config.json").write_text("null")


def _config_folder(d):
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def _config_kv_heads_do_not_divide(d):  # was an error naming no model: which of the two was broken?
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))


def _config_states_more_layers(d):  # named no model ("tensor ... is missing"), and -s none wrote a config of 3 layers over 2
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))


def _config_states_fewer_layers(d):  # the second layer's tensors were "extra" tensors of no named model
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))


def _index_outside(target):
    def setup(d):
        state = load_file(d / ST)
        shutil.copy(d / ST, d.parent / "x.safetensors")
        (d / ST).unlink()
        shard = str(d.parent / "x.safetensors") if target == "absolute" else "../x.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(state, shard)}))
    return setup


def _empty_weight_map(d):
    (d / ST).unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))


def _duplicate_across_shards(d):
    state = load_file(d / ST)
    (d / ST).unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:6]}, d / "a.safetensors")
    save_file({k: state[k] for k in keys[5:]}, d / "b.safetensors")
    weight_map = dict.fromkeys(keys[:6], "a.safetensors") | dict.fromkeys(keys[6:], "b.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _scalar_tensor(d):
    restate(d, lambda s: s.update({"model.extra_scalar": torch.tensor(1.5)}))


def _empty_tensor(d):
    restate(d, lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(0, 32)}))


@pytest.mark.parametrize("setup, message", [
    (_zero_bytes, "header too small (the file is corrupt or truncated)"),
    (_wrong_shape_header, "invalid shape, data type, or offset"),
    (_only_config, "has no model.safetensors"),
    (_config_list, "config.json does not hold a JSON object"),
    (_config_null, "config.json does not hold a JSON object"),
    (_config_folder, "has no config.json"),
    (_config_kv_heads_do_not_divide, "config.json: 4 attention heads cannot be grouped over 3 key/value heads: the config of model"),
    (_config_states_more_layers, "config.json has num_hidden_layers = 3, but the tensor names hold 2 layers (model.layers.0…1): "
                                 "the config does not match the weights"),
    (_config_states_fewer_layers, "config.json has num_hidden_layers = 1, but the tensor names hold 2 layers"),
    (_index_outside("absolute"), "must name a shard file in"),
    (_index_outside("parent"), "must name a shard file in"),
    (_empty_weight_map, "needs a non-empty \"weight_map\""),
    (_duplicate_across_shards, "is in both a.safetensors and b.safetensors"),
    (_scalar_tensor, "has an extra tensor 'model.extra_scalar'"),
    (_empty_tensor, "has shape (0, 32) in model"),
], ids=lambda x: getattr(x, "__name__", "")[1:] if callable(x) else None)
def test_broken_model_folders(zoo, tmp_path, capsys, setup, message):
    d = copy(zoo, "b", tmp_path)
    setup(d)
    fails_cleanly(capsys, message, "merge", zoo["a"], d, "-m", "linear", "-o", tmp_path / "o", "-q", out=tmp_path / "o")


@pytest.mark.parametrize("other, message", [
    ("wide", "tensor 'lm_head.weight' has shape (64, 48)"),
    ("deep", "has an extra tensor 'model.layers.2."),
    ("vocab", "tensor 'lm_head.weight' has shape (80, 32)"),
    ("gpt2", "are not the same architecture: they share 0 of"),
])
@pytest.mark.parametrize("command", ["merge", "distance"])
def test_models_that_do_not_match(zoo, tmp_path, capsys, other, message, command):
    args = ["merge", zoo["a"], zoo[other], "-m", "linear", "-o", tmp_path / "o", "-q"] if command == "merge" else ["distance", zoo["a"], zoo[other]]
    fails_cleanly(capsys, message, *args, out=tmp_path / "o" if command == "merge" else None)


def test_a_single_file_wins_over_a_stale_index_as_in_transformers(zoo, tmp_path, capsys):
    """A folder re-saved unsharded over a sharded save keeps the old index beside model.safetensors. transformers
    loads model.safetensors; symmerge read the index and refused the folder ("names model-00001-of-00002.safetensors,
    which is missing")."""
    d = copy(zoo, "b", tmp_path)
    state = load_file(d / ST)
    weight_map = dict.fromkeys(state, "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, _, err = run_cli(capsys, "merge", zoo["a"], d, "-m", "linear", "-s", "none", "-o", tmp_path / "o", "-q")
    assert code == 0, err
    merged, a = load_file(tmp_path / "o" / ST), load_file(zoo["a"] / ST)
    assert all(torch.allclose(merged[k], (a[k] + state[k]) / 2) for k in state)
    assert transformers.AutoModelForCausalLM.from_pretrained(d) is not None  # what transformers reads, too


@pytest.mark.parametrize("command", ["merge", "distance"])
def test_a_task_head_model_against_its_bare_base_model_names_the_prefix(zoo, tmp_path, capsys, command):
    """A model saved with AutoModelFor... (names under ``model.``) against one saved with AutoModel (no prefix) shares
    no tensor name: the error says so, and that the prefix is why. Other families get no such hint."""
    cfg = transformers.AutoConfig.from_pretrained(zoo["a"])
    bare = save_model(transformers.LlamaModel(cfg), tmp_path / "bare")
    for pair in ((zoo["a"], bare), (bare, zoo["a"])):
        args = ["merge", *pair, "-m", "linear", "-o", tmp_path / "o", "-q"] if command == "merge" else ["distance", *pair]
        fails_cleanly(capsys, f"{zoo['a']}'s names carry the prefix 'model.' (a model with a task head", *args, out=tmp_path / "o")
    args = ["merge", zoo["a"], zoo["gpt2"], "-m", "linear", "-o", tmp_path / "o", "-q"] if command == "merge" else ["distance", zoo["a"], zoo["gpt2"]]
    assert "prefix" not in fails_cleanly(capsys, "are not the same architecture", *args, out=tmp_path / "o")


@pytest.mark.parametrize("order", ["untied-first", "tied-first"])
@pytest.mark.parametrize("symmetries", ["none", "all", "auto"])
def test_a_tied_model_merges_with_an_untied_one_in_either_order(zoo, tmp_path, capsys, order, symmetries):
    """A tied checkpoint stores no LM head: its embedding stands in for it, whichever model comes first. With the
    untied model first, the tied pair was looked up in the first model's config only (which names none), and the
    merge failed with "lacks tensor 'lm_head.weight'"."""
    models = [zoo["a"], zoo["tied"]] if order == "untied-first" else [zoo["tied"], zoo["a"]]
    code, _, err = run_cli(capsys, "merge", *models, "-m", "linear", "-s", symmetries, "-o", tmp_path / "o", "-q")
    assert code == 0, err
    merged = load_file(tmp_path / "o" / ST)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is False
    if symmetries != "auto":  # no residual map: the head is the mean of the untied head and the tied embedding
        untied, tied = load_file(zoo["a"] / ST), load_file(zoo["tied"] / ST)
        expected = (untied["lm_head.weight"] + tied["model.embed_tokens.weight"]) / 2
        assert torch.allclose(merged["lm_head.weight"], expected, atol=1e-6)


@pytest.mark.parametrize("order", ["untied-first", "tied-first"])
def test_a_tied_model_aligns_beside_an_untied_one(zoo, tmp_path, capsys, order):
    """align, distance and barrier took the pair of a tied reference only, and with ``residual`` only: otherwise
    "lacks tensor 'lm_head.weight'" (or "has an extra tensor"). Now the tied model's embedding stands in for its
    head, its aligned copy computes what it did, and barrier evaluates each endpoint as it is (built untied: a
    tied model would put the embedding in place of the untied endpoint's head)."""
    reference, model = (zoo["a"], zoo["tied"]) if order == "untied-first" else (zoo["tied"], zoo["a"])
    for symmetries in ("all", "auto"):
        out = tmp_path / symmetries
        code, _, err = run_cli(capsys, "align", reference, model, "-s", symmetries, "-o", out, "-q")
        assert code == 0, err
        aligned = out / model.name
        assert json.loads((aligned / "config.json").read_text())["tie_word_embeddings"] is False
        tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
        before, after = (transformers.AutoModelForCausalLM.from_pretrained(p).eval()(tokens).logits for p in (model, aligned))
        assert (before - after).abs().max() < 1e-4
        code, _, err = run_cli(capsys, "distance", reference, model, "-s", symmetries)
        assert code == 0, err

    def losses(a, b, name):
        code, _, err = run_cli(capsys, "barrier", a, b, "-s", "none", "--data", zoo["tokens"], "--plot", tmp_path / f"{name}.png",
                               "--json", tmp_path / f"{name}.json", "-q")
        assert code == 0, err
        row = json.loads((tmp_path / f"{name}.json").read_text())["rows"][0]
        return row["loss_A"], row["loss_B"]

    mixed = losses(reference, model, "mixed")
    # each endpoint's loss as a barrier between models that agree on tying measures it
    assert mixed[0] == pytest.approx(losses(reference, zoo["b"] if reference == zoo["a"] else zoo["tied"], "ref")[0], abs=1e-5)
    assert mixed[1] == pytest.approx(losses(zoo["b"] if model == zoo["a"] else zoo["tied"], model, "model")[1], abs=1e-5)


def _old_llama_buffers(state):
    state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(4) for i in range(2)})


def _old_gpt2_buffers(state):
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32, dtype=torch.bool).tril()
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)


@pytest.mark.parametrize("name, add", [("b", _old_llama_buffers), ("gpt2", _old_gpt2_buffers)], ids=["llama-inv_freq", "gpt2-attn-bias"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_buffers_older_transformers_saved_are_not_weights(zoo, tmp_path, capsys, name, add, sharded):
    """Older transformers saved buffers current ones recompute and drop on load (RoPE's inv_freq, GPT-2's causal
    mask): such a checkpoint failed against a current save of the same architecture ("has an extra tensor
    'model.layers.0.self_attn.rotary_emb.inv_freq'"). They are read as absent, and no output carries them."""
    old = restate(copy(zoo, name, tmp_path, "old"), add)
    if sharded:  # an index that lists them too
        state = load_file(old / ST)
        (old / ST).unlink()
        save_file(state, old / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
        (old / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(state, "model-00001-of-00001.safetensors")}))
    for models in ((zoo[name], old), (old, zoo[name])):
        out = tmp_path / f"o-{models[0].name}"
        code, _, err = run_cli(capsys, "merge", *models, "-m", "linear", "-o", out, "-q")
        assert code == 0, err
        assert not [k for k in load_file(out / ST) if k.endswith((".inv_freq", ".attn.bias", ".masked_bias"))]
    code, _, err = run_cli(capsys, "distance", zoo[name], old)
    assert code == 0, err


# ------------------------------------------------------------------------------------------------- barrier


def barrier(zoo, tmp_path, *args, a="a", b="b"):
    return ["barrier", zoo[a], zoo[b], "--points", 3, "-q", *args]


@pytest.mark.parametrize("make, message", [
    (lambda p: npz(p, inputs=np.zeros((4, 8), dtype=np.int64)), "holds only 32 tokens: too few for windows of 64"),
    (lambda p: (p / "t.npz").write_text("not an archive") and p / "t.npz", "is not a readable .npz"),
    (lambda p: (p / "e.npz").write_bytes(b"") or p / "e.npz", "is not a readable .npz (EOFError"),  # was: "aborted", exit 130
    (lambda p: npz(p, x=np.zeros((4, 8), dtype=np.int64), y=np.zeros(4)), "has no array named 'inputs'"),
    (lambda p: npz(p, inputs=np.full((20, 8), 99)), "the model's vocabulary has 64 tokens"),
    (lambda p: npz(p, inputs=np.array([["a", "b"]])), "'inputs' has dtype <U1"),
])
def test_barrier_lm_data_that_does_not_fit(zoo, tmp_path, capsys, make, message):
    data = make(tmp_path)
    fails_cleanly(capsys, message, *barrier(zoo, tmp_path, "--data", data, "--plot", tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("inputs, labels, message", [
    ((4, 1, 8, 8), np.zeros(7, dtype=np.int64), "a classifier needs one integer label per example"),
    ((4, 1, 8, 8), np.full(4, 0.5), "'labels' must be class numbers"),
    ((4, 3, 5), np.zeros(4, dtype=np.int64), "does not fit the model (not enough values to unpack"),
    ((4, 1, 8, 8), np.full(4, 99, dtype=np.int64), "does not fit the model (Target 99 is out of bounds"),
])
def test_barrier_classifier_data_that_does_not_fit(zoo, tmp_path, capsys, inputs, labels, message):
    data = npz(tmp_path, inputs=np.random.default_rng(0).random(inputs, dtype=np.float32), labels=labels)
    fails_cleanly(capsys, message, *barrier(zoo, tmp_path, "--data", data, "--plot", tmp_path / "p.png", a="vit", b="vit"))


def test_barrier_windows_fit_the_model_positions(zoo, tmp_path, capsys):
    """GPT-2 with 32 positions: windows of the default 128 tokens were an internal IndexError."""
    data = npz(tmp_path, inputs=np.random.default_rng(0).integers(0, 64, (20, 8)))
    code, out, err = run_cli(capsys, *barrier(zoo, tmp_path, "--data", data, "--plot", tmp_path / "p.png", "--json", tmp_path / "r.json",
                                              a="gpt2", b="gpt2"))
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


@pytest.mark.parametrize("option, where, message", [
    ("--plot", "folder", "is a folder: give a file name"),
    ("--plot", "no parent", "the parent directory of --plot"),
    ("--json", "no parent", "the parent directory of --json"),
    ("--plot", "the data", "is the input"),
    ("--json", "the data", "is the input"),
    ("--json", "a model's config", "would replace a file of the input"),
    ("--landscape", "a model's config", "would replace a file of the input"),
    ("--plot", "no suffix", "give a file name ending in .png"),
])
def test_barrier_outputs_are_checked_before_any_work(zoo, tmp_path, capsys, monkeypatch, option, where, message):
    import symmerge.io as io

    monkeypatch.setattr(io, "load_state_dict", lambda *a, **k: pytest.fail("work started before the outputs were checked"))
    model = copy(zoo, "b", tmp_path, "model")
    config = (model / "config.json").read_bytes()
    data = shutil.copy(zoo["tokens"], tmp_path / "tokens.npz")
    target = {"folder": tmp_path, "no parent": tmp_path / "no" / "such" / "f.png", "the data": data,
              "a model's config": model / "config.json", "no suffix": tmp_path / "plot"}[where]
    args = ["barrier", zoo["a"], model, "--data", data, "--points", 3, "-q"]
    args += [option, target] if option == "--plot" else ["--plot", tmp_path / "p.png", option, target]
    fails_cleanly(capsys, message, *args)
    assert (model / "config.json").read_bytes() == config and np.load(data)["inputs"].shape == (20, 8)


@pytest.mark.parametrize("option", ["--points", "--grid"])
def test_barrier_huge_counts_are_usage_errors(zoo, tmp_path, capsys, option):
    """--points 10**11 allocated until the machine ran out of memory."""
    code, _, err = run_cli(capsys, *barrier(zoo, tmp_path, "--data", zoo["tokens"], option, 10**11))
    assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ calibration data (--match, fisher)


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "e.npz").write_bytes(b"") or p / "e.npz", "is not a readable .npz (EOFError"),
    (lambda p: (p / "t.npz").write_text("hello") and p / "t.npz", "is not a readable .npz"),
    (lambda p: (p / "e.txt").write_text("") or p / "e.txt", "holds no non-empty line"),
    (lambda p: npz(p, inputs=np.zeros(4, dtype=np.int64)), "must be 2-D (examples, tokens), got shape (4,)"),
    (lambda p: npz(p, inputs=np.zeros((4, 3, 5), dtype=np.int64)), "must be 2-D (examples, tokens)"),
    (lambda p: npz(p, inputs=np.random.rand(4, 8)), "holds floats (float64) but this model takes token ids"),
    (lambda p: npz(p, inputs=-np.ones((4, 8), dtype=np.int64)), "holds negative token ids"),
    (lambda p: npz(p, inputs=np.zeros((0, 8), dtype=np.int64)), "'inputs' is empty"),
    (lambda p: npz(p, inputs=np.array([["a", "b"]])), "has dtype <U1"),
    (lambda p: p / "missing.npz", "does not exist"),
])
def test_calibration_data_that_does_not_fit(zoo, tmp_path, capsys, make, message):
    data = make(tmp_path)
    fails_cleanly(capsys, message, "align", zoo["a"], zoo["b"], "--match", "activations", "--data", data, "-o", tmp_path / "o",
                  out=tmp_path / "o")


def test_end_of_file_inside_a_run_is_not_an_interrupt(zoo, tmp_path, capsys, monkeypatch):
    """The CLI framework turns an EOFError into Abort, which main() reported as "aborted" with exit 130."""
    import symmerge.io.stream as stream

    def eof(*a, **k):
        raise EOFError("No data left in file")

    monkeypatch.setattr(stream, "LazyState", eof)
    code, _, err = run_cli(capsys, "align", zoo["a"], zoo["b"], "-o", tmp_path / "o", "-q")
    assert code == 1 and "internal error: EOFError" in err and "aborted" not in err
    assert not (tmp_path / "o").exists() and stray_folders(tmp_path) == []


# ----------------------------------------------------------------------------------- recipes and numbers


def recipe(tmp_path, text) -> Path:
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


@pytest.mark.parametrize("body, message", [
    ("", "a recipe is a mapping"),
    ("- a\n- b\n", "a recipe is a mapping"),
    ("42\n", "a recipe is a mapping"),
    ("models: [{model: A}, {model: B}]\nmerge_method: frobnicate\n", "unknown merge method 'frobnicate'"),
    ("models: [{model: A, parameters: {weight: -1}}, {model: B, parameters: {weight: 1}}]\nmerge_method: linear\n", "the weights sum to 0"),
    ("models: [{model: A, parameters: {weight: .nan}}, {model: B}]\nmerge_method: linear\n", "got nan"),
    ("models: [{model: A, parameters: {weight: .inf}}, {model: B}]\nmerge_method: linear\n", "got inf"),
    ("models: [{model: A, parameters: {weight: abc}}, {model: B}]\nmerge_method: linear\n", "weight must be a number, got 'abc'"),
    ("models: [{model: A}, {model: B}]\nmerge_method: slerp\nbase_model: A\nparameters: {t: 1.5}\n", "t must be in [0, 1], got 1.5"),
    ("models: [{model: A}, {model: B}]\nmerge_method: ties\nbase_model: A\nparameters: {density: 1.5}\n", "density must be in (0, 1]"),
    ("models: [{model: A}, {model: B}]\nmerge_method: ties\nbase_model: A\nparameters: {density: -0.2}\n", "density must be in (0, 1]"),
    ("models: [{model: A}, {model: B}]\nmerge_method: della\nbase_model: A\nparameters: {density: 0.5, epsilon: 0.9}\n",
     "density ± epsilon must lie in (0, 1)"),
    ("merge_method: linear\n", "exactly one of models"),
    ("models: [{model: A}, {model: /nonexistent/x}]\nmerge_method: linear\n", "/nonexistent/x does not exist"),
    ("models: [{model: A}, {model: A}]\nmerge_method: linear\n", "are both"),
    ("models: [A, B]\nmerge_method: linear\n", "models.0: Input should be a valid dictionary"),
    ("models: [{model: A, parameters: {weight: 1}}, {model: B, parameters: {weight: -1}}]\nmerge_method: linear\n",
     "models.*.parameters.weight: the weights sum to 0"),
    ("models: [{model: A}, {model: B}]\nmerge_method: linear\nalignment: {device: tpu}\n", "Input should be 'cpu', 'cuda' or 'auto'"),
    ("models: [{model: A}, {model: B}]\nmerge_method: linear\nalignment: {learn_seconds: 0.5}\n", "greater than or equal to 1"),
    ("models: [{model: A}, {model: B}]\nmerge_method: linear\ndtype: int8\n", "dtype: Input should be 'float32'"),
])
def test_hostile_recipes(zoo, tmp_path, capsys, body, message):
    text = body.replace("A", str(zoo["a"])).replace("B", str(zoo["b"]))
    fails_cleanly(capsys, message, "merge", recipe(tmp_path, text), tmp_path / "o", out=tmp_path / "o")


@pytest.mark.parametrize("args, message", [
    (["--weights", "1e308,1e308"], "weights must be finite, with magnitudes summing to at most 3.4e38"),  # was an overflow
    (["--weights", "nan,1"], "--weights takes finite numbers, got 'nan,1'"),  # was "options: models.0.parameters: ..."
    (["--weights", "1e309,1"], "--weights takes finite numbers"),
    (["--weights", ""], "--weights takes comma-separated numbers, got ''"),  # was silently the default weights
    (["--weights", "1,-1"], "--weights: the weights sum to 0"),  # was "models.*.parameters.weight: ..."
    (["--weights", "1,2,3"], "--weights has 3 values for 2 models"),
    (["--weights", ","], "--weights takes comma-separated numbers"),
    (["--shard-size", "nan"], "not a size: 'nan'"),
    (["--shard-size", "0.5"], "a size must be at least 1 byte"),
    (["--device", "tpu"], "Input should be 'cpu', 'cuda' or 'auto'"),
    (["-p", "bogus=1"], "unknown parameter 'bogus'"),
    (["--dtype", "int8"], "dtype: Input should be 'float32'"),
    (["--unmatched", "nope"], "Input should be 'mean', 'inputs' or 'zero'"),
])
def test_hostile_merge_options(zoo, tmp_path, capsys, args, message):
    fails_cleanly(capsys, message, "merge", zoo["a"], zoo["b"], "-m", "linear", *args, "-o", tmp_path / "o", "-q",
                  out=tmp_path / "o")


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "device must be one of cpu, cuda, auto"),
    (["--match", "nope"], "match must be one of weights, activations, learned"),
    (["-s", "rope"], "unknown symmetry 'rope'"),
    (["-s", ""], "empty symmetries '': name the classes"),  # was: taken as none
    (["-s", " , "], "empty symmetries ' , ': name the classes"),
])
def test_hostile_align_options(zoo, tmp_path, capsys, args, message):
    fails_cleanly(capsys, message, "align", zoo["a"], zoo["b"], *args, "-o", tmp_path / "o", out=tmp_path / "o")


@pytest.mark.parametrize("where", ["model", "out"])
def test_a_newline_in_a_path_keeps_the_error_on_one_line(zoo, tmp_path, capsys, where):
    odd = tmp_path / "two\nlines"
    args = ["inspect", odd] if where == "model" else ["merge", zoo["a"], zoo["b"], "-m", "linear", "-o", odd / "out"]
    err = fails_cleanly(capsys, "two\\nlines", *args)
    assert "two\nlines" not in err


def test_output_under_a_file_or_recipe_that_is_a_folder(zoo, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    fails_cleanly(capsys, "the parent directory of", "merge", zoo["a"], zoo["b"], "-m", "linear", "-o", tmp_path / "afile" / "sub")
    (tmp_path / "r.yaml").mkdir()
    fails_cleanly(capsys, "does not exist", "merge", tmp_path / "r.yaml", tmp_path / "o")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x01garbage")
    fails_cleanly(capsys, "is not UTF-8 text", "merge", tmp_path / "bin.yaml", tmp_path / "o")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("args", [["zoo", "vit-digits", "--seed", "-1"], ["zoo", "vit-digits", "--seed", "0", "--seed", "-5"],
                                  ["zoo", "vit-digits", "--seed", str(2**64)], ["demo", "--minilm", "--seed", "-1"]])
def test_seeds_outside_torchs_range_are_usage_errors(tmp_path, capsys, monkeypatch, args):
    """``zoo --seed -1`` trained a model into .cache/zoo/vit-digits/seed-1 (torch wraps a negative seed); 2**64 failed
    inside torch. Both are refused like --points out of range, before anything is built."""
    import symmerge.demo as demo
    import symmerge.zoo as zoo

    monkeypatch.setattr(zoo, "build", lambda *a, **k: pytest.fail("a model was built from an invalid seed"))
    monkeypatch.setattr(demo, "run_minilm_demo", lambda *a, **k: pytest.fail("the demo ran with an invalid seed"))
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "Invalid value for '--seed'" in err and "Traceback" not in err


def test_demo_options_of_the_other_demo_are_refused(capsys, monkeypatch):
    """``demo --seed 3`` (ViT demo) and ``demo --minilm --out DIR`` ignored the option without a word."""
    import symmerge.demo as demo

    monkeypatch.setattr(demo, "run_minilm_demo", lambda *a, **k: pytest.fail("the demo ran"))
    monkeypatch.setattr(demo, "run_vit_demo", lambda *a, **k: pytest.fail("the demo ran"))
    fails_cleanly(capsys, "--seed is the seed of --minilm's", "demo", "--seed", "3")
    fails_cleanly(capsys, "the --minilm demo writes no files", "demo", "--minilm", "--out", "somewhere")


def test_demo_out_on_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import symmerge.demo as demo

    monkeypatch.setattr(demo, "build", lambda *a, **k: pytest.fail("training started before --out was checked"))
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        fails_cleanly(capsys, "is a file, not a folder", "demo", "--out", out)
    assert (tmp_path / "afile").read_text() == "x"


def test_an_empty_output_path_is_named_as_empty_not_as_the_current_folder():
    """Path("") is the current folder: the message named `--out .`, a folder the caller never gave."""
    with pytest.raises(SymmergeError, match=r"^--out is empty: name the folder to create$"):
        check_output_dir("", force=True)
