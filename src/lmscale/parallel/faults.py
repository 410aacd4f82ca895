"""Telling which rank is at fault when a collective times out.

Every rank posts its step to the job's key-value store (torchrun's TCP store) after each step.
When a collective fails (gloo raises after `parallel.timeout_s`), each live rank posts that too;
the ranks that never post a failure are the ones that hang or died, and the error names them
with the last step they finished.
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
        self.prefix = f"lmscale/{restart_count()}/"

    def beat(self, step: int) -> None:
        """Post that this rank finished `step`."""
        self.store.set(f"{self.prefix}step/{self.rank}", f"{step} {time.time():.3f}")

    def explain(self, error: BaseException, step: int) -> LmscaleError | None:
        """An error naming the ranks that did not take part in the failed collective.

        Every live rank waiting in that collective fails within about the same timeout and posts
        so; the ranks that post no failure (within the timeout, capped at 10 s) are the ones that
        hang or died. Returns None when every rank failed alike (nobody to blame).
        """
        try:
            self.store.set(f"{self.prefix}failed/{self.rank}", str(step))
            deadline = time.monotonic() + min(self.timeout_s, 10.0)
            while True:
                suspects = [r for r in range(self.world) if not self._has(f"failed/{r}")]
                if not suspects or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            finished = {r: self._last_step(r) for r in suspects}
        except Exception:  # the store itself is gone (torchrun's agent stopped): nothing to tell
            return None
        if not suspects:
            return None
        now = time.time()
        who = ", ".join(
            f"rank {r} (never finished a step)" if post is None
            else f"rank {r} (last finished step {post[0]}, {now - post[1]:.0f} s ago)"
            for r, post in finished.items()
        )  # fmt: skip
        cause = str(error).strip().splitlines()[0][:160] if str(error).strip() else repr(error)
        return CollectiveTimeout(
            f"rank {self.rank}: step {step + 1} failed: {who} did not join a collective within "
            f"parallel.timeout_s = {self.timeout_s:g} s; it hangs or died ({cause})"
        )

    def _has(self, key: str) -> bool:
        return self.store.check([self.prefix + key])

    def _last_step(self, rank: int) -> tuple[int, float] | None:
        if not self._has(f"step/{rank}"):
            return None
        step, stamp = self.store.get(f"{self.prefix}step/{rank}").decode().split()
        return int(step), float(stamp)
