"""Function preservation (every group class x every family) and recovery (full group, aligned back)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, max_output_diff
from safetensors.torch import load_file, save_file

import symmerge
from symmerge.groups import SYMMETRY_CLASSES, HeadTransform, ModelTransform, apply_transform, random_transform
from symmerge.spec import spec_for

TOL = 1e-5


def clone(state):
    return {k: v.clone() for k, v in state.items()}


def untied(model):
    """A copy of ``model`` whose LM head is not tied to the embedding (folding the final norm unties them)."""
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    return type(model)(config).eval()


@pytest.mark.parametrize("cls", SYMMETRY_CLASSES)
def test_random_element_preserves_function(family, cls):
    model, make_inputs = make_model(family)
    original = clone(model.state_dict())
    spec = spec_for(model.config, original.keys())
    if cls == "residual" and spec.residual is None:
        with pytest.raises(symmerge.SymmergeError, match="residual-stream alignment is not available"):
            random_transform(spec, [cls], seed=1)
        return
    moved = apply_transform(original, spec, random_transform(spec, [cls], seed=1))
    common = [k for k in original if k in moved]
    assert symmerge.state_distance({k: original[k] for k in common}, {k: moved[k] for k in common}) > 1e-2, "the element must move the parameters"
    assert max_output_diff(untied(model), original, moved, make_inputs) <= TOL


def test_random_element_preserves_function_on_disk(family, tmp_path):
    """The spec works on the names save_pretrained writes (ViT's differ from its in-memory names in transformers 5)."""
    model, make_inputs = make_model(family)
    original = clone(model.state_dict())
    model.save_pretrained(tmp_path / "a")
    on_disk = load_file(tmp_path / "a" / "model.safetensors")
    spec = spec_for(model.config, on_disk.keys())
    assert spec.touched_keys() <= set(on_disk)
    save_file(apply_transform(on_disk, spec, random_transform(spec, "all", seed=2)), tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    reloaded = type(model).from_pretrained(tmp_path / "a").eval()
    assert symmerge.state_distance(original, reloaded.state_dict()) > 1e-2
    assert max_output_diff(model, original, clone(reloaded.state_dict()), make_inputs) <= TOL


def test_a_broken_transform_is_caught(family):
    """The preservation check can fail: rotating Q without K is not a symmetry, and the outputs show it."""
    model, make_inputs = make_model(family)
    original = clone(model.state_dict())
    spec = spec_for(model.config, original.keys())
    group = spec.attention[0]
    view_q = symmerge.spec.StateView(original)
    q = view_q.get(group.q)
    view_q.set(group.q, torch.flip(q, dims=[0]))  # permute Q rows across heads only
    assert max_output_diff(model, original, dict(view_q.state), make_inputs) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_alignment_recovers_a_scrambled_copy(family, seed):
    model, make_inputs = make_model(family, seed)
    original = clone(model.state_dict())
    scrambled = symmerge.apply_random_symmetry(original, config=model.config, seed=seed + 10)
    result = symmerge.align(original, scrambled, config=model.config)
    assert result.report.relative_before > 0.1
    assert result.report.relative_after <= TOL
    assert max_output_diff(model, original, result.state_dict, make_inputs) <= TOL
    assert max_output_diff(model, scrambled, result.state_dict, make_inputs) <= TOL


def test_alignment_of_identical_models_is_identity(family):
    model, _ = make_model(family)
    state = clone(model.state_dict())
    result = symmerge.align(state, state, config=model.config)
    assert result.report.relative_after <= 1e-7  # SVD round-off only
    for x in result.transform.heads.values():
        assert torch.equal(x.perm, torch.arange(len(x.perm)))


@pytest.mark.parametrize("classes", ["ffn", "qk,vo", "qk,vo,scale", "heads", "ffn,qk,vo,heads"])
def test_each_class_recovers_its_own_scrambling(classes):
    """The paper's ablation switches: each subset recovers a copy scrambled by that subset only."""
    model, make_inputs = make_model("bert", 3)
    original = clone(model.state_dict())
    scrambled = symmerge.apply_random_symmetry(original, config=model.config, symmetries=classes, seed=4)
    result = symmerge.align(original, scrambled, config=model.config, symmetries=classes)
    assert result.report.relative_before > 1e-2
    assert result.report.relative_after <= TOL


def test_alignment_never_increases_distance_between_unrelated_models(family):
    a, _ = make_model(family, 0)
    sa = clone(a.state_dict())
    b, make_inputs = make_model(family, 1)
    sb = clone(b.state_dict())
    for classes in ["ffn", "qk,vo", "qk,vo,scale", "all"]:
        result = symmerge.align(sa, sb, config=a.config, symmetries=classes)
        assert result.report.distance_after < result.report.distance_before
        for g in result.report.groups:
            assert g.distance_after <= g.distance_before + 1e-6
        assert max_output_diff(b, sb, result.state_dict, make_inputs) <= TOL


def test_live_module_api_and_model_is_not_modified():
    a, _ = make_model("gpt2", 0)
    b, _ = make_model("gpt2", 1)
    before = clone(b.state_dict())
    result = symmerge.align(a, b, symmetries="ffn")
    assert result.report.symmetries == ("ffn",)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    assert isinstance(result.transform, ModelTransform)


def test_head_transform_identity_is_identity():
    model, _ = make_model("vit")
    state = clone(model.state_dict())
    spec = spec_for(model.config, state.keys())
    t = ModelTransform(heads={g.name: HeadTransform.identity(g.num_heads, g.head_dim) for g in spec.attention})
    assert symmerge.state_distance(state, apply_transform(state, spec, t)) == 0.0


def _with_heads(model, mutate):
    """Apply ``mutate(HeadTransform)`` to layer 0's heads (starting from the identity) and return the new state."""
    state = clone(model.state_dict())
    spec = spec_for(model.config, state.keys())
    grp = spec.attention[0]
    x = HeadTransform.identity(grp.num_heads, grp.head_dim, torch.float64, grp.kv_heads)
    mutate(x, grp)
    return state, apply_transform(state, spec, ModelTransform(heads={grp.name: x}))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_rope_forbids_general_qk_rotations_and_reflections(family):
    """Why the RoPE spec restricts QK: a full orthogonal QK map, or a reflection of one plane, changes the outputs."""
    from symmerge.groups import random_orthogonal

    model, make_inputs = make_model(family)

    def full_rotation(x, grp):
        x.qk_rotation = random_orthogonal(grp.head_dim, grp.kv_heads, torch.Generator().manual_seed(0))

    def plane_reflection(x, grp):
        half = grp.head_dim // 2
        x.qk_rotation[:, half, half] = -1.0  # reflect plane 0: (e0, e_half) → (e0, −e_half)

    for mutate in (full_rotation, plane_reflection):
        before, after = _with_heads(model, mutate)
        assert max_output_diff(model, before, after, make_inputs) > 1e-3


def test_gqa_forbids_moving_a_query_head_to_another_group():
    model, make_inputs = make_model("llama")  # 4 query heads over 2 KV heads

    def cross_group(x, grp):
        x.perm = torch.tensor([2, 1, 0, 3])  # query heads 0 and 2 swap groups, their KV heads stay

    before, after = _with_heads(model, cross_group)
    assert max_output_diff(model, before, after, make_inputs) > 1e-3

    def within_group(x, grp):
        x.perm = torch.tensor([1, 0, 3, 2])

    before, after = _with_heads(model, within_group)
    assert max_output_diff(model, before, after, make_inputs) <= TOL


RESIDUAL_FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "vit", "bert-cls", "roberta-cls"]


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_folding_norms_preserves_function_and_is_idempotent(family):
    from symmerge.groups.residual import fold_norms

    model, make_inputs = make_model(family)
    original = clone(model.state_dict())
    residual = spec_for(model.config, original.keys()).residual
    folded = fold_norms(original, residual)
    assert max_output_diff(untied(model), original, folded, make_inputs) <= TOL
    for norm in residual.norms:
        assert torch.all(folded[norm.weight.key] == 1)
    again = fold_norms(folded, residual)
    assert symmerge.state_distance(folded, again) <= 1e-6


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_residual_alignment_recovers_a_fully_scrambled_copy(family):
    """Residual map + every per-layer class planted at once; coordinate descent recovers them all."""
    model, make_inputs = make_model(family, 2)
    original = clone(model.state_dict())
    scrambled = symmerge.apply_random_symmetry(original, config=model.config, symmetries="all,residual", seed=8)
    result = symmerge.align(original, scrambled, config=model.config, symmetries="all,residual")
    assert result.report.relative_before > 0.5
    assert result.report.relative_after <= TOL
    history = result.report.groups[-1].details["distance_history"]
    assert all(b <= a for a, b in zip(history, history[1:]))
    evaluate = untied(model)
    assert max_output_diff(evaluate, original, result.state_dict, make_inputs) <= TOL
    assert max_output_diff(evaluate, original, result.folded_reference, make_inputs) <= TOL


def test_residual_needs_a_head_reading_the_stream():
    import transformers

    bare = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8))
    with pytest.raises(symmerge.SymmergeError, match="not available"):
        symmerge.align(bare, bare, symmetries="residual")


def test_activation_matching_recovers_a_scrambled_copy(family):
    """The same closed forms on activations (random calibration inputs): exact recovery, residual included."""
    model, make_inputs = make_model(family, 5)
    original = clone(model.state_dict())
    spec = spec_for(model.config, original.keys())
    classes = "all,residual" if spec.residual is not None else "all"
    scrambled = symmerge.apply_random_symmetry(original, config=model.config, symmetries=classes, seed=12)
    calibration = [make_inputs(torch.Generator().manual_seed(i)) for i in range(4)]
    result = symmerge.align(original, scrambled, config=model.config, symmetries=classes, match="activations", calibration=calibration)
    assert result.report.relative_before > 0.3
    assert result.report.relative_after <= TOL
    with pytest.raises(symmerge.SymmergeError, match="calibration data"):
        symmerge.align(original, scrambled, config=model.config, match="activations")
