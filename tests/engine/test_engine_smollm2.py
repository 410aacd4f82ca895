"""End to end with the bundled SmolLM2: chat prompts through the async engine, greedy, fp32."""

import asyncio

import pytest
import torch
from engine_helpers import assert_same_greedy

from lmscale.checkpoint import load_pretrained
from lmscale.engine import (
    AsyncEngine,
    GenerationRequest,
    RequestParams,
    SamplingParams,
    generate_ids,
)

QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread is steadier
    yield load_pretrained("smollm2-135m-instruct", dtype=torch.float32)
    torch.set_num_threads(threads)


def test_chat_prompts_through_the_engine_equal_generate_ids(smollm):
    model, tokenizer = smollm
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}]), add_bos=False
        )
        for q in QUESTIONS
    ]
    params = RequestParams(temperature=0, max_new_tokens=16)
    engine = AsyncEngine(model, tokenizer)

    async def follow(prompt):
        outputs = [out async for out in engine.generate(GenerationRequest(prompt, params))]
        ids = [t for out in outputs for t in out.token_ids]
        return ids, "".join(out.text for out in outputs), outputs[-1]

    async def main():
        return await asyncio.gather(*(follow(p) for p in prompts))

    results = asyncio.run(main())
    engine.close()
    for prompt, (ids, text, last) in zip(prompts, results, strict=True):
        want = list(
            generate_ids(
                model, prompt, SamplingParams(temperature=0, max_new_tokens=16),
                tokenizer.end_of_turn_ids,
            )
        )  # fmt: skip
        assert_same_greedy(model, prompt, ids, want)
        assert text == tokenizer.decode(ids) and "<|im_end|>" not in text
        assert last.finish_reason == ("length" if len(ids) == 16 else "stop")
    assert "Paris" in results[0][1]


def test_compiled_decode_equals_eager_generation_with_and_without_prefix_hits(smollm):
    """The compiled step on the real model: greedy fp32 tokens equal the eager path's (near-tie
    rule), for a batch of chat prompts and for a repeat of one (a prefix-cache hit)."""
    from lmscale.engine import EngineConfig, LLMEngine

    model, tokenizer = smollm
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}]), add_bos=False
        )
        for q in QUESTIONS * 2  # the repeats find their prompts' blocks cached
    ]
    eager = [
        list(generate_ids(model, p, SamplingParams(temperature=0, max_new_tokens=12)))
        for p in prompts[:2]
    ]
    engine = LLMEngine(model, tokenizer, EngineConfig(compiled_decode=True))
    params = RequestParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    first = engine.generate(
        [GenerationRequest(p, params, str(i)) for i, p in enumerate(prompts[:2])]
    )
    again = engine.generate(
        [GenerationRequest(p, params, f"r{i}") for i, p in enumerate(prompts[2:])]
    )
    assert engine.stats().prefix_cache_hits > 0
    for i, prompt in enumerate(prompts[:2]):
        assert_same_greedy(model, prompt, first[str(i)].token_ids, eager[i])
        assert again[f"r{i}"].token_ids == first[str(i)].token_ids
