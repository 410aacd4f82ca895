"""A paged KV cache: one pool of fixed-size blocks per layer, shared by every running sequence.

A contiguous cache reserves max_seq_len positions per sequence up front; a pool reserves nothing.
Each sequence owns a list of blocks (its block table), taken from a free list as it grows and
given back the moment it finishes, so memory follows the tokens actually cached:

    pool (per layer):  [b0][b1][b2][b3][b4][b5][b6][b7] ...    each block: block_size positions
    seq A (37 tokens): table [b3, b0, b6]       positions 0-15 in b3, 16-31 in b0, 32-36 in b6
    seq B (9 tokens):  table [b5]
    free list:         [b1, b2, b4, b7, ...]

For a forward pass over several sequences, `PagedKVCache.view` gives an object with the same
`layer(i).update(k, v) -> (keys, values, mask)` interface as the contiguous `KVCache`, so the model
needs no paged code: `update` writes each row's new keys into its blocks, then gathers each row's
blocks into a padded (B, nkv, S, hs) tensor and a mask that shows every query only its own row's
keys at or before its position.

With prefix caching, several sequences may hold the same full block (a shared prompt): each block
has a reference count, and a full block whose last holder leaves keeps its contents and its key
(see `prefix_cache.py`) on an LRU list until its space is needed, so a later request can take it
back instead of recomputing it:

    held (refcount >= 1)  --free, refcount 0-->  evictable, LRU order (if it has a key)
                                                 free list               (if not)
    allocate: the free list first, then the least recently used evictable block (its key dropped)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscale.errors import LmscaleError


class BlockAllocator:
    """Owns the block ids: who holds each (a reference count) and which full blocks hold a known
    prefix (their key), kept after their last holder leaves until their space is needed.

    `n_free` counts every block a request could be given: plain free ones and evictable ones.

    Args:
        n_blocks: the pool's size.
    """

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        # NOTE: a stack; freed blocks are reused first, which keeps the touched memory small.
        self._free = list(range(n_blocks - 1, -1, -1))
        self._refs = [0] * n_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, keyed; oldest first
        self._by_key: dict[bytes, int] = {}
        self._entries: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # block -> (key, tokens)
        self.num_evictions = 0
        """Cached blocks whose contents were given up for new ones, since the start."""

    @property
    def n_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def n_used(self) -> int:
        return self.n_blocks - self.n_free

    @property
    def n_cached(self) -> int:
        """Blocks that hold a key, held or not."""
        return len(self._by_key)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks, each with refcount 1; the caller checks `n_free` first."""
        if n > self.n_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.n_free} free")
        plain = min(n, len(self._free))
        taken = self._free[len(self._free) - plain :][::-1]
        del self._free[len(self._free) - plain :]
        taken += [self._evict() for _ in range(n - plain)]
        for block in taken:
            self._refs[block] = 1
        return taken

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds any more becomes free."""
        # NOTE: last block first, so a sequence's tail is evicted before its head: block i is
        # useless without blocks 0..i-1, and a shared head is the likeliest to be asked for again.
        for block in reversed(blocks):
            if self._refs[block] < 1:
                raise RuntimeError(f"KV block {block} freed more often than taken")
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._entries:
                self._evictable[block] = None  # the most recently used end
            else:
                self._free.append(block)

    def share(self, blocks: list[int]) -> list[int]:
        """Add a reference to each block (held or evictable); returns `blocks`."""
        for block in blocks:
            if self._refs[block] == 0:
                if block not in self._evictable:
                    raise RuntimeError(f"KV block {block} is free: there is nothing to share")
                del self._evictable[block]
            self._refs[block] += 1
        return blocks

    def lookup(self, key: bytes, tokens: tuple[int, ...]) -> int | None:
        """The cached block with this key and these tokens, or None (the caller shares it)."""
        block = self._by_key.get(key)
        # NOTE: the tokens are compared too, so even a hash collision could not serve a wrong block.
        if block is None or self._entries[block][1] != tokens:
            return None
        return block

    def cache(self, block: int, key: bytes, tokens: tuple[int, ...]) -> bool:
        """Offer a held, full, computed block under `key`; False if the key already has a block
        (two requests computed the same prefix: the first one stays) or this block has a key."""
        if self._refs[block] < 1:
            raise RuntimeError(f"KV block {block} is not held: its contents are not known")
        if key in self._by_key or block in self._entries:
            return False
        self._by_key[key] = block
        self._entries[block] = (key, tokens)
        return True

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        key, _ = self._entries.pop(block)
        del self._by_key[key]
        self.num_evictions += 1
        return block


def blocks_for(n_tokens: int, block_size: int) -> int:
    """How many blocks hold `n_tokens` positions."""
    return -(-n_tokens // block_size)


@dataclass
class BatchLayout:
    """Where one forward pass's tokens go and what each may see: the attention metadata.

    Rows are sequences, padded to T new tokens; S is the padded width of the gathered keys.
    Built once per forward pass by `batch_layout` and shared by every layer.
    """

    block_tables: Tensor
    """(B, max_blocks) block ids of each row, padded with block 0 (hidden by the mask)."""
    write_rows: Tensor
    """(N,) row of each real new token (N = the batch's real tokens, padding excluded)."""
    write_steps: Tensor
    """(N,) its index among the row's new tokens (0..T-1)."""
    write_blocks: Tensor
    """(N,) the block its key and value go to."""
    write_offsets: Tensor
    """(N,) its position inside that block."""
    mask: Tensor
    """(B, 1, T, S) True where query t of row b may attend to key s."""


def batch_layout(
    block_tables: list[list[int]], starts: list[int], n_new: list[int], block_size: int,
    device: torch.device | str | None = None,
) -> tuple[BatchLayout, Tensor]:  # fmt: skip
    """The layout of a batch whose row b caches `starts[b]` tokens and adds `n_new[b]` more.

    Returns:
        The layout, and the (B, T) positions of the new tokens (padding at position 0).
    """
    B, T = len(starts), max(n_new)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros(B, max_blocks, dtype=torch.long)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.long)
    steps = torch.arange(T)[None, :]  # (1, T)
    starts_t, n_new_t = torch.tensor(starts)[:, None], torch.tensor(n_new)[:, None]  # (B, 1)
    real = steps < n_new_t  # (B, T)
    # NOTE: padding queries sit at position 0, so they see key 0 of their row, which is always
    # real: a row that attends to nothing would make softmax produce NaN.
    positions = torch.where(real, starts_t + steps, 0)  # (B, T)
    rows, write_steps = real.nonzero(as_tuple=True)  # (N,), (N,)
    write_pos = positions[rows, write_steps]
    write_blocks = tables[rows, write_pos // block_size]
    key_pos = torch.arange(max_blocks * block_size)  # (S,)
    mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
    layout = BatchLayout(
        tables, rows, write_steps, write_blocks, write_pos % block_size, mask
    )  # fmt: skip
    moved = BatchLayout(*(getattr(layout, f).to(device) for f in layout.__dataclass_fields__))
    return moved, positions.to(device)


class PagedKVCache:
    """The pool: keys and values of every layer, (n_blocks, n_kv_heads, block_size, head_dim) each.

    Args:
        n_layers, n_kv_heads, head_dim: the model's shape.
        n_blocks: how many blocks the pool holds.
        block_size: positions per block.
        dtype, device: of the pool (the model's).
    """

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, n_blocks: int, block_size: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ):  # fmt: skip
        if n_blocks < 1:
            raise LmscaleError(f"the KV cache needs at least one block, got {n_blocks}")
        # NOTE: one block more than the allocator hands out: the scratch block, where the padded
        # rows of a compiled decode step write (nothing ever reads it).
        shape = (n_blocks + 1, n_kv_heads, block_size, head_dim)
        self.scratch_block = n_blocks
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block_size = block_size
        self.allocator = BlockAllocator(n_blocks)

    @staticmethod
    def bytes_per_block(
        n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
    ) -> int:
        """Memory of one block across all layers, keys and values."""
        return 2 * n_layers * n_kv_heads * block_size * head_dim * dtype.itemsize

    def view(self, layout: BatchLayout) -> PagedBatchView:
        """A cache object for one forward pass laid out by `layout`."""
        return PagedBatchView(self, layout)


class PagedBatchView:
    """One forward pass's window onto the pool, in the model's cache interface."""

    def __init__(self, pool: PagedKVCache, layout: BatchLayout):
        self.pool, self.layout = pool, layout

    def layer(self, index: int) -> PagedLayerView:
        return PagedLayerView(self.pool.k[index], self.pool.v[index], self.layout)

    def advance(self, n: int) -> None:
        """Nothing to do: the engine tracks each sequence's cached length itself."""


class PagedLayerView:
    """One layer of a `PagedBatchView`."""

    def __init__(self, k_pool: Tensor, v_pool: Tensor, layout: BatchLayout):
        self.k_pool, self.v_pool, self.layout = k_pool, v_pool, layout

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write the new (B, nkv, T, hs) keys and values into their blocks; gather every row's.

        Returns:
            Keys and values (B, nkv, S, hs), each row's blocks side by side and padded to S,
            and the (B, 1, T, S) mask.
        """
        lay = self.layout
        # k[rows, :, steps] puts the indexed dimension first: (N, nkv, hs).
        self.k_pool[lay.write_blocks, :, lay.write_offsets] = k[lay.write_rows, :, lay.write_steps]
        self.v_pool[lay.write_blocks, :, lay.write_offsets] = v[lay.write_rows, :, lay.write_steps]
        return self._gather(self.k_pool), self._gather(self.v_pool), lay.mask

    def _gather(self, pool: Tensor) -> Tensor:
        B, max_blocks = self.layout.block_tables.shape
        blocks = pool[self.layout.block_tables]  # (B, max_blocks, nkv, bs, hs)
        _, _, n_kv_heads, block_size, head_dim = blocks.shape
        return blocks.transpose(1, 2).reshape(B, n_kv_heads, max_blocks * block_size, head_dim)
