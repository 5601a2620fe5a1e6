"""The head-assignment identity certificate (match/attention.py ``heads_certified_identity``): fine-tunes of one
base skip the whole-block correlations of every pair of heads. Sound: whenever it claims the identity, no head
permutation scores higher on the exact (float64, whole-block) scores, and the full path returns the identity too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from symmerge.groups.heads import HeadTensors
from symmerge.match.attention import frobenius_upper_bound, heads_certified_identity, match_head_permutation, match_heads

# "planes:2": partial rotary in rope_order coordinates (planes of the first 2 dimensions, an orthogonal block on the rest)
KINDS = [("planes", "orthogonal"), ("orthogonal", "orthogonal"), ("none", "orthogonal"), ("orthogonal", "none"), ("planes:2", "orthogonal")]


def _heads(h: int, dh: int, d: int, seed: int, spread: float = 0.0) -> HeadTensors:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-spread, spread, h)[:, None, None]  # heads of different norms
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    return HeadTensors(r(h, dh, d) * scale, r(h, dh) * scale[..., 0], r(h, dh, d) * scale, r(h, dh) * scale[..., 0],
                       r(h, dh, d) * scale, r(h, dh) * scale[..., 0], r(h, d, dh) * scale)


def _noisy(t: HeadTensors, noise: float, seed: int) -> HeadTensors:
    g = torch.Generator().manual_seed(seed)
    return HeadTensors(*(x + torch.randn(x.shape, generator=g) * noise * x.std() for x in (t.q, t.q_bias, t.k, t.k_bias, t.v, t.v_bias, t.o)))


def _block_score(m: np.ndarray, kind: str) -> float:
    """max tr(R^T M) over the rotation group, computed independently: O(k) by singular values, RoPE planes by the
    2×2 formula on each plane (i, i + k/2), none by the trace."""
    if kind == "orthogonal":
        return float(np.linalg.svd(m, compute_uv=False).sum())
    if kind == "planes":
        half = m.shape[0] // 2
        return float(sum(np.hypot(m[i, i] + m[i + half, i + half], m[i + half, i] - m[i, i + half]) for i in range(half)))
    if kind.startswith("planes:"):  # partial rotary: the planes of the first r dimensions, any orthogonal map on the rest
        r = int(kind.split(":")[1])
        return _block_score(m[:r, :r], "planes") + (_block_score(m[r:, r:], "orthogonal") if m.shape[0] > r else 0.0)
    return float(np.trace(m))


def _exact_scores(ref: HeadTensors, model: HeadTensors, qk_kind: str, vo_kind: str) -> np.ndarray:
    """score[g, h] in float64 from whole blocks, ``M = X_h Y_g^T`` summed over each side's parts."""
    def sides(t: HeadTensors) -> tuple[torch.Tensor, torch.Tensor]:
        t = HeadTensors(*(x.double() for x in (t.q, t.q_bias, t.k, t.k_bias, t.v, t.v_bias, t.o)))
        qk = torch.cat([t.q, t.q_bias[..., None], t.k, t.k_bias[..., None]], -1)
        vo = torch.cat([t.v, t.v_bias[..., None], t.o.transpose(-1, -2)], -1)
        return qk, vo
    (mq, mv), (rq, rv) = sides(model), sides(ref)
    h = ref.num_heads
    return np.array([[_block_score((mq[j] @ rq[i].T).numpy(), qk_kind) + _block_score((mv[j] @ rv[i].T).numpy(), vo_kind)
                      for j in range(h)] for i in range(h)])


def _assert_sound(ref: HeadTensors, model: HeadTensors, qk_kind: str, vo_kind: str) -> bool:
    if not heads_certified_identity(ref, model, qk_kind, vo_kind):
        return False
    exact = _exact_scores(ref, model, qk_kind, vo_kind)
    rows, cols = linear_sum_assignment(exact, maximize=True)
    assert np.trace(exact) >= exact[rows, cols].sum() - 1e-12 * np.abs(exact).sum()
    perm, kv_perm = match_head_permutation(ref, model, qk_kind, vo_kind)  # what the full path returns
    assert torch.equal(perm, torch.arange(ref.num_heads)) and torch.equal(kv_perm, torch.arange(ref.num_heads))
    return True


@pytest.mark.parametrize("qk_kind, vo_kind", KINDS)
@pytest.mark.parametrize("noise", [0.0, 0.01, 0.1])
def test_fine_tunes_certify_the_identity(qk_kind, vo_kind, noise):
    a = _heads(8, 16, 256, 0)
    assert _assert_sound(a, _noisy(a, noise, 1), qk_kind, vo_kind)


def test_heads_of_very_different_norms_are_certified_through_the_potential():
    a = _heads(8, 16, 256, 0, spread=0.5)  # norms 10x apart
    assert _assert_sound(a, _noisy(a, 0.02, 1), "planes", "orthogonal")


@pytest.mark.parametrize("qk_kind, vo_kind", KINDS)
def test_independent_or_permuted_heads_are_not_certified(qk_kind, vo_kind):
    a, b = _heads(8, 16, 256, 0), _heads(8, 16, 256, 1)
    assert not heads_certified_identity(a, b, qk_kind, vo_kind)
    perm = torch.tensor([1, 0, 2, 3, 4, 5, 7, 6])
    shuffled = HeadTensors(*(x[perm] for x in (a.q, a.q_bias, a.k, a.k_bias, a.v, a.v_bias, a.o)))
    assert not heads_certified_identity(a, shuffled, qk_kind, vo_kind)
    assert torch.equal(match_head_permutation(a, shuffled, qk_kind, vo_kind)[0][perm], torch.arange(8))


def test_only_cheap_sides_or_grouped_heads_are_left_to_the_solver():
    a = _heads(8, 16, 256, 0)
    assert not heads_certified_identity(a, a, "planes", "none")  # nothing expensive to skip
    gqa = HeadTensors(a.q, a.q_bias, a.k[:4], a.k_bias[:4], a.v[:4], a.v_bias[:4], a.o)
    assert not heads_certified_identity(gqa, gqa, "planes", "orthogonal")


def _tail_adversary(a: HeadTensors, i: int, j: int, alpha: float) -> tuple[HeadTensors, HeadTensors]:
    """Heads ``i`` and ``j`` of the reference agree on Q, K and V (the first features every partial sum sees); the
    model mixes their O columns (the last features, which the partial sums never see) with weight ``alpha`` on the
    other head: past ``alpha = 1/2`` swapping them scores higher than the identity."""
    q, k, v = a.q.clone(), a.k.clone(), a.v.clone()
    for x in (q, k, v):
        x[j] = x[i]
    ref = HeadTensors(q, a.q_bias.clone(), k, a.k_bias.clone(), v, a.v_bias.clone(), a.o.clone())
    o = ref.o.clone()
    o[i], o[j] = (1 - alpha) * ref.o[i] + alpha * ref.o[j], alpha * ref.o[i] + (1 - alpha) * ref.o[j]
    return ref, HeadTensors(q.clone(), ref.q_bias.clone(), k.clone(), ref.k_bias.clone(), v.clone(), ref.v_bias.clone(), o)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.49, 0.51, 0.9])
def test_a_swap_hidden_in_the_unseen_features_is_never_certified(alpha):
    ref, model = _tail_adversary(_heads(8, 16, 512, 3), 2, 5, alpha)
    exact = _exact_scores(ref, model, "planes", "orthogonal")
    rows, cols = linear_sum_assignment(exact, maximize=True)
    better = exact[rows, cols].sum() > np.trace(exact) + 1e-9 * np.abs(exact).sum()
    assert better == (alpha > 0.5)  # the adversary does what it says
    claimed = _assert_sound(ref, model, "planes", "orthogonal")
    if better:
        assert not claimed


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 10), dh=st.sampled_from([2, 4, 8]), d=st.integers(4, 128), noise=st.floats(0.0, 0.5), seed=st.integers(0, 2**16),
       spread=st.floats(0.0, 1.0), swap=st.booleans(), alpha=st.floats(0.0, 1.0), kinds=st.sampled_from(KINDS))
def test_certificate_is_sound_on_random_and_adversarial_heads(h, dh, d, noise, seed, spread, swap, alpha, kinds):
    a = _heads(h, dh, d, seed, spread)
    b = _noisy(a, noise, seed + 1)
    if swap:
        a, b = _tail_adversary(b, 0, h - 1, alpha)
    _assert_sound(a, b, *kinds)


def test_match_heads_is_unchanged_where_the_identity_is_certified():
    """The certificate only skips work: match_heads' element equals the one from the full head assignment."""
    a = _heads(8, 16, 256, 0)
    b = _noisy(a, 0.05, 1)
    assert heads_certified_identity(a, b, "planes", "orthogonal")
    x, details = match_heads(a, b, qk=True, vo=True, scale=True, heads=True, rope=True)
    assert details["heads_moved"] == 0 and torch.equal(x.perm, torch.arange(8))
    assert not torch.equal(x.vo_rotation, torch.eye(16).expand(8, 16, 16).double())  # the rotations were still fitted


def test_transposed_contiguous_is_the_plain_copy():
    """The 2-D transpose of head-split columns (W_O's layout) and the general path give ``transpose().contiguous()``."""
    from symmerge.groups.heads import split_head_columns
    from symmerge.match.attention import transposed_contiguous

    w = torch.randn(24, 4 * 6)
    for x in (split_head_columns(w, 4), torch.randn(4, 24, 6), torch.randn(4, 6, 24).transpose(-1, -2)):
        out = transposed_contiguous(x)
        assert out.is_contiguous() and torch.equal(out, x.transpose(-1, -2).contiguous())


def test_partial_rotary_pair_scores_are_the_exact_ones():
    """The scores the certificate and the head assignment use for a partial-rotary QK side (planes of the first r
    dimensions, an orthogonal block on the rest) are the best tr(R^T M) over that group, computed from whole blocks."""
    from symmerge.match.attention import _pair_scores, _side_parts

    def qk_only(t: HeadTensors) -> HeadTensors:
        return HeadTensors(t.q, t.q_bias, t.k, t.k_bias, torch.zeros_like(t.v), torch.zeros_like(t.v_bias), torch.zeros_like(t.o))

    a, b = qk_only(_heads(5, 8, 16, 3)), qk_only(_heads(5, 8, 16, 4))
    got = _pair_scores(_side_parts(b, "qk"), _side_parts(a, "qk"), "planes:2").numpy()
    np.testing.assert_allclose(got, _exact_scores(a, b, "planes:2", "none"), rtol=1e-5, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1e-30, 1e-3, 1.0, 1e15]), st.integers(1, 48))
def test_the_frobenius_bound_of_the_certificate_is_never_below_the_exact_norm(seed, magnitude, k):
    """The certificate's float32 Frobenius norms, made an upper bound by Higham's γ_n and float32's underflow, are
    never below the norm computed in float64 from the same float32 blocks (a plain float32 norm can fall below —
    squares of 1e-30 underflow to 0 — which would let the certificate claim an identity it has not proven), and
    within 2γ_n of it (plus the underflow term) where the entries are normal: the bound stays tight."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(3, 5, k, k, generator=g) * magnitude
    m[0, 0] = 0.0
    exact = torch.linalg.vector_norm(m.double(), dim=(-1, -2))
    bound = frobenius_upper_bound(m)
    assert bound.dtype == torch.float64
    assert bool((bound >= exact).all())
    n = k * k
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    assert bool((bound <= (exact * (1 + 2 * gamma) + (n * 2.0**-126) ** 0.5) * (1 + 1e-12)).all())
