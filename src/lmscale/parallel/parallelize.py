"""The one entry point: apply a strategy to an unchanged model and say how to train it.

    parallel = parallelize(model, config, ranks, device, compute_dtype)
    parallel.model          what the loop calls (a DDP wrapper, or the model sharded in place)
    parallel.module         the model under lmscale's parameter names (for state dicts)
    parallel.dp_rank/size   which share of each global batch this process reads
    parallel.gradient_sync(last)   skip gradient communication on all but the last micro-batch
    parallel.pipeline       pipeline parallel: the stages and schedule the loop steps through

Order follows torchtitan: the pipeline split first (on the `pp` mesh dimension), then tensor
parallel (on `tp`), then FSDP over the data-parallel dimensions, block by block and then the root
(embeddings, final norm, output) of each stage. A model built on the meta device is given memory
and values only then, so each rank allocates only its part.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig, Transformer
from lmscale.parallel.comm_hooks import CommCounter, register_comm_hook
from lmscale.parallel.config import ParallelConfig
from lmscale.parallel.materialize import is_meta, materialize_
from lmscale.parallel.mesh import build_mesh, mesh_shape
from lmscale.parallel.pipeline import (
    Pipeline,
    PipelineParts,
    build_pipeline,
    build_stages,
    check_pipeline,
)
from lmscale.parallel.runtime import Ranks
from lmscale.parallel.tensor_parallel import apply_tensor_parallel, check_tp_degree


@dataclass
class Parallel:
    """A model prepared for its strategy, and what the loop needs to know about it."""

    strategy: str
    model: nn.Module
    module: nn.Module
    """The model under lmscale's parameter names (for state dicts and the optimizer): the
    `Transformer`, or under pipeline parallel this rank's stages (`PipelineParts`)."""
    mesh: DeviceMesh | None = None
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    pipeline: Pipeline | None = None
    """Pipeline parallel: the stages and schedule; the loop steps through it, not `model`."""
    comm: CommCounter | None = None
    """DDP only: bytes handed to gradient all-reduces."""
    sequence_multiple: int = 1
    """Sequence lengths must be multiples of this (sequence parallel splits them evenly)."""
    mixed_precision: bool = False
    """FSDP casts parameters to the compute dtype itself, so the loop skips autocast."""
    notes: list[str] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP or TP): state dicts go through DCP."""
        return self.strategy in ("fsdp", "hsdp", "tp", "fsdp+tp") or self.pipeline is not None

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Within this context, backward reduces gradients across ranks only if `enabled`."""
        if self.pipeline is not None:  # the pipeline's stages reduce on their last micro-batch
            return contextlib.nullcontext()
        if isinstance(self.model, DistributedDataParallel) and not enabled:
            return self.model.no_sync()
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def dp_sum(self, value: Tensor) -> Tensor:
        """Sum of `value` over the data-parallel ranks (model-parallel peers hold equal values)."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / (self.tp_size * self.pp_size)

    def loss_sum(self, value: Tensor) -> Tensor:
        """Sum over the data-parallel ranks of a loss that the last pipeline stage alone holds
        (0 on the other stages; without a pipeline, the same as `dp_sum`)."""
        if self.pipeline is None:
            return self.dp_sum(value)
        value = value.clone()
        dist.all_reduce(value)
        return value / self.tp_size

    def uncounted_parameters(self) -> list[Tensor]:
        """Copies of parameters whose gradient norm another rank counts (a tied embedding)."""
        return self.pipeline.tied_copies() if self.pipeline is not None else []

    @property
    def norm_group(self) -> dist.ProcessGroup | None:
        """The ranks whose parts of the norm add up (the pipeline's stages), beyond the meshes."""
        return self.pipeline.group if self.pipeline is not None else None


def parallelize(
    model: Transformer,
    config: ParallelConfig,
    ranks: Ranks,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    compile_blocks: bool = False,
    seed: int | None = None,
    batch_size: int = 1,
) -> Parallel:
    """Apply `config`'s strategy to `model`, identical on every rank.

    Args:
        model: on `device` (loaded weights), or on the meta device: then only this rank's part is
            allocated and initialised, after sharding, from `seed` (`materialize_`).
        compute_dtype: FSDP's parameter dtype in forward and backward (gradients reduce in fp32).
        compile_blocks: torch.compile each block, after tensor parallel and before FSDP.
        batch_size: sequences per forward on this rank (a pipeline splits them in micro-batches).
    """
    strategy = config.resolved_strategy(ranks.world_size)
    on_meta = is_meta(model)
    if on_meta and seed is None:
        raise ValueError("a model on the meta device needs the seed of its initial weights")
    if strategy == "none":
        if on_meta:
            materialize_(model, model.config, device, seed)
        return Parallel("none", model, model)
    mesh = build_mesh(strategy, config, ranks, device.type)
    names = mesh.mesh_dim_names
    parallel = Parallel(strategy, model, model, mesh)
    parts: list[nn.Module] = [model]
    if "tp" in names:
        parallel.tp_size = mesh["tp"].size()
        parallel.sequence_multiple = parallel.tp_size if config.sequence_parallel else 1
    if "pp" in names:
        parallel.pp_size = mesh["pp"].size()
        parts = build_stages(
            model, mesh["pp"], config.pp_schedule, config.pp_virtual_stages,
            parallel.sequence_multiple,
        )  # fmt: skip
        parallel.module = PipelineParts(parts)
    for part in parts:
        if "tp" in names:
            apply_tensor_parallel(part, mesh["tp"], config.sequence_parallel, model.config)
        if compile_blocks:
            for block in _blocks(part):
                block.compile()
    dp_dims = tuple(n for n in names if n.startswith("dp"))
    if on_meta and strategy == "ddp":  # DDP wraps real parameters (it broadcasts rank 0's)
        materialize_(model, model.config, device, seed)
    if strategy == "ddp":
        parallel.model, parallel.comm = _apply_ddp(model, config, device)
    if "fsdp" in strategy or strategy == "hsdp":
        for part in parts:
            _apply_fsdp(part, mesh[dp_dims], compute_dtype, config.reshard_after_forward)
        parallel.mixed_precision = compute_dtype != torch.float32
    if on_meta and strategy != "ddp":
        for part in parts:  # a stage keeps the model's parameter names: the same values
            materialize_(part, model.config, device, seed)
    parallel.dp_size = ranks.world_size // (parallel.tp_size * parallel.pp_size)
    parallel.dp_rank = _dp_rank(mesh, dp_dims)
    if "pp" in names:
        parallel.pipeline = build_pipeline(
            parts, mesh["pp"], config.pp_schedule, _microbatches(config, batch_size),
            device, model.config.tie_embeddings,
        )  # fmt: skip
    return parallel


def _blocks(part: nn.Module) -> list[nn.Module]:
    layers = part.layers
    return list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)


def _microbatches(config: ParallelConfig, batch_size: int) -> int:
    """Micro-batches per pipeline step: `parallel.pp_microbatches`, or one per sequence."""
    count = config.pp_microbatches or batch_size
    if batch_size % count:
        raise LmscaleError(
            f"parallel.pp_microbatches = {count} does not divide the per-rank batch of {batch_size}"
        )
    return count


def _apply_ddp(
    model: nn.Module, config: ParallelConfig, device: torch.device
) -> tuple[DistributedDataParallel, CommCounter]:
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,  # the only buffers are RoPE tables: constants
        bucket_cap_mb=_one_bucket_mb(model) if _powersgd_on_gloo(config, device) else None,
    )  # fmt: skip
    counter = register_comm_hook(
        ddp, config.ddp_comm_hook, config.powersgd_rank, config.powersgd_start_step
    )
    return ddp, counter


def _apply_fsdp(
    model: nn.Module, dp_mesh: DeviceMesh, compute_dtype: torch.dtype, reshard: bool
) -> None:
    """FSDP2 per block, then the root; on a 2-D (replicate, shard) mesh this is HSDP.

    `model` is the whole Transformer or one pipeline stage of it (its own root).
    """
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    # The root (embeddings, final norm, output) is needed again at once by the backward:
    # keeping it gathered saves an all-gather (FSDP2's own default for the root).
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def check_plan(config: ParallelConfig, model: ModelConfig, nproc: int) -> str:
    """Fail early (before starting processes) on a strategy that cannot run; returns it."""
    strategy = config.resolved_strategy(nproc)
    if strategy != "none":
        shape = mesh_shape(strategy, config, Ranks(0, nproc, 0, nproc))
        check_tp_degree(model, shape.get("tp", 1))
        if "pp" in shape:
            check_pipeline(model, shape["pp"], config.pp_schedule, config.pp_virtual_stages)
    return strategy


def _powersgd_on_gloo(config: ParallelConfig, device: torch.device) -> bool:
    return config.ddp_comm_hook == "powersgd" and device.type != "cuda"


def _one_bucket_mb(model: nn.Module) -> float:
    """A bucket size holding every gradient.

    NOTE: PowerSGD all-reduces its factors from completion callbacks; with several buckets in
    flight, gloo ranks can issue them in different orders and fail with a size mismatch
    (pytorch/pytorch#58467). One bucket leaves a single order.
    """
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1


def _dp_rank(mesh: DeviceMesh, dp_dims: tuple[str, ...]) -> int:
    """Row-major rank over the data-parallel dimensions of `mesh`."""
    rank = 0
    for name in dp_dims:
        rank = rank * mesh[name].size() + mesh[name].get_local_rank()
    return rank
