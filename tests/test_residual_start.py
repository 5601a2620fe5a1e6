"""The residual descent's two starts (identity and anchored): what the anchors are, and that the kept descent is
never worse than either start alone."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_model

import symmerge
from symmerge.groups import apply_transform, parse_symmetries
from symmerge.groups.residual import anchor_group, fold_norms
from symmerge.match.residual import anchored_start, fit_with_residual, moved_keys, residual_descent
from symmerge.spec import spec_for

RESIDUAL_FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "vit", "bert-cls", "roberta-cls"]


def _slot_keys(residual) -> set[str]:
    return {s.key for s in (*residual.embeddings, *residual.readers, *residual.writers, *residual.vectors)}


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_anchors_are_the_residual_slots_no_per_layer_group_moves(family):
    model, _ = make_model(family)
    spec = spec_for(model.config, model.state_dict().keys())
    touched = spec.touched_keys()
    anchors = anchor_group(spec.residual, touched)
    assert anchors is not None and anchors.norms == ()
    assert _slot_keys(anchors) == _slot_keys(spec.residual) - touched
    assert moved_keys(spec, parse_symmetries("all") - {"residual"}) == touched
    # with FFN matching only, the attention projections' other axis is fixed too: they become anchors
    ffn_only = anchor_group(spec.residual, moved_keys(spec, frozenset({"ffn"})))
    assert _slot_keys(ffn_only) > _slot_keys(anchors)
    assert anchor_group(spec.residual, _slot_keys(spec.residual)) is None


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_kept_descent_is_never_worse_than_either_start(family):
    """Two unrelated random models: the descent kept by fit_with_residual ends at the lower of the two starts'
    distances (the objective). A few rounds keep it fast; the comparison holds at any budget."""
    a, _ = make_model(family, 0)
    b, _ = make_model(family, 1)
    ref, other = a.state_dict(), b.state_dict()
    spec = spec_for(a.config, ref.keys())
    chosen = parse_symmetries("all,residual")
    per_layer = chosen - {"residual"}
    ref_f, other_f = fold_norms(ref, spec.residual), fold_norms(other, spec.residual)
    finals = {}
    for name, q0 in (("identity", None), ("anchored", anchored_start(ref_f, other_f, spec, per_layer))):
        descent = residual_descent(ref_f, other_f, spec, per_layer, start=q0, max_iter=3)
        history, rounds = descent.history, descent.steps
        assert all(y < x for x, y in zip(history, history[1:])) and len(rounds) == len(history) - 1
        finals[name] = history[-1]
    fit = fit_with_residual(ref, other, spec, chosen, max_iter=3)
    transform, details, kept_ref, history = fit.transform, fit.details, fit.folded_reference, fit.history
    assert history[-1] <= min(finals.values()) + 1e-9
    assert details["residual"]["final_distance"] == pytest.approx(finals)
    assert details["residual"]["start"] == min(finals, key=finals.get)
    assert symmerge.state_distance(apply_transform(other, spec, transform), kept_ref) == pytest.approx(history[-1], rel=1e-5)


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_both_starts_recover_a_scrambled_copy(family):
    model, _ = make_model(family, 2)
    original = model.state_dict()
    scrambled = symmerge.apply_random_symmetry(original, config=model.config, symmetries="all,residual", seed=8)
    result = symmerge.align(original, scrambled, config=model.config, symmetries="all,residual")
    assert result.report.relative_before > 0.5
    assert result.report.relative_after <= 1e-5
    residual = result.report.groups[-1].details
    assert residual["start"] in ("identity", "anchored")
    assert max(residual["final_distance"].values()) <= 1e-5 * result.report.reference_norm


def test_one_progress_bar_per_descent_not_one_per_round(monkeypatch):
    """Logs of a long residual descent held one finished bar per round; now each start's descent shows one bar whose
    total grows by a round's groups, and it ends full."""
    import symmerge.match.per_layer as per_layer_module
    import symmerge.match.residual as residual_module

    made = {"residual": [], "per_layer": []}

    def recorder(where):
        class Recorded(residual_module.tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = False
                kwargs["file"] = io.StringIO()
                super().__init__(*args, **kwargs)
                made[where].append(self)
        return Recorded

    monkeypatch.setattr(residual_module, "tqdm", recorder("residual"))
    monkeypatch.setattr(per_layer_module, "tqdm", recorder("per_layer"))
    a, _ = make_model("gpt2", 0)
    b, _ = make_model("gpt2", 1)
    spec = spec_for(a.config, a.state_dict().keys())
    fit = fit_with_residual(a.state_dict(), b.state_dict(), spec, parse_symmetries("all,residual"), max_iter=3, progress=True)
    assert made["per_layer"] == [] and len(made["residual"]) == 2  # the identity and the anchored start
    per_round = len(spec.ffn) + len(spec.attention)
    rounds = len(fit.details["residual"]["round_seconds"])
    assert rounds >= 2  # several rounds ran, yet one bar
    for bar in made["residual"]:
        assert bar.total % per_round == 0 and bar.n == bar.total and bar.total >= per_round


def test_auto_skips_the_residual_map_for_fine_tunes_of_one_base(monkeypatch):
    """``align`` with ``auto`` fits the per-layer classes first; for a fine-tune of the reference (gain <= MIN_GAIN)
    the residual descent is never started (at 7B it costs rounds of full passes), as merge decides; an independent
    pair still gets it."""
    import symmerge.match.weights as weights_module

    model, _ = make_model("llama", 0)
    ref = model.state_dict()
    g = torch.Generator().manual_seed(5)
    fine_tune = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in ref.items()}
    calls = []
    real = weights_module.fit_with_residual
    monkeypatch.setattr(weights_module, "fit_with_residual", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = symmerge.align(ref, fine_tune, config=model.config, symmetries="auto")
    assert calls == [] and result.report.matching["auto"]["kept"] == "all" and "fine-tunes" in result.report.matching["auto"]["reason"]
    other, _ = make_model("llama", 1)
    result = symmerge.align(ref, other.state_dict(), config=model.config, symmetries="auto")
    assert calls != [] and "distance_with_residual" in result.report.matching["auto"]  # control: independent models
