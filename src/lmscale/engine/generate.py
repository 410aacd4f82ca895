"""Generation for one prompt: prefill once, then decode token by token through the KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from lmscale.engine.decode_step import DecodeStep
from lmscale.engine.sampling import SamplingParams, sample_next
from lmscale.errors import LmscaleError
from lmscale.model import KVCache, Transformer


def generate_ids(
    model: Transformer, prompt: Sequence[int], params: SamplingParams,
    stop_ids: Sequence[int] = (), step: DecodeStep | None = None,
) -> Iterator[int]:  # fmt: skip
    """Yield new token ids one at a time.

    Stops at `params.max_new_tokens`, at a token in `stop_ids`, or when the model's context is
    full. The prompt is cut from the left if it leaves no room for a new token. With a compiled
    `step` (of this model), every token after the first is decoded by it.
    """
    if not prompt:
        raise LmscaleError("the prompt is empty")
    limit = model.config.max_seq_len
    prompt = list(prompt)[-(limit - 1) :] if limit > 1 else list(prompt)[-1:]
    budget = min(params.max_new_tokens, limit - len(prompt))
    cache = model.new_cache(1, len(prompt) + budget)
    return continue_ids(model, cache, prompt, params, budget, stop_ids, step)


@torch.inference_mode()
def continue_ids(
    model: Transformer, cache: KVCache, new_ids: Sequence[int], params: SamplingParams,
    budget: int, stop_ids: Sequence[int] = (), step: DecodeStep | None = None,
) -> Iterator[int]:  # fmt: skip
    """Feed `new_ids` after what `cache` holds, then yield up to `budget` sampled ids.

    Args:
        model: the model the cache belongs to.
        cache: a batch-1 KV cache with room for `len(new_ids) + budget - 1` more positions.
        new_ids: at least one token that continues the cached sequence.
        params: how to sample.
        budget: the most ids to yield.
        stop_ids: ids that end generation (not yielded, not fed to the model).
        step: a compiled decode step of `model` for the single-token steps; None: eager.

    Yields:
        Sampled ids; each one is fed to the model before the next is sampled (the last is not).
    """
    device = model.tok_embeddings.weight.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    if budget <= 0:
        return
    # NOTE: only the last position's logits are needed; projecting the whole prompt onto the
    # vocabulary would cost more than the prefill itself for a small model.
    hidden = model.hidden_states(torch.tensor([list(new_ids)], device=device), cache)[:, -1]
    logits = model.output(hidden)  # (1, vocab)
    pools = list(cache.k.unbind(0)), list(cache.v.unbind(0))  # per layer (B, nkv, max_len, hs)
    for n in range(budget):
        next_id = int(sample_next(logits, params, generator))
        if next_id in stop_ids:
            return
        yield next_id
        if n == budget - 1:
            return  # the last id is not fed back
        if step is not None:
            logits = step([next_id], [cache.length], [[0]], *pools, contiguous=True)
            cache.advance(1)
        else:
            tokens = torch.tensor([[next_id]], device=device)
            logits = model.output(model.hidden_states(tokens, cache)[:, -1])


def stream_text(
    ids: Iterator[int], decode: Callable[[list[int]], str], stop: Sequence[str] = ()
) -> Iterator[str]:
    """Turn generated ids into text pieces, safe for byte-level tokens and stop strings.

    A byte-level token may hold half of a UTF-8 character; its text is held back until the
    character is complete. Text that could be the start of a stop string is held back too.
    """
    generated: list[int] = []
    shown = 0
    for token in ids:
        generated.append(token)
        text = decode(generated)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            continue
        cut = _first_stop(text, stop)
        if cut is not None:
            yield text[shown:cut]
            return
        safe = len(text) - _held_back(text, stop)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    text = decode(generated)
    if len(text) > shown:
        yield text[shown:]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
