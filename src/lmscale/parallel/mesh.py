"""The device mesh a strategy runs on, built from the world size and the config.

    strategy   mesh dims (outer -> inner)         data-parallel degree
    ddp        dp_replicate                       world
    fsdp       dp_shard                           world
    hsdp       dp_replicate x dp_shard            world (shard inside a node, replicate across)
    tp         tp                                 1
    fsdp+tp    dp_shard x tp                      world / tp
    pp         pp                                 1
    pp+fsdp    pp x dp_shard                      world / pp
    pp+tp      pp x tp                            1
    pp+fsdp+tp pp x dp_shard x tp                 world / (pp x tp)

The innermost dimension holds neighbouring ranks (one node), where bandwidth is highest:
tensor parallel communicates every layer, so it goes there. Pipeline stages exchange one
activation per micro-batch, the least traffic of all: they go outermost (across nodes).
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
    if strategy.startswith("pp"):
        return _pipeline_shape(strategy, config, world)
    raise LmscaleError(f"no mesh for strategy '{strategy}'")


def _pipeline_shape(strategy: str, config: ParallelConfig, world: int) -> dict[str, int]:
    tp = config.tp if "tp" in strategy else 1
    if strategy == "pp+tp" and config.pp and config.tp == 1:
        tp = world // config.pp  # pp+tp: tensor parallel takes what the stages leave
    _check_divides(tp, world, "parallel.tp")
    if "fsdp" in strategy and not config.pp:
        raise LmscaleError(f"parallel.strategy {strategy} needs parallel.pp (pipeline stages)")
    pp = config.pp or world // tp
    _check_divides(pp * tp, world, "parallel.pp x parallel.tp")
    if pp < 2:
        raise LmscaleError(f"pipeline parallel needs at least 2 stages, got parallel.pp = {pp}")
    shape = {"pp": pp}
    if "fsdp" in strategy:
        shape["dp_shard"] = world // (pp * tp)
    elif pp * tp != world:
        raise LmscaleError(
            f"parallel.strategy {strategy} uses pp x tp = {pp * tp} of the {world} processes: "
            "add fsdp (pp+fsdp) for data parallel over the rest"
        )
    if "tp" in strategy:
        shape["tp"] = tp
    return shape


def build_mesh(strategy: str, config: ParallelConfig, ranks: Ranks, device_type: str) -> DeviceMesh:
    shape = mesh_shape(strategy, config, ranks)
    return init_device_mesh(device_type, tuple(shape.values()), mesh_dim_names=tuple(shape))


def _check_divides(part: int, world: int, name: str) -> None:
    if world % part:
        raise LmscaleError(f"{name} = {part} does not divide the {world} processes")
