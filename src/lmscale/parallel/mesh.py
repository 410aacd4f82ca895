"""The device mesh a strategy runs on, built from the world size and the config.

    strategy   mesh dims (outer -> inner)         data-parallel degree
    ddp        dp_replicate                       world
    fsdp       dp_shard                           world
    hsdp       dp_replicate x dp_shard            world (shard inside a node, replicate across)
    tp         tp                                 1
    fsdp+tp    dp_shard x tp                      world / tp

The innermost dimension holds neighbouring ranks (one node), where bandwidth is highest:
tensor parallel communicates every layer, so it goes there.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmscale.errors import LmscaleError
from lmscale.parallel.config import ParallelConfig
from lmscale.parallel.runtime import Ranks


def mesh_shape(strategy: str, config: ParallelConfig, ranks: Ranks) -> dict[str, int]:
    """Named mesh dimensions and their sizes for `strategy` on `ranks.world_size` processes."""
    world = ranks.world_size
    if strategy == "ddp":
        return {"dp_replicate": world}
    if strategy == "fsdp":
        return {"dp_shard": world}
    if strategy == "hsdp":
        shard = config.dp_shard or ranks.local_world_size
        _check_divides(shard, world, "parallel.dp_shard")
        return {"dp_replicate": world // shard, "dp_shard": shard}
    if strategy == "tp":
        return {"tp": world}
    if strategy == "fsdp+tp":
        _check_divides(config.tp, world, "parallel.tp")
        return {"dp_shard": world // config.tp, "tp": config.tp}
    raise LmscaleError(f"no mesh for strategy '{strategy}'")


def build_mesh(strategy: str, config: ParallelConfig, ranks: Ranks, device_type: str) -> DeviceMesh:
    shape = mesh_shape(strategy, config, ranks)
    return init_device_mesh(device_type, tuple(shape.values()), mesh_dim_names=tuple(shape))


def _check_divides(part: int, world: int, name: str) -> None:
    if world % part:
        raise LmscaleError(f"{name} = {part} does not divide the {world} processes")
