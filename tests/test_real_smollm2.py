"""Recovery on real pretrained LLaMA weights: SmolLM2-135M-Instruct (RoPE, 9 query / 3 KV heads, SwiGLU)."""

from __future__ import annotations

import pytest
import torch
from conftest import missing_asset, require_module

import symmerge

require_module("gguf", reason="pip install gguf accelerate")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from symmerge.assets import smollm2_dir

    try:
        path = smollm2_dir()
    except symmerge.SymmergeError as e:
        missing_asset(str(e))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = AutoTokenizer.from_pretrained(path)(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")
    return model, tokens, {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def logits(model, state, tokens):
    model.load_state_dict(state)
    return model(**tokens).logits


def test_scrambled_smollm2_is_recovered_with_equal_logits(smollm2):
    model, tokens, original = smollm2
    reference = logits(model, original, tokens)
    scrambled = symmerge.apply_random_symmetry(original, config=model.config, seed=11)
    tolerance = 1e-5 * float(reference.abs().max())  # float32 round-off relative to the logits' scale
    assert (logits(model, scrambled, tokens) - reference).abs().max() <= tolerance

    result = symmerge.align(original, scrambled, config=model.config)
    assert result.report.relative_before > 0.3
    assert result.report.relative_after <= 1e-5
    assert (logits(model, result.state_dict, tokens) - reference).abs().max() <= tolerance
    naive = {k: (v + scrambled[k]) / 2 for k, v in original.items()}
    assert (logits(model, naive, tokens).argmax(-1) != reference.argmax(-1)).float().mean() > 0.3
    model.load_state_dict(original)
