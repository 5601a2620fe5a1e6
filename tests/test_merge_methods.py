"""Merge methods on small tensors: hand-computed values, the papers' identities, the registry's validation."""

from __future__ import annotations

import math
import re

import pytest
import torch

from symmerge.errors import SymmergeError
from symmerge.merge import (
    MERGE_METHODS,
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_seed,
    dare_ties,
    della,
    della_keep_probabilities,
    della_linear,
    fisher,
    fisher_model_norms,
    get_method,
    global_magnitude_thresholds,
    karcher,
    linear,
    list_methods,
    magnitude_threshold,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    validate_params,
)
from symmerge.merge.methods import anchored, common, interpolation, sparsify, with_data
from symmerge.merge.methods import generalized_task_arithmetic as gta

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
T = lambda *xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731


METHOD_MODULES = (common, sparsify, gta, interpolation, anchored, with_data)


def _patch(monkeypatch, name, value):
    """Set a module-level setting or helper in every methods module that holds it (each imports it by name)."""
    holders = [m for m in METHOD_MODULES if hasattr(m, name)]
    assert holders, name
    for module in holders:
        monkeypatch.setattr(module, name, value)


def close(a: torch.Tensor, b, atol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------- linear, task arith


def test_linear_weighted_normalized_and_not():
    a, b = T(1, 2, 3), T(3, 6, -1)
    assert close(linear([a, b]), T(2, 4, 1))
    assert close(linear([a, b], weights=[1, 3]), T(2.5, 5, 0))  # (1·a + 3·b) / 4
    assert close(linear([a, b], weights=[1, 3], normalize=False), T(10, 20, 0))
    assert close(linear([a, b], normalize=False), T(4, 8, 2))


def test_task_arithmetic():
    base, a, b = T(1, 1, 1), T(2, 0, 1), T(1, 3, -1)  # τ_a = (1, -1, 0), τ_b = (0, 2, -2)
    assert close(task_arithmetic([a, b], base=base), T(2, 2, -1))
    assert close(task_arithmetic([a, b], base=base, weights=[2, 0.5], lambda_=0.5), T(2, 0.5, 0.5))  # 1 + ½(2τ_a + ½τ_b)
    assert close(task_arithmetic([a, b], base=base, weights=[1, -1]), T(2, -2, 3))  # negation


# ------------------------------------------------------------------------------------------------------- TIES

BASE6 = T(1, 1, 1, 1, 1, 1)
TAUS6 = [T(1, -2, 3, 0, 1, 2), T(2, 1, -1, 0, 0.5, 3), T(-4, 1, -1, 0, 0, -1)]


def test_ties_sign_election_and_disjoint_mean_by_hand():
    # Σ τ = (-1, 0, 1, 0, 1.5, 4) → signs (−, tie, +, none, +, +).
    # e0: only τ_3 = -4 agrees. e1: a tie elects nothing → 0. e2: only τ_1 = 3. e3: all zero → 0.
    # e4: τ_1, τ_2 agree, τ_3 = 0 does not count → (1 + 0.5)/2. e5: τ_1, τ_2 → 2.5 (τ_3 = -1 disagrees).
    models = [BASE6 + t for t in TAUS6]
    tau_m = T(-4, 0, 3, 0, 0.75, 2.5)
    assert close(ties(models, base=BASE6, density=1.0), BASE6 + tau_m)
    assert close(ties(models, base=BASE6, density=1.0, lambda_=0.5), BASE6 + 0.5 * tau_m)


def test_ties_weights_move_the_election_and_the_mean():
    # weights (1, 1, 3): Σ w τ = (-9, 2, -1, 0, 1.5, 2). e1 now elects +: τ_2 = 1 (w 1) and τ_3 = 1 (w 3) → 1;
    # e2 elects −: τ_2 = τ_3 = -1 → -1; e4, e5 as before (weighted means of equal-weight survivors).
    models = [BASE6 + t for t in TAUS6]
    assert close(ties(models, base=BASE6, weights=[1, 1, 3], density=1.0), BASE6 + T(-4, 1, -1, 0, 0.75, 2.5))
    # a weighted mean proper: e5 with weights (1, 3, 1): (2·1 + 3·3)/4
    out = ties(models, base=BASE6, weights=[1, 3, 1], density=1.0)
    assert close(out[5], 1 + 11 / 4)


def test_ties_trims_to_density():
    tau = T(0.1, -0.5, 0.3, -0.2, 0.05, 0.9, -0.7, 0.0, 0.4, -0.15)
    assert magnitude_threshold(tau.abs(), 0.3) == pytest.approx(0.5)
    zero = torch.zeros(10)
    assert close(ties([tau], base=zero, density=0.3), T(0, -0.5, 0, 0, 0, 0.9, -0.7, 0, 0, 0))
    # two models: density 0.5 keeps (4, ·, ·, 2) and (-3, 2, ·, ·); Σ = (1, 2, 0, 2) → (4, 2, 0, 2)
    a, b = T(4, -1, 0.5, 2), T(-3, 2, 1, -0.1)
    assert close(ties([a, b], base=torch.zeros(4), density=0.5), T(4, 2, 0, 2))


def test_whole_model_and_per_tensor_trimming_differ():
    # Model A: t1 τ = (10, 9), t2 τ = (1, 2). Model B: t1 τ = (1, 1.5), t2 τ = (3, 4). density 0.5.
    # Per tensor: A keeps 10 | 2, B keeps 1.5 | 4 → t1 (10, 1.5), t2 (0, 3).
    # Whole model: A's top 2 of 4 are 10, 9 (threshold 9), B's are 3, 4 (threshold 3) → t1 (10, 9), t2 (3, 4).
    taus = {"t1": [T(10, 9), T(1, 1.5)], "t2": [T(1, 2), T(3, 4)]}
    zero = torch.zeros(2)
    per_tensor = {k: ties(v, base=zero, density=0.5) for k, v in taus.items()}
    assert close(per_tensor["t1"], T(10, 1.5)) and close(per_tensor["t2"], T(0, 3))
    thresholds = global_magnitude_thresholds(taus, 0.5)
    assert thresholds == pytest.approx([9.0, 3.0])
    whole = {k: ties(v, base=zero, thresholds=thresholds) for k, v in taus.items()}
    assert close(whole["t1"], T(10, 9)) and close(whole["t2"], T(3, 4))
    # a one-shot generator works too, and sampling every entry (rate 1, with replacement) lands close
    assert global_magnitude_thresholds(iter(taus.values()), 0.5) == pytest.approx([9.0, 3.0])


def test_exact_threshold_for_large_tensors_matches_kthvalue(monkeypatch):
    monkeypatch.setattr(sparsify, "EXACT_DIRECT_MAX", 1000)
    x = torch.randn(50_000, generator=G(0)).abs()
    ties_heavy = torch.cat([torch.zeros(30_000), torch.full((10_000,), 0.5), torch.rand(10_000, generator=G(1))])
    for values in (x, ties_heavy):
        n = values.numel()
        for density in (0.01, 0.2, 0.5, 0.77, 0.999):
            k = sparsify.keep_count(density, n)
            assert magnitude_threshold(values, density) == float(torch.kthvalue(values, n - k + 1).values)
    monkeypatch.setattr(sparsify, "_BRACKET_SAMPLE", 3)  # brackets from 3 samples mostly miss: the fallback stays exact
    for density in (0.05, 0.3, 0.9):
        k = sparsify.keep_count(density, x.numel())
        assert magnitude_threshold(x, density) == float(torch.kthvalue(x, x.numel() - k + 1).values)


def test_sampled_thresholds_are_close():
    x = torch.randn(200_000, generator=G(2)).abs()
    exact = magnitude_threshold(x, 0.2)
    assert magnitude_threshold(x, 0.2, sample_size=20_000, generator=G(3)) == pytest.approx(exact, rel=0.03)
    taus = [[torch.randn(50_000, generator=G(4))] for _ in range(4)]
    exact_g = global_magnitude_thresholds(taus, 0.2)
    approx_g = global_magnitude_thresholds(taus, 0.2, sample_rate=0.1)
    assert approx_g == pytest.approx(exact_g, rel=0.03)


# ------------------------------------------------------------------------------------------------------- DARE


def _dare_inputs(n: int = 500):
    base = torch.randn(n, generator=G(10))
    return base, [base + torch.randn(n, generator=G(11 + i)) for i in range(2)]


def test_dare_is_seeded_and_reproducible():
    base, models = _dare_inputs()
    run = lambda **kw: dare_linear(models, base=base, density=0.5, **kw)  # noqa: E731
    assert torch.equal(run(seed=1, name="w"), run(seed=1, name="w"))
    assert not torch.equal(run(seed=1, name="w"), run(seed=2, name="w"))
    assert not torch.equal(run(seed=1, name="w"), run(seed=1, name="v"))  # per-tensor masks
    # density defaults to 1 (mergekit's: nothing dropped), so the seed only matters with density < 1
    assert torch.equal(dare_ties(models, base=base, seed=3, name="w", density=0.5), dare_ties(models, base=base, seed=3, name="w", density=0.5))
    assert not torch.equal(dare_ties(models, base=base, seed=3, name="w", density=0.5), dare_ties(models, base=base, seed=4, name="w", density=0.5))
    assert dare_seed(0, "a", 0) != dare_seed(0, "a", 1) != dare_seed(0, "b", 1)


def test_dare_drops_and_rescales():
    base, theta = torch.zeros(20_000), torch.randn(20_000, generator=G(12))
    out = dare_linear([theta], base=base, density=0.3, seed=5, rescale_norm="density")  # the paper's 1/density (mergekit: l1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert torch.allclose(out[kept], theta[kept] / 0.3)


def test_dare_rescale_is_unbiased():
    base, models = _dare_inputs()
    w, p, runs = [1.0, 0.5], 0.4, 300
    mean = sum(dare_linear(models, base=base, weights=w, density=p, seed=s, name="x", rescale_norm="density") for s in range(runs)) / runs
    expected = task_arithmetic(models, base=base, weights=w)
    # per entry, Var[w_i τ̃_i] = w_i² τ_i² (1 − p) / p; allow 5 standard errors of the mean
    var = sum(wi**2 * (m - base) ** 2 for wi, m in zip(w, models)) * (1 - p) / p
    assert ((mean - expected).abs() <= 5 * (var / runs).sqrt() + 1e-6).all()


def test_dare_with_density_one_is_task_arithmetic_or_ties():
    base, models = _dare_inputs()
    assert torch.allclose(dare_linear(models, base=base, density=1.0, lambda_=0.7), task_arithmetic(models, base=base, lambda_=0.7))
    assert torch.allclose(dare_ties(models, base=base, density=1.0, normalize=True), ties(models, base=base, density=1.0))
    assert torch.allclose(dare_ties(models, base=base, density=1.0), ties(models, base=base, density=1.0, normalize=False))


# ------------------------------------------------------------------------------------------------------ SLERP


def test_slerp_endpoints_are_the_inputs():
    a, b = torch.randn(4, 6, generator=G(20)), torch.randn(4, 6, generator=G(21))
    assert torch.allclose(slerp([a, b], t=0.0), a, atol=1e-7, rtol=0)
    assert torch.allclose(slerp([a, b], t=1.0), b, atol=1e-7, rtol=0)


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors():
    e1, e2 = T(1, 0), T(0, 1)
    mid = slerp([e1, e2], t=0.5)
    assert mid.norm().item() == pytest.approx(1.0)
    assert close(mid, T(math.sqrt(0.5), math.sqrt(0.5)))
    assert linear([e1, e2]).norm().item() == pytest.approx(1 / math.sqrt(2))
    # un-normalised inputs: Ω = π/2, both coefficients sin(π/4)/sin(π/2)
    assert close(slerp([T(1, 0), T(0, 2)], t=0.5), T(math.sqrt(0.5), 2 * math.sqrt(0.5)))
    # t = 1/3 of a right angle: (cos 30°, sin 30°)
    assert close(slerp([e1, e2], t=1 / 3), T(math.cos(math.pi / 6), math.sin(math.pi / 6)))


def test_slerp_falls_back_to_linear_when_parallel_or_zero():
    a = torch.randn(10, generator=G(22))
    for b in (2 * a, a + 1e-6 * torch.randn(10, generator=G(23)), -a, torch.zeros(10)):
        assert torch.allclose(slerp([a, b], t=0.3), 0.7 * a + 0.3 * b, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- Fisher


def test_fisher_with_equal_fishers_is_linear_and_one_hot_picks_the_model():
    a, b = torch.randn(3, 4, generator=G(30)), torch.randn(3, 4, generator=G(31))
    f = torch.rand(3, 4, generator=G(32)) + 0.1
    assert torch.allclose(fisher([a, b], fishers=[f, f]), linear([a, b]), atol=1e-6)
    assert torch.allclose(fisher([a, b], fishers=[f, f], weights=[1, 3]), linear([a, b], weights=[1, 3]), atol=1e-6)
    assert torch.allclose(fisher([a, b], fishers=[torch.ones(3, 4), torch.zeros(3, 4)]), a, atol=1e-6)
    mask = torch.rand(3, 4, generator=G(33)) > 0.5
    picked = fisher([a, b], fishers=[mask.float(), (~mask).float()])
    assert torch.allclose(picked, torch.where(mask, a, b), atol=1e-6)


def test_fisher_normalization():
    a, b = torch.zeros(4), torch.ones(4)
    f_a, f_b = torch.full((4,), 100.0), torch.ones(4)
    assert close(fisher([a, b], fishers=[f_a, f_b]), torch.full((4,), 1 / 101))
    assert close(fisher([a, b], fishers=[f_a, f_b], normalize="param"), torch.full((4,), 0.5))
    # whole-model norms: model a has Fishers (3 | 4) → 5, model b (1 | 0) → 1
    norms = fisher_model_norms({"x": [T(3), T(1)], "y": [T(4), T(0)]})
    assert norms == pytest.approx([5.0, 1.0])
    by_norms = fisher([a, b], fishers=[f_a, f_b], normalize="model", fisher_norms=[100.0, 1.0])
    pre_divided = fisher([a, b], fishers=[f_a / 100, f_b], normalize="model")
    assert close(by_norms, torch.full((4,), 0.5)) and close(pre_divided, torch.full((4,), 0.5))
    with pytest.raises(SymmergeError, match="one Fisher per model"):
        fisher([a, b], fishers=[f_a])


# ---------------------------------------------------------------------------------------------------- RegMean


def _regmean_problem(dead_column: bool = False):
    xs = [torch.randn(20, 5, generator=G(40), dtype=torch.float64), torch.randn(30, 5, generator=G(41), dtype=torch.float64)]
    if dead_column:
        for x in xs:
            x[:, 4] = 0
    ws = [torch.randn(3, 5, generator=G(42), dtype=torch.float64), torch.randn(3, 5, generator=G(43), dtype=torch.float64)]
    return xs, ws, [x.T @ x for x in xs]


def test_regmean_is_the_least_squares_solution():
    xs, ws, grams = _regmean_problem()
    merged = regmean(ws, grams=grams, alpha=1.0)
    stacked = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    assert torch.allclose(merged, stacked, atol=1e-10)


def test_regmean_shrinkage_limits():
    xs, ws, grams = _regmean_problem()
    # α = 0: diagonal Grams → each input column j is a G_jj-weighted average of the models' columns
    d = torch.stack([g.diagonal() for g in grams])  # (2, in)
    expected = (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1])
    assert torch.allclose(regmean(ws, grams=grams, alpha=0.0), expected, atol=1e-10)
    # equal Grams → plain average, for any α
    assert torch.allclose(regmean(ws, grams=[grams[0], grams[0]], alpha=0.5), (ws[0] + ws[1]) / 2, atol=1e-10)
    # no Grams (bias, norm) → linear average; a zero weight → the other model
    assert torch.allclose(regmean([T(1, 2), T(3, 4)]), T(2, 3))
    assert torch.allclose(regmean(ws, grams=grams, weights=[1, 0]), ws[0], atol=1e-10)


def test_regmean_singular_grams_fall_back_to_the_least_squares_solution_nearest_the_average():
    xs, ws, grams = _regmean_problem(dead_column=True)
    merged = regmean(ws, grams=grams, alpha=1.0)
    live = torch.linalg.lstsq(torch.cat(xs)[:, :4], torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    assert torch.allclose(merged[:, :4], live, atol=1e-8)
    assert torch.allclose(merged[:, 4], (ws[0][:, 4] + ws[1][:, 4]) / 2, atol=1e-8)  # unseen input: the average


def test_regmean_checks_shapes():
    _, ws, grams = _regmean_problem()
    with pytest.raises(SymmergeError, match=r"regmean: Gram 1 has shape \(4, 4\), expected \(5, 5\)"):
        regmean(ws, grams=[grams[0], torch.eye(4)])


# ------------------------------------------------------------------------------------------- registry, validation


def test_registry_lists_every_method():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "fisher", "regmean"} <= set(MERGE_METHODS)
    assert [m.name for m in list_methods()] == sorted(MERGE_METHODS)
    ties_m = get_method("ties")
    assert ties_m.needs_base and not ties_m.needs_data and ties_m.defaults == {
        "density": 1.0, "lambda": 1.0, "trim": "tensor", "normalize": True, "rescale": False, "rescale_norm": "l1", "int8_mask": False}
    assert get_method("fisher").needs_data and get_method("regmean").needs_data
    assert get_method("slerp").max_models == 2
    assert get_method("ties").summary().startswith("ties [base] density=1 lambda=1")
    assert {"base", "weights", "name", "density", "lambda_", "thresholds"} <= get_method("ties").arguments
    assert all("name" in m.arguments and "weights" in m.arguments for m in list_methods())
    assert "grams" in get_method("regmean").arguments and "fishers" in get_method("fisher").arguments


def test_unknown_method():
    with pytest.raises(SymmergeError) as e:
        get_method("tie")
    assert str(e.value).startswith("unknown merge method 'tie'; available: arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear")
    assert "\n" not in str(e.value)


def test_validate_params_fills_defaults_and_names_the_culprit():
    ties_rest = {"trim": "tensor", "normalize": True, "rescale": False, "rescale_norm": "l1", "int8_mask": False}
    assert validate_params("ties", {}) == {"density": 1.0, "lambda_": 1.0, **ties_rest}
    assert validate_params("ties", {"density": 0.2, "lambda": 2}) == {"density": 0.2, "lambda_": 2.0, **ties_rest}
    assert validate_params("dare_ties", {"seed": 7.0}) == {
        "density": 1.0, "lambda_": 1.0, "seed": 7, "normalize": False, "rescale": True, "rescale_norm": "l1", "int8_mask": False}
    bad = [
        ("ties", {"density": 1.5}, "ties: density must be in (0, 1], got 1.5"),
        ("ties", {"density": 0}, "ties: density must be in (0, 1], got 0"),
        ("ties", {"dens": 0.5}, "ties: unknown parameter 'dens' (known: density, lambda, trim, normalize, rescale, rescale_norm, int8_mask)"),
        ("slerp", {"t": -0.1}, "slerp: t must be in [0, 1], got -0.1"),
        ("linear", {"normalize": "yes"}, "linear: normalize must be true or false, got 'yes'"),
        ("fisher", {"normalize": "global"}, "fisher: normalize must be one of none, param, model, got 'global'"),
        ("ties", {"density": True}, "ties: density must be a number, got True"),
        ("dare_linear", {"seed": 1.5}, "dare_linear: seed must be an integer, got 1.5"),
        ("dare_linear", {"seed": -1}, "dare_linear: seed must be >= 0, got -1"),
        ("task_arithmetic", {"lambda": float("nan")}, "task_arithmetic: lambda must be a finite number, got nan"),
        ("ties", {"lambda": 1, "lambda_": 2}, "ties: parameter 'lambda' given twice"),
    ]
    for method, params, message in bad:
        with pytest.raises(SymmergeError) as e:
            validate_params(method, params)
        assert str(e.value) == message


def test_direct_calls_are_validated_too():
    x = torch.ones(3)
    with pytest.raises(SymmergeError, match=r"ties: density must be in \(0, 1\], got 1.5"):
        ties([x, x], base=x, density=1.5)
    with pytest.raises(SymmergeError, match="ties: needs the base model's tensor"):
        ties([x, x])
    with pytest.raises(SymmergeError, match="slerp: merges exactly 2 models, got 3"):
        slerp([x, x, x])
    with pytest.raises(SymmergeError, match=r"linear: model 1 has shape \(2,\), model 0 \(3,\) \(tensor 'w'\)"):
        linear([x, torch.ones(2)], name="w")
    with pytest.raises(SymmergeError, match="linear: got 1 weights for 2 models"):
        linear([x, x], weights=[1])
    with pytest.raises(SymmergeError, match="ties: weights must be >= 0"):
        ties([x, x], base=x, weights=[1, -1])


def test_check_models():
    get_method("ties").check_models(3, has_base=True)
    with pytest.raises(SymmergeError, match="ties: needs a base model"):
        get_method("ties").check_models(3, has_base=False)
    with pytest.raises(SymmergeError, match="slerp: merges exactly 2 models, got 3"):
        get_method("slerp").check_models(3, has_base=False)


# ---------------------------------------------------------------------------------------------- dtypes, purity


def _call(method: str, tensors, base, **extra):
    kw = {"base": base}
    if method in ("slerp", "passthrough", "nearswap", "arcee_fusion"):  # two endpoints: the base and one model, or 1 model
        tensors = tensors[:1]
        kw["base"] = None if method == "passthrough" else base
    if method == "nuslerp":
        tensors = tensors[:2]
    if method == "nearswap":
        kw["t"] = 0.05
    if method == "fisher":
        kw["fishers"] = [torch.rand(t.shape, generator=G(50 + i)) for i, t in enumerate(tensors)]
    if method == "regmean":
        kw["grams"] = [(lambda x: x.T @ x)(torch.randn(8, t.shape[1], generator=G(60 + i))) for i, t in enumerate(tensors)]
    if method in ("dare_linear", "dare_ties", "della", "della_linear"):
        kw["name"] = "layer.weight"
    if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        kw["density"] = 0.5  # sparsify (the default, mergekit's, is 1: nothing dropped)
    return MERGE_METHODS[method](tensors, **kw, **extra)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_bf16_in_bf16_out(method):
    base = torch.randn(6, 5, generator=G(70))
    models = [base + 0.1 * torch.randn(6, 5, generator=G(71 + i)) for i in range(3)]
    lo = [m.to(torch.bfloat16) for m in models]
    out = _call(method, lo, base.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (6, 5)
    # the same float32 math on the upcast values, rounded once at the end
    ref = _call(method, [m.float() for m in lo], base.to(torch.bfloat16).float())
    assert torch.equal(out, ref.to(torch.bfloat16))


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_inputs_are_not_modified(method):
    base = torch.randn(6, 5, generator=G(80))
    models = [base + torch.randn(6, 5, generator=G(81 + i)) for i in range(3)]
    copies = [m.clone() for m in models] + [base.clone()]
    out = _call(method, models, base)
    assert out.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(models + [base], copies))


def test_ties_whole_model_trimming_needs_thresholds():
    base = torch.zeros(4)
    with pytest.raises(SymmergeError, match="trim=model needs whole-model thresholds"):
        ties([torch.ones(4), torch.ones(4)], base=base, trim="model")
    out = ties([torch.tensor([1.0, 0.1, 0.0, 0.0])], base=base, trim="model", thresholds=[0.5])
    assert torch.equal(out, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_ties_keeps_exactly_density_even_with_ties_at_the_threshold():
    """bf16 task vectors tie at the threshold often: the trim must still keep round(density·n) entries."""
    base = torch.zeros(10)
    tau = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1])
    out = ties([base + tau], base=base, density=0.2)
    assert int(torch.count_nonzero(out)) == 2
    assert torch.equal(out, torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0]))


# ============================================================================ mergekit's methods and semantics

D = lambda *xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731


def _models(n_models: int = 3, shape=(6, 5), seed: int = 100, scale: float = 0.1):
    base = torch.randn(*shape, generator=G(seed))
    return base, [base + scale * torch.randn(*shape, generator=G(seed + 1 + i)) for i in range(n_models)]


# ---------------------------------------------------------------------------------------- SLERP and the base


def test_slerp_with_a_base_goes_from_the_base_to_the_other_model():
    a, b = torch.randn(4, 6, generator=G(200)), torch.randn(4, 6, generator=G(201))
    assert torch.equal(slerp([b], base=a, t=0.0), a)  # t = 0 is the base model, not the first listed
    assert torch.allclose(slerp([b], base=a, t=1.0), b, atol=1e-7, rtol=0)
    for t in (0.25, 0.6):
        assert torch.equal(slerp([b], base=a, t=t), slerp([a, b], t=t))
    assert get_method("slerp").optional_base and not get_method("slerp").needs_base
    with pytest.raises(SymmergeError, match="base_model must be one of the 2 models"):
        slerp([a, b], base=a)


def test_slerp_interpolates_linearly_when_nearly_parallel_like_mergekit():
    a = torch.randn(50, generator=G(202))
    b = a + 0.02 * torch.randn(50, generator=G(203))  # cos ≈ 0.9998 > 0.9995: mergekit's linear branch
    cos = float(a @ b / (a.norm() * b.norm()))
    assert 0.9995 < cos < 1 - 1e-6
    assert torch.allclose(slerp([a, b], t=0.3), 0.7 * a + 0.3 * b, atol=1e-6)


# --------------------------------------------------------------------------------------- the engine's calls


def _plan(method: str, n: int, *, base_at: int | None, params=None, weights=None, dtype=None, reference_index=None):
    from pathlib import Path
    from types import SimpleNamespace

    models = [SimpleNamespace(path=Path(f"/m/{i}")) for i in range(n)]
    base = SimpleNamespace(path=Path(f"/m/{base_at}" if base_at is not None else "/m/base"))
    return SimpleNamespace(method=get_method(method), params=validate_params(method, params or {}), weights=weights, base=base,
                           models=models, dtype=dtype, reference_index=reference_index)


def _item(tensors, base):
    from symmerge.merge.engine import AlignedTensor

    return AlignedTensor("layer.weight", tensors, base, tensors, base)


def test_engine_treats_a_listed_base_model_as_the_base():
    from symmerge.merge.engine import merge_tensor

    a, b = torch.randn(3, 4, generator=G(210)), torch.randn(3, 4, generator=G(211))
    # models: [B, A], base_model: A → slerp from A (t = 0) to B
    plan = _plan("slerp", 2, base_at=1, params={"t": 0.0})
    assert torch.equal(merge_tensor(plan, _item([b, a], a), None, {}), a)
    plan = _plan("slerp", 2, base_at=1, params={"t": 0.3})
    assert torch.equal(merge_tensor(plan, _item([b, a], a), None, {}), slerp([b], base=a, t=0.3))
    # no base: the first model is t = 0
    plan = _plan("slerp", 2, base_at=None, params={"t": 0.0})
    plan.base = None
    assert torch.equal(merge_tensor(plan, _item([b, a], None), None, {}), b)
    # ties with the base listed: its entry leaves the models, the weights and the per-model lists
    base, models = _models(2, seed=212)
    plan = _plan("ties", 3, base_at=0, params={"density": [1.0, 0.5, 0.3]}, weights=[9.0, 1.0, 2.0])
    got = merge_tensor(plan, _item([base, *models], base), None, {})
    assert torch.equal(got, ties(models, base=base, density=[0.5, 0.3], weights=[1.0, 2.0]))


def test_engine_rounds_once_to_the_output_dtype():
    from symmerge.merge.engine import merge_tensor

    base, models = _models(3, seed=220)
    lo = [m.to(torch.bfloat16) for m in models]
    plan = _plan("linear", 3, base_at=None, dtype=torch.float16)
    plan.base = None
    out = merge_tensor(plan, _item(lo, None), None, {})
    ref = (sum(m.double() for m in lo) / 3).to(torch.float16)  # float64 reference, one rounding
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    twice = linear(lo).to(torch.float16)  # the old path: rounded to bf16, then to fp16
    assert not torch.equal(twice, ref)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_rounds_once_to_out_dtype(method):
    base, models = _models(3, seed=230)
    lo = [m.to(torch.bfloat16) for m in models]
    out = _call(method, lo, base.to(torch.bfloat16), out_dtype=torch.float16)
    assert out.dtype == torch.float16
    ref = _call(method, [m.float() for m in lo], base.to(torch.bfloat16).float())  # float32 math, unrounded
    assert torch.equal(out, ref.to(torch.float16))


def test_single_rounding_against_a_float64_reference():
    base, models = _models(3, seed=240)
    lo = [m.to(torch.bfloat16) for m in models]
    b16 = base.to(torch.bfloat16)
    exact = b16.double() + sum(m.double() - b16.double() for m in lo) * 0.7  # task arithmetic, λ = 0.7
    assert torch.equal(task_arithmetic(lo, base=b16, lambda_=0.7), exact.to(torch.bfloat16))
    assert torch.allclose(task_arithmetic(lo, base=b16, lambda_=0.7, out_dtype=torch.float32), exact.float(), atol=1e-6, rtol=0)
    out = linear(lo, weights=[1, 2, 3], out_dtype=torch.float16)
    assert torch.equal(out, (sum(w * m.double() for w, m in zip([1, 2, 3], lo)) / 6).to(torch.float16))


# ---------------------------------------------------------------------------------- GTA: normalize, rescale


def test_dare_ties_sums_by_default_and_ties_averages():
    # BASE6/TAUS6 elect (−, tie, +, none, +, +); the agreeing entries are summed by dare_ties (normalize: false)
    models = [BASE6 + t for t in TAUS6]
    summed = T(-4, 0, 3, 0, 1.5, 5)
    assert close(dare_ties(models, base=BASE6), BASE6 + summed)  # density 1: nothing dropped
    assert close(dare_ties(models, base=BASE6, normalize=True), BASE6 + T(-4, 0, 3, 0, 0.75, 2.5))
    assert close(ties(models, base=BASE6, normalize=False), BASE6 + summed)
    # weights (2, 1, 1): Σ w τ = (0, -2, 4, 0, 2.5, 6) → (tie, −, +, none, +, +); sums 2·(-2), 2·3, 2·1 + 0.5, 2·2 + 3
    assert close(ties(models, base=BASE6, normalize=False, lambda_=0.5, weights=[2, 1, 1]), BASE6 + 0.5 * T(0, -4, 6, 0, 2.5, 7))
    defaults = {m: get_method(m).defaults for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                                      "della_linear", "task_arithmetic")}
    assert {m: (d["normalize"], d.get("rescale")) for m, d in defaults.items()} == {  # mergekit 0.1.5's registry
        "ties": (True, False), "dare_ties": (False, True), "dare_linear": (False, True), "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False), "della": (True, True), "della_linear": (False, True), "task_arithmetic": (False, False)}
    assert all(d["lambda"] == 1.0 and d["density"] == 1.0 and d["int8_mask"] is False for d in defaults.values())
    # every key mergekit 0.1.5 declares for its generalized task arithmetic (gamma with magnitude_outliers, epsilon
    # with della_magprune) is accepted; task_arithmetic's density and rescale are declared there but never read
    shared = {"int8_mask", "normalize", "rescale", "lambda", "density"}
    extra = {"breadcrumbs": {"gamma"}, "breadcrumbs_ties": {"gamma"}, "della": {"epsilon"}, "della_linear": {"epsilon"}}
    assert all(shared | extra.get(m, set()) <= set(d) for m, d in defaults.items())
    no_effect = {p.name for p in get_method("task_arithmetic").params if p.no_effect}
    assert no_effect == {"density", "rescale", "int8_mask"}
    assert torch.equal(task_arithmetic(models, base=BASE6, density=0.3, rescale=True, int8_mask=True), task_arithmetic(models, base=BASE6))


def test_linear_family_normalize_divides_by_the_weight_sum():
    base, models = _models(2, seed=250)
    taus = [m - base for m in models]
    assert torch.allclose(task_arithmetic(models, base=base, weights=[1, 3], normalize=True), base + (taus[0] + 3 * taus[1]) / 4, atol=1e-6)
    # |Σ w| < 1e-8: divided by 1 (mergekit)
    assert torch.allclose(task_arithmetic(models, base=base, weights=[1, -1], normalize=True), base + taus[0] - taus[1], atol=1e-6)


def test_dare_rescale_matches_the_l1_norm_like_mergekit():
    base, theta = torch.zeros(2000), torch.randn(2000, generator=G(260))
    out = dare_linear([theta], base=base, density=0.3, seed=1, name="w")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.04
    assert out.abs().sum().item() == pytest.approx(theta.abs().sum().item(), rel=1e-5)  # l1 rescale
    factor = theta.abs().sum() / theta[kept].abs().sum()
    assert torch.allclose(out[kept], theta[kept] * factor, rtol=1e-5)
    # same mask for every rescale choice (same seed), only the scale differs; rescale: false keeps the raw entries
    raw = dare_linear([theta], base=base, density=0.3, seed=1, name="w", rescale=False)
    assert torch.equal(raw != 0, kept) and torch.equal(raw[kept], theta[kept])
    assert torch.allclose(dare_linear([theta], base=base, density=0.3, seed=1, name="w", rescale_norm="l2").norm(), theta.norm(), rtol=1e-5)


# --------------------------------------------------------------------------------------- per-model parameters


def test_per_model_parameters_take_a_scalar_or_one_value_per_model():
    base = torch.zeros(10)
    a = T(10, 9, 8, 7, 6, 5, 4, 3, 2, 1)
    b = T(1, 2, 3, 4, 5, 6, 7, 8, 9, 10) * 0.5
    # density [0.3, 0.2]: a keeps 10, 9, 8; b keeps 5, 4.5 → disjoint mean (all positive)
    expected = T(10, 9, 8, 0, 0, 0, 0, 0, 4.5, 5)
    assert close(ties([a, b], base=base, density=[0.3, 0.2]), expected)
    assert torch.equal(ties([a, b], base=base, density=[0.4, 0.4]), ties([a, b], base=base, density=0.4))
    assert get_method("ties").per_model_params == ("density",)
    assert get_method("della").per_model_params == ("density", "epsilon")
    assert get_method("breadcrumbs").per_model_params == ("density", "gamma")
    assert get_method("passthrough").per_model_params == ("scale",)
    assert validate_params("ties", {"density": [0.5, 1]})["density"] == [0.5, 1.0]
    bad = [
        ("ties", {"density": [0.5, 1.5]}, "ties: density[1] must be in (0, 1], got 1.5"),
        ("ties", {"density": [0.5, True]}, "ties: density[1] must be a number, got True"),
        ("ties", {"density": []}, "ties: density must be in (0, 1] or a list with one such value per model, got []"),
        ("ties", {"lambda": [1, 2]}, "ties: lambda must be a number, got [1, 2]"),  # not per model
        ("della", {"density": 0.9}, "della: density ± epsilon must lie in (0, 1), got density=0.9, epsilon=0.15"),
        ("della", {"density": [0.5, 0.1], "epsilon": 0.1}, "della: density ± epsilon must lie in (0, 1) (model 1), got density=0.1, epsilon=0.1"),
        ("nearswap", {}, "nearswap: parameter 't' is required (distance below which the other model's value is taken whole)"),
    ]
    for method, params, message in bad:
        with pytest.raises(SymmergeError) as e:
            validate_params(method, params)
        assert str(e.value) == message
    with pytest.raises(SymmergeError, match="ties: density has 3 values for 2 models"):
        validate_params("ties", {"density": [0.5, 0.5, 0.5]}, n_models=2)
    with pytest.raises(SymmergeError, match="ties: got 3 values of density for 2 models"):
        ties([a, b], base=base, density=[0.5, 0.5, 0.5])


# ------------------------------------------------------------------------------------- TIES' chunked kernel


def _ties_reference(tensors, base, density, weights, normalize=True):
    """Plain TIES in float64 with an explicit stable sort: top ⌊d·n⌋ by |τ| (ties: first in memory order)."""
    taus = []
    for x, d in zip(tensors, density):
        tau = (x.double() - base.double()).reshape(-1)
        k = max(1, int(d * tau.numel()))
        order = sorted(range(tau.numel()), key=lambda j: (-abs(float(x.reshape(-1)[j].float() - base.reshape(-1)[j].float())), j))
        keep = torch.zeros(tau.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        taus.append(tau * keep)
    total = sum(w * t for w, t in zip(weights, taus))
    sign = total.sign()
    num = sum(w * t * ((t.sign() == sign) & (t != 0)) for w, t in zip(weights, taus))
    den = sum(w * ((t.sign() == sign) & (t != 0)).double() for w, t in zip(weights, taus))
    merged = num / torch.where(den == 0, torch.ones_like(den), den) if normalize else num
    return (base.double().reshape(-1) + merged).reshape(base.shape)


def test_chunked_ties_kernel_is_exact(monkeypatch):
    monkeypatch.setattr(sparsify, "TIES_CHUNK", 64)  # many chunks, so ties at the threshold straddle chunk boundaries
    for case in range(6):
        g = G(300 + case)
        base = torch.randint(-64, 64, (20, 17), generator=g).float() / 32  # exact differences: elections alike in float32/64
        # coarse values → many entries tie at the threshold
        models = [base + torch.randint(-3, 4, (20, 17), generator=g).float() * 0.25 for _ in range(3)]
        density = [[0.1, 0.5, 0.9], [0.3, 0.3, 0.3], [1.0, 0.05, 0.5]][case % 3]
        weights = [[1.0, 1.0, 1.0], [0.5, 2.0, 0.0], [1.0, 3.0, 0.25]][case % 3]
        normalize = case < 4
        fast = ties(models, base=base, density=density, weights=weights, normalize=normalize)
        # the generic float32 path (what the kernel replaces) gives the very same bits
        p = validate_params("ties", {"density": density, "normalize": normalize})
        slow = sparsify._disjoint_merge(gta._Sparsified("ties", "magnitude", models, base, torch.float32, None, p), 3, weights, base, torch.float32, normalize)
        assert torch.equal(fast, slow.add_(base))
        ref = _ties_reference(models, base, density, weights, normalize)
        assert torch.equal(fast != base, ref != base.double())  # the same entries kept and merged
        assert torch.allclose(fast.double(), ref, atol=1e-6, rtol=0)
    # whole-model thresholds: ties at the threshold are all kept
    base = torch.zeros(100)
    x = torch.arange(100.0) % 10
    assert torch.equal(ties([x], base=base, thresholds=[7.0]), torch.where(x >= 7, x, 0))


def _ties_sorted_reference(tensors, base, density, weights):
    """TIES spelled out with the plainest operations, in float32 as the kernel computes: ``τ_i`` sorted by
    (−|τ|, position) with Python's ``sorted`` and the first ``⌊d·n⌋`` kept; ``sign(Σ w τ̂)`` (0 elects nothing);
    the mean over the agreeing models' weights; one rounding to the inputs' dtype."""
    b = base.float().reshape(-1).tolist()
    taus = []
    for x, d in zip(tensors, density):
        tau = (x.float().reshape(-1) - base.float().reshape(-1)).tolist()  # float32 differences, as the kernel's
        k = max(1, int(d * len(tau)))
        keep = set(sorted(range(len(tau)), key=lambda j: (-abs(tau[j]), j))[:k])
        taus.append([v if j in keep else 0.0 for j, v in enumerate(tau)])
    out = []
    for j in range(len(b)):
        total = sum(w * t[j] for w, t in zip(weights, taus))
        sign = (total > 0) - (total < 0)
        agree = [(w, t[j]) for w, t in zip(weights, taus) if t[j] != 0 and (t[j] > 0) == (sign > 0) and sign != 0]
        den = sum(w for w, _ in agree)
        out.append(b[j] + (sum(w * v for w, v in agree) / den if den else 0.0))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape).to(tensors[0].dtype)


def _tie_heavy_models(seed: int, shape=(37, 41), dtype=torch.bfloat16):
    """A bf16 base and fine-tunes whose task vectors take few distinct values (many ties in |τ|), hold exact zeros
    (τ = 0, so sign 0) and cancel between models (τ_a = −τ_b, a tied sign election)."""
    g = G(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    steps = torch.randint(-3, 4, shape, generator=g).float() * 2**-9  # |τ| ∈ {0, 1, 2, 3} · 2⁻⁹: heavy ties, zeros
    a = (base.float() + steps).to(dtype)
    b = (base.float() - steps).to(dtype)  # cancels a where the roundings agree
    b[: shape[0] // 3] = (base[: shape[0] // 3].float() + torch.randn(shape[0] // 3, shape[1], generator=g) * 1e-3).to(dtype)
    return base, [a, b, (base.float() + steps.roll(7)).to(dtype)]


@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_kernel_equals_a_sorted_reference_on_ties_and_zero_signs(monkeypatch, chunk, seed):
    """The chunked kernel (sampled bracket, or its radix fallback) against :func:`_ties_sorted_reference` bit for
    bit, on bf16 task vectors with heavy magnitude ties, exact zeros and cancelling models; then with a
    continuous model (the bracket's ``lo < hi`` branch)."""
    monkeypatch.setattr(sparsify, "TIES_CHUNK", chunk)
    monkeypatch.setattr(sparsify, "_TIE_PIECE", 16)  # the tie position is found piece by piece within a chunk
    base, models = _tie_heavy_models(seed)
    weights = [1.0, 1.0, 0.5]
    for density in ([0.2, 0.2, 0.2], [0.05, 0.5, 0.9], [0.3, 1.0, 0.01]):
        fast = ties(models, base=base, density=density, weights=weights)
        assert fast.dtype == torch.bfloat16
        assert torch.equal(fast.view(torch.int16), _ties_sorted_reference(models, base, density, weights).view(torch.int16))
    smooth = [(base.float() + torch.randn(base.shape, generator=G(seed + 50)) * 1e-2).to(torch.bfloat16), models[0]]
    fast = ties(smooth, base=base, density=[0.25, 0.4], weights=[1.0, 2.0])
    assert torch.equal(fast.view(torch.int16), _ties_sorted_reference(smooth, base, [0.25, 0.4], [1.0, 2.0]).view(torch.int16))


def _ties_before_fusing(models, base, density, weights, lam, normalize, round_twice=False):
    """The disjoint mean as the kernel computed it before its passes were fused (symmerge c9c8f4a), operation for
    operation on whole tensors, after the same exact trim. ``round_twice``: a wrong variant that rounds the merged
    task vector to the output dtype before adding the base."""
    base32 = base.float().reshape(-1)
    taus = []
    for i, (x, d) in enumerate(zip(models, density)):
        plan = sparsify._trim_plan(x.reshape(-1), base.reshape(-1), sparsify.keep_count(d, base.numel()), sparsify._TiesScratch(len(models), sparsify.TIES_CHUNK), i)
        taus.append(sparsify._apply_trim_(x.float().reshape(-1) - base32, *plan, 0))
    sign = torch.mul(taus[0], weights[0])
    for i in range(1, len(taus)):
        sign.add_(taus[i], alpha=weights[i])
    sign.sign_()
    num, den = torch.zeros_like(sign), torch.zeros_like(sign)
    for i, tau in enumerate(taus):
        tau.mul_(sign).clamp_min_(0)
        num.add_(tau, alpha=weights[i])
        if normalize:
            den.add_(tau.sign_(), alpha=weights[i])
    num.mul_(sign)
    if normalize:
        num.div_(den.clamp_min_(min((x for x in weights if x > 0), default=1.0)))
    if lam != 1:
        num.mul_(lam)
    if round_twice:
        num = num.to(models[0].dtype).float()
    return num.add_(base32).to(models[0].dtype).reshape(base.shape)


@pytest.mark.parametrize("chunk", [64, 1 << 18])
def test_ties_kernel_bits_equal_the_unfused_kernel(monkeypatch, chunk):
    """The fused passes (election sum without the product by w_0 = 1, the first model's denominator written
    directly, addcdiv for base + num / den, the counting trim plan, the chunk size) change no output bit (compared
    as integers: ``torch.equal`` takes −0 for +0): tie-heavy bf16 task vectors, exact zeros, −0 in the base and in
    the task vectors, every weight/λ/normalize branch. Control: one rounding more is seen."""
    monkeypatch.setattr(sparsify, "TIES_CHUNK", chunk)
    bits = lambda x: x.view(torch.int16)  # noqa: E731
    for seed in range(3):
        base, models = _tie_heavy_models(seed, shape=(67, 45))
        base.view(-1)[::5] = -0.0  # −0 in the base: base + (+0) = +0 there, base + (−0) = −0
        models[0].view(-1)[::5] = 0.0  # τ = +0 − (−0) = +0; where the election is −, τ̂·γ = −0
        models[1].view(-1)[::10] = -0.0  # τ = −0 − (−0) = +0
        for weights, lam, normalize in (([1.0, 1.0, 0.5], 1.0, True), ([1.0, 1.0, 1.0], 0.7, True), ([0.5, 2.0, 0.0], 1.0, True),
                                        ([1.0, 3.0, 0.25], 1.0, False), ([2.0, 1.0, 1.0], 1.3, False)):
            density = [0.2, 0.5, 0.9]
            fast = ties(models, base=base, density=density, weights=weights, lambda_=lam, normalize=normalize)
            before = _ties_before_fusing(models, base, density, weights, lam, normalize)
            assert torch.equal(bits(fast), bits(before)), (seed, weights, lam, normalize)
        # control: one rounding more (the merged task vector rounded to bf16 before the base is added) is seen
        twice = _ties_before_fusing(models, base, density, weights, lam, normalize, round_twice=True)
        assert not torch.equal(bits(twice), bits(fast))


def test_count_above_counts_strictly_greater_magnitudes():
    g = G(11)
    mags = (torch.randint(0, 5, (3000,), generator=g).float() * 0.25).abs()  # many ties, zeros
    mags[:3] = torch.tensor([1e-45, 2e-45, 0.0])  # subnormals
    scratch = torch.empty_like(mags)
    for t in (0.0, 0.25, 0.5, 1.0, 1e-45, 5.0):
        assert sparsify._count_above(mags, t, scratch) == int((mags > t).sum()), t
        if t > 0:  # |x| > below(t) ⟺ |x| >= t
            assert sparsify._count_above(mags, sparsify._below(t), scratch) == int((mags >= t).sum()), t
    assert sparsify._count_above(mags, sparsify._below(0.5), scratch) != sparsify._count_above(mags, 0.5, scratch)  # control: ties at 0.5 exist


def test_ties_trim_plan_bracket_and_radix_fallback_agree(monkeypatch):
    """The bracket and the exact radix selection give the same plan; a bracket that misses (forced here, rare in
    use) falls back to radix, so the result stays exact; a plan breaking ties from the end is caught (control)."""
    monkeypatch.setattr(sparsify, "TIES_CHUNK", 256)
    monkeypatch.setattr(sparsify, "_TIE_PIECE", 48)  # not a divisor of the chunk: a ragged last piece
    g = G(7)
    base = torch.zeros(5000)
    for values in (torch.randint(0, 6, (5000,), generator=g).float() * 0.125, torch.randn(5000, generator=g)):
        for k in (1, 17, 1000, 2500, 4999):
            scratch = sparsify._TiesScratch(1, 256)
            radix = sparsify._radix_trim_plan(values, base, k, scratch, 0)
            assert sparsify._trim_plan(values, base, k, scratch, 0) == radix
            trimmed = sparsify._apply_trim_(values.clone(), *radix, 0)  # t = 0 (k-th largest is 0) keeps all: zeros stay 0
            top = torch.zeros(5000, dtype=torch.bool)
            top[sorted(range(5000), key=lambda j: (-abs(float(values[j])), j))[:k]] = True
            assert torch.equal(trimmed, values * top)
            with monkeypatch.context() as m:  # a bracket that misses entirely, above and below the threshold
                for wrong in ((10.0, 20.0), (0.0, 0.0), (1e-9, 1e-8)):
                    m.setattr(sparsify, "_sampled_bracket", lambda *a, w=wrong: w)
                    assert sparsify._trim_plan(values, base, k, scratch, 0) == radix
    # negative control: keeping the *last* tied entries differs from the reference on tie-heavy input
    values = torch.randint(0, 3, (5000,), generator=g).float()
    t, p = sparsify._radix_trim_plan(values, base, 1000, sparsify._TiesScratch(1, 256), 0)
    first = torch.where(torch.arange(5000) < p, values >= t, values > t)
    tied = (values == t).nonzero().squeeze(1)
    last = (values > t).clone()
    last[tied[len(tied) - int((first & (values == t)).sum()):]] = True
    assert int(last.sum()) == 1000 and not torch.equal(first, last)


# ------------------------------------------------------------------------------------------------ Breadcrumbs


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = torch.zeros(10)
    tau = T(0.1, -0.5, 0.3, -0.2, 0.05, 0.9, -0.7, 0.0, 0.4, -0.15)  # |τ| ascending: 0, .05, .1, .15, .2, .3, .4, .5, .7, .9
    # density 0.5, gamma 0.1: the largest (0.9) goes, the 4 smallest go, 5 stay: 0.2, 0.3, 0.4, 0.5, 0.7
    kept = T(0, -0.5, 0.3, -0.2, 0, 0, -0.7, 0, 0.4, 0)
    assert close(breadcrumbs([tau], base=base, density=0.5, gamma=0.1), kept)
    # density + gamma > 1: fewer outliers dropped (density 0.8, gamma 0.3 → the 2 largest... only 10 − 8 = 2 go, from the top)
    assert close(breadcrumbs([tau], base=base, density=0.8, gamma=0.3), torch.where(tau.abs() < 0.7, tau, 0))
    assert torch.equal(breadcrumbs([tau], base=base), tau)  # density 1 (default): nothing dropped
    # rescale: the l1 norm of τ is restored
    out = breadcrumbs([tau], base=base, density=0.5, gamma=0.1, rescale=True)
    assert close(out, kept * (tau.abs().sum() / kept.abs().sum()), atol=1e-6)
    # breadcrumbs_ties: the masks, then TIES' election (summed by default)
    a, b = base + tau, base - 0.5 * tau
    exp_a, exp_b = kept, -0.5 * kept
    elected = torch.where((exp_a + exp_b) >= 0, exp_a.clamp(min=0) + exp_b.clamp(min=0), exp_a.clamp(max=0) + exp_b.clamp(max=0))
    assert close(breadcrumbs_ties([a, b], base=base, density=0.5, gamma=0.1), elected)


# ------------------------------------------------------------------------------------------------------ DELLA


def test_della_keep_probabilities_by_hand():
    x = T(0.3, -0.1, 0.5, 0.2, -0.4)  # magnitude ranks 3, 1, 5, 2, 4
    assert close(della_keep_probabilities(x, 0.5, 0.1), T(0.5, 0.4, 0.6, 0.45, 0.55))
    rows = torch.stack([x, -x.flip(0)])  # 2-D: ranked within each row
    assert close(della_keep_probabilities(rows, 0.5, 0.1)[1], T(0.5, 0.4, 0.6, 0.45, 0.55).flip(0))


def test_della_is_seeded_and_rescales():
    base, theta = torch.zeros(4000), torch.randn(4000, generator=G(400))
    run = lambda **kw: della_linear([theta], base=base, density=0.4, epsilon=0.2, name="w", **kw)  # noqa: E731
    assert torch.equal(run(seed=1), run(seed=1)) and not torch.equal(run(seed=1), run(seed=2))
    out = run(seed=1)
    assert out.abs().sum().item() == pytest.approx(theta.abs().sum().item(), rel=1e-5)  # l1 rescale (mergekit)
    kept = run(seed=1, rescale=False) != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.03
    big = theta.abs() > theta.abs().median()
    assert kept[big].float().mean() > kept[~big].float().mean() + 0.1  # larger magnitudes kept more often
    # the papers' rescale divides by each entry's keep probability: unbiased over seeds
    runs = 300
    mean = sum(della_linear([theta[:200]], base=base[:200], density=0.4, epsilon=0.2, seed=s, rescale_norm="density") for s in range(runs)) / runs
    p = della_keep_probabilities(theta[:200], 0.4, 0.2)
    assert ((mean - theta[:200]).abs() <= 5 * (theta[:200] ** 2 * (1 - p) / p / runs).sqrt() + 1e-6).all()
    # della = the same masks, then TIES' election and mean
    m2 = [theta, 0.5 * theta]
    assert torch.allclose(della(m2, base=base, density=0.4, epsilon=0.2, seed=3, name="w", normalize=False),
                          della_linear(m2, base=base, density=0.4, epsilon=0.2, seed=3, name="w"), atol=1e-6)
    assert torch.equal(della(m2, base=base), m2[0] * 0.75)  # density 1: nothing dropped; mean of θ and θ/2


# -------------------------------------------------------------------------------------------- Model Stock


def _model_stock_reference(models, base, rows):
    w0 = base.double().reshape(rows)
    taus = [m.double().reshape(rows) - w0 for m in models]
    n = len(models)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(((taus[i] * taus[j]).sum(-1) / (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    t = n * c / (1 + (n - 1) * c)
    return (t * sum(m.double().reshape(rows) for m in models) / n + (1 - t) * w0).reshape(base.shape)


def test_model_stock():
    base = T(1, 1)
    # orthogonal task vectors: cos 0 → t 0 → the base; identical ones: cos 1 → t 1 → the average
    assert close(model_stock([T(2, 1), T(1, 2)], base=base), base)
    assert close(model_stock([T(2, 3), T(2, 3)], base=base), T(2, 3))
    # cos = 1/2 with 2 models: t = 1 / 1.5 = 2/3
    a, b = T(2, 1), T(1 + 0.5, 1 + math.sqrt(3) / 2)
    assert close(model_stock([a, b], base=base), (2 / 3) * (a + b) / 2 + (1 / 3) * base, atol=1e-6)
    base, models = _models(3, seed=410)
    assert torch.allclose(model_stock(models, base=base).double(), _model_stock_reference(models, base, (1, -1)), atol=1e-6)
    assert torch.allclose(model_stock(models, base=base, filter_wise=True).double(), _model_stock_reference(models, base, (6, 5)), atol=1e-6)
    with pytest.raises(SymmergeError, match="at least 2 models besides the base"):
        model_stock(models[:1], base=base)


# ------------------------------------------------------------------------------------ NuSLERP, multi, Karcher


def test_nuslerp():
    a, b = torch.randn(4, 6, generator=G(420)), torch.randn(4, 6, generator=G(421))
    base = torch.randn(4, 6, generator=G(422))
    # t = w_1 / (w_0 + w_1) = 0.75; flattened = plain SLERP of the whole tensors
    assert torch.allclose(nuslerp([a, b], weights=[1, 3]), slerp([a, b], t=0.75), atol=1e-6)
    assert torch.allclose(nuslerp([a, b]), slerp([a, b], t=0.5), atol=1e-6)
    # with a base: SLERP of the task vectors, added to the base
    assert torch.allclose(nuslerp([a, b], base=base, weights=[1, 3]), base + slerp([a - base, b - base], t=0.75), atol=1e-6)
    # per row (last dim) and, row_wise, per column
    rows = nuslerp([a, b], weights=[1, 3], nuslerp_flatten=False)
    assert all(torch.allclose(rows[i], slerp([a[i], b[i]], t=0.75), atol=1e-6) for i in range(4))
    cols = nuslerp([a, b], weights=[1, 3], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert all(torch.allclose(cols[:, j], slerp([a[:, j], b[:, j]], t=0.75), atol=1e-6) for j in range(6))
    with pytest.raises(SymmergeError, match="exactly 2 models besides the base"):
        nuslerp([a, b, base])


def _multislerp_reference(vs, w):
    w = torch.tensor(w, dtype=torch.float64) / sum(w)
    vs = [v.double().reshape(-1) for v in vs]
    units = [v / v.norm() for v in vs]
    mean = sum(wi * u for wi, u in zip(w, units))
    return (mean / mean.norm() * sum(wi * v.norm() for wi, v in zip(w, vs)))


def test_multislerp():
    e1, e2 = T(1, 0), T(0, 3)
    # two orthogonal directions, equal weights: 45°, at the mean norm 2
    assert close(multislerp([e1, e2]), T(math.sqrt(2), math.sqrt(2)), atol=1e-6)
    base, models = _models(3, seed=430)
    w = [1.0, 2.0, 0.5]
    assert torch.allclose(multislerp(models, weights=w).double().reshape(-1), _multislerp_reference(models, w), atol=1e-5)
    ref = base.double().reshape(-1) + _multislerp_reference([m - base for m in models], w)
    assert torch.allclose(multislerp(models, base=base, weights=w).double().reshape(-1), ref, atol=1e-5)
    assert torch.equal(multislerp(models[:1], base=base), models[0])  # one model: itself
    assert close(multislerp([e1, -e1]), T(0, 0), atol=1e-6)  # antipodal pair: linear average
    assert close(multislerp([T(0, 0), e2], eps=1e-300), T(0, 1.5), atol=1e-6)  # a zero model: no 0 · (1/ε) = NaN
    with pytest.raises(SymmergeError, match="weighted sum of the directions is zero"):
        multislerp([e1, -e1, 2 * e1, -2 * e1])


def _karcher_reference(xs, iters=200):
    xs = [x.double().reshape(-1) for x in xs]
    norms = [x.norm() for x in xs]
    us = [x / n for x, n in zip(xs, norms)]
    mu = sum(us) / len(us)
    mu = mu / mu.norm()
    for _ in range(iters):  # Riemannian gradient descent to convergence
        g = sum(math.acos(max(-1, min(1, float(mu @ u)))) / max(1e-300, math.sin(math.acos(max(-1, min(1, float(mu @ u)))))) * (u - (mu @ u) * mu)
                for u in us) / len(us)
        gn = g.norm()
        if gn < 1e-12:
            break
        mu = torch.cos(gn) * mu + torch.sin(gn) * g / gn
        mu = mu / mu.norm()
    return mu * sum(norms) / len(norms)


def test_karcher():
    e1, e2 = T(1, 0), T(0, 3)
    assert close(karcher([e1, e2]), 2 * T(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-5)
    xs = [torch.randn(12, generator=G(440 + i)) for i in range(3)]
    assert torch.allclose(karcher(xs, max_iter=100, tol=1e-9).double(), _karcher_reference(xs), atol=1e-5)
    assert torch.equal(karcher(xs[:1]), xs[0])
    assert torch.equal(karcher([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def _blockwise_cases():
    """(name, call) for each kernel that reads its inputs in GRAM_CHUNK blocks (Gram pass, then the output pass)."""
    base, models = _models(3, shape=(33, 29), seed=470)
    wide_base, wide = _models(2, shape=(3, 150), seed=480)  # filter_wise rows longer than a block: pieces of a row
    return [
        ("slerp", lambda: slerp(models[:1], base=base, t=0.3)),
        ("multislerp", lambda: multislerp(models, weights=[1.0, 2.0, 0.5])),
        ("multislerp base", lambda: multislerp(models, base=base, weights=[1.0, 2.0, 0.5])),
        ("karcher", lambda: karcher(models, max_iter=100, tol=1e-9)),
        ("model_stock", lambda: model_stock(models, base=base)),
        ("model_stock rows", lambda: model_stock(models, base=base, filter_wise=True)),
        ("model_stock long rows", lambda: model_stock(wide, base=wide_base, filter_wise=True)),
        ("model_stock strided", lambda: model_stock([m.T for m in models], base=base.T).T),
    ]


def test_blockwise_spherical_and_model_stock_equal_one_block(monkeypatch):
    """slerp, multislerp, karcher and model_stock over many small blocks (64 entries, a ragged last one; 957
    entries) give the single-block result up to float32 rounding, and stay on the float64 references. Negative
    control: with the last block of every pass left out, every case fails the same comparison."""
    whole = {name: call() for name, call in _blockwise_cases()}

    def agree(name: str, blocks: torch.Tensor) -> bool:
        return blocks.shape == whole[name].shape and bool((blocks - whole[name]).abs().max() <= 1e-6 * whole[name].abs().max())

    _patch(monkeypatch, "GRAM_CHUNK", 64)
    _patch(monkeypatch, "ELEMENTWISE_CHUNK", 64)
    for name, call in _blockwise_cases():
        blocks = call()
        assert blocks.dtype == whole[name].dtype and agree(name, blocks), name
    base, models = _models(3, shape=(33, 29), seed=470)
    w = [1.0, 2.0, 0.5]
    assert torch.allclose(multislerp(models, weights=w).double().reshape(-1), _multislerp_reference(models, w), atol=1e-5)
    ref = base.double().reshape(-1) + _multislerp_reference([m - base for m in models], w)
    assert torch.allclose(multislerp(models, base=base, weights=w).double().reshape(-1), ref, atol=1e-5)
    assert torch.allclose(karcher(models, max_iter=100, tol=1e-9).double(), _karcher_reference(models).view(33, 29), atol=1e-5)
    assert torch.allclose(model_stock(models, base=base, filter_wise=True).double(), _model_stock_reference(models, base, (33, 29)), atol=1e-6)
    wide_base, wide = _models(2, shape=(3, 150), seed=480)
    assert torch.allclose(model_stock(wide, base=wide_base, filter_wise=True).double(), _model_stock_reference(wide, wide_base, (3, 150)),
                          atol=1e-6)
    real = common._row_blocks
    monkeypatch.setattr(common, "_row_blocks", lambda rows, cols: list(real(rows, cols))[:-1])
    _patch(monkeypatch, "_chunked", lambda fn, inputs, dtype, out_dtype: torch.zeros(inputs[0].shape, dtype=out_dtype))
    assert not any(agree(name, call()) for name, call in _blockwise_cases())


def test_blockwise_slerp_and_model_stock_keep_the_bits_of_the_whole_tensor_arithmetic(monkeypatch):
    """bf16 in and out: slerp is ``c_0 a + c_1 b`` and model_stock ``t · mean θ_i + (1 − t) · base`` evaluated on
    whole float32 tensors, rounded once — block by block gives the same bits."""
    _patch(monkeypatch, "GRAM_CHUNK", 64)
    _patch(monkeypatch, "ELEMENTWISE_CHUNK", 64)
    g = G(490)
    base = torch.randn(33, 29, generator=g).bfloat16()
    a, b = ((base.float() + torch.randn(33, 29, generator=g) * 0.01).bfloat16() for _ in range(2))
    c = torch.randn(33, 29, generator=g).bfloat16()  # far from a: a well-conditioned angle (acos near ±1 is not)
    x, y = a.double().reshape(-1), c.double().reshape(-1)
    omega = math.acos(float(x @ y / (x.norm() * y.norm())))
    c0, c1 = math.sin(0.7 * omega) / math.sin(omega), math.sin(0.3 * omega) / math.sin(omega)
    assert torch.equal(slerp([c], base=a, t=0.3).view(torch.int16), a.float().mul_(c0).add_(c, alpha=c1).bfloat16().view(torch.int16))
    ta, tb = a.double() - base.double(), b.double() - base.double()  # exact: bf16 differences fit in float32
    cos = float((ta * tb).sum() / (ta.norm() * tb.norm()))
    t = torch.tensor(2 * cos / (1 + cos), dtype=torch.float32)
    expected = torch.zeros(33, 29).add_(a).add_(b).div_(2).mul_(t).add_(base.float() * (1 - t)).bfloat16()
    assert torch.equal(model_stock([a, b], base=base).view(torch.int16), expected.view(torch.int16))


# ---------------------------------------------------------------------------------------------------- SCE


def _sce_reference(models, base, topk):
    taus = torch.stack([m.double() - base.double() for m in models])
    if topk < 1:
        var = taus.var(0, unbiased=False).reshape(-1)
        k = int(int((var != 0).sum()) * topk)
        order = sorted(range(var.numel()), key=lambda j: (-float(var[j]), j))
        mask = torch.zeros(var.numel(), dtype=torch.float64)
        mask[order[:k]] = 1
        taus = taus * mask.reshape(base.shape)
    energy = taus.square().reshape(len(models), -1).mean(1)
    c = torch.full_like(energy, 1 / len(models)) if energy.sum() < 1e-6 else energy / energy.sum()
    sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0).double()
    agree = (taus.sign() == sign).double()
    cw = c.view(-1, *[1] * base.ndim) * agree
    return base.double() + (taus * cw).sum(0) / cw.sum(0).clamp(min=1e-6)


def test_sce():
    base, models = _models(3, seed=450, scale=1.0)  # large task vectors: energy weights (not the uniform fallback)
    for topk in (1.0, 0.3):
        assert torch.allclose(sce(models, base=base, select_topk=topk).double(), _sce_reference(models, base, topk), atol=1e-6)
    small_base, small = _models(3, seed=451, scale=1e-4)  # Σ mean τ² < 1e-6: uniform weights (mergekit)
    assert torch.allclose(sce(small, base=small_base).double(), _sce_reference(small, small_base, 1.0), atol=1e-7)
    # by hand: τ = (1, −2), (3, 1): energies 2.5, 5 → c = 1/3, 2/3; signs (+, −): e0 both, e1 only τ_1
    out = sce([T(1, -2), T(3, 1)], base=T(0, 0))
    assert close(out, T((1 / 3 * 1 + 2 / 3 * 3) / 1, -2), atol=1e-6)


def test_sce_chunks_change_no_bit(monkeypatch):
    """SCE runs chunk by chunk (no whole-tensor float32 temporaries but the variance): chunk boundaries that cut
    through tied variances and sign elections change no output bit, and the chunked result is SCE's."""
    base, models = _models(3, seed=452, scale=1.0, shape=(37, 29))
    for m in models:
        m.view(-1)[100:160] = base.view(-1)[100:160]  # zero variance, zero task vectors: ties at the selection threshold
    models[0].view(-1)[300:340] = models[1].view(-1)[300:340]
    whole = {topk: sce(models, base=base, select_topk=topk) for topk in (1.0, 0.5, 0.1)}
    _patch(monkeypatch, "ELEMENTWISE_CHUNK", 7)
    for topk, expected in whole.items():
        chunked = sce(models, base=base, select_topk=topk)
        assert torch.equal(chunked, expected)
        assert torch.allclose(chunked.double(), _sce_reference(models, base, topk), atol=1e-6)
    _patch(monkeypatch, "_DOT_CHUNK", 5)  # energies summed in other chunks: the same up to float64 rounding
    assert torch.allclose(sce(models, base=base, select_topk=0.5).double(), _sce_reference(models, base, 0.5), atol=1e-6)


# ---------------------------------------------------------------------------------------- RAM, RAM+, NearSwap


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(6)
    a, b = T(1, 2, 0, 0, 4, 1e-6), T(3, 0, 5, 0, -2, 0)
    # counts (2, 1, 1, 0, 2, 0): shared entries averaged, unique ones kept, |τ| <= ε ignored
    assert close(ram([a, b], base=base), T(2, 2, 5, 0, 1, 0))
    # RAM+: a has 2 shared, 1 unique → ρ = 2, clipped to α = 0.2 → λ = 1 + 0.1·0.2; b: 2 shared, 1 unique, same
    lam = 1 + 0.1 * 0.2
    assert close(ramplus_tl([a, b], base=base), T(2, 2 * lam, 5 * lam, 0, 1, 0))
    assert close(ramplus_tl([a, b], base=base, r=1.0, alpha=5.0), T(2, 2 * 3, 5 * 3, 0, 1, 0))


def test_nearswap_by_hand():
    base, other = T(0, 0, 0, 1), T(0.05, 0.5, -2, 1)
    # |diff| = (0.05, 0.5, 2, 0): within t = 0.1 → swapped; else moved by t toward the other; equal → stays
    assert close(nearswap([other], base=base, t=0.1), T(0.05, 0.1, -0.1, 1))
    with pytest.raises(SymmergeError, match="parameter 't' is required"):
        nearswap([other], base=base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nearswap_chunk_by_chunk_keeps_the_bits_of_the_whole_tensor_formula(monkeypatch, dtype):
    """Chunked (to bound memory) nearswap gives the bits of the formula on whole tensors; control: another t differs."""
    _patch(monkeypatch, "ELEMENTWISE_CHUNK", 64)
    g = G(495)
    base = torch.randn(37, 29, generator=g).to(dtype)
    other = (base.float() + torch.randn(37, 29, generator=g) * 0.01).to(dtype)
    other.view(-1)[::7] = base.view(-1)[::7]  # equal entries: |a − b| = 0, clamped to 1e-6
    a, b = base.float(), other.float()
    s = (0.004 / (a - b).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    whole = (a + s * (b - a)).to(dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(nearswap([other], base=base, t=0.004).view(bits), whole.view(bits))
    assert not torch.equal(nearswap([other], base=base, t=0.003).view(bits), whole.view(bits))


def test_arcee_fusion_against_a_float64_reference():
    base = torch.randn(8, 16, generator=G(460))
    other = base + 0.05 * torch.randn(8, 16, generator=G(461))
    other[2, :4] += 1.0  # a few large, important changes
    a, b = base.double(), other.double()
    p, q = torch.softmax(b, -1) + 1e-8, torch.softmax(a, -1) + 1e-8
    importance = ((b - a).abs() * (p * (p / q).log()).sum(-1, keepdim=True)).reshape(-1)
    s = importance.sort().values
    q1, med, q3 = (s[int(x * (s.numel() - 1))] for x in (0.25, 0.5, 0.75))
    ref = a + (b - a) * (importance >= med + 1.5 * (q3 - q1)).reshape(a.shape)
    out = arcee_fusion([other], base=base)
    assert torch.allclose(out.double(), ref, atol=1e-6)
    assert torch.equal(out[2, :4], other[2, :4]) and 0 < int((out != base).sum()) < 128


def test_passthrough():
    x = torch.randn(3, 4, generator=G(470)).to(torch.bfloat16)
    assert torch.equal(passthrough([x]), x) and passthrough([x]).dtype == torch.bfloat16
    assert torch.equal(passthrough([x], scale=0.5), (x.float() * 0.5).to(torch.bfloat16))
    assert torch.equal(passthrough([x], scale=[2.0], out_dtype=torch.float32), x.float() * 2)
    m = get_method("passthrough")
    assert m.min_models == m.max_models == 1 and "alignment does not apply" in m.description
    with pytest.raises(SymmergeError, match="passthrough: merges exactly 1 models, got 2"):
        m.check_models(2, has_base=False)


def test_all_twenty_mergekit_methods_are_registered():
    mergekit = {"linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl", "model_stock", "nearswap", "arcee_fusion", "passthrough"}
    assert set(MERGE_METHODS) == mergekit | {"fisher", "regmean"}
    assert {m.name for m in list_methods() if m.optional_base} == {"slerp", "nuslerp", "multislerp"}


def test_breadcrumbs_mask_equals_a_stable_sort_window(monkeypatch):
    """``_outlier_keep`` (two exact selections) keeps exactly the entries a stable ascending sort puts at ranks
    ``[bottom, bottom + target)``, on tie-heavy and continuous magnitudes, above and below the bracketing size."""
    monkeypatch.setattr(sparsify, "EXACT_DIRECT_MAX", 2000)  # the 5000-entry tensors take the bracketing selection
    g = G(11)
    for values in (torch.randint(-4, 5, (5000,), generator=g).float() * 0.25, torch.randn(5000, generator=g), torch.randn(37, generator=g)):
        n = values.numel()
        for density, gamma in ((0.8, 0.05), (0.5, 0.01), (0.9, 0.3), (0.01, 0.0), (1.0, 0.0), (0.3, 0.7)):
            target, top = int(density * n), int(gamma * n)
            bottom = max(0, n - target - top)
            order = torch.sort(values.abs(), stable=True).indices
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[bottom : bottom + target]] = True
            assert torch.equal(gta._outlier_keep(values, density, gamma), expected), (density, gamma)
    # negative control: ties broken from the end would differ on tie-heavy input
    values = torch.randint(0, 3, (500,), generator=g).float()
    last = torch.zeros(500, dtype=torch.bool)
    last[499 - torch.sort(values.flip(0), stable=True).indices[:200]] = True  # the smallest, ties: last index first
    assert not torch.equal(gta._smallest(values, 200), last)


def test_chunked_linear_and_task_arithmetic_equal_the_whole_tensor_arithmetic(monkeypatch):
    """Chunked evaluation (here 64-entry chunks, a ragged last one) gives the bits of the same operations on whole
    tensors, bf16 in and out (one rounding)."""
    _patch(monkeypatch, "ELEMENTWISE_CHUNK", 64)
    g = G(21)
    base = torch.randn(33, 29, generator=g).bfloat16()
    a, b = ((base.float() + torch.randn(33, 29, generator=g) * 0.01).bfloat16() for _ in range(2))
    whole = torch.zeros(33, 29).add_(a, alpha=0.3).add_(b, alpha=0.9).div_(1.2).bfloat16()
    assert torch.equal(linear([a, b], weights=[0.3, 0.9]).view(torch.int16), whole.view(torch.int16))
    tv = torch.zeros(33, 29).add_(a.float().sub_(base), alpha=0.3).add_(b.float().sub_(base), alpha=0.9)
    assert torch.equal(task_arithmetic([a, b], base=base, weights=[0.3, 0.9], lambda_=0.7).view(torch.int16),
                       tv.mul_(0.7).add_(base).bfloat16().view(torch.int16))
    assert torch.equal(task_arithmetic([a.T, b.T], base=base.T), task_arithmetic([a, b], base=base).T)  # strided inputs


def test_della_ranks_equal_a_double_argsort():
    """The ranks come from scattering the sort order (its inverse permutation): the same as ``argsort(argsort)``,
    ties by position, on tie-heavy and continuous rows and a 1-D tensor."""
    g = G(31)
    for x in (torch.randint(-3, 4, (37, 53), generator=g).float() * 0.5, torch.randn(300, 1000, generator=g), torch.randn(9, generator=g)):
        rows = x.reshape(1, -1) if x.ndim < 2 else x
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
        expected = ranks.div_(rows.shape[1] - 1).clamp_(0, 1).mul_(0.2).add_(0.4).reshape(x.shape)
        assert torch.equal(della_keep_probabilities(x, 0.5, 0.1), expected)


def test_params_read_mergekits_written_booleans_and_yaml11_exponents():
    # mergekit writes true/false as 1.0/0.0 in the configs it saves; PyYAML reads 1e-5 (no dot) as a word
    from symmerge.merge.methods import validate_params

    p = validate_params("della_linear", {"normalize": 1.0, "rescale": 0, "int8_mask": 1})
    assert p["normalize"] is True and p["rescale"] is False and p["int8_mask"] is True
    assert validate_params("karcher", {"tol": "1e-5", "max_iter": "1e1"}) == {"tol": 1e-5, "max_iter": 10}
    assert validate_params("ties", {"density": ["5e-1", 0.3]})["density"] == [0.5, 0.3]
    for params, message in (({"normalize": 0.5}, "normalize must be true or false, got 0.5"), ({"tol": "1e-5x"}, "tol must be a number, got '1e-5x'"),
                            ({"tol": "inf"}, "tol must be a number, got 'inf'"), ({"max_iter": "1.5e0"}, "max_iter must be an integer, got 1.5")):
        with pytest.raises(SymmergeError, match=re.escape(message)):
            validate_params("della_linear" if "normalize" in params else "karcher", params)
