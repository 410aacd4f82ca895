"""The engine replicas of a Ray Serve deployment, seen from the ingress as one engine.

`create_app` serves any object with `AsyncEngine`'s serving surface (`EngineLike`). This one
sends each request through a Ray Serve handle (the router picks the replica) and streams its
outputs back; Ray's failures become the engine errors the app already answers:

    Ray Serve's back-pressure (max_queued_requests)   QueueFullError          429 + Retry-After
    the replica died or became unreachable            EngineUnavailableError  503 + Retry-After
    an error the replica's engine raised              that error (a 400 for a bad request)

`stats()` and `replicas` come from the stats hub that every replica reports to, read every
`refresh_s` in the background (a scrape never waits on Ray).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ray import exceptions as ray_errors
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from lmscale.engine.engine import EngineStats
from lmscale.engine.request import (
    EngineUnavailableError,
    GenerationRequest,
    QueueFullError,
    RequestOutput,
)
from lmscale.tokenizer import Tokenizer

GONE = (
    ray_errors.RayActorError, ray_errors.ActorUnavailableError, ray_errors.ObjectLostError,
    ray_errors.WorkerCrashedError, DeploymentUnavailableError,
)  # fmt: skip
"""Ray's errors for a replica that died, or one that cannot be reached now."""

EMPTY_STATS = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


class RemoteEngine:
    """Generation on the replicas behind `engine`; built with `connect`."""

    def __init__(
        self, engine: DeploymentHandle, hub: DeploymentHandle, tokenizer: Tokenizer,
        max_seq_len: int, refresh_s: float = 0.5,
    ):  # fmt: skip
        self.handle, self.hub, self.refresh_s = engine, hub, refresh_s
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.replicas = 0
        self.per_replica: dict[str, dict[str, int]] = {}
        """Each live replica's last report (for per-replica metrics)."""
        self._stats = EMPTY_STATS
        self._refresher: asyncio.Task | None = None

    @classmethod
    async def connect(cls, engine: DeploymentHandle, hub: DeploymentHandle) -> RemoteEngine:
        """Ask one replica for the tokenizer and context length, and start reading the hub."""
        tokenizer, max_seq_len = await engine.describe.remote()
        remote = cls(engine, hub, tokenizer, max_seq_len)
        await remote.refresh()
        remote._refresher = asyncio.create_task(remote._refresh_forever())
        return remote

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs from the replica the router picks (see the module
        docstring for the errors); leaving early cancels it there."""
        stream = self.handle.options(stream=True).generate.remote(request)
        return self._follow(stream)

    async def _follow(self, stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield out
            if not finished:  # never pass a cut-short answer off as complete
                raise EngineUnavailableError("the replica ended the stream before its end")
        except BackPressureError as error:
            raise QueueFullError(str(error)) from None
        except GONE as error:
            raise EngineUnavailableError(
                f"the replica went away ({type(error).__name__})"
            ) from None
        except ray_errors.RayTaskError as error:  # the replica's own error, e.g. a bad request
            raise error.cause from None
        finally:
            if not finished:
                stream.cancel()

    def stats(self) -> EngineStats:
        return self._stats

    async def refresh(self) -> None:
        """Read the replicas' totals from the hub now."""
        totals, self.replicas, self.per_replica = await self.hub.snapshot.remote()
        self._stats = EngineStats(**totals)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            with contextlib.suppress(Exception):  # the hub restarting: keep the last numbers
                await self.refresh()

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
