"""The process group: who this process is, and starting or ending `torch.distributed`.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_*).
A process started without torchrun is rank 0 of 1; it still gets a process group when a
strategy asks for one (FSDP on one GPU), on a free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lmscale.errors import LmscaleError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """Ranks as torchrun sets them; rank 0 of 1 without torchrun."""
    try:
        return Ranks(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        )  # fmt: skip
    except ValueError as error:
        raise LmscaleError(f"bad torchrun environment variable: {error}") from None


def restart_count() -> int:
    """How many times torchrun has restarted this group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """One GPU per local rank; the CPU stays the CPU."""
    if device.type == "cuda":
        index = ranks.local_rank if device.index is None else device.index
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


def init_process_group(
    ranks: Ranks, device: torch.device, backend: str = "auto", timeout_s: float = 600.0
) -> None:
    """Join the job's process group (idempotent); collectives fail after `timeout_s`."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LmscaleError("parallel.backend nccl needs CUDA; use gloo on the CPU")
    if "MASTER_ADDR" not in os.environ:  # one process, started by hand
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(
        backend, rank=ranks.rank, world_size=ranks.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )  # fmt: skip


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
