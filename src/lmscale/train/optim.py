"""Optimizers and the learning-rate schedule (linear warm-up, then cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmscale.errors import LmscaleError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); leave biases and norm gains undecayed."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied: once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.9,
) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW (fused where the device supports it) or SGD with momentum."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=_fused_ok(model))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise LmscaleError(f"train.optimizer must be adamw or sgd, got '{name}'")


def _fused_ok(model: nn.Module) -> bool:
    # Fused AdamW exists for CPU and CUDA floating-point parameters since torch 2.4.
    return all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()
    )


def lr_at(
    step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1
) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, cosine down to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = max_lr * min_lr_ratio
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
