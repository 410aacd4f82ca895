"""The three Ray Serve deployments of `lmscale serve --replicas/--autoscale`:

    HTTP -> Ray Serve's proxy -> Ingress (the FastAPI app of `lmscale.serve.app`, one replica)
                                   | DeploymentHandle, streaming; the request router picks
                                   v
                                 EngineReplica x N   (one AsyncEngine each, `threads` torch threads)
                                   | every `report_s`: its EngineStats
                                   v
                                 StatsHub (one replica) <- the Ingress reads the totals for /metrics

The classes are plain: `lmscale.serve.scale_out` makes them deployments with the options of the
command line. Ray Serve drains a replica it stops (scale-down, shutdown): it waits for the
streams in flight, up to `graceful_shutdown_timeout_s`, before `__del__` closes the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict

from ray import serve
from ray.serve.handle import DeploymentHandle

from lmscale.engine.request import GenerationRequest, RequestOutput
from lmscale.serve.replica_stats import ReplicaStatsBook
from lmscale.serve.server import ServeOptions


class EngineReplica:
    """One engine: the model of `options` loaded in this replica's process.

    Args:
        options: what `lmscale serve` would load and how (model, dtype, engine budgets).
        threads: torch threads of this replica (replicas of one machine share its cores).
        hub: the StatsHub deployment it reports to.
    """

    def __init__(
        self, options: ServeOptions, threads: int, hub: DeploymentHandle, report_s: float = 0.5
    ):
        import torch

        from lmscale.serve.server import build_engine

        torch.set_num_threads(threads)
        self.engine, _ = build_engine(options)
        self.hub, self.report_s = hub, report_s
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._reporter: asyncio.Task | None = None

    def describe(self) -> tuple:
        """The tokenizer and context length, for the ingress."""
        self._start_reporting()
        return self.engine.tokenizer, self.engine.max_seq_len

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        self._start_reporting()
        async for out in self.engine.generate(request):
            yield out

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose step loop died is replaced."""
        self._start_reporting()
        self.engine.raise_if_stopped()

    def _start_reporting(self) -> None:
        # NOTE: from a method, not __init__: the task must live on the loop requests run on.
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # the hub restarting: report again next time
                await self.hub.report.remote(self.replica_id, asdict(self.engine.stats()))
            await asyncio.sleep(self.report_s)

    def __del__(self):
        if self._reporter is not None:
            self._reporter.cancel()
        self.engine.close()


class StatsHub:
    """Where engine replicas report their numbers and the ingress reads their totals."""

    def __init__(self, stale_s: float = 3.0):
        self.book = ReplicaStatsBook(stale_s)

    def report(self, replica_id: str, stats: dict[str, int]) -> None:
        self.book.report(replica_id, stats)

    def snapshot(self) -> tuple[dict[str, int], int, dict[str, dict[str, int]]]:
        """The totals, the live replica count, and each live replica's last report."""
        totals, live = self.book.totals()
        return totals, live, self.book.per_replica()


@serve.ingress()
class Ingress:
    """lmscale's FastAPI app in front of the engine replicas."""

    async def __init__(
        self, engine: DeploymentHandle, hub: DeploymentHandle, name: str, api_key: str | None
    ):
        from lmscale.serve.app import create_app
        from lmscale.serve.remote_engine import RemoteEngine

        self.remote = await RemoteEngine.connect(engine, hub)
        self.api = create_app(self.remote, name, api_key=api_key)
        self.api.router.on_shutdown.append(self.remote.close)

    def __serve_build_asgi_app__(self):
        return self.api
