"""The official `openai` client against a real server: plain and streaming, both endpoints."""

import concurrent.futures

import openai
import pytest
from conftest import MODEL

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_plain_and_streaming_agree(client):
    plain = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=20
    )
    answer = plain.choices[0].message.content
    assert "Paris" in answer and plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens <= 20 and plain.usage.prompt_tokens > 5
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=20, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_plain_and_streaming_agree_and_stop_at_length(client):
    plain = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0
    )
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text


def test_stop_strings_seed_and_n(client):
    out = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"]
    )
    assert out.choices[0].finish_reason == "stop" and " 7" not in out.choices[0].text
    sampled = [
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=1.0, seed=7, max_tokens=12, n=2
        )
        for _ in range(2)
    ]
    texts = [[c.message.content for c in r.choices] for r in sampled]
    assert texts[0] == texts[1] and len(texts[0]) == 2  # seeded: reproducible


def test_logprobs_have_openais_shape(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
        assert bytes(entry.bytes).decode() == entry.token
    legacy = (
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2
        )
        .choices[0]
        .logprobs
    )
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 4
    assert all(len(top) <= 2 for top in legacy.top_logprobs)
    assert (
        "".join(legacy.tokens)
        == client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        .choices[0]
        .text
    )


PROMPTS = [
    "Name a colour.", "What is 2 + 2?", "Say hello in French.", "Write a haiku about rain.",
    "What is the largest planet?", "Give me a synonym for happy.", "Count to five.",
    "What do bees make?", "Who wrote Hamlet?", "What is water made of?", "Name a fruit.",
    "What is the opposite of cold?", "Spell cat backwards.", "What colour is the sky?",
    "How many legs does a spider have?", "Translate 'thank you' into Spanish.",
]  # fmt: skip


def test_16_concurrent_streams_equal_the_same_requests_one_at_a_time(client):
    def ask(prompt: str):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=24, stream=True, logprobs=True, top_logprobs=2,
        )  # fmt: skip
        entries = [
            e
            for c in stream
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content
        ]
        return entries

    alone = [ask(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, PROMPTS))
    for prompt, a, b in zip(PROMPTS, alone, together, strict=True):
        tokens_a, tokens_b = [e.token for e in a], [e.token for e in b]
        if tokens_a == tokens_b:
            continue
        first = next(i for i, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=False)) if x != y)
        top = a[first].top_logprobs
        gap = top[0].logprob - top[1].logprob
        assert gap < 1e-3, f"{prompt!r}: batched output differs at token {first} (gap {gap})"
