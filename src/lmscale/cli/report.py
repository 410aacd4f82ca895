"""`lmscale report RUN [RUN ...]`: one HTML page and PNGs of finished training runs.

Pure Python and matplotlib (no torch), so it answers in a second or two.
"""

from __future__ import annotations

import argparse
import json

from lmscale.plan.perf import GRID_KG_PER_KWH


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="lmscale train run folders")
    p.add_argument("--out", default="report", help="folder to write (default report/)")
    p.add_argument("--json", action="store_true", help="print the numbers behind the plots as JSON")
    p.add_argument(
        "--device",
        help="planner catalog entry for MFU and energy (h100, a100-40gb, cpu:N; default: matched "
        "from each run's run_info.json)",
    )
    p.add_argument(
        "--grid-intensity",
        type=float,
        default=GRID_KG_PER_KWH,
        metavar="KG_PER_KWH",
        help=f"kg CO2e per kWh for the emissions (default {GRID_KG_PER_KWH}, the U.S. average)",
    )
    p.add_argument(
        "--smoothing", type=float, default=0.6, help="moving-average weight of loss curves (0.6)"
    )


def report(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.report import report as write_report

    result = write_report(args.runs, args.out, args.device, args.grid_intensity, args.smoothing)
    if args.json:
        print(json.dumps(result.numbers, indent=2))
        return
    for run in result.numbers["runs"]:
        s = run["summary"]
        val = f", val loss {s['final_val_loss']:.4f}" if s.get("final_val_loss") is not None else ""
        print(f"{run['name']}: {s['steps']} steps, loss {s['final_loss']:.4f}{val}")
    print(f"report: {result.page} ({len(result.pngs)} plots)")
