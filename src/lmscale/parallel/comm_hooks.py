"""DDP gradient communication: optional compression, and a count of the bytes each step sends.

    hook       what one bucket of n fp32 gradients costs on the wire (all-reduce payload)
    none       4n bytes
    bf16       2n bytes (cast down, all-reduce, cast back: torch's bf16_compress_hook)
    powersgd   per matrix (rows x cols): 4 * rank * (rows + cols) bytes, when that is smaller;
               vectors and small matrices go uncompressed; plain all-reduce before the start step

The count is the payload handed to the all-reduce; a ring all-reduce moves 2(N-1)/N times that
per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel


@dataclass
class CommCounter:
    """Bytes handed to gradient all-reduces since the last `take()`."""

    bytes: int = 0

    def take(self) -> int:
        sent, self.bytes = self.bytes, 0
        return sent


def register_comm_hook(
    ddp: DistributedDataParallel, kind: str, powersgd_rank: int = 1, start_step: int = 10
) -> CommCounter:
    """Register the `kind` hook (none, bf16, powersgd) on `ddp`; returns its byte counter."""
    counter = CommCounter()
    group = dist.group.WORLD
    if kind == "none":
        ddp.register_comm_hook(
            (counter, None), _counting(lambda _, bucket: default_hooks.allreduce_hook(group, bucket),
                                        lambda bucket, _: 4 * bucket.buffer().numel())
        )  # fmt: skip
    elif kind == "bf16":
        ddp.register_comm_hook(
            (counter, None), _counting(lambda _, bucket: default_hooks.bf16_compress_hook(group, bucket),
                                        lambda bucket, _: 2 * bucket.buffer().numel())
        )  # fmt: skip
    elif kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=start_step,
        )  # fmt: skip
        ddp.register_comm_hook(
            (counter, state), _counting(lambda s, bucket: powerSGD_hook.powerSGD_hook(s, bucket),
                                         _powersgd_bytes)
        )  # fmt: skip
    else:
        raise ValueError(f"unknown DDP comm hook '{kind}'")
    return counter


def _counting(hook, cost):
    def counted(state, bucket):
        counter, inner_state = state
        counter.bytes += cost(bucket, inner_state)
        return hook(inner_state, bucket)

    return counted


def _powersgd_bytes(bucket, state: powerSGD_hook.PowerSGDState) -> int:
    # NOTE: mirrors PowerSGD's own rule; its iteration counter advances once per step.
    if state.iter < state.start_powerSGD_iter:
        return 4 * bucket.buffer().numel()
    total = 0
    for grad in bucket.gradients():
        rows, cols = (grad.shape[0], grad.numel() // grad.shape[0]) if grad.dim() > 1 else (1, 0)
        rank = min(rows, cols, state.matrix_approximation_rank)
        compressed = (rows + cols) * rank
        if grad.dim() > 1 and compressed * state.min_compression_rate < rows * cols:
            total += 4 * compressed
        else:
            total += 4 * grad.numel()
    return total
