"""Differential privacy: what the noise buys, and the client-level mechanism itself.

Two guarantees, on two different units of privacy:

- **Client-level** (`--dp-clip C --dp-noise z`, or `--dp-epsilon e`): DP-FedAvg with a fixed
  clip (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models").
  Each client's update (its tensors minus the global ones) is clipped to L2 norm C; the server
  averages the clipped updates with the fixed denominator m (the clients asked each round, so
  one client moves the average by at most C/m whether or not others drop out) and adds Gaussian
  noise of std z*C/m. Neighbouring datasets differ by one whole client's data, so the guarantee
  covers everything a site holds, not just one of its lines.
- **Sample-level** (`--dp-sgd`, see `local`): DP-SGD inside each client, through Opacus;
  neighbouring datasets differ by one training window of one client.

Either way epsilon comes from Opacus's Renyi-DP accountant for the subsampled Gaussian
mechanism (Mironov, 2017; Mironov et al., 2019): `rounds` compositions at sampling rate q (the
fraction of clients asked per round; 1 when all are), converted to (epsilon, delta).
"""

from __future__ import annotations

import math

import numpy as np

from lmscale.errors import LmscaleError


def epsilon(noise: float, steps: int, sample_rate: float, delta: float) -> float:
    """Epsilon at `delta` after `steps` subsampled Gaussian steps of multiplier `noise`."""
    if steps == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target: float, steps: int, sample_rate: float, delta: float) -> float:
    """The smallest noise multiplier whose epsilon after `steps` is at most `target`."""
    if not target > 0:
        raise LmscaleError(f"--dp-epsilon must be positive, got {target}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=sample_rate, steps=steps,
        accountant="rdp", epsilon_tolerance=0.01,
    ))  # fmt: skip


def default_delta(examples: int) -> float:
    """delta below 1/n for n the number of protected units (clients, or windows)."""
    return min(1e-5, 1.0 / (10 * max(examples, 1)))


def update_norm(update: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))


def clip_update(update: list[np.ndarray], clip: float) -> tuple[list[np.ndarray], float]:
    """`update` scaled to L2 norm at most `clip` (all tensors together); and its norm before."""
    norm = update_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [u * np.asarray(scale, dtype=u.dtype) for u in update], norm


def private_mean(
    updates: list[list[np.ndarray]], clip: float, noise: float, expected: int,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[float]]:  # fmt: skip
    """DP-FedAvg's aggregate: the clipped updates' sum over `expected`, plus N(0, (z C / m)^2).

    Returns:
        The noised mean update, and each update's norm before clipping.
    """
    if not updates:
        raise LmscaleError("no client update to aggregate")
    clipped, norms = zip(*(clip_update(u, clip) for u in updates), strict=True)
    std = noise * clip / expected
    mean = []
    for parts in zip(*clipped, strict=True):
        total = np.sum(np.stack([p.astype(np.float64) for p in parts]), axis=0) / expected
        mean.append((total + rng.normal(0.0, std, size=total.shape)).astype(parts[0].dtype))
    return mean, list(norms)
