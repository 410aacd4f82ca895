"""The one entry point: apply a strategy to an unchanged model and say how to train it.

    parallel = parallelize(model, config, ranks, device, compute_dtype)
    parallel.model          what the loop calls (a DDP wrapper, or the model sharded in place)
    parallel.module         the model under lmscale's parameter names (for state dicts)
    parallel.dp_rank/size   which share of each global batch this process reads
    parallel.gradient_sync(last)   skip gradient communication on all but the last micro-batch

Order follows torchtitan: tensor parallel first (on the `tp` mesh dimension), then FSDP over the
data-parallel dimensions, block by block and then the root (embeddings, final norm, output).
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

from lmscale.model import ModelConfig, Transformer
from lmscale.parallel.comm_hooks import CommCounter, register_comm_hook
from lmscale.parallel.config import ParallelConfig
from lmscale.parallel.mesh import build_mesh, mesh_shape
from lmscale.parallel.runtime import Ranks
from lmscale.parallel.tensor_parallel import apply_tensor_parallel, check_tp_degree


@dataclass
class Parallel:
    """A model prepared for its strategy, and what the loop needs to know about it."""

    strategy: str
    model: nn.Module
    module: Transformer
    mesh: DeviceMesh | None = None
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
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
        return self.strategy in ("fsdp", "hsdp", "tp", "fsdp+tp")

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Within this context, backward reduces gradients across ranks only if `enabled`."""
        if isinstance(self.model, DistributedDataParallel) and not enabled:
            return self.model.no_sync()
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def dp_sum(self, value: Tensor) -> Tensor:
        """Sum of `value` over the data-parallel ranks (tensor-parallel peers hold equal values)."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.tp_size if self.tp_size > 1 else value


def parallelize(
    model: Transformer,
    config: ParallelConfig,
    ranks: Ranks,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    compile_blocks: bool = False,
) -> Parallel:
    """Apply `config`'s strategy to `model` (already on `device`, identical on every rank).

    Args:
        compute_dtype: FSDP's parameter dtype in forward and backward (gradients reduce in fp32).
        compile_blocks: torch.compile each block, after tensor parallel and before FSDP.
    """
    strategy = config.resolved_strategy(ranks.world_size)
    if strategy == "none":
        return Parallel("none", model, model)
    mesh = build_mesh(strategy, config, ranks, device.type)
    names = mesh.mesh_dim_names
    parallel = Parallel(strategy, model, model, mesh)
    if "tp" in names:
        apply_tensor_parallel(model, mesh["tp"], config.sequence_parallel)
        parallel.tp_size = mesh["tp"].size()
        parallel.sequence_multiple = parallel.tp_size if config.sequence_parallel else 1
    if compile_blocks:
        for block in model.layers:
            block.compile()
    if strategy == "ddp":
        parallel.model, parallel.comm = _apply_ddp(model, config, device)
    dp_dims = tuple(n for n in names if n.startswith("dp"))
    if strategy in ("fsdp", "hsdp", "fsdp+tp"):
        _apply_fsdp(model, mesh[dp_dims], compute_dtype, config.reshard_after_forward)
        parallel.mixed_precision = compute_dtype != torch.float32
    parallel.dp_size = ranks.world_size // parallel.tp_size
    parallel.dp_rank = _dp_rank(mesh, dp_dims)
    return parallel


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
    model: Transformer, dp_mesh: DeviceMesh, compute_dtype: torch.dtype, reshard: bool
) -> None:
    """FSDP2 per block, then the root; on a 2-D (replicate, shard) mesh this is HSDP."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
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
