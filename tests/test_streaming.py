"""Bounded memory: the residual class streamed unit by unit gives what the whole-model, in-memory path gives.

Equality is bitwise for applied tensors (the same operations run on the same tensors, in the same order, only on
fewer of them at a time). The residual correlation and distances are compared to float tolerance: the streamed
path sums the per-tensor terms in unit order rather than the state dict's order, and float addition is not
associative (float64 there: ~1e-12 relative)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, run_cli
from safetensors.torch import load_file

import symmerge
from symmerge.errors import SymmergeError
from symmerge.groups import apply_transform, parse_symmetries
from symmerge.groups.residual import can_unfold, fold_norms, residual_correlation, unfold_norms, with_untied_head
from symmerge.groups.stream import TransformedState
from symmerge.io import open_checkpoint
from symmerge.io.stream import LazyState
from symmerge.match import fit_with_residual, state_distance
from symmerge.spec import spec_for

# pre-LN LayerNorm (gpt2, vit), RMSNorm (llama, qwen2, phi3: fused tensors), gain offset and tied head (gemma),
# sandwich norms (gemma2: permutations), post-LN (bert-cls, deberta-v2-cls: permutations)
RESIDUAL_FAMILIES = ("llama", "gpt2", "gemma", "gemma2", "qwen2", "phi3", "bert-cls", "deberta-v2-cls", "vit")


def _pair(family: str):
    a, _ = make_model(family, 0)
    b, _ = make_model(family, 1)
    sa, sb = dict(a.state_dict()), dict(b.state_dict())
    if getattr(a.config, "tie_word_embeddings", False) and hasattr(a, "lm_head"):  # a checkpoint on disk stores no tied head
        for s in (sa, sb):
            s.pop("lm_head.weight", None)
    return a, sa, sb


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_streamed_residual_equals_in_memory(family):
    model, sa, sb = _pair(family)
    spec = spec_for(model.config, sa.keys())
    assert spec.residual is not None, family
    residual = spec.residual
    fit = fit_with_residual(sa, sb, spec, parse_symmetries("all,residual"), max_iter=3)
    t = fit.transform
    # the objective the streamed descent reports is the in-memory distance of the element it returns
    in_memory = apply_transform(sb, spec, t)  # folds, applies Q, then every per-layer element, on whole dicts
    folded_ref = fold_norms(sa, residual)
    assert math.isclose(state_distance(in_memory, folded_ref), fit.history[-1], rel_tol=1e-5)
    # the streamed application (unit by unit, from the raw state) is the whole-model one, tensor for tensor
    streamed = TransformedState(sb, spec, t, fold=True)
    assert set(streamed) == set(in_memory)
    for k in in_memory:
        assert torch.equal(streamed[k], in_memory[k]), k
    if can_unfold(sa, residual):
        whole = unfold_norms(in_memory, residual, sa)
        lazy = TransformedState(sb, spec, t, fold=True, unfold_with=sa)
        for k in whole:
            assert torch.equal(lazy[k], whole[k]), k
    # the correlation accumulated tensor by tensor from lazily folded states is the whole-model one
    per_layer = type(t)(ffn=t.ffn, heads=t.heads)
    m_stream = residual_correlation(TransformedState(sb, spec, per_layer, fold=True), TransformedState(sa, spec, fold=True), residual)
    m_memory = residual_correlation(apply_transform(fold_norms(sb, residual), spec, per_layer), folded_ref, residual)
    torch.testing.assert_close(m_stream, m_memory, rtol=1e-9, atol=1e-9)


def test_streamed_views_hold_few_units():
    model, sa, sb = _pair("llama")
    spec = spec_for(model.config, sa.keys())
    view = TransformedState(sb, spec, fold=True, cache=2)
    for k in view:
        view[k]
    assert len(view._cache) <= 2 and len(view.units()) > 4


def test_streamed_residual_merge_equals_in_memory(tmp_path, capsys):
    """``merge -s all,residual`` (fit and application streamed from mmap) equals the average of the reference with the
    model aligned in memory by :func:`symmerge.align` (whole dicts: fold, apply, unfold)."""
    model_a, _ = make_model("llama", 0)
    model_b, _ = make_model("llama", 1)
    model_a.save_pretrained(tmp_path / "a", max_shard_size="40KB")  # sharded
    model_b.save_pretrained(tmp_path / "b", max_shard_size="40KB")
    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", tmp_path / "a", tmp_path / "b", "--method", "linear", "-s", "all,residual", "-o", out, "-q")
    assert code == 0, err
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    ref = dict(LazyState(open_checkpoint(tmp_path / "a")))
    other = dict(LazyState(open_checkpoint(tmp_path / "b")))
    aligned = symmerge.align(ref, other, symmetries="all,residual", config=model_a.config)
    partner = with_untied_head(ref, aligned.spec.residual)
    assert set(merged) == set(aligned.state_dict)
    for k, v in aligned.state_dict.items():
        expected = (partner[k].float() * 0.5 + v.float() * 0.5).to(v.dtype)
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6, msg=k)


def test_streamed_residual_needs_residual_group():
    bert, _ = make_model("bert", 0)  # a bare encoder: no head reads the stream
    state = dict(bert.state_dict())
    with pytest.raises(SymmergeError, match="residual-stream alignment is not available"):
        TransformedState(state, spec_for(bert.config, state.keys()), fold=True)


@pytest.mark.parametrize("family", ["gemma", "gpt2", "bert-cls"])  # tied head and gain offset; pre-LN; post-LN
def test_streamed_align_cli_equals_in_memory(tmp_path, capsys, family):
    """``align -s all,residual`` reads from mmap and writes unit by unit: the files equal :func:`symmerge.align` on
    whole state dicts, bit for bit."""
    model_a, _ = make_model(family, 0)
    model_b, _ = make_model(family, 1)
    model_a.save_pretrained(tmp_path / "a")
    model_b.save_pretrained(tmp_path / "b")
    code, _, err = run_cli(capsys, "align", tmp_path / "a", tmp_path / "b", "-s", "all,residual", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    written = load_file(tmp_path / "out" / "b" / "model.safetensors")
    ref = load_file(tmp_path / "a" / "model.safetensors")
    other = load_file(tmp_path / "b" / "model.safetensors")
    expected = symmerge.align(ref, other, symmetries="all,residual", config=model_a.config).state_dict
    assert set(written) == set(expected)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k
