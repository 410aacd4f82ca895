"""Devices and mixed precision: which autocast to enter, and whether gradients need scaling."""

from __future__ import annotations

import contextlib

import torch

from lmscale.errors import LmscaleError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is the user's error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmscaleError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmscaleError(f"device '{name}' asked for, but CUDA is not available here")
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The autocast context for `dtype`; weights stay fp32 (mixed precision, not half weights)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise LmscaleError("train.dtype float16 needs CUDA; use bfloat16 on the CPU")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if dtype == "float16" else None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_peak_memory`: allocated CUDA memory, or on the CPU the
    process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM") or _max_rss_bytes()


def current_memory_bytes(device: torch.device) -> int:
    """Memory held now: allocated CUDA memory, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or _max_rss_bytes()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window (a training step), so evaluation or saving do not hide in it.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM to the current resident set.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # no /proc (or not allowed): the peak stays the process's lifetime peak


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
