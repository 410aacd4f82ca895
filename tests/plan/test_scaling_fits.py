"""The scaling-law fits, on synthetic data drawn from known laws."""

import math

import numpy as np
import pytest

from lmscale.plan.scaling import (
    Curve,
    FitError,
    compute_frontier,
    fit_loss_vs_compute,
    fit_power_law,
    optimal_size,
)

E, A, ALPHA = 1.7, 400.0, 0.4
SIZES = np.geomspace(5e5, 6.4e7, 8)


def law(n):
    return E + A * n**-ALPHA


def test_a_noiseless_law_is_recovered_exactly():
    fit = fit_power_law(SIZES, law(SIZES))
    assert fit.E == pytest.approx(E, rel=1e-4)
    assert fit.A == pytest.approx(A, rel=1e-3)
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-4)
    assert fit.dof == 5 and fit.rms < 1e-6
    assert fit(1e9) == pytest.approx(law(1e9), rel=1e-5)


def test_the_stated_uncertainty_covers_the_truth():
    """95% intervals from the fit's covariance hold the true parameters about 95% of the time."""
    covered = {"E": 0, "A": 0, "alpha": 0}
    trials = 200
    for seed in range(trials):
        noisy = law(SIZES) + np.random.default_rng(seed).normal(0, 0.01, len(SIZES))
        fit = fit_power_law(SIZES, noisy)
        for name, truth in (("E", E), ("A", A), ("alpha", ALPHA)):
            lo, hi = fit.interval(name)
            covered[name] += lo <= truth <= hi
    for name, count in covered.items():
        assert 0.88 <= count / trials <= 1.0, (name, count)


def test_prediction_error_is_smallest_inside_the_data():
    noisy = law(SIZES) + np.random.default_rng(0).normal(0, 0.01, len(SIZES))
    fit = fit_power_law(SIZES, noisy)
    inside, far = fit.predict_se([fit.x_ref, 100 * SIZES.max()])
    assert 0 < inside < far
    assert abs(fit(1e10) - law(1e10)) < 3 * fit.predict_se(1e10)


def test_three_points_fit_exactly_and_say_they_have_no_uncertainty():
    fit = fit_power_law(SIZES[::3], law(SIZES[::3]))
    assert fit.dof == 0 and math.isnan(fit.alpha_se)
    assert fit.as_dict()["alpha_se"] is None
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-3)


@pytest.mark.parametrize(
    "x, loss, message",
    [
        ([1e6, 2e6], [3.0, 2.9], "at least 3 distinct"),
        ([1e6, 2e6, 4e6, 8e6], [3.0, 3.1, 3.2, 3.3], "does not fall"),
    ],
)
def test_points_that_determine_no_law_are_a_fit_error(x, loss, message):
    with pytest.raises(FitError, match=message):
        fit_power_law(x, loss)


def test_the_frontier_is_the_lower_envelope_of_all_evaluations():
    small = Curve(1e6, (1.0, 2.0, 4.0, 8.0), (5.0, 4.0, 3.5, 3.3))
    large = Curve(4e6, (4.0, 8.0, 16.0, 32.0), (4.5, 3.4, 3.0, 2.8))
    frontier = compute_frontier([small, large])
    assert frontier == [
        (1.0, 5.0, 1e6), (2.0, 4.0, 1e6), (4.0, 3.5, 1e6), (8.0, 3.3, 1e6),
        (16.0, 3.0, 4e6), (32.0, 2.8, 4e6),
    ]  # fmt: skip


# Chinchilla's fitted law (Hoffmann et al. 2022, Approach 3): L(N, D) = E + A/N^a + B/D^b.
CH_E, CH_A, CH_B, CH_ALPHA, CH_BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def chinchilla_curves(sizes):
    """Loss curves of constant-LR runs: each size evaluated over a wide range of tokens."""
    curves = []
    for n in sizes:
        tokens = np.geomspace(0.5 * n, 500 * n, 40)
        loss = CH_E + CH_A / n**CH_ALPHA + CH_B / tokens**CH_BETA
        curves.append(Curve(float(n), tuple(6 * n * tokens), tuple(loss)))
    return curves


def test_approach_1_recovers_the_optimum_of_a_known_law():
    """With C = 6ND, the law's optimum is N_opt = G (C/6)^(b/(a+b)): a = 0.45."""
    budget = 1e24
    best = optimal_size(chinchilla_curves(np.geomspace(1e7, 1e10, 16)), budget)
    exponent = CH_BETA / (CH_ALPHA + CH_BETA)
    g = (CH_ALPHA * CH_A / (CH_BETA * CH_B)) ** (1 / (CH_ALPHA + CH_BETA))
    true_n = g * (budget / 6) ** exponent
    assert best.a == pytest.approx(exponent, abs=0.03)
    assert 0.7 < best.params / true_n < 1.4
    assert best.tokens == pytest.approx(budget / (6 * best.params))
    assert len(best.winners) >= 8 and best.bound is None


def test_runs_too_short_for_the_optimum_give_an_upper_bound():
    """Every size stopped at 0.25 tokens per parameter, far below the law's optimum (~20): at
    each compute the smaller size wins, and N_opt only bounds the optimum from above."""
    sizes = np.geomspace(5e5, 8e6, 5)
    curves = []
    for n in sizes:
        tokens = np.geomspace(0.025 * n, 0.25 * n, 10)
        loss = CH_E + CH_A / n**CH_ALPHA + CH_B / tokens**CH_BETA
        curves.append(Curve(float(n), tuple(6 * n * tokens), tuple(loss)))
    best = optimal_size(curves, 1e16)
    assert best.bound == "upper"
    assert best.a == pytest.approx(0.5, abs=0.1)  # the allocation's own N ~ C^0.5


def test_the_frontier_fit_sees_loss_fall_with_compute():
    fit = fit_loss_vs_compute(chinchilla_curves(np.geomspace(1e7, 1e10, 8)))
    assert 0 < fit.alpha < 1 and fit.E < 2.5 and fit.dof > 0


def test_one_winning_size_leaves_the_optimum_undetermined():
    small = Curve(1e6, (1.0, 10.0), (5.0, 4.0))
    large = Curve(4e6, (2.0, 20.0), (6.0, 5.0))  # worse at every compute both reach
    with pytest.raises(FitError, match="best at every compute"):
        optimal_size([small, large], 1e3)
