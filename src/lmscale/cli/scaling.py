"""`lmscale scaling`: a scaling-law study on the user's data (`lmscale.plan.sweep`)."""

from __future__ import annotations

import argparse
import json

from lmscale.plan.units import parse_count, parse_counts


def scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a prepared data folder (see `lmscale prepare`)")
    p.add_argument(
        "--sizes", default="0.5M,1M,2M,4M,8M", help="non-embedding sizes to train, at least 3"
    )
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of the study")
    p.add_argument("--out", required=True, help="the study's folder (a rerun reuses its runs)")
    p.add_argument(
        "--budget-flops", help="name the optimal size for this compute (default: 100x the study's)"
    )
    p.add_argument("--context", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, every size")
    p.add_argument(
        "--lr", type=float, help="learning rate, constant after warm-up (default: by size, Kaplan)"
    )
    p.add_argument("--evals", type=int, default=10, help="evaluations per run")
    p.add_argument(
        "--eval-tokens", type=int, default=16384, help="validation tokens per evaluation"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress lines or bars")
    p.add_argument("--json", action="store_true", help="print results.json's content")


def scaling(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.plan.scaling_report import format_report
    from lmscale.plan.sweep import ScalingConfig, run_study

    budget = parse_count(args.budget_flops, "--budget-flops") if args.budget_flops else None
    config = ScalingConfig(
        data=args.data, out=args.out, sizes=parse_counts(args.sizes, "--sizes"),
        minutes=args.minutes, budget_flops=budget, context=args.context,
        batch_size=args.batch_size, seed=args.seed, lr=args.lr, evals=args.evals,
        eval_tokens=args.eval_tokens,
    )  # fmt: skip
    results = run_study(config, progress=not args.no_progress and not args.json)
    print(json.dumps(results) if args.json else format_report(results, args.out))
