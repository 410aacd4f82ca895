"""Predicted against measured, for a finished `lmscale train` run.

A run directory holds everything the planner needs: `config.toml` (model, batch, precision,
strategy), `run_info.json` (device, threads, processes, memory before the model was built) and
`metrics.jsonl` (each logged step's time and peak memory). The prediction is made exactly as
`lmscale plan` makes it, with the precision recipe and attention kernel lmscale trains with
(torch.autocast or fp32; scaled_dot_product_attention; the chunked loss on one process).

Measured memory is a step's peak of *allocated* memory (CUDA's allocated bytes; on the CPU,
malloc's bytes in use after each forward, backward and optimizer step) less what was allocated
before the model was built: what the planner predicts. The memory the process *holds* (CUDA's
reserved bytes, the CPU's resident set) is shown beside it: it adds the allocator's retained free
blocks, which depend on the allocator and vary from run to run.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig
from lmscale.plan.hardware import CATALOG, Accelerator, accelerator
from lmscale.plan.memory import MemoryBreakdown, training_memory
from lmscale.plan.perf import Cluster, StepTime, step_time
from lmscale.plan.strategy import Strategy
from lmscale.plan.workload import Workload

TOLERANCE = 0.20
"""How far measured memory may be from the prediction and still count as agreeing."""


@dataclass
class Calibration:
    """One run: what the planner predicts for it, and what it measured."""

    run_dir: Path
    workload: Workload
    strategy: Strategy
    device: Accelerator
    info: dict
    memory: MemoryBreakdown
    measured_peak: float
    """The logged steps' largest allocated peak, less the allocated baseline, bytes."""
    measured_held: float
    """The logged steps' largest held peak (reserved / resident), less its baseline, bytes."""
    predicted_step: StepTime
    measured_step_s: float

    @property
    def memory_error(self) -> float:
        """(measured - predicted) / predicted."""
        return self.measured_peak / self.memory.peak - 1

    @property
    def memory_agrees(self) -> bool:
        return abs(self.memory_error) <= TOLERANCE

    @property
    def measured_mfu(self) -> float:
        """The utilisation that would make the predicted step time equal the measured one."""
        return self.device.mfu * self.predicted_step.compute / self.measured_step_s


def calibrate(run_dir: str | Path, device_name: str | None = None) -> Calibration:
    """Predict `run_dir`'s memory and step time, and read what it measured."""
    run_dir = Path(run_dir)
    config, info, steps = _read_run(run_dir)
    model = ModelConfig(**config["model"])
    train = config.get("train", {})
    strategy = _strategy(config.get("parallel", {}), info, train)
    seq = train.get("context") or model.max_seq_len
    global_batch = train.get("batch_size", 16) * info.get("grad_accum", 1) * strategy.dp
    dtype = train.get("dtype", "float32")
    workload = Workload(
        model, seq, global_batch * seq, precision="fp32" if dtype == "float32" else "amp",
        optimizer=train.get("optimizer", "adamw"), attention="flash",
        fused_loss=info.get("strategy", "none") == "none",
    )  # fmt: skip
    device = run_device(info, device_name)
    cluster = Cluster.of(device, strategy.n_devices, devices_per_node=strategy.n_devices)
    memory = training_memory(workload, strategy)
    timed = [r for r in steps if r["step"] > 1] or steps
    measured_peak = max(r["peak_alloc_bytes"] for r in timed) - info["baseline_alloc_bytes"]
    measured_held = max(r["peak_mem_bytes"] for r in timed) - info["baseline_mem_bytes"]
    measured_step = statistics.median(r["step_time_s"] for r in timed)
    return Calibration(
        run_dir, workload, strategy, device, info, memory, measured_peak, measured_held,
        step_time(workload, strategy, cluster), measured_step,
    )  # fmt: skip


def _read_run(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    paths = {name: run_dir / name for name in ("config.toml", "run_info.json", "metrics.jsonl")}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        hint = (" (runs trained before lmscale recorded run_info.json cannot be calibrated: "
                "train again)") if missing == ["run_info.json"] else ""  # fmt: skip
        raise LmscaleError(f"--calibrate {run_dir}: no {', '.join(missing)} there{hint}")
    try:
        config = tomllib.loads(paths["config.toml"].read_text())
        info = json.loads(paths["run_info.json"].read_text())
        records = [json.loads(line) for line in paths["metrics.jsonl"].read_text().splitlines()
                   if line.strip()]  # fmt: skip
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmscaleError(f"--calibrate {run_dir}: unreadable run files: {err}") from None
    steps = [r for r in records if "step_time_s" in r and "peak_alloc_bytes" in r]
    if not steps or "baseline_alloc_bytes" not in info:
        raise LmscaleError(
            f"--calibrate {run_dir}: the run logged no step with its time and allocated memory"
        )
    return config, info, steps


def _strategy(parallel: dict, info: dict, train: dict) -> Strategy:
    world = info.get("world_size", 1)
    tp = info.get("tp_size", 1)
    name = info.get("strategy", "none")
    zero = 3 if name in ("fsdp", "hsdp", "fsdp+tp") else 0
    return Strategy(
        dp=world // tp, tp=tp, zero=zero, sp=tp > 1 and parallel.get("sequence_parallel", True),
        recompute="full" if train.get("activation_checkpointing") else "none",
        micro_batch=train.get("batch_size", 16),
    )  # fmt: skip


def run_device(info: dict, device_name: str | None = None) -> Accelerator:
    """The catalog entry for the run's device: `--gpu` if given, else matched by name."""
    if device_name:
        return accelerator(device_name)
    if info["device"] == "cpu":
        return accelerator("cpu").scaled_to_cores(info.get("threads") or 1)
    name = info.get("device_name", "").lower()
    for key in ("h200", "h100", "a100", "v100", "l4", "4090"):
        if key in name:
            matches = [e for e in CATALOG.values() if key in e.name]
            memory = "80gb" if "80" in name else "40gb" if "40" in name else ""
            return next((e for e in matches if memory in e.name), matches[0])
    raise LmscaleError(
        f"--calibrate: '{info.get('device_name')}' is not in the catalog: name one with --gpu"
    )
