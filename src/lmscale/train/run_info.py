"""`run_info.json`: the machine a run trained on, and its memory before the model existed.

`lmscale plan --calibrate RUN_DIR` sets the planner's prediction beside what the run measured; it
needs to know the device, the process layout, and the memory that was not the training's (the
interpreter, torch's libraries, the data): `baseline_mem_bytes` and `baseline_alloc_bytes`, read
just before the model is built (see `lmscale.train.memory`). Each logged step's peaks are in
metrics.jsonl (`peak_mem_bytes`, `peak_alloc_bytes`).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

RUN_INFO = "run_info.json"


def describe_machine(device: torch.device) -> dict[str, Any]:
    """Device, its name, threads and library versions of this process."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    (Path(run_dir) / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
