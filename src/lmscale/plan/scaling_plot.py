"""scaling.png: loss against size (points, fit, extrapolation) and against compute (frontier)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmscale.plan.scaling_report import EXTRAPOLATE, curves_of
from lmscale.plan.units import fmt_count


def plot_study(results: dict, path: str | Path) -> Path:
    """Write the two panels of a study's results (matplotlib's Agg backend) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_size, by_compute) = plt.subplots(1, 2, figsize=(12, 4.8))
    _loss_vs_params(by_size, results)
    _loss_vs_compute(by_compute, results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _loss_vs_params(ax, results: dict) -> None:
    from matplotlib.ticker import NullFormatter

    runs, fit = results["runs"], results["fits"]["loss_vs_params"]
    params = np.array([r["params"] for r in runs], dtype=float)
    ax.scatter(params, [r["final_loss"] for r in runs], color="k", zorder=3, label="runs (final)")
    if "error" not in fit:
        inside = np.geomspace(params.min(), params.max(), 100)
        beyond = np.geomspace(params.max(), EXTRAPOLATE * params.max(), 50)
        ax.plot(inside, _power(fit, inside), color="C0", label=_label(fit, "alpha"))
        ax.plot(beyond, _power(fit, beyond), color="C0", linestyle="--", label="extrapolation")
        far = fit["extrapolation"]
        if far["se"] is not None:
            ax.errorbar(far["params"], far["loss"], yerr=far["se"], color="C0", capsize=3)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    tpp = np.median([r["tokens_per_param"] for r in runs])
    ax.set_title(f"loss vs size ({tpp:.2g} tokens per parameter)")
    ax.legend(fontsize=8)


def _loss_vs_compute(ax, results: dict) -> None:
    fits = results["fits"]
    for i, (run, curve) in enumerate(zip(results["runs"], curves_of(results["runs"]), strict=True)):
        ax.plot(curve.flops, curve.loss, marker=".", color=f"C{i % 10}", alpha=0.7,
                label=f"N = {fmt_count(run['params'])}")  # fmt: skip
    fit = fits["loss_vs_compute"]
    if "error" not in fit:
        lo = min(p["flops"] for r in results["runs"] for p in r["curve"])
        compute = np.geomspace(lo, fits["budget_flops"], 100)
        ax.plot(
            compute, _power(fit, compute), color="k", linestyle="--", label=_label(fit, "gamma")
        )
        ax.axvline(fits["budget_flops"], color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("validation loss (nats/token)")
    best = fits["optimal"]
    title = "loss vs compute (frontier fit to the budget)"
    if "error" not in best:
        relation = {None: "=", "upper": "<=", "lower": ">="}[best.get("bound")]
        size = fmt_count(best["params"])
        title += f"\noptimal at {fits['budget_flops']:.2g} FLOPs: N {relation} {size}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _power(fit: dict, x: np.ndarray) -> np.ndarray:
    return fit["E"] + fit["A"] * x ** -fit["alpha"]


def _label(fit: dict, exponent: str) -> str:
    return f"fit: E={fit['E']:.3g}, {exponent}={fit['alpha']:.3g}"
