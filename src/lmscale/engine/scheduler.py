"""Continuous batching: which requests run this step, and how many tokens each computes.

The contract (vLLM v1's): every request has `num_computed` of its tokens in the KV cache and
`num_tokens` known (prompt + output); a step computes `n` more for each scheduled request. A prefill
is n = the whole prompt (or a chunk of it, when the step's token budget is short), a decode n = 1;
nothing else tells them apart. Each step:

1. running requests first, oldest first, each taking the blocks its new tokens need; when the pool
   is dry the newest running request is preempted: its blocks are freed and it goes back to the
   front of the queue, to be recomputed later from prompt + output so far (never failed);
2. then, if nobody was preempted, waiting requests in arrival order while the token budget,
   the batch size and the free blocks allow. With prefix caching, a request admitted first takes
   the cached blocks of its longest cached prefix (`prefix_cache.py`) and computes only the rest.

Blocks are given back by reference (`BlockAllocator.free`): a block shared with another request
stays, and a cached one stays findable until its space is needed.

Requests leave `running` the step they finish (`finish`) or are aborted (`abort`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmscale.engine.config import EngineConfig
from lmscale.engine.paged_cache import BlockAllocator, blocks_for
from lmscale.engine.prefix_cache import PrefixCache
from lmscale.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    """This step's work: `requests[i]` computes `n_tokens[i]` tokens."""

    requests: list[Request] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def add(self, request: Request, n: int) -> None:
        self.requests.append(request)
        self.n_tokens.append(n)


class Scheduler:
    """Holds the waiting queue and the running batch; owns the requests' KV blocks.

    Args:
        config: the budgets.
        allocator: the KV pool's block allocator.
    """

    def __init__(self, config: EngineConfig, allocator: BlockAllocator):
        self.config, self.allocator = config, allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_cache = (
            PrefixCache(allocator, config.block_size) if config.enable_prefix_caching else None
        )
        self.prefix_cache_queries = 0
        """Tokens of the requests admitted so far (each admission counts: a preempted request's
        tokens count again when it resumes)."""
        self.prefix_cache_hits = 0
        """Of those, tokens found in the prefix cache instead of being computed."""

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        """Decide this step's batch (see the module docstring) and reserve its blocks."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed, budget)
            if self._reserve(request, request.num_computed + n):
                batch.add(request, n)
                budget -= n
                i += 1
                continue
            victim = self.running[-1]  # the newest; never one already scheduled (index >= i)
            self._preempt(victim)
            batch.preempted.append(victim)
        if batch.preempted:
            return batch  # no room to grow: admitting more would only preempt again
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            self._take_cached_prefix(request)
            n = min(request.num_tokens - request.num_computed, budget)
            if not self._reserve(request, request.num_computed + n):
                self._release(request)  # it waits holding nothing, its cached blocks included
                request.num_computed = 0
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self._count_prefix_hits(request)
            request.status = Status.RUNNING
            self.running.append(request)
            batch.add(request, n)
            budget -= n
        return batch

    def cache_full_blocks(self, request: Request) -> None:
        """Offer `request`'s blocks that became full to the prefix cache; call it each time
        `request.num_computed` advances (a no-op with prefix caching off)."""
        if self.prefix_cache is not None:
            self.prefix_cache.register(request)

    def finish(self, request: Request) -> None:
        """Take a finished request out of the batch and free its blocks."""
        self.running.remove(request)
        self._release(request)
        request.status = Status.FINISHED

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is, freeing its blocks; None if it is not here."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._release(request)
                    request.status = Status.FINISHED
                    return request
        return None

    def _reserve(self, request: Request, n_tokens: int) -> bool:
        """Give `request` blocks for `n_tokens` positions, if the pool has them."""
        missing = blocks_for(n_tokens, self.config.block_size) - len(request.blocks)
        if missing <= 0:
            return True
        if missing > self.allocator.n_free:
            return False
        request.blocks.extend(self.allocator.allocate(missing))
        return True

    def _preempt(self, request: Request) -> None:
        # NOTE: recompute, not swap: its keys and values are rebuilt from prompt + output later.
        self.running.remove(request)
        self._release(request)
        request.num_computed = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _take_cached_prefix(self, request: Request) -> None:
        """Start a waiting request on the cached blocks of its longest cached prefix, if any."""
        if self.prefix_cache is None:
            return
        blocks, keys = self.prefix_cache.match(request.all_ids)
        request.blocks, request.block_keys = self.allocator.share(blocks), keys
        request.num_computed = len(blocks) * self.config.block_size

    def _count_prefix_hits(self, request: Request) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += request.num_computed

    def _release(self, request: Request) -> None:
        self.allocator.free(request.blocks)
        request.blocks, request.block_keys = [], []
