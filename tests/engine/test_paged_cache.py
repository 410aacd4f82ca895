"""The paged KV cache: block allocation, and a batch at mixed lengths matching plain passes."""

import pytest
import torch
from engine_helpers import random_prompts, tiny_model

from lmscale.engine.paged_cache import BlockAllocator, PagedKVCache, batch_layout, blocks_for


def test_allocator_hands_out_distinct_blocks_and_takes_them_back():
    allocator = BlockAllocator(8)
    a, b = allocator.allocate(3), allocator.allocate(5)
    assert len(set(a + b)) == 8 and allocator.n_free == 0
    with pytest.raises(RuntimeError):
        allocator.allocate(1)
    allocator.free(a)
    assert allocator.n_free == 3 and allocator.n_used == 5
    assert sorted(allocator.allocate(3)) == sorted(a)
    assert blocks_for(16, 16) == 1 and blocks_for(17, 16) == 2 and blocks_for(0, 16) == 0


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_rows_at_different_lengths_match_their_own_full_pass(name):
    """Prefill three prompts of different lengths in pieces through a scattered block table,
    then decode one token each: every row's logits equal a plain pass over that row alone."""
    model = tiny_model(name)
    c = model.config
    block_size = 4
    pool = PagedKVCache(c.n_layers, c.n_kv_heads, c.head_dim, n_blocks=40, block_size=block_size)
    prompts = random_prompts([3, 11, 6])
    # deliberately interleaved blocks, so rows share no contiguous region
    tables = [pool.allocator.allocate(blocks_for(len(p) + 1, block_size)) for p in prompts]
    tables = [t[::-1] for t in tables]
    lengths, following = [0, 0, 0], [None, None, None]
    with torch.inference_mode():
        for chunk in (5, 100):  # two prefill passes: a partial chunk, then the rest
            n_new = [min(chunk, len(p) - done) for p, done in zip(prompts, lengths, strict=True)]
            rows = [i for i, n in enumerate(n_new) if n > 0]
            logits = run(model, pool, [prompts[i] for i in rows], [tables[i] for i in rows],
                         [lengths[i] for i in rows], [n_new[i] for i in rows])  # fmt: skip
            for r, i in enumerate(rows):
                lengths[i] += n_new[i]
                if lengths[i] == len(prompts[i]):
                    following[i] = [int(logits[r, n_new[i] - 1].argmax())]
        sequences = [p + f for p, f in zip(prompts, following, strict=True)]
        decoded = run(model, pool, sequences, tables, [len(p) for p in prompts], [1, 1, 1])
        for row, (prompt, nxt) in enumerate(zip(prompts, following, strict=True)):
            full = model(torch.tensor([prompt + nxt]))[0]
            torch.testing.assert_close(decoded[row, 0], full[-1], atol=1e-4, rtol=1e-4)


def run(model, pool, sequences, tables, starts, n_new):
    """Logits (B, T, vocab) of the next `n_new[b]` tokens of each sequence after `starts[b]`."""
    T = max(n_new)
    tokens = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, (seq, start, n) in enumerate(zip(sequences, starts, n_new, strict=True)):
        tokens[b, :n] = torch.tensor(seq[start : start + n])
    layout, positions = batch_layout(tables, starts, n_new, pool.block_size)
    return model(tokens, pool.view(layout), positions)
