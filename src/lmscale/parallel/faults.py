"""Telling which rank is at fault when a collective times out.

Every rank posts its step to the job's key-value store (torchrun's TCP store) after each step. A
rank whose collective fails (gloo/NCCL raise after `parallel.timeout_s`) reads every rank's post:
the ranks that are behind are the ones that hang or died, and the error names them.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from lmscale.errors import LmscaleError
from lmscale.parallel.runtime import restart_count


class CollectiveTimeout(LmscaleError):
    """A collective failed because some rank did not take part."""


class Heartbeat:
    """Posts this rank's progress to the job's store; explains a failed collective."""

    def __init__(self, timeout_s: float) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout_s = timeout_s
        self.store = dist.distributed_c10d._get_default_store()
        self.prefix = f"lmscale/heartbeat/{restart_count()}/"

    def beat(self, step: int) -> None:
        self.store.set(f"{self.prefix}{self.rank}", f"{step} {time.time():.3f}")

    def explain(self, error: BaseException, step: int) -> LmscaleError | None:
        """An error naming the ranks that stayed behind `step`, or None if none did."""
        try:
            posts = {rank: self._read(rank) for rank in range(self.world)}
        except Exception:  # the store itself is gone (the agent stopped): nothing to tell
            return None
        behind = {r: p for r, p in posts.items() if p is None or p[0] < step}
        if not behind:
            return None
        now = time.time()
        who = ", ".join(
            f"rank {r} (never posted)" if p is None
            else f"rank {r} (last finished step {p[0]}, {now - p[1]:.0f} s ago)"
            for r, p in sorted(behind.items())
        )  # fmt: skip
        first_line = (
            str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        )
        return CollectiveTimeout(
            f"rank {self.rank}: a collective of step {step + 1} failed after waiting up to "
            f"{self.timeout_s:g} s (parallel.timeout_s) for {who}, which hangs or died "
            f"[{first_line}]"
        )

    def _read(self, rank: int) -> tuple[int, float] | None:
        key = f"{self.prefix}{rank}"
        if not self.store.check([key]):
            return None
        step, stamp = self.store.get(key).decode().split()
        return int(step), float(stamp)
