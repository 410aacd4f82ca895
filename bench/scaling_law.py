"""A scaling-law study on the bundled plays, its fits set beside the published ones.

Runs `lmscale scaling` (preparing data/shakespeare first if it is missing), then prints what it
fitted next to Kaplan et al. (2020) and Hoffmann et al. (2022, "Chinchilla"). The published
numbers come from models of 10^6-10^10 parameters trained near or past convergence on web text
with a 50K-token vocabulary; a CPU study of minutes is a different regime (far fewer tokens per
parameter, a 4K-token vocabulary), so the comparison shows where it stands, not an agreement.

    python bench/scaling_law.py                                  # the 20-minute study
    python bench/scaling_law.py --minutes 5 --sizes 0.25M,0.5M,1M,2M --out scaling-5min/
    python bench/scaling_law.py --out scaling/ --budget-flops 1e17  # refit a finished study
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmscale.cli.main import main as lmscale
from lmscale.plan.units import fmt_count

# The published fits (exponents of loss in size, compute, and of the optimal size in compute).
PUBLISHED = {
    "Kaplan et al. 2020": {"alpha": 0.076, "gamma": 0.050, "a": 0.73},
    "Hoffmann et al. 2022": {"alpha": 0.34, "gamma": None, "a": 0.50},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/shakespeare")
    parser.add_argument("--sizes", default="0.5M,1M,2M,4M,8M")
    parser.add_argument("--minutes", default="20")
    parser.add_argument("--out", default="scaling/")
    parser.add_argument("--budget-flops", default=None)
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").is_file():
        code = lmscale(["prepare", "--corpus", "shakespeare", "--out", args.data])
        if code:
            return code
    study = ["scaling", "--data", args.data, "--sizes", args.sizes, "--minutes", args.minutes]
    study += ["--out", args.out] + (
        ["--budget-flops", args.budget_flops] if args.budget_flops else []
    )
    code = lmscale(study)
    if code:
        return code
    print_comparison(json.loads((Path(args.out) / "results.json").read_text()))
    return 0


def print_comparison(results: dict) -> None:
    fits = results["fits"]
    ours = {
        "alpha": fits["loss_vs_params"].get("alpha"),
        "gamma": fits["loss_vs_compute"].get("alpha"),
        "a": fits["optimal"].get("a"),
    }
    ratio = results["runs"][0]["tokens_per_param"]
    print()
    print("| exponent | this study | " + " | ".join(PUBLISHED) + " |")
    print("|---|---|" + "---|" * len(PUBLISHED))
    names = {"alpha": "alpha (L vs N)", "gamma": "gamma (L vs C, frontier)", "a": "a (N_opt vs C)"}
    bound = fits["optimal"].get("bound")
    for key, name in names.items():
        mine = _cell(ours[key]) + (f" (N_opt an {bound} bound)" if key == "a" and bound else "")
        cells = [mine] + [_cell(paper[key]) for paper in PUBLISHED.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "\nKaplan et al.'s exponents are of pure power laws (no E term) for models trained to "
        "convergence (alpha) or on the compute-efficient frontier (gamma); Hoffmann et al.'s alpha "
        "is the N term of L(N, D) = E + A/N^alpha + B/D^beta, their a that of Approach 1."
    )
    print(
        f"tokens per parameter: {ratio:.3g} here, about 20 at Chinchilla's optimum; sizes "
        f"{fmt_count(results['runs'][0]['params'])}-{fmt_count(results['runs'][-1]['params'])} "
        "non-embedding"
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    sys.exit(main())
