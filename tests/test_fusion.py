"""Fusion quality tools: the full GL(d_h) of attention, learned matching's guarantee, K-model alignment, repair."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import make_model, max_output_diff

import symmerge
from symmerge.groups import ModelTransform, apply_transform, random_transform
from symmerge.groups.heads import HeadTransform
from symmerge.groups.residual import apply_residual, fold_norms
from symmerge.match import get_matcher
from symmerge.match.learned import MAX_EVALUATION_SHARE, _evaluation_due, _schedule, learn_transform, path_loss, scored_positions, soft_target_loss, step_batches
from symmerge.spec import spec_for

TOL = 1e-5


def untied(model):
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    return type(model)(config).eval()


def _random_gl(n: int, dh: int, g: torch.Generator) -> torch.Tensor:
    """Well-conditioned random invertible matrices: a rotation times a positive diagonal times a rotation."""
    def rot() -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(n, dh, dh, generator=g, dtype=torch.float64))
        return q
    return rot() @ torch.diag_embed(torch.exp(torch.randn(n, dh, generator=g, dtype=torch.float64) * 0.5)) @ rot()


def test_general_linear_head_maps_preserve_function(family):
    """Q side A^T, K side A^{-1}; V side B^T, O side B^{-T}: any invertible A, B per KV head keep the function (QK
    stays a plane rotation under RoPE and the identity with per-head q/k norms, where GL is no symmetry)."""
    model, make_inputs = make_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    spec = spec_for(model.config, original.keys())
    base = random_transform(spec, "heads,qk,scale", seed=3)
    g = torch.Generator().manual_seed(0)
    heads = {}
    for grp in spec.attention:
        x = base.heads[grp.name]
        kv, dh = grp.kv_heads, grp.head_dim
        qk = x.qk_rotation if (grp.rope or grp.qk_fixed) else _random_gl(kv, dh, g)
        heads[grp.name] = HeadTransform(x.perm, x.kv_perm, qk, x.qk_scale, _random_gl(kv, dh, g), x.vo_scale * 1.7, general=True)
    moved = apply_transform(original, spec, ModelTransform(heads=heads))
    assert symmerge.state_distance(original, moved) > 1e-2
    assert max_output_diff(untied(model), original, moved, make_inputs) <= TOL


def _gpt2_pair():
    """Two tiny GPT-2s of different seeds for learned matching: (model A, model B, make_inputs, A's state, B's state,
    spec, every symmetry class)."""
    a, make_inputs = make_model("gpt2", 0)
    b, _ = make_model("gpt2", 1)
    sa, sb = a.state_dict(), b.state_dict()
    return a, b, make_inputs, sa, sb, spec_for(a.config, sa.keys()), frozenset({"ffn", "qk", "vo", "scale", "heads", "residual"})


def _lm_batches(make_inputs, n: int) -> list[dict]:
    return [dict(x, labels=x["input_ids"]) for x in (make_inputs(torch.Generator().manual_seed(i)) for i in range(n))]


def test_learned_matching_never_returns_an_element_worse_than_its_start():
    """A learning rate far too high wrecks the element after the first step: the element returned is then still no
    worse than weight matching's by the objective (loss on the held-out calibration batches), re-evaluated here."""
    a, b, make_inputs, sa, sb, spec, chosen = _gpt2_pair()
    batches = _lm_batches(make_inputs, 8)
    init = get_matcher("weights")(sa, sb, spec, chosen)
    ref, model = init.folded_reference, fold_norms(sb, spec.residual)
    loss = path_loss(a.config, ref, untie=True)
    for lr in (3e-3, 10.0):
        transform, record = learn_transform(ref, model, spec, init.transform, loss, batches, symmetries=chosen, steps=6, lr=lr,
                                            warmup=0, path="midpoint", eval_every=2)
        assert record["objective_best"] <= record["objective_first"]
        # the rate far too high is caught and halved (restoring the best element); the sane one never is
        assert bool(record["halvings"]) == (lr > 1.0)
        aligned = apply_transform(model, spec, transform)
        held = batches[3::4]
        with torch.no_grad():
            mid = {k: (ref[k].float() + v.float()) / 2 if v.is_floating_point() else v for k, v in aligned.items()}
            value = sum(float(loss(mid, x)) for x in held) / len(held)
        assert value <= record["objective_first"] + 1e-4
        # and the aligned model still computes what B computes. The rate far too high leaves an element far from the
        # identity (ill-conditioned per-head maps), whose float32 rounding of B's logits is larger: 1.2e-5 on an AVX2
        # host against TOL = 1e-5, still far below what an element that changes the function does to them
        assert max_output_diff(untied(b), fold_norms(sb, spec.residual), aligned, make_inputs) <= (TOL if lr < 1.0 else 10 * TOL)


def test_learned_matching_schedule_warms_up_after_each_restart_then_decays():
    """The rate's factor rises linearly over the warm-up steps after a (re)start, and decays by the cosine of the
    budget spent: 1 at the start, ½ halfway, 0 at the end."""
    assert _schedule(0.0, 0, 20) == 1 / 20 and _schedule(0.0, 9, 20) == 10 / 20
    assert _schedule(0.0, 19, 20) == 1.0 and _schedule(0.0, 500, 20) == 1.0
    assert abs(_schedule(0.5, 100, 20) - 0.5) < 1e-12 and abs(_schedule(1.0, 100, 20)) < 1e-12
    assert _schedule(0.3, 0, 0) == _schedule(0.3, 100, 20)  # no warm-up asked: the decay alone


def test_step_batches_cut_language_model_batches_by_scored_positions_and_keep_classifier_batches_whole():
    """A batch of 8 windows of 16 tokens scores 8 × 16 = 128 labels: with 32 positions per step it becomes 4 steps
    of 2 windows, the same examples in the same order; padded labels (−100) do not count; a classifier's batch
    (one label per example) scores 8 and stays whole, as does a batch scoring less than twice the positions."""
    tokens = torch.arange(8 * 16).reshape(8, 16)
    lm = {"input_ids": tokens, "attention_mask": torch.ones(8, 16, dtype=torch.long), "labels": tokens.clone()}
    assert scored_positions(lm) == 128
    steps = step_batches([lm], 32)
    assert [len(s["input_ids"]) for s in steps] == [2, 2, 2, 2]
    for key in lm:
        assert torch.equal(torch.cat([s[key] for s in steps]), lm[key])
    padded = dict(lm, labels=torch.where(torch.arange(16) < 4, tokens, torch.full_like(tokens, -100)))  # 4 scored per window
    assert scored_positions(padded) == 32 and len(step_batches([padded], 32)) == 1
    assert len(step_batches([lm], 65)) == 1  # 128 // 65 = 1 slice
    images = {"pixel_values": torch.randn(8, 3, 4, 4), "labels": torch.arange(8)}
    assert scored_positions(images) == 8 and step_batches([images], 32) == [images]
    assert [len(s["labels"]) for s in step_batches([images], 2)] == [2, 2, 2, 2]  # the rule is the same for every model
    assert step_batches([lm, images], 32)[-1] is images


def test_residual_map_in_float32_matches_float64():
    """Learned matching applies its residual map in float32 during the steps (the dtype its loss runs in): the
    result agrees with the float64 application to float32 precision."""
    model, _ = make_model("gpt2", 0)
    spec = spec_for(model.config, model.state_dict().keys())
    folded = fold_norms(model.state_dict(), spec.residual)
    q, _ = torch.linalg.qr(torch.randn(spec.residual.width, spec.residual.width, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    wide, narrow = apply_residual(folded, spec.residual, q), apply_residual(folded, spec.residual, q, dtype=torch.float32)
    changed = [k for k in wide if not torch.equal(wide[k].float(), folded[k].float())]
    assert changed and all(narrow[k].dtype == torch.float32 for k in changed)
    assert max(float((wide[k] - narrow[k].double()).abs().max()) for k in changed) < 1e-5


def test_learned_matching_time_budget_stops_it():
    a, make_inputs = make_model("gpt2", 0)
    b, _ = make_model("gpt2", 1)
    result = symmerge.align(a.state_dict(), b.state_dict(), config=a.config, symmetries="all,residual", match="learned",
                            calibration=_lm_batches(make_inputs, 4), learn_steps=10_000, learn_seconds=1.0)
    learned = result.report.matching["learned"]
    assert learned["steps"] < 10_000 and learned["seconds"] < 30
    assert learned["objective_best"] <= learned["objective_first"]


def test_learned_matching_seconds_budget_includes_the_last_evaluation():
    """``seconds`` bounds the whole of learning: with an objective evaluation that takes 0.25 s per batch and t
    (0.75 s in all) and a 4 s budget, the steps stop early enough that the closing evaluation fits too (before: the
    steps ran to 4 s, then the evaluation)."""
    a, b, make_inputs, sa, sb, spec, chosen = _gpt2_pair()
    init = get_matcher("weights")(sa, sb, spec, chosen)
    ref, model = init.folded_reference, fold_norms(sb, spec.residual)
    inner = path_loss(a.config, ref, untie=True)

    def slow_objective_loss(state, batch):
        if not torch.is_grad_enabled():  # the objective's evaluations run without gradients; the steps with them
            time.sleep(0.25)
        return inner(state, batch)

    _, record = learn_transform(ref, model, spec, init.transform, slow_objective_loss, _lm_batches(make_inputs, 4),
                                symmetries=chosen, steps=10_000, seconds=4.0, path="random", eval_every=100_000)
    assert 0 < record["steps"] < 10_000
    assert record["seconds"] < 4.0 + 0.4  # one step and timer slack, less than the 0.75 s of a late evaluation


def test_evaluations_take_a_bounded_share_of_a_seconds_budget():
    """Under a seconds budget an intermediate evaluation waits until the steps since the last one took (1 − s)/s times
    its cost; a steps-only budget keeps the fixed schedule (reproducible). Then, end to end: objective evaluations of
    0.75 s with eval_every=1 and a 4 s budget leave the start and the end only, and the steps the rest of the time
    (the fixed schedule would have evaluated after every step)."""
    share = MAX_EVALUATION_SHARE
    assert _evaluation_due(25, 25, None, 0.0, 100.0) and not _evaluation_due(24, 25, None, 1e9, 0.0)
    needed = 1.0 * (1 - share) / share
    assert _evaluation_due(25, 25, 150.0, needed * 1.01, 1.0) and not _evaluation_due(25, 25, 150.0, needed * 0.99, 1.0)
    assert not _evaluation_due(24, 25, 150.0, 1e9, 1.0)

    a, b, make_inputs, sa, sb, spec, chosen = _gpt2_pair()
    init = get_matcher("weights")(sa, sb, spec, chosen)
    ref, model = init.folded_reference, fold_norms(sb, spec.residual)
    inner = path_loss(a.config, ref, untie=True)

    def slow_objective_loss(state, batch):
        if not torch.is_grad_enabled():
            time.sleep(0.25)
        return inner(state, batch)

    _, record = learn_transform(ref, model, spec, init.transform, slow_objective_loss, _lm_batches(make_inputs, 4),
                                symmetries=chosen, steps=10_000, seconds=4.0, path="random", eval_every=1)
    assert [e[0] for e in record["evaluations"]] == [0, record["steps"]]
    assert record["steps"] > 10


def test_iterative_alignment_of_many_models_never_ends_above_the_star():
    """K = 3 tiny GPT-2s: each to the mean of the others in rounds; the spread Σ‖θ_i − θ̄‖² ends no higher than the
    star's (every model aligned to model 0), and the aligned models still compute what they computed."""
    from symmerge.alignment import align_many

    models = [make_model("gpt2", seed) for seed in range(3)]
    states = [m.state_dict() for m, _ in models]
    config = models[0][0].config
    for symmetries in ("all", "all,residual"):
        many = align_many(states, config=config, symmetries=symmetries, rounds=2)
        print(symmetries, many.spread_history)
        assert many.spread_history[-1] <= many.spread_history[0] + 1e-9
        assert all((a is None) == (i == 0) for i, a in enumerate(many.alignments))
    many = align_many(states, config=config, symmetries="all", rounds=2)
    for i in (1, 2):
        assert max_output_diff(models[i][0], states[i], many.states[i], models[i][1]) <= TOL


def test_repair_keeps_shapes_and_is_a_no_op_when_the_statistics_already_match():
    """Repairing a model toward its own FFN statistics changes nothing (up to float error); shapes are kept."""
    from symmerge.merge.repair import ffn_statistics, repair

    a, make_inputs = make_model("gpt2", 0)
    sa = a.state_dict()
    spec = spec_for(a.config, sa.keys())
    batches = [make_inputs(torch.Generator().manual_seed(i)) for i in range(2)]
    stats = ffn_statistics(a.config, sa, batches, untie=False)
    assert all(s is not None for s in stats)
    out = repair(sa, a.config, spec, batches, stats, stats, 0.5)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in sa.items()}
    assert max(float((out[k] - sa[k]).abs().max()) for k in sa) < 1e-4
    b, _ = make_model("gpt2", 1)
    sb = b.state_dict()
    mid = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    fixed = repair(mid, a.config, spec, batches, stats, ffn_statistics(a.config, sb, batches, untie=False), 0.5)
    after = ffn_statistics(a.config, fixed, batches, untie=False)
    target = ffn_statistics(a.config, sa, batches, untie=False)
    # the first FFN sees unchanged inputs, so its statistics hit the target exactly
    assert torch.allclose(after[0][1], (target[0][1] + ffn_statistics(a.config, sb, batches, untie=False)[0][1]) / 2, rtol=1e-3)


def _lm_or_class_batch(family: str, model, make_inputs) -> dict:
    batch = dict(make_inputs(torch.Generator().manual_seed(3)))
    if family == "vit":
        batch["labels"] = torch.tensor([1, 0])
    else:  # a language model's labels are its tokens (it shifts them); a pad position is not scored
        batch["labels"] = batch["input_ids"].clone()
        batch["labels"][0, -3:] = -100
    return batch


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_soft_targets_score_the_positions_the_models_own_loss_scores(family):
    """With both endpoints the model itself, the soft targets are its own predictions: the model is the minimum of the
    soft loss (zero gradient; pairing logits with the wrong positions, e.g. without a causal LM's shift, would
    leave one), its value is the mean entropy over the scored positions, and the labels' loss has a gradient there."""
    model, make_inputs = make_model(family, 0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = _lm_or_class_batch(family, model, make_inputs)
    soft = soft_target_loss(model.config, state, state, True, [batch])  # untied: lm_head apart from the embedding
    hard = path_loss(model.config, state, untie=True)
    weights = {k: v.clone().requires_grad_(True) if v.is_floating_point() else v for k, v in state.items()}
    learnable = [v for v in weights.values() if v.requires_grad]
    soft_grad = torch.autograd.grad(soft(weights, batch), learnable, allow_unused=True)
    hard_grad = torch.autograd.grad(hard(weights, batch), learnable, allow_unused=True)
    largest = lambda gs: max(float(g.abs().max()) for g in gs if g is not None)  # noqa: E731
    assert largest(soft_grad) < 1e-5 < 1e-3 < largest(hard_grad)
    with torch.no_grad():
        p = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    if family == "gpt2":  # position i is scored against label i + 1
        entropy = entropy[:, :-1][batch["labels"][:, 1:] != -100]
    assert torch.allclose(soft(state, batch), entropy.mean(), atol=1e-5)


def test_soft_targets_refuse_a_regression_head():
    """A head whose loss is not a cross-entropy over its logits (a regression: float labels) gets no soft targets."""
    model, make_inputs = make_model("vit", 0)
    config = copy.deepcopy(model.config)
    config.num_labels, config.problem_type = 1, "regression"
    regression = type(model)(config).eval()
    state = regression.state_dict()
    batch = dict(make_inputs(torch.Generator().manual_seed(0)), labels=torch.tensor([0.5, -1.0]))
    assert soft_target_loss(config, state, state, False, [batch]) is None


def test_learned_matcher_fits_soft_targets_by_default_and_labels_on_request():
    """The learned matcher's steps fit the endpoints' mean prediction unless asked for the labels; either way the
    element returned is no worse than weight matching's by the objective (the labels' loss); other targets refused."""
    a, b, make_inputs, sa, sb, spec, chosen = _gpt2_pair()
    batches = _lm_batches(make_inputs, 4)
    learned = get_matcher("learned")
    for targets in ("soft", "labels"):
        options = {} if targets == "soft" else {"learn_targets": targets}
        fit = learned(sa, sb, spec, chosen, config=a.config, calibration=batches, learn_steps=4, **options)
        record = fit.details["learned"]
        assert record["targets"] == targets and record["objective_best"] <= record["objective_first"]
    with pytest.raises(symmerge.SymmergeError, match="learned matching targets must be one of soft, labels, got 'kl'"):
        learned(sa, sb, spec, chosen, config=a.config, calibration=batches, learn_steps=1, learn_targets="kl")


def test_learned_matcher_on_a_named_device_returns_the_same_element_on_the_cpu():
    """``device=`` moves the states, the calibration batches, the module and the learned element there (the LAPs
    stay on the CPU) and brings the element back: on this machine's CPU, named explicitly, the fit is bit-identical
    to the default, every tensor of the element returned is on the CPU, and B' = T(B) built from it is the same."""
    a, b, make_inputs, sa, sb, spec, chosen = _gpt2_pair()
    batches = _lm_batches(make_inputs, 4)
    learned = get_matcher("learned")
    default = learned(sa, sb, spec, chosen, config=a.config, calibration=batches, learn_steps=6)
    named = learned(sa, sb, spec, chosen, config=a.config, calibration=batches, learn_steps=6, device=torch.device("cpu"))
    for fit in (default, named):
        t = fit.transform
        tensors = [t.residual, *t.ffn.values()] + [getattr(h, f) for h in t.heads.values()
                                                   for f in ("perm", "kv_perm", "qk_rotation", "qk_scale", "vo_rotation", "vo_scale")]
        assert all(x.device.type == "cpu" for x in tensors)
    assert torch.equal(default.transform.residual, named.transform.residual)
    assert all(torch.equal(default.transform.ffn[k], named.transform.ffn[k]) for k in default.transform.ffn)
    assert default.history == named.history
    folded = fold_norms(sb, spec.residual)
    before, after = apply_transform(folded, spec, default.transform), apply_transform(folded, spec, named.transform)
    assert all(torch.equal(before[k], after[k]) for k in before)
