"""AsyncEngine: concurrent streams, cancellation, abort, stats, the queue bound, errors."""

import asyncio
import time

import pytest
from engine_helpers import random_prompts, tiny_model

from lmscale.engine import (
    AsyncEngine,
    EngineConfig,
    GenerationRequest,
    LLMEngine,
    QueueFullError,
    RequestParams,
)  # fmt: skip
from lmscale.errors import LmscaleError

GREEDY = RequestParams(temperature=0, max_new_tokens=20, ignore_eos=True)


async def collect(engine, request):
    """Follow a stream to its end: the outputs, in order."""
    return [out async for out in engine.generate(request)]


async def until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_concurrent_streams_equal_the_synchronous_engine(tiny_tokenizer):
    model = tiny_model()
    prompts = random_prompts([1, 4, 9, 16, 17, 30, 2, 50] * 2, seed=3)
    requests = [GenerationRequest(p, GREEDY, f"r{i}") for i, p in enumerate(prompts)]
    engine = AsyncEngine(model, tiny_tokenizer)

    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    streams = asyncio.run(main())
    engine.close()
    expected = LLMEngine(model, tiny_tokenizer).generate(requests)
    for request, outputs in zip(requests, streams, strict=True):
        want = expected[request.request_id]
        assert [t for out in outputs for t in out.token_ids] == want.token_ids
        assert "".join(out.text for out in outputs) == want.text
        assert [out.finished for out in outputs] == [False] * (len(outputs) - 1) + [True]
        last = outputs[-1]
        assert (last.finish_reason, last.prompt_tokens) == ("length", len(request.prompt_ids))
        assert last.completion_tokens == 20
    assert engine.stats().kv_blocks_used == 0


def test_leaving_a_stream_or_aborting_frees_the_blocks_at_once(tiny_tokenizer):
    engine = AsyncEngine(tiny_model(), tiny_tokenizer, EngineConfig(block_size=4))
    long = RequestParams(temperature=0, max_new_tokens=100, ignore_eos=True)

    async def main():
        for i, close in enumerate((False, True)):
            stream = engine.generate(GenerationRequest(list(range(3, 23)), long, f"left{i}"))
            async for _ in stream:
                assert engine.stats().kv_blocks_used > 0
                break
            if close:
                await stream.aclose()
            del stream  # else the event loop's async-generator hook closes it when collected
            await until(lambda: engine.stats().kv_blocks_used == 0)
            assert engine.stats().num_running == 0

        async def aborted():
            return await collect(engine, GenerationRequest([5, 6, 7], long, "aborted"))

        task = asyncio.create_task(aborted())
        await until(lambda: engine.stats().num_running == 1)
        engine.abort("aborted")
        outputs = await task
        assert outputs[-1].finish_reason == "abort" and len(outputs) < 100
        assert engine.stats().kv_blocks_used == 0

        cancelled = asyncio.create_task(aborted())
        await until(lambda: engine.stats().num_running == 1)
        cancelled.cancel()  # a client that disconnects
        await until(lambda: engine.stats().kv_blocks_used == 0)

    asyncio.run(main())
    engine.close()


def test_stats_queue_bound_and_bad_requests_raise_before_streaming(tiny_tokenizer):
    config = EngineConfig(max_num_seqs=1, max_waiting=2)
    engine = AsyncEngine(tiny_model(), tiny_tokenizer, config)
    slow = RequestParams(temperature=0, max_new_tokens=100, ignore_eos=True)

    async def main():
        streams = []
        with pytest.raises(QueueFullError):
            for i in range(4):  # one runs, two wait: the fourth at the latest finds no room
                streams.append(engine.generate(GenerationRequest([5, 6], slow, f"q{i}")))
        stats = engine.stats()
        assert stats.num_waiting + stats.num_running == len(streams) == 3
        assert stats.kv_blocks_total == engine.engine.cache.allocator.n_blocks
        with pytest.raises(LmscaleError, match="already in use"):
            engine.generate(GenerationRequest([5], slow, "q0"))
        with pytest.raises(LmscaleError, match="context"):
            engine.generate(GenerationRequest(list(range(3, 100)), slow))
        for stream in streams:
            await stream.aclose()
        await until(lambda: engine.stats().num_waiting + engine.stats().num_running == 0)

    asyncio.run(main())
    engine.close()
    with pytest.raises(Exception, match="closed"):
        asyncio.run(collect(engine, GenerationRequest([5], GREEDY)))


def test_an_error_in_the_step_loop_fails_every_stream_instead_of_hanging(tiny_tokenizer):
    engine = AsyncEngine(tiny_model(), tiny_tokenizer)

    def broken():
        raise RuntimeError("boom")

    engine.engine.step = broken
    with pytest.raises(Exception, match="boom"):
        asyncio.run(collect(engine, GenerationRequest([5, 6], GREEDY)))


def test_a_passing_thread_returns_the_result_or_raises_and_is_gone():
    import threading

    from lmscale.engine.async_engine import on_a_passing_thread

    seen = []

    def load(x):
        seen.append(threading.current_thread())
        return x * 2

    assert on_a_passing_thread(load, 21) == 42
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="bad model"):
        on_a_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad model")))
