"""The engine's step loop: schedule, run the model, sample, detokenize, report (synchronous).

`LLMEngine.step()` is one iteration of continuous batching. Prefilling rows and decoding rows run
as two forward passes: a decode pass has one token per row and takes the model's fast
single-query attention, while padding it to a prefill's length would multiply its cost.
`AsyncEngine` drives this from a background thread for asyncio callers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscale.engine.config import EngineConfig
from lmscale.engine.decode_step import DecodeStep
from lmscale.engine.detokenize import TextStream
from lmscale.engine.paged_cache import PagedKVCache, blocks_for
from lmscale.engine.request import (
    GenerationRequest,
    QueueFullError,
    Request,
    RequestOutput,
    RequestParams,
    TokenLogprob,
)
from lmscale.engine.runner import ModelRunner
from lmscale.engine.sampling import sample_next
from lmscale.engine.scheduler import Scheduler
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer


@dataclass
class EngineStats:
    """A snapshot for metrics."""

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    num_preemptions: int
    """Preemptions since the engine started."""
    prompt_tokens_total: int
    """Prompt tokens of the requests admitted since the engine started."""
    generation_tokens_total: int
    """Tokens generated since the engine started."""
    prefix_cache_queries: int
    """Tokens of the requests admitted since the engine started, looked up in the prefix cache
    (0 with prefix caching off)."""
    prefix_cache_hits: int
    """Of those, tokens found cached: their keys and values were reused, not computed."""
    decode_compiled: int = 0
    """1 once every graph of the compiled decode step is ready (0 while compiling, or eager)."""
    max_num_seqs: int = 0
    """The most requests the running batch may hold: `num_running / max_num_seqs` is its
    occupancy."""
    token_budget: int = 0
    """Tokens one step may compute (`max_num_batched_tokens`)."""
    steps: int = 0
    """Steps run since the engine started."""
    step_tokens: int = 0
    """Tokens computed in those steps (prompt tokens prefilled plus one per decoding row)."""
    gpu_memory_allocated: int = 0
    """Bytes of CUDA memory in tensors on the model's device (0 on the CPU)."""
    gpu_memory_reserved: int = 0
    """Bytes of CUDA memory held by torch's caching allocator (0 on the CPU)."""
    probe_loss: float | None = None
    """The quality probe's latest mean per-token loss (see `lmscale.engine.quality`)."""
    probe_timestamp: float | None = None
    probe_runs: int = 0
    prompt_loss_nats: float = 0.0
    prompt_loss_tokens: int = 0
    recent_prompt_loss: float | None = None


COUNTERS = (
    "num_preemptions", "prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries",
    "prefix_cache_hits", "steps", "step_tokens", "probe_runs", "prompt_loss_nats",
    "prompt_loss_tokens",
)  # fmt: skip
"""The `EngineStats` fields that only grow: totals since the engine started."""


class LLMEngine:
    """Continuous batching over a paged KV cache, for one model on one device.

    Args:
        model: a model in eval mode (its dtype and device are the KV pool's).
        tokenizer: its tokenizer (output text, stop strings, default stop ids).
        config: budgets; the defaults suit a small model on a CPU.
    """

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        mc, param = model.config, model.tok_embeddings.weight
        self.cache = PagedKVCache(
            mc.n_layers, mc.n_kv_heads, mc.head_dim, self._pool_blocks(), config.block_size,
            dtype=param.dtype, device=param.device,
        )  # fmt: skip
        self.scheduler = Scheduler(config, self.cache.allocator)
        step = (
            DecodeStep(model, verbose=config.compiled_decode_verbose)
            if config.compiled_decode
            else None
        )
        self.runner = ModelRunner(model, self.cache, step)
        self._texts: dict[str, TextStream] = {}
        self._prompt_tokens = self._generated_tokens = 0
        self._steps = self._step_tokens = 0

    def _pool_blocks(self) -> int:
        """Blocks that fit the memory budget, but no more than a full batch of full contexts."""
        cfg, mc = self.config, self.model.config
        if cfg.n_blocks is not None:
            return cfg.n_blocks
        dtype = self.model.tok_embeddings.weight.dtype
        per_block = PagedKVCache.bytes_per_block(
            mc.n_layers, mc.n_kv_heads, mc.head_dim, cfg.block_size, dtype
        )
        enough = cfg.max_num_seqs * blocks_for(mc.max_seq_len, cfg.block_size)
        return max(1, min(cfg.kv_cache_bytes // per_block, enough))

    def check(self, request: GenerationRequest) -> RequestParams:
        """Raise `LmscaleError` if the request can never be served; return its parameters."""
        params = RequestParams.of(request.params)
        prompt, limit = request.prompt_ids, self.model.config.max_seq_len
        if not prompt:
            raise LmscaleError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise LmscaleError(f"the prompt holds token ids outside [0, {vocab})")
        total = len(prompt) + params.max_new_tokens
        if total > limit:
            raise LmscaleError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_new_tokens}) "
                f"is {total} tokens, more than the model's context of {limit}"
            )
        # NOTE: the last generated token is never fed back, so it needs no cache position.
        needed = blocks_for(total - 1, self.config.block_size)
        if needed > self.cache.allocator.n_blocks:
            raise LmscaleError(
                f"the request needs {total - 1} cached positions, more than the KV cache's "
                f"{self.cache.allocator.n_blocks * self.config.block_size}"
            )
        return params

    def check_queue(self, extra: int = 0) -> None:
        """Raise `QueueFullError` if `max_waiting` requests (plus `extra` on their way) wait.

        Preempted requests waiting to resume count too: a pool under pressure refuses new work.
        """
        if len(self.scheduler.waiting) + extra >= self.config.max_waiting:
            raise QueueFullError(f"{self.config.max_waiting} requests are already waiting")

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request.

        Raises:
            LmscaleError: it can never be served (empty, too long for the context or the pool).
            QueueFullError: `max_waiting` requests are already waiting.
        """
        self.check(request)
        self.check_queue()
        self.enqueue(request)

    def enqueue(self, request: GenerationRequest) -> None:
        """Queue a request that passed `check`, without the queue bound (the caller applied it)."""
        params = RequestParams.of(request.params)
        if request.request_id in self._texts:
            raise LmscaleError(f"request id {request.request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.end_of_turn_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        self._prompt_tokens += len(request.prompt_ids)
        self.scheduler.add(
            Request(
                request.request_id, list(request.prompt_ids), params, frozenset(stop_ids),
                generator=generator,
            )
        )  # fmt: skip
        self._texts[request.request_id] = TextStream(self.tokenizer.decode, params.stop or ())

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks at once; its final output, or None if unknown."""
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        return self._finish(request, [], "", [], "abort")

    def warm_up(self, background: bool = False) -> threading.Thread | None:
        """Compile the decode step's graphs now (no-op without `compiled_decode`).

        Args:
            background: compile in a daemon thread and return it; decode batches whose graph
                is not ready yet run eagerly meanwhile, so a server answers from its first second.
        """
        step = self.runner.step
        if step is None:
            return None
        pool = self.cache.k[0]
        shape = (3, *pool.shape[1:])

        def compile_all() -> None:
            try:
                step.warm_up(shape, len(self.cache.k), pool.dtype)
            finally:
                self.runner.compile_inline = True

        if not background:
            compile_all()
            return None
        self.runner.compile_inline = False
        thread = threading.Thread(target=compile_all, name="lmscale-compile", daemon=True)
        thread.start()
        return thread

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step of the batch.

        Returns:
            An output for every request that generated a token this step (a request in the middle
            of a chunked prefill produces none).
        """
        batch = self.scheduler.schedule()
        self._steps += 1
        self._step_tokens += sum(batch.n_tokens)
        prefill = [(r, n) for r, n in zip(batch.requests, batch.n_tokens, strict=True) if n > 1]
        decode = [(r, n) for r, n in zip(batch.requests, batch.n_tokens, strict=True) if n == 1]
        outputs = []
        for group in (prefill, decode):
            if not group:
                continue
            requests, n_tokens = zip(*group, strict=True)
            logits = self.runner.run(requests, n_tokens)  # (B, vocab)
            for request, n, row in zip(requests, n_tokens, logits, strict=True):
                request.num_computed += n
                self.scheduler.cache_full_blocks(request)
                if request.num_computed == request.num_tokens:  # else: a prompt chunk
                    outputs.append(self._next_token(request, row))
        return outputs

    def _next_token(self, request: Request, logits: Tensor) -> RequestOutput:
        """Sample a request's next token from its (vocab,) logits and check every stop rule."""
        params = request.params
        token = int(sample_next(logits[None], params, request.generator))
        logprobs = (
            [_logprobs(logits, token, params.logprobs)] if params.logprobs is not None else []
        )
        self._generated_tokens += 1
        text = self._texts[request.request_id]
        if token in request.stop_ids:
            return self._finish(request, [], text.flush(), [], "stop", stop_token=True)
        request.output_ids.append(token)
        piece, stopped = text.push(token)
        if stopped:
            return self._finish(request, [token], piece, logprobs, "stop")
        if len(request.output_ids) >= params.max_new_tokens:
            return self._finish(request, [token], piece + text.flush(), logprobs, "length")
        return self._output(request, [token], piece, logprobs, None)

    def _finish(
        self, request: Request, ids: list[int], text: str, logprobs: list[TokenLogprob],
        reason: str, stop_token: bool = False,
    ) -> RequestOutput:  # fmt: skip
        if request in self.scheduler.running:
            self.scheduler.finish(request)
        del self._texts[request.request_id]
        return self._output(request, ids, text, logprobs, reason, stop_token)

    def _output(
        self, request: Request, ids: list[int], text: str, logprobs: list[TokenLogprob],
        reason: str | None, stop_token: bool = False,
    ) -> RequestOutput:  # fmt: skip
        return RequestOutput(
            request.request_id, ids, text,
            logprobs if request.params.logprobs is not None else None,
            reason is not None, reason, len(request.prompt_ids),
            len(request.output_ids) + stop_token,
        )  # fmt: skip

    def stats(self) -> EngineStats:
        allocator, device = self.cache.allocator, self.runner.device
        on_gpu = device.type == "cuda"
        return EngineStats(
            len(self.scheduler.waiting), len(self.scheduler.running), allocator.n_used,
            allocator.n_blocks, self.config.block_size, self.scheduler.num_preemptions,
            self._prompt_tokens, self._generated_tokens,
            self.scheduler.prefix_cache_queries, self.scheduler.prefix_cache_hits,
            int(self.runner.step is not None and self.runner.compile_inline),
            self.config.max_num_seqs, self.config.max_num_batched_tokens,
            self._steps, self._step_tokens,
            torch.cuda.memory_allocated(device) if on_gpu else 0,
            torch.cuda.memory_reserved(device) if on_gpu else 0,
        )  # fmt: skip

    def generate(self, requests: Iterable[GenerationRequest]) -> dict[str, RequestOutput]:
        """Run requests to completion (offline batch use); each one's outputs merged into one.

        Returns:
            request id -> an output whose ids, text and logprobs are the whole completion.
        """
        merged: dict[str, RequestOutput] = {}
        for request in requests:
            self.add_request(request)
        while self.has_unfinished():
            for out in self.step():
                merged[out.request_id] = merge(merged.get(out.request_id), out)
        return merged


def merge(done: RequestOutput | None, new: RequestOutput) -> RequestOutput:
    """`done` followed by the delta `new`: ids, text and logprobs concatenated."""
    if done is None:
        return new
    logprobs = None if done.logprobs is None else done.logprobs + (new.logprobs or [])
    return RequestOutput(
        new.request_id, done.token_ids + new.token_ids, done.text + new.text, logprobs,
        new.finished, new.finish_reason, new.prompt_tokens, new.completion_tokens,
    )  # fmt: skip


def _logprobs(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's and the `top` best tokens' log-probabilities under the raw logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
    best = logprobs.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else []
    return TokenLogprob(token, float(logprobs[token]), pairs)
