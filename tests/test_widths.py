"""Models of different widths (docs/DESIGN.md §1-§3): semi-permutations embed a narrower model (fewer FFN neurons,
fewer heads of the same head dim) into a wider one without changing its function; weight matching recovers a
known embedding exactly; merging produces the wider shape; what cannot be done is refused in one line."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import expect_cli_error, make_model, run_cli, save_model
from safetensors.torch import load_file

import symmerge
from symmerge.errors import SymmergeError
from symmerge.groups import (
    HeadTransform,
    ModelTransform,
    apply_transform,
    embedding_transform,
    group_permutation,
    permute_ffn,
    read_ffn,
    read_heads,
    transform_heads,
    write_ffn,
)
from symmerge.groups.heads import write_heads
from symmerge.groups.transform import fill_empty_slots, fill_value
from symmerge.match import solve_lap
from symmerge.spec import StateView, check_embeddable, spec_for

# family → config changes that make the narrow model: FFN width always; heads where the family's config names its
# head dim (gpt2, bert, vit derive it as hidden / heads, so their head count cannot change at one hidden size)
NARROW = {
    "gpt2": {"n_inner": 120},
    "bert": {"intermediate_size": 60},
    "vit": {"intermediate_size": 60},
    "phi3": {"intermediate_size": 50},  # fused gate_up and qkv
    "llama": {"intermediate_size": 50, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 12},  # GQA, RoPE, SwiGLU
    "qwen3": {"intermediate_size": 50, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},  # per-head q/k norms
    "qwen2": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 12},  # heads only, with Q/K/V biases
    "gpt_neox": {"intermediate_size": 50},  # Q|K|V fused per head (head dim is hidden / heads: FFN only)
    "olmo2": {"intermediate_size": 50},  # FFN only: its q/k norms span every head (head counts are refused)
}


def narrow_model(family: str, seed: int = 0):
    """(wide model, narrow model of the same family with random weights, make_inputs)."""
    wide, make_inputs = make_model(family, seed)
    config = copy.deepcopy(wide.config)
    if family in ("llama", "qwen2"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    for key, value in NARROW[family].items():
        setattr(config, key, value)
    torch.manual_seed(seed + 100)
    narrow = type(wide)(config).eval()
    with torch.no_grad():
        for name, p in narrow.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.05 if name.startswith("lm_head") else 0.2)
    return wide, narrow, make_inputs


def specs(wide, narrow):
    return spec_for(wide.config, wide.state_dict().keys()), spec_for(narrow.config, narrow.state_dict().keys())


def cut_from(wide, narrow, seed: int = 0):
    """``narrow``'s weights made from ``wide``'s: a random subset of FFN neurons and of KV heads (with their query
    groups) in a random order, every other tensor copied. Returns the narrow state and the expected alignment of it
    into ``wide``: per group, the semi-permutation (slot → narrow neuron / head, −1 where the neuron was deleted)."""
    g = torch.Generator().manual_seed(seed)
    ws, ns = specs(wide, narrow)
    wide_view, state = StateView(wide.state_dict()), StateView(narrow.state_dict())
    for key, value in wide.state_dict().items():
        if key not in ns.touched_keys():
            state.state[key] = value.clone()
    expected = ModelTransform()
    for gw, gn in zip(ws.ffn, ns.ffn):
        kept = torch.randperm(gw.width, generator=g)[: gn.width]  # narrow neuron j is wide neuron kept[j]
        write_ffn(state, gn, permute_ffn(read_ffn(wide_view, gw), kept))
        expected.ffn[gw.name] = torch.full((gw.width,), -1).index_put_((kept,), torch.arange(gn.width))
    for gw, gn in zip(ws.attention, ns.attention):
        r = gw.num_heads // gw.kv_heads
        kv_kept = torch.randperm(gw.kv_heads, generator=g)[: gn.kv_heads]
        within = torch.stack([torch.randperm(r, generator=g) for _ in range(gn.kv_heads)])
        cut = HeadTransform.identity(gn.num_heads, gn.head_dim, num_kv_heads=gn.kv_heads)
        cut.kv_perm, cut.perm = kv_kept, group_permutation(kv_kept, within, r)
        write_heads(state, gn, transform_heads(read_heads(wide_view, gw), cut))
        x = HeadTransform.identity(gw.num_heads, gw.head_dim, num_kv_heads=gw.kv_heads)
        x.kv_perm = torch.full((gw.kv_heads,), -1).index_put_((kv_kept,), torch.arange(gn.kv_heads))
        x.perm = torch.full((gw.num_heads,), -1).index_put_((cut.perm,), torch.arange(gn.num_heads))
        expected.heads[gw.name] = x
    return dict(state.state), expected


@torch.no_grad()
def outputs(model, state, inputs):
    model.load_state_dict(state)
    return model(**inputs)[0]


# --- the semi-permutation itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(NARROW))
def test_embedding_preserves_function(family):
    """A narrow model embedded into the wide shape (zero neurons, zero heads) computes what it computed."""
    wide, narrow, make_inputs = narrow_model(family)
    ws, ns = specs(wide, narrow)
    state = narrow.state_dict()
    embedded = apply_transform(state, ws, embedding_transform(ws, ns))
    assert {k: tuple(v.shape) for k, v in embedded.items()} == {k: tuple(v.shape) for k, v in wide.state_dict().items()}
    inputs = make_inputs(torch.Generator().manual_seed(0))
    expected = outputs(narrow, state, inputs)
    assert torch.allclose(outputs(wide, embedded, inputs), expected, atol=1e-5)
    # negative control: the empty slots are what keeps the function; filling them changes the outputs
    other = apply_transform(state, ws, embedding_transform(ws, ns))
    filled = {k: v + 0.3 * torch.randn_like(v) if k in ws.touched_keys() and v.is_floating_point() else v for k, v in other.items()}
    assert (outputs(wide, filled, inputs) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_random_semi_permutation_preserves_function(family):
    """Any semi-permutation (random slots, random order), composed with rotations and scales, keeps the function."""
    wide, narrow, make_inputs = narrow_model(family)
    ws, ns = specs(wide, narrow)
    g = torch.Generator().manual_seed(3)
    x = symmerge.random_transform(ws, "all", seed=4) if family == "llama" else ModelTransform()
    x.source = ns
    for gw, gn in zip(ws.ffn, ns.ffn):
        slots = torch.randperm(gw.width, generator=g)[: gn.width]
        x.ffn[gw.name] = torch.full((gw.width,), -1).index_put_((slots,), torch.randperm(gn.width, generator=g))
    for gw, gn in zip(ws.attention, ns.attention):
        if gn.num_heads != gw.num_heads:
            h = x.heads[gw.name]
            h.kv_perm = torch.full((gw.kv_heads,), -1).index_put_((torch.randperm(gw.kv_heads, generator=g)[: gn.kv_heads],),
                                                                 torch.randperm(gn.kv_heads, generator=g))
            h.perm = group_permutation(h.kv_perm, None, gw.num_heads // gw.kv_heads)
    inputs = make_inputs(torch.Generator().manual_seed(0))
    state = narrow.state_dict()
    assert torch.allclose(outputs(wide, apply_transform(state, ws, x), inputs), outputs(narrow, state, inputs), atol=1e-4)


def test_rectangular_lap_is_the_optimal_injection():
    """More rows than columns: every column gets its own row, at the best total (brute force over injections)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.normal(size=(6, 3))
        col_for_row = solve_lap(s)
        assert sorted(c for c in col_for_row if c >= 0) == [0, 1, 2] and (col_for_row == -1).sum() == 3
        value = sum(s[i, c] for i, c in enumerate(col_for_row) if c >= 0)
        best = max(sum(s[rows[c], c] for c in range(3)) for rows in itertools.permutations(range(6), 3))
        assert value == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError, match="more rows than columns"):
        solve_lap(rng.normal(size=(2, 3)))


def test_fill_value_is_the_masked_weighted_mean():
    """After filling, a weighted average equals, per slot, the weighted average over the models that have it."""
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(5, 3, generator=g) for _ in range(3)]
    empty = [None, torch.tensor([0, 1, 0, 0, 1], dtype=torch.bool), torch.tensor([0, 1, 1, 0, 0], dtype=torch.bool)]
    weights = [0.5, 0.2, 0.3]
    filled = fill_value([v.clone() for v in values], empty, weights)
    merged = sum(w * v for w, v in zip(weights, filled)) / sum(weights)
    for slot in range(5):
        have = [i for i in range(3) if empty[i] is None or not empty[i][slot]]
        expected = sum(weights[i] * values[i][slot] for i in have) / sum(weights[i] for i in have)
        assert torch.allclose(merged[slot], expected, atol=1e-6)
    assert torch.equal(filled[0], values[0])  # a model with every slot is untouched


def test_fill_rules_on_heads():
    """``mean`` fills a missing head's Q, K, V and O blocks with the other model's; ``inputs`` all but O; ``zero``
    nothing (checked on a llama pair: 4 heads against 2, GQA)."""
    wide, narrow, _ = narrow_model("llama")
    ws, ns = specs(wide, narrow)
    x = embedding_transform(ws, ns)
    group = ws.attention[0]
    embedded = read_heads(StateView(apply_transform(narrow.state_dict(), ws, x)), group)
    for rule, filled_o in (("mean", True), ("inputs", False), ("zero", None)):
        states = [dict(wide.state_dict()), apply_transform(narrow.state_dict(), ws, x)]
        fill_empty_slots(states, group, [None, x], rule=rule)
        a, b = read_heads(StateView(states[0]), group), read_heads(StateView(states[1]), group)
        empty = x.heads[group.name].empty
        assert torch.equal(b.q[~empty], embedded.q[~empty]) and torch.equal(b.o[~empty], embedded.o[~empty])
        assert torch.equal(b.q[empty], a.q[empty] if filled_o is not None else torch.zeros_like(a.q[empty]))
        assert torch.equal(b.o[empty], a.o[empty] if filled_o else torch.zeros_like(a.o[empty]))
    with pytest.raises(SymmergeError, match="unmatched must be one of"):
        fill_empty_slots(states, group, [None, x], rule="half")


# --- recovery by weight matching ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit", "phi3", "llama", "qwen3", "qwen2", "gpt_neox"])
def test_alignment_recovers_a_deleted_and_shuffled_subset(family):
    """Delete random FFN neurons (and heads) of a wide model and shuffle the rest: aligning that narrow model into
    the wide one finds exactly the slots they came from, and the aligned model is the wide one with the deleted
    neurons zeroed (and still computes what the narrow model does)."""
    wide, narrow, make_inputs = narrow_model(family)
    state, expected = cut_from(wide, narrow, seed=1)
    ws, ns = specs(wide, narrow)
    result = symmerge.align(wide, state, symmetries="all", spec=ws, model_spec=ns)
    for name, perm in expected.ffn.items():
        assert torch.equal(result.transform.ffn[name], perm), name
    for name, x in expected.heads.items():
        assert torch.equal(result.transform.heads[name].perm, x.perm), name
        assert torch.equal(result.transform.heads[name].kv_perm, x.kv_perm), name
    zeroed = apply_transform(wide.state_dict(), ws, ModelTransform(
        ffn={n: torch.where(p < 0, -1, torch.arange(len(p))) for n, p in expected.ffn.items()},
        heads={n: _holes(x) for n, x in expected.heads.items()}))
    for key, value in zeroed.items():
        assert torch.allclose(result.state_dict[key], value, atol=1e-4), key
    assert result.report.distance_after < 0.8 * result.report.distance_before
    inputs = make_inputs(torch.Generator().manual_seed(0))
    assert torch.allclose(outputs(wide, result.state_dict, inputs), outputs(narrow, state, inputs), atol=1e-4)


def _holes(x: HeadTransform) -> HeadTransform:
    """The wide model's heads in place, with the heads ``x`` leaves empty zeroed."""
    out = HeadTransform.identity(len(x.perm), x.qk_rotation.shape[-1], num_kv_heads=len(x.kv_perm))
    out.perm = torch.where(x.perm < 0, -1, torch.arange(len(x.perm)))
    out.kv_perm = torch.where(x.kv_perm < 0, -1, torch.arange(len(x.kv_perm)))
    return out


def test_identity_embedding_without_the_classes():
    """With no class on, a narrower model is still embedded (neuron i to slot i): the unaligned baseline."""
    wide, narrow, _ = narrow_model("llama")
    ws, ns = specs(wide, narrow)
    result = symmerge.align(wide, narrow.state_dict(), symmetries="none", spec=ws, model_spec=ns)
    expected = embedding_transform(ws, ns)
    for name, perm in expected.ffn.items():
        assert torch.equal(result.transform.ffn[name], perm)
    assert result.report.distance_after == pytest.approx(result.report.distance_before)


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 32, "head_dim": 8}, "hidden size 32, the reference has 48"),
    ({"num_hidden_layers": 1}, "layers 1, the reference has 2"),
    ({"head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 1}, "head dim 8, the reference has 12"),
    ({"intermediate_size": 120}, "FFN width 120, the reference has 80: only a narrower model"),
    ({"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 12}, "1 query heads per key/value head, the reference has 2"),
])
def test_refusals_name_the_difference(change, message):
    wide, _ = make_model("llama")
    config = copy.deepcopy(wide.config)
    config.head_dim = 12
    for key, value in change.items():
        setattr(config, key, value)
    other = type(wide)(config)
    with pytest.raises(SymmergeError, match=message):
        check_embeddable(spec_for(wide.config, wide.state_dict().keys()), spec_for(config, other.state_dict().keys()), "model")
    with pytest.raises(SymmergeError, match=message):
        symmerge.align(wide, other)


def test_olmo2_refuses_different_head_counts():
    """OLMo-2's q_norm / k_norm normalise all heads together: an empty (zero) head would change the RMS of every other
    head, so a narrower head count is refused (a narrower FFN is fine, see test_embedding_preserves_function)."""
    wide, _ = make_model("olmo2")
    config = copy.deepcopy(wide.config)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 12
    narrow = type(wide)(config)
    with pytest.raises(SymmergeError, match="2 attention heads, the reference has 4: olmo2's q/k norms span every head"):
        symmerge.align(wide, narrow)


def test_align_refuses_what_widths_do_not_support():
    wide, narrow, _ = narrow_model("llama")
    for symmetries in ("all", "all,residual"):
        with pytest.raises(SymmergeError, match="--match activations is not available for models of different widths"):
            symmerge.align(wide, narrow, symmetries=symmetries, match="activations")
    with pytest.raises(SymmergeError, match="only a narrower model can be aligned into a wider one"):
        symmerge.align(narrow, wide)


@pytest.mark.parametrize("family", ["llama", "vit", "qwen3"])
def test_residual_class_across_widths(family):
    """With the residual class a narrower model is grown by the identity embedding, then aligned as a same-shape
    model: the result computes what the narrow model computed, the element (composed with the embedding)
    re-applies to the narrow model, and the slots it marks empty hold zero neurons."""
    wide, narrow, make_inputs = narrow_model(family)
    ws, ns = specs(wide, narrow)
    state = narrow.state_dict()
    result = symmerge.align(wide, narrow, symmetries="all,residual")
    assert "residual" in result.report.symmetries and result.transform.residual is not None and not result.folded
    inputs = make_inputs(torch.Generator().manual_seed(0))
    expected = outputs(narrow, state, inputs)
    assert torch.allclose(outputs(wide, result.state_dict, inputs), expected, atol=1e-4)
    reapplied = apply_transform(state, ws, result.transform)  # folded norms: gains 1, same function
    assert torch.allclose(outputs(wide, reapplied, inputs), expected, atol=1e-4)
    view = StateView(result.state_dict)
    for group in ws.ffn:
        empty = result.transform.empty_slots(group)
        assert empty is not None and int(empty.sum()) == group.width - ns.ffn_width
        assert read_ffn(view, group).in_weights[0][empty].abs().max() == 0
        assert read_ffn(view, group).in_weights[0][~empty].abs().min(dim=1).values.max() > 0


# --- merging --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A wide GPT-2 and a narrow one cut from it (a shuffled subset of its FFN neurons), as HF directories."""
    root = tmp_path_factory.mktemp("widths")
    wide, narrow, make_inputs = narrow_model("gpt2")
    state, expected = cut_from(wide, narrow, seed=2)
    saved = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to the embedding, as save_pretrained writes it
    return {"wide": save_model(wide, root / "wide"), "narrow": save_model(narrow, root / "narrow", saved), "expected": expected,
            "wide_model": wide, "narrow_model": narrow, "narrow_state": state, "make_inputs": make_inputs}


@pytest.mark.parametrize("unmatched, align", [("mean", "all"), ("inputs", "all"), ("zero", "all"), ("mean", "auto"),
                                              ("mean", "all,residual"), ("inputs", "all,residual"), ("zero", "all,residual")])
def test_cli_merge_narrow_and_wide(capsys, tmp_path, gpt2_pair, unmatched, align):
    """``symmerge merge NARROW WIDE`` (narrow first): aligned to the widest, written at the wide shape. A neuron
    the narrow model was cut from is averaged with itself (= the wide one's); a deleted one is kept unchanged
    (``mean``), keeps its input side and halves its output side (``inputs``), or is halved (``zero``) — per-layer
    alignment, or with the residual class (``auto`` for GPT-2)."""
    m = gpt2_pair
    out = tmp_path / "merged"
    code, stdout, err = run_cli(capsys, "merge", m["narrow"], m["wide"], "--method", "linear", "--unmatched", unmatched, "-s", align,
                           "-o", out, "-q")
    assert code == 0, err
    assert "aligned to the widest" in stdout
    merged, wide = load_file(out / "model.safetensors"), load_file(m["wide"] / "model.safetensors")
    assert all(merged[k].shape == v.shape for k, v in wide.items())
    assert json.loads((out / "config.json").read_text()).get("n_inner") is None  # the wide model's config (4·d)
    for layer in range(2):
        empty = m["expected"].ffn[f"layer{layer}.ffn"] < 0
        w_in, w_out = f"transformer.h.{layer}.mlp.c_fc.weight", f"transformer.h.{layer}.mlp.c_proj.weight"  # Conv1D: in×out
        assert torch.allclose(merged[w_in][:, ~empty], wide[w_in][:, ~empty], atol=1e-4)
        assert torch.allclose(merged[w_out][~empty], wide[w_out][~empty], atol=1e-4)
        factor_in, factor_out = {"mean": (1.0, 1.0), "inputs": (1.0, 0.5), "zero": (0.5, 0.5)}[unmatched]
        assert torch.allclose(merged[w_in][:, empty], factor_in * wide[w_in][:, empty], atol=1e-4)
        assert torch.allclose(merged[w_out][empty], factor_out * wide[w_out][empty], atol=1e-4)


def test_merge_refusals(capsys, tmp_path, gpt2_pair):
    m = gpt2_pair
    expect_cli_error(capsys, "models of different widths must be aligned", "merge", m["wide"], m["narrow"], "--method", "linear",
                     "--align", "none", "-o", tmp_path / "a")
    expect_cli_error(capsys, "models of different widths cannot be merged with a base_model", "merge", m["wide"], m["narrow"],
                     "--method", "task_arithmetic", "--base", m["wide"], "-o", tmp_path / "b")
    expect_cli_error(capsys, "is narrower than", "merge", m["wide"], m["narrow"], "--method", "linear", "--reference", m["narrow"],
                     "-o", tmp_path / "d")


def test_cli_align_writes_the_wide_shape(capsys, tmp_path, gpt2_pair):
    """``symmerge align WIDE NARROW``: the narrow model comes back at the wide shape, computing what it computed."""
    m = gpt2_pair
    code, _, err = run_cli(capsys, "align", m["wide"], m["narrow"], "-o", tmp_path / "out", "-q")
    assert code == 0, err
    aligned = load_file(tmp_path / "out" / "narrow" / "model.safetensors")
    aligned.setdefault("lm_head.weight", aligned["transformer.wte.weight"])  # tied: not stored
    inputs = m["make_inputs"](torch.Generator().manual_seed(0))
    got = outputs(m["wide_model"], aligned, inputs)
    assert torch.allclose(got, outputs(m["narrow_model"], m["narrow_state"], inputs), atol=1e-4)
