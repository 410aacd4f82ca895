"""Prefix-aware routing for Ray Serve: a request goes where its prompt's beginning is cached.

Each engine replica keeps its own prefix cache (`lmscale.engine.prefix_cache`): a chat's second
turn, sent to the replica that answered the first, reuses the first turn's KV blocks; sent to
another, it is computed again. Ray Serve's default router (power of two choices on queue length)
knows nothing of that. This one keeps, in the process that routes (the ingress), the keys of the
full prompt blocks it has sent to each replica, keyed like the engine's own cache:

    prompt   [b0][b1][b2][partial]  ->  keys k0, k1, k2   (k_i hashes k_(i-1) and block i)
    owner    k -> the replica that last received a prompt holding block k

A new request's deepest key with an owner names the replica holding its longest cached prefix.
That replica is ranked first if the prefix is more than `min_match` of the prompt's full blocks
(a later turn of a chat, a long shared system prompt; not a short system prompt that every
request begins with, which would pull all traffic to one replica) and it is not busy: full
(`max_ongoing_requests`), or more than `imbalance` requests past the least loaded candidate.
Otherwise the ranking is Ray's own power of two choices. The map is an estimate (a replica may have
evicted a block since); it holds at most `max_blocks` keys, the oldest dropped first, and forgets
a replica that dies.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from lmscale.engine.prefix_cache import block_key


def prompt_block_keys(prompt_ids: list[int], block_size: int) -> list[bytes]:
    """The prefix-cache keys of the prompt's full blocks, first to last."""
    keys, parent = [], None
    for start in range(0, len(prompt_ids) - block_size + 1, block_size):
        parent = block_key(parent, tuple(prompt_ids[start : start + block_size]))
        keys.append(parent)
    return keys


class PrefixAwareRouter(FIFOMixin, RequestRouter):
    """Ray Serve's `RequestRouter` for lmscale's engine replicas (see the module docstring).

    Options (`request_router_kwargs`): `block_size` (the engines' KV block size), `min_match`,
    `imbalance` and `max_blocks`.
    """

    def initialize_state(
        self, block_size: int = 16, min_match: float = 0.5, imbalance: int = 4,
        max_blocks: int = 200_000, **_,
    ) -> None:  # fmt: skip
        self.block_size, self.min_match = block_size, min_match
        self.imbalance, self.max_blocks = imbalance, max_blocks
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        others = self._power_of_two(candidate_replicas)
        owner = self._prefix_owner(pending_request, by_id)
        if owner is None or self._busy(owner, candidate_replicas):
            return [others]
        return [[owner], [r for r in others if r.replica_id != owner.replica_id]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        for key in self._keys(pending_request):
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_blocks:
            self._owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self._owner.items() if r == replica_id]:
            del self._owner[key]

    def _keys(self, pending_request: PendingRequest | None) -> list[bytes]:
        request = pending_request.args[0] if pending_request and pending_request.args else None
        prompt = getattr(request, "prompt_ids", None)
        return prompt_block_keys(prompt, self.block_size) if prompt else []

    def _prefix_owner(self, pending_request, by_id: dict) -> RunningReplica | None:
        """The replica holding more than `min_match` of the prompt's blocks, if one does."""
        keys = self._keys(pending_request)
        for depth in range(len(keys), 0, -1):
            if depth <= self.min_match * len(keys):
                break
            replica = by_id.get(self._owner.get(keys[depth - 1]))
            if replica is not None:
                return replica
        return None

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _busy(self, replica: RunningReplica, candidates: list[RunningReplica]) -> bool:
        length = self._queue_len(replica)
        least = min(self._queue_len(r) for r in candidates)
        return length >= replica.max_ongoing_requests or length - least > self.imbalance

    def _power_of_two(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        """Two replicas at random, the shorter queue first (Ray Serve's default policy)."""
        pair = random.sample(candidates, min(2, len(candidates)))
        return sorted(pair, key=self._queue_len)
