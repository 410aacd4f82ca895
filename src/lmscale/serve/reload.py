"""Hot reload: put new weights into service without dropping a request.

`EngineSwitch` is the engine the app talks to; it forwards to the current engine. A reload
builds a whole new engine beside it (model loaded, adapter applied, checked by the builder: the
adapter's base fingerprint, the model's shapes and tokenizer, one forward pass), then switches:

    before:   new requests -> engine A
    reload:   build B on a thread of its own (A keeps serving); B refused -> A stays, 400
    switch:   new requests -> B; A's requests in flight finish on A's weights
    drained:  A closed (or after `drain_s`, its last streams aborted) and freed

Counters never go down across a switch: the retired engines' totals are added to the current
one's. One reload runs at a time; a second one meanwhile is refused (409).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from lmscale.engine.engine import COUNTERS, EngineStats
from lmscale.engine.request import GenerationRequest, RequestOutput
from lmscale.errors import LmscaleError


@dataclass(frozen=True)
class ModelSource:
    """What an engine serves: a model (any `--model` source) and optionally an adapter on it."""

    model: str
    adapter: str | None = None

    def describe(self) -> str:
        return self.model + (f" + adapter {self.adapter}" if self.adapter else "")


class ReloadError(LmscaleError):
    """New weights were refused; the old ones keep serving."""


class ReloadBusyError(LmscaleError):
    """A reload is already running."""


class EngineSwitch:
    """The served engine, replaceable while it serves (see the module docstring).

    Args:
        engine: the engine serving `source` now.
        source: what it serves.
        build: makes the engine for a `ModelSource` and the engine it replaces (to compare
            against); raises `LmscaleError` for weights it refuses. Runs on a passing thread.
        drain_s: how long the old engine's requests may run on after a switch.
    """

    replicas = 1

    def __init__(
        self, engine, source: ModelSource, build: Callable[[ModelSource, Any], Any],
        drain_s: float = 300.0,
    ):  # fmt: skip
        self.current, self.source, self.build, self.drain_s = engine, source, build, drain_s
        self.loaded_at = time.time()
        self.reloads = {"ok": 0, "refused": 0}
        self.last_error: str | None = None
        self._retired = dict.fromkeys(COUNTERS, 0)
        self._draining: list = []
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task] = set()

    @property
    def tokenizer(self):
        return self.current.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.current.max_seq_len

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        return self.current.generate(request)

    def stats(self) -> EngineStats:
        stats = self.current.stats()
        totals = {name: getattr(stats, name) + self._retired[name] for name in COUNTERS}
        running, waiting = stats.num_running, stats.num_waiting
        for old in self._draining:  # their requests are still running: count them
            other = old.stats()
            for name in COUNTERS:
                totals[name] += getattr(other, name)
            running, waiting = running + other.num_running, waiting + other.num_waiting
        return replace(stats, **totals, num_running=running, num_waiting=waiting)

    def draining(self) -> int:
        """Engines replaced but still finishing their requests."""
        return len(self._draining)

    async def reload(self, source: ModelSource | None = None) -> dict:
        """Serve `source` (default: the current one, read again from disk) from now on.

        Returns:
            What is served now, and the seconds the new engine took to load.

        Raises:
            ReloadBusyError: another reload is running.
            ReloadError: the new weights were refused; the old ones serve on.
        """
        source = source or self.source
        if self._lock.locked():
            raise ReloadBusyError("a reload is already running; try again when it has finished")
        async with self._lock:
            started = time.monotonic()
            try:
                engine = await on_a_passing_thread(self.build, source, self.current)
            except Exception as error:  # noqa: BLE001 - any failure to load refuses the weights
                self.reloads["refused"] += 1
                self.last_error = _describe(error)
                raise ReloadError(
                    f"cannot serve {source.describe()}: {self.last_error}; still serving "
                    f"{self.source.describe()}"
                ) from None
            old, self.current, self.source = self.current, engine, source
            self.loaded_at = time.time()
            self.reloads["ok"] += 1
            self._draining.append(old)
            task = asyncio.create_task(self._retire(old))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
            return self.describe() | {"load_s": round(time.monotonic() - started, 3)}

    def describe(self) -> dict:
        return {
            "model": self.source.model, "adapter": self.source.adapter,
            "loaded_at": self.loaded_at, "draining": len(self._draining),
        }  # fmt: skip

    async def _retire(self, old) -> None:
        """Let `old`'s requests finish (for up to `drain_s`), then close it."""
        deadline = time.monotonic() + self.drain_s
        while old.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(old.close)  # aborts what is left; joins its thread
        stats = old.stats()
        for name in COUNTERS:
            self._retired[name] += getattr(stats, name)
        self._draining.remove(old)

    async def aclose(self) -> None:
        for task in list(self._drains):
            task.cancel()
        for old in list(self._draining):
            await asyncio.to_thread(old.close)
        await asyncio.to_thread(self.current.close)

    def close(self) -> None:
        for old in self._draining:
            old.close()
        self.current.close()


def _describe(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, LmscaleError) else f"{type(error).__name__}: {text}"


async def on_a_passing_thread(fn: Callable[..., Any], *args) -> Any:
    """`fn(*args)` on a new thread that ends with it, awaited without blocking the event loop.

    A new thread rather than the loop's executor: torch gives every thread that runs parallel
    ops its own OpenMP pool, kept while the thread lives (see `lmscale.engine.async_engine.
    on_a_passing_thread`); a pooled executor thread would keep one beside the engine's.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=run, name="lmscale-reload", daemon=True).start()
    return await future
