"""Spreading training over processes and nodes on `torch.distributed`.

`parallelize` applies a strategy (DDP, FSDP2, HSDP, tensor parallel, FSDP + TP on a 2-D mesh)
to an unchanged model; `save_sharded` / `load_sharded` checkpoint it so any world size can
resume; `Heartbeat` names the rank behind a timed-out collective; `launch` starts torchrun.
"""

from lmscale.parallel.config import STRATEGIES, ParallelConfig
from lmscale.parallel.runtime import (
    Ranks,
    destroy_process_group,
    device_for,
    init_process_group,
    ranks_from_env,
    restart_count,
)

__all__ = [
    "STRATEGIES",
    "ParallelConfig",
    "Ranks",
    "destroy_process_group",
    "device_for",
    "init_process_group",
    "ranks_from_env",
    "restart_count",
]
