"""Automatic prefix caching: the allocator's references, keys and LRU list; hits in the engine give
the same greedy tokens as computing everything, with the cache off, evicted or preempted."""

import pytest
from engine_helpers import assert_same_greedy, greedy, random_prompts, run_all, tiny_model

from lmscale.engine import EngineConfig, GenerationRequest, LLMEngine
from lmscale.engine.paged_cache import BlockAllocator
from lmscale.engine.prefix_cache import PrefixCache, block_key
from lmscale.engine.request import Request, RequestParams

A, B, C = (1,) * 4, (2,) * 4, (3,) * 4  # token ids of three full blocks of 4


def test_a_shared_block_is_freed_only_by_its_last_holder():
    allocator = BlockAllocator(4)
    [block] = allocator.allocate(1)
    allocator.share([block])
    assert allocator.refcount(block) == 2 and allocator.n_free == 3
    allocator.free([block])
    assert allocator.refcount(block) == 1 and allocator.n_free == 3
    allocator.free([block])
    assert allocator.refcount(block) == 0 and allocator.n_free == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        allocator.free([block])
    with pytest.raises(RuntimeError, match="nothing to share"):
        allocator.share([block])  # a plain free block holds nothing worth sharing


def test_a_cached_block_outlives_its_holders_and_counts_as_free():
    allocator = BlockAllocator(4)
    block = allocator.allocate(1)[0]
    key = block_key(None, A)
    assert allocator.cache(block, key, A)
    allocator.free([block])
    assert (allocator.n_free, allocator.n_used, allocator.n_cached) == (4, 0, 1)
    assert allocator.lookup(key, A) == block
    assert allocator.lookup(key, B) is None  # same key, other tokens: never served
    assert allocator.lookup(block_key(None, B), B) is None
    allocator.share([block])  # taken back from the evictable list, contents intact
    assert (allocator.n_free, allocator.refcount(block)) == (3, 1)
    allocator.free([block])
    assert allocator.n_free == 4


def test_allocation_takes_plain_blocks_first_then_evicts_the_least_recently_used():
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(3)
    keys = [block_key(None, t) for t in (A, B, C)]
    for block, key, tokens in zip(blocks, keys, (A, B, C), strict=True):
        allocator.cache(block, key, tokens)
    allocator.free(blocks[2:])  # C's block leaves first: the least recently used
    allocator.free(blocks[:2])  # freed last block first: B's, then A's (a prefix's head last)
    plain = allocator.allocate(1)
    assert plain[0] not in blocks and allocator.num_evictions == 0
    assert allocator.allocate(2) == [blocks[2], blocks[1]]
    assert allocator.num_evictions == 2 and allocator.n_cached == 1
    assert allocator.lookup(keys[0], A) == blocks[0]
    assert allocator.lookup(keys[2], C) is None and allocator.lookup(keys[1], B) is None


def test_a_second_block_for_the_same_key_is_not_cached():
    allocator = BlockAllocator(4)
    first, second = allocator.allocate(2)
    key = block_key(None, A)
    assert allocator.cache(first, key, A)
    assert not allocator.cache(second, key, A)  # computed concurrently: the first one stays
    allocator.free([first, second])
    assert allocator.lookup(key, A) == first and allocator.n_cached == 1
    assert allocator.n_free == 4


def test_keys_chain_the_whole_prefix_and_a_match_never_covers_the_last_token():
    assert block_key(None, B) != block_key(block_key(None, A), B)  # same tokens, other prefix
    allocator = BlockAllocator(8)
    cache = PrefixCache(allocator, block_size=4)
    request = Request("r", list(A + B + C), RequestParams(), frozenset())
    request.blocks, request.num_computed = allocator.allocate(3), 12
    cache.register(request)
    assert len(request.block_keys) == 3 and allocator.n_cached == 3
    for ids, hits in [
        (A + B + C + (9,), 3),  # everything cached and one token left to compute
        (A + B + C, 2),  # the last token's block is computed again for its logits
        (A + (7,) * 4 + C + (9,), 1),  # a miss ends the match, though C's block is cached
        (B + C + (9,), 0),  # C's block is cached only after A and B
    ]:
        blocks, keys = cache.match(list(ids))
        assert blocks == request.blocks[:hits] and keys == request.block_keys[:hits]


def submit_one_by_one(engine, prompts, params):
    """Each prompt run to the end before the next is submitted; completions and hit tokens."""
    outs, hits = [], []
    for i, prompt in enumerate(prompts):
        before = engine.stats().prefix_cache_hits
        outs.append(engine.generate([GenerationRequest(prompt, params, str(i))])[str(i)])
        hits.append(engine.stats().prefix_cache_hits - before)
    return outs, hits


def check_against_no_caching(model, tokenizer, prompts, params, **config):
    """Run `prompts` one by one with prefix caching on and off: the same greedy tokens.

    Returns:
        The engine with caching on (every block back in its pool) and each prompt's hit tokens.
    """
    engine = LLMEngine(model, tokenizer, EngineConfig(**config))
    got, hits = submit_one_by_one(engine, prompts, params)
    off = LLMEngine(model, tokenizer, EngineConfig(**config, enable_prefix_caching=False))
    want, no_hits = submit_one_by_one(off, prompts, params)
    for prompt, g, w in zip(prompts, got, want, strict=True):
        assert_same_greedy(model, prompt, g.token_ids, w.token_ids)
    assert no_hits == [0] * len(prompts) and off.stats().prefix_cache_queries == 0
    allocator = engine.cache.allocator
    assert allocator.n_free == allocator.n_blocks and engine.stats().kv_blocks_used == 0
    return engine, hits


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_a_shared_prefix_is_found_and_gives_the_same_greedy_tokens(name, tiny_tokenizer):
    model = tiny_model(name)
    prefix, tail_a, tail_b = random_prompts([50, 7, 9])
    prompts = [prefix + tail_a, prefix + tail_b]
    engine, hits = check_against_no_caching(model, tiny_tokenizer, prompts, greedy(12))
    assert hits == [0, 48]  # 50 shared tokens: 3 full blocks of 16
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (57 + 59, 48)


def test_a_later_chat_turn_finds_the_earlier_turn_and_its_reply(tiny_tokenizer):
    model = tiny_model()
    first, more = random_prompts([37, 10])
    engine = LLMEngine(model, tiny_tokenizer)
    [reply] = run_all(engine, [first], greedy(16))
    second = first + reply.token_ids + more  # turn 2: the whole conversation so far
    _, hits = check_against_no_caching(model, tiny_tokenizer, [first, second], greedy(16))
    # turn 1 computed its prompt and all but its last token: 52 tokens, 3 full blocks
    assert hits == [0, 48]


def test_a_pool_too_small_for_the_cache_evicts_tails_first_and_keeps_outputs(tiny_tokenizer):
    a, b = random_prompts([20, 20])
    engine, hits = check_against_no_caching(
        tiny_model(), tiny_tokenizer, [a, b, a], greedy(4), block_size=4, n_blocks=8
    )
    # a computes 23 tokens and leaves 5 cached blocks; b needs 6 blocks, 3 of them evicted from
    # a's tail; so a again finds only its first 2 blocks
    assert hits == [0, 0, 8] and engine.cache.allocator.num_evictions > 0


def test_admission_that_cannot_reserve_the_rest_keeps_no_cached_blocks(tiny_tokenizer):
    engine = LLMEngine(tiny_model(), tiny_tokenizer, EngineConfig(block_size=4, n_blocks=10))
    allocator = engine.cache.allocator
    first, blocker, more = random_prompts([12, 20, 16])
    engine.generate([GenerationRequest(first, greedy(1), "first")])
    assert allocator.n_cached == 3
    engine.add_request(GenerationRequest(blocker, greedy(10), "blocker"))
    engine.step()  # the blocker takes 5 of the 7 plain blocks
    engine.add_request(GenerationRequest(first + more, greedy(2), "late"))
    engine.step()  # the late one finds 3 cached blocks but 4 more do not fit
    [late] = engine.scheduler.waiting
    assert (late.blocks, late.block_keys, late.num_computed) == ([], [], 0)
    cached, _ = engine.scheduler.prefix_cache.match(late.all_ids)
    assert len(cached) == 3 and [allocator.refcount(b) for b in cached] == [0, 0, 0]
    assert allocator.n_used == 6  # the blocker's 6 blocks only
    while engine.has_unfinished():
        engine.step()
    assert allocator.n_free == allocator.n_blocks
    assert engine.stats().prefix_cache_queries == 12 + 20 + 28  # each admitted once


def test_shared_prefixes_under_preemption_keep_greedy_outputs(tiny_tokenizer):
    """Eight requests at once on one prefix, a pool too small for all: some blocks are shared
    while held, some computed twice at once, some lost to preemption and found again."""
    model = tiny_model()
    prefix, *tails = random_prompts([24, 3, 9, 1, 14, 5, 20, 7, 11])
    prompts = [prefix + tail for tail in tails]
    config = EngineConfig(block_size=4, n_blocks=40, max_num_batched_tokens=32)
    engine = LLMEngine(model, tiny_tokenizer, config)
    got = run_all(engine, prompts, greedy(20))
    stats = engine.stats()
    assert engine.scheduler.num_preemptions > 0 and stats.prefix_cache_hits >= 7 * 24
    assert engine.cache.allocator.n_free == 40 and stats.kv_blocks_used == 0
    off = EngineConfig(block_size=4, n_blocks=40, max_num_batched_tokens=32,
                       enable_prefix_caching=False)  # fmt: skip
    want = run_all(LLMEngine(model, tiny_tokenizer, off), prompts, greedy(20))
    for prompt, g, w in zip(prompts, got, want, strict=True):
        assert_same_greedy(model, prompt, g.token_ids, w.token_ids)
