"""A scaling study's results: the fits over its runs, as results.json and as text to read."""

from __future__ import annotations

import math
import os

from lmscale.plan.flops import training_flops_per_token
from lmscale.plan.scaling import (
    Curve,
    FitError,
    chinchilla_rule_params,
    fit_loss_vs_compute,
    fit_power_law,
    optimal_size,
)
from lmscale.plan.units import fmt_count

EXTRAPOLATE = 10.0
"""L(N) is extrapolated to this multiple of the largest size."""
BUDGET_MULTIPLE = 100.0
"""Without --budget-flops, the optimal size is named for this multiple of the study's compute."""
BOUNDS = {
    "upper": "an upper bound: at every compute the runs share, the smaller size (trained on "
    "more tokens per parameter) won, so the optimum lies past the tokens per parameter these "
    "runs reached and the fit traces the study's own allocation; more --minutes or smaller "
    "--sizes reach it",
    "lower": "a lower bound: at every compute the runs share, the larger size won, so the "
    "optimum lies below the tokens per parameter these runs sampled; larger --sizes reach it",
}
LOW_TOKENS_PER_PARAM = 1.0
"""Below this many tokens per parameter the report warns (compute-optimal training uses ~20)."""


def curves_of(runs: list[dict]) -> list[Curve]:
    """Each run's evaluations after its warm-up: the (N, C, L) samples the fits use."""
    curves = []
    for run in runs:
        points = [p for p in run["curve"] if p["step"] >= max(1, run["warmup_steps"])]
        flops, loss = (tuple(p[k] for p in points) for k in ("flops", "val_loss"))
        curves.append(Curve(run["params"], flops, loss))
    return curves


def fit_all(runs: list[dict], budget_flops: float | None, context: int, vocab_size: int) -> dict:
    """The three fits (each a dict, or {"error": why}) and the budget they were named for."""
    from lmscale.plan.sweep import describe_shape, shape_for

    curves = curves_of(runs)
    total = sum(run["flops"] for run in runs)
    budget = budget_flops or BUDGET_MULTIPLE * total
    fits: dict = {"study_flops": total, "budget_flops": budget}
    try:
        law = fit_power_law([r["params"] for r in runs], [r["final_loss"] for r in runs], "N")
        far = EXTRAPOLATE * max(r["params"] for r in runs)
        fits["loss_vs_params"] = law.as_dict() | {
            "extrapolation": {"params": far, "loss": float(law(far)), "se": _se(law, far)}
        }
    except FitError as error:
        fits["loss_vs_params"] = {"error": str(error)}
    frontier_law = None
    try:
        frontier_law = fit_loss_vs_compute(curves)
        fits["loss_vs_compute"] = frontier_law.as_dict() | {
            "at_budget": {"loss": float(frontier_law(budget)), "se": _se(frontier_law, budget)}
        }
    except FitError as error:
        fits["loss_vs_compute"] = {"error": str(error)}
    try:
        best = optimal_size(curves, budget)
        shape = shape_for(best.params, vocab_size, context)
        fits["optimal"] = best.as_dict() | {
            "shape": describe_shape(shape), "params_total": shape.num_params(),
            "tokens_counted": budget / training_flops_per_token(shape, context)[0],
        }  # fmt: skip
    except FitError as error:
        fits["optimal"] = {"error": str(error)}
    fits["chinchilla_rule_params"] = chinchilla_rule_params(budget)
    return fits


def build_results(config, runs: list[dict], study: dict, elapsed_s: float) -> dict:
    """results.json: the settings, the machine, every run, and the fits.

    `study_s` is the time the probes and the runs took (each run's by the session that finished
    it), `elapsed_s` that of this call (short when it reused finished runs).
    """
    vocab_size = runs[0]["shape"]["vocab_size"]
    fits = fit_all(runs, config.budget_flops, config.context, vocab_size)
    probes = study.get("probes") or {}
    study_s = sum(p["wall_s"] for p in probes.values()) + sum(r["wall_s"] for r in runs)
    return {
        "settings": study["settings"], "plan": study["plan"], "probes": probes,
        "machine": machine(), "study_s": study_s, "elapsed_s": elapsed_s, "runs": runs,
        "fits": fits,
    }  # fmt: skip


def machine() -> dict:
    """Where this call ran, as a run's run_info.json says it: the device the trainer picks, its
    name, threads, cores and the torch build (each run's record keeps the threads it trained
    with)."""
    from lmscale.train.precision import resolve_device
    from lmscale.train.run_info import describe_machine

    return describe_machine(resolve_device("auto"))


def _se(law, x: float) -> float | None:
    se = float(law.predict_se(x))
    return se if math.isfinite(se) and law.dof > 0 else None


# --- text ------------------------------------------------------------------------------------


def format_report(results: dict, out: str) -> str:
    """The study as a few lines: the runs, each fit with its uncertainty, the optimum, warnings."""
    runs, fits = results["runs"], results["fits"]
    lines = [
        f"scaling study: {len(runs)} sizes in {results['study_s'] / 60:.1f} min, "
        f"{fits['study_flops']:.3g} training FLOPs",
        "  size    N (non-emb)  total    dim x layers  steps   tokens  tokens/N  FLOPs     "
        "val loss",
    ]
    for r in runs:
        lines.append(
            f"  {r['label']:<7} {fmt_count(r['params']):<12} {fmt_count(r['params_total']):<8} "
            f"{r['shape']['dim']:>4} x {r['shape']['n_layers']:<6} {r['steps']:>6} "
            f"{fmt_count(r['tokens']):>8} {r['tokens_per_param']:>8.3g}  {r['flops']:<9.3g} "
            f"{r['final_loss']:.4f}" + ("  (reused)" if r.get("reused") else "")
        )
    lines += _law_lines(fits["loss_vs_params"], "L(N) = E + A N^-alpha", "N", "alpha")
    lines += _law_lines(
        fits["loss_vs_compute"], "L(C) = E + A C^-gamma on the frontier", "C", "gamma"
    )
    lines += _optimal_lines(fits)
    ratio = min(r["tokens_per_param"] for r in runs)
    if ratio < LOW_TOKENS_PER_PARAM:
        lines.append(
            f"note: each size trained on only {ratio:.2g} tokens per parameter (compute-optimal "
            "training uses about 20): the fits describe undertrained models; give more --minutes "
            "or smaller --sizes"
        )
    lines.append(
        f"wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'scaling.png')}"
    )
    return "\n".join(lines)


def _law_lines(fit: dict, title: str, x: str, exponent: str) -> list[str]:
    if "error" in fit:
        return [f"{title}: not fitted: {fit['error']}"]

    def pm(key: str) -> str:
        se = fit[f"{key}_se"]
        return f"{fit[key]:.4g}" + (f" ± {se:.2g}" if se is not None else "")

    if fit["dof"] > 0:
        lo, hi = fit["alpha_ci95"]
        spread = (
            f"± one standard error, {exponent} 95% in [{lo:.3g}, {hi:.3g}]; {fit['points']} "
            f"points, {fit['dof']} degrees of freedom"
        )
    else:
        spread = f"{fit['points']} points fit 3 parameters exactly: no uncertainty"
    lines = [
        f"{title}: E = {pm('E')}, A = {pm('A')}, {exponent} = {pm('alpha')} "
        f"({spread}; rms residual {fit['rms']:.3g})"
    ]
    if "extrapolation" in fit:
        far = fit["extrapolation"]
        lines.append(f"  extrapolated to {x} = {fmt_count(far['params'])}: L = {_with_se(far)}")
    return lines


def _optimal_lines(fits: dict) -> list[str]:
    budget, best = fits["budget_flops"], fits["optimal"]
    rule_params = fmt_count(fits["chinchilla_rule_params"])
    rule = f"Chinchilla's 20 tokens per parameter would give N = {rule_params}"
    if "error" in best:
        return [
            f"compute-optimal size for {budget:.3g} FLOPs: not determined: {best['error']}",
            f"  ({rule})",
        ]
    lo, hi = best["compute_range"]
    shape = best["shape"]
    relation = {None: "=", "upper": "<=", "lower": ">="}[best["bound"]]
    lines = [
        f"compute-optimal size for {budget:.3g} FLOPs (Chinchilla Approach 1, N_opt = "
        f"{best['G']:.3g} C^{best['a']:.3f} from {len(best['winners'])} winning sizes over "
        f"{lo:.2g}-{hi:.2g} FLOPs): N {relation} {fmt_count(best['params'])} non-embedding "
        f"({fmt_count(best['params_total'])} total; dim {shape['dim']} x {shape['n_layers']} "
        f"layers), D = C/(6N) = {fmt_count(best['tokens'])} tokens "
        f"({best['tokens_per_param']:.3g} per parameter)",
    ]
    if best["bound"]:
        lines.append(f"  {BOUNDS[best['bound']]}")
    at_budget = fits["loss_vs_compute"].get("at_budget")
    if at_budget:
        lines.append(f"  predicted loss at the budget (frontier fit): {_with_se(at_budget)}")
    return [*lines, f"  ({rule})"]


def _with_se(point: dict) -> str:
    return f"{point['loss']:.3f}" + (f" ± {point['se']:.2g}" if point["se"] is not None else "")
