"""The synchronous engine: batch-independent greedy outputs, preemption, stops, logprobs, limits."""

import pytest
import torch
from engine_helpers import assert_same_greedy, greedy, random_prompts, run_all, tiny_model

from lmscale.engine import (
    EngineConfig,
    GenerationRequest,
    LLMEngine,
    QueueFullError,
    RequestParams,
    SamplingParams,
    generate_ids,
)  # fmt: skip
from lmscale.errors import LmscaleError

LENGTHS = [1, 2, 3, 5, 7, 9, 12, 15, 16, 17, 23, 31, 33, 40, 47, 60]  # 16 prompts


def run_alone(model, tokenizer, prompts, params, config=None):
    """Each prompt through its own engine, one at a time."""
    return [run_all(LLMEngine(model, tokenizer, config), [p], params)[0] for p in prompts]


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_sixteen_concurrent_greedy_requests_equal_one_at_a_time(name, tiny_tokenizer):
    model = tiny_model(name)
    prompts = random_prompts(LENGTHS)
    batched = run_all(LLMEngine(model, tiny_tokenizer), prompts, greedy())
    alone = run_alone(model, tiny_tokenizer, prompts, greedy())
    for prompt, got, want in zip(prompts, batched, alone, strict=True):
        assert got.finish_reason == "length" and len(got.token_ids) == 24
        assert_same_greedy(model, prompt, got.token_ids, want.token_ids)
        # and both match the contiguous-cache generator
        ref = list(generate_ids(model, prompt, SamplingParams(temperature=0, max_new_tokens=24)))
        assert_same_greedy(model, prompt, got.token_ids, ref)
    # with random weights no near-tie occurs: the outputs are exactly equal
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_tiny_block_budget_keeps_greedy_outputs(prefix_caching, tiny_tokenizer):
    model = tiny_model()
    prompts = random_prompts(LENGTHS[::2])
    # 96 positions for 8 requests of up to 71; with prefix caching, a resumed request finds the
    # blocks it computed before it was preempted, if they were not evicted meanwhile
    config = EngineConfig(block_size=4, n_blocks=24, enable_prefix_caching=prefix_caching)
    engine = LLMEngine(model, tiny_tokenizer, config)
    batched = run_all(engine, prompts, greedy())
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().kv_blocks_used == 0
    alone = run_alone(model, tiny_tokenizer, prompts, greedy())
    for prompt, got, want in zip(prompts, batched, alone, strict=True):
        assert_same_greedy(model, prompt, got.token_ids, want.token_ids)
        assert got.completion_tokens == 24


def test_chunked_prefill_under_a_small_token_budget_keeps_greedy_outputs(tiny_tokenizer):
    model = tiny_model()
    prompts = random_prompts([40, 3, 25])
    engine = LLMEngine(model, tiny_tokenizer, EngineConfig(max_num_batched_tokens=8))
    batched = run_all(engine, prompts, greedy(8))
    alone = run_alone(model, tiny_tokenizer, prompts, greedy(8))
    for prompt, got, want in zip(prompts, batched, alone, strict=True):
        assert_same_greedy(model, prompt, got.token_ids, want.token_ids)


def test_blocks_return_to_the_pool_after_finish_and_abort(tiny_tokenizer):
    engine = LLMEngine(tiny_model(), tiny_tokenizer, EngineConfig(block_size=4))
    for i, prompt in enumerate(random_prompts([10, 20, 30])):
        engine.add_request(GenerationRequest(prompt, greedy(30), f"r{i}"))
    engine.step()
    engine.step()
    used = engine.stats().kv_blocks_used
    assert used == 3 + 6 + 8  # ceil((10 + 1) / 4) + ceil(21 / 4) + ceil(31 / 4)
    aborted = engine.abort("r1")
    assert aborted.finished and aborted.finish_reason == "abort"
    assert engine.stats().kv_blocks_used == used - 6
    assert engine.abort("r1") is None and engine.abort("unknown") is None
    while engine.has_unfinished():
        engine.step()
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
    engine.add_request(GenerationRequest([5, 6], greedy(30), "waiting"))
    engine.abort("waiting")  # aborting a request that never ran
    assert not engine.has_unfinished() and engine.stats().kv_blocks_used == 0


def test_max_tokens_ends_with_length_and_usage_counts(tiny_tokenizer):
    engine = LLMEngine(tiny_model(), tiny_tokenizer)
    [out] = run_all(engine, random_prompts([7]), greedy(5))
    assert (out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("length", 7, 5)
    assert out.text == tiny_tokenizer.decode(out.token_ids)


def test_stop_strings_cut_the_text_and_end_the_request(tiny_tokenizer):
    model = tiny_model()
    prompt = random_prompts([9])[0]
    [full] = run_all(LLMEngine(model, tiny_tokenizer), [prompt], greedy(40))
    # random weights emit stray bytes too (shown as U+FFFD): stop at clean text past the middle
    middle = len(full.text) // 2
    start = next(i for i in range(middle, len(full.text)) if "\ufffd" not in full.text[i : i + 3])
    stop = full.text[start : start + 3]
    cut = full.text.index(stop)
    assert 0 < cut < len(full.text) - 3
    engine = LLMEngine(model, tiny_tokenizer)
    engine.add_request(GenerationRequest(prompt, greedy(40, stop=["never seen", stop]), "s"))
    pieces = []
    while engine.has_unfinished():
        pieces += [out for out in engine.step()]
    assert "".join(p.text for p in pieces) == full.text[:cut]
    assert all(stop not in p.text for p in pieces)
    assert pieces[-1].finish_reason == "stop" and pieces[-1].finished
    assert engine.stats().kv_blocks_used == 0


def test_stop_token_ids_end_the_request_without_being_output(tiny_tokenizer):
    model = tiny_model()
    prompt = random_prompts([9])[0]
    [full] = run_all(LLMEngine(model, tiny_tokenizer), [prompt], greedy(20))
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)
    [out] = run_all(
        LLMEngine(model, tiny_tokenizer), [prompt], greedy(20, stop_token_ids=[stop_id])
    )
    assert out.token_ids == full.token_ids[:first] and out.finish_reason == "stop"
    assert out.completion_tokens == first + 1  # the stop token counts as generated
    # the tokenizer's end ids stop generation unless ignore_eos is set
    eos = tiny_tokenizer.eos_id
    engine = LLMEngine(model, tiny_tokenizer)
    assert eos in engine_stop_ids(
        engine, RequestParams(max_new_tokens=4)
    ) and eos not in engine_stop_ids(engine, RequestParams(ignore_eos=True, max_new_tokens=4))


def engine_stop_ids(engine, params):
    engine.add_request(GenerationRequest([5], params, "probe"))
    request = engine.scheduler.waiting[-1]
    engine.abort("probe")
    return request.stop_ids


def test_seeded_sampling_gives_the_same_text_alone_and_in_a_batch(tiny_tokenizer):
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    seeded = RequestParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=20)
    alone = run_all(LLMEngine(model, tiny_tokenizer), [prompts[5]], seeded)[0]
    engine = LLMEngine(model, tiny_tokenizer)
    others = [RequestParams(temperature=1.0, seed=i, max_new_tokens=20) for i in range(15)]
    requests = [GenerationRequest(p, params, str(i)) for i, (p, params) in
                enumerate(zip(prompts[:5] + prompts[6:], others, strict=True))]  # fmt: skip
    requests.insert(8, GenerationRequest(prompts[5], seeded, "seeded"))
    together = engine.generate(requests)["seeded"]
    assert together.token_ids == alone.token_ids and together.text == alone.text
    again = run_all(LLMEngine(model, tiny_tokenizer), [prompts[5]], seeded)[0]
    assert again.token_ids == alone.token_ids


def test_logprobs_match_log_softmax_of_a_plain_forward(tiny_tokenizer):
    model = tiny_model()
    prompts = random_prompts([6, 13])
    outs = run_all(LLMEngine(model, tiny_tokenizer), prompts, greedy(6, logprobs=3))
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.logprobs) == len(out.token_ids) == 6
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + out.token_ids]))[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float(), dim=-1)  # (6, vocab)
        for step, entry in zip(expected, out.logprobs, strict=True):
            assert entry.logprob == pytest.approx(float(step[entry.token_id]), abs=1e-4)
            top = step.topk(3)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert entry.top[0][0] == entry.token_id  # greedy picks the best
    [plain] = run_all(LLMEngine(model, tiny_tokenizer), prompts[:1], greedy(2))
    assert plain.logprobs is None
    [chosen_only] = run_all(LLMEngine(model, tiny_tokenizer), prompts[:1], greedy(2, logprobs=0))
    assert [e.top for e in chosen_only.logprobs] == [[], []]


def test_requests_that_can_never_fit_are_rejected_at_submission(tiny_tokenizer):
    engine = LLMEngine(tiny_model(), tiny_tokenizer, EngineConfig(block_size=4, n_blocks=8))
    with pytest.raises(LmscaleError, match="context of 128"):
        engine.add_request(GenerationRequest(list(range(3, 103)), greedy(29)))
    with pytest.raises(LmscaleError, match="KV cache"):
        engine.add_request(GenerationRequest(list(range(3, 33)), greedy(4)))  # 33 > 32 positions
    with pytest.raises(LmscaleError, match="empty"):
        engine.add_request(GenerationRequest([], greedy()))
    with pytest.raises(LmscaleError, match="outside"):
        engine.add_request(GenerationRequest([5, 512], greedy()))
    with pytest.raises(LmscaleError, match="max_tokens"):
        RequestParams(max_new_tokens=0)
    engine.add_request(GenerationRequest(list(range(3, 32)), greedy(4)))  # exactly fits
    assert not engine.scheduler.running and engine.stats().kv_blocks_used == 0


def test_a_full_waiting_queue_raises_queue_full(tiny_tokenizer):
    engine = LLMEngine(tiny_model(), tiny_tokenizer, EngineConfig(max_waiting=2))
    engine.add_request(GenerationRequest([5, 6, 7], greedy()))
    engine.add_request(GenerationRequest([5, 6, 7], greedy()))
    with pytest.raises(QueueFullError):
        engine.add_request(GenerationRequest([5, 6, 7], greedy()))
    engine.step()  # both start running: the queue has room again
    engine.add_request(GenerationRequest([5, 6, 7], greedy()))
