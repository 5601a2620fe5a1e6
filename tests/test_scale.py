"""Scale: the partial-similarity identity certificate (fine-tunes skip most of the FFN GEMM and the LAP), identity
elements left unapplied, shapes from headers and the one-pass NaN/Inf check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model, save_model
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import symmerge
from symmerge.errors import SymmergeError
from symmerge.groups import ModelTransform, apply_transform
from symmerge.groups.ffn import FFNTensors, permute_ffn, read_ffn, write_ffn
from symmerge.groups.heads import HeadTransform, read_heads, transform_heads, write_heads
from symmerge.groups.transform import is_identity_element, is_identity_heads
from symmerge.io import open_checkpoint
from symmerge.io.checkpoint import all_finite
from symmerge.io.stream import LazyState
from symmerge.match import objective
from symmerge.match.certificate import diagonal_dominates, diagonal_dominates_blocked, row_dots
from symmerge.match.ffn import ffn_similarity, ffn_similarity_or_identity
from symmerge.match.lap import identity_is_optimal, solve_lap
from symmerge.match.weights import match_weights
from symmerge.spec import StateView, check_compatible, spec_for
from symmerge.spec.base import FFNGroup


def _ffn(n: int, d: int, seed: int, bias: bool = True) -> FFNTensors:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    return FFNTensors([r(n, d), r(n, d)], [r(n)] if bias else [], [r(d, n)])


def _noisy(t: FFNTensors, scale: float, seed: int) -> FFNTensors:
    g = torch.Generator().manual_seed(seed)
    f = lambda x: x + torch.randn(x.shape, generator=g) * scale * x.std()  # noqa: E731
    return FFNTensors([f(x) for x in t.in_weights], [f(x) for x in t.in_biases], [f(x) for x in t.out_weights])


def _exact(a: FFNTensors, b: FFNTensors) -> np.ndarray:
    """The similarity in float64 (the exact objective the certificate speaks about)."""
    d = lambda t: FFNTensors([x.double() for x in t.in_weights], [x.double() for x in t.in_biases], [x.double() for x in t.out_weights])  # noqa: E731
    a, b = d(a), d(b)
    s = sum(x @ y.T for x, y in zip(a.in_weights, b.in_weights)) + sum(torch.outer(x, y) for x, y in zip(a.in_biases, b.in_biases))
    return (s + sum(x.T @ y for x, y in zip(a.out_weights, b.out_weights))).numpy()


def _assert_sound(a: FFNTensors, b: FFNTensors) -> bool:
    """When the certificate claims the identity, no permutation does better on the exact similarity (and the LAP the
    full float32 matrix gets returns the identity too). Returns whether it claimed."""
    if ffn_similarity_or_identity(a, b) is not None:
        return False
    exact = _exact(a, b)
    rows, cols = linear_sum_assignment(exact, maximize=True)
    assert np.trace(exact) >= exact[rows, cols].sum() - 1e-12 * np.abs(exact).sum()
    assert (solve_lap(ffn_similarity(a, b)) == np.arange(exact.shape[0])).all()  # what the full path returns
    return True


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.1])
def test_fine_tunes_certify_the_identity(noise):
    a = _ffn(512, 256, 0)
    assert _assert_sound(a, _noisy(a, noise, 1))


def test_unrelated_models_skip_the_certificate_passes_over_every_row(monkeypatch):
    """The sampled rows rule the identity out for independent models before the diagonal and norms of every row are
    summed (wasted work on every independent pair); fine-tunes still reach the certificate."""
    import symmerge.match.ffn as ffn_module

    calls = []
    monkeypatch.setattr(ffn_module, "row_dots", lambda x, y: calls.append(x.shape) or row_dots(x, y))
    a = _ffn(384, 128, 0)
    assert ffn_similarity_or_identity(a, _ffn(384, 128, 1)) is not None
    assert calls == []
    assert ffn_similarity_or_identity(a, _noisy(a, 0.01, 1)) is None
    assert calls  # negative control: the certificate's passes run where the sample allows them


@pytest.mark.parametrize("bias", [True, False])
def test_unrelated_or_permuted_models_get_the_full_similarity_bit_for_bit(bias):
    a, b = _ffn(384, 128, 0, bias), _ffn(384, 128, 1, bias)
    assert not identity_is_optimal(_exact(a, b))
    assert torch.equal(ffn_similarity_or_identity(a, b), ffn_similarity(a, b))
    perm = torch.randperm(384, generator=torch.Generator().manual_seed(3))
    shuffled = permute_ffn(a, perm)
    s = ffn_similarity_or_identity(a, shuffled)
    assert s is not None and torch.equal(s, ffn_similarity(a, shuffled))
    assert torch.equal(perm[torch.from_numpy(solve_lap(s))], torch.arange(384))


def _tail_adversary(a: FFNTensors, i: int, j: int, alpha: float, delta: float = 1e-4) -> tuple[FFNTensors, FFNTensors]:
    """A reference and a model on which neurons ``i`` and ``j`` can be told apart only by the last features (W_out
    columns), which the certificate's partial sums never see: their input weights and biases agree up to ``delta``
    (relative) in both, and the model mixes their W_out columns with weight ``alpha`` on the other one — a swap is
    better than the identity exactly when ``alpha > 1/2`` (up to ``delta``)."""
    g = torch.Generator().manual_seed(i * 1000 + j)
    ref_in = [w.clone() for w in a.in_weights]
    ref_b = [b.clone() for b in a.in_biases]
    for w in ref_in:
        w[j] = w[i] * (1 + delta * torch.randn(w.shape[1], generator=g))
    for b in ref_b:
        b[j] = b[i]
    ref = FFNTensors(ref_in, ref_b, [w.clone() for w in a.out_weights])
    out = [w.clone() for w in ref.out_weights]
    for w, src in zip(out, ref.out_weights):
        w[:, i] = (1 - alpha) * src[:, i] + alpha * src[:, j]
        w[:, j] = alpha * src[:, i] + (1 - alpha) * src[:, j]
    return ref, FFNTensors([w.clone() for w in ref_in], [b.clone() for b in ref_b], out)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.49, 0.499, 0.501, 0.51, 0.9])
@pytest.mark.parametrize("n, d", [(256, 64), (128, 512)])
def test_a_near_tie_hidden_in_the_unseen_features_is_never_certified_wrongly(alpha, n, d):
    """Adversary: the first features say the identity (neurons i and j look alike there), the tail decides whether
    swapping them is better. The certificate never claims the identity when a swap is better."""
    ref, model = _tail_adversary(_ffn(n, d, 5), 3, 100, alpha)
    exact = _exact(ref, model)
    rows, cols = linear_sum_assignment(exact, maximize=True)
    better = exact[rows, cols].sum() > np.trace(exact) + 1e-9 * np.abs(exact).sum()
    assert better == (alpha > 0.5)  # the adversary does what it says
    claimed = _assert_sound(ref, model)
    if better:
        assert not claimed


def test_the_certificate_claims_clear_cases():
    """Non-vacuity: fine-tune-like pairs are certified, neurons of very different norms included (the potential)."""
    claims = sum(ffn_similarity_or_identity(a, _noisy(a, 0.05, seed + 1)) is None for seed in range(10) for a in [_ffn(64, 256, seed)])
    assert claims == 10
    a = _ffn(96, 256, 0)
    scale = torch.logspace(-0.5, 0.5, 96)  # norms 10x apart: Cauchy–Schwarz alone (no potential) does not certify this
    a = FFNTensors([w * scale[:, None] for w in a.in_weights], [b * scale for b in a.in_biases], [w * scale for w in a.out_weights])
    assert _assert_sound(a, _noisy(a, 0.02, 1))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 96), d=st.integers(1, 300), bias=st.booleans(), noise=st.floats(0.0, 0.5), seed=st.integers(0, 2**16),
       scale_spread=st.floats(0.0, 2.0), swaps=st.integers(0, 2), alpha=st.floats(0.0, 1.0))
def test_certificate_is_sound_on_random_and_adversarial_costs(n, d, bias, noise, seed, scale_spread, swaps, alpha):
    """Random fine-tune-like pairs (noise, neurons of very different norms) with up to ``swaps`` neuron pairs mixed
    in the unseen tail: whenever the certificate claims the identity, it is optimal."""
    a = _ffn(n, d, seed, bias)
    scale = torch.logspace(-scale_spread, scale_spread, n)
    a = FFNTensors([w * scale[:, None] for w in a.in_weights], [b * scale for b in a.in_biases], [w * scale for w in a.out_weights])
    b = _noisy(a, noise, seed + 1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(swaps):
        i, j = torch.randperm(n, generator=g)[:2].tolist()
        a, b = _tail_adversary(b, i, j, alpha)
    _assert_sound(a, b)


def test_heterogeneous_norms_agree_with_the_full_lap():
    a = _ffn(256, 64, 0)
    scale = torch.logspace(-2, 1, 256)
    a = FFNTensors([w * scale[:, None] for w in a.in_weights], [b * scale for b in a.in_biases], [w * scale for w in a.out_weights])
    b = _noisy(a, 0.3, 2)
    s = ffn_similarity_or_identity(a, b)
    got = np.arange(256) if s is None else solve_lap(s)
    assert (got == solve_lap(ffn_similarity(a, b))).all()


def _fine_tune(model, scale: float = 0.01, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
            for k, v in model.state_dict().items()}


def _applied_anyway(state, spec, transform) -> dict[str, torch.Tensor]:
    """Every element applied, identity or not (what the code did before identity elements were skipped)."""
    view = StateView(state)
    for group in spec.groups():
        if isinstance(group, FFNGroup):
            if group.name in transform.ffn:
                write_ffn(view, group, permute_ffn(read_ffn(view, group), transform.ffn[group.name]))
        elif group.name in transform.heads:
            write_heads(view, group, transform_heads(read_heads(view, group), transform.heads[group.name]))
    return dict(view.state)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skipping_identity_elements_changes_no_bit_for_a_fine_tune(family):
    model, _ = make_model(family, 0)
    spec = spec_for(model.config, model.state_dict().keys())
    ref, ft = dict(model.state_dict()), _fine_tune(model)
    result = symmerge.align(ref, ft, symmetries="all", config=model.config)
    # a fine-tune keeps its neurons: every FFN permutation is the identity, and is skipped (the skip is exercised)
    assert all(is_identity_element(g, result.transform) for g in spec.ffn)
    forced = _applied_anyway(ft, spec, result.transform)
    assert set(forced) == set(result.state_dict)
    for k, v in forced.items():
        assert torch.equal(result.state_dict[k], v), k
    # a non-identity element does move its tensors (the comparison above can fail)
    perm = torch.roll(torch.arange(spec.ffn_width), 1)
    moved = apply_transform(ft, spec, ModelTransform(ffn={spec.ffn[0].name: perm}))
    assert not torch.equal(moved[spec.ffn[0].inputs[0].key], ft[spec.ffn[0].inputs[0].key])


def test_identity_heads_within_round_off():
    head = HeadTransform.identity(4, 8, torch.float64)
    assert is_identity_heads(head)
    near = HeadTransform(head.perm, head.kv_perm, head.qk_rotation + 1e-15, head.qk_scale, head.vo_rotation, head.vo_scale - 1e-15)
    assert is_identity_heads(near)
    assert not is_identity_heads(HeadTransform(head.perm, head.kv_perm, head.qk_rotation + 1e-6, head.qk_scale, head.vo_rotation,
                                               head.vo_scale))
    swapped = torch.tensor([1, 0, 2, 3])
    assert not is_identity_heads(HeadTransform(swapped, swapped, head.qk_rotation, head.qk_scale, head.vo_rotation, head.vo_scale))


def test_check_compatible_reads_shapes_from_headers(tmp_path, monkeypatch):
    model, _ = make_model("llama", 0)
    save_model(model, tmp_path / "a")
    save_model(make_model("llama", 1)[0], tmp_path / "b")
    a, b = LazyState(open_checkpoint(tmp_path / "a")), LazyState(open_checkpoint(tmp_path / "b"))

    def no_read(self, key):
        raise AssertionError(f"read {key}")

    monkeypatch.setattr(LazyState, "__getitem__", no_read)
    check_compatible(a, b)
    bad = {k: torch.zeros(1) for k in b.shapes()}
    with pytest.raises(SymmergeError, match="has shape"):
        check_compatible(a, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_in_one_pass(dtype):
    x = torch.randn(7, 5).to(dtype)
    assert all_finite(x) and all_finite(torch.zeros(0, dtype=dtype)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[3, 2] = bad
        assert not all_finite(y)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_report_reuses_the_distances_the_fit_measured(family, tmp_path, monkeypatch):
    """The per-layer fit records each group's (before, ‖ref‖²) while it reads the tensors; the report then does not
    read them again (memory-mapped models: a whole pass at 7B) and its numbers are those of a full recomputation."""
    model, _ = make_model(family, 0)
    save_model(model, tmp_path / "a")
    save_model(make_model(family, 1)[0], tmp_path / "b")
    a, b = LazyState(open_checkpoint(tmp_path / "a")), LazyState(open_checkpoint(tmp_path / "b"))
    spec = spec_for(model.config, a.keys())
    result = symmerge.align(a, b, symmetries="all", config=model.config)
    group_keys = {s.key for g in spec.groups() for s in g.slots()}
    fitted = match_weights(a, b, spec, frozenset({"ffn", "qk", "vo", "scale", "heads"}))
    assert set(fitted.distances) == group_keys & set(b.keys())
    # the same numbers as computing every distance afresh
    before = objective.squared_distances(b, a)
    assert result.report.distance_before == pytest.approx(np.sqrt(sum(before.values())), rel=1e-12)
    assert result.report.reference_norm == pytest.approx(objective.state_norm(a), rel=1e-12)
    # and the report used them: a wrong recorded value shows in it (the reuse is exercised)
    known = {k: (v[0] + 1.0, v[1]) for k, v in fitted.distances.items()}
    shifted, _, _ = objective.report_distances(b, a, b, a, (), known=known)
    assert sum(shifted.values()) == pytest.approx(sum(before.values()) + len(known), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_blocked_dominance_decides_as_the_formed_bound(seed):
    """``diagonal_dominates_blocked`` (rows of the bound formed a block at a time) takes the decision
    ``diagonal_dominates`` takes on the whole bound, on either side of the margin: diagonals scaled from just below to
    just above the largest competitor, with rows of very different norms (where the potentials decide)."""
    g = torch.Generator().manual_seed(seed)
    n = 150  # not a multiple of DOMINANCE_ROWS
    s = torch.randn(n, n, generator=g)
    x_rest, y_rest = torch.rand(n, generator=g), torch.rand(n, generator=g)
    x_norm, y_norm = 1 + 4 * torch.rand(n, generator=g), 1 + 4 * torch.rand(n, generator=g)
    bound = torch.addr(s, x_rest, y_rest)
    bound.addr_(x_norm, y_norm, alpha=1e-3)
    bound.fill_diagonal_(-torch.inf)
    decisions = set()
    for scale in (0.5, 0.9, 0.99, 1.0, 1.01, 1.1, 2.0):
        for potential in (torch.zeros(n), 0.5 * y_norm.square(), 0.5 * x_norm.square()):
            diag = scale * (bound.amax(1) - potential).abs() + potential
            expected = diagonal_dominates(bound.clone(), diag, x_norm, y_norm)
            assert diagonal_dominates_blocked(s, x_rest, y_rest, 1e-3, diag, x_norm, y_norm) == expected
            decisions.add(expected)
    assert decisions == {True, False}  # both sides of the margin were exercised


def test_stored_bf16_tensors_certify_and_give_the_float32_similarity(monkeypatch):
    """The certificate reads stored (bf16) tensors, converting chunk by chunk: a fine-tune is certified as from
    float32 copies, and where it is not (a permuted model) the similarity is bit for bit the one the float32 copies
    give (what the fit used to be handed) — with the float32 similarity forced: on a CPU with native bfloat16 the
    stored bfloat16 tensors would otherwise take the bfloat16 GEMM (tests/test_match.py)."""
    monkeypatch.setenv("SYMMERGE_SIMILARITY_DTYPE", "float32")
    def bf16(t: FFNTensors) -> FFNTensors:
        return FFNTensors(*([w.bfloat16() for w in ws] for ws in (t.in_weights, t.in_biases, t.out_weights)))

    def f32(t: FFNTensors) -> FFNTensors:
        return FFNTensors(*([w.float() for w in ws] for ws in (t.in_weights, t.in_biases, t.out_weights)))

    a = bf16(_ffn(1100, 256, 0))  # more neurons than NEURON_CHUNK, not a multiple of it
    ft = bf16(_noisy(f32(a), 0.01, 1))
    assert ffn_similarity_or_identity(a, ft) is None and ffn_similarity_or_identity(f32(a), f32(ft)) is None
    shuffled = permute_ffn(ft, torch.randperm(1100, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(ffn_similarity_or_identity(a, shuffled), ffn_similarity(f32(a), f32(shuffled)))


def alignment_gain(reference, model, spec, transform) -> float:
    """The oracle for fit_gain: by what fraction ``transform`` lowers the distance over the tensors its groups touch,
    measured by applying it (what merge's guard did before reading the gain off the fit)."""
    from symmerge.groups import apply_to_group

    sq_before = sq_after = 0.0
    for group in spec.groups():
        elements = transform.ffn if isinstance(group, FFNGroup) else transform.heads
        if group.name not in elements:
            continue
        keys = sorted({s.key for s in group.slots()})
        view = StateView({k: model[k] for k in keys})
        sq_before += sum(objective.squared_distance(view.state[k], reference[k]) for k in keys)
        apply_to_group(view, group, transform)
        sq_after += sum(objective.squared_distance(view.state[k], reference[k]) for k in keys)
    return 0.0 if sq_before == 0 else 1.0 - (sq_after / sq_before) ** 0.5


def _rotated_values(state: dict[str, torch.Tensor], spec, seed: int = 5) -> dict[str, torch.Tensor]:
    """``state`` with every head's value/output pair rotated by a random orthogonal matrix: the same function, heads
    in place (nothing permuted), far from the identity."""
    heads = {}
    g = torch.Generator().manual_seed(seed)
    for group in spec.attention:
        x = HeadTransform.identity(spec.num_heads, spec.head_dim, torch.float64, num_kv_heads=spec.num_kv_heads)
        x.vo_rotation = torch.linalg.qr(torch.randn(x.vo_rotation.shape, generator=g, dtype=torch.float64))[0]
        heads[group.name] = x
    return apply_transform(state, spec, ModelTransform(heads=heads))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_near_identity_rotations_are_not_applied_to_a_fine_tune(family):
    """Issue 10 item 4: a fine-tune's per-layer optimum permutes nothing and its rotations and scales gain less than
    MIN_GAIN (they fit fine-tuning noise), so align keeps the model exactly as it is — as merge does — and says so.
    The gain it reads off the fit is the one measured by applying the element (alignment_gain); a fit that
    measured no distances (Ray tasks) gets the same gain; an element that moves the model far is applied."""
    from symmerge.alignment import _near_identity_gain, permutes_nothing
    from symmerge.match.fit import Fit
    from symmerge.match.per_layer import MIN_GAIN, fit_gain

    model, _ = make_model(family, 0)
    spec = spec_for(model.config, model.state_dict().keys())
    ref, ft = dict(model.state_dict()), _fine_tune(model)
    fit = match_weights(ref, ft, spec, frozenset({"ffn", "qk", "vo", "scale", "heads"}))
    assert permutes_nothing(fit.transform)
    assert not all(is_identity_element(g, fit.transform) for g in spec.attention)  # there are rotations to leave out
    gain = fit_gain(ref, ft, spec, fit)
    assert 0 < gain <= MIN_GAIN
    assert gain == pytest.approx(alignment_gain(ref, ft, spec, fit.transform), rel=1e-3)
    no_distances = Fit(fit.transform, fit.details)
    assert _near_identity_gain(no_distances, ref, ft, spec) == pytest.approx(gain, rel=1e-6)

    result = symmerge.align(ref, ft, symmetries="all", config=model.config)
    assert result.report.matching["near_identity"]["applied"] is False
    assert all(is_identity_element(g, result.transform) for g in spec.groups())
    assert all(torch.equal(result.state_dict[k], ft[k]) for k in ft)
    assert result.report.distance_after == result.report.distance_before

    rotated = _rotated_values(ft, spec)  # heads in place, rotated far from the identity: aligned back
    result = symmerge.align(ref, rotated, symmetries="all", config=model.config)
    assert "near_identity" not in result.report.matching
    assert result.report.distance_after < 0.5 * result.report.distance_before


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "bert"])
@pytest.mark.parametrize("symmetries", ["all", "ffn", "qk,vo", "heads,scale"])
def test_the_gain_read_off_the_fit_is_the_gain_of_applying_it(family, symmetries):
    """merge's guard (and align's near-identity rule) read an element's gain off the fit — distances recorded
    while reading, less each part's reported decrease — instead of applying it and measuring both models again:
    the same value as alignment_gain, which applies it. Independent models (FFN and head permutations, rotations),
    fine-tunes, and a fit that recorded no distances (Ray tasks)."""
    from symmerge.alignment import parse_symmetries
    from symmerge.match.fit import Fit
    from symmerge.match.per_layer import fit_gain

    model, _ = make_model(family, 0)
    spec = spec_for(model.config, model.state_dict().keys())
    ref = dict(model.state_dict())
    for other in (dict(make_model(family, 1)[0].state_dict()), _fine_tune(model)):
        fit = match_weights(ref, other, spec, parse_symmetries(symmetries))
        expected = alignment_gain(ref, other, spec, fit.transform)
        assert fit_gain(ref, other, spec, fit) == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert fit_gain(ref, other, spec, Fit(fit.transform, fit.details)) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    moved = [d for d in fit.details.values() if d.get("neurons_moved") or d.get("heads_moved")]
    assert not moved  # the fine-tune permutes nothing; the independent pair did (checked below on its own fit)
    fit = match_weights(ref, dict(make_model(family, 1)[0].state_dict()), spec, parse_symmetries("all"))
    assert any(d.get("neurons_moved") for d in fit.details.values()) and any(d.get("heads_moved") for d in fit.details.values())
