"""Meta-device initialisation: every rank allocates and initialises only its own part of the model.

The model is built on the meta device (shapes, no storage), sharded or split there, and only then
given memory (`to_empty`) and values. Each parameter's values come from `initial_value`, whose
generator is seeded by the run's seed and the parameter's name: a rank draws the whole of one
parameter at a time on the CPU and keeps its own slice, so the weights equal a one-process init
with the same seed, and the peak is this rank's part plus the largest single parameter.

    meta model -> tensor parallel / FSDP / pipeline split (still meta) -> to_empty(device)
               -> for each local parameter: full = initial_value(name); keep this rank's slice
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lmscale.model.config import ModelConfig
from lmscale.model.transformer import initial_value


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def materialize_(module: nn.Module, config: ModelConfig, device: torch.device, seed: int) -> None:
    """Give `module`'s meta parameters storage on `device` and their deterministic initial values.

    Args:
        module: the model or this rank's part of it, under the model's parameter names (a
            pipeline stage keeps them), its parameters plain tensors or DTensors.
        seed: the run's seed: equal seeds give equal weights at any world size and strategy.
    """
    ties = _shared_parameters(module)
    module.to_empty(device=device)
    for places in ties:  # to_empty gives each module its own new parameter: share them again
        owner, name = places[0]
        for other, other_name in places[1:]:
            setattr(other, other_name, getattr(owner, name))
    with torch.no_grad():
        for name, param in module.named_parameters():
            full = initial_value(config, name, param.shape, seed)
            if isinstance(param, DTensor):
                # NOTE: src_data_rank=None: every rank holds the same full tensor already, so each
                # keeps its slice without any communication.
                local = distribute_tensor(
                    full, param.device_mesh, param.placements, src_data_rank=None
                ).to_local()
                param.to_local().copy_(local)
            else:
                param.copy_(full)
    for part in module.modules():
        if hasattr(part, "init_rope"):  # RoPE tables: non-persistent buffers, computed, not drawn
            part.init_rope(device)


def _shared_parameters(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Where each parameter held by more than one module (tied embeddings) is registered."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for part in module.modules():
        for name, param in part._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((part, name))
    return [where for where in places.values() if len(where) > 1]
