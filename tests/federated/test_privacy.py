"""Client-level DP: the accountant's epsilon, the clipped and noised mean, reproducible noise."""

import math

import numpy as np
import pytest

pytest.importorskip("opacus")

from lmscale.errors import LmscaleError  # noqa: E402
from lmscale.federated.privacy import (  # noqa: E402
    clip_update,
    epsilon,
    noise_for_epsilon,
    private_mean,
    update_norm,
)


def gaussian_rdp_epsilon(noise: float, steps: int, delta: float, orders) -> float:
    """Renyi DP of `steps` full-batch Gaussian mechanisms, T a / (2 z^2), converted to
    (epsilon, delta) by Balle et al. (2020)'s bound, minimised over the orders a."""
    best = math.inf
    for a in orders:
        rdp = steps * a / (2 * noise**2)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


def gaussian_exact_epsilon(noise: float, steps: int, delta: float) -> float:
    """The tight epsilon: T Gaussian mechanisms are mu-GDP with mu = sqrt(T) / z (Dong et al.),
    whose delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2); solved by bisection."""
    mu = math.sqrt(steps) / noise
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        d = phi(-mid / mu + mu / 2) - math.exp(mid) * phi(-mid / mu - mu / 2)
        lo, hi = (mid, hi) if d > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("noise,rounds", [(0.8, 10), (1.0, 5), (2.0, 50)])
def test_epsilon_with_every_client_each_round_is_the_gaussian_mechanisms(noise, rounds):
    from opacus.accountants import RDPAccountant

    delta = 1e-5
    got = epsilon(noise, rounds, 1.0, delta)
    assert got == pytest.approx(
        gaussian_rdp_epsilon(noise, rounds, delta, RDPAccountant.DEFAULT_ALPHAS), rel=1e-9
    )
    exact = gaussian_exact_epsilon(noise, rounds, delta)
    assert exact <= got <= 1.3 * exact  # RDP is an upper bound, and not a loose one


def test_subsampling_lowers_epsilon_and_noise_for_epsilon_inverts_it():
    full, half = epsilon(1.0, 20, 1.0, 1e-5), epsilon(1.0, 20, 0.5, 1e-5)
    assert half < full
    assert epsilon(1.0, 40, 0.5, 1e-5) > half  # composition only adds
    for target in (2.0, 8.0):
        z = noise_for_epsilon(target, 10, 1.0, 1e-5)
        assert epsilon(z, 10, 1.0, 1e-5) <= target
        assert epsilon(z * 0.97, 10, 1.0, 1e-5) > target * 0.99  # the smallest such noise
    with pytest.raises(LmscaleError, match="--dp-epsilon must be positive"):
        noise_for_epsilon(0.0, 10, 1.0, 1e-5)


def test_clipping_bounds_each_update_and_the_mean_is_over_the_clients_asked():
    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=(4, 3)).astype(np.float32) * s, rng.normal(size=5).astype(
        np.float32) * s] for s in (0.01, 10.0)]  # fmt: skip
    clipped, norm = clip_update(updates[1], 1.0)
    assert norm > 1 and update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    small, _ = clip_update(updates[0], 1.0)
    assert all(
        np.array_equal(a, b) for a, b in zip(small, updates[0], strict=True)
    )  # within the bound
    mean, norms = private_mean(updates, 1.0, 0.0, expected=4, rng=rng)
    expected = [(updates[0][i] + clipped[i]) / 4 for i in range(2)]
    for got, want in zip(mean, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert norms[1] == pytest.approx(norm)


def test_dp_noise_is_reproducible_at_a_fixed_seed_and_has_the_stated_std():
    updates = [[np.zeros((200, 100), np.float32)] for _ in range(3)]
    a, _ = private_mean(updates, 2.0, 0.8, 3, np.random.default_rng([7, 1]))
    b, _ = private_mean(updates, 2.0, 0.8, 3, np.random.default_rng([7, 1]))
    c, _ = private_mean(updates, 2.0, 0.8, 3, np.random.default_rng([7, 2]))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert a[0].std() == pytest.approx(0.8 * 2.0 / 3, rel=0.02)  # z C / m
