"""Solvers on raw tensors: exactness and optimality, independent of any architecture."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from conftest import make_model
from tqdm.auto import tqdm

import symmerge.match.per_layer as per_layer
from symmerge.groups import ModelTransform, apply_transform, random_orthogonal
from symmerge.groups.ffn import FFNTensors
from symmerge.groups.heads import HeadTensors, HeadTransform, transform_heads
from symmerge.match import best_scale, ffn_similarity, match_heads, procrustes, rotation_and_scale, solve_lap
from symmerge.match.attention import objective, qk_blocks, side_statistics, vo_blocks
from symmerge.match.objective import report_distances, squared_distance, squared_norm
from symmerge.spec import StateView, spec_for

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


@pytest.mark.parametrize("backend", ["lapx", "scipy"])
def test_lap_is_exact_against_brute_force(backend):
    s = torch.randn(7, 7, generator=G(0))
    best = max(itertools.permutations(range(7)), key=lambda p: float(s[range(7), list(p)].sum()))
    assert list(solve_lap(s, backend=backend)) == list(best)


def test_lap_backends_agree_on_a_large_problem():
    a, b = torch.randn(600, 200, generator=G(1)), torch.randn(600, 200, generator=G(2))
    s = (a @ b.T).numpy()
    x, y = solve_lap(s, backend="lapx"), solve_lap(s, backend="scipy")
    idx = np.arange(600)
    assert abs(s[idx, x].sum() - s[idx, y].sum()) <= 1e-9 * abs(s[idx, y].sum())


def test_lap_in_place_cost_gives_the_same_assignment_and_touches_the_input_only_when_asked():
    s = torch.randn(300, 300, generator=torch.Generator().manual_seed(3))
    kept = s.clone()
    expected = solve_lap(s)
    assert torch.equal(s, kept)  # by default the caller's matrix is left alone
    assert np.array_equal(solve_lap(s, overwrite=True), expected)
    assert torch.equal(s, -kept)  # overwrite: it became the solver's (negated) cost
    doubles = kept.double()
    assert np.array_equal(solve_lap(doubles, overwrite=True), expected) and torch.equal(doubles, kept.double())  # not float32: copied


def test_lap_rejects_non_finite():
    with pytest.raises(ValueError):
        solve_lap(np.array([[0.0, np.nan], [1.0, 0.0]]))


def _assignment_value(s: np.ndarray, col_for_row: np.ndarray) -> float:
    return float(s[np.arange(len(s)), col_for_row].sum())


def test_identity_shortcut_never_skips_a_better_permutation():
    """Whenever the O(n²) check claims the identity optimal, no permutation scores higher (exact LAP by scipy as
    the judge), over random costs, near-identity costs (fine-tunes) and adversarial ones built to sit just past the
    check's boundary."""
    from scipy.optimize import linear_sum_assignment

    from symmerge.match.lap import identity_is_optimal

    rng = np.random.default_rng(0)
    claimed = 0
    for trial in range(600):
        n = int(rng.integers(2, 9))
        kind = trial % 3
        s = rng.normal(size=(n, n))
        if kind == 1:  # fine-tune-like: a dominant diagonal plus noise
            s += np.eye(n) * rng.uniform(0, 4)
        elif kind == 2:  # adversarial: diagonal = row max except one row just below it
            s[np.arange(n), np.arange(n)] = s.max(axis=1)
            r = int(rng.integers(n))
            s[r, r] -= rng.uniform(0, 1e-3)
        rows, cols = linear_sum_assignment(s, maximize=True)
        best = float(s[rows, cols].sum())
        if identity_is_optimal(s):
            claimed += 1
            assert float(np.trace(s)) >= best - 1e-12
        assert _assignment_value(s, solve_lap(s, backend="scipy")) == pytest.approx(best, abs=1e-9)
    assert claimed > 100  # the shortcut does fire


def test_identity_shortcut_returns_the_identity_on_fine_tune_like_costs():
    s = np.eye(50) * 10 + np.random.default_rng(1).normal(size=(50, 50))
    assert (solve_lap(s) == np.arange(50)).all()


def test_ffn_similarity_is_the_weight_matching_objective():
    a = FFNTensors([torch.randn(6, 4, generator=G(3))], [torch.randn(6, generator=G(4))], [torch.randn(4, 6, generator=G(5))])
    b = FFNTensors([torch.randn(6, 4, generator=G(6))], [torch.randn(6, generator=G(7))], [torch.randn(4, 6, generator=G(8))])
    expected = a.in_weights[0] @ b.in_weights[0].T + torch.outer(a.in_biases[0], b.in_biases[0]) + a.out_weights[0].T @ b.out_weights[0]
    assert torch.allclose(ffn_similarity(a, b), expected, atol=1e-5)


def _bf16_ffn(seed: int, n: int = 48, d: int = 16) -> FFNTensors:
    g = G(seed)
    w = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
    return FFNTensors([w(n, d), w(n, d)], [w(n)], [w(d, n)])


def test_similarity_dtype_is_bfloat16_only_for_bfloat16_tensors_on_a_native_cpu(monkeypatch):
    import symmerge.match.device as dev
    monkeypatch.delenv(dev.SIMILARITY_DTYPE_ENV, raising=False)
    bf, f32, cpu = torch.bfloat16, torch.float32, torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_has_native_bfloat16", lambda: True)
    assert dev.similarity_dtype((bf, bf), cpu) == bf
    assert dev.similarity_dtype((bf, f32), cpu) == f32  # a float32 tensor would be rounded: never implicitly
    assert dev.similarity_dtype((torch.float16, bf), cpu) == f32
    assert dev.similarity_dtype((bf, bf), torch.device("cuda")) == f32
    monkeypatch.setenv(dev.SIMILARITY_DTYPE_ENV, "float32")
    assert dev.similarity_dtype((bf, bf), cpu) == f32
    monkeypatch.setattr(dev, "cpu_has_native_bfloat16", lambda: False)
    monkeypatch.setenv(dev.SIMILARITY_DTYPE_ENV, "auto")
    assert dev.similarity_dtype((bf, bf), cpu) == f32  # emulated bfloat16 is slower than float32
    monkeypatch.setenv(dev.SIMILARITY_DTYPE_ENV, "bfloat16")
    assert dev.similarity_dtype((f32,), cpu) == bf
    monkeypatch.setenv(dev.SIMILARITY_DTYPE_ENV, "half")
    with pytest.raises(dev.SymmergeError, match="SYMMERGE_SIMILARITY_DTYPE must be auto, float32 or bfloat16"):
        dev.similarity_dtype((bf,), cpu)


def test_bfloat16_similarity_rounds_each_entry_once_and_recovers_a_permutation(monkeypatch):
    """Products of bfloat16 values are exact and the GEMM accumulates in float32: the bfloat16 path's S differs from
    the exact one only by one rounding of each entry of the weights term (at most 2^-8 relative, plus float32 accumulation) and the
    biases' float32 terms; a permuted copy is still recovered exactly."""
    monkeypatch.setenv("SYMMERGE_SIMILARITY_DTYPE", "bfloat16")
    a, b = _bf16_ffn(20), _bf16_ffn(21)
    d = lambda t: [w.double() for w in t]  # noqa: E731
    weights = sum(x @ y.T for x, y in zip(d(a.in_weights), d(b.in_weights))) + d(a.out_weights)[0].T @ d(b.out_weights)[0]
    exact = weights + torch.outer(*(t.in_biases[0].double() for t in (a, b)))
    s = ffn_similarity(a, b)
    assert s.dtype == torch.float32
    assert ((s.double() - exact).abs() <= 2.0**-8 * weights.abs() + 1e-4).all()
    no_bias = lambda t: FFNTensors(t.in_weights, [], t.out_weights)  # noqa: E731
    s = ffn_similarity(no_bias(a), no_bias(b))
    assert torch.equal(s, s.bfloat16().float())  # each entry rounded to bfloat16 once: the path ran in bfloat16
    monkeypatch.setenv("SYMMERGE_SIMILARITY_DTYPE", "float32")
    s = ffn_similarity(no_bias(a), no_bias(b))
    assert not torch.equal(s, s.bfloat16().float())
    monkeypatch.setenv("SYMMERGE_SIMILARITY_DTYPE", "bfloat16")
    perm = torch.randperm(48, generator=G(22))
    permuted = FFNTensors([w[perm] for w in a.in_weights], [v[perm] for v in a.in_biases], [w[:, perm] for w in a.out_weights])
    assert torch.equal(torch.from_numpy(solve_lap(ffn_similarity(a, permuted))), torch.argsort(perm))


def _procrustes_objective(r, x1, x2):
    return float((r.transpose(-1, -2) @ x1 - x2).square().sum())


def test_procrustes_is_optimal_against_random_perturbations():
    x1, x2 = torch.randn(5, 8, 30, generator=G(9), dtype=torch.float64), torch.randn(5, 8, 30, generator=G(10), dtype=torch.float64)
    r = procrustes(x1 @ x2.transpose(-1, -2))
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(8, dtype=torch.float64).expand(5, 8, 8), atol=1e-10)
    best = _procrustes_objective(r, x1, x2)
    g = G(11)
    for step in (1e-1, 1e-2, 1e-3):
        for _ in range(50):
            skew = torch.randn(5, 8, 8, generator=g, dtype=torch.float64) * step
            q = torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))
            assert _procrustes_objective(r @ q, x1, x2) >= best - 1e-9
    for _ in range(50):  # far away, reflections included
        assert _procrustes_objective(random_orthogonal(8, 5, g), x1, x2) >= best - 1e-9


def test_quartic_agrees_with_a_fine_1d_search():
    g = G(12)
    h = 64
    x_sq, y_sq = torch.rand(h, generator=g, dtype=torch.float64) * 5 + 0.1, torch.rand(h, generator=g, dtype=torch.float64) * 5 + 0.1
    x_dot, y_dot = torch.randn(h, generator=g, dtype=torch.float64) * 2, torch.randn(h, generator=g, dtype=torch.float64) * 2
    a = best_scale(x_sq, x_dot, y_dot, y_sq)
    grid = torch.logspace(-3, 3, 200_001, dtype=torch.float64)
    f = lambda s: s**2 * x_sq[:, None] - 2 * s * x_dot[:, None] + y_sq[:, None] / s**2 - 2 * y_dot[:, None] / s  # noqa: E731
    values = f(grid[None, :])
    grid_best = grid[values.argmin(1)]
    assert torch.all(a > 0)
    assert torch.allclose(a, grid_best, rtol=1e-4)
    assert torch.all(f(a[:, None]).squeeze(1) <= values.min(1).values + 1e-12)


def test_quartic_recovers_a_planted_scale():
    g = G(13)
    x2, y2 = torch.randn(10, 4, 20, generator=g, dtype=torch.float64), torch.randn(10, 4, 20, generator=g, dtype=torch.float64)
    true = torch.exp(torch.randn(10, generator=g, dtype=torch.float64))
    x1, y1 = x2 / true[:, None, None], y2 * true[:, None, None]  # a = true undoes it
    s = side_statistics((x1, y1), (x2, y2))
    eye = torch.eye(4, dtype=torch.float64)
    a = best_scale(s.x_sq, (eye * s.m_x).sum((-1, -2)), (eye * s.m_y).sum((-1, -2)), s.y_sq)
    assert torch.allclose(a, true, rtol=1e-9)


def test_alternation_never_increases_and_beats_rotation_then_scale():
    g = G(14)
    x1, y1, x2, y2 = (torch.randn(12, 6, 25, generator=g, dtype=torch.float64) for _ in range(4))
    side = side_statistics((x1 * 2.0, y1 * 0.7), (x2, y2))
    r, a, history = rotation_and_scale(side, rotate=True, scale=True)
    assert all(b <= a_ + 1e-9 for a_, b in zip(history, history[1:]))
    assert len(history) > 3  # it really alternated
    # the paper's one-shot rotation-then-scale is the first two steps; alternation is at least as good
    r1 = procrustes(side.m_x + side.m_y)
    a1 = best_scale(side.x_sq, (r1 * side.m_x).sum((-1, -2)), (r1 * side.m_y).sum((-1, -2)), side.y_sq)
    assert objective(side, r, a).sum() <= objective(side, r1, a1).sum() + 1e-9


def _random_heads(h, dh, d, seed):
    g = G(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return HeadTensors(r(h, dh, d), r(h, dh), r(h, dh, d), r(h, dh), r(h, dh, d), r(h, dh), r(h, d, dh))


def _distance(a: HeadTensors, b: HeadTensors) -> float:
    return sum(float((getattr(a, f) - getattr(b, f)).square().sum()) for f in ("q", "q_bias", "k", "k_bias", "v", "v_bias", "o"))


def test_joint_head_permutation_and_rotation_is_the_exact_optimum():
    """Against brute force: every head permutation, each followed by per-head Procrustes (docs/DESIGN.md §2)."""
    ref, model = _random_heads(4, 3, 10, 15), _random_heads(4, 3, 10, 16)
    x, _ = match_heads(ref, model, qk=True, vo=True, scale=False, heads=True)
    ours = _distance(transform_heads(model, x), ref)
    brute = []
    for perm in itertools.permutations(range(4)):
        p = HeadTransform.identity(4, 3, torch.float64)
        p.perm = torch.tensor(perm)
        permuted = transform_heads(model, p)
        y, _ = match_heads(ref, permuted, qk=True, vo=True, scale=False, heads=False)
        brute.append(_distance(transform_heads(permuted, y), ref))
    assert ours <= min(brute) + 1e-9


def test_match_heads_with_scale_is_no_worse_than_without():
    ref, model = _random_heads(6, 4, 12, 17), _random_heads(6, 4, 12, 18)
    without, _ = match_heads(ref, model, qk=True, vo=True, scale=False, heads=True)
    with_scale, details = match_heads(ref, model, qk=True, vo=True, scale=True, heads=True)
    assert _distance(transform_heads(model, with_scale), ref) <= _distance(transform_heads(model, without), ref) + 1e-9
    assert details["qk_objective_decrease"] >= 0 and details["vo_objective_decrease"] >= 0


def test_blocks_cover_every_tensor_of_the_objective():
    """The side statistics reproduce the squared distance exactly (biases as per-head slices, not full vectors)."""
    ref, model = _random_heads(3, 4, 9, 19), _random_heads(3, 4, 9, 20)
    total = 0.0
    for blocks in (qk_blocks, vo_blocks):
        s = side_statistics(blocks(model), blocks(ref))
        x2, y2 = blocks(ref)
        eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
        total += float(objective(s, eye, torch.ones(3, dtype=torch.float64)).sum() + sum(part.square().sum() for part in (*x2, *y2)))
    assert np.isclose(total, _distance(model, ref))


def test_plane_statistics_are_those_of_the_plane_ordered_blocks():
    """RoPE's per-plane statistics, read from each head's whole correlation, equal those of the blocks gathered
    into plane order (:func:`to_planes`, the definition), for query groups of one and of two heads."""
    from symmerge.match.attention import plane_statistics, to_planes

    def heads(kv: int, seed: int) -> HeadTensors:
        g = G(seed)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        return HeadTensors(r(4, 8, 9), r(4, 8), r(kv, 8, 9), r(kv, 8), r(kv, 8, 9), r(kv, 8), r(4, 9, 8))

    for kv in (4, 2):
        ref, model = heads(kv, 21), heads(kv, 22)
        assert model.group_size == 4 // kv
        for blocks in (qk_blocks, vo_blocks):
            got = plane_statistics(blocks(model), blocks(ref))
            want = side_statistics(to_planes(blocks(model)), to_planes(blocks(ref)))
            for field in ("m_x", "m_y", "x_sq", "y_sq"):
                assert getattr(got, field).shape == getattr(want, field).shape
                assert torch.allclose(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5), field


def test_plane_score_is_the_best_plane_rotation():
    from symmerge.groups.heads import plane_rotation_matrix
    from symmerge.match.procrustes import plane_score

    m = torch.randn(3, 6, 6, generator=G(21), dtype=torch.float64)
    best = torch.zeros(3, dtype=torch.float64)
    angles = torch.linspace(0, 2 * np.pi, 721, dtype=torch.float64)
    for p in range(3):  # planes are independent: maximise each over a fine angle grid
        cos, sin = torch.ones(3, len(angles), 3, dtype=torch.float64), torch.zeros(3, len(angles), 3, dtype=torch.float64)
        cos[:, :, p], sin[:, :, p] = torch.cos(angles), torch.sin(angles)
        r = plane_rotation_matrix(cos.reshape(-1, 3), sin.reshape(-1, 3)).reshape(3, len(angles), 6, 6)
        values = (r * m[:, None]).sum((-1, -2))
        half = 3
        diag_rest = sum(m[:, i, i] + m[:, i + half, i + half] for i in range(3) if i != p)
        best += (values - diag_rest[:, None]).max(1).values
    assert torch.allclose(plane_score(m), best, rtol=1e-4)


def test_proper_procrustes_never_reflects_and_is_optimal_among_rotations():
    m = torch.randn(200, 2, 2, generator=G(22), dtype=torch.float64)
    r = procrustes(m, proper=True)
    assert torch.allclose(torch.linalg.det(r), torch.ones(200, dtype=torch.float64))
    angles = torch.linspace(0, 2 * np.pi, 3601, dtype=torch.float64)
    grid = torch.stack([torch.stack([torch.cos(angles), -torch.sin(angles)], -1), torch.stack([torch.sin(angles), torch.cos(angles)], -1)], -2)
    best = (grid[None] * m[:, None]).sum((-1, -2)).max(1).values
    assert torch.all((r * m).sum((-1, -2)) >= best - 1e-9)


def test_gqa_head_assignment_recovers_planted_groups():
    """8 query heads over 2 KV heads: KV heads swapped and query heads shuffled inside groups are found exactly."""
    from symmerge.groups.heads import group_permutation

    g = G(23)
    ref = HeadTensors(*(torch.randn(*s, generator=g, dtype=torch.float64) for s in
                        [(8, 4, 12), (8, 4), (2, 4, 12), (2, 4), (2, 4, 12), (2, 4), (8, 12, 4)]))
    x = HeadTransform.identity(8, 4, torch.float64, 2)
    x.kv_perm = torch.tensor([1, 0])
    x.perm = group_permutation(x.kv_perm, torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]]), 4)
    x.qk_rotation = random_orthogonal(4, 2, g)
    x.vo_rotation = random_orthogonal(4, 2, g)
    scrambled = transform_heads(ref, x)
    y, _ = match_heads(ref, scrambled, qk=True, vo=True, scale=True, heads=True)
    assert _distance(transform_heads(scrambled, y), ref) <= 1e-18 * _distance(ref, scrambled)


def test_head_matching_on_equivalent_rows_equals_matching_on_all_positions():
    """Activation matching keeps only the Gram matrix of [q of both models] (k, v alike) over the calibration positions and
    rebuilds activations with the same inner products (:func:`_equivalent_rows`): head matching then finds the element
    it finds on all the positions (every quantity it uses contracts over positions). Negative control: rows that keep
    only the reference's blocks' inner products (the model's Gram rebuilt separately) lose the cross-correlations and
    find a different element."""
    from symmerge.groups.heads import HeadTensors
    from symmerge.match.activations import _equivalent_rows
    from symmerge.match.attention import match_heads

    g = torch.Generator().manual_seed(0)
    n, h, dh = 600, 4, 8
    ref = [torch.randn(n, h * dh, generator=g) for _ in range(3)]
    # the model: the reference's heads shuffled and rotated, plus noise
    perm = torch.randperm(h, generator=g)
    rot = torch.linalg.qr(torch.randn(h, dh, dh, generator=g))[0]
    model = [torch.einsum("nhd,hde->nhe", x.reshape(n, h, dh)[:, perm], rot).reshape(n, h * dh) + 0.1 * torch.randn(n, h * dh, generator=g)
             for x in ref]

    def heads(parts: list[torch.Tensor]) -> HeadTensors:
        q, k, v = (t.reshape(t.shape[0], h, dh).permute(1, 2, 0) for t in parts)
        return HeadTensors(q, torch.zeros(h, dh), k, torch.zeros(h, dh), v, torch.zeros(h, dh), torch.zeros(h, 1, dh))

    def match(r, m):
        x, _ = match_heads(heads(r), heads(m), qk=True, vo=True, scale=False, heads=True, rope=False, qk_fixed=False)
        return x

    grams = [torch.cat([r, m], dim=1).double() for r, m in zip(ref, model)]
    rows = [_equivalent_rows(z.T @ z, [h * dh] * 2) for z in grams]
    full, compact = match(ref, model), match([r for r, _ in rows], [m for _, m in rows])
    assert torch.equal(full.perm, compact.perm)
    assert torch.allclose(full.qk_rotation, compact.qk_rotation, atol=1e-4)
    assert torch.allclose(full.vo_rotation, compact.vo_rotation, atol=1e-4)
    wrong = match([_equivalent_rows(r.double().T @ r.double(), [h * dh])[0] for r in ref],
                  [_equivalent_rows(m.double().T @ m.double(), [h * dh])[0] for m in model])
    assert not (torch.equal(wrong.perm, full.perm) and torch.allclose(wrong.qk_rotation, full.qk_rotation, atol=1e-2))


def test_report_distances_in_one_pass_equal_the_separate_sums():
    """alignment's report reads every tensor once (report_distances); the sums are those of squared_distances and
    state_norm, with untouched tensors' after-distances taken from before."""
    from symmerge.match.objective import report_distances, squared_distances, state_norm

    g = torch.Generator().manual_seed(1)
    ref = {"a": torch.randn(5, 4, generator=g), "b": torch.randn(3, generator=g), "only_ref": torch.randn(2, generator=g),
           "ids": torch.arange(4)}
    model = {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in ref.items() if k != "only_ref"}
    aligned = {k: (v * 0.5 if k == "a" else v) for k, v in model.items()}
    before, after, ref_sq = report_distances(model, ref, aligned, ref, moved={"a"})
    assert before == squared_distances(model, ref)
    assert after == {**before, **squared_distances(aligned, ref, ["a"])} and after["a"] != before["a"]
    assert ref_sq == pytest.approx(state_norm(ref) ** 2, rel=1e-12)
    partner = {**ref, "extra": torch.ones(3)}  # a partner holding a tensor the reference lacks (an untied head)
    _, after, _ = report_distances(model, ref, {**aligned, "extra": torch.zeros(3)}, partner, moved={"a", "b", "extra"})
    assert after == squared_distances({**aligned, "extra": torch.zeros(3)}, partner)


@pytest.mark.parametrize("kind", ["planes", "none", "orthogonal", "planes:4"])
def test_pair_statistics_score_every_head_pair_as_the_whole_blocks_do(kind):
    """Head assignment reads only the entries each rotation group's score needs (RoPE planes: 4 per plane; none:
    the diagonal; partial rotary in rope_order coordinates: the planes of the first r dimensions and the whole
    unrotated block); the scores equal those computed from the whole d_h×d_h blocks."""
    from symmerge.match.attention import pair_correlations, pair_statistics, rotation_score
    from symmerge.match.procrustes import nuclear_norm, plane_score

    g = torch.Generator().manual_seed(2)
    model, reference = torch.randn(6, 8, 20, generator=g, dtype=torch.float64), torch.randn(5, 8, 20, generator=g, dtype=torch.float64)
    full = pair_correlations(model, reference)
    score = {"planes": plane_score, "none": lambda m: torch.diagonal(m, dim1=-2, dim2=-1).sum(-1), "orthogonal": nuclear_norm,
             "planes:4": lambda m: plane_score(m[..., :4, :4]) + nuclear_norm(m[..., 4:, 4:])}[kind]
    stats = pair_statistics(model, reference, kind)
    torch.testing.assert_close(rotation_score(stats, kind), score(full))
    # taking the entries is linear in M: the statistics of two parts (query and key) add up to those of M_q + M_k
    other, other_ref = torch.randn(6, 8, 20, generator=g, dtype=torch.float64), torch.randn(5, 8, 20, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rotation_score(stats + pair_statistics(other, other_ref, kind), kind),
                               score(full + pair_correlations(other, other_ref)))
    if kind in ("planes", "none"):
        assert stats.numel() < full.numel() / 3


@pytest.mark.parametrize("rotary_dim, interleaved", [(4, False), (4, True), (0, True), (2, False)])
def test_match_heads_recovers_partial_and_interleaved_rope_elements(rotary_dim, interleaved):
    """GQA heads (d_h = 8) scrambled by the layout's QK group (plane rotations and scales in the layout, an
    orthogonal block with one scale on the unrotated dimensions), a VO map and a head permutation are recovered
    exactly, and the element found is in the group; a whole-head QK rotation (not in the group) is not undone."""
    from symmerge.groups.heads import group_permutation, rope_free_dims, rope_planes, rope_rotation

    g = G(31)
    dh, kv = 8, 2
    rotated = rotary_dim or dh
    ref = HeadTensors(*(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                        [(4, dh, 12), (4, dh), (kv, dh, 12), (kv, dh), (kv, dh, 12), (kv, dh), (4, 12, dh)]))
    angles = torch.rand(kv, rotated // 2, generator=g, dtype=torch.float64) * 6
    free = random_orthogonal(dh - rotated, kv, g) if rotated < dh else None
    x = HeadTransform.identity(4, dh, torch.float64, kv)
    x.kv_perm = torch.tensor([1, 0])
    x.perm = group_permutation(x.kv_perm, torch.tensor([[1, 0], [0, 1]]), 2)
    x.qk_rotation = rope_rotation(torch.cos(angles), torch.sin(angles), free, dh, rotary_dim, interleaved)
    planes, rest = rope_planes(dh, rotary_dim, interleaved), rope_free_dims(dh, rotary_dim)
    scale = torch.ones(kv, dh, dtype=torch.float64)
    for p, (i, j) in enumerate(planes.tolist()):
        scale[:, [i, j]] = 1.5 + 0.1 * p
    scale[:, rest] = 0.6
    x.qk_scale = scale
    x.vo_rotation = random_orthogonal(dh, kv, g)
    scrambled = transform_heads(ref, x)
    kw = {"qk": True, "vo": True, "scale": True, "heads": True, "rope": True, "rotary_dim": rotary_dim, "rope_interleaved": interleaved}
    y, _ = match_heads(ref, scrambled, **kw)
    assert _distance(transform_heads(scrambled, y), ref) <= 1e-18 * _distance(ref, scrambled)
    inside = torch.zeros(dh, dh, dtype=torch.bool)
    for i, j in planes.tolist():
        inside[[i, i, j, j], [i, j, i, j]] = True
    inside[rest[:, None], rest[None, :]] = True
    assert torch.all(y.qk_rotation[:, ~inside].abs() <= 1e-12)
    outside = HeadTransform.identity(4, dh, torch.float64, kv)
    outside.qk_rotation = random_orthogonal(dh, kv, g)
    moved = transform_heads(ref, outside)
    z, _ = match_heads(ref, moved, **kw)
    assert _distance(transform_heads(moved, z), ref) > 1e-3 * _distance(ref, moved)


def test_squared_distance_is_accurate_and_leaves_its_inputs_alone():
    """Chunked float32 partial norms summed in float64: close to the float64 value on a large tensor (a single
    float32 norm over 45M entries was 0.7 % off), and float32 inputs are not overwritten by the differences."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 2048, generator=g) * 0.02
    b = a + torch.randn(2048, 2048, generator=g) * 2e-4
    kept_a, kept_b = a.clone(), b.clone()
    exact = float((a.double() - b.double()).square().sum())
    assert squared_distance(a, b) == pytest.approx(exact, rel=2e-5)  # float32 differences: ~3e-6; one float32 norm: 2e-4
    assert torch.equal(a, kept_a) and torch.equal(b, kept_b)
    assert squared_norm(a.bfloat16()) == pytest.approx(float(a.bfloat16().double().square().sum()), rel=1e-6)
    assert squared_distance(torch.zeros(0), torch.zeros(0)) == 0.0
    assert squared_distance(torch.tensor(3.0), torch.tensor(1.0)) == 4.0


def _tiny_bert_pair():
    ref, other = (make_model("bert", seed)[0] for seed in (0, 1))
    return ref.state_dict(), other.state_dict(), spec_for(ref.config, ref.state_dict().keys())


def test_attention_fits_run_while_the_ffn_solvers_do_and_give_the_same_element(monkeypatch):
    """fit_per_layer fits each attention group right after an FFN's matrix goes to its solver (fit_ffn's
    ``interleave``), before the last FFN solver is waited for; the element equals the FFN fit and the attention fits
    run separately (each group's fit is independent). Negative control: without attention classes no attention fit
    runs, and an FFN-only fit has no heads."""
    ref, other, spec = _tiny_bert_pair()
    seed_classes = frozenset({"ffn", "qk", "vo", "scale"})
    events = []
    fit_attention, solve = per_layer.fit_attention_group, per_layer.solve_ffn
    monkeypatch.setattr(per_layer, "fit_attention_group", lambda r, m, group, *a: (events.append(("attention", group.name)), fit_attention(r, m, group, *a))[1])
    monkeypatch.setattr(per_layer, "solve_ffn", lambda s, width: (events.append(("lap", width)), solve(s, width))[1])
    both = per_layer.fit_per_layer(ref, other, spec, seed_classes)
    assert [e for e in events if e[0] == "attention"] == [("attention", g.name) for g in spec.attention]
    last_lap = max(i for i, e in enumerate(events) if e[0] == "lap")
    assert events.index(("attention", spec.attention[0].name)) < last_lap  # the first attention fit ran before the last LAP started
    assert set(both.seconds) == {"ffn", "attention"} and both.seconds["attention"] > 0 and both.seconds["ffn"] > 0

    events.clear()
    ffn_only = per_layer.fit_per_layer(ref, other, spec, frozenset({"ffn"}))
    attention_only = per_layer.fit_per_layer(ref, other, spec, seed_classes - {"ffn"})
    assert not [e for e in events[: len(spec.ffn)] if e[0] == "attention"] and not ffn_only.transform.heads
    assert list(both.transform.ffn) == [g.name for g in spec.ffn] and list(both.transform.heads) == [g.name for g in spec.attention]
    for name, perm in ffn_only.transform.ffn.items():
        assert torch.equal(both.transform.ffn[name], perm)
    for name, x in attention_only.transform.heads.items():
        y = both.transform.heads[name]
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("perm", "kv_perm", "qk_rotation", "qk_scale", "vo_rotation", "vo_scale"))
    assert list(both.details.items()) == list({**ffn_only.details, **attention_only.details}.items())  # FFNs first, as before


@pytest.mark.parametrize("items", [0, 1, 2, 5])
def test_fit_ffn_runs_every_interleaved_item_once_in_order(items):
    """More or fewer items than FFN groups (2 here): each runs once, in order, with torch's threads less those of
    the LAPs submitted and not yet collected (one after the first FFN, then two: ``max_pending``), and the
    permutations are unchanged."""
    ref, other, spec = _tiny_bert_pair()
    ran, threads = [], []
    old = torch.get_num_threads()
    with tqdm(disable=True) as bar:
        plain = per_layer.fit_ffn(StateView(ref), StateView(other), spec, bar)
        torch.set_num_threads(4)
        try:
            perms = per_layer.fit_ffn(StateView(ref), StateView(other), spec, bar,
                                      interleave=[lambda i=i: (ran.append(i), threads.append(torch.get_num_threads())) for i in range(items)])
            assert torch.get_num_threads() == 4  # restored
        finally:
            torch.set_num_threads(old)
    assert ran == list(range(items))
    assert threads == [3, 2, 2, 2, 2][:items]  # the solvers' cores are left to them
    assert perms.keys() == plain.keys() and all(torch.equal(perms[k][0], plain[k][0]) and perms[k][1] == plain[k][1] for k in plain)


def _fine_tuned(state: dict, seed: int = 3, noise: float = 1e-4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + noise * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def test_fit_ffn_certifies_the_next_ffn_beside_each_attention_fit_when_no_lap_runs(monkeypatch):
    """Fine-tunes of one base: every FFN's identity is certified and no LAP is solved. The first FFN is certified
    here; each next one on the certifier's thread, one torch thread, while the attention fit of the layer before
    runs here on the other threads (on 2 cores both mostly single-threaded passes ran one after the other, one core
    idle); the last attention fit, with nothing beside it, gets every thread. Same permutations and recorded
    distances as each FFN fitted alone."""
    ref, _, spec = _tiny_bert_pair()
    tuned = _fine_tuned(ref)
    assert len(spec.ffn) == 2
    threads, certified_on = [], []
    certify = per_layer.ffn_group_certified
    monkeypatch.setattr(per_layer, "ffn_group_certified",
                        lambda *a, **k: (certified_on.append((threading.get_ident(), torch.get_num_threads())), certify(*a, **k))[1])
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        distances: dict = {}
        with tqdm(disable=True) as bar:
            perms = per_layer.fit_ffn(StateView(ref), StateView(tuned), spec, bar, distances=distances,
                                      interleave=[lambda: threads.append(torch.get_num_threads())] * 3)
        assert torch.get_num_threads() == 4  # restored
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(p, torch.arange(len(p))) and decrease == 0 for p, decrease in perms.values())
    assert per_layer.ffn_group_similarity(StateView(ref), StateView(tuned), spec.ffn[0]) is None  # certified: no LAP
    assert [n for _, n in certified_on] == [1] and certified_on[0][0] != threading.get_ident()  # the second FFN, elsewhere
    assert threads == [3, 4, 4]
    alone: dict = {}
    for group in spec.ffn:
        per_layer.record_distances(StateView(ref), StateView(tuned), group, alone)
    assert distances == alone


def test_fit_ffn_builds_the_similarity_here_when_a_certificate_tried_ahead_fails(monkeypatch):
    """The first FFN of a fine-tune is certified, the second is not (its neurons permuted): the certificate tried
    ahead on the certifier's thread fails, the similarity is built here with every thread (not on the certifier's
    one thread, and without a second certificate attempt), and the LAP recovers the permutation — the same
    permutations and decreases as fitting each FFN on its own."""
    ref, _, spec = _tiny_bert_pair()
    tuned = _fine_tuned(ref)

    width = spec.ffn[1].width
    shuffle = torch.randperm(width, generator=torch.Generator().manual_seed(5))
    tuned = apply_transform(tuned, spec, ModelTransform(ffn={spec.ffn[1].name: shuffle}))
    calls = []
    certify, full = per_layer.ffn_group_certified, per_layer.ffn_group_full_similarity
    monkeypatch.setattr(per_layer, "ffn_group_certified", lambda *a, **k: (calls.append("certify"), certify(*a, **k))[1])
    monkeypatch.setattr(per_layer, "ffn_group_full_similarity",
                        lambda *a, **k: (calls.append(("full", torch.get_num_threads())), full(*a, **k))[1])
    with tqdm(disable=True) as bar:
        perms = per_layer.fit_ffn(StateView(ref), StateView(tuned), spec, bar, interleave=[lambda: None] * 2)
    assert calls == ["certify", ("full", torch.get_num_threads())]
    for group in spec.ffn:
        alone = per_layer.solve_ffn(per_layer.ffn_group_similarity(StateView(ref), StateView(tuned), group), group.width)
        assert torch.equal(perms[group.name][0], alone[0]) and perms[group.name][1] == alone[1]
    assert torch.equal(perms[spec.ffn[0].name][0], torch.arange(width))
    assert not torch.equal(perms[spec.ffn[1].name][0], torch.arange(width))  # recovered, not the identity


class _ThreadLog(dict):
    """A state dict that logs which thread reads it."""

    def __init__(self, *a, log: set, **k):
        super().__init__(*a, **k)
        self.log = log

    def __getitem__(self, key):
        self.log.add(threading.get_ident())
        return super().__getitem__(key)


def test_report_distances_reads_the_states_on_one_worker_thread_while_this_one_measures():
    """The aligned state's next unit is computed while the last one is measured: every read of the model, the aligned
    state and the partner happens on one reader thread (never this one: a plain loop would read here), and the sums
    are unchanged."""
    g = torch.Generator().manual_seed(4)
    ref = {k: torch.randn(6, 5, generator=g) for k in "abcd"}
    model = {k: v + torch.randn(v.shape, generator=g) for k, v in ref.items()}
    aligned = {k: v.flip(0) if k in "ab" else v for k, v in model.items()}
    log: set = set()
    got = report_distances(_ThreadLog(model, log=log), _ThreadLog(ref, log=log), _ThreadLog(aligned, log=log), _ThreadLog(ref, log=log),
                           moved={"a", "b"})
    assert got == report_distances(model, ref, aligned, ref, moved={"a", "b"})
    assert len(log) == 1 and threading.get_ident() not in log
