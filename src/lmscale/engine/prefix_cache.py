"""Automatic prefix caching: full KV blocks found again by a key of the tokens before and in them.

Requests often share their beginning (a system prompt, earlier turns of a chat). Each FULL block
of a sequence gets a key that hashes its parent block's key together with its own token ids, so
two blocks have equal keys only if the whole prefixes up to their ends are equal:

    tokens:  [t0 ... t15][t16 ... t31][t32 ... t47][t48 t49]     block_size 16
    keys:     k0 = H(-, t0..15)                                  the last, partial block has none
                    k1 = H(k0, t16..31)
                                  k2 = H(k1, t32..47)

    a later request [t0 ... t47][u48 ...] finds k0, k1, k2 cached: it takes those three blocks
    (their refcounts + 1), starts with num_computed = 48, and computes only from u48 on.

H is SHA-256, so no crafted prompt can collide with another user's prefix; the allocator also
keeps each block's tokens and compares them on lookup. A match never covers the prompt's last
token: the model must run on at least one token to give the next token's logits.
"""

from __future__ import annotations

import hashlib
from array import array

from lmscale.engine.paged_cache import BlockAllocator
from lmscale.engine.request import Request


def block_key(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """The key of a full block holding `tokens` after the block whose key is `parent`.

    Args:
        parent: the previous block's key; None for a sequence's first block.
        tokens: the block's token ids.

    Returns:
        A 32-byte SHA-256 digest.
    """
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class PrefixCache:
    """Finds a request's cached leading blocks, and offers its newly full blocks to the cache.

    The blocks and their keys live in the `BlockAllocator`; this class only hashes token ids.
    `Request.block_keys` holds the keys of a request's leading blocks offered so far, so each
    block is hashed once per admission.

    Args:
        allocator: the KV pool's allocator.
        block_size: positions per block.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator, self.block_size = allocator, block_size

    def match(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks that hold the longest whole-block prefix of `token_ids`, short of
        its last token; nothing is shared yet.

        Returns:
            The blocks, in order, and their keys.
        """
        bs = self.block_size
        blocks: list[int] = []
        keys: list[bytes] = []
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            key = block_key(keys[-1] if keys else None, tokens)
            block = self.allocator.lookup(key, tokens)
            if block is None:
                break  # block i+1 is useless without block i: stop at the first miss
            blocks.append(block)
            keys.append(key)
        return blocks, keys

    def register(self, request: Request) -> None:
        """Offer each of `request`'s blocks that became full and computed since the last call."""
        bs, keys = self.block_size, request.block_keys
        full = request.num_computed // bs
        if full <= len(keys):
            return
        token_ids = request.all_ids
        for i in range(len(keys), full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            keys.append(block_key(keys[-1] if keys else None, tokens))
            self.allocator.cache(request.blocks[i], keys[-1], tokens)
