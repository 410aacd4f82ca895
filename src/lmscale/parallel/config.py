"""How a run is spread over processes: the `[parallel]` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmscale.errors import LmscaleError

STRATEGIES = (
    "auto", "none", "ddp", "fsdp", "hsdp", "tp", "fsdp+tp", "pp", "pp+fsdp", "pp+tp", "pp+fsdp+tp",
)  # fmt: skip
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass
class ParallelConfig:
    """The parallel strategy and its knobs (torchtitan's vocabulary)."""

    strategy: Literal[
        "auto", "none", "ddp", "fsdp", "hsdp", "tp", "fsdp+tp", "pp", "pp+fsdp", "pp+tp",
        "pp+fsdp+tp",
    ] = "auto"  # fmt: skip
    """auto (none on one process, fsdp on several), none, ddp, fsdp, hsdp, tp, fsdp+tp, pp,
    pp+fsdp, pp+tp or pp+fsdp+tp."""
    tp: int = 1
    """Tensor-parallel degree for fsdp+tp and pp+fsdp+tp (tp alone uses every process; pp+tp
    every process a pipeline stage does not take)."""
    pp: int = 0
    """Pipeline stages (ranks) for the pp strategies; 0 means every process pp+tp's tensor
    parallel leaves (pp: all of them). pp+fsdp and pp+fsdp+tp need it set."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b"] = "1f1b"
    """gpipe (all forwards, then all backwards), 1f1b, or interleaved-1f1b (pp_virtual_stages
    stages per rank: a smaller bubble for more point-to-point traffic)."""
    pp_microbatches: int = 0
    """Micro-batches each pipeline splits a rank's batch into; 0 means one per sequence."""
    pp_virtual_stages: int = 2
    """interleaved-1f1b: stages per rank (the model has pp x this many)."""
    dp_shard: int = 0
    """hsdp: processes that shard one replica (0 means the processes of one node)."""
    reshard_after_forward: bool = True
    """fsdp/hsdp: free gathered parameters after the forward (less memory, one more all-gather)."""
    sequence_parallel: bool = True
    """tp: shard norms and residuals along the sequence between the parallel layers."""
    ddp_comm_hook: Literal["none", "bf16", "powersgd"] = "none"
    """ddp: compress gradients before the all-reduce: bf16 halves the bytes, powersgd sends low rank."""
    powersgd_rank: int = 1
    """ddp with powersgd: rank of the gradient approximation."""
    powersgd_start_step: int = 10
    """ddp with powersgd: plain all-reduce before this step (PowerSGD's warm-up)."""
    timeout_s: float = 600.0
    """Fail (naming the ranks that did not arrive) when a collective waits longer than this."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto is nccl on CUDA, gloo on the CPU."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise LmscaleError(
                f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'"
            )
        if self.pp_schedule not in PP_SCHEDULES:
            raise LmscaleError(
                f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, "
                f"got '{self.pp_schedule}'"
            )
        for name in ("pp", "pp_microbatches"):
            if getattr(self, name) < 0:
                raise LmscaleError(
                    f"parallel.{name} must not be negative, got {getattr(self, name)}"
                )
        for name in ("tp", "powersgd_rank", "pp_virtual_stages"):
            if getattr(self, name) < 1:
                raise LmscaleError(f"parallel.{name} must be positive, got {getattr(self, name)}")
        if self.dp_shard < 0:
            raise LmscaleError(f"parallel.dp_shard must not be negative, got {self.dp_shard}")
        if self.timeout_s <= 0:
            raise LmscaleError(f"parallel.timeout_s must be positive, got {self.timeout_s}")
        if self.powersgd_start_step < 2:
            raise LmscaleError("parallel.powersgd_start_step must be at least 2 (PowerSGD's rule)")

    def resolved_strategy(self, world_size: int) -> str:
        """The strategy `auto` stands for at this world size."""
        if self.strategy == "auto":
            return "none" if world_size == 1 else "fsdp"
        if self.strategy == "none" and world_size > 1:
            raise LmscaleError(
                f"parallel.strategy none runs on one process, but {world_size} were started: "
                "choose ddp, fsdp, hsdp, tp, fsdp+tp or a pp strategy"
            )
        return self.strategy
