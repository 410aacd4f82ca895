"""Starting N training processes on this machine through torchrun (`lmscale train --nproc N`).

The multi-node form is torchrun itself, on every node:

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m lmscale.train --config configs/gpt2-124m.toml --out /shared/runs/g124 \\
        --parallel.strategy fsdp
"""

from __future__ import annotations

import os
import subprocess
import sys

from lmscale.errors import LmscaleError


def torchrun_command(
    nproc: int, train_args: list[str], max_restarts: int = 0, module: str = "lmscale.train"
) -> list[str]:
    """The torchrun command line running `python -m MODULE TRAIN_ARGS` on `nproc` processes."""
    if nproc < 1:
        raise LmscaleError(f"--nproc must be positive, got {nproc}")
    if max_restarts < 0:
        raise LmscaleError(f"--max-restarts must not be negative, got {max_restarts}")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "-m", module, *train_args,
    ]  # fmt: skip


def launch(
    nproc: int, train_args: list[str], max_restarts: int = 0, module: str = "lmscale.train"
) -> int:
    """Run the training processes (`python -m MODULE`) to the end; returns torchrun's exit code."""
    return subprocess.run(
        torchrun_command(nproc, train_args, max_restarts, module), env=torchrun_env()
    ).returncode


def torchrun_env() -> dict[str, str]:
    """The environment for torchrun, with restarts made reliable.

    NOTE: by default workers share the rendezvous's TCP store, and a restarted group can read a
    dead worker's connection keys from the previous attempt and hang in `init_process_group`
    (pytorch/pytorch#135712). A store per attempt avoids that.
    """
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **os.environ}
