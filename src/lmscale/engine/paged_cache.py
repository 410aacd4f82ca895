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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmscale.errors import LmscaleError


class BlockAllocator:
    """Hands out block ids from a free list; knows nothing of tensors."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        # NOTE: a stack; freed blocks are reused first, which keeps the touched memory small.
        self._free = list(range(n_blocks - 1, -1, -1))

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks; the caller checks `n_free` first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


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
