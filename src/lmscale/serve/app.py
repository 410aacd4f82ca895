"""The HTTP API: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, plus
`/health`, `/metrics` (Prometheus), the chat page at `/`, and the admin API: `POST /admin/reload`
(new weights into service without downtime, see `lmscale.serve.reload`) and `GET /admin/model`.

Each request becomes `n` engine streams; their deltas become either one JSON answer or
server-sent events ending with `data: [DONE]`. A client that goes away mid-stream closes its
streams, which frees their slots and KV blocks at once.

The engine is anything with `AsyncEngine`'s serving surface (`EngineLike`): the engine in this
process (`lmscale serve`) or the replicas behind a Ray Serve handle (`lmscale serve --replicas`,
see `lmscale.serve.scale_out`). An engine that goes away mid-answer is a 503 before the first
byte, and an `error` event (never a `[DONE]`) after it: no answer is silently cut short.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib.resources import files
from typing import Protocol

from fastapi import Body, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from lmscale.engine.engine import EngineStats
from lmscale.engine.request import (
    EngineDeadError,
    EngineUnavailableError,
    GenerationRequest,
    QueueFullError,
    RequestOutput,
    RequestParams,
    TokenLogprob,
)
from lmscale.errors import LmscaleError
from lmscale.serve.errors import APIError, error_body, install_handlers
from lmscale.serve.metrics import ServerMetrics
from lmscale.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    new_id,
    now,
    usage,
)
from lmscale.serve.reload import ModelSource, ReloadBusyError, ReloadError
from lmscale.tokenizer import Tokenizer

MAX_BODY_BYTES = 1 << 20


class EngineLike(Protocol):
    """What the app needs of an engine (`AsyncEngine` has it; so does `RemoteEngine`)."""

    tokenizer: Tokenizer
    max_seq_len: int
    replicas: int
    """Engines answering behind this one (1 for an engine in this process)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    def stats(self) -> EngineStats: ...


class ReloadRequest(BaseModel):
    """`POST /admin/reload`: what to serve next. An absent field keeps what is served (an
    absent `model` with a new `adapter`: the adapter on the served model); a new `model` alone
    drops the adapter; an empty body reads the served model and adapter again from disk."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    adapter: str | None = None


def create_app(
    engine: EngineLike, model_name: str, api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES, admin_key: str | None = None,
) -> FastAPI:  # fmt: skip
    """The ASGI app serving `engine`'s model under the name `model_name`.

    The admin API needs `admin_key` (as a bearer token) and an engine that can reload (an
    `EngineSwitch`); without a key it answers 403.
    """
    app = FastAPI(title="lmscale", version="0.1.0")
    replicas = (lambda: engine.per_replica) if hasattr(engine, "per_replica") else None
    switch = engine if hasattr(engine, "reload") else None
    app.state.switch = switch
    metrics = ServerMetrics(lambda: _engine_stats(engine), replicas, switch)
    api = _Api(engine, model_name, metrics)
    install_handlers(app)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Authentication and the request-size limit, answered before any parsing."""
        path = request.url.path
        if api_key and path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
        if path.startswith("/admin/"):
            if admin_key is None:
                return _error(403, "the admin API is off: start the server with --admin-key "
                              "(or LMSCALE_ADMIN_KEY, or an API key)")  # fmt: skip
            if request.headers.get("authorization", "") != f"Bearer {admin_key}":
                return _error(401, "missing or wrong admin key (send 'Authorization: Bearer "
                              "KEY')")  # fmt: skip
            if switch is None:
                return _error(501, "this server cannot reload (behind Ray Serve, redeploy)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return _error(413, f"the request body exceeds {max_body_bytes} bytes")
        response = await call_next(request)
        if path.startswith("/v1/") and request.method == "POST":
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": api.started, "owned_by": "lmscale"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await api.complete(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await api.chat(body)

    @app.get("/admin/model")
    async def served_model() -> dict:
        return switch.describe() | {"last_error": switch.last_error}

    @app.post("/admin/reload")
    async def reload(body: ReloadRequest | None = Body(default=None)) -> dict:  # noqa: B008
        source = _next_source(switch.source, body)
        try:
            return {"status": "ok"} | await switch.reload(source)
        except ReloadBusyError as error:
            raise APIError(409, str(error)) from None
        except ReloadError as error:
            raise APIError(400, str(error), None, "invalid_model") from None

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return files("lmscale.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    return app


def _next_source(served: ModelSource, body: ReloadRequest | None) -> ModelSource:
    """What a reload request asks to serve (see `ReloadRequest`)."""
    if body is None or not body.model_fields_set:
        return served
    if "model" in body.model_fields_set and body.model is None:
        raise APIError(400, "'model' must name a model to serve", "model")
    model = body.model if "model" in body.model_fields_set else served.model
    if "adapter" in body.model_fields_set:
        return ModelSource(model, body.adapter)
    return ModelSource(model, served.adapter if model == served.model else None)


def _engine_stats(engine: EngineLike) -> dict[str, int | float | None]:
    """The engine's numbers that /metrics exports, by metric name less `lmscale_`."""
    stats = engine.stats()
    return {
        "queue_depth": stats.num_waiting, "running_requests": stats.num_running,
        "kv_blocks_used": stats.kv_blocks_used, "kv_blocks_total": stats.kv_blocks_total,
        "prefix_cache_queries": stats.prefix_cache_queries,
        "prefix_cache_hits": stats.prefix_cache_hits, "decode_compiled": stats.decode_compiled,
        "replicas": engine.replicas, "max_num_seqs": stats.max_num_seqs,
        "token_budget": stats.token_budget, "engine_steps": stats.steps,
        "step_tokens": stats.step_tokens,
        "gpu_memory_allocated_bytes": stats.gpu_memory_allocated,
        "gpu_memory_reserved_bytes": stats.gpu_memory_reserved,
        "probe_loss": stats.probe_loss, "probe_timestamp": stats.probe_timestamp,
        "probe_runs": stats.probe_runs, "prompt_loss_nats": stats.prompt_loss_nats,
        "prompt_loss_tokens": stats.prompt_loss_tokens,
        "recent_prompt_loss": stats.recent_prompt_loss,
    }  # fmt: skip


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


class _Api:
    """The two generation endpoints, from request body to answer."""

    def __init__(self, engine: EngineLike, model_name: str, metrics: ServerMetrics):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.tokenizer = engine.tokenizer
        self.max_context = engine.max_seq_len
        self.started = now()

    async def complete(self, body: CompletionRequest):
        self._check_model(body)
        if isinstance(body.prompt, str):
            prompt = self.tokenizer.encode(body.prompt)
        else:
            prompt = body.prompt
            if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt):
                raise APIError(400, "prompt holds token ids outside the vocabulary", "prompt")
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        params = self._params(body, prompt, body.max_tokens, body.logprobs)
        prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        shape = _CompletionShape(self, new_id("cmpl"), body.logprobs, prefix)
        return await self._answer(body, prompt, params, shape)

    async def chat(self, body: ChatCompletionRequest):
        self._check_model(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as error:  # a template may reject a role order, say
            raise APIError(400, f"cannot apply the chat template: {error}", "messages") from None
        prompt = self.tokenizer.encode(text, add_bos=False)  # the template writes any bos
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, prompt, body.token_limit(), top)
        shape = _ChatShape(self, new_id("chatcmpl"), top)
        return await self._answer(body, prompt, params, shape)

    def _check_model(self, body: SamplingFields) -> None:
        if body.model != self.model_name:
            raise APIError(
                400, f"the model '{body.model}' does not exist here (serving '{self.model_name}')",
                "model", "model_not_found",
            )  # fmt: skip

    def _params(
        self, body: SamplingFields, prompt: list[int], limit: int | None, logprobs: int | None
    ) -> RequestParams:
        context = self.max_context
        room = context - len(prompt)
        if limit is None:
            limit = room
        if room < 1 or limit > room:
            raise APIError(
                400, f"this model's maximum context length is {context} tokens; the request "
                f"asks for {len(prompt) + limit} ({len(prompt)} in the prompt, {limit} to "
                "generate)", "max_tokens", "context_length_exceeded",
            )  # fmt: skip
        return RequestParams(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            max_new_tokens=limit, stop=body.stops() or None, seed=body.seed, logprobs=logprobs,
        )  # fmt: skip

    async def _answer(self, body, prompt, params, shape):
        streams = []
        try:
            for i in range(body.n):
                streams.append(self._stream(self._submit(prompt, _nth(params, i))))
            first = [await _first_delta(s) for s in streams]
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(shape, streams, first, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await asyncio.gather(
            *(_collect(d, s) for d, s in zip(first, streams, strict=True))
        )
        return shape.full(results)

    def _submit(self, prompt: list[int], params: RequestParams) -> AsyncIterator[RequestOutput]:
        """Queue one request with the engine; its errors, now or while it streams, as API
        errors."""
        try:
            return _api_errors(self.engine.generate(GenerationRequest(prompt, params)))
        except Exception as error:
            raise _as_api_error(error) from None

    async def _stream(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """The engine's stream of one request, with metrics taken on the way."""
        arrived = last = time.monotonic()
        try:
            async for delta in stream:
                stamp = time.monotonic()
                if delta.token_ids:
                    if last == arrived:
                        self.metrics.ttft.observe(stamp - arrived)
                    else:
                        self.metrics.itl.observe((stamp - last) / len(delta.token_ids))
                    last = stamp
                    self.metrics.generation_tokens.inc(len(delta.token_ids))
                if delta.finish_reason:
                    self.metrics.prompt_tokens.inc(delta.prompt_tokens)
                yield delta
        finally:
            await stream.aclose()


def _as_api_error(error: Exception) -> Exception:
    """An engine's refusal as the answer it deserves: a full queue is a 429, an engine gone a
    retriable 503, a request it cannot serve a 400; anything else is left as it is (a bug)."""
    if isinstance(error, QueueFullError):
        return APIError(429, f"the server is busy: {error}", headers={"Retry-After": "1"})
    if isinstance(error, EngineUnavailableError):
        return APIError(503, f"{error}; send the request again", headers={"Retry-After": "1"})
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error))
    if isinstance(error, LmscaleError):
        return APIError(400, str(error))
    return error


async def _api_errors(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        async for delta in stream:
            yield delta
    except Exception as error:
        raise _as_api_error(error) from None
    finally:
        await stream.aclose()


def _nth(params: RequestParams, i: int) -> RequestParams:
    """The i-th of n choices: a seeded request gets distinct but reproducible seeds."""
    return params if i == 0 or params.seed is None else replace(params, seed=params.seed + i)


async def _first_delta(stream) -> RequestOutput | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _collect(first: RequestOutput | None, stream) -> list[RequestOutput]:
    deltas = [first] if first else []
    async for delta in stream:
        deltas.append(delta)
    return deltas


async def _sse(shape, streams, first, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of every choice as its deltas come, then usage and [DONE]."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream, delta: RequestOutput | None):
        try:
            if delta is not None:
                await queue.put((index, delta))
            async for delta in stream:
                await queue.put((index, delta))
        except APIError as error:  # the engine went away mid-answer: say so, don't cut it short
            await queue.put((index, error))
        finally:
            await queue.put((index, None))

    tasks = [
        asyncio.create_task(pump(i, s, d))
        for i, (s, d) in enumerate(zip(streams, first, strict=True))
    ]
    try:
        for event in shape.opening(len(streams)):
            yield _event(event)
        open_streams, totals = len(streams), [0, 0]
        while open_streams:
            index, delta = await queue.get()
            if delta is None:
                open_streams -= 1
                continue
            if isinstance(delta, APIError):
                yield _event(error_body(delta.status, delta.message, delta.param, delta.code))
                return  # no usage and no [DONE]: the client sees the answer is incomplete
            if delta.finish_reason:
                totals[0] = delta.prompt_tokens
                totals[1] += delta.completion_tokens
            yield _event(shape.chunk(index, delta))
        if include_usage:
            yield _event(shape.usage_chunk(*totals))
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:  # the client left, or we are done: stop every stream (frees slots)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # out of the streams before closing
        for stream in streams:
            await stream.aclose()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Shape:
    """Common parts of the two response shapes."""

    object_name = ""

    def __init__(self, api: _Api, request_id: str, top_logprobs: int | None):
        self.api, self.id, self.top = api, request_id, top_logprobs
        self.created = now()

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.api.model_name}  # fmt: skip

    def _token_text(self, token_id: int) -> str:
        return self.api.tokenizer.decode([token_id])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._head(self.chunk_object) | {
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)
        }  # fmt: skip

    def full(self, results: list[list[RequestOutput]]) -> dict:
        choices = [self._choice(i, deltas) for i, deltas in enumerate(results)]
        last = [d for deltas in results for d in deltas if d.finish_reason]
        prompt = last[0].prompt_tokens if last else 0
        generated = sum(d.completion_tokens for d in last)
        return self._head(self.object_name) | {
            "choices": choices,
            "usage": usage(prompt, generated),
        }


class _CompletionShape(_Shape):
    object_name = chunk_object = "text_completion"

    def __init__(self, api, request_id, top_logprobs, echo_prefix: str):
        super().__init__(api, request_id, top_logprobs)
        self.echo = echo_prefix

    def opening(self, n: int) -> list[dict]:
        if not self.echo:
            return []
        return [self._head(self.chunk_object) | {"choices": [
            {"index": i, "text": self.echo, "logprobs": None, "finish_reason": None}
            for i in range(n)]}]  # fmt: skip

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict | None:
        # Completions' legacy shape: parallel lists, and a {token text: logprob} map per step.
        if self.top is None:
            return None
        tokens = [self._token_text(e.token_id) for e in entries]
        offsets, at = [], offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [
                {self._token_text(t): lp for t, lp in e.top[: self.top]} for e in entries
            ],
            "text_offset": offsets,
        }

    def chunk(self, index: int, delta: RequestOutput) -> dict:
        choice = {"index": index, "text": delta.text,
                  "logprobs": self._logprobs(delta.logprobs or [], 0),
                  "finish_reason": delta.finish_reason}  # fmt: skip
        return self._head(self.chunk_object) | {"choices": [choice]}

    def _choice(self, index: int, deltas: list[RequestOutput]) -> dict:
        text = self.echo + "".join(d.text for d in deltas)
        entries = [e for d in deltas for e in d.logprobs or []]
        finish = next((d.finish_reason for d in deltas if d.finish_reason), None)
        return {"index": index, "text": text, "logprobs": self._logprobs(entries, len(self.echo)),
                "finish_reason": finish}  # fmt: skip


class _ChatShape(_Shape):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def opening(self, n: int) -> list[dict]:
        return [self._head(self.chunk_object) | {"choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(n)]}]  # fmt: skip

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self._token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if self.top is None:
            return None
        return {"content": [
            self._entry(e.token_id, e.logprob)
            | {"top_logprobs": [self._entry(t, lp) for t, lp in e.top[: self.top]]}
            for e in entries
        ], "refusal": None}  # fmt: skip

    def chunk(self, index: int, delta: RequestOutput) -> dict:
        content = {"content": delta.text} if delta.text else {}
        choice = {"index": index, "delta": content, "logprobs": self._logprobs(delta.logprobs or []),
                  "finish_reason": delta.finish_reason}  # fmt: skip
        return self._head(self.chunk_object) | {"choices": [choice]}

    def _choice(self, index: int, deltas: list[RequestOutput]) -> dict:
        message = {"role": "assistant", "content": "".join(d.text for d in deltas),
                   "refusal": None}  # fmt: skip
        finish = next((d.finish_reason for d in deltas if d.finish_reason), None)
        entries = [e for d in deltas for e in d.logprobs or []]
        return {"index": index, "message": message, "logprobs": self._logprobs(entries),
                "finish_reason": finish}  # fmt: skip
