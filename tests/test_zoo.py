"""The model zoo: loaders, short training runs, the cache. Fast: tiny models, a few steps each."""

from __future__ import annotations

import inspect
import json
import math
import re
import string
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import expect_cli_error, missing_asset, run_cli

from symmerge import assets
from symmerge.cache import cache_root
from symmerge.errors import SymmergeError
from symmerge.zoo import ZOO, ZooEntry, build, evaluate, evaluate_classifier, evaluate_lm, lm_windows, read_record
from symmerge.zoo import data as zoo_data
from symmerge.zoo.registry import COMPLETE
from symmerge.zoo.train import char_gpt2_config, train_char_gpt2, train_vit, vit_config, vit_recipe

TINY_VIT = dict(layers=2, hidden=32, heads=4, mlp=64, patch=2, epochs=8, batch_size=64, lr=3e-3)
TINY_GPT2 = dict(layers=2, hidden=32, heads=4, context=32, steps=30, batch_size=16, lr=1e-2, val_windows=32)


def _digits():
    try:
        return zoo_data.load_digits()
    except SymmergeError as e:
        missing_asset(str(e))


def _shakespeare():
    try:
        return zoo_data.load_shakespeare()
    except SymmergeError as e:
        missing_asset(str(e))


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    _digits()
    return train_vit("digits", 0, tmp_path_factory.mktemp("vit") / "model", **TINY_VIT, progress=False)


def test_digits_loader_shapes_and_determinism():
    a, b = _digits(), _digits()
    assert a.train_images.shape == (1400, 1, 8, 8) and a.test_images.shape == (397, 1, 8, 8)
    assert a.train_images.dtype == torch.float32 and a.train_labels.dtype == torch.int64
    assert a.train_labels.shape == (1400,) and a.test_labels.shape == (397,)
    assert set(a.train_labels.tolist()) == set(range(10))
    assert abs(float(a.train_images.mean())) < 1e-4 and abs(float(a.train_images.std()) - 1) < 1e-3
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)


def test_tiny_vit_learns_digits_and_saves_an_hf_dir(tiny_vit_dir):
    record = read_record(tiny_vit_dir)
    assert record["dataset"] == "digits" and record["seed"] == 0 and record["recipe"]["hidden"] == 32
    assert record["test_accuracy"] > 0.3, record                   # chance is 0.1
    model = transformers.ViTForImageClassification.from_pretrained(tiny_vit_dir)
    assert (tiny_vit_dir / "model.safetensors").is_file()
    data = _digits()
    scores = evaluate_classifier(model, data.test_images, data.test_labels)
    assert scores["accuracy"] == pytest.approx(record["test_accuracy"])
    assert scores["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    assert evaluate(tiny_vit_dir)["accuracy"] == pytest.approx(record["test_accuracy"])


def test_evaluate_classifier_is_pure_and_batch_size_independent(tiny_vit_dir):
    model = transformers.ViTForImageClassification.from_pretrained(tiny_vit_dir).train()
    data = _digits()
    big = evaluate_classifier(model, data.test_images, data.test_labels, batch_size=500)
    small = evaluate_classifier(model, data.test_images, data.test_labels, batch_size=7)
    assert model.training
    assert big["accuracy"] == small["accuracy"] and big["loss"] == pytest.approx(small["loss"], rel=1e-5)


def test_vit_training_is_deterministic(tmp_path):
    _digits()
    recipe = dict(TINY_VIT, layers=1, hidden=16, mlp=32, epochs=1, progress=False)
    a = train_vit("digits", 3, tmp_path / "a", **recipe)
    b = train_vit("digits", 3, tmp_path / "b", **recipe)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_build_caches_and_never_leaves_a_partial_model(tmp_path, monkeypatch):
    _digits()
    calls = []

    def tiny(seed, out_dir, **kwargs):
        calls.append(seed)
        return train_vit("digits", seed, out_dir, **dict(TINY_VIT, layers=1, hidden=16, mlp=32, epochs=1), **kwargs)

    def broken(seed, out_dir, **kwargs):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(ZOO, "tiny", ZooEntry(tiny))
    monkeypatch.setitem(ZOO, "broken", ZooEntry(broken))
    first = build("tiny", 5, root=tmp_path, progress=False)
    assert first == tmp_path / "tiny" / "seed5" and calls == [5]
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert build("tiny", 5, root=tmp_path, progress=False) == first
    assert time.perf_counter() - start < 0.5 and calls == [5]
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["seed5"]

    with pytest.raises(KeyboardInterrupt):
        build("broken", 0, root=tmp_path, progress=False)
    assert list((tmp_path / "broken").iterdir()) == []
    with pytest.raises(KeyError, match="vit-digits"):
        build("no-such-model", 0, root=tmp_path)


def test_the_zoo_and_the_assets_share_one_cache_root(tmp_path, monkeypatch):
    """``SYMMERGE_CACHE`` moves everything symmerge builds once (the zoo's models, SmolLM2's float32 copy); unset or
    empty, it is ``./.cache``. The zoo used to ignore it and train again under the working directory."""
    made = []

    def fake(seed, out_dir, **kwargs):
        made.append(out_dir.parent)
        for name in COMPLETE:
            (out_dir / name).write_text("{}")
        return out_dir

    monkeypatch.setitem(ZOO, "fake", ZooEntry(fake))
    monkeypatch.setenv("SYMMERGE_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    assert build("fake", 3, progress=False) == tmp_path / "elsewhere" / "zoo" / "fake" / "seed3" and made
    copy = tmp_path / "elsewhere" / "smollm2-135m-instruct"
    copy.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (copy / name).write_text("{}")
    assert assets.smollm2_dir() == copy  # found in the same root: nothing is converted again
    monkeypatch.chdir(tmp_path)
    for unset in (monkeypatch.delenv, lambda name: monkeypatch.setenv(name, "")):
        unset("SYMMERGE_CACHE")
        assert cache_root() == Path(".cache")
        assert build("fake", 4, progress=False).resolve() == tmp_path / ".cache" / "zoo" / "fake" / "seed4"


def test_registry_names_the_models():
    assert {"vit-digits", "vit-fmnist", "gpt2-shakespeare", "vit-fmnist-w256", "gpt2-shakespeare-w256"} <= set(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_recipe_binds_to_its_trainer(name, tmp_path):
    """A recipe's keyword arguments are ones its trainer takes (build() passes seed, out_dir, progress and them),
    and its description says what it costs and scores — all checked without training."""
    entry = ZOO[name]
    inspect.signature(entry.train).bind(0, tmp_path, progress=False, **entry.kwargs)
    assert re.search(r"\d (s|min)\b", entry.description), f"no measured training time in {entry.description!r}"
    with pytest.raises(TypeError):                                   # negative control: a misspelt hyperparameter
        inspect.signature(entry.train).bind(0, tmp_path, progress=False, **entry.kwargs, hiden=256)


def test_w256_vit_has_glmc_shapes():
    """GLMC's ViT: 6 layers, 8 heads, width 256, MLP 512 — here on 28×28 Fashion-MNIST with 7×7 patches (16 + [CLS] tokens)."""
    entry = ZOO["vit-fmnist-w256"]
    assert entry.train.args == ("fashion_mnist",)
    hp = vit_recipe("fashion_mnist", **{k: v for k, v in entry.kwargs.items() if k != "threads"})
    assert (hp["layers"], hp["heads"], hp["hidden"], hp["mlp"], hp["patch"]) == (6, 8, 256, 512, 7)
    assert 28 % hp["patch"] == 0 and hp["hidden"] % hp["heads"] == 0
    model = transformers.ViTForImageClassification(vit_config(hp, 28, [f"class {i}" for i in range(10)]))
    assert model.vit.embeddings.position_embeddings.shape == (1, 16 + 1, 256)
    weights = model.state_dict()
    assert len(model.vit.layers) == 6 and weights["vit.layers.0.mlp.fc1.weight"].shape == (512, 256)
    assert weights["vit.layers.5.attention.q_proj.weight"].shape == (256, 256) and model.config.num_attention_heads == 8
    assert model(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)
    with pytest.raises(ValueError, match="hiden"):                   # negative control
        vit_recipe("fashion_mnist", hiden=256)


def test_w256_char_gpt2_has_glmc_shapes():
    """GLMC's character GPT-2: 6 layers, 4 heads, width 256, MLP 1024, context 256."""
    kwargs = ZOO["gpt2-shakespeare-w256"].kwargs
    vocab = "\n" + string.ascii_letters + " .,;:!?'-&$3"
    config = char_gpt2_config(vocab, **{k: kwargs[k] for k in ("layers", "hidden", "heads", "context")})
    model = transformers.GPT2LMHeadModel(config)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (6, 4, 256, 256)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (256, 1024)     # Conv1D: (in, out)
    assert model.transformer.wpe.weight.shape == (256, 256) and config.bos_token_id == vocab.index("\n")
    assert model(input_ids=torch.zeros(1, kwargs["context"], dtype=torch.long)).logits.shape == (1, 256, len(vocab))


def test_cli_zoo_lists_every_entry(capsys):
    code, out, _ = run_cli(capsys, "zoo", "list")
    assert code == 0 and all(name in out for name in ZOO)
    assert "vit-fmnist-w256" in out and "gpt2-shakespeare-w256" in out
    # the descriptions start in one column, past the longest name (gpt2-shakespeare-w256 once ran into its text)
    starts = {len(name) + len(line[len(name):]) - len(line[len(name):].lstrip()) for line in out.splitlines()
              for name in [line.split()[0]]}
    assert len(starts) == 1 and starts.pop() > max(map(len, ZOO)), out
    expect_cli_error(capsys, "vit-fmnist-w256", "zoo", "no-such-model")


def test_idx_parser(tmp_path):
    import gzip

    import numpy as np

    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes() + values.tobytes())
    assert np.array_equal(zoo_data.read_idx(path), values)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(SymmergeError):
        zoo_data.read_idx(tmp_path / "bad")


def test_fashion_mnist_loader_or_install_hint(tmp_path):
    with pytest.raises(SymmergeError, match="apt-get install -y --no-install-recommends dataset-fashion-mnist"):
        zoo_data.load_fashion_mnist(root=tmp_path)
    try:
        data = zoo_data.load_fashion_mnist(train_size=1000)
    except SymmergeError as e:
        missing_asset(str(e))
    assert data.train_images.shape == (1000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_labels.shape == (1000,) and int(data.test_labels.max()) == 9
    assert torch.equal(data.train_labels, zoo_data.load_fashion_mnist(train_size=1000).train_labels)


def test_shakespeare_loader():
    corpus = _shakespeare()
    assert corpus.vocab == "".join(sorted(set(corpus.vocab))) and "\n" in corpus.vocab and "e" in corpus.vocab
    n = len(corpus.train) + len(corpus.val)
    assert n > 4_000_000 and len(corpus.val) == pytest.approx(0.1 * n, abs=1)
    assert corpus.train.dtype == torch.int64 and int(corpus.train.max()) < len(corpus.vocab)
    assert corpus.decode(corpus.encode("To be, or not to be")) == "To be, or not to be"
    assert corpus.decode(corpus.train[:200]).startswith(zoo_data.shakespeare_files()[0].read_text()[:200])
    windows = lm_windows(corpus.val, 16, 5)
    assert windows.shape == (5, 17) and torch.equal(windows[0], corpus.val[:17])


def test_tiny_char_gpt2_beats_uniform(tmp_path):
    corpus = _shakespeare()
    out = train_char_gpt2(0, tmp_path / "gpt2", **TINY_GPT2, progress=False)
    record = read_record(out)
    assert record["vocab"] == corpus.vocab and record["steps"] == 30
    assert record["val_loss"] < math.log(len(corpus.vocab)) - 0.5, record
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert model.config.vocab_size == len(corpus.vocab) and model.config.n_positions == 32
    again = evaluate_lm(model, corpus.val, context=32, windows=32)
    assert again["loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    assert json.loads((out / "zoo.json").read_text())["uniform_loss"] == pytest.approx(math.log(len(corpus.vocab)))
