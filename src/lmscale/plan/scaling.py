"""Scaling-law fits: loss against size, loss against compute, and the compute-optimal size.

Three fits, each returning a small frozen dataclass:

- `fit_power_law(x, loss)`: L(x) = E + A * x^(-alpha) by least squares, with standard errors from
  the covariance of the fit (s^2 (J^T J)^-1, s^2 = RSS / (points - 3)). Used for L(N), N the
  non-embedding parameters (Kaplan et al. 2020), and for L(C) on the compute-efficient frontier.
- `compute_frontier(curves)`: the lower envelope of every evaluation of every run in (C, L).
- `optimal_size(curves, budget)`: Chinchilla's Approach 1 (Hoffmann et al. 2022): on a log grid
  of compute, the size whose (interpolated) loss curve is lowest; N_opt = G * C^a fitted to those
  minima in log space and extrapolated to the budget, with D = C / (6 N) tokens.

Pure numpy: the 3-parameter fit is separable (E and A are linear given alpha), so alpha is found
on a grid refined by golden-section search and E, A solved in closed form at each alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmscale.errors import LmscaleError

# Two-sided 95% quantiles of Student's t by degrees of freedom (data, not code); above 30, 1.96.
T95 = (math.nan, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
       2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
ALPHA_GRID = np.geomspace(1e-3, 4.0, 400)
"""Exponents searched before refinement (loss exponents of LMs are 0.05-0.5)."""


class FitError(LmscaleError):
    """The points do not determine the fit (too few, or no trend); the message says why."""


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with `dof` degrees of freedom (nan for 0)."""
    return T95[dof] if dof < len(T95) else 1.96


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = E + A * x^(-alpha), fitted by least squares to `points` points."""

    E: float
    """The irreducible loss: the fit's limit as x grows without bound."""
    A: float
    """The scale of the reducible part, in the units of x (A * x^-alpha is in nats)."""
    alpha: float
    """The exponent: each doubling of x cuts the reducible loss by 2^-alpha."""
    E_se: float
    A_se: float
    alpha_se: float
    """Standard errors (nan with no degrees of freedom left: 3 points fit exactly)."""
    points: int
    dof: int
    """Degrees of freedom of the residuals: points - 3."""
    rms: float
    """Root-mean-square residual (nats)."""
    x_ref: float
    """The geometric mean of x; the fit is computed in x / x_ref, where it is well scaled."""
    covariance: tuple[tuple[float, ...], ...]
    """Covariance of (E, A_ref, alpha), A_ref = A * x_ref^-alpha: what `predict_se` uses."""

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def predict_se(self, x: float | np.ndarray) -> np.ndarray:
        """Standard error of the fitted loss at x (the delta method over the covariance)."""
        u = np.asarray(x, dtype=float) / self.x_ref
        a_ref = self.A * self.x_ref**-self.alpha
        grad = np.stack([np.ones_like(u), u**-self.alpha, -a_ref * u**-self.alpha * np.log(u)])
        cov = np.asarray(self.covariance)
        return np.sqrt(np.maximum(np.einsum("i...,ij,j...->...", grad, cov, grad), 0.0))

    def interval(self, name: str) -> tuple[float, float]:
        """The 95% confidence interval of parameter `name` (E, A or alpha), t-distributed."""
        value, se = getattr(self, name), getattr(self, f"{name}_se")
        half = t95(self.dof) * se
        return value - half, value + half

    def as_dict(self) -> dict:
        keys = ("E", "A", "alpha", "E_se", "A_se", "alpha_se", "points", "dof", "rms", "x_ref")
        out = {key: _finite_or_none(getattr(self, key)) for key in keys}
        return out | {"alpha_ci95": list(self.interval("alpha")) if self.dof > 0 else None}


def fit_power_law(x: Sequence[float], loss: Sequence[float], what: str = "x") -> PowerLaw:
    """Fit L(x) = E + A * x^(-alpha) with E >= 0, A >= 0, by least squares in L.

    Args:
        x: sizes or compute, positive; at least three distinct values.
        loss: the loss at each x.
        what: what x is, for messages ("N", "C").

    Returns:
        The fit, with standard errors from s^2 (J^T J)^-1 at the optimum.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if len(np.unique(x)) < 3:
        raise FitError(f"L({what}) needs at least 3 distinct {what} to fit 3 parameters")
    x_ref = float(np.exp(np.mean(np.log(x))))
    log_u = np.log(x / x_ref)
    rss, _, _ = _profile(ALPHA_GRID, log_u, y)
    best = int(np.argmin(rss))
    lo, hi = ALPHA_GRID[max(best - 1, 0)], ALPHA_GRID[min(best + 1, len(ALPHA_GRID) - 1)]
    alpha = _golden_min(lambda a: float(_profile(np.array([a]), log_u, y)[0][0]), lo, hi)
    rss, E, a_ref = (float(v[0]) for v in _profile(np.array([alpha]), log_u, y))
    if a_ref <= 0:
        raise FitError(f"the loss does not fall with {what}: no power law to fit")
    return _with_errors(x, y, x_ref, E, a_ref, alpha, rss)


def _profile(alphas: np.ndarray, log_u: np.ndarray, y: np.ndarray):
    """For each alpha: the RSS, E >= 0 and A_ref >= 0 of the least-squares y = E + A_ref u^-alpha.

    The constrained optimum of this convex problem is the free one when it is feasible, else the
    better of the two edges (E = 0, or A_ref = 0: a constant).
    """
    basis = np.exp(-alphas[:, None] * log_u[None, :])  # (alphas, points)
    n, sb, sbb = len(y), basis.sum(1), (basis * basis).sum(1)
    sy, sby = y.sum(), (basis * y).sum(1)
    det = n * sbb - sb * sb
    safe = np.where(det > 0, det, 1.0)
    E_free, A_free = (sbb * sy - sb * sby) / safe, (n * sby - sb * sy) / safe
    free = (det > 0) & (E_free >= 0) & (A_free >= 0)
    A_edge = np.maximum(sby / sbb, 0.0)
    rss_edge = ((y - A_edge[:, None] * basis) ** 2).sum(1)
    constant = ~free & (((y - y.mean()) ** 2).sum() < rss_edge)
    E = np.where(free, E_free, np.where(constant, y.mean(), 0.0))
    A = np.where(free, A_free, np.where(constant, 0.0, A_edge))
    rss = ((y - E[:, None] - A[:, None] * basis) ** 2).sum(1)
    return rss, E, A


def _golden_min(f, lo: float, hi: float, iterations: int = 60) -> float:
    """The minimum of a unimodal f on [lo, hi] by golden-section search."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def _with_errors(x, y, x_ref, E, a_ref, alpha, rss) -> PowerLaw:
    """The fit with its covariance: s^2 (J^T J)^-1 over (E, A_ref, alpha)."""
    u = x / x_ref
    jac = np.stack([np.ones_like(u), u**-alpha, -a_ref * u**-alpha * np.log(u)], 1)
    dof = len(y) - 3
    s2 = rss / dof if dof > 0 else math.nan
    cov = s2 * np.linalg.pinv(jac.T @ jac)
    A = a_ref * x_ref**alpha
    # A = A_ref * x_ref^alpha: its variance by the delta method over (A_ref, alpha).
    grad_a = np.array([0.0, x_ref**alpha, A * math.log(x_ref)])
    A_se = math.sqrt(max(grad_a @ cov @ grad_a, 0.0)) if dof > 0 else math.nan
    se = np.sqrt(np.maximum(np.diag(cov), 0.0)) if dof > 0 else np.full(3, math.nan)
    return PowerLaw(
        E=float(E), A=float(A), alpha=float(alpha), E_se=float(se[0]), A_se=A_se,
        alpha_se=float(se[2]), points=len(y), dof=dof, rms=math.sqrt(rss / len(y)), x_ref=x_ref,
        covariance=tuple(tuple(float(v) for v in row) for row in cov),
    )  # fmt: skip


# --- loss against compute --------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One run's evaluations: loss after each amount of training compute."""

    params: float
    """Non-embedding parameters of the run's model."""
    flops: tuple[float, ...]
    """Cumulative training FLOPs at each evaluation, increasing."""
    loss: tuple[float, ...]
    """Validation loss at each evaluation."""


def compute_frontier(curves: Sequence[Curve]) -> list[tuple[float, float, float]]:
    """The compute-efficient frontier: (C, L, N) of every evaluation that no evaluation with
    less or equal compute beats."""
    points = sorted(
        (flops, loss, curve.params)
        for curve in curves
        for flops, loss in zip(curve.flops, curve.loss, strict=True)
    )
    frontier, best = [], math.inf
    for point in points:
        if point[1] < best:
            frontier.append(point)
            best = point[1]
    return frontier


def fit_loss_vs_compute(curves: Sequence[Curve]) -> PowerLaw:
    """L(C) = E + A * C^(-gamma) on the compute-efficient frontier (`alpha` holds gamma)."""
    frontier = compute_frontier(curves)
    return fit_power_law([p[0] for p in frontier], [p[1] for p in frontier], what="C")


# --- the compute-optimal size (Chinchilla's Approach 1) --------------------------------------


@dataclass(frozen=True)
class OptimalSize:
    """N_opt(C) = G * C^a from the best size at each compute, extrapolated to a budget."""

    G: float
    a: float
    """The exponent of N_opt in C (Chinchilla found 0.50, Kaplan et al. 0.73)."""
    budget_flops: float
    params: float
    """N_opt at the budget: non-embedding parameters."""
    tokens: float
    """D = C / (6 N) at the budget."""
    winners: tuple[float, ...]
    """The sizes that were the best at some compute of the grid, smallest first."""
    compute_range: tuple[float, float]
    """The compute the grid spans (where at least two runs have evaluations)."""
    grid: tuple[tuple[float, float, float], ...]
    """(C, best N, its interpolated loss) at each grid point."""
    bound: str | None = None
    """None when the optimum lies inside what the runs sampled; "upper" when the smallest
    competing size won at every grid point (the optimum is at more tokens per parameter than
    any run reached, so `params` is at most this), "lower" when the largest always won."""

    def as_dict(self) -> dict:
        keys = ("G", "a", "budget_flops", "params", "tokens", "bound")
        out = {key: getattr(self, key) for key in keys}
        out |= {"tokens_per_param": self.tokens / self.params, "winners": list(self.winners)}
        out |= {"compute_range": list(self.compute_range), "grid": [list(p) for p in self.grid]}
        return out


def optimal_size(
    curves: Sequence[Curve], budget_flops: float, grid_points: int = 60
) -> OptimalSize:
    """Chinchilla's Approach 1: for each compute of a log grid, the size with the lowest loss.

    Each run's loss is interpolated linearly in log C between its evaluations; a grid point
    counts where at least two runs have evaluations around it. N_opt = G * C^a is fitted to the
    winners by least squares in (log C, log N) and extrapolated to `budget_flops`.

    NOTE: at one C, a smaller size has trained on more tokens per parameter than a larger one.
    When the smaller of the competing sizes wins at every grid point, the optimum lies at more
    tokens per parameter than the runs reached: the fit then traces the study's own allocation
    (N ~ C^0.5 when every size trains on the same tokens per parameter) and N_opt is only an
    upper bound, which `bound` says.
    """
    if len({c.params for c in curves}) < 2:
        raise FitError("the compute-optimal size needs runs of at least 2 sizes")
    logs = [np.log(np.asarray(c.flops, dtype=float)) for c in curves]
    lo, hi = min(lc.min() for lc in logs), max(lc.max() for lc in logs)
    grid, winners, edges = [], [], set()
    for log_c in np.linspace(lo, hi, grid_points):
        inside = [i for i, lc in enumerate(logs) if lc[0] <= log_c <= lc[-1]]
        if len(inside) < 2:
            continue
        losses = [float(np.interp(log_c, logs[i], curves[i].loss)) for i in inside]
        best = inside[int(np.argmin(losses))]
        grid.append((math.exp(log_c), curves[best].params, min(losses)))
        winners.append(curves[best].params)
        edges.add(_edge(winners[-1], [curves[i].params for i in inside]))
    distinct = sorted(set(winners))
    if len(distinct) < 2:
        only = f" ({distinct[0]:.3g} parameters)" if distinct else ""
        raise FitError(
            f"one size{only} is the best at every compute the runs share: the optimum's trend is "
            "undetermined (widen --sizes or train longer)"
        )
    log_c, log_n = np.log([g[0] for g in grid]), np.log([g[1] for g in grid])
    a, log_g = np.polyfit(log_c, log_n, 1)
    params = math.exp(log_g) * budget_flops**a
    return OptimalSize(
        G=math.exp(log_g), a=float(a), budget_flops=budget_flops, params=params,
        tokens=budget_flops / (6 * params), winners=tuple(distinct),
        compute_range=(grid[0][0], grid[-1][0]), grid=tuple(grid),
        bound=edges.pop() if len(edges) == 1 else None,
    )  # fmt: skip


def _edge(winner: float, competing: list[float]) -> str | None:
    """Which bound a grid point's winner implies: the smallest competitor an upper one."""
    if winner == min(competing):
        return "upper"
    return "lower" if winner == max(competing) else None


def chinchilla_rule_params(budget_flops: float, tokens_per_param: float = 20.0) -> float:
    """The size that trains on `tokens_per_param` tokens per parameter within C = 6 N D."""
    return math.sqrt(budget_flops / (6 * tokens_per_param))


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
