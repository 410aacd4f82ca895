"""The numbers a report derives from a run: utilisation, energy, and the planner's prediction.

Nothing is re-derived here that the planner already knows. The device comes from the planner's
hardware catalog, matched as `lmscale plan --calibrate` matches it (`calibrate.run_device`: a CPU
run is its threads' share of the catalog's CPU socket); model FLOPs per token come from
`lmscale.plan.flops`; the predicted memory and step time are `calibrate()`'s.

    MFU    = tokens/s x model FLOPs per token / (devices x the device's peak FLOP/s)
    energy = seconds of training steps x devices x the device's power (no PUE: the devices alone)
    CO2e   = energy x grid intensity
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig
from lmscale.plan.calibrate import calibrate, run_device
from lmscale.plan.flops import training_flops_per_token
from lmscale.plan.hardware import CATALOG, Accelerator, accelerator
from lmscale.plan.perf import GRID_KG_PER_KWH, energy_kwh
from lmscale.report.runs import RunData

__all__ = ["GRID_KG_PER_KWH", "RunNumbers", "run_numbers"]


@dataclass
class RunNumbers:
    """A run with what the report derives from it."""

    run: RunData
    device: Accelerator | None
    """The catalog entry for one of the run's devices (None: not in the catalog, no --device)."""
    n_devices: int
    math: str
    """fp32, or a 16-bit type: which of the device's peaks the run's matrix products use."""
    flops_per_token: float | None
    """Model FLOPs of one training token (forward + backward, no recomputation)."""
    mfu: list[float | None]
    """Per logged step, aligned with `run.steps`."""
    prediction: dict[str, float] | None
    """The planner's peak memory (bytes, above the baseline and with it) and step time (s)."""
    energy: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    """What could not be measured or predicted, and why: shown on the page and in the JSON."""

    @property
    def power_w(self) -> float | None:
        return self.device.power_w * self.n_devices if self.device else None


def run_numbers(
    run: RunData, device_name: str | None = None, grid_kg_per_kwh: float = GRID_KG_PER_KWH
) -> RunNumbers:
    """Derive MFU, energy and the planner's prediction for `run`.

    Args:
        run: the run as read from disk.
        device_name: a catalog entry to use instead of the one matched from run_info.json.
        grid_kg_per_kwh: kg CO2e per kWh of the electricity the run drew.
    """
    notes: list[str] = []
    device = _device(run, device_name, notes)
    n_devices = run.info.get("world_size", 1)
    math = "fp32" if run.config.get("train", {}).get("dtype", "float32") == "float32" else "bf16"
    flops = _flops_per_token(run, notes)
    peak = device.peak_flops(math) * n_devices if device else None
    mfu = [
        r["tokens_per_s"] * flops / peak if peak and flops and "tokens_per_s" in r else None
        for r in run.steps
    ]
    prediction = _prediction(run, device_name, notes)
    energy = _energy(run, device, n_devices, grid_kg_per_kwh, notes)
    return RunNumbers(run, device, n_devices, math, flops, mfu, prediction, energy, notes)


def _device(run: RunData, device_name: str | None, notes: list[str]) -> Accelerator | None:
    if device_name:
        try:
            return accelerator(device_name)
        except LmscaleError:
            raise LmscaleError(
                f"report: unknown --device '{device_name}' (known: {', '.join(CATALOG)}; "
                "cpu:N for N cores)"
            ) from None
    if not run.info:
        notes.append("no run_info.json: device unknown (name one with --device); no MFU or energy")
        return None
    try:
        return run_device(run.info)
    except LmscaleError:
        notes.append(
            f"device '{run.info.get('device_name')}' is not in the planner's catalog: name one "
            "with --device for MFU and energy"
        )
        return None


def _flops_per_token(run: RunData, notes: list[str]) -> float | None:
    try:
        model = ModelConfig(**run.config["model"])
    except (KeyError, TypeError, ValueError, LmscaleError):
        notes.append("no model shape in config.toml: no MFU")
        return None
    return training_flops_per_token(model, run.context or model.max_seq_len)[0]


def _prediction(run: RunData, device_name: str | None, notes: list[str]) -> dict | None:
    try:
        c = calibrate(run.path, device_name)
    except (LmscaleError, KeyError, TypeError, ValueError) as err:
        reason = str(err).removeprefix(f"--calibrate {run.path}: ")
        notes.append(f"no planner prediction: {reason}")
        return None
    return {
        "peak_bytes": c.memory.peak,
        "peak_with_baseline_bytes": c.memory.peak + c.info["baseline_alloc_bytes"],
        "measured_peak_bytes": c.measured_peak,
        "memory_error": c.memory_error,
        "step_s": c.predicted_step.total,
        "measured_step_s": c.measured_step_s,
        "device": c.device.name,
    }


def _energy(run, device, n_devices, grid, notes) -> dict | None:
    if device is None:
        return None
    if run.sessions:
        seconds, source = sum(run.sessions), "elapsed_s (every step's time, summed)"
    else:
        timed = [r["step_time_s"] for r in run.steps if "step_time_s" in r]
        if not timed:
            notes.append("no step times logged: no energy")
            return None
        steps = run.steps[-1]["step"]
        seconds, source = statistics.median(timed) * steps, "median step time x steps"
        notes.append("energy estimated from the median logged step time x steps (no elapsed_s)")
    kwh = energy_kwh(seconds * n_devices / 3600, device.power_w, pue=1.0)
    return {
        "seconds": seconds, "seconds_from": source, "device_power_w": device.power_w,
        "devices": n_devices, "kwh": kwh, "grid_kg_per_kwh": grid, "kg_co2e": kwh * grid,
    }  # fmt: skip
