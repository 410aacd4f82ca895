"""The engine numbers of many replicas, summed into the one set that `/metrics` exports.

Each engine replica reports its `EngineStats` (as a dict) every fraction of a second; the ingress
asks for the totals. A replica not heard from for `stale_s` counts as gone: its gauges (queue,
batch, KV blocks) leave the sums, but what its counters had counted stays in them, so a counter
of the deployment never goes down when a replica dies or is scaled away (Prometheus would read a
drop as a reset).
"""

from __future__ import annotations

import time
from collections.abc import Callable

COUNTERS = (
    "num_preemptions", "prompt_tokens_total", "generation_tokens_total",
    "prefix_cache_queries", "prefix_cache_hits",
)  # fmt: skip
GAUGES = ("num_waiting", "num_running", "kv_blocks_used", "kv_blocks_total")


class ReplicaStatsBook:
    """The last report of every replica, and their totals.

    Args:
        stale_s: a replica silent for longer than this is no longer live.
        clock: seconds, monotonic (a test may pass its own).
    """

    def __init__(self, stale_s: float = 3.0, clock: Callable[[], float] = time.monotonic):
        self.stale_s, self.clock = stale_s, clock
        self._reports: dict[str, tuple[float, dict[str, int]]] = {}

    def report(self, replica_id: str, stats: dict[str, int]) -> None:
        self._reports[replica_id] = (self.clock(), dict(stats))

    def live(self) -> list[str]:
        now = self.clock()
        return [r for r, (at, _) in self._reports.items() if now - at <= self.stale_s]

    def per_replica(self) -> dict[str, dict[str, int]]:
        """The last report of each live replica."""
        return {r: self._reports[r][1] for r in self.live()}

    def totals(self) -> tuple[dict[str, int], int]:
        """The deployment's `EngineStats` fields, and how many replicas are live."""
        live = self.live()
        reports = {r: stats for r, (_, stats) in self._reports.items()}
        totals = {name: sum(s.get(name, 0) for s in reports.values()) for name in COUNTERS}
        totals |= {name: sum(reports[r].get(name, 0) for r in live) for name in GAUGES}
        totals["block_size"] = max((reports[r].get("block_size", 0) for r in live), default=0)
        # Ready only once every live replica is: a request may land on any of them.
        compiled = [reports[r].get("decode_compiled", 0) for r in live]
        totals["decode_compiled"] = int(bool(compiled) and all(compiled))
        return totals, len(live)
