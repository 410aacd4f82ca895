"""Float8 training linears through torchao (`train.float8`).

Each eligible block linear becomes a torchao `Float8Linear`: its matrix products run on the
float8 tensor cores (inputs and weights in e4m3, output gradients in e5m2, each scaled per
tensor), while the weights themselves stay in their own dtype, so checkpoints are unchanged.

Left as they are:
    the output head     the logits feed the loss; its precision matters most and torchao's
                        own recipes leave it out too
    odd shapes          float8 matrix products (`torch._scaled_mm`) need both dimensions of the
                        weight to be multiples of 16

NOTE: convert before activation checkpointing, torch.compile and FSDP: the compiled graphs and
FSDP's parameter groups must see the converted modules. Without torch.compile the casts run
as separate kernels and float8 is slower than bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from lmscale.errors import LmscaleError

MIN_CAPABILITY = (8, 9)
"""Float8 tensor cores arrive with Ada (8.9) and Hopper (9.0)."""


def apply_float8_training(model: nn.Module, device: torch.device, enabled: bool) -> None:
    """Swap the block linears of `model` for torchao's Float8 training linears, in place.

    Args:
        model: the Transformer, on `device`, not yet compiled, checkpointed or sharded.
        device: where it trains; must be a CUDA device of compute capability 8.9 or higher.
        enabled: `train.float8`; when False this does nothing.

    Raises:
        LmscaleError: the device has no float8 tensor cores, or torchao is not installed.
    """
    if not enabled:
        return
    _check_device(device)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise LmscaleError(
            "train.float8 needs torchao: pip install torchao (or lmscale[gpu])"
        ) from None
    convert_to_float8_training(model, module_filter_fn=float8_eligible)


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """Whether the linear `module` (named `fqn` in the model) trains in float8."""
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False  # the output head, and anything outside the blocks
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise LmscaleError(
            f"train.float8 needs a CUDA GPU of compute capability 8.9+ (H100, L4, RTX 4090); "
            f"this run is on {device.type}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise LmscaleError(
            f"train.float8 needs compute capability 8.9+ (H100, L4, RTX 4090); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )
