"""Run reports: training runs read from their folders, plotted and tabulated on one HTML page.

    report(["runs/s10m", "runs/other"], "report/")
        -> report/report.html, report/*.png, report/report.json

The planner (`lmscale.plan`) gives each run's device peak FLOP/s and power (its hardware
catalog) and its predicted memory and step time (`calibrate`); this package adds nothing to
the model arithmetic. No torch is imported, and matplotlib only when plots are drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscale.errors import LmscaleError
from lmscale.report.numbers import GRID_KG_PER_KWH, RunNumbers, run_numbers
from lmscale.report.runs import RunData, read_run, run_names

__all__ = ["GRID_KG_PER_KWH", "Report", "RunData", "RunNumbers", "read_run", "report"]


@dataclass
class Report:
    """What `report` wrote, and the numbers behind it."""

    page: Path
    pngs: list[Path]
    numbers: dict[str, Any]
    """The content of report.json (what `lmscale report --json` prints)."""


def report(
    run_dirs: list[str | Path],
    out: str | Path = "report",
    device: str | None = None,
    grid_kg_per_kwh: float = GRID_KG_PER_KWH,
    smoothing: float = 0.6,
) -> Report:
    """Write report.html, one PNG per panel and report.json for `run_dirs` into `out`.

    Args:
        run_dirs: `lmscale train` run folders; each is one colour on every plot.
        out: the folder to write (made if missing; files of an earlier report are replaced).
        device: a planner catalog entry (`h100`, `cpu:8`) to use instead of the matched one.
        grid_kg_per_kwh: kg CO2e per kWh, for the emissions of the energy used.
        smoothing: weight of the moving average drawn over the training loss, in [0, 1).
    Returns:
        The page and PNG paths, and the JSON numbers.
    """
    from lmscale.report.html import write_page
    from lmscale.report.plots import PANELS, write_plots
    from lmscale.report.summary import report_json

    if not run_dirs:
        raise LmscaleError("report: name at least one run folder")
    if grid_kg_per_kwh < 0:
        raise LmscaleError(f"--grid-intensity must not be negative, got {grid_kg_per_kwh}")
    if not 0 <= smoothing < 1:
        raise LmscaleError(f"--smoothing must be in [0, 1), got {smoothing}")
    paths = [Path(p) for p in run_dirs]
    runs = [read_run(p, name) for p, name in zip(paths, run_names(paths), strict=True)]
    numbers = [run_numbers(r, device, grid_kg_per_kwh) for r in runs]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmscaleError(f"report: --out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for file, *_ in PANELS:  # a panel this report leaves out must not linger from the last one
        (out / file).unlink(missing_ok=True)
    figures = write_plots(numbers, out, smoothing)
    page = write_page(numbers, figures, out, grid_kg_per_kwh)
    data = report_json(numbers, grid_kg_per_kwh)
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return Report(page, [out / f.file for f in figures], data)
