"""One row of numbers per run (the page's table), and the whole report as JSON (`--json`).

Medians skip step 1, which pays for warm-up (allocation, kernel selection), as calibration does.
The JSON carries every logged line as metrics.jsonl holds it (plus `tokens` and `mfu`), so the
numbers behind each plot can be checked against the run's own log.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from lmscale.report.numbers import RunNumbers


def summary(numbers: RunNumbers) -> dict[str, Any]:
    """The headline numbers of one run: final and best losses, throughput, memory, energy."""
    run = numbers.run
    last = run.steps[-1]
    timed = [r for r in run.steps if r["step"] > 1] or run.steps
    row: dict[str, Any] = {
        "steps": last["step"], "tokens": last["tokens"], "final_loss": last["loss"],
        "median_tokens_per_s": _median(r.get("tokens_per_s") for r in timed),
        "median_step_time_s": _median(r.get("step_time_s") for r in timed),
        "median_mfu": _median(m for r, m in zip(run.steps, numbers.mfu, strict=True)
                              if r["step"] > 1 or len(run.steps) == 1),
        "peak_mem_bytes": _max(r.get("peak_mem_bytes") for r in run.steps),
        "peak_alloc_bytes": _max(r.get("peak_alloc_bytes") for r in run.steps),
        "comm_bytes_per_step": _median(r.get("comm_bytes") for r in timed),
    }  # fmt: skip
    if run.evals:
        best = min(run.evals, key=lambda r: _finite_or_inf(r["val_loss"]))
        row |= {
            "final_val_loss": run.evals[-1]["val_loss"], "final_val_ppl": run.evals[-1]["val_ppl"],
            "best_val_loss": best["val_loss"], "best_val_ppl": best["val_ppl"],
            "best_val_step": best["step"],
        }  # fmt: skip
    if numbers.prediction:
        row |= {
            "predicted_peak_alloc_bytes": numbers.prediction["peak_with_baseline_bytes"],
            "predicted_step_time_s": numbers.prediction["step_s"],
        }
    if numbers.energy:
        row |= {"energy_kwh": numbers.energy["kwh"], "kg_co2e": numbers.energy["kg_co2e"]}
    return row


def report_json(all_numbers: list[RunNumbers], grid_kg_per_kwh: float) -> dict[str, Any]:
    """Everything the page shows, per run (NaN and infinities become null: JSON has neither)."""
    runs = []
    for n in all_numbers:
        run = n.run
        runs.append({
            "name": run.name, "path": str(run.path),
            "device": _device(n), "strategy": run.info.get("strategy"),
            "world_size": n.n_devices, "math": n.math, "tokens_per_step": run.tokens_per_step,
            "flops_per_token": n.flops_per_token, "summary": summary(n),
            "steps": [r | {"mfu": m} for r, m in zip(run.steps, n.mfu, strict=True)],
            "evals": run.evals, "prediction": n.prediction, "energy": n.energy, "notes": n.notes,
        })  # fmt: skip
    return _clean({"grid_kg_per_kwh": grid_kg_per_kwh, "runs": runs})


def _device(n: RunNumbers) -> dict[str, Any] | None:
    if n.device is None:
        return None
    return {
        "name": n.device.name, "description": n.device.description,
        "peak_flops": n.device.peak_flops(n.math), "power_w": n.device.power_w,
        "measured_name": n.run.info.get("device_name"),
    }  # fmt: skip


def _median(values) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _max(values) -> float | None:
    present = [v for v in values if isinstance(v, (int, float))]
    return max(present) if present else None


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
