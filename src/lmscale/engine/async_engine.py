"""The engine for asyncio callers: a background thread runs the steps, queues carry the outputs.

A forward pass takes milliseconds to seconds; run on the event loop it would stall every other
connection. So one thread owns the `LLMEngine` and loops: take new requests and aborts from an
inbox, run a step, hand each output to its request's `asyncio.Queue` on the caller's loop:

    event loop                          engine thread
    generate() -- ("add", request) -->  inbox -> engine.step() -> outputs
    async for out in stream  <-------- loop.call_soon_threadsafe(queue.put_nowait, out)
    (consumer leaves) --- ("abort", id) -->  engine.abort(id): blocks freed before the next step

Only the engine thread touches the engine's state; the event loop only reads counts for `stats`.

When there is nothing to step, the thread does the `QualityMonitor`'s work (a probe text's
perplexity, the loss of recent prompts) one window at a time, checking its inbox between windows,
so a request that arrives waits for at most one window.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, replace
from typing import TypeVar

from lmscale.engine.config import EngineConfig
from lmscale.engine.engine import EngineStats, LLMEngine
from lmscale.engine.quality import QualityMonitor
from lmscale.engine.request import EngineDeadError, GenerationRequest, RequestOutput
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer

T = TypeVar("T")


def on_a_passing_thread(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` run on a new thread that ends with it; its result or its exception.

    Why: every thread that runs a parallel torch op on CPU gets its own pool of OpenMP worker
    threads, kept until that thread exits. With the main thread's pool still alive (from loading
    the model) beside the engine thread's, libgomp manages more threads than there are cores and
    its idle workers stop spinning almost at once; each parallel region then waits for a worker
    to wake, and on 2 cores a decode step ran ~30% slower than on the main thread (a reduction
    of 576 x 1536: 116 us against 56 us per call). Loading on a thread that exits leaves the
    engine thread's pool alone, and it runs at the main thread's speed.
    """
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name="lmscale-load")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class AsyncEngine:
    """Continuous batching for many concurrent asyncio consumers.

    Args:
        model: a model in eval mode.
        tokenizer: its tokenizer.
        config: the engine's budgets and queue bound.
        monitor: quality work for the engine thread's idle moments; with one, the thread starts
            at once (a probe is scored at start).
    """

    replicas = 1
    """Engines behind this one, for a server's metrics (a Ray Serve deployment has several)."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
        monitor: QualityMonitor | None = None,
    ):  # fmt: skip
        self.engine = LLMEngine(model, tokenizer, config)
        self.monitor = monitor
        self.tokenizer = tokenizer
        self.max_seq_len = model.config.max_seq_len
        """The model's context: a request's prompt plus max_new_tokens must fit in it."""
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, GenerationRequest | str]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._warm_up_pending = False
        if monitor is not None:
            self._start()

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs, one per step that produced a token.

        Call it from a coroutine. It checks and queues the request at once, so errors come from
        this call, before any output; iterate the result to follow the request. The last output
        has `finished` set. Leaving the iteration early (break, cancellation, `aclose`) aborts
        the request and frees its KV blocks.

        NOTE: a stream that is never iterated at all cannot notice its consumer is gone: its
        request runs to the end. Call `abort` for requests submitted and then abandoned.

        Raises:
            LmscaleError: the request can never be served (empty, too long, duplicate id).
            QueueFullError: `max_waiting` requests are already waiting.
            EngineDeadError: the step loop stopped on an error, or the engine was closed.
        """
        loop = asyncio.get_running_loop()
        self.engine.check(request)
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            self.raise_if_stopped()
            if request.request_id in self._streams:
                raise LmscaleError(f"request id {request.request_id!r} is already in use")
            self.engine.check_queue(extra=self._pending_adds())
            self._streams[request.request_id] = (loop, queue)
            self._inbox.append(("add", request))
            self._cond.notify()
        self._start()
        return self._follow(request.request_id, queue)

    async def _follow(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request: its stream ends with finish_reason "abort" and its blocks are freed
        before the next step. Unknown or finished ids are ignored."""
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def stats(self) -> EngineStats:
        """Queue depth, batch size and KV blocks in use (safe to call from the event loop)."""
        stats = self.engine.stats()
        with self._cond:
            stats.num_waiting += self._pending_adds()
        if self.monitor is not None:
            stats = replace(stats, **asdict(self.monitor.snapshot))
        return stats

    def in_flight(self) -> int:
        """Requests submitted whose streams have not ended yet."""
        with self._cond:
            return len(self._streams)

    def warm_up(self) -> None:
        """Compile the decode step's graphs in a background thread once the first request has
        finished (if the engine has a compiled step); decoding runs eagerly until each graph is
        ready (see `LLMEngine.warm_up`).

        NOTE: not at once: tracing holds the GIL for seconds, which would delay the first
        answer of a server that has just started.
        """
        if self.engine.runner.step is not None:
            self.engine.runner.compile_inline = False  # eager until the graphs are ready
            self._warm_up_pending = True

    def close(self) -> None:
        """Stop the step loop; requests still in flight end with finish_reason "abort"."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _pending_adds(self) -> int:
        return sum(kind == "add" for kind, _ in self._inbox)

    def raise_if_stopped(self) -> None:
        """Raises EngineDeadError if the step loop died or the engine was closed."""
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped on an error: {self._error!r}")
        if self._closed:
            raise EngineDeadError("the engine is closed")

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmscale-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """The engine thread: apply the inbox, step, deliver; sleep while there is no work."""
        while True:
            with self._cond:
                while not (self._closed or self._inbox or self.engine.has_unfinished()):
                    idle_wait = self._idle_wait()
                    if idle_wait == 0:
                        break
                    self._cond.wait(None if math.isinf(idle_wait) else idle_wait)
                if self._closed:
                    break
                commands, self._inbox = self._inbox, []
            if not commands and not self.engine.has_unfinished():
                self._idle_work()
                continue
            try:
                outputs = [out for cmd in commands if (out := self._apply(*cmd)) is not None]
                if self.engine.has_unfinished():
                    outputs += self.engine.step()
            except Exception as error:  # a bug: fail every request rather than hang them
                self._fail(error)
                return
            for out in outputs:
                self._deliver(out)
            if self._warm_up_pending and any(out.finished for out in outputs):
                self._warm_up_pending = False
                self.engine.warm_up(background=True)
        for request_id in list(self._streams):
            out = self.engine.abort(request_id)
            self._deliver(out or EngineDeadError("the engine is closed"), request_id)

    def _idle_wait(self) -> float:
        """Seconds until the monitor has work (0: now; inf: never, or no monitor)."""
        return math.inf if self.monitor is None else self.monitor.seconds_until_work()

    def _idle_work(self) -> None:
        try:
            self.monitor.work()
        except Exception as error:  # noqa: BLE001 - quality numbers must never stop serving
            import warnings

            warnings.warn(f"the quality monitor failed and stops: {error!r}", stacklevel=1)
            self.monitor = None

    def _apply(self, kind: str, item: GenerationRequest | str) -> RequestOutput | None:
        if kind == "add":
            try:
                self.engine.enqueue(item)
            except LmscaleError as error:
                self._deliver(error, item.request_id)
            else:
                if self.monitor is not None:
                    self.monitor.record_prompt(item.prompt_ids)
            return None
        return self.engine.abort(item)

    def _deliver(self, item: RequestOutput | BaseException, request_id: str | None = None):
        request_id = request_id or item.request_id
        with self._cond:
            target = self._streams.get(request_id)
            if target is not None and (isinstance(item, BaseException) or item.finished):
                del self._streams[request_id]
        if target is None:
            return  # its consumer has left
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # that event loop is closed
            pass

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            request_ids = list(self._streams)
        for request_id in request_ids:
            dead = EngineDeadError(f"the engine stopped on an error: {error!r}")
            self._deliver(dead, request_id)
