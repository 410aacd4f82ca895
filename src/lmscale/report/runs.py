"""A run directory read into plain numbers: its config, its machine, and its logged steps.

`lmscale train` leaves `config.toml` (the resolved config), `run_info.json` (device, processes,
micro-batches) and `metrics.jsonl` (one line per logged step, one per evaluation). Everything
here is plain Python: no torch, so a report of finished runs opens at once.

A resumed run logs again the steps after its last checkpoint; the later line of a step wins,
as it is the one the final weights went through.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscale.errors import LmscaleError

METRICS = "metrics.jsonl"


@dataclass
class RunData:
    """One run, as read from disk."""

    name: str
    """What the report calls it: the folder's name (with its parent where two names clash)."""
    path: Path
    config: dict[str, Any]
    """`config.toml` as a dict (empty for a folder without one)."""
    info: dict[str, Any]
    """`run_info.json` (empty for runs trained before lmscale wrote it)."""
    steps: list[dict[str, Any]]
    """Training lines of metrics.jsonl (those with a `loss`), by step, each with `tokens` added."""
    evals: list[dict[str, Any]]
    """Evaluation lines (those with a `val_loss`), by step, each with `tokens` added."""
    sessions: list[float]
    """Seconds of training steps in each session (first run, then each resume), from `elapsed_s`;
    empty for runs logged before lmscale wrote it."""
    tokens_per_step: int

    @property
    def context(self) -> int:
        train, model = self.config.get("train", {}), self.config.get("model", {})
        return train.get("context") or model.get("max_seq_len") or 0


def read_run(path: str | Path, name: str | None = None) -> RunData:
    """Read the run directory `path`; a clear `LmscaleError` for a folder that is not one."""
    path = Path(path)
    if not path.is_dir():
        raise LmscaleError(f"report: run folder not found: {path}")
    if not (path / METRICS).is_file():
        raise LmscaleError(f"report: {path} has no {METRICS}: is it an lmscale train run folder?")
    records = _read_metrics(path / METRICS)
    config = _read_toml(path / "config.toml")
    info = _read_json(path / "run_info.json")
    tokens_per_step = _tokens_per_step(config, info, records)
    steps = _by_step(r for r in records if "loss" in r)
    evals = _by_step(r for r in records if "val_loss" in r)
    if not steps:
        raise LmscaleError(f"report: {path / METRICS} holds no training step")
    for record in steps + evals:
        record["tokens"] = record["step"] * tokens_per_step
    return RunData(
        name or path.resolve().name, path, config, info, steps, evals,
        _sessions(r for r in records if "loss" in r), tokens_per_step,
    )  # fmt: skip


def run_names(paths: list[Path]) -> list[str]:
    """Each run's folder name; `parent/name` for names that clash (`a/s10m`, `b/s10m`)."""
    names = [p.resolve().name for p in paths]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise LmscaleError(f"report: {path} is not text: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmscaleError(f"report: {path} line {number} is not JSON: {err.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise LmscaleError(f"report: {path} line {number} has no integer 'step'")
        records.append({k: _number(v) for k, v in record.items()})
    return records


def _number(value: Any) -> Any:
    # MetricsLog writes NaN and infinities as strings ("nan", "inf"): read them back as floats.
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LmscaleError(f"report: {path} is not valid TOML: {err}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmscaleError(f"report: {path} is not valid JSON: {err}") from None


def _by_step(records) -> list[dict[str, Any]]:
    latest = {r["step"]: dict(r) for r in records}  # a resumed run's later line wins
    return [latest[step] for step in sorted(latest)]


def _sessions(records) -> list[float]:
    """Seconds of each session: `elapsed_s` restarts from 0 when a run resumes."""
    sessions: list[float] = []
    previous = math.inf
    for record in records:
        elapsed = record.get("elapsed_s")
        if not isinstance(elapsed, (int, float)):
            return []  # logged before lmscale wrote elapsed_s
        if elapsed < previous:
            sessions.append(0.0)
        sessions[-1] = previous = elapsed
    return sessions


def _tokens_per_step(config: dict, info: dict, records: list[dict]) -> int:
    """Tokens of one optimizer step over all data-parallel ranks, as the loop counts them."""
    train = config.get("train", {})
    context = train.get("context") or config.get("model", {}).get("max_seq_len")
    if context and "batch_size" in train:
        accum = info.get("grad_accum") or train.get("grad_accum_steps", 1)
        return train["batch_size"] * accum * info.get("dp_size", 1) * context
    # No config: the logged throughput times the step's time is the step's tokens.
    timed = [r for r in records if "tokens_per_s" in r and "step_time_s" in r]
    if not timed:
        raise LmscaleError("report: no config.toml and no logged throughput to count tokens by")
    return round(timed[0]["tokens_per_s"] * timed[0]["step_time_s"])
