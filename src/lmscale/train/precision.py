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
