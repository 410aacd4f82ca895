"""The compiled decode step: the same greedy tokens as the eager path, in every form it runs.

Each test compiles real graphs with inductor (a few seconds each on the tiny models, once per
graph family and process); the on-disk compile cache goes to a temporary folder.
"""

import asyncio
import time

import pytest
import torch
from engine_helpers import assert_same_greedy, random_prompts, tiny_model

from lmscale.checkpoint import load_pretrained
from lmscale.compress import QuantConfig, quantize_
from lmscale.engine import (
    AsyncEngine,
    ChatSession,
    EngineConfig,
    GenerationRequest,
    LLMEngine,
    RequestParams,
    SamplingParams,
    generate_ids,
)  # fmt: skip
from lmscale.engine.decode_step import DecodeStep, batch_bucket
from lmscale.model import Transformer, preset
from lmscale.model.quantized import QuantizedEmbedding, QuantizedLinear

LENGTHS = [1, 3, 9, 16, 17, 33, 40, 60]


@pytest.fixture(autouse=True, scope="module")
def compile_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


def greedy(n=20):
    return RequestParams(temperature=0, max_new_tokens=n, ignore_eos=True)


def run_all(engine, prompts, params):
    """Every prompt at once; with a list of params, one each (so the batch shrinks as they end)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    requests = [
        GenerationRequest(p, q, str(i))
        for i, (p, q) in enumerate(zip(prompts, params, strict=True))
    ]
    out = engine.generate(requests)
    return [out[str(i)].token_ids for i in range(len(prompts))]


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_compiled_engine_equals_the_eager_engine(name, tiny_tokenizer):
    model = tiny_model(name)
    prompts = random_prompts(LENGTHS)
    params = [greedy(20 - 2 * i) for i in range(len(prompts))]
    eager = run_all(LLMEngine(model, tiny_tokenizer), prompts, params)
    compiled_engine = LLMEngine(model, tiny_tokenizer, EngineConfig(compiled_decode=True))
    compiled = run_all(compiled_engine, prompts, params)
    for i, (prompt, got, want) in enumerate(zip(prompts, compiled, eager, strict=True)):
        assert len(got) == 20 - 2 * i
        assert_same_greedy(model, prompt, got, want)
    # the batch shrank 8 -> 1 as requests finished: every family ran compiled
    assert set(compiled_engine.runner.step.compile_seconds) == {(1, False), (4, False), (8, False)}


def test_compiled_engine_is_batch_invariant_under_preemption_and_chunked_prefill(tiny_tokenizer):
    model = tiny_model()
    prompts = random_prompts(LENGTHS, seed=1)
    config = EngineConfig(compiled_decode=True, n_blocks=12, max_num_batched_tokens=24)
    engine = LLMEngine(model, tiny_tokenizer, config)
    batched = run_all(engine, prompts, greedy())
    assert engine.scheduler.num_preemptions > 0
    alone = [run_all(engine, [p], greedy())[0] for p in prompts]
    assert batched == alone


def test_generate_with_the_compiled_step_equals_eager(tiny_tokenizer):
    model = tiny_model()
    step = DecodeStep(model)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    for prompt in random_prompts([1, 7, 50]):
        got = list(generate_ids(model, prompt, params, step=step))
        want = list(generate_ids(model, prompt, params))
        assert_same_greedy(model, prompt, got, want)
    seeded = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=30, seed=3)
    prompt = random_prompts([5])[0]
    assert list(generate_ids(model, prompt, seeded, step=step)) == list(
        generate_ids(model, prompt, seeded)
    )
    assert set(step.compile_seconds) == {(1, True)}  # caches of any length share one graph
    assert step.graphs_compiled == 1  # dynamo did not recompile it either


@torch.inference_mode()
def test_a_step_at_the_last_position_of_a_contiguous_cache_runs_without_a_graph_of_its_own():
    """Reading every key of a contiguous cache would be a second graph: that step runs eagerly."""
    model = tiny_model()
    step = DecodeStep(model)
    prompt = random_prompts([9])[0]
    cache = model.new_cache(1, 10)
    model.hidden_states(torch.tensor([prompt]), cache)
    pools = list(cache.k.unbind(0)), list(cache.v.unbind(0))
    logits = step([7], [9], [[0]], *pools, contiguous=True)  # position 9 of 0..9
    want = model(torch.tensor([prompt + [7]]))[0, -1].float()
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-4)
    assert step.graphs_compiled == 0


def test_a_chat_through_the_compiled_step_equals_the_eager_chat():
    """Turns reuse the cache's prefix and grow it; the compiled step follows every length."""
    _, tokenizer = load_pretrained("smollm2-135m-instruct")  # its chat template and vocabulary
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=2048, init_std=0.5)
    model = Transformer(config).eval()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    step = DecodeStep(model)
    sessions = [ChatSession(model, tokenizer, params, step=s) for s in (step, None)]
    for turn in ("Hello there.", "Tell me more, please." * 100, "And then?"):
        compiled, eager = ("".join(session.reply(turn)) for session in sessions)
        assert compiled == eager
    assert sessions[0].cache.max_len > 512  # the long turn grew the cache past its first size
    assert step.graphs_compiled == 1


def q8_0_table(embedding: torch.nn.Embedding) -> QuantizedEmbedding:
    """The table as a GGUF's Q8_0 holds it: int8 codes, one float16 scale per 32 values."""
    weight = embedding.weight.detach()
    groups = weight.view(weight.shape[0], -1, 32)
    scales = (groups.abs().amax(-1) / 127).half().float()
    q = torch.round(groups / scales[..., None]).clamp(-127, 127).view_as(weight)
    table = QuantizedEmbedding(*weight.shape, "int8", 32)
    table.table = QuantizedLinear.from_codes(q, scales, None, "int8", 32)
    return table


def test_generate_with_the_compiled_step_equals_eager_on_int4_layers_and_a_q8_0_table(
    tiny_tokenizer, float_activations
):  # fmt: skip
    """The form of the bundled GGUF kept quantized: Q4_1 layers, a tied Q8_0 table."""
    model = tiny_model()
    quantize_(model, QuantConfig("int4", 32, zero_point="float"))
    model.tok_embeddings = q8_0_table(model.tok_embeddings)
    model.output = model.tok_embeddings.table
    step = DecodeStep(model)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    for prompt in random_prompts([1, 20]):
        got = list(generate_ids(model, prompt, params, step=step))
        want = list(generate_ids(model, prompt, params))
        assert_same_greedy(model, prompt, got, want)
    assert set(step.compile_seconds) == {(1, True)}
    # each block's q/k/v and gate/up ran as one kernel call each (`lmscale.kernels.fusion`)
    with torch.profiler.profile() as profile:
        list(
            generate_ids(model, prompt, SamplingParams(temperature=0, max_new_tokens=4), step=step)
        )
    calls = {event.key: event.count for event in profile.key_averages()}
    assert "TorchDynamo Cache Lookup" not in calls  # called without dynamo (`DirectGraph`)
    per_step = 2 * model.config.n_layers  # the 20-token prefill runs PyTorch's kernel, eagerly
    assert calls["lmscale::int4_matvec_cat"] == calls["lmscale::int4_matvec"] == 3 * per_step


def test_background_warm_up_serves_eagerly_until_the_graphs_are_ready(tiny_tokenizer):
    model = tiny_model()
    engine = LLMEngine(model, tiny_tokenizer, EngineConfig(compiled_decode=True))
    thread = engine.warm_up(background=True)
    prompts = random_prompts([4, 8])
    during = run_all(engine, prompts, greedy())  # correct whichever path each step took
    thread.join()
    assert all(engine.runner.step.is_ready(n) for n in (1, 2, 3, 4, 5, 8, 30))
    assert engine.runner.compile_inline
    after = run_all(engine, prompts, greedy())
    for prompt, got, want in zip(prompts, after, during, strict=True):
        assert_same_greedy(model, prompt, got, want)


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_async_engine_compiles_in_the_background_after_its_first_request(tiny_tokenizer):
    engine = AsyncEngine(tiny_model(), tiny_tokenizer, EngineConfig(compiled_decode=True))
    engine.warm_up()
    assert engine.stats().decode_compiled == 0  # nothing compiles before a request

    async def one(prompt):
        return [out async for out in engine.generate(GenerationRequest(prompt, greedy(8)))]

    try:
        first = asyncio.run(one(random_prompts([6])[0]))
        assert first[-1].finished
        deadline = time.monotonic() + 300
        while not engine.stats().decode_compiled:
            assert time.monotonic() < deadline, "the graphs never became ready"
            time.sleep(0.2)
        assert engine.engine.runner.step.is_ready(1)
    finally:
        engine.close()
